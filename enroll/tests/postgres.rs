//! The PostgreSQL store on a real server (a throwaway cluster per test): what init and serve
//! refuse, migrations applied at start, a database newer than the binary refused, and the
//! SQLite file's migrations from an unversioned first-release database.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use komnet_enroll::config::Config;
use komnet_enroll::service::{self, Clock as _, ManualClock, OpenError, Service};
use komnet_enroll::store::{migrations, StoreError, SCHEMA_VERSION};

fn pg_config(database: komnet_enroll::config::DatabaseUrl) -> Config {
    Config {
        database: Some(database),
        ..common::test_config()
    }
}

fn store_error(e: OpenError) -> StoreError {
    match e {
        OpenError::Store(e) => e,
        other => panic!("expected a store error, got {other}"),
    }
}

async fn versions(pg: &common::postgres::Cluster, db: &str) -> Vec<(i64, String)> {
    pg.client(db)
        .await
        .query(
            "SELECT version, name FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_at_start_and_a_newer_or_foreign_database_is_refused() {
    let pg = common::postgres::Cluster::start();
    let clock = Arc::new(ManualClock::default());
    let url = pg.create_database("enroll").await;
    let dir = tempfile::tempdir().unwrap();
    let config = pg_config(url.clone());
    service::init(dir.path(), &config, clock.now()).unwrap();
    // init wrote the database into enroll.toml (0600: it may carry a password), and applied
    // every migration.
    let written = Config::load(dir.path()).unwrap();
    assert_eq!(written.database, Some(url.clone()));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("enroll.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let expected: Vec<(i64, String)> = migrations::POSTGRES
        .iter()
        .map(|m| (m.version, m.name.to_string()))
        .collect();
    assert_eq!(versions(&pg, "enroll").await, expected);
    assert!(
        !dir.path().join("enroll.db").exists(),
        "no SQLite file beside a PostgreSQL database"
    );

    // An older schema (version 2 not yet applied) is brought up to date by serve.
    let c = pg.client("enroll").await;
    c.batch_execute(
        "DROP TABLE token_certificates; DELETE FROM schema_migrations WHERE version = 2",
    )
    .await
    .unwrap();
    let svc = Service::open(dir.path(), clock.clone()).unwrap();
    assert_eq!(versions(&pg, "enroll").await, expected);
    assert_eq!(svc.store.registry_version().unwrap(), 0);
    drop(svc);

    // A database from a newer komnet-enroll is refused, with both versions named.
    c.batch_execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'future')")
        .await
        .unwrap();
    let e = store_error(Service::open(dir.path(), clock.clone()).unwrap_err());
    assert!(
        matches!(e, StoreError::NewerSchema { found: 99, supported, .. } if supported == SCHEMA_VERSION),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.contains("schema version 99"), "{text}");
    assert!(text.contains("PostgreSQL database enroll"), "{text}");
    c.batch_execute("DELETE FROM schema_migrations WHERE version = 99")
        .await
        .unwrap();

    // A second init against the same database is refused before it writes anything: a
    // replica is a copy of the first data directory, never a new CA.
    let other = tempfile::tempdir().unwrap();
    let e = store_error(service::init(other.path(), &config, clock.now()).unwrap_err());
    assert!(matches!(e, StoreError::AlreadyInitialised { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("copies that service's data directory"),
        "{e}"
    );
    assert!(std::fs::read_dir(other.path()).unwrap().next().is_none());

    // A data directory with another CA pointed at this database is refused.
    let second = pg.create_database("second").await;
    let foreign = tempfile::tempdir().unwrap();
    service::init(foreign.path(), &pg_config(second), clock.now()).unwrap();
    std::fs::write(foreign.path().join("enroll.toml"), config.to_toml()).unwrap();
    let e = store_error(Service::open(foreign.path(), clock.clone()).unwrap_err());
    assert!(matches!(e, StoreError::OtherCa { .. }), "{e}");

    // serve never creates a schema: an empty (or wiped) database is refused.
    let empty = pg.create_database("empty").await;
    std::fs::write(dir.path().join("enroll.toml"), pg_config(empty).to_toml()).unwrap();
    let e = store_error(Service::open(dir.path(), clock.clone()).unwrap_err());
    assert!(matches!(e, StoreError::NotInitialised { .. }), "{e}");
    assert!(e.to_string().contains("init --database"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_named_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let url = komnet_enroll::config::DatabaseUrl::parse(
        "postgres://enroll:s3cret-pw@%2Fnonexistent%2Fsocket:5432/komnet",
    )
    .unwrap();
    let e = service::init(dir.path(), &pg_config(url.clone()), 0).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("PostgreSQL database komnet"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(!format!("{url:?}").contains("s3cret"));
    // Nothing was written: init checks the database before it makes a CA.
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    // Not a PostgreSQL connection string at all: a config error naming the key.
    let e = komnet_enroll::config::DatabaseUrl::parse("mysql://x@y/z").unwrap_err();
    assert!(e.contains("not a PostgreSQL connection string"), "{e}");
}

/// A database of the first release (its tables, no version number) is migrated to the current
/// schema: migration 1 finds its tables, migration 2 adds the rest.
#[test]
fn an_unversioned_sqlite_database_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enroll.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(migrations::SQLITE[0].sql).unwrap();
    conn.execute(
        "INSERT INTO tokens (id, secret_hash, tenant, site, role, created_at, expires_at, \
         created_by) VALUES ('t1', x'00', 'tholey', 'rathaus', 'spoke', 1, 2, 'test')",
        [],
    )
    .unwrap();
    drop(conn);
    drop(komnet_enroll::store::SqliteStore::open(dir.path()).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let tokens: i64 = conn
        .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tokens, 1, "kept");
    conn.query_row("SELECT COUNT(*) FROM token_certificates", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap();
}
