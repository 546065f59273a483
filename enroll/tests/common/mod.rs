//! Test harness: a real service (data directory, SQLite file, CA) serving HTTPS on loopback.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod daemon;
pub mod postgres;

use std::sync::Arc;
use std::time::Duration;

use komnet_enroll::config::{Config, HumanDuration};
use komnet_enroll::identity::Role;
use komnet_enroll::server::{self, RunningServer};
use komnet_enroll::service::{self, ManualClock, Service};
use komnet_enroll::token::Bootstrap;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub service: Arc<Service>,
    pub server: RunningServer,
    pub clock: Arc<ManualClock>,
    pub url: String,
}

pub fn test_config() -> Config {
    komnet_enroll::testing::loopback_config()
}

pub async fn start() -> Harness {
    start_with(test_config()).await
}

pub async fn start_with(config: Config) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::default());
    start_in(dir, config, clock).await
}

pub async fn start_in(dir: tempfile::TempDir, config: Config, clock: Arc<ManualClock>) -> Harness {
    // RUST_LOG=komnet_enroll=debug shows the service's log lines with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    use komnet_enroll::service::Clock as _;
    if !dir.path().join("ca").exists() {
        service::init(dir.path(), &config, clock.now()).unwrap();
    }
    let service = Arc::new(Service::open_with_config(dir.path(), config, clock.clone()).unwrap());
    let server = server::start(
        service.clone(),
        "127.0.0.1:0".parse().unwrap(),
        Some(&dir.path().join(server::ADMIN_SOCKET)),
    )
    .await
    .unwrap();
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    Harness {
        dir,
        service,
        server,
        clock,
        url,
    }
}

impl Harness {
    /// A bootstrap file's content for tenant/site/role, as `komnet token create` writes it.
    pub fn bootstrap(&self, tenant: &str, site: &str, role: Role) -> Bootstrap {
        komnet_enroll::testing::bootstrap(&self.service, &self.url, tenant, site, role, "test")
            .unwrap()
    }

    /// The single number a query on the service's SQLite file answers (`SELECT count(*) ...`).
    pub fn count(&self, sql: &str) -> i64 {
        let conn = rusqlite::Connection::open(self.dir.path().join("enroll.db")).unwrap();
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// `POST` of `body` to the enroll endpoint over HTTPS, without a client certificate.
    pub async fn post_enroll(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        raw_request(
            self,
            "POST",
            komnet_enroll::api::routes::ENROLL,
            body.to_string().into_bytes(),
            None,
        )
        .await
    }

    pub fn lifetime(&self) -> i64 {
        self.service.config.cert_lifetime.0.as_secs() as i64
    }
}

pub fn short_timeout_config(secs: u64) -> Config {
    let mut c = test_config();
    c.limits.client_timeout = HumanDuration(Duration::from_secs(secs));
    c
}

/// A raw HTTPS exchange, for requests the client library would never send.
pub async fn raw_request(
    h: &Harness,
    method: &str,
    path: &str,
    body: Vec<u8>,
    client_auth: Option<(&str, &str)>,
) -> (u16, serde_json::Value) {
    use http_body_util::{BodyExt as _, Full};
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(h.service.ca.root_pem.as_bytes()).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_auth {
        None => b.with_no_client_auth(),
        Some((chain, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(h.server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(axum::body::Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// The `code` of a typed error answer.
pub fn code(v: &serde_json::Value) -> String {
    v["code"].as_str().unwrap_or("<no code>").to_string()
}

/// A well-formed enroll request body: fresh CSR (optionally with a subject), proof made with
/// `keys` against the service's key.
pub fn enroll_body(
    h: &Harness,
    token: &str,
    keys: &komnet_enroll::client::WgKeys,
    csr_der: &[u8],
) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let proof = komnet_enroll::wgproof::prove(keys.secret(), &h.service.wg_proof_public, csr_der);
    serde_json::json!({
        "token": token,
        "csr": b64.encode(csr_der),
        "wg_public_key": keys.public().to_base64(),
        "wg_proof": b64.encode(proof),
    })
}

/// The worked example policy (`examples/policy/landkreis`, version 7) in a temporary
/// directory, with a fresh signing key, for making signed bundles.
pub struct PolicyFixture {
    pub dir: tempfile::TempDir,
    pub private_key: Vec<u8>,
    pub public_key: Vec<u8>,
    operator: String,
}

impl PolicyFixture {
    pub fn new() -> Self {
        let src =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tenants")).unwrap();
        for entry in std::fs::read_dir(src.join("tenants")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(
                entry.path(),
                dir.path().join("tenants").join(entry.file_name()),
            )
            .unwrap();
        }
        let operator = std::fs::read_to_string(src.join("operator.toml")).unwrap();
        assert!(operator.contains("\nversion = 7\n"), "the example changed");
        let (private_key, public_key) = komnet_policy::bundle::generate_key().unwrap();
        PolicyFixture {
            dir,
            private_key,
            public_key,
            operator,
        }
    }

    /// The public key as enroll.toml's `policy_public_key` takes it (a `.pub` file's text).
    pub fn public_key_text(&self) -> String {
        use base64::Engine as _;
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(&self.public_key)
        )
    }

    /// A bundle of the example at `version`, signed with this fixture's key.
    pub fn bundle(&self, version: u64) -> Vec<u8> {
        self.bundle_edited(version, |t| t.to_string())
    }

    /// Like [`Self::bundle`] with operator.toml changed by `edit` first.
    pub fn bundle_edited(&self, version: u64, edit: impl Fn(&str) -> String) -> Vec<u8> {
        self.bundle_signed(version, edit, &self.private_key)
    }

    /// Version `version`, signed with `private_key`, with a validity window or announced key.
    pub fn bundle_with(
        &self,
        version: u64,
        private_key: &[u8],
        options: &komnet_policy::bundle::BundleOptions,
    ) -> Vec<u8> {
        let text = self
            .operator
            .replace("\nversion = 7\n", &format!("\nversion = {version}\n"));
        std::fs::write(self.dir.path().join("operator.toml"), text).unwrap();
        komnet_policy::bundle::create_with(self.dir.path(), private_key, options).unwrap()
    }

    pub fn bundle_signed(
        &self,
        version: u64,
        edit: impl Fn(&str) -> String,
        private_key: &[u8],
    ) -> Vec<u8> {
        let text = edit(
            &self
                .operator
                .replace("\nversion = 7\n", &format!("\nversion = {version}\n")),
        );
        std::fs::write(self.dir.path().join("operator.toml"), text).unwrap();
        komnet_policy::bundle::create(self.dir.path(), private_key).unwrap()
    }
}

/// A harness whose service verifies bundles with `fixture`'s key.
pub async fn start_with_policy_key(fixture: &PolicyFixture) -> Harness {
    start_with(Config {
        policy_public_key: Some(fixture.public_key_text()),
        ..test_config()
    })
    .await
}

/// Enrolls an appliance over HTTPS with a token made in-process.
pub async fn enroll(
    h: &Harness,
    tenant: &str,
    site: &str,
    role: Role,
) -> (
    komnet_enroll::client::Enrollment,
    komnet_enroll::client::WgKeys,
) {
    let keys = komnet_enroll::client::WgKeys::generate();
    let e = komnet_enroll::client::enroll(&h.bootstrap(tenant, site, role), &keys)
        .await
        .unwrap();
    (e, keys)
}
