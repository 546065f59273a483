//! Signed policy bundles: signature, anti-rollback, last-known-good on disk, and that a
//! refused bundle changes nothing.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::fs;
use std::path::Path;

use komnet_policy::bundle::{self, BundleError, BundleStore};

fn set_version(dir: &Path, from: u64, to: u64) {
    let p = dir.join("operator.toml");
    let text = fs::read_to_string(&p).unwrap();
    fs::write(
        &p,
        text.replace(&format!("version = {from}"), &format!("version = {to}")),
    )
    .unwrap();
}

#[test]
fn signed_bundles_verify_and_tampering_does_not() {
    let (private, public) = bundle::generate_key().unwrap();
    let bytes = bundle::create(&komnet_testkit::example_dir("landkreis"), &private).unwrap();
    let verified = bundle::verify(&bytes, &public).unwrap();
    assert_eq!(verified.version, 7);
    let compiled = verified.compile().unwrap();
    assert_eq!(compiled.policy.tenants.len(), 4);

    // Another key: refused.
    let (_, other) = bundle::generate_key().unwrap();
    assert!(matches!(
        bundle::verify(&bytes, &other),
        Err(BundleError::BadSignature { .. })
    ));
    // One changed byte in the signed payload: refused.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let start = text.find("\"payload\": \"").unwrap() + 12;
    let mut tampered = bytes.clone();
    tampered[start + 40] = if tampered[start + 40] == b'A' {
        b'B'
    } else {
        b'A'
    };
    assert!(matches!(
        bundle::verify(&tampered, &public),
        Err(BundleError::BadSignature { .. }) | Err(BundleError::Format(_))
    ));
    // Garbage: a format error, not a panic.
    assert!(matches!(
        bundle::verify(b"{\"x\":1}", &public),
        Err(BundleError::Format(_))
    ));
    assert!(matches!(
        bundle::verify(&[0xff; 100], &public),
        Err(BundleError::Format(_))
    ));
}

#[test]
fn a_broken_policy_is_never_bundled() {
    let dir = komnet_testkit::copy_example("landkreis");
    let p = dir.join("tenants/kreis.toml");
    let text = fs::read_to_string(&p).unwrap();
    fs::write(&p, text.replace("to = [\"dms\"", "to = [\"dmz\"")).unwrap();
    let (private, _) = bundle::generate_key().unwrap();
    assert!(matches!(
        bundle::create(&dir, &private),
        Err(BundleError::Load(_))
    ));
}

#[test]
fn store_keeps_the_last_known_good_and_refuses_rollbacks() {
    let (private, public) = bundle::generate_key().unwrap();
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path();
    let store = BundleStore::new(state, public.clone());
    assert!(store.load_last_known_good().unwrap().is_none());

    let v7 = bundle::create(&komnet_testkit::example_dir("landkreis"), &private).unwrap();
    let (running, compiled) = store.install(&v7, None).unwrap();
    assert_eq!(compiled.version(), 7);
    let on_disk = fs::read(state.join("policy.bundle")).unwrap();

    // Version 8 with a change, then back to 7: refused, disk unchanged.
    let dir = komnet_testkit::copy_example("landkreis");
    set_version(&dir, 7, 8);
    let v8 = bundle::create(&dir, &private).unwrap();
    let (running8, _) = store.install(&v8, Some(&running)).unwrap();
    assert_eq!(running8.version, 8);
    let err = store.install(&v7, Some(&running8)).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::Rollback {
                offered: 7,
                running: 8
            }
        ),
        "{err}"
    );
    assert_eq!(fs::read(state.join("policy.bundle")).unwrap(), v8);

    // Same version, other content: refused.
    let p = dir.join("tenants/rz.toml");
    let text = fs::read_to_string(&p).unwrap();
    fs::write(&p, text.replace("# Kommunales", "# Das Kommunale")).unwrap();
    let v8b = bundle::create(&dir, &private).unwrap();
    assert!(matches!(
        store.install(&v8b, Some(&running8)),
        Err(BundleError::SameVersionDifferentContent(8))
    ));
    // The identical bundle again is fine (a restart re-applying what runs).
    assert!(store.install(&v8, Some(&running8)).is_ok());

    // A restart comes back with version 8, verified again.
    let (lkg, compiled) = BundleStore::new(state, public.clone())
        .load_last_known_good()
        .unwrap()
        .unwrap();
    assert_eq!((lkg.version, compiled.version()), (8, 8));

    // A corrupted file on disk is an error, not a silently accepted policy.
    let mut bad = fs::read(state.join("policy.bundle")).unwrap();
    let n = bad.len();
    bad[n / 2] ^= 0x01;
    fs::write(state.join("policy.bundle"), &bad).unwrap();
    assert!(BundleStore::new(state, public)
        .load_last_known_good()
        .is_err());
    assert_ne!(on_disk, bad);
}

/// A policy version `v` of the worked example, signed with `key`, with `options`.
fn versioned(v: u64, key: &[u8], options: &bundle::BundleOptions) -> Vec<u8> {
    let dir = komnet_testkit::copy_example("landkreis");
    set_version(&dir, 7, v);
    bundle::create_with(&dir, key, options).unwrap()
}

/// A new or re-flashed appliance has no bundle to compare with: the floor (from the enrollment
/// answer, and raised by every installed bundle) refuses old signed bundles anyway.
#[test]
fn the_floor_refuses_old_bundles_without_a_running_one() {
    let (private, public) = bundle::generate_key().unwrap();
    let none = bundle::BundleOptions::default();
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path();
    let store = BundleStore::new(state, public.clone());
    let v7 = versioned(7, &private, &none);
    let v8 = versioned(8, &private, &none);
    let v9 = versioned(9, &private, &none);

    // The enrollment answer said the district runs version 8.
    store.raise_floor(8).unwrap();
    store.raise_floor(3).unwrap();
    assert_eq!(store.floor(), 8, "the floor never goes down");
    assert!(matches!(
        store.install(&v7, None),
        Err(BundleError::BelowFloor {
            offered: 7,
            floor: 8
        })
    ));
    assert!(!state.join("policy.bundle").exists(), "nothing stored");
    store.install(&v9, None).unwrap();
    // After a restart, with no running bundle given, 8 is below what was installed.
    let store = BundleStore::new(state, public);
    assert!(matches!(
        store.install(&v8, None),
        Err(BundleError::BelowFloor {
            offered: 8,
            floor: 9
        })
    ));
}

#[test]
fn bundles_are_used_only_inside_their_validity_window() {
    let (private, public) = bundle::generate_key().unwrap();
    let now = 1_800_000_000;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path();
    let store = BundleStore::new(state, public);
    let window = |nb: i64, ex: i64| bundle::BundleOptions {
        not_before: Some(nb),
        expires: Some(ex),
        next_key: None,
    };
    let expired = versioned(8, &private, &window(now - 200, now - 100));
    let err = store.prepare_at(&expired, None, now).unwrap_err();
    assert!(matches!(err, BundleError::Expired { .. }), "{err}");
    let future = versioned(9, &private, &window(now + 3600, now + 7200));
    let err = store.prepare_at(&future, None, now).unwrap_err();
    assert!(
        err.to_string().contains("check this gateway's clock"),
        "{err}"
    );
    // A clock a few minutes behind is tolerated.
    let soon = versioned(10, &private, &window(now + 60, now + 7200));
    store.prepare_at(&soon, None, now).unwrap();
    assert!(bundle::create_with(
        &komnet_testkit::example_dir("landkreis"),
        &private,
        &window(now, now - 1)
    )
    .is_err());
}

/// Key rotation without re-flashing: K0 announces K1 in a signed bundle; K1's bundles are then
/// accepted, and once one is installed K0's are refused (a leaked old key cannot roll back).
#[test]
fn the_signing_key_rotates_by_announcement() {
    let (k0, k0_pub) = bundle::generate_key().unwrap();
    let (k1, k1_pub) = bundle::generate_key().unwrap();
    let none = bundle::BundleOptions::default();
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path();
    let store = BundleStore::new(state, k0_pub.clone());

    // Before any announcement, K1 is nobody.
    let early = versioned(8, &k1, &none);
    assert!(matches!(
        store.install(&early, None),
        Err(BundleError::BadSignature { .. })
    ));
    let announce = versioned(
        8,
        &k0,
        &bundle::BundleOptions {
            next_key: Some(k1_pub.clone()),
            ..Default::default()
        },
    );
    let (running, _) = store.install(&announce, None).unwrap();
    assert_eq!(running.next_key.as_deref(), Some(k1_pub.as_slice()));
    assert_eq!(store.accepted_keys(), vec![k0_pub.clone(), k1_pub.clone()]);

    let by_k1 = versioned(9, &k1, &none);
    let (running, _) = store.install(&by_k1, Some(&running)).unwrap();
    assert_eq!(store.accepted_keys(), vec![k1_pub.clone()]);
    let by_k0 = versioned(10, &k0, &none);
    assert!(matches!(
        store.install(&by_k0, Some(&running)),
        Err(BundleError::BadSignature { .. })
    ));

    // A restart with the same configured key K0 comes back on K1's bundle.
    let restarted = BundleStore::new(state, k0_pub);
    let (lkg, _) = restarted.load_last_known_good().unwrap().unwrap();
    assert_eq!((lkg.version, lkg.signed_by.clone()), (9, k1_pub));
}
