//! Helpers for tests and benchmarks (feature `testing`, turned on only by dev-dependencies, so
//! never in a product build): a service configuration for loopback, the limits for a test whose
//! every request comes from 127.0.0.1, and a bootstrap file straight from the service. This
//! crate's tests and benches and the console's browser test share them.

use crate::api::admin::CreateTokenRequest;
use crate::api::ApiError;
use crate::config::{Config, RateLimit};
use crate::identity::{IdentityError, Role, SiteId, TenantId};
use crate::service::Service;
use crate::token::Bootstrap;

/// The service on an ephemeral loopback port with a certificate for 127.0.0.1 and localhost,
/// hub `hub1` at a documentation address (RFC 5737), and [`allow_many_requests_from_one_source`].
pub fn loopback_config() -> Config {
    let mut config = Config {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        server_names: vec!["127.0.0.1".into(), "localhost".into()],
        hub_endpoints: [(hub1(), "203.0.113.1:51820".to_string())]
            .into_iter()
            .collect(),
        ..Config::default()
    };
    allow_many_requests_from_one_source(&mut config);
    config
}

/// Rate and connection limits out of the way of a test or benchmark that sends everything from
/// one address (a test of the limits sets its own).
pub fn allow_many_requests_from_one_source(config: &mut Config) {
    config.rate_limit = RateLimit {
        per_second: 1e9,
        burst: u32::MAX,
    };
    config.limits.max_connections_per_source = 100_000;
}

fn hub1() -> SiteId {
    SiteId::parse("hub1").unwrap_or_else(|e| unreachable!("hub1 is a valid site name: {e}"))
}

/// Why [`bootstrap`] could not make a token.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Name(#[from] IdentityError),
    #[error("creating the token: {0}")]
    Token(#[from] ApiError),
}

/// A one-hour token for tenant/site/role created by `actor`, as the bootstrap file
/// `komnet-enroll token create` writes, pointing at `url`.
pub fn bootstrap(
    service: &Service,
    url: &str,
    tenant: &str,
    site: &str,
    role: Role,
    actor: &str,
) -> Result<Bootstrap, BootstrapError> {
    let resp = service.create_token(
        &CreateTokenRequest {
            tenant: TenantId::parse(tenant)?,
            site: SiteId::parse(site)?,
            role,
            ttl_secs: 3600,
        },
        actor,
    )?;
    Ok(Bootstrap::from_token(resp, vec![url.to_owned()]))
}
