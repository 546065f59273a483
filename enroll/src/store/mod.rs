//! Persistent state behind a trait, with two backends: one SQLite file (the embedded default
//! for one machine) and PostgreSQL (several replicas of the service on one database).
//!
//! Everything an enrollment, renewal or revocation changes (token, address, certificate, registry
//! event, audit record) is written through one [`Txn`]: it commits whole or not at all, so a
//! `kill -9` mid-enrollment leaves no half-issued state. Registry events are published to
//! watchers only after their transaction committed, in commit order; on PostgreSQL also those
//! another replica committed (LISTEN/NOTIFY).
//!
//! The traits are synchronous: the service's decisions run on blocking threads (`server` calls
//! them through `spawn_blocking`), SQLite is synchronous anyway, and one transaction is a
//! sequence of decisions between reads and writes that reads best as straight-line code. The
//! PostgreSQL backend bridges to its async client itself (`postgres/mod.rs`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use parking_lot::{Mutex, MutexGuard};
use rusqlite::{params, Connection, OptionalExtension as _};
use tokio::sync::broadcast;

use crate::api::admin::AuditRecord;
use crate::api::{RegistryChange, RegistryEvent, RegistrySnapshot, RevocationReason};
use crate::ca::RevokedEntry;
use crate::identity::{Identity, Role, SiteId, TenantId, WgPublicKey};

pub mod migrations;
mod postgres;
mod rows;
mod sqlite;

use rows::*;

pub use migrations::SCHEMA_VERSION;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// File name of the SQLite database inside the data directory.
pub const DB_FILE: &str = "enroll.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "the database {} is missing: only `komnet-enroll init` creates one, so that addresses and \
         serials already handed out are never handed out again; restore the last backup \
         (docs/operations.md, \"Backup and restore\")",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error(
        "the database {} is read-only ({reason}): the service writes every enrollment to it; \
         make it writable for the service's user",
        path.display()
    )]
    ReadOnly { path: PathBuf, reason: String },
    #[error("cannot open the database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the database {} was {what} while the service ran: stopping so that nothing is handed \
         out twice from an empty or older copy; restore it (docs/operations.md) and restart",
        path.display()
    )]
    Replaced { path: PathBuf, what: &'static str },
    #[error(
        "the database {database} has schema version {found}, newer than this komnet-enroll \
         understands ({supported}): run the newer komnet-enroll, or restore a backup made with \
         this one"
    )]
    NewerSchema {
        database: String,
        found: i64,
        supported: i64,
    },
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("cannot connect to the {database}: {message}")]
    Connect { database: String, message: String },
    #[error(
        "the {database} holds no komnet schema: only `komnet-enroll init --database …` creates \
         one, so that addresses and serials already handed out are never handed out again; \
         restore the last backup (pg_restore, docs/operations.md) or run init"
    )]
    NotInitialised { database: String },
    #[error(
        "the {database} was initialised already (its CA's root fingerprint is {fingerprint}): \
         a further replica copies that service's data directory (CA, enroll-dh.key, \
         enroll.toml) instead of running init"
    )]
    AlreadyInitialised {
        database: String,
        fingerprint: String,
    },
    #[error(
        "the {database} belongs to the CA with root fingerprint {database_fingerprint}, this \
         data directory's CA is {ours}: every replica needs a copy of the same data directory"
    )]
    OtherCa {
        database: String,
        database_fingerprint: String,
        ours: String,
    },
    #[error(
        "the database is PostgreSQL: back it up with pg_dump (docs/operations.md, \"Backup and \
         restore\"), not with komnet-enroll backup"
    )]
    BackupWithPgDump,
    #[error("cannot write the backup {}: {source}", path.display())]
    Backup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database checkpoint thread: {0}")]
    Thread(String),
    #[error("database holds a malformed {what}: {value:?}")]
    Corrupt { what: &'static str, value: String },
}

/// A stored enrollment token (the secret is only present as its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_hash: Vec<u8>,
    pub tenant: TenantId,
    pub site: SiteId,
    pub role: Role,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub created_by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    Valid,
    /// Replaced by a renewal or re-enrollment (listed in the CRL as `superseded`).
    Superseded,
    Revoked,
}

impl CertStatus {
    fn as_str(self) -> &'static str {
        match self {
            CertStatus::Valid => "valid",
            CertStatus::Superseded => "superseded",
            CertStatus::Revoked => "revoked",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "valid" => CertStatus::Valid,
            "superseded" => CertStatus::Superseded,
            "revoked" => CertStatus::Revoked,
            _ => {
                return Err(StoreError::Corrupt {
                    what: "certificate status",
                    value: s.to_owned(),
                })
            }
        })
    }
}

/// An issued certificate and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    pub identity: Identity,
    pub not_before: i64,
    pub status: CertStatus,
    pub revoked_at: Option<i64>,
    pub reason: Option<RevocationReason>,
    pub der: Vec<u8>,
}

/// A published policy bundle: the one in force, or one kept in the history.
#[derive(Clone, PartialEq, Eq)]
pub struct PublishedPolicy {
    pub version: u64,
    /// The signed bundle exactly as published (what gateways verify).
    pub bytes: Vec<u8>,
    pub key_id: String,
    pub published_at: i64,
}

impl std::fmt::Debug for PublishedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishedPolicy")
            .field("version", &self.version)
            .field("bytes", &self.bytes.len())
            .field("key_id", &self.key_id)
            .field("published_at", &self.published_at)
            .finish()
    }
}

/// A home-office address and who holds it until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeofficeAddr {
    pub user: SiteId,
    pub addr: IpAddr,
    /// The holder's identity expires then; afterwards the address is free again.
    pub held_until: i64,
}

/// Which certificates a revocation targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Serial(String),
    Tenant(TenantId),
    Site(TenantId, SiteId),
}

/// As people say it: `serial 5F3A…`, `tenant tholey`, `site tholey/rathaus`.
impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Serial(s) => write!(f, "serial {s}"),
            Selector::Tenant(t) => write!(f, "tenant {t}"),
            Selector::Site(t, s) => write!(f, "site {t}/{s}"),
        }
    }
}

/// The persistent state of the enrollment service.
pub trait Store: Send + Sync + 'static {
    /// Starts a write transaction; dropping it without `commit` rolls everything back.
    fn begin(&self) -> Result<Box<dyn Txn + '_>, StoreError>;
    /// Fails when the database under the running service was deleted or replaced.
    fn check_file(&self) -> Result<(), StoreError>;
    /// A consistent copy of the database, taken while the service runs.
    fn backup_to(&self, out: &Path) -> Result<(), StoreError>;
    /// Registry events committed from now on.
    fn subscribe(&self) -> broadcast::Receiver<Arc<RegistryEvent>>;
    /// The admitted identities: valid certificates, without MFA-gated home offices whose
    /// window is closed.
    fn registry_snapshot(&self, now: i64) -> Result<RegistrySnapshot, StoreError>;
    /// Every valid certificate's identity, admitted or waiting for its MFA window.
    fn valid_identities(&self, now: i64) -> Result<Vec<Identity>, StoreError>;
    fn registry_events_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<RegistryEvent>, StoreError>;
    /// The newest registry version (0 before the first change).
    fn registry_version(&self) -> Result<u64, StoreError>;
    fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError>;
    /// Revoked and superseded certificates not yet expired (what the CRL lists).
    fn revoked_unexpired(&self, now: i64) -> Result<Vec<RevokedEntry>, StoreError>;
    /// Valid, unexpired hub identities.
    fn hubs(&self, now: i64) -> Result<Vec<Identity>, StoreError>;
    fn policy_version(&self) -> Result<u64, StoreError>;
    /// The version of the published policy bundle (cheap: no bundle bytes are read).
    fn published_policy_version(&self) -> Result<Option<u64>, StoreError>;
    fn published_policy(&self) -> Result<Option<PublishedPolicy>, StoreError>;
    /// The bundle published before `version`: the newest kept with a smaller version (`None`
    /// for the first one, and for the first one published before schema version 4, which
    /// kept only the bundle in force).
    fn policy_before(&self, version: u64) -> Result<Option<PublishedPolicy>, StoreError>;
    /// Keeps a hub's report of its peers (JSON), replacing its previous one.
    fn put_hub_report(
        &self,
        tenant: &TenantId,
        site: &SiteId,
        at: i64,
        report: &str,
    ) -> Result<(), StoreError>;
    /// Every hub's last report: (tenant, site, when, JSON).
    fn hub_reports(&self) -> Result<Vec<(String, String, i64, String)>, StoreError>;
    /// An appliance said (polling for a newer bundle) that it holds policy `version`.
    fn note_policy_held(
        &self,
        tenant: &TenantId,
        site: &SiteId,
        version: u64,
        at: i64,
    ) -> Result<(), StoreError>;
    /// What each appliance last said it holds: (tenant, site, version, when).
    fn policy_held(&self) -> Result<Vec<(String, String, i64, i64)>, StoreError>;
    fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
}

/// One write transaction.
pub trait Txn {
    fn insert_token(&mut self, token: &TokenRecord) -> Result<(), StoreError>;
    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Marks the token used; false when it already was (the caller lost a race).
    fn use_token(&mut self, id: &str, now: i64) -> Result<bool, StoreError>;
    /// Records the certificate a token bought.
    fn set_token_certificate(&mut self, token_id: &str, serial: &str) -> Result<(), StoreError>;
    /// The certificate a used token bought (tokens used before schema version 2: none).
    fn token_certificate(&mut self, token_id: &str) -> Result<Option<String>, StoreError>;
    /// The tenant's pool number, allocating the lowest free one below `max` on first use.
    fn tenant_pool(&mut self, tenant: &TenantId, max: u64) -> Result<Option<u64>, StoreError>;
    /// The site's host number in its tenant's pool (1..=max), allocating the lowest free one
    /// on first use; it stays with the site until released.
    fn site_host(
        &mut self,
        tenant: &TenantId,
        site: &SiteId,
        max: u64,
    ) -> Result<Option<u64>, StoreError>;
    fn release_site_host(&mut self, tenant: &TenantId, site: &SiteId) -> Result<(), StoreError>;
    fn certificate(&mut self, serial: &str) -> Result<Option<CertificateRecord>, StoreError>;
    /// Valid certificates that match the selector.
    fn valid_certificates(
        &mut self,
        selector: &Selector,
    ) -> Result<Vec<CertificateRecord>, StoreError>;
    /// The valid certificate holding this WireGuard key, if any.
    fn valid_certificate_for_key(
        &mut self,
        key: &WgPublicKey,
    ) -> Result<Option<CertificateRecord>, StoreError>;
    fn insert_certificate(&mut self, cert: &CertificateRecord) -> Result<(), StoreError>;
    /// Moves the end of a home-office device's MFA window (`Identity::admitted_until`; `None`:
    /// not gated).
    fn set_admitted_until(&mut self, serial: &str, until: Option<i64>) -> Result<(), StoreError>;
    fn end_certificate(
        &mut self,
        serial: &str,
        status: CertStatus,
        at: i64,
        reason: RevocationReason,
    ) -> Result<(), StoreError>;
    /// Appends a registry change; its version is known once committed ([`Committed`]).
    fn append_event(&mut self, change: RegistryChange, now: i64) -> Result<(), StoreError>;
    fn audit(
        &mut self,
        now: i64,
        actor: &str,
        action: &str,
        details: &serde_json::Value,
    ) -> Result<(), StoreError>;
    fn set_policy_version(&mut self, version: u64) -> Result<(), StoreError>;
    fn published_policy_version(&mut self) -> Result<Option<u64>, StoreError>;
    fn published_policy(&mut self) -> Result<Option<PublishedPolicy>, StoreError>;
    /// Replaces the published bundle and keeps it in the history ([`Store::policy_before`]).
    fn publish_policy(&mut self, policy: &PublishedPolicy) -> Result<(), StoreError>;
    /// Every home-office address recorded for the tenant, expired holders included.
    fn homeoffice_addrs(&mut self, tenant: &TenantId) -> Result<Vec<HomeofficeAddr>, StoreError>;
    /// Gives `addr` to `user` until `until` (taking it over from an expired holder).
    fn hold_homeoffice_addr(
        &mut self,
        tenant: &TenantId,
        user: &SiteId,
        addr: IpAddr,
        until: i64,
    ) -> Result<(), StoreError>;
    fn release_homeoffice_addr(
        &mut self,
        tenant: &TenantId,
        addr: IpAddr,
    ) -> Result<(), StoreError>;
    /// Releases every address of the user (decommission).
    fn release_homeoffice_user(
        &mut self,
        tenant: &TenantId,
        user: &SiteId,
    ) -> Result<(), StoreError>;
    fn commit(self: Box<Self>) -> Result<Committed, StoreError>;
}

/// What a committed transaction wrote to the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// The version of its last registry event (`None`: it appended none). PostgreSQL gives
    /// versions out at commit, under a lock, so that they become visible in order to every
    /// replica: a watcher that has seen version N has seen every version below it.
    pub registry_version: Option<u64>,
}

/// Where the service keeps its state: enroll.toml's `database`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location<'a> {
    /// `DATA_DIR/enroll.db` (no `database` key).
    Sqlite(&'a Path),
    Postgres(PgLocation<'a>),
}

/// A PostgreSQL database: enroll.toml's `database`, `database_pool` and `database_ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgLocation<'a> {
    pub url: &'a crate::config::DatabaseUrl,
    /// Connections per replica.
    pub pool: usize,
    /// The CA the server's certificate must chain to (TLS); relative paths are resolved
    /// against the data directory.
    pub ca: Option<PathBuf>,
}

impl<'a> Location<'a> {
    pub fn of(data_dir: &'a Path, config: &'a crate::config::Config) -> Self {
        match &config.database {
            None => Location::Sqlite(data_dir),
            Some(url) => Location::Postgres(PgLocation {
                url,
                pool: config.database_pool,
                ca: config.database_ca.as_ref().map(|ca| data_dir.join(ca)),
            }),
        }
    }
}

/// Opens the store `init` created; `root_fingerprint` is the data directory's CA, which a
/// PostgreSQL database shared by replicas must have been initialised with.
pub fn open(location: Location<'_>, root_fingerprint: &str) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match location {
        Location::Sqlite(dir) => Arc::new(SqliteStore::open(dir)?),
        Location::Postgres(pg) => Arc::new(PgStore::open(&pg, root_fingerprint)?),
    })
}

/// Fails when `init` would find the store initialised already: checked before the CA is made,
/// so that a refused init leaves nothing behind.
pub fn check_uninitialised(location: Location<'_>) -> Result<(), StoreError> {
    match location {
        // The CA's files guard a data directory already (init refuses to overwrite them).
        Location::Sqlite(_) => Ok(()),
        Location::Postgres(pg) => PgStore::check_uninitialised(&pg),
    }
}

/// Creates the store for `init`, recording the CA's root fingerprint in a PostgreSQL database.
pub fn create(location: Location<'_>, root_fingerprint: &str) -> Result<(), StoreError> {
    match location {
        Location::Sqlite(dir) => drop(SqliteStore::create(dir)?),
        Location::Postgres(pg) => PgStore::create(&pg, root_fingerprint)?,
    }
    Ok(())
}
