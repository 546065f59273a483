//! The service as distribution point, over real HTTPS on loopback: publishing signed policy
//! bundles (and what is refused), serving them to appliances, the hub list with endpoints,
//! home-office addresses from the policy's pools, and token checks against the policy.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;

use komnet_enroll::admin::{AdminClient, AdminCommand, PolicyPublishArgs, SocketArg};
use komnet_enroll::api::admin::{CreateTokenRequest, HomeOfficeRequest, RevokeRequest};
use komnet_enroll::api::{ApiError, ErrorCode, RevocationReason};
use komnet_enroll::client::{self, PolicyFetch, WgKeys};
use komnet_enroll::identity::{Role, SiteId, TenantId};
use komnet_enroll::server;

use common::{enroll, PolicyFixture};

fn code_of(e: &client::ClientError) -> ErrorCode {
    e.api_error()
        .unwrap_or_else(|| panic!("not a typed error: {e}"))
        .code
}

fn revoke(h: &common::Harness, tenant: &str, site: &str, reason: RevocationReason) {
    h.service
        .revoke(
            &RevokeRequest {
                serial: None,
                tenant: Some(TenantId::parse(tenant).unwrap()),
                site: Some(SiteId::parse(site).unwrap()),
                reason,
            },
            "test",
        )
        .unwrap();
}

fn homeoffice(
    h: &common::Harness,
    tenant: &str,
    user: &str,
    ttl_secs: Option<u64>,
) -> Result<komnet_enroll::api::EnrollResponse, ApiError> {
    h.service
        .issue_homeoffice(
            &HomeOfficeRequest {
                tenant: TenantId::parse(tenant).unwrap(),
                user: SiteId::parse(user).unwrap(),
                wg_public_key: WgKeys::generate().public(),
                ttl_secs,
                mfa_at: None,
            },
            "test",
        )
        .map(|r| r.enrollment)
}

fn addrs(resp: &komnet_enroll::api::EnrollResponse) -> Vec<String> {
    resp.identity
        .tunnel_addrs
        .iter()
        .map(|a| a.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_verified_published_and_served() {
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    let (hub, _) = enroll(&h, "rz", "hub1", Role::Hub).await;
    let (spoke, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;

    // Nothing published yet: 404 no_policy, which the client reports as NoneYet.
    assert_eq!(
        client::fetch_policy(&spoke, None).await.unwrap(),
        PolicyFetch::NoneYet
    );
    let (status, body) = common::raw_request(
        &h,
        "GET",
        "/v1/policy",
        vec![],
        Some((&spoke.certificate_chain_pem, &spoke.private_key_pem)),
    )
    .await;
    assert_eq!((status, common::code(&body).as_str()), (404, "no_policy"));
    // Without a client certificate the route says what it needs.
    let (status, body) = common::raw_request(&h, "GET", "/v1/policy", vec![], None).await;
    assert_eq!(
        (status, common::code(&body).as_str()),
        (401, "certificate_required")
    );

    // Signed with another key: refused, nothing published.
    let (other_key, _) = komnet_policy::bundle::generate_key().unwrap();
    let forged = fixture.bundle_signed(7, |t| t.to_string(), &other_key);
    let e = h.service.publish_policy(&forged, "test").unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicySignatureInvalid, "{e}");
    // Not a bundle at all.
    let e = h.service.publish_policy(b"{}", "test").unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicyInvalid, "{e}");
    assert_eq!(
        client::fetch_policy(&spoke, None).await.unwrap(),
        PolicyFetch::NoneYet
    );

    // The good one, through the admin command over the socket.
    let v7 = fixture.bundle(7);
    let file = h.dir.path().join("v7.bundle");
    std::fs::write(&file, &v7).unwrap();
    let publish = |path: std::path::PathBuf| {
        AdminCommand::PolicyPublish(PolicyPublishArgs {
            bundle_file: path,
            socket: SocketArg {
                socket: h.dir.path().join(server::ADMIN_SOCKET),
            },
        })
    };
    let mut out = Vec::new();
    komnet_enroll::admin::run_to(publish(file.clone()), &mut out)
        .await
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("published policy") && out.contains("version 7"),
        "{out}"
    );
    // Publishing it again changes nothing.
    let mut out = Vec::new();
    komnet_enroll::admin::run_to(publish(file), &mut out)
        .await
        .unwrap();
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("already published"));

    // Served to a spoke and to a hub, byte for byte, and it verifies with the operator's key.
    for appliance in [&spoke, &hub] {
        match client::fetch_policy(appliance, None).await.unwrap() {
            PolicyFetch::Bundle { version, bytes } => {
                assert_eq!(version, 7);
                assert_eq!(bytes, v7);
                let verified = komnet_policy::bundle::verify(&bytes, &fixture.public_key).unwrap();
                assert_eq!(verified.version, 7);
            }
            other => panic!("expected the bundle, got {other:?}"),
        }
    }
    assert_eq!(
        client::fetch_policy(&spoke, Some(7)).await.unwrap(),
        PolicyFetch::NotModified
    );
    let (status, _) = common::raw_request(
        &h,
        "GET",
        "/v1/policy?have=7",
        vec![],
        Some((&spoke.certificate_chain_pem, &spoke.private_key_pem)),
    )
    .await;
    assert_eq!(status, 304);
    let (status, body) = common::raw_request(
        &h,
        "GET",
        "/v1/policy?have=seven",
        vec![],
        Some((&spoke.certificate_chain_pem, &spoke.private_key_pem)),
    )
    .await;
    assert_eq!((status, common::code(&body).as_str()), (400, "bad_request"));
    // Enrollments now carry the published version.
    let (later, _) = enroll(&h, "musterstadt", "bauhof", Role::Spoke).await;
    assert_eq!(later.policy_version, 7);

    // Version 8 replaces it; 7 again is a rollback, 8 with other content is refused.
    let v8 = fixture.bundle(8);
    let r = h.service.publish_policy(&v8, "test").unwrap();
    assert_eq!((r.version, r.unchanged), (8, false));
    let e = h.service.publish_policy(&v7, "test").unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicyRollback, "{e}");
    let v8_other = fixture.bundle_edited(8, |t| {
        t.replace("\"Stadt Musterstadt\"", "\"Stadt Musterstadt (neu)\"")
    });
    assert_ne!(v8_other, v8);
    let e = h.service.publish_policy(&v8_other, "test").unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicyVersionReused, "{e}");
    match client::fetch_policy(&spoke, Some(7)).await.unwrap() {
        PolicyFetch::Bundle { version, bytes } => assert_eq!((version, bytes), (8, v8.clone())),
        other => panic!("expected version 8, got {other:?}"),
    }
    assert_eq!(h.service.store.policy_version().unwrap(), 8);

    // Each publish is audited with version and key id; refusals are not publishes.
    let key_id = komnet_policy::bundle::key_id(&fixture.public_key);
    let publishes: Vec<_> = h
        .service
        .store
        .audit_log(100)
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "policy.publish")
        .collect();
    assert_eq!(publishes.len(), 2, "{publishes:?}");
    assert_eq!(publishes[0].details["version"], 7);
    assert_eq!(publishes[1].details["version"], 8);
    assert!(publishes
        .iter()
        .all(|a| a.details["key_id"] == key_id.as_str()));
    assert!(publishes[0].actor.starts_with("uid:"), "{:?}", publishes[0]);

    // A revoked appliance gets nothing.
    revoke(
        &h,
        "musterstadt",
        "rathaus",
        RevocationReason::KeyCompromise,
    );
    let e = client::fetch_policy(&spoke, None).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::CertificateRevoked, "{e}");
}

/// Every published bundle is kept: the admin socket gives the console the one in force and the
/// one published before it (the policy page's diff), on the SQLite store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_published_before_comes_with_the_one_in_force() {
    use base64::Engine as _;
    let b64 = |text: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap()
    };
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    let admin = AdminClient::new(h.server.admin_socket.clone().unwrap());
    let v1 = fixture.bundle(1);
    h.service.publish_policy(&v1, "test").unwrap();
    let first = admin.policy("anna").await.unwrap();
    assert_eq!(first.info.version, 1);
    assert!(first.previous.is_none(), "{:?}", first.previous);

    h.clock.advance(3600);
    let v2 = fixture.bundle_edited(2, |t| {
        t.replace("\"Stadt Musterstadt\"", "\"Stadt Musterstadt (neu)\"")
    });
    h.service.publish_policy(&v2, "test").unwrap();
    // Publishing it again changes nothing: its predecessor is still version 1.
    assert!(h.service.publish_policy(&v2, "test").unwrap().unchanged);
    let second = admin.policy("anna").await.unwrap();
    assert_eq!(second.info.version, 2);
    assert_eq!(b64(&second.bundle), v2);
    let previous = second.previous.unwrap();
    assert_eq!(previous.version, 1);
    assert_eq!(b64(&previous.bundle), v1);
    assert_eq!(
        previous.key_id,
        komnet_policy::bundle::key_id(&fixture.public_key)
    );
    assert_eq!(previous.published_at, first.info.published_at);
    assert_eq!(second.info.published_at, first.info.published_at + 3600);

    // Versions may skip numbers: the one before is the newest with a smaller version.
    let v5 = fixture.bundle(5);
    h.service.publish_policy(&v5, "test").unwrap();
    let fifth = admin.policy("anna").await.unwrap();
    assert_eq!(fifth.previous.map(|p| p.version), Some(2));
    let store = &h.service.store;
    let before = |v: u64| store.policy_before(v).unwrap().map(|p| p.version);
    assert_eq!(
        (before(1), before(2), before(3), before(u64::MAX)),
        (None, Some(1), Some(2), Some(5))
    );
    assert_eq!(store.policy_before(2).unwrap().unwrap().bytes, v1);
    assert_eq!(h.count("SELECT count(*) FROM policy_history"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_without_a_configured_key_says_what_to_set() {
    let fixture = PolicyFixture::new();
    let h = common::start().await;
    let e = h
        .service
        .publish_policy(&fixture.bundle(7), "test")
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicyKeyMissing);
    assert!(e.message.contains("policy_public_key"), "{e}");
    assert!(h.service.store.published_policy().unwrap().is_none());
}

/// A gateway with no key of its own pins the one its bootstrap file carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_files_carry_the_policy_key_when_the_service_has_one() {
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    assert_eq!(
        b.policy_public_key.as_deref(),
        Some(fixture.public_key_text().trim())
    );
    assert_eq!(b.policy_key().unwrap(), Some(fixture.public_key.clone()));
    let h = common::start().await;
    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    assert_eq!(b.policy_public_key, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_route_lists_hubs_with_their_endpoints() {
    let h = common::start().await;
    // This spoke enrolls before any hub exists: it learns of them later from /v1/hubs.
    let (spoke, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    assert!(spoke.hubs.is_empty());
    assert_eq!(client::fetch_hubs(&spoke).await.unwrap(), vec![]);

    // hub2 first, so the answer's order comes from the sort, not from enrollment order.
    let (_, hub2_keys) = enroll(&h, "rz", "hub2", Role::Hub).await;
    let (hub1, hub1_keys) = enroll(&h, "rz", "hub1", Role::Hub).await;
    let hubs = client::fetch_hubs(&spoke).await.unwrap();
    let seen: Vec<(&str, _, Option<&str>)> = hubs
        .iter()
        .map(|p| (p.site.as_str(), p.wg_public_key, p.endpoint.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("hub1", hub1_keys.public(), Some("203.0.113.1:51820")),
            ("hub2", hub2_keys.public(), None),
        ]
    );
    assert_eq!(hubs[0].tunnel_addrs, hub1.identity.tunnel_addrs);
    // A hub may ask too.
    assert_eq!(client::fetch_hubs(&hub1).await.unwrap(), hubs);
    // Enrollment answers carry the same list.
    let (late, _) = enroll(&h, "musterstadt", "bauhof", Role::Spoke).await;
    assert_eq!(late.hubs, hubs);
    assert_eq!(late.hub_endpoints, vec!["203.0.113.1:51820".to_string()]);

    // A superseded certificate is refused: the re-enrolled site has a new one.
    let (_, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    let e = client::fetch_hubs(&spoke).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::CertificateSuperseded, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homeoffice_addresses_come_from_the_policy_pool() {
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    let (_, hub_keys) = enroll(&h, "rz", "hub1", Role::Hub).await;

    let e = homeoffice(&h, "musterstadt", "anna", None).unwrap_err();
    assert_eq!(e.code, ErrorCode::NoPolicy, "{e}");
    h.service
        .publish_policy(&fixture.bundle(7), "test")
        .unwrap();

    let e = homeoffice(&h, "nohfelden", "anna", None).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotInPolicy, "{e}");
    assert!(
        e.message.contains("nohfelden") && e.message.contains("version 7"),
        "{e}"
    );
    // The operator's own tenant has no home-office pool.
    let e = homeoffice(&h, "rz", "anna", None).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotInPolicy, "{e}");
    assert!(e.message.contains("no home-office pool"), "{e}");

    // Two users, two addresses, each inside the pool (10.250.20.0/24, fd00:250:20::/64) and
    // never the network address.
    let anna = homeoffice(&h, "musterstadt", "anna", None).unwrap();
    let ben = homeoffice(&h, "musterstadt", "ben", None).unwrap();
    assert_eq!(addrs(&anna), ["10.250.20.1/32", "fd00:250:20::1/128"]);
    assert_eq!(addrs(&ben), ["10.250.20.2/32", "fd00:250:20::2/128"]);
    let pool: Vec<ipnet::IpNet> = vec![
        "10.250.20.0/24".parse().unwrap(),
        "fd00:250:20::/64".parse().unwrap(),
    ];
    for a in anna
        .identity
        .tunnel_addrs
        .iter()
        .chain(&ben.identity.tunnel_addrs)
    {
        assert!(pool.iter().any(|p| p.contains(a)), "{a} outside the pool");
    }
    // The configuration points at the hub with an endpoint.
    let conf = komnet_enroll::homeoffice::wg_quick_config(&anna, Some("private")).unwrap();
    assert!(
        conf.contains("Address = 10.250.20.1/32, fd00:250:20::1/128"),
        "{conf}"
    );
    assert!(
        conf.contains(&format!("PublicKey = {}", hub_keys.public())),
        "{conf}"
    );
    assert!(conf.contains("Endpoint = 203.0.113.1:51820"), "{conf}");

    // A new device for anna keeps her addresses.
    let anna2 = homeoffice(&h, "musterstadt", "anna", None).unwrap();
    assert_eq!(addrs(&anna2), addrs(&anna));

    // Revoked (not decommissioned): ben's address stays taken until his identity expires.
    revoke(&h, "musterstadt", "ben", RevocationReason::KeyCompromise);
    let carl = homeoffice(&h, "musterstadt", "carl", None).unwrap();
    assert_eq!(addrs(&carl), ["10.250.20.3/32", "fd00:250:20::3/128"]);
    // Decommissioned: released at once.
    revoke(
        &h,
        "musterstadt",
        "ben",
        RevocationReason::CessationOfOperation,
    );
    let dora = homeoffice(&h, "musterstadt", "dora", None).unwrap();
    assert_eq!(addrs(&dora), addrs(&ben));

    // Expired: released too.
    let eve = homeoffice(&h, "musterstadt", "eve", Some(3600)).unwrap();
    assert_eq!(addrs(&eve), ["10.250.20.4/32", "fd00:250:20::4/128"]);
    h.clock.advance(3601);
    let fritz = homeoffice(&h, "musterstadt", "fritz", None).unwrap();
    assert_eq!(addrs(&fritz), addrs(&eve));

    // Another tenant's pool is separate.
    let kim = homeoffice(&h, "kreis", "kim", None).unwrap();
    assert_eq!(addrs(&kim), ["10.250.1.1/32", "fd00:250:1::1/128"]);

    // The hubs see home-office identities with these addresses in the registry.
    let peers = h
        .service
        .store
        .registry_snapshot(h.service.now())
        .unwrap()
        .peers;
    let fritz_peer = peers.iter().find(|p| p.site.as_str() == "fritz").unwrap();
    assert_eq!(fritz_peer.tunnel_addrs, fritz.identity.tunnel_addrs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_pool_runs_out_and_a_changed_pool_moves_its_users() {
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    enroll(&h, "rz", "hub1", Role::Hub).await;
    let full = "homeoffice = [\"10.250.20.0/24\", \"fd00:250:20::/64\"]";
    let v7 = fixture.bundle_edited(7, |t| {
        assert!(t.contains(full), "the example changed");
        // IPv4 only, two host addresses (.1 and .2; .0 and .3 are network and broadcast).
        t.replace(full, "homeoffice = [\"10.250.20.0/30\"]")
    });
    h.service.publish_policy(&v7, "test").unwrap();
    let anna = homeoffice(&h, "musterstadt", "anna", None).unwrap();
    let ben = homeoffice(&h, "musterstadt", "ben", None).unwrap();
    assert_eq!(addrs(&anna), ["10.250.20.1/32"]);
    assert_eq!(addrs(&ben), ["10.250.20.2/32"]);
    let e = homeoffice(&h, "musterstadt", "carl", None).unwrap_err();
    assert_eq!(e.code, ErrorCode::AddressPoolExhausted, "{e}");
    assert!(e.message.contains("10.250.20.0/30"), "{e}");
    // Nothing of the refused issue was kept.
    assert!(h
        .service
        .store
        .registry_snapshot(h.service.now())
        .unwrap()
        .peers
        .iter()
        .all(|p| p.site.as_str() != "carl"));

    // The policy moves the pool: a re-issued user gets an address in the new one.
    let v8 = fixture.bundle_edited(8, |t| {
        t.replace(
            full,
            "homeoffice = [\"10.250.21.0/24\", \"fd00:250:20::/64\"]",
        )
    });
    h.service.publish_policy(&v8, "test").unwrap();
    let anna = homeoffice(&h, "musterstadt", "anna", None).unwrap();
    assert_eq!(addrs(&anna), ["10.250.21.1/32", "fd00:250:20::1/128"]);
    let carl = homeoffice(&h, "musterstadt", "carl", None).unwrap();
    assert_eq!(addrs(&carl), ["10.250.21.2/32", "fd00:250:20::2/128"]);
    let first: IpAddr = "10.250.21.1".parse().unwrap();
    assert_eq!(anna.identity.tunnel_addrs[0].addr(), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoke_tokens_must_name_a_site_of_the_published_policy() {
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    let token = |tenant: &str, site: &str, role: Role| {
        h.service.create_token(
            &CreateTokenRequest {
                tenant: TenantId::parse(tenant).unwrap(),
                site: SiteId::parse(site).unwrap(),
                role,
                ttl_secs: 3600,
            },
            "test",
        )
    };
    // Before a policy is published, any name is accepted.
    token("nohfelden", "rathaus", Role::Spoke).unwrap();
    h.service
        .publish_policy(&fixture.bundle(7), "test")
        .unwrap();

    let e = token("nohfelden", "rathaus", Role::Spoke).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotInPolicy, "{e}");
    assert!(
        e.message.contains("nohfelden") && e.message.contains("version 7"),
        "{e}"
    );
    let e = token("musterstadt", "schwimmbad", Role::Spoke).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotInPolicy, "{e}");
    assert!(
        e.message.contains("schwimmbad") && e.message.contains("version 7"),
        "{e}"
    );
    token("musterstadt", "bauhof", Role::Spoke).unwrap();
    // Hubs are the data centre's and not checked.
    token("dc", "hub9", Role::Hub).unwrap();
    // Refused tokens leave no trace.
    let created = h
        .service
        .store
        .audit_log(100)
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "token.create")
        .count();
    assert_eq!(created, 3);
}

/// The policy signing key rotates without touching enroll.toml or any appliance: a bundle
/// signed with the current key announces the next; the service then accepts bundles signed
/// with it, and once one is published bootstrap files carry the new key and the old key's
/// bundles are refused. An expired bundle is refused at publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_signing_key_rotates_by_announcement() {
    use base64::Engine as _;
    use komnet_policy::bundle::{self, BundleOptions};
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    let (k1, k1_pub) = bundle::generate_key().unwrap();

    let early = fixture.bundle_with(7, &k1, &BundleOptions::default());
    let e = h.service.publish_policy(&early, "test").unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicySignatureInvalid, "{e}");

    let announce = fixture.bundle_with(
        7,
        &fixture.private_key,
        &BundleOptions {
            next_key: Some(k1_pub.clone()),
            ..Default::default()
        },
    );
    h.service.publish_policy(&announce, "test").unwrap();
    let b = h.bootstrap("musterstadt", "rathaus", Role::Spoke);
    assert_eq!(b.policy_key().unwrap(), Some(fixture.public_key.clone()));

    let by_k1 = fixture.bundle_with(8, &k1, &BundleOptions::default());
    let published = h.service.publish_policy(&by_k1, "test").unwrap();
    assert_eq!(published.key_id, bundle::key_id(&k1_pub));
    let b = h.bootstrap("musterstadt", "rathaus", Role::Spoke);
    assert_eq!(b.policy_key().unwrap(), Some(k1_pub.clone()));
    assert_eq!(
        b.policy_public_key.as_deref(),
        Some(
            base64::engine::general_purpose::STANDARD
                .encode(&k1_pub)
                .as_str()
        )
    );
    let by_k0 = fixture.bundle_with(9, &fixture.private_key, &BundleOptions::default());
    let e = h.service.publish_policy(&by_k0, "test").unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicySignatureInvalid, "{e}");

    use komnet_enroll::service::Clock as _;
    let now = h.clock.now();
    let expired = fixture.bundle_with(
        9,
        &k1,
        &BundleOptions {
            not_before: Some(now - 7200),
            expires: Some(now - 3600),
            next_key: None,
        },
    );
    let e = h.service.publish_policy(&expired, "test").unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicyInvalid, "{e}");
    assert!(e.message.contains("expired"), "{e}");
}

/// Issue 15, part 1: `/metrics` of the service says when what it holds expires, and flags
/// what has less than a third of its lifetime left (here: a published bundle signed for 30
/// days, 21 days later).
#[tokio::test]
async fn metrics_show_what_the_service_holds_and_what_runs_out() {
    use common::{start_with, test_config};
    use komnet_enroll::config::Config;
    use komnet_enroll::service::Clock as _;
    use komnet_policy::bundle::BundleOptions;
    let fixture = PolicyFixture::new();
    let h = start_with(Config {
        policy_public_key: Some(fixture.public_key_text()),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    })
    .await;
    let addr = h.server.metrics_addr.expect("metrics listener");
    let scrape = || async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.unwrap();
        text
    };
    let now = h.clock.now();
    let bundle = fixture.bundle_with(
        7,
        &fixture.private_key,
        &BundleOptions {
            not_before: Some(now),
            expires: Some(now + 30 * 86_400),
            next_key: None,
        },
    );
    h.service.publish_policy(&bundle, "test").unwrap();
    let text = scrape().await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for needle in [
        "komnet_enroll_expiring{what=\"server_tls\"} 0\n",
        "komnet_enroll_expiring{what=\"issuing_ca\"} 0\n",
        "komnet_enroll_expiring{what=\"root_ca\"} 0\n",
        "komnet_enroll_expiring{what=\"policy\"} 0\n",
        "komnet_enroll_policy_version 7\n",
        "komnet_enroll_registry_followers 0\n",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert!(
        text.contains(&format!(
            "komnet_enroll_expiry_seconds{{what=\"policy\"}} {}\n",
            now + 30 * 86_400
        )),
        "{text}"
    );
    // 21 days on: less than a third of the bundle's 30 days left. (The service's own TLS
    // certificate is renewed by then: it is never flagged while renewal works.)
    h.clock.advance(21 * 86_400);
    let text = scrape().await;
    assert!(
        text.contains("komnet_enroll_expiring{what=\"policy\"} 1\n"),
        "{text}"
    );
}

/// MFA-gated home offices (`[mfa_window]`): a device issued without a second factor waits
/// outside the registry; a sign-in with one admits the person's devices (not another
/// person's) for the window, on the registry's stream and in its snapshot; the window ends on
/// time; and a tenant that stops being gated gets its devices back at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mfa_gated_home_offices_are_admitted_only_for_the_window_a_second_factor_opened() {
    use komnet_enroll::api::admin::MfaWindowRequest;
    use komnet_enroll::api::RegistryChange;
    use komnet_enroll::service::Clock as _;
    use komnet_proto::config::HumanDuration;

    let fixture = PolicyFixture::new();
    let mut config = common::test_config();
    config.policy_public_key = Some(fixture.public_key_text());
    config.mfa_window.insert(
        TenantId::parse("musterstadt").unwrap(),
        HumanDuration(std::time::Duration::from_secs(10 * 3600)),
    );
    let h = common::start_with(config.clone()).await;
    enroll(&h, "rz", "hub1", Role::Hub).await;
    h.service
        .publish_policy(&fixture.bundle(7), "test")
        .unwrap();
    let t0 = h.clock.now();
    let admitted = |h: &common::Harness| -> Vec<String> {
        h.service
            .store
            .registry_snapshot(h.clock.now())
            .unwrap()
            .peers
            .iter()
            .filter(|p| p.role == Role::HomeOffice)
            .map(|p| p.site.to_string())
            .collect()
    };
    let mut events = h.service.store.subscribe();

    // Issued from the shell (no second factor): recorded, listed, not admitted.
    let laptop = homeoffice(&h, "musterstadt", "anna_laptop", None).unwrap();
    assert_eq!(laptop.identity.admitted_until, Some(t0));
    let ben = homeoffice(&h, "musterstadt", "ben_phone", None).unwrap();
    assert!(admitted(&h).is_empty(), "{:?}", admitted(&h));
    assert!(
        events.try_recv().is_err(),
        "a closed device was published to the hubs"
    );
    let listed = h.service.store.valid_identities(t0).unwrap();
    assert_eq!(
        listed.iter().filter(|p| p.role == Role::HomeOffice).count(),
        2
    );

    // Anna signs in with a second factor a minute ago: her device, not Ben's, for 10 h.
    let signed_in = t0 - 60;
    let window = h
        .service
        .open_mfa_window(
            &MfaWindowRequest {
                tenant: TenantId::parse("musterstadt").unwrap(),
                owner: SiteId::parse("anna").unwrap(),
                authenticated_at: signed_in,
            },
            "anna (oidc sub 1, user of musterstadt)",
        )
        .unwrap();
    let until = signed_in + 10 * 3600;
    assert_eq!(window.admitted_until, Some(until));
    assert_eq!(window.devices, [SiteId::parse("anna_laptop").unwrap()]);
    assert_eq!(admitted(&h), ["anna_laptop"]);
    match &events.try_recv().unwrap().change {
        RegistryChange::Upsert(id) => {
            assert_eq!(id.serial, laptop.identity.serial);
            assert_eq!(id.admitted_until, Some(until));
        }
        other => panic!("{other:?}"),
    }
    let audit = h.service.store.audit_log(5).unwrap();
    assert!(
        audit.iter().any(|a| a.action == "homeoffice.mfa_window"
            && a.actor.starts_with("anna")
            && a.details["serials"][0] == laptop.identity.serial.as_str()),
        "{audit:?}"
    );
    // A device Anna sets up within her sign-in (the console passes its time) is open too.
    let phone = h
        .service
        .issue_homeoffice(
            &HomeOfficeRequest {
                tenant: TenantId::parse("musterstadt").unwrap(),
                user: SiteId::parse("anna_phone").unwrap(),
                wg_public_key: WgKeys::generate().public(),
                ttl_secs: None,
                mfa_at: Some(signed_in),
            },
            "anna",
        )
        .unwrap()
        .enrollment;
    assert_eq!(phone.identity.admitted_until, Some(until));
    assert_eq!(admitted(&h), ["anna_laptop", "anna_phone"]);

    // A sign-in older than the window opens nothing.
    let e = h
        .service
        .open_mfa_window(
            &MfaWindowRequest {
                tenant: TenantId::parse("musterstadt").unwrap(),
                owner: SiteId::parse("ben").unwrap(),
                authenticated_at: t0 - 11 * 3600,
            },
            "ben",
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest, "{e}");

    // The window ends: out of the snapshot (hubs drop the peer on their own clock).
    h.clock.set(until);
    assert!(admitted(&h).is_empty(), "{:?}", admitted(&h));
    assert_eq!(
        h.service
            .store
            .valid_identities(until)
            .unwrap()
            .iter()
            .filter(|p| p.role == Role::HomeOffice)
            .count(),
        3,
        "closed devices are still devices"
    );
    drop(ben);

    // The commune is no longer gated: at the next start every device is admitted again.
    let dir = h.dir;
    let clock = h.clock.clone();
    h.server.shutdown().await;
    drop(h.service);
    let mut ungated = config;
    ungated.mfa_window.clear();
    let h = common::start_in(dir, ungated, clock).await;
    assert_eq!(admitted(&h), ["anna_laptop", "anna_phone", "ben_phone"]);
    assert_eq!(h.service.apply_mfa_config().unwrap(), 0, "not idempotent");
}
