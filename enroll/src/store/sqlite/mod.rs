//! The embedded store: one SQLite file in WAL mode — its schema and migrations, opening and
//! checking the file, backups, and the reads outside a transaction. Writes go through a
//! [`SqliteTxn`] (`txn.rs`).

use super::*;

mod txn;

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

/// Applies `pending` in order, each with its version number in one transaction. IMMEDIATE: a
/// second process opening the same file waits instead of applying the same migration again.
fn migrate(
    conn: &mut Connection,
    pending: &[migrations::Migration],
) -> Result<(), rusqlite::Error> {
    for m in pending {
        let txn = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let found: i64 = txn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found >= m.version {
            continue; // another process applied it meanwhile
        }
        txn.execute_batch(m.sql)?;
        txn.pragma_update(None, "user_version", m.version)?;
        txn.commit()?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "database schema migrated"
        );
    }
    Ok(())
}

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
        let open_error = |source: rusqlite::Error| match source.sqlite_error_code() {
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
        };
        let mut conn = opened().map_err(open_error)?;
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let pending = migrations::pending(migrations::SQLITE, found).map_err(|supported| {
            StoreError::NewerSchema {
                database: path.display().to_string(),
                found,
                supported,
            }
        })?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints fsync; run inside a commit they stall every writer behind the store's
        // lock (measured: 713 -> 1,116 certificates/s with them moved out). A background
        // thread with its own connection checkpoints instead (PASSIVE: it never blocks
        // writers).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, pending).map_err(open_error)?;
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
        row.get(12)?,
    ))
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

fn published_policy_version(conn: &Connection) -> Result<Option<u64>, StoreError> {
    conn.prepare_cached("SELECT version FROM policy_bundle WHERE id = 1")?
        .query_row([], |r| r.get::<_, String>(0))
        .optional()?
        .map(|v| parse_version("policy bundle version", v))
        .transpose()
}

fn published_policy(conn: &Connection) -> Result<Option<PublishedPolicy>, StoreError> {
    one_policy(
        conn,
        "SELECT version, bytes, key_id, published_at FROM policy_bundle WHERE id = 1",
        params![],
        "policy bundle version",
    )
}

fn policy_before(conn: &Connection, version: u64) -> Result<Option<PublishedPolicy>, StoreError> {
    one_policy(
        conn,
        "SELECT version, bytes, key_id, published_at FROM policy_history \
         WHERE version < ?1 ORDER BY version DESC LIMIT 1",
        params![history_key(version)],
        "policy history version",
    )
}

/// The one bundle `sql` selects (version, bytes, key id, when), if any.
fn one_policy(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
    what: &'static str,
) -> Result<Option<PublishedPolicy>, StoreError> {
    let row = conn
        .prepare_cached(sql)?
        .query_row(params, |r| {
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
        version: parse_version(what, version)?,
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
            "status = 'valid' AND not_after > ?1 \
             AND (admitted_until IS NULL OR admitted_until > ?1) ORDER BY tenant, site",
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

    fn valid_identities(&self, now: i64) -> Result<Vec<Identity>, StoreError> {
        Ok(query_certs(
            &self.conn.lock(),
            "status = 'valid' AND not_after > ?1 ORDER BY tenant, site",
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

    fn policy_before(&self, version: u64) -> Result<Option<PublishedPolicy>, StoreError> {
        policy_before(&self.conn.lock(), version)
    }

    fn put_hub_report(
        &self,
        tenant: &TenantId,
        site: &SiteId,
        at: i64,
        report: &str,
    ) -> Result<(), StoreError> {
        self.conn
            .lock()
            .prepare_cached(
                "INSERT INTO hub_reports (tenant, site, at, report) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (tenant, site) DO UPDATE SET at = excluded.at, report = excluded.report",
            )?
            .execute(params![tenant.as_str(), site.as_str(), at, report])?;
        Ok(())
    }

    fn note_policy_held(
        &self,
        tenant: &TenantId,
        site: &SiteId,
        version: u64,
        at: i64,
    ) -> Result<(), StoreError> {
        self.conn
            .lock()
            .prepare_cached(
                "INSERT INTO policy_held (tenant, site, version, at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (tenant, site) DO UPDATE SET version = excluded.version, at = excluded.at",
            )?
            .execute(params![tenant.as_str(), site.as_str(), version as i64, at])?;
        Ok(())
    }

    fn policy_held(&self) -> Result<Vec<(String, String, i64, i64)>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT tenant, site, version, at FROM policy_held ORDER BY tenant, site",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn hub_reports(&self) -> Result<Vec<(String, String, i64, String)>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT tenant, site, at, report FROM hub_reports ORDER BY tenant, site",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
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
