//! Section 2 of the issue: bad input and abuse, each over real HTTPS on loopback. Every refusal
//! is a typed JSON error with a stable code, and a refused enrollment leaves nothing behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use komnet_enroll::api::{routes, ErrorCode};
use komnet_enroll::client::{self, WgKeys};
use komnet_enroll::config::RateLimit;
use komnet_enroll::csr::{build_csr, build_csr_for_key};
use komnet_enroll::identity::{Role, SiteId, TenantId};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_reused_tokens_are_refused() {
    let h = common::start().await;
    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    h.clock.advance(3601);
    let err = client::enroll(&b, &WgKeys::generate()).await.unwrap_err();
    assert_eq!(
        err.api_error().unwrap().code,
        ErrorCode::TokenExpired,
        "{err}"
    );

    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    client::enroll(&b, &WgKeys::generate()).await.unwrap();
    let err = client::enroll(&b, &WgKeys::generate()).await.unwrap_err();
    assert_eq!(err.api_error().unwrap().code, ErrorCode::TokenUsed, "{err}");

    // A token with the right id and a wrong secret is just "invalid", like an unknown one.
    let b = h.bootstrap("nohfelden", "bauhof", Role::Spoke);
    let mut forged = b.clone();
    let (head, _) = b.token.rsplit_once('.').unwrap();
    forged.token = format!("{head}.{}", "A".repeat(43));
    let err = client::enroll(&forged, &WgKeys::generate())
        .await
        .unwrap_err();
    assert_eq!(
        err.api_error().unwrap().code,
        ErrorCode::TokenInvalid,
        "{err}"
    );
    // ... and did not burn the real token.
    client::enroll(&b, &WgKeys::generate()).await.unwrap();
    let (status, v) = h
        .post_enroll(common::enroll_body(
            &h,
            "not-a-token",
            &WgKeys::generate(),
            &build_csr(None, None, None).unwrap().1,
        ))
        .await;
    assert_eq!((status, common::code(&v).as_str()), (401, "token_invalid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_uses_of_one_token_yield_exactly_one_certificate() {
    let h = Arc::new(common::start().await);
    let b = Arc::new(h.bootstrap("nohfelden", "rathaus", Role::Spoke));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            client::enroll(&b, &WgKeys::generate()).await
        }));
    }
    let mut ok = 0;
    let mut used = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(
                    e.api_error().map(|a| a.code),
                    Some(ErrorCode::TokenUsed),
                    "{e}"
                );
                used += 1;
            }
        }
    }
    assert_eq!((ok, used), (1, 99));
    assert_eq!(h.count("SELECT COUNT(*) FROM certificates"), 1);
    assert_eq!(h.count("SELECT COUNT(*) FROM site_hosts"), 1);
    assert_eq!(h.count("SELECT COUNT(*) FROM registry_events"), 1);
    assert_eq!(
        h.count("SELECT COUNT(*) FROM audit WHERE action = 'enroll'"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_csrs_are_refused_and_leave_the_token_unused() {
    let h = common::start().await;
    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    let keys = WgKeys::generate();
    let t = TenantId::parse("nohfelden").unwrap();
    let s = SiteId::parse("rathaus").unwrap();

    let (_, good) = build_csr(Some(&t), Some(&s), Some(Role::Spoke)).unwrap();
    let mut bad_sig = good.clone();
    let n = bad_sig.len();
    bad_sig[n - 4] ^= 0x40;
    let p384 = build_csr_for_key(
        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        None,
        None,
        None,
    )
    .unwrap();
    let ed25519 = build_csr_for_key(
        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        None,
        None,
        None,
    )
    .unwrap();
    let (_, other_tenant) =
        build_csr(Some(&TenantId::parse("tholey").unwrap()), Some(&s), None).unwrap();
    let (_, other_site) =
        build_csr(Some(&t), Some(&SiteId::parse("bauhof").unwrap()), None).unwrap();
    let (_, other_role) = build_csr(Some(&t), Some(&s), Some(Role::Hub)).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad signature", bad_sig, "csr_signature_invalid"),
        (
            "garbage DER",
            b"\x30\x82\x01\x00garbage".to_vec(),
            "csr_invalid",
        ),
        ("empty", Vec::new(), "csr_invalid"),
        ("P-384 key", p384, "csr_key_type"),
        ("Ed25519 key", ed25519, "csr_key_type"),
        ("other tenant", other_tenant, "csr_identity_mismatch"),
        ("other site", other_site, "csr_identity_mismatch"),
        ("other role", other_role, "csr_identity_mismatch"),
    ];
    for (what, csr, expected) in cases {
        let (status, v) = h
            .post_enroll(common::enroll_body(&h, &b.token, &keys, &csr))
            .await;
        assert_eq!(
            (status, common::code(&v).as_str()),
            (400, expected),
            "{what}: {v}"
        );
        assert!(
            v["message"].as_str().unwrap().contains("CSR"),
            "{what}: {v}"
        );
    }
    let mut body = common::enroll_body(&h, &b.token, &keys, &good);
    body["csr"] = "***not base64***".into();
    let (status, v) = h.post_enroll(body).await;
    assert_eq!((status, common::code(&v).as_str()), (400, "csr_invalid"));

    assert_eq!(h.count("SELECT COUNT(*) FROM certificates"), 0);
    assert_eq!(
        h.count("SELECT COUNT(*) FROM tokens WHERE used_at IS NOT NULL"),
        0
    );
    // The token still works with a good request.
    let (status, v) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &good))
        .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_keys_must_be_proven_and_not_low_order() {
    let h = common::start().await;
    let b = h.bootstrap("nohfelden", "rathaus", Role::Spoke);
    let keys = WgKeys::generate();
    let (_, csr) = build_csr(None, None, None).unwrap();

    // A proof made with another private key.
    let mut body = common::enroll_body(&h, &b.token, &WgKeys::generate(), &csr);
    body["wg_public_key"] = keys.public().to_base64().into();
    let (status, v) = h.post_enroll(body).await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (400, "wg_proof_invalid"),
        "{v}"
    );

    // A proof for another CSR (replayed from a different request).
    let (_, other_csr) = build_csr(None, None, None).unwrap();
    let mut body = common::enroll_body(&h, &b.token, &keys, &other_csr);
    body["csr"] = STANDARD.encode(&csr).into();
    let (status, v) = h.post_enroll(body).await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (400, "wg_proof_invalid"),
        "{v}"
    );

    // No proof at all: the JSON type demands one.
    let mut body = common::enroll_body(&h, &b.token, &keys, &csr);
    body.as_object_mut().unwrap().remove("wg_proof");
    let (status, v) = h.post_enroll(body).await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (400, "bad_request"),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("wg_proof"), "{v}");

    let mut one = [0u8; 32];
    one[0] = 1;
    for low in [[0u8; 32], one] {
        let mut body = common::enroll_body(&h, &b.token, &keys, &csr);
        body["wg_public_key"] = STANDARD.encode(low).into();
        let (status, v) = h.post_enroll(body).await;
        assert_eq!(
            (status, common::code(&v).as_str()),
            (400, "wg_key_invalid"),
            "{v}"
        );
        assert!(v["message"].as_str().unwrap().contains("low-order"), "{v}");
    }
    // Unknown fields are refused, not ignored.
    let mut body = common::enroll_body(&h, &b.token, &keys, &csr);
    body["tenant"] = "tholey".into();
    let (status, v) = h.post_enroll(body).await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (400, "bad_request"),
        "{v}"
    );

    assert_eq!(h.count("SELECT COUNT(*) FROM certificates"), 0);
    let (status, _) = h
        .post_enroll(common::enroll_body(&h, &b.token, &keys, &csr))
        .await;
    assert_eq!(status, 200);
    // The same WireGuard key cannot be enrolled for a second site.
    let b2 = h.bootstrap("nohfelden", "bauhof", Role::Spoke);
    let (_, csr2) = build_csr(None, None, None).unwrap();
    let (status, v) = h
        .post_enroll(common::enroll_body(&h, &b2.token, &keys, &csr2))
        .await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (409, "wg_key_in_use"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_on_every_route() {
    let h = common::start().await;
    let big = vec![b'x'; h.service.config.limits.max_body_bytes + 1];
    for path in [routes::ENROLL, routes::RENEW] {
        let (status, v) = common::raw_request(&h, "POST", path, big.clone(), None).await;
        // Renew without a certificate is refused before the body is read.
        if path == routes::RENEW {
            assert_eq!(
                (status, common::code(&v).as_str()),
                (401, "certificate_required")
            );
        } else {
            assert_eq!(
                (status, common::code(&v).as_str()),
                (413, "body_too_large"),
                "{v}"
            );
        }
    }
    // Without Content-Length (chunked), the limit still holds while reading.
    let tcp = tls_connect(&h).await;
    let mut tls = tcp;
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n",
        routes::ENROLL
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..20 {
        let chunk = vec![b'x'; 4096];
        let _ = tls
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await;
        let _ = tls.write_all(&chunk).await;
        let _ = tls.write_all(b"\r\n").await;
    }
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
}

async fn tls_connect(
    h: &common::Harness,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls_pki_types::CertificateDer::from_pem_slice(h.service.ca.root_pem.as_bytes())
                .unwrap(),
        )
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(h.server.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let h = common::start_with(common::short_timeout_config(1)).await;
    // 1. A TCP connection that never starts TLS.
    let mut tcp = tokio::net::TcpStream::connect(h.server.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("server kept an idle TCP connection open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(3));

    // 2. TLS done, the request head never completes.
    let mut tls = tls_connect(&h).await;
    tls.write_all(b"POST /v1/simpleenroll HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("server waited forever for the request head");
    assert!(started.elapsed() < Duration::from_secs(4));
    if let Ok(n) = r {
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    // 3. Head complete, the body trickles in too slowly: a typed timeout.
    let mut tls = tls_connect(&h).await;
    tls.write_all(
        b"POST /v1/simpleenroll HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\ncontent-type: application/json\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("server waited forever for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"timeout\""), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_source_gets_429() {
    let mut config = common::test_config();
    // Slow refill, so a loaded machine taking a second for the twelve requests does not
    // refill a token in between.
    config.rate_limit = RateLimit {
        per_second: 0.5,
        burst: 5,
    };
    let h = common::start_with(config).await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let (status, v) = common::raw_request(&h, "GET", routes::INFO, Vec::new(), None).await;
        if status == 429 {
            assert_eq!(common::code(&v), "rate_limited");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        7,
        "{statuses:?}"
    );
    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = common::raw_request(&h, "GET", routes::INFO, Vec::new(), None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_with_an_expired_certificate_and_the_registry_without_a_hub_certificate() {
    let h = common::start().await;
    let keys = WgKeys::generate();
    let spoke = client::enroll(&h.bootstrap("nohfelden", "rathaus", Role::Spoke), &keys)
        .await
        .unwrap();
    // The registry is for hubs only.
    let err = client::registry_snapshot(&spoke).await.unwrap_err();
    assert_eq!(err.api_error().unwrap().code, ErrorCode::Forbidden, "{err}");
    let (status, v) = common::raw_request(&h, "GET", routes::REGISTRY, Vec::new(), None).await;
    assert_eq!(
        (status, common::code(&v).as_str()),
        (401, "certificate_required")
    );
    let (status, v) =
        common::raw_request(&h, "GET", "/v1/registry/events?since=x", Vec::new(), None).await;
    assert_eq!((status, common::code(&v).as_str()), (400, "bad_request"));
    // Unknown routes answer in the same typed form.
    let (status, v) = common::raw_request(&h, "GET", "/nope", Vec::new(), None).await;
    assert_eq!((status, common::code(&v).as_str()), (404, "not_found"));

    // Past its expiry the certificate is refused with a typed error, not a bare TLS alert.
    h.clock.advance(h.lifetime() + 10);
    let err = client::renew(&spoke, &keys).await.unwrap_err();
    assert_eq!(
        err.api_error().map(|e| e.code),
        Some(ErrorCode::CertificateExpired),
        "{err}"
    );
    // A client that missed its window enrolls again with a new token, and keeps its address.
    let again = client::enroll(&h.bootstrap("nohfelden", "rathaus", Role::Spoke), &keys)
        .await
        .unwrap();
    assert_eq!(again.identity.tunnel_addrs, spoke.identity.tunnel_addrs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_releases_the_address_and_tenants_are_isolated_pools() {
    use komnet_enroll::api::admin::RevokeRequest;
    use komnet_enroll::api::RevocationReason;
    let h = common::start().await;
    let a = client::enroll(
        &h.bootstrap("nohfelden", "rathaus", Role::Spoke),
        &WgKeys::generate(),
    )
    .await
    .unwrap();
    let b = client::enroll(
        &h.bootstrap("tholey", "rathaus", Role::Spoke),
        &WgKeys::generate(),
    )
    .await
    .unwrap();
    let pool_a: ipnet::IpNet = format!("{}/22", a.identity.tunnel_addrs[0].addr())
        .parse()
        .unwrap();
    assert!(
        !pool_a.trunc().contains(&b.identity.tunnel_addrs[0].addr()),
        "tenants share a pool"
    );
    h.service
        .revoke(
            &RevokeRequest {
                serial: None,
                tenant: Some(a.identity.tenant.clone()),
                site: Some(a.identity.site.clone()),
                reason: RevocationReason::CessationOfOperation,
            },
            "test",
        )
        .unwrap();
    // The freed address goes to the next site of that tenant.
    let c = client::enroll(
        &h.bootstrap("nohfelden", "bauhof", Role::Spoke),
        &WgKeys::generate(),
    )
    .await
    .unwrap();
    assert_eq!(c.identity.tunnel_addrs, a.identity.tunnel_addrs);
    // Revoking nothing is an error that says so.
    let err = h
        .service
        .revoke(
            &RevokeRequest {
                serial: Some("00".into()),
                tenant: None,
                site: None,
                reason: RevocationReason::Unspecified,
            },
            "test",
        )
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NothingToRevoke);
}

/// One host cannot hold every connection slot with silent connections: past
/// `limits.max_connections_per_source` its connections are closed before the TLS handshake,
/// while another source is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_hold_every_connection() {
    let mut config = common::test_config();
    config.limits.max_connections_per_source = 4;
    let h = common::start_with(config).await;
    let connect_from = |src: &'static str| {
        let addr = h.server.addr;
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{src}:0").parse().unwrap()).unwrap();
            socket.connect(addr).await.unwrap()
        }
    };
    // Is the connection closed by the server within `wait`?
    async fn closed_within(tcp: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(wait, tcp.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect_from("127.0.0.1").await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fifth = connect_from("127.0.0.1").await;
    assert!(
        closed_within(&mut fifth, Duration::from_secs(2)).await,
        "a fifth connection from one source was kept"
    );
    // Another source still gets in and is served.
    let mut other = connect_from("127.0.0.2").await;
    assert!(
        !closed_within(&mut other, Duration::from_millis(500)).await,
        "another source was refused"
    );
    // A slot given back can be taken again.
    drop(silent.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = connect_from("127.0.0.1").await;
    assert!(
        !closed_within(&mut again, Duration::from_millis(500)).await,
        "a freed slot was not given back"
    );
}
