//! Enrollment that survives crashes and lost answers (issue 15 part 4): a retry with the same
//! token, key and CSR key gets the same certificate; anything else with a spent token stays
//! refused; the store refuses a database it did not open, a read-only one and a newer one.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;

use komnet_enroll::client::WgKeys;
use komnet_enroll::csr::build_csr;
use komnet_enroll::identity::Role;
use komnet_enroll::service::{ManualClock, Service};
use komnet_enroll::store::{SqliteStore, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_answered_again_with_the_same_certificate() {
    let h = common::start().await;
    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    let keys = WgKeys::generate();
    let (tls_key, csr) = build_csr(None, None, None).unwrap();

    let (status, first) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &csr))
        .await;
    assert_eq!(status, 200, "{first}");
    // The answer was lost; the appliance asks again with what it kept: same token, same
    // WireGuard key, same CSR.
    let (status, again) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &csr))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["identity"], first["identity"]);
    assert_eq!(
        again["certificate_chain_pem"], first["certificate_chain_pem"],
        "the same certificate, not a second one"
    );
    // A CSR signed anew with the same TLS key is the same request.
    let csr2 = komnet_enroll::csr::build_csr_for_key(&tls_key, None, None, None).unwrap();
    let (status, third) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &csr2))
        .await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(third["identity"], first["identity"]);
    assert_eq!(h.count("SELECT COUNT(*) FROM certificates"), 1);

    // Another WireGuard key, or another CSR key, with the spent token: refused.
    let (status, v) = h
        .post_enroll(common::enroll_body(&h, &b.token, &WgKeys::generate(), &csr))
        .await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (409, "token_used"),
        "{v}"
    );
    let (_, other_csr) = build_csr(None, None, None).unwrap();
    let (status, v) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &other_csr))
        .await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (409, "token_used"),
        "{v}"
    );
    assert_eq!(h.count("SELECT COUNT(*) FROM certificates"), 1);
    let retries = h.count("SELECT COUNT(*) FROM audit WHERE action = 'enroll.retry'");
    assert_eq!(retries, 2);

    // Once the site has a newer certificate, the old token answers nothing any more.
    let b2 = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    let (_, csr_new) = build_csr(None, None, None).unwrap();
    let (status, v) = h
        .post_enroll(common::enroll_body(
            &h,
            &b2.token,
            &WgKeys::generate(),
            &csr_new,
        ))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &csr))
        .await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (409, "token_used"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_deleted_or_replaced_under_the_service_stops_it() {
    let h = common::start().await;
    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    let db = h.dir.path().join("enroll.db");
    // Replaced: another file at the same name (an old copy put back by hand).
    std::fs::copy(&db, h.dir.path().join("copy.db")).unwrap();
    std::fs::rename(h.dir.path().join("copy.db"), &db).unwrap();
    let e = h.service.store.check_file().unwrap_err();
    assert!(matches!(e, StoreError::Replaced { .. }), "{e}");
    assert!(e.to_string().contains("replaced by another file"), "{e}");
    let keys = WgKeys::generate();
    let (_, csr) = build_csr(None, None, None).unwrap();
    let (status, v) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &csr))
        .await;
    assert_eq!(status, 500, "nothing is written to the replaced file: {v}");
    assert_eq!(h.count("SELECT COUNT(*) FROM certificates"), 0);

    // Deleted: the next start refuses to make a new, empty database.
    for f in ["enroll.db", "enroll.db-wal", "enroll.db-shm"] {
        let _ = std::fs::remove_file(h.dir.path().join(f));
    }
    let e = h.service.store.check_file().unwrap_err();
    assert!(
        e.to_string().contains("was deleted while the service ran"),
        "{e}"
    );
    let e = Service::open_with_config(
        h.dir.path(),
        common::test_config(),
        Arc::new(ManualClock::default()),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("is missing") && text.contains("restore the last backup"),
        "{text}"
    );
    assert!(!db.exists(), "no new database was created");
}

#[test]
fn read_only_and_newer_databases_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::create(dir.path()).unwrap());
    let db = dir.path().join("enroll.db");

    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    let e = SqliteStore::open(dir.path()).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("read-only") && text.contains(&*db.to_string_lossy()),
        "{text}"
    );
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();

    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let e = SqliteStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, StoreError::NewerSchema { found: 99, .. }),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_serving_restores() {
    let h = common::start().await;
    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    let keys = WgKeys::generate();
    let (_, csr) = build_csr(None, None, None).unwrap();
    let (status, first) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &csr))
        .await;
    assert_eq!(status, 200, "{first}");
    let out = h.dir.path().join("backup").join("enroll-backup.db");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    h.service.store.backup_to(&out).unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!out.with_extension("partial").exists());

    // Restore into a fresh data directory with the same CA: the certificate is known there.
    let restored = tempfile::tempdir().unwrap();
    for entry in ["ca", "enroll.toml", "enroll-dh.key"] {
        let from = h.dir.path().join(entry);
        let to = restored.path().join(entry);
        if from.is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&from).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    std::fs::copy(&out, restored.path().join("enroll.db")).unwrap();
    let service = Service::open_with_config(
        restored.path(),
        common::test_config(),
        Arc::new(ManualClock::default()),
    )
    .unwrap();
    let serial = first["identity"]["serial"].as_str().unwrap();
    assert!(service.store.certificate(serial).unwrap().is_some());
}
