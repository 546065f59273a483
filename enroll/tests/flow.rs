//! The whole flow over real HTTPS on loopback: init → token → enroll → renew → revoke →
//! registry and CRL show it.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use komnet_enroll::api::admin::RevokeRequest;
use komnet_enroll::api::{ErrorCode, RegistryChange, RevocationReason};
use komnet_enroll::client::{self, WgKeys};
use komnet_enroll::identity::Role;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

fn leaf_der(chain_pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_token_enroll_renew_revoke_registry() {
    whole_flow(&common::start().await).await;
}

/// The same flow with the state in a real PostgreSQL (a throwaway cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_token_enroll_renew_revoke_registry_on_postgresql() {
    let pg = common::postgres::Cluster::start();
    let database = pg.create_database("flow").await;
    let h = common::start_with(komnet_enroll::config::Config {
        database: Some(database),
        ..common::test_config()
    })
    .await;
    whole_flow(&h).await;
}

async fn whole_flow(h: &common::Harness) {
    // A hub enrolls first; it is the one that may follow the registry.
    let hub_keys = WgKeys::generate();
    let hub = client::enroll(&h.bootstrap("dc", "hub1", Role::Hub), &hub_keys)
        .await
        .unwrap();
    assert_eq!(hub.identity.role, Role::Hub);
    let snapshot = client::registry_snapshot(&hub).await.unwrap();
    assert_eq!(snapshot.peers, vec![hub.identity.clone()]);
    let mut follower = client::follow_registry(&hub, snapshot.version)
        .await
        .unwrap();

    // What /v1/info says agrees with the bootstrap file.
    let info = client::service_info(&hub.root_ca_pem, &hub.enroll_urls)
        .await
        .unwrap();
    assert_eq!(info.wg_proof_public_key, hub.wg_proof_public_key);
    assert_eq!(info.root_fingerprint, h.service.ca.root_fingerprint);

    // A town hall appliance enrolls from its bootstrap file.
    let keys = WgKeys::generate();
    let spoke = client::enroll(&h.bootstrap("nohfelden", "rathaus", Role::Spoke), &keys)
        .await
        .unwrap();
    let id = &spoke.identity;
    assert_eq!(
        (id.tenant.as_str(), id.site.as_str(), id.role),
        ("nohfelden", "rathaus", Role::Spoke)
    );
    assert_eq!(id.wg_public_key, keys.public());
    assert_eq!(id.tunnel_addrs.len(), 2, "one IPv4 and one IPv6 address");
    assert_eq!(spoke.hubs.len(), 1);
    assert_eq!(spoke.hubs[0].wg_public_key, hub_keys.public());
    assert_eq!(spoke.hub_endpoints, vec!["203.0.113.1:51820".to_string()]);
    // The certificate itself carries the identity.
    let from_cert =
        komnet_enroll::identity::from_certificate_der(&leaf_der(&spoke.certificate_chain_pem))
            .unwrap();
    assert_eq!(&from_cert, id);
    let lifetime = h.lifetime();
    assert!((id.not_after - h.service.now() - lifetime).abs() <= 1);

    // The hub hears of it.
    let ev = tokio::time::timeout(Duration::from_secs(2), follower.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.change, RegistryChange::Upsert(id.clone()));

    // Too early to renew.
    let err = client::renew(&spoke, &keys).await.unwrap_err();
    assert_eq!(
        err.api_error().unwrap().code,
        ErrorCode::RenewTooEarly,
        "{err}"
    );

    // From 2/3 of the lifetime on, renewal works and keeps the tunnel address.
    h.clock.advance(lifetime * 2 / 3 + 1);
    let renewed = client::renew(&spoke, &keys).await.unwrap();
    assert_ne!(renewed.identity.serial, id.serial);
    assert_eq!(renewed.identity.tunnel_addrs, id.tunnel_addrs);
    let ev = follower.next().await.unwrap().unwrap();
    assert_eq!(ev.change, RegistryChange::Upsert(renewed.identity.clone()));
    // The old certificate cannot renew again.
    let err = client::renew(&spoke, &keys).await.unwrap_err();
    assert_eq!(
        err.api_error().unwrap().code,
        ErrorCode::CertificateSuperseded,
        "{err}"
    );

    // Revocation reaches the watching hub within 2 s.
    let started = std::time::Instant::now();
    h.service
        .revoke(
            &RevokeRequest {
                serial: Some(renewed.identity.serial.clone()),
                tenant: None,
                site: None,
                reason: RevocationReason::KeyCompromise,
            },
            "test",
        )
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(2), follower.next())
        .await
        .expect("revocation did not reach the hub within 2 s")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    match ev.change {
        RegistryChange::Remove { serial, reason, .. } => {
            assert_eq!(serial, renewed.identity.serial);
            assert_eq!(reason, RevocationReason::KeyCompromise);
        }
        other => panic!("expected a removal, got {other:?}"),
    }
    let snapshot = client::registry_snapshot(&hub).await.unwrap();
    assert!(snapshot.peers.iter().all(|p| p.site.as_str() != "rathaus"));

    // A revoked certificate cannot renew.
    h.clock.advance(lifetime / 4);
    let err = client::renew(&renewed, &keys).await.unwrap_err();
    assert_eq!(
        err.api_error().unwrap().code,
        ErrorCode::CertificateRevoked,
        "{err}"
    );

    // The CRL, signed by the issuing CA, lists the revoked and the superseded serial.
    let crl_der = client::fetch_crl(&hub.root_ca_pem, &hub.enroll_urls)
        .await
        .unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&crl_der).unwrap();
    let issuing = CertificateDer::from_pem_slice(h.service.ca.issuing_pem.as_bytes()).unwrap();
    let (_, issuing) = x509_parser::parse_x509_certificate(&issuing).unwrap();
    crl.verify_signature(issuing.public_key()).unwrap();
    let listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    assert!(listed.contains(&renewed.identity.serial), "{listed:?}");
    assert!(
        listed.contains(&id.serial),
        "superseded serial listed too: {listed:?}"
    );

    // Revoking the hub itself ends its registry stream: it must come back with a valid
    // certificate, and cannot.
    h.service
        .revoke(
            &RevokeRequest {
                serial: Some(hub.identity.serial.clone()),
                tenant: None,
                site: None,
                reason: RevocationReason::KeyCompromise,
            },
            "test",
        )
        .unwrap();
    let last = tokio::time::timeout(Duration::from_secs(2), follower.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(last.change, RegistryChange::Remove { .. }));
    let end = tokio::time::timeout(Duration::from_secs(2), follower.next())
        .await
        .expect("the revoked hub's stream stays open");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    let err = client::follow_registry(&hub, 0).await.unwrap_err();
    assert_eq!(
        err.api_error().unwrap().code,
        ErrorCode::CertificateRevoked,
        "{err}"
    );

    // Every step is in the audit log.
    let actions: Vec<String> = h
        .service
        .store
        .audit_log(100)
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    for a in ["token.create", "enroll", "renew", "revoke"] {
        assert!(actions.iter().any(|x| x == a), "{a} missing in {actions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_refused_before_any_connection() {
    let h = common::start().await;
    let mut b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    b.root_fingerprint = "00".repeat(32);
    let err = client::enroll(&b, &WgKeys::generate()).await.unwrap_err();
    assert!(
        matches!(err, client::ClientError::PinMismatch { .. }),
        "{err}"
    );
}

/// Replacing an appliance (a new key, by re-enrolment or by a renewal with a new key) takes the
/// old key out of every hub: the box that was replaced must not keep its access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_key_is_removed_from_the_registry() {
    let h = common::start().await;
    let hub = client::enroll(&h.bootstrap("dc", "hub1", Role::Hub), &WgKeys::generate())
        .await
        .unwrap();
    let snapshot = client::registry_snapshot(&hub).await.unwrap();
    let mut follower = client::follow_registry(&hub, snapshot.version)
        .await
        .unwrap();
    macro_rules! next {
        () => {
            tokio::time::timeout(Duration::from_secs(2), follower.next())
                .await
                .expect("no registry event within 2 s")
                .unwrap()
                .unwrap()
                .change
        };
    }

    let k1 = WgKeys::generate();
    let first = client::enroll(&h.bootstrap("nohfelden", "rathaus", Role::Spoke), &k1)
        .await
        .unwrap();
    assert_eq!(next!(), RegistryChange::Upsert(first.identity.clone()));

    // The town hall gets a new box: a fresh token, a new key K2.
    let k2 = WgKeys::generate();
    let second = client::enroll(&h.bootstrap("nohfelden", "rathaus", Role::Spoke), &k2)
        .await
        .unwrap();
    match next!() {
        RegistryChange::Remove {
            serial,
            wg_public_key,
            reason,
            ..
        } => {
            assert_eq!(serial, first.identity.serial);
            assert_eq!(wg_public_key, k1.public());
            assert_eq!(reason, RevocationReason::Superseded);
        }
        other => panic!("expected K1's removal, got {other:?}"),
    }
    assert_eq!(next!(), RegistryChange::Upsert(second.identity.clone()));
    let snapshot = client::registry_snapshot(&hub).await.unwrap();
    assert!(
        snapshot
            .peers
            .iter()
            .all(|p| p.wg_public_key != k1.public()),
        "K1 is still in the snapshot: {:?}",
        snapshot.peers
    );

    // A renewal with a new key K3 removes K2; one with the same key removes nothing.
    h.clock.advance(h.lifetime() * 2 / 3 + 1);
    let k3 = WgKeys::generate();
    let third = client::renew(&second, &k3).await.unwrap();
    match next!() {
        RegistryChange::Remove { wg_public_key, .. } => assert_eq!(wg_public_key, k2.public()),
        other => panic!("expected K2's removal, got {other:?}"),
    }
    assert_eq!(next!(), RegistryChange::Upsert(third.identity.clone()));
    h.clock.advance(h.lifetime() * 2 / 3 + 1);
    let fourth = client::renew(&third, &k3).await.unwrap();
    assert_eq!(next!(), RegistryChange::Upsert(fourth.identity.clone()));
}

/// The service's own TLS certificate (30 days) is renewed while the service runs: after 21
/// days of the service's clock a new one is in use, valid for 30 days from then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_tls_certificate_is_renewed_while_it_runs() {
    use komnet_enroll::service::Clock as _;
    let h = common::start().await;
    let first = h.server.server_cert.not_after();
    assert!((first - h.clock.now() - 30 * 86_400).abs() <= 1);
    h.clock.advance(21 * 86_400);
    let started = std::time::Instant::now();
    while h.server.server_cert.not_after() == first {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no renewal within 5 s of the clock passing two thirds of the lifetime"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = h.server.server_cert.not_after();
    assert!((renewed - h.clock.now() - 30 * 86_400).abs() <= 2);
    // Nothing renews again before the next two thirds.
    h.clock.advance(86_400);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.server.server_cert.not_after(), renewed);
}

/// An appliance whose clock is a day behind the service hears that in words, with both times,
/// instead of a TLS error about certificate validity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_appliance_clock_is_reported_in_words() {
    let clock = std::sync::Arc::new(komnet_enroll::service::ManualClock::default());
    // The service's clock runs a day (and ten minutes) ahead of this machine's, which is the
    // appliance's.
    clock.advance(86_400 + 600);
    let h = common::start_in(tempfile::tempdir().unwrap(), common::test_config(), clock).await;
    let err = client::enroll(
        &h.bootstrap("nohfelden", "rathaus", Role::Spoke),
        &WgKeys::generate(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("this appliance's clock is 1 day behind the enrollment service")
            && err.contains("check NTP")
            && err.contains("UTC"),
        "{err}"
    );
}
