//! Writes the seed corpora for `csr_der` and `request_json` from code: real CSRs (good, other
//! key types, truncated, bit-flipped), an identity certificate, and the JSON bodies of every
//! route. Run from enroll/fuzz: `cargo run --bin gen-corpus`.

use std::fs;
use std::path::Path;

use komnet_enroll::api::{EnrollRequest, RegistryChange, RegistryEvent};
use komnet_enroll::csr::{build_csr, build_csr_for_key};
use komnet_enroll::identity::{Identity, Role, SiteId, TenantId, WgPublicKey};

fn write(dir: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(dir);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("corpus file");
}

fn main() {
    let t = TenantId::parse("nohfelden").expect("name");
    let s = SiteId::parse("rathaus").expect("name");
    let (_, good) = build_csr(Some(&t), Some(&s), Some(Role::Spoke)).expect("csr");
    write("csr_der", "p256_with_subject", &good);
    let (_, bare) = build_csr(None, None, None).expect("csr");
    write("csr_der", "p256_bare", &bare);
    for (name, alg) in [
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519", &rcgen::PKCS_ED25519),
    ] {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        write(
            "csr_der",
            name,
            &build_csr_for_key(&key, None, None, None).expect("csr"),
        );
    }
    write("csr_der", "truncated", &good[..good.len() / 2]);
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 5] ^= 1;
    write("csr_der", "bad_signature", &flipped);
    write("csr_der", "empty", b"");

    // An identity certificate, made by a throwaway CA the same way the service makes them.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let wg = WgPublicKey::from_bytes([7; 32]).expect("key");
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![
        rcgen::SanType::URI(
            "urn:komnet:identity:nohfelden:rathaus:spoke"
                .try_into()
                .expect("uri"),
        ),
        rcgen::SanType::URI(
            "urn:komnet:wg-key:BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"
                .try_into()
                .expect("uri"),
        ),
        rcgen::SanType::IpAddress("10.96.0.1".parse().expect("ip")),
    ];
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
    write("csr_der", "identity_certificate", cert.der());
    write("csr_der", "ca_certificate", ca_cert.der());

    let req = EnrollRequest {
        token: "kmt1.0011223344556677.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        csr: "MIIB".into(),
        wg_public_key: wg.to_base64(),
        wg_proof: "AAAA".into(),
    };
    write(
        "request_json",
        "enroll",
        serde_json::to_string(&req).expect("json").as_bytes(),
    );
    write(
        "request_json",
        "renew",
        br#"{"csr":"MIIB","wg_public_key":"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=","wg_proof":"AA=="}"#,
    );
    let ident = Identity {
        tenant: t.clone(),
        site: s.clone(),
        role: Role::Spoke,
        wg_public_key: wg,
        tunnel_addrs: vec!["10.96.0.1/32".parse().expect("net")],
        not_after: 1_800_000_000,
        serial: "40aa".into(),
        admitted_until: None,
    };
    let ev = RegistryEvent {
        version: 7,
        change: RegistryChange::Upsert(ident),
    };
    write(
        "request_json",
        "registry_event",
        serde_json::to_string(&ev).expect("json").as_bytes(),
    );
    write(
        "request_json",
        "revoke",
        br#"{"serial":null,"tenant":"nohfelden","site":"rathaus","reason":"key_compromise"}"#,
    );
    write(
        "request_json",
        "token_create",
        br#"{"tenant":"nohfelden","site":"rathaus","role":"spoke","ttl_secs":86400}"#,
    );
    write(
        "request_json",
        "error",
        br#"{"code":"token_used","message":"token: already used"}"#,
    );
    write("request_json", "garbage", b"{\"token\": [1,2,{");
    println!("corpus written");
}
