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

    // An older schema (versions 2 to 5 not yet applied), with a policy bundle published, is
    // brought up to date by serve; the bundle in force starts the policy history.
    let c = pg.client("enroll").await;
    c.batch_execute(
        "DROP TABLE token_certificates; ALTER TABLE certificates DROP COLUMN admitted_until; \
         DROP TABLE policy_history; DROP TABLE hub_reports; DROP TABLE policy_held; \
         DELETE FROM schema_migrations WHERE version >= 2; \
         INSERT INTO policy_bundle (id, version, bytes, key_id, published_at) \
         VALUES (1, '9', '\\x0909', 'k9', 900)",
    )
    .await
    .unwrap();
    let svc = Service::open(dir.path(), clock.clone()).unwrap();
    assert_eq!(versions(&pg, "enroll").await, expected);
    assert_eq!(svc.store.registry_version().unwrap(), 0);
    let published = |version: u64, bytes: Vec<u8>| komnet_enroll::store::PublishedPolicy {
        version,
        bytes,
        key_id: format!("k{version}"),
        published_at: version as i64 * 100,
    };
    assert_eq!(
        svc.store.policy_before(10).unwrap(),
        Some(published(9, vec![9, 9]))
    );
    assert_eq!(svc.store.policy_before(9).unwrap(), None);
    // Every publication is kept, and "the one before" orders versions as numbers (10 after 9,
    // not between 1 and 2 as text would), up to u64::MAX.
    for version in [10, 11, u64::MAX] {
        let mut txn = svc.store.begin().unwrap();
        txn.publish_policy(&published(version, vec![version as u8]))
            .unwrap();
        txn.commit().unwrap();
    }
    let before = |v: u64| svc.store.policy_before(v).unwrap().map(|p| p.version);
    assert_eq!(
        (before(10), before(11), before(12), before(u64::MAX)),
        (Some(9), Some(10), Some(11), Some(11))
    );
    assert_eq!(
        svc.store.published_policy().unwrap(),
        Some(published(u64::MAX, vec![u64::MAX as u8]))
    );
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
    // libpq's sslmode=verify-full: told what komnet takes instead.
    let e = komnet_enroll::config::DatabaseUrl::parse("postgres://x@db/z?sslmode=verify-full")
        .unwrap_err();
    assert!(e.contains("database_ca"), "{e}");
    assert!(!e.contains("  "), "the message is one clean line: {e:?}");
}

/// A database of the first release (its tables, no version number) is migrated to the current
/// schema: migration 1 finds its tables, the later ones add the rest.
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
    conn.execute(
        "INSERT INTO policy_bundle (id, version, bytes, key_id, published_at) \
         VALUES (1, '12', x'0c', 'k12', 1200)",
        [],
    )
    .unwrap();
    drop(conn);
    let store = komnet_enroll::store::SqliteStore::open(dir.path()).unwrap();
    // The bundle in force starts the policy history (migration 4).
    use komnet_enroll::store::Store as _;
    let kept = store.policy_before(13).unwrap().unwrap();
    assert_eq!(
        (kept.version, kept.bytes, kept.published_at),
        (12, vec![12], 1200)
    );
    assert_eq!(store.policy_before(12).unwrap(), None);
    drop(store);
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

/// A CA named `ca_name` and a certificate it signed for the server at `localhost`.
fn database_certificates(ca_name: &str) -> (String, common::postgres::ServerTls) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    (
        ca_cert.pem(),
        common::postgres::ServerTls {
            cert_pem: server.pem(),
            key_pem: server_key.serialize_pem(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_on_another_machine_is_reached_over_tls_with_its_certificate_verified() {
    let (ca_pem, server_tls) = database_certificates("komnet test database CA");
    let pg = common::postgres::Cluster::start_tls(&server_tls);
    pg.client("postgres")
        .await
        .batch_execute("CREATE DATABASE komnet")
        .await
        .unwrap();
    let url =
        komnet_enroll::config::DatabaseUrl::parse(&pg.tcp_url("localhost", "komnet")).unwrap();
    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("database-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let (other_ca_pem, _) = database_certificates("somebody else's CA");
    let other_ca_file = files.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca_pem).unwrap();
    let with_ca = |ca: &std::path::Path| Config {
        database_ca: Some(ca.to_owned()),
        ..pg_config(url.clone())
    };

    // Without database_ca the connection is plain, and this server takes TLS only.
    let dir = tempfile::tempdir().unwrap();
    let e = service::init(dir.path(), &pg_config(url.clone()), 0).unwrap_err();
    assert!(e.to_string().contains("PostgreSQL database komnet"), "{e}");
    // A CA that did not sign the server's certificate: refused, and nothing written.
    let e = service::init(dir.path(), &with_ca(&other_ca_file), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    // The server's name must be in its certificate: 127.0.0.1 is not.
    let by_address =
        komnet_enroll::config::DatabaseUrl::parse(&pg.tcp_url("127.0.0.1", "komnet")).unwrap();
    let config = Config {
        database_ca: Some(ca_file.clone()),
        ..pg_config(by_address)
    };
    let e = service::init(dir.path(), &config, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    // TLS asked for in the connection string without a CA to check the server with, or a CA
    // with TLS turned off: configuration errors.
    let require = komnet_enroll::config::DatabaseUrl::parse(&format!(
        "{}?sslmode=require",
        pg.tcp_url("localhost", "komnet")
    ))
    .unwrap();
    let e = service::init(dir.path(), &pg_config(require), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("set database_ca"), "{e}");
    let disable = komnet_enroll::config::DatabaseUrl::parse(&format!(
        "{}?sslmode=disable",
        pg.tcp_url("localhost", "komnet")
    ))
    .unwrap();
    let config = Config {
        database_ca: Some(ca_file.clone()),
        ..pg_config(disable)
    };
    let e = service::init(dir.path(), &config, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sslmode=disable"), "{e}");

    // The right CA: init copies it into the data directory, and the service runs over TLS.
    service::init(dir.path(), &with_ca(&ca_file), 0).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join(service::DATABASE_CA)).unwrap(),
        ca_pem
    );
    let written = Config::load(dir.path()).unwrap();
    assert_eq!(
        written.database_ca.as_deref(),
        Some(std::path::Path::new(service::DATABASE_CA))
    );
    let clock = Arc::new(ManualClock::default());
    let service = Service::open(dir.path(), clock).unwrap();
    service.store.audit_log(10).unwrap();
    // The pool's connection and the registry listener's (which connects on its own), both
    // encrypted; none in the clear.
    let watcher = pg.client("postgres").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let row = watcher
            .query_one(
                "SELECT count(*) FILTER (WHERE ssl), count(*) FILTER (WHERE NOT ssl) \
                 FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                 WHERE application_name = 'komnet-enroll'",
                &[],
            )
            .await
            .unwrap();
        let (encrypted, plain): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(plain, 0, "connections in the clear");
        if encrypted >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{encrypted} encrypted connections after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
