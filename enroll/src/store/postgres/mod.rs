//! The PostgreSQL store: one database that two or more replicas of the service share.
//!
//! **Client.** tokio-postgres with a deadpool pool (not sqlx: no macros, no driver for other
//! databases, about 35 small crates). The [`Store`] and [`Txn`] traits are synchronous and
//! called from blocking threads, so the store runs its own small tokio runtime (one thread,
//! `enroll-pg`): the pool's connections and the registry listener live there, and a caller
//! waits for its query on its own thread (`futures_executor::block_on`: a tokio-postgres
//! query is a message to its connection's task, it needs no runtime of its own). That works
//! from any thread — the server's blocking tasks, a test's or a benchmark's plain thread, even
//! an async task — where `Handle::block_on` or `block_in_place` panic on a current-thread
//! runtime or inside async code.
//!
//! **Concurrency between replicas** (`txn.rs`): transactions run at READ COMMITTED and take
//! the locks their decision needs before reading what it rests on — the token's row (`FOR
//! UPDATE`), the certificates they replace, and transaction-scoped advisory locks for address
//! allocation (all tenant pools; per tenant: host numbers, home-office addresses) and for the
//! registry's version counter at commit. Unique constraints (`site_hosts (tenant, host)`,
//! `tenant_pools (pool)`, one valid certificate per site and per key) stay as the last line: a
//! bug in the locking would fail an enrollment, never hand out an address twice. Not
//! SERIALIZABLE: its conflicts abort a transaction after the certificate was signed and would
//! need a retry loop around every decision of the service, where waiting on a lock costs
//! nothing but the wait.
//!
//! **Registry across replicas** (`listen.rs`): a commit that appended registry events sends
//! `NOTIFY komnet_registry`; every replica LISTENs on its own connection, reads the versions
//! it has not published yet and hands them to its watchers (the hubs' streams), its own
//! commits included. A poll every second covers a lost notification or connection.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures_executor::block_on;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::*;

mod listen;
mod tls;
mod txn;

use tls::Transport;

use txn::PgTxn;

/// Transaction-scoped advisory locks (`pg_advisory_xact_lock(bigint)`), "komn" and a number.
const LOCK_BASE: i64 = 0x6b6f_6d6e_0000_0000;
/// Held from a transaction's registry events to its commit: versions commit in order.
const REGISTRY_LOCK: i64 = LOCK_BASE | 1;
/// Allocating a tenant's pool number.
const POOLS_LOCK: i64 = LOCK_BASE | 2;
/// Reading the published policy in a transaction that may replace it.
const POLICY_LOCK: i64 = LOCK_BASE | 3;
/// Session-level, while migrations are applied: replicas that start together take turns.
const MIGRATION_LOCK: i64 = LOCK_BASE | 4;
/// Per-name locks (`pg_advisory_xact_lock(int, int)`: a key space apart from the bigint
/// ones): the first number says what the hashed name is.
const SITE_LOCK: i32 = 1;
const HOSTS_LOCK: i32 = 2;
const HOMEOFFICE_LOCK: i32 = 3;

/// The channel `NOTIFY` announces new registry versions on.
const CHANNEL: &str = "komnet_registry";

/// How long a caller waits for a free connection of the pool, and for a new one.
const POOL_WAIT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A PostgreSQL database shared by the replicas of the service.
pub struct PgStore {
    pool: Pool,
    /// Where the pool's connections and the listener run; shut down (not waited for) on drop.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    /// The database as errors name it (no password).
    database: String,
    events: broadcast::Sender<Arc<RegistryEvent>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Not `drop(runtime)`: that blocks, and panics when the store is dropped inside async
        // code (a test's Service at its end).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn connect_config(
    location: &PgLocation<'_>,
) -> Result<(tokio_postgres::Config, Transport), StoreError> {
    let failed = |message| StoreError::Connect {
        database: location.url.describe(),
        message,
    };
    let mut config = location.url.config().map_err(failed)?;
    // Named in pg_stat_activity, and never hanging on a database that does not answer.
    config
        .application_name("komnet-enroll")
        .connect_timeout(CONNECT_TIMEOUT);
    let transport = Transport::for_database(&mut config, location.ca.as_deref()).map_err(failed)?;
    Ok((config, transport))
}

/// `e` and what caused it: tokio-postgres's message alone says "error performing TLS
/// handshake", its cause says which certificate was refused and why.
fn with_causes(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl PgStore {
    /// The pool and the runtime, without touching the database yet.
    fn connect(location: &PgLocation<'_>, pool_size: usize) -> Result<Self, StoreError> {
        let database = location.url.describe();
        let (config, transport) = connect_config(location)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("enroll-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        let manager_config = ManagerConfig {
            // A connection the server closed is noticed (`is_closed`) and replaced.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match transport {
            Transport::Plain => Manager::from_config(config, NoTls, manager_config),
            Transport::Verified(tls) => Manager::from_config(config, tls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT * 2))
            .build()
            .map_err(|e| StoreError::Connect {
                database: database.clone(),
                message: e.to_string(),
            })?;
        let (events, _) = broadcast::channel(4096);
        Ok(PgStore {
            pool,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            database,
            events,
        })
    }

    /// Opens the database `init` prepared: applies pending migrations, checks it belongs to
    /// this data directory's CA, starts listening for other replicas' registry changes.
    pub fn open(location: &PgLocation<'_>, root_fingerprint: &str) -> Result<Self, StoreError> {
        let store = Self::connect(location, location.pool)?;
        let client = store.client()?;
        store.migrate(&client, false)?;
        match store.meta(&client, "root_fingerprint")? {
            None => {
                return Err(StoreError::NotInitialised {
                    database: store.database.clone(),
                })
            }
            Some(fp) if fp != root_fingerprint => {
                return Err(StoreError::OtherCa {
                    database: store.database.clone(),
                    database_fingerprint: fp,
                    ours: root_fingerprint.to_owned(),
                })
            }
            Some(_) => {}
        }
        let last: i64 = one(
            &client,
            "SELECT COALESCE(MAX(version), 0) FROM registry_events",
            &[],
        )?
        .try_get(0)?;
        drop(client);
        let (config, transport) = connect_config(location)?;
        store.handle.spawn(listen::run(
            config,
            transport,
            store.events.clone(),
            last as u64,
            store.database.clone(),
        ));
        Ok(store)
    }

    /// `init`: fails when the database holds a komnet schema of some CA already.
    pub fn check_uninitialised(location: &PgLocation<'_>) -> Result<(), StoreError> {
        let store = Self::connect(location, 1)?;
        let client = store.client()?;
        if store.has_schema(&client)? {
            if let Some(fingerprint) = store.meta(&client, "root_fingerprint")? {
                return Err(StoreError::AlreadyInitialised {
                    database: store.database.clone(),
                    fingerprint,
                });
            }
        }
        Ok(())
    }

    /// `init`: creates the schema and records the CA it belongs to.
    pub fn create(location: &PgLocation<'_>, root_fingerprint: &str) -> Result<(), StoreError> {
        let store = Self::connect(location, 1)?;
        let client = store.client()?;
        store.migrate(&client, true)?;
        exec(
            &client,
            "INSERT INTO meta (key, value) VALUES ('root_fingerprint', $1) \
             ON CONFLICT (key) DO NOTHING",
            &[&root_fingerprint],
        )?;
        match store.meta(&client, "root_fingerprint")? {
            Some(fp) if fp == root_fingerprint => Ok(()),
            other => Err(StoreError::AlreadyInitialised {
                database: store.database.clone(),
                fingerprint: other.unwrap_or_default(),
            }),
        }
    }

    /// Runs `fut` on the store's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        block_on(self.handle.spawn(fut)).map_err(|e| StoreError::Thread(e.to_string()))
    }

    /// A connection of the pool (made on the store's runtime, where its task then runs).
    fn client(&self) -> Result<Object, StoreError> {
        let pool = self.pool.clone();
        self.run(async move { pool.get().await })?
            .map_err(|e| match e {
                deadpool_postgres::PoolError::Backend(e) => StoreError::Connect {
                    database: self.database.clone(),
                    message: with_causes(&e),
                },
                other => StoreError::Connect {
                    database: self.database.clone(),
                    message: format!(
                        "{other} (all {} connections of database_pool busy, or the database \
                         does not answer)",
                        self.pool.status().max_size
                    ),
                },
            })
    }

    fn has_schema(&self, client: &Object) -> Result<bool, StoreError> {
        Ok(one(
            client,
            "SELECT to_regclass('schema_migrations') IS NOT NULL",
            &[],
        )?
        .try_get(0)?)
    }

    fn meta(&self, client: &Object, key: &str) -> Result<Option<String>, StoreError> {
        if !self.has_schema(client)? {
            return Ok(None);
        }
        Ok(
            opt(client, "SELECT value FROM meta WHERE key = $1", &[&key])?
                .map(|r| r.try_get(0))
                .transpose()?,
        )
    }

    /// Applies the migrations the database lacks, under a session lock so that replicas
    /// starting together take turns. `create`: an empty database gets the schema (init);
    /// otherwise an empty one is refused (a `serve` pointed at a wrong or wiped database).
    fn migrate(&self, client: &Object, create: bool) -> Result<(), StoreError> {
        exec(client, "SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
        let result = self.migrate_locked(client, create);
        let unlocked = exec(client, "SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
        result.and(unlocked.map(drop))
    }

    fn migrate_locked(&self, client: &Object, create: bool) -> Result<(), StoreError> {
        if !self.has_schema(client)? {
            if !create {
                return Err(StoreError::NotInitialised {
                    database: self.database.clone(),
                });
            }
            batch(
                client,
                "CREATE TABLE schema_migrations (
                    version BIGINT PRIMARY KEY,
                    name TEXT NOT NULL,
                    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
            )?;
        }
        let found: i64 = one(
            client,
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )?
        .try_get(0)?;
        let pending = migrations::pending(migrations::POSTGRES, found).map_err(|supported| {
            StoreError::NewerSchema {
                database: self.database.clone(),
                found,
                supported,
            }
        })?;
        for m in pending {
            batch(client, "BEGIN")?;
            let applied = batch(client, m.sql).and_then(|()| {
                exec(
                    client,
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    &[&m.version, &m.name],
                )
            });
            match applied {
                Ok(_) => batch(client, "COMMIT")?,
                Err(e) => {
                    let _ = batch(client, "ROLLBACK");
                    return Err(e);
                }
            }
            tracing::info!(
                version = m.version,
                name = m.name,
                database = %self.database,
                "database schema migrated"
            );
        }
        Ok(())
    }
}

// Queries on a connection, waited for on the calling thread (see the module's comment).

fn batch(client: &tokio_postgres::Client, sql: &str) -> Result<(), StoreError> {
    Ok(block_on(client.batch_execute(sql))?)
}

fn exec(client: &Object, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
    Ok(block_on(async {
        let st = client.prepare_cached(sql).await?;
        client.execute(&st, params).await
    })?)
}

fn query(client: &Object, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
    Ok(block_on(async {
        let st = client.prepare_cached(sql).await?;
        client.query(&st, params).await
    })?)
}

fn opt(client: &Object, sql: &str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
    Ok(block_on(async {
        let st = client.prepare_cached(sql).await?;
        client.query_opt(&st, params).await
    })?)
}

fn one(client: &Object, sql: &str, params: Params<'_>) -> Result<Row, StoreError> {
    Ok(block_on(async {
        let st = client.prepare_cached(sql).await?;
        client.query_one(&st, params).await
    })?)
}

fn cert_row(row: &Row) -> Result<CertificateRecord, StoreError> {
    cert_from_row((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
        row.try_get(7)?,
        row.try_get(8)?,
        row.try_get(9)?,
        row.try_get(10)?,
        row.try_get(11)?,
        row.try_get(12)?,
    ))
}

fn certs(
    client: &Object,
    where_clause: &str,
    params: Params<'_>,
) -> Result<Vec<CertificateRecord>, StoreError> {
    let sql = format!("SELECT {CERT_COLUMNS} FROM certificates WHERE {where_clause}");
    query(client, &sql, params)?.iter().map(cert_row).collect()
}

async fn events_since(
    client: &tokio_postgres::Client,
    since: u64,
    limit: usize,
) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT version, change FROM registry_events WHERE version > $1 \
             ORDER BY version LIMIT $2",
            &[&(since as i64), &(limit as i64)],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

fn to_event((version, change): (i64, String)) -> Result<RegistryEvent, StoreError> {
    Ok(RegistryEvent {
        version: version as u64,
        change: parse_json("registry change", &change)?,
    })
}

fn published_policy_version(client: &Object) -> Result<Option<u64>, StoreError> {
    opt(
        client,
        "SELECT version FROM policy_bundle WHERE id = 1",
        &[],
    )?
    .map(|r| parse_version("policy bundle version", r.try_get(0)?))
    .transpose()
}

fn published_policy(client: &Object) -> Result<Option<PublishedPolicy>, StoreError> {
    opt(
        client,
        "SELECT version, bytes, key_id, published_at FROM policy_bundle WHERE id = 1",
        &[],
    )?
    .map(|r| policy_of(&r, "policy bundle version"))
    .transpose()
}

fn policy_before(client: &Object, version: u64) -> Result<Option<PublishedPolicy>, StoreError> {
    opt(
        client,
        "SELECT version, bytes, key_id, published_at FROM policy_history \
         WHERE version < $1 ORDER BY version DESC LIMIT 1",
        &[&history_key(version)],
    )?
    .map(|r| policy_of(&r, "policy history version"))
    .transpose()
}

/// A bundle from a row of (version, bytes, key id, when).
fn policy_of(r: &Row, what: &'static str) -> Result<PublishedPolicy, StoreError> {
    Ok(PublishedPolicy {
        version: parse_version(what, r.try_get(0)?)?,
        bytes: r.try_get(1)?,
        key_id: r.try_get(2)?,
        published_at: r.try_get(3)?,
    })
}

impl Store for PgStore {
    fn begin(&self) -> Result<Box<dyn Txn + '_>, StoreError> {
        let client = self.client()?;
        batch(&client, "BEGIN")?;
        Ok(Box::new(PgTxn::new(self, client)))
    }

    /// Nothing to check: the database is the server's, not a file under the service.
    fn check_file(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn backup_to(&self, _out: &Path) -> Result<(), StoreError> {
        Err(StoreError::BackupWithPgDump)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<RegistryEvent>> {
        self.events.subscribe()
    }

    fn registry_snapshot(&self, now: i64) -> Result<RegistrySnapshot, StoreError> {
        let client = self.client()?;
        // One snapshot for both reads: the peers are exactly those of `version`.
        batch(&client, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        let read = (|| -> Result<RegistrySnapshot, StoreError> {
            let version: i64 = one(
                &client,
                "SELECT COALESCE(MAX(version), 0) FROM registry_events",
                &[],
            )?
            .try_get(0)?;
            let peers = certs(
                &client,
                "status = 'valid' AND not_after > $1 \
                 AND (admitted_until IS NULL OR admitted_until > $1) ORDER BY tenant, site",
                &[&now],
            )?
            .into_iter()
            .map(|c| c.identity)
            .collect();
            Ok(RegistrySnapshot {
                version: version as u64,
                peers,
            })
        })();
        let ended = batch(&client, if read.is_ok() { "COMMIT" } else { "ROLLBACK" });
        let snapshot = read?;
        ended?;
        Ok(snapshot)
    }

    fn valid_identities(&self, now: i64) -> Result<Vec<Identity>, StoreError> {
        Ok(certs(
            &self.client()?,
            "status = 'valid' AND not_after > $1 ORDER BY tenant, site",
            &[&now],
        )?
        .into_iter()
        .map(|c| c.identity)
        .collect())
    }

    fn registry_events_since(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<RegistryEvent>, StoreError> {
        let client = self.client()?;
        block_on(events_since(&client, since, limit))?
            .into_iter()
            .map(to_event)
            .collect()
    }

    fn registry_version(&self) -> Result<u64, StoreError> {
        let client = self.client()?;
        let v: i64 = one(
            &client,
            "SELECT COALESCE(MAX(version), 0) FROM registry_events",
            &[],
        )?
        .try_get(0)?;
        Ok(v as u64)
    }

    fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(certs(&self.client()?, "serial = $1", &[&serial])?
            .into_iter()
            .next())
    }

    fn revoked_unexpired(&self, now: i64) -> Result<Vec<RevokedEntry>, StoreError> {
        let found = certs(
            &self.client()?,
            "status IN ('revoked', 'superseded') AND not_after > $1 ORDER BY revoked_at, serial",
            &[&now],
        )?;
        Ok(found
            .into_iter()
            .map(|c| RevokedEntry {
                revoked_at: c.revoked_at.unwrap_or(c.not_before),
                reason: c.reason.unwrap_or(RevocationReason::Unspecified),
                serial: c.identity.serial,
            })
            .collect())
    }

    fn hubs(&self, now: i64) -> Result<Vec<Identity>, StoreError> {
        Ok(certs(
            &self.client()?,
            "status = 'valid' AND role = 'hub' AND not_after > $1 ORDER BY tenant, site",
            &[&now],
        )?
        .into_iter()
        .map(|c| c.identity)
        .collect())
    }

    fn policy_version(&self) -> Result<u64, StoreError> {
        let client = self.client()?;
        match opt(
            &client,
            "SELECT value FROM meta WHERE key = 'policy_version'",
            &[],
        )? {
            None => Ok(0),
            Some(r) => parse_version("policy version", r.try_get(0)?),
        }
    }

    fn published_policy_version(&self) -> Result<Option<u64>, StoreError> {
        published_policy_version(&self.client()?)
    }

    fn published_policy(&self) -> Result<Option<PublishedPolicy>, StoreError> {
        published_policy(&self.client()?)
    }

    fn policy_before(&self, version: u64) -> Result<Option<PublishedPolicy>, StoreError> {
        policy_before(&self.client()?, version)
    }

    fn put_hub_report(
        &self,
        tenant: &TenantId,
        site: &SiteId,
        at: i64,
        report: &str,
    ) -> Result<(), StoreError> {
        exec(
            &self.client()?,
            "INSERT INTO hub_reports (tenant, site, at, report) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, site) DO UPDATE SET at = excluded.at, report = excluded.report",
            &[&tenant.as_str(), &site.as_str(), &at, &report],
        )?;
        Ok(())
    }

    fn note_policy_held(
        &self,
        tenant: &TenantId,
        site: &SiteId,
        version: u64,
        at: i64,
    ) -> Result<(), StoreError> {
        exec(
            &self.client()?,
            "INSERT INTO policy_held (tenant, site, version, at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, site) DO UPDATE SET version = excluded.version, at = excluded.at",
            &[&tenant.as_str(), &site.as_str(), &(version as i64), &at],
        )?;
        Ok(())
    }

    fn policy_held(&self) -> Result<Vec<(String, String, i64, i64)>, StoreError> {
        query(
            &self.client()?,
            "SELECT tenant, site, version, at FROM policy_held ORDER BY tenant, site",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
        .collect()
    }

    fn hub_reports(&self) -> Result<Vec<(String, String, i64, String)>, StoreError> {
        query(
            &self.client()?,
            "SELECT tenant, site, at, report FROM hub_reports ORDER BY tenant, site",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
        .collect()
    }

    fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = query(
            &self.client()?,
            "SELECT id, at, actor, action, details FROM audit ORDER BY id DESC LIMIT $1",
            &[&(limit as i64)],
        )?;
        let mut out = rows
            .iter()
            .map(|r| {
                let details: String = r.try_get(4)?;
                Ok(AuditRecord {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    actor: r.try_get(2)?,
                    action: r.try_get(3)?,
                    details: parse_json("audit details", &details)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }
}
