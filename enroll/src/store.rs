//! Persistent state behind a trait, so a PostgreSQL backend can follow the embedded SQLite one.
//!
//! Everything an enrollment, renewal or revocation changes (token, address, certificate, registry
//! event, audit record) is written through one [`Txn`]: it commits whole or not at all, so a
//! `kill -9` mid-enrollment leaves no half-issued state. Registry events are published to
//! watchers only after their transaction committed, in commit order.

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
        "the database {} has schema version {found}, newer than this komnet-enroll understands \
         ({supported}): run the newer komnet-enroll, or restore a backup made with this one",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
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

/// The published policy bundle.
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
    fn registry_snapshot(&self, now: i64) -> Result<RegistrySnapshot, StoreError>;
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
    fn end_certificate(
        &mut self,
        serial: &str,
        status: CertStatus,
        at: i64,
        reason: RevocationReason,
    ) -> Result<(), StoreError>;
    /// Appends a registry change; returns its version.
    fn append_event(&mut self, change: RegistryChange, now: i64) -> Result<u64, StoreError>;
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
    /// Replaces the published bundle.
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
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    tenant TEXT NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    used_at INTEGER,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tenant_pools (
    tenant TEXT PRIMARY KEY,
    pool INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS site_hosts (
    tenant TEXT NOT NULL, site TEXT NOT NULL, host INTEGER NOT NULL,
    PRIMARY KEY (tenant, site),
    UNIQUE (tenant, host)
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    tenant TEXT NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
    wg_public_key TEXT NOT NULL,
    tunnel_addrs TEXT NOT NULL,
    not_before INTEGER NOT NULL, not_after INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('valid', 'superseded', 'revoked')),
    revoked_at INTEGER, reason TEXT,
    der BLOB NOT NULL
);
-- One valid identity per site and per WireGuard key: the registry is keyed by both.
CREATE UNIQUE INDEX IF NOT EXISTS certificates_one_valid_per_site
    ON certificates (tenant, site) WHERE status = 'valid';
CREATE UNIQUE INDEX IF NOT EXISTS certificates_one_valid_per_key
    ON certificates (wg_public_key) WHERE status = 'valid';
CREATE INDEX IF NOT EXISTS certificates_status ON certificates (status, not_after);
-- Every enrollment answer lists the hubs: a few rows among many thousand spokes.
CREATE INDEX IF NOT EXISTS certificates_role ON certificates (role, status, not_after);
CREATE TABLE IF NOT EXISTS registry_events (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    change TEXT NOT NULL
);
-- One row: the published signed policy bundle. Versions are u64, kept as text like
-- meta.policy_version (SQLite integers are signed).
CREATE TABLE IF NOT EXISTS policy_bundle (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version TEXT NOT NULL,
    bytes BLOB NOT NULL,
    key_id TEXT NOT NULL,
    published_at INTEGER NOT NULL
);
-- Home-office addresses come from the policy's pools, not from site_hosts: they are whole
-- addresses (the pools can change with the policy), held until the holder's expiry.
CREATE TABLE IF NOT EXISTS homeoffice_addrs (
    tenant TEXT NOT NULL, user TEXT NOT NULL, addr TEXT NOT NULL,
    held_until INTEGER NOT NULL,
    PRIMARY KEY (tenant, addr)
);
CREATE INDEX IF NOT EXISTS homeoffice_addrs_user ON homeoffice_addrs (tenant, user);
-- Which certificate a used token bought: a retry with the same token, key and CSR (the
-- answer was lost) gets that certificate again instead of `token_used`. (Schema version 2.)
CREATE TABLE IF NOT EXISTS token_certificates (
    token_id TEXT PRIMARY KEY,
    serial TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL
);
"#;

/// The embedded store: one SQLite file in WAL mode.
///
/// `synchronous = NORMAL`: a committed transaction survives a crash of the process (`kill -9`);
/// a power loss may lose the last few commits but never corrupts the file. A certificate lost
/// that way is harmless: hubs admit only peers the registry lists.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// Device and inode of the file at open: a file deleted or replaced under the running
    /// service is noticed before the next write.
    identity: (u64, u64),
    events: broadcast::Sender<Arc<RegistryEvent>>,
    stop_checkpointer: Arc<AtomicBool>,
}

/// The background checkpoint runs every 20 ticks of 50 ms (one second).
const CHECKPOINT_EVERY_TICKS: u32 = 20;

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop_checkpointer.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

/// The schema this build writes. Version 1 had no `user_version` (0); version 2 added
/// `token_certificates`. Every change is additive (`IF NOT EXISTS`) and bumps this number;
/// a database from a newer build is refused rather than half understood.
pub const SCHEMA_VERSION: i64 = 2;

fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl SqliteStore {
    /// Opens `DATA_DIR/enroll.db`, which `init` created ([`SqliteStore::create`]); a missing
    /// file is an error, never a new empty database.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Missing { path });
        }
        Self::open_file(&path)
    }

    /// Creates (or opens) `DATA_DIR/enroll.db`: for `init` only.
    pub fn create(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_file(&data_dir.join(DB_FILE))
    }

    /// Online copy of the database into `out` (consistent, taken while the service runs:
    /// SQLite's `VACUUM INTO`), written to a temporary name and renamed, mode 0600.
    fn write_backup(&self, out: &Path) -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = out.with_extension("partial");
        let _ = std::fs::remove_file(&tmp);
        let conn = self.conn.lock();
        conn.execute("VACUUM INTO ?1", params![tmp.to_string_lossy()])?;
        drop(conn);
        let io = |source: std::io::Error| StoreError::Backup {
            path: out.to_owned(),
            source,
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, out).map_err(io)?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Fails when the database file was deleted or replaced since it was opened.
    fn same_file(&self) -> Result<(), StoreError> {
        match file_identity(&self.path) {
            Ok(id) if id == self.identity => Ok(()),
            Ok(_) => Err(StoreError::Replaced {
                path: self.path.clone(),
                what: "replaced by another file",
            }),
            Err(_) => Err(StoreError::Replaced {
                path: self.path.clone(),
                what: "deleted",
            }),
        }
    }

    pub fn open_file(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(m) = std::fs::metadata(path) {
            // Root ignores permission bits, SQLite would write anyway; refuse what the service's
            // own user could not write either, with the file named.
            if m.permissions().mode() & 0o222 == 0 {
                return Err(StoreError::ReadOnly {
                    path: path.to_owned(),
                    reason: format!("mode {:o}", m.permissions().mode() & 0o7777),
                });
            }
        }
        let opened = || -> Result<Connection, rusqlite::Error> {
            let conn = Connection::open(path)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            Ok(conn)
        };
        let conn = opened().map_err(|source| match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ReadOnly) => StoreError::ReadOnly {
                path: path.to_owned(),
                reason:
                    "the file or its directory cannot be written (immutable or read-only mount)"
                        .into(),
            },
            _ => StoreError::Open {
                path: path.to_owned(),
                source,
            },
        })?;
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints fsync; run inside a commit they stall every writer behind the store's
        // lock (measured: 713 -> 1,116 certificates/s with them moved out). A background
        // thread with its own connection checkpoints instead (PASSIVE: it never blocks
        // writers).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)
            .map_err(|source| match source.sqlite_error_code() {
                Some(rusqlite::ErrorCode::ReadOnly) => StoreError::ReadOnly {
                    path: path.to_owned(),
                    reason:
                        "the file or its directory cannot be written (immutable or read-only mount)"
                            .into(),
                },
                _ => StoreError::Open {
                    path: path.to_owned(),
                    source,
                },
            })?;
        if found < SCHEMA_VERSION {
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        let identity = file_identity(path).map_err(|_| StoreError::Replaced {
            path: path.to_owned(),
            what: "deleted",
        })?;
        // More distinct statements than rusqlite's default cache of 16: re-preparing costs more
        // than running most of them.
        conn.set_prepared_statement_cache_capacity(64);
        let (events, _) = broadcast::channel(4096);
        let stop = Arc::new(AtomicBool::new(false));
        let checkpointer = Connection::open(path)?;
        checkpointer.busy_timeout(std::time::Duration::from_secs(5))?;
        let stop_flag = stop.clone();
        std::thread::Builder::new()
            .name("enroll-checkpoint".into())
            .spawn(move || {
                let mut ticks = 0u32;
                while !stop_flag.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    ticks += 1;
                    if ticks.is_multiple_of(CHECKPOINT_EVERY_TICKS) {
                        if let Err(e) =
                            checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                        {
                            tracing::warn!(error = %e, "WAL checkpoint failed");
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            identity,
            events,
            stop_checkpointer: stop,
        })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt {
        what,
        value: text.chars().take(200).collect(),
    })
}

fn parse_name<T>(
    what: &'static str,
    text: String,
    f: impl FnOnce(&str) -> Result<T, crate::identity::IdentityError>,
) -> Result<T, StoreError> {
    f(&text).map_err(|_| StoreError::Corrupt { what, value: text })
}

const CERT_COLUMNS: &str = "serial, tenant, site, role, wg_public_key, tunnel_addrs, not_before, \
                            not_after, status, revoked_at, reason, der";

type CertRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
    Option<i64>,
    Option<String>,
    Vec<u8>,
);

fn read_cert_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CertRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
        row.get(9)?,
        row.get(10)?,
        row.get(11)?,
    ))
}

fn cert_from_row(r: CertRow) -> Result<CertificateRecord, StoreError> {
    let (serial, tenant, site, role, key, addrs, not_before, not_after, status, rat, reason, der) =
        r;
    let tunnel_addrs: Vec<IpNet> = parse_json("tunnel addresses", &addrs)?;
    let reason = match reason {
        None => None,
        Some(r) => Some(RevocationReason::parse(&r).ok_or(StoreError::Corrupt {
            what: "revocation reason",
            value: r,
        })?),
    };
    Ok(CertificateRecord {
        identity: Identity {
            tenant: parse_name("tenant", tenant, TenantId::parse)?,
            site: parse_name("site", site, SiteId::parse)?,
            role: parse_name("role", role, str::parse)?,
            wg_public_key: parse_name("WireGuard key", key, WgPublicKey::from_base64)?,
            tunnel_addrs,
            not_after,
            serial,
        },
        not_before,
        status: CertStatus::parse(&status)?,
        revoked_at: rat,
        reason,
        der,
    })
}

fn query_certs(
    conn: &Connection,
    where_clause: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<CertificateRecord>, StoreError> {
    let sql = format!("SELECT {CERT_COLUMNS} FROM certificates WHERE {where_clause}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(params, read_cert_row)?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(cert_from_row).collect()
}

fn events_since(
    conn: &Connection,
    since: u64,
    limit: usize,
) -> Result<Vec<RegistryEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, change FROM registry_events WHERE version > ?1 ORDER BY version LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![since as i64, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(version, change)| {
            Ok(RegistryEvent {
                version: version as u64,
                change: parse_json("registry change", &change)?,
            })
        })
        .collect()
}

fn parse_version(what: &'static str, text: String) -> Result<u64, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt { what, value: text })
}

fn published_policy_version(conn: &Connection) -> Result<Option<u64>, StoreError> {
    conn.prepare_cached("SELECT version FROM policy_bundle WHERE id = 1")?
        .query_row([], |r| r.get::<_, String>(0))
        .optional()?
        .map(|v| parse_version("policy bundle version", v))
        .transpose()
}

fn published_policy(conn: &Connection) -> Result<Option<PublishedPolicy>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT version, bytes, key_id, published_at FROM policy_bundle WHERE id = 1",
        )?
        .query_row([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()?;
    let Some((version, bytes, key_id, published_at)) = row else {
        return Ok(None);
    };
    Ok(Some(PublishedPolicy {
        version: parse_version("policy bundle version", version)?,
        bytes,
        key_id,
        published_at,
    }))
}

impl Store for SqliteStore {
    fn check_file(&self) -> Result<(), StoreError> {
        self.same_file()
    }

    fn backup_to(&self, out: &Path) -> Result<(), StoreError> {
        self.write_backup(out)
    }

    fn begin(&self) -> Result<Box<dyn Txn + '_>, StoreError> {
        self.same_file()?;
        let conn = self.conn.lock();
        // IMMEDIATE takes the write lock now, so two processes on one file cannot both read a
        // token as unused and then both mark it.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Box::new(SqliteTxn {
            conn,
            events: &self.events,
            pending: Vec::new(),
            pending_audit: Vec::new(),
            done: false,
        }))
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<RegistryEvent>> {
        self.events.subscribe()
    }

    fn registry_version(&self) -> Result<u64, StoreError> {
        let version: i64 = self.conn.lock().query_row(
            "SELECT COALESCE(MAX(version), 0) FROM registry_events",
            [],
            |r| r.get(0),
        )?;
        Ok(version as u64)
    }

    fn registry_snapshot(&self, now: i64) -> Result<RegistrySnapshot, StoreError> {
        let conn = self.conn.lock();
        let version: i64 = conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM registry_events",
            [],
            |r| r.get(0),
        )?;
        let peers = query_certs(
            &conn,
            "status = 'valid' AND not_after > ?1 ORDER BY tenant, site",
            &[&now],
        )?
        .into_iter()
        .map(|c| c.identity)
        .collect();
        Ok(RegistrySnapshot {
            version: version as u64,
            peers,
        })
    }

    fn registry_events_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<RegistryEvent>, StoreError> {
        events_since(&self.conn.lock(), since, limit)
    }

    fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(query_certs(&self.conn.lock(), "serial = ?1", &[&serial])?
            .into_iter()
            .next())
    }

    fn revoked_unexpired(&self, now: i64) -> Result<Vec<RevokedEntry>, StoreError> {
        let conn = self.conn.lock();
        let certs = query_certs(
            &conn,
            "status IN ('revoked', 'superseded') AND not_after > ?1 ORDER BY revoked_at, serial",
            &[&now],
        )?;
        Ok(certs
            .into_iter()
            .map(|c| RevokedEntry {
                revoked_at: c.revoked_at.unwrap_or(c.not_before),
                reason: c.reason.unwrap_or(RevocationReason::Unspecified),
                serial: c.identity.serial,
            })
            .collect())
    }

    fn hubs(&self, now: i64) -> Result<Vec<Identity>, StoreError> {
        // No ORDER BY: with one, SQLite walks the whole per-site index instead of the role
        // index. Hubs are few; sort them here.
        let mut hubs: Vec<Identity> = query_certs(
            &self.conn.lock(),
            "status = 'valid' AND role = 'hub' AND not_after > ?1",
            &[&now],
        )?
        .into_iter()
        .map(|c| c.identity)
        .collect();
        hubs.sort_by(|a, b| (&a.tenant, &a.site).cmp(&(&b.tenant, &b.site)));
        Ok(hubs)
    }

    fn policy_version(&self) -> Result<u64, StoreError> {
        let v: Option<String> = self
            .conn
            .lock()
            .query_row(
                "SELECT value FROM meta WHERE key = 'policy_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match v {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| StoreError::Corrupt {
                what: "policy version",
                value: v,
            }),
        }
    }

    fn published_policy_version(&self) -> Result<Option<u64>, StoreError> {
        published_policy_version(&self.conn.lock())
    }

    fn published_policy(&self) -> Result<Option<PublishedPolicy>, StoreError> {
        published_policy(&self.conn.lock())
    }

    fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, at, actor, action, details FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt
            .query_map(params![limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = rows
            .into_iter()
            .map(|(id, at, actor, action, details)| {
                Ok(AuditRecord {
                    id,
                    at,
                    actor,
                    action,
                    details: parse_json("audit details", &details)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }
}

struct SqliteTxn<'a> {
    conn: MutexGuard<'a, Connection>,
    events: &'a broadcast::Sender<Arc<RegistryEvent>>,
    pending: Vec<RegistryEvent>,
    pending_audit: Vec<(i64, String, String, String)>,
    done: bool,
}

impl Drop for SqliteTxn<'_> {
    fn drop(&mut self) {
        if !self.done {
            // A failed rollback leaves the transaction open; the next BEGIN then fails loudly.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl Txn for SqliteTxn<'_> {
    fn insert_token(&mut self, t: &TokenRecord) -> Result<(), StoreError> {
        self.conn.prepare_cached(
            "INSERT INTO tokens (id, secret_hash, tenant, site, role, created_at, expires_at, used_at, created_by) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            t.id,
            t.secret_hash,
            t.tenant.as_str(),
            t.site.as_str(),
            t.role.as_str(),
            t.created_at,
            t.expires_at,
            t.used_at,
            t.created_by
        ])?;
        Ok(())
    }

    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT id, secret_hash, tenant, site, role, created_at, expires_at, used_at, created_by \
                 FROM tokens WHERE id = ?1",
            )?
            .query_row(params![id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, String>(8)?,
                ))
            })
            .optional()?;
        let Some((id, secret_hash, tenant, site, role, created_at, expires_at, used_at, by)) = row
        else {
            return Ok(None);
        };
        Ok(Some(TokenRecord {
            id,
            secret_hash,
            tenant: parse_name("tenant", tenant, TenantId::parse)?,
            site: parse_name("site", site, SiteId::parse)?,
            role: parse_name("role", role, str::parse)?,
            created_at,
            expires_at,
            used_at,
            created_by: by,
        }))
    }

    fn set_token_certificate(&mut self, token_id: &str, serial: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO token_certificates (token_id, serial) VALUES (?1, ?2)")?
            .execute(params![token_id, serial])?;
        Ok(())
    }

    fn token_certificate(&mut self, token_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT serial FROM token_certificates WHERE token_id = ?1")?
            .query_row(params![token_id], |r| r.get(0))
            .optional()?)
    }

    fn use_token(&mut self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("UPDATE tokens SET used_at = ?2 WHERE id = ?1 AND used_at IS NULL")?
            .execute(params![id, now])?;
        Ok(n == 1)
    }

    fn tenant_pool(&mut self, tenant: &TenantId, max: u64) -> Result<Option<u64>, StoreError> {
        let existing: Option<i64> = self
            .conn
            .prepare_cached("SELECT pool FROM tenant_pools WHERE tenant = ?1")?
            .query_row(params![tenant.as_str()], |r| r.get(0))
            .optional()?;
        if let Some(p) = existing {
            return Ok(Some(p as u64));
        }
        // Usually one past the highest (an index lookup); after releases, the lowest gap.
        let next: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(pool) + 1, 0) FROM tenant_pools")?
            .query_row([], |r| r.get(0))?;
        if (next as u64) < max {
            self.conn
                .prepare_cached("INSERT INTO tenant_pools (tenant, pool) VALUES (?1, ?2)")?
                .execute(params![tenant.as_str(), next])?;
            return Ok(Some(next as u64));
        }
        // The lowest number not taken: 0 if free, else one past a taken number whose successor
        // is free.
        let free: i64 = self.conn.prepare_cached(
            "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM tenant_pools WHERE pool = 0) THEN 0 ELSE \
             (SELECT MIN(a.pool + 1) FROM tenant_pools a WHERE NOT EXISTS \
               (SELECT 1 FROM tenant_pools b WHERE b.pool = a.pool + 1)) END",
        )?
        .query_row([], |r| r.get(0))?;
        if free as u64 >= max {
            return Ok(None);
        }
        self.conn
            .prepare_cached("INSERT INTO tenant_pools (tenant, pool) VALUES (?1, ?2)")?
            .execute(params![tenant.as_str(), free])?;
        Ok(Some(free as u64))
    }

    fn site_host(
        &mut self,
        tenant: &TenantId,
        site: &SiteId,
        max: u64,
    ) -> Result<Option<u64>, StoreError> {
        let existing: Option<i64> = self
            .conn
            .prepare_cached("SELECT host FROM site_hosts WHERE tenant = ?1 AND site = ?2")?
            .query_row(params![tenant.as_str(), site.as_str()], |r| r.get(0))
            .optional()?;
        if let Some(h) = existing {
            return Ok(Some(h as u64));
        }
        // Usually one past the highest (an index lookup); after releases, the lowest gap (a
        // scan of the tenant's sites, at most a few thousand rows).
        let next: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(host) + 1, 1) FROM site_hosts WHERE tenant = ?1")?
            .query_row(params![tenant.as_str()], |r| r.get(0))?;
        let free: i64 = if (next as u64) <= max {
            next
        } else {
            self
            .conn
            .prepare_cached(
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM site_hosts WHERE tenant = ?1 AND host = 1) THEN 1 ELSE \
                 (SELECT MIN(a.host + 1) FROM site_hosts a WHERE a.tenant = ?1 AND NOT EXISTS \
                   (SELECT 1 FROM site_hosts b WHERE b.tenant = ?1 AND b.host = a.host + 1)) END",
            )?
            .query_row(params![tenant.as_str()], |r| r.get(0))?
        };
        if free as u64 > max {
            return Ok(None);
        }
        self.conn
            .prepare_cached("INSERT INTO site_hosts (tenant, site, host) VALUES (?1, ?2, ?3)")?
            .execute(params![tenant.as_str(), site.as_str(), free])?;
        Ok(Some(free as u64))
    }

    fn release_site_host(&mut self, tenant: &TenantId, site: &SiteId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM site_hosts WHERE tenant = ?1 AND site = ?2")?
            .execute(params![tenant.as_str(), site.as_str()])?;
        Ok(())
    }

    fn certificate(&mut self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(query_certs(&self.conn, "serial = ?1", &[&serial])?
            .into_iter()
            .next())
    }

    fn valid_certificates(
        &mut self,
        selector: &Selector,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        match selector {
            Selector::Serial(s) => query_certs(
                &self.conn,
                "status = 'valid' AND serial = ?1",
                &[&s.to_ascii_lowercase()],
            ),
            Selector::Tenant(t) => query_certs(
                &self.conn,
                "status = 'valid' AND tenant = ?1 ORDER BY site",
                &[&t.as_str()],
            ),
            Selector::Site(t, s) => query_certs(
                &self.conn,
                "status = 'valid' AND tenant = ?1 AND site = ?2",
                &[&t.as_str(), &s.as_str()],
            ),
        }
    }

    fn valid_certificate_for_key(
        &mut self,
        key: &WgPublicKey,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(query_certs(
            &self.conn,
            "status = 'valid' AND wg_public_key = ?1",
            &[&key.to_base64()],
        )?
        .into_iter()
        .next())
    }

    fn insert_certificate(&mut self, c: &CertificateRecord) -> Result<(), StoreError> {
        let id = &c.identity;
        let addrs = serde_json::to_string(&id.tunnel_addrs).unwrap_or_else(|_| "[]".into());
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO certificates ({CERT_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))?
            .execute(params![
                id.serial,
                id.tenant.as_str(),
                id.site.as_str(),
                id.role.as_str(),
                id.wg_public_key.to_base64(),
                addrs,
                c.not_before,
                id.not_after,
                c.status.as_str(),
                c.revoked_at,
                c.reason.map(|r| r.as_str()),
                c.der
            ])?;
        Ok(())
    }

    fn end_certificate(
        &mut self,
        serial: &str,
        status: CertStatus,
        at: i64,
        reason: RevocationReason,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE certificates SET status = ?2, revoked_at = ?3, reason = ?4 WHERE serial = ?1",
            )?
            .execute(params![serial, status.as_str(), at, reason.as_str()])?;
        Ok(())
    }

    fn append_event(&mut self, change: RegistryChange, now: i64) -> Result<u64, StoreError> {
        let text = serde_json::to_string(&change).unwrap_or_default();
        self.conn
            .prepare_cached("INSERT INTO registry_events (at, change) VALUES (?1, ?2)")?
            .execute(params![now, text])?;
        let version = self.conn.last_insert_rowid() as u64;
        self.pending.push(RegistryEvent { version, change });
        Ok(version)
    }

    fn audit(
        &mut self,
        now: i64,
        actor: &str,
        action: &str,
        details: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO audit (at, actor, action, details) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![now, actor, action, details.to_string()])?;
        self.pending_audit.push((
            now,
            actor.to_owned(),
            action.to_owned(),
            details.to_string(),
        ));
        Ok(())
    }

    fn set_policy_version(&mut self, version: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('policy_version', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![version.to_string()])?;
        Ok(())
    }

    fn published_policy_version(&mut self) -> Result<Option<u64>, StoreError> {
        published_policy_version(&self.conn)
    }

    fn published_policy(&mut self) -> Result<Option<PublishedPolicy>, StoreError> {
        published_policy(&self.conn)
    }

    fn publish_policy(&mut self, p: &PublishedPolicy) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO policy_bundle (id, version, bytes, key_id, published_at) \
                 VALUES (1, ?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version, \
                 bytes = excluded.bytes, key_id = excluded.key_id, \
                 published_at = excluded.published_at",
            )?
            .execute(params![
                p.version.to_string(),
                p.bytes,
                p.key_id,
                p.published_at
            ])?;
        Ok(())
    }

    fn homeoffice_addrs(&mut self, tenant: &TenantId) -> Result<Vec<HomeofficeAddr>, StoreError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT user, addr, held_until FROM homeoffice_addrs WHERE tenant = ?1",
            )?
            .query_map(params![tenant.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(user, addr, held_until)| {
                Ok(HomeofficeAddr {
                    user: parse_name("home-office user", user, SiteId::parse)?,
                    addr: addr.parse().map_err(|_| StoreError::Corrupt {
                        what: "home-office address",
                        value: addr,
                    })?,
                    held_until,
                })
            })
            .collect()
    }

    fn hold_homeoffice_addr(
        &mut self,
        tenant: &TenantId,
        user: &SiteId,
        addr: IpAddr,
        until: i64,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO homeoffice_addrs (tenant, user, addr, held_until) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (tenant, addr) DO UPDATE SET user = excluded.user, \
                 held_until = excluded.held_until",
            )?
            .execute(params![
                tenant.as_str(),
                user.as_str(),
                addr.to_string(),
                until
            ])?;
        Ok(())
    }

    fn release_homeoffice_addr(
        &mut self,
        tenant: &TenantId,
        addr: IpAddr,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM homeoffice_addrs WHERE tenant = ?1 AND addr = ?2")?
            .execute(params![tenant.as_str(), addr.to_string()])?;
        Ok(())
    }

    fn release_homeoffice_user(
        &mut self,
        tenant: &TenantId,
        user: &SiteId,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM homeoffice_addrs WHERE tenant = ?1 AND user = ?2")?
            .execute(params![tenant.as_str(), user.as_str()])?;
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT")?;
        self.done = true;
        // Logged only once committed, so the log never shows an action the store does not have.
        for (at, actor, action, details) in self.pending_audit.drain(..) {
            tracing::info!(target: "komnet_enroll::audit", at, actor, action, details, "audit");
        }
        // Still holding the connection lock: events reach watchers in commit order.
        for event in self.pending.drain(..) {
            let _ = self.events.send(Arc::new(event));
        }
        Ok(())
    }
}
