//! Test harness: a real service (data directory, SQLite file, CA) serving HTTPS on loopback.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use komnet_enroll::api::admin::CreateTokenRequest;
use komnet_enroll::config::{Config, HumanDuration, RateLimit};
use komnet_enroll::identity::{Role, SiteId, TenantId};
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
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        server_names: vec!["127.0.0.1".into(), "localhost".into()],
        hub_endpoints: vec!["203.0.113.1:51820".into()],
        // Tests fire many requests from one address; the rate-limit test sets its own.
        rate_limit: RateLimit {
            per_second: 100_000.0,
            burst: 100_000,
        },
        ..Config::default()
    }
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
        let resp = self
            .service
            .create_token(
                &CreateTokenRequest {
                    tenant: TenantId::parse(tenant).unwrap(),
                    site: SiteId::parse(site).unwrap(),
                    role,
                    ttl_secs: 3600,
                },
                "test",
            )
            .unwrap();
        Bootstrap {
            version: 1,
            token: resp.token,
            enroll_urls: vec![self.url.clone()],
            root_fingerprint: resp.root_fingerprint,
            root_ca_pem: resp.root_ca_pem,
        }
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
