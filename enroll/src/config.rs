//! The service's configuration: `enroll.toml` in the data directory, written by `init` with
//! defaults an operator edits. Parsed with unknown keys denied, then checked as a whole so every
//! mistake is reported at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::identity::{SiteId, TenantId};

/// Name of the configuration file inside the data directory.
pub const CONFIG_FILE: &str = "enroll.toml";

pub use komnet_proto::config::{
    check_endpoint, decode_policy_public_key, ConfigError, HumanDuration,
};

/// Per-source request rate limit (token bucket per client IP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// Size and time limits on every route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted on any route, bytes.
    pub max_body_bytes: usize,
    /// A TLS handshake, the request head, or a request body must arrive within this.
    pub client_timeout: HumanDuration,
    /// Most connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Most connections one source (an IPv4 address, an IPv6 /64) holds at once; more are
    /// closed before their TLS handshake, so one host cannot take every slot with silent
    /// connections.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
}

fn default_max_connections_per_source() -> usize {
    64
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the HTTPS service listens.
    pub listen: SocketAddr,
    /// DNS names and IP addresses in the service's TLS certificate.
    pub server_names: Vec<String>,
    /// URLs written into bootstrap files, tried in order by appliances.
    pub enroll_urls: Vec<String>,
    /// Lifetime of appliance (spoke, hub) certificates; at least 1h.
    pub cert_lifetime: HumanDuration,
    /// Lifetime of home-office identities (the stock app cannot renew).
    pub homeoffice_lifetime: HumanDuration,
    /// Default lifetime of enrollment tokens.
    pub token_ttl: HumanDuration,
    /// Tunnel addresses: each tenant gets the next free `/tenant_prefix_v4` of this pool.
    pub tunnel_pool_v4: Ipv4Net,
    pub tenant_prefix_v4: u8,
    /// Optional IPv6 tunnel pool; a site gets the same host number in its tenant's `/64`-ish
    /// prefix as in IPv4.
    pub tunnel_pool_v6: Option<Ipv6Net>,
    pub tenant_prefix_v6: u8,
    /// `host:port` of each WireGuard hub, by the hub's site name (TOML table
    /// `[hub_endpoints]`, e.g. `hub1 = "192.0.2.1:51820"`). Keyed by site so that an endpoint is
    /// always handed out together with the key of the hub that answers there.
    #[serde(deserialize_with = "hub_endpoints_table")]
    pub hub_endpoints: BTreeMap<SiteId, String>,
    /// Routes spokes and home-office devices send through the tunnel.
    pub allowed_ips: Vec<IpNet>,
    pub rate_limit: RateLimit,
    pub limits: Limits,
    /// base64 of the raw Ed25519 public key policy bundles are signed with (the content of the
    /// `.pub` file `komnet policy keygen` writes). Without it no bundle can be published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_public_key: Option<String>,
    /// Where `/metrics` is served (plain HTTP, no authentication: loopback or a management
    /// network); absent: nowhere. `init` writes 127.0.0.1:9130.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// How often a quiet registry stream carries a keep-alive; hubs take a stream that missed
    /// three for dead and connect again (1s to 5m).
    #[serde(default = "default_registry_keepalive")]
    pub registry_keepalive: HumanDuration,
    /// Where the state lives: absent, the SQLite file `DATA_DIR/enroll.db` (one machine); a
    /// `postgres://user[:password]@host[:port]/dbname` URL (or libpq's `key=value` form, e.g.
    /// `host=/var/run/postgresql dbname=komnet`): PostgreSQL, which two or more replicas of
    /// the service share (docs/operations.md, "Replicas").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseUrl>,
    /// PostgreSQL connections each replica keeps at most (the database's `max_connections`
    /// must cover every replica's, plus one listening connection each).
    #[serde(
        default = "default_database_pool",
        skip_serializing_if = "is_default_database_pool"
    )]
    pub database_pool: usize,
    /// TLS to the database: the CA certificate (PEM) the server's certificate must chain to;
    /// the host name in `database` must be in it (libpq's `sslmode=verify-full`). Relative to
    /// the data directory (`init --database-ca` copies the file there, so that replicas
    /// copying the directory have it). Absent: no TLS (a Unix socket, a server on this machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_ca: Option<PathBuf>,
    /// MFA-gated home-office tunnels, by tenant (`[mfa_window]`, e.g. `tholey = "10h"`): such
    /// a tenant's home-office devices are admitted at the hubs only for this long after their
    /// person's sign-in to the console with a second factor (15m to 24h).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mfa_window: BTreeMap<TenantId, HumanDuration>,
}

fn default_database_pool() -> usize {
    16
}

fn is_default_database_pool(n: &usize) -> bool {
    *n == default_database_pool()
}

/// A PostgreSQL connection string. Its password never shows: `Debug` and [`Self::describe`]
/// name the database, host and user only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Checks that `text` is a PostgreSQL connection string tokio-postgres understands.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = DatabaseUrl(text.trim().to_owned());
        url.config()?;
        Ok(url)
    }

    /// The parsed connection settings.
    pub fn config(&self) -> Result<tokio_postgres::Config, String> {
        let text = &self.0;
        let is_url = text.starts_with("postgres://") || text.starts_with("postgresql://");
        if !is_url && !text.contains('=') {
            return Err(format!(
                "{:?} is not a PostgreSQL connection string: write \
                 postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME or host=… dbname=… user=…",
                self.describe()
            ));
        }
        text.parse::<tokio_postgres::Config>().map_err(|e| {
            if text.contains("verify-full") || text.contains("verify-ca") {
                // libpq's spelling, which tokio-postgres does not take: say what does it.
                format!(
                    "database: {e}: komnet verifies the server's certificate and name with \
                     database_ca (its CA certificate); set that and write sslmode=require or \
                     leave sslmode out"
                )
            } else {
                format!("database: {e}")
            }
        })
    }

    /// The whole string, password included: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// "PostgreSQL database DB on HOST:PORT as USER", without the password.
    pub fn describe(&self) -> String {
        let Ok(c) = self.0.parse::<tokio_postgres::Config>() else {
            return "PostgreSQL database (unparsable connection string)".into();
        };
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                };
                let port = c.get_ports().get(i).or(c.get_ports().first()).copied();
                format!("{host}:{}", port.unwrap_or(5432))
            })
            .collect();
        format!(
            "PostgreSQL database {} on {} as {}",
            c.get_dbname().or(c.get_user()).unwrap_or("(default)"),
            if hosts.is_empty() {
                "localhost:5432".to_string()
            } else {
                hosts.join(",")
            },
            c.get_user().unwrap_or("(the service's user)")
        )
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn default_registry_keepalive() -> HumanDuration {
    HumanDuration(Duration::from_secs(
        komnet_proto::api::REGISTRY_DEFAULT_KEEPALIVE_SECS,
    ))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            enroll_urls: vec!["https://localhost:8443".into()],
            cert_lifetime: HumanDuration(Duration::from_secs(7 * 86_400)),
            homeoffice_lifetime: HumanDuration(Duration::from_secs(90 * 86_400)),
            token_ttl: HumanDuration(Duration::from_secs(86_400)),
            tunnel_pool_v4: Ipv4Net::new([10, 96, 0, 0].into(), 12).unwrap_or_default(),
            tenant_prefix_v4: 22,
            tunnel_pool_v6: Ipv6Net::new([0xfd4b, 0x6f6d, 0x6e65, 0, 0, 0, 0, 0].into(), 48).ok(),
            tenant_prefix_v6: 64,
            // Empty rather than a placeholder: a made-up endpoint would end up in home-office
            // configurations; without one, issuing them fails with a message saying what to set.
            hub_endpoints: BTreeMap::new(),
            allowed_ips: vec![IpNet::V4(
                Ipv4Net::new([10, 96, 0, 0].into(), 12).unwrap_or_default(),
            )],
            rate_limit: RateLimit {
                per_second: 5.0,
                burst: 20,
            },
            limits: Limits {
                max_body_bytes: 16 * 1024,
                client_timeout: HumanDuration(Duration::from_secs(10)),
                max_connections: 4096,
                max_connections_per_source: default_max_connections_per_source(),
            },
            policy_public_key: None,
            registry_keepalive: default_registry_keepalive(),
            metrics_listen: None,
            database: None,
            database_pool: default_database_pool(),
            database_ca: None,
            mfa_window: BTreeMap::new(),
        }
    }
}

/// Reads `[hub_endpoints]`; the list form of earlier versions gets a message saying how to
/// rewrite it rather than serde's "invalid type".
fn hub_endpoints_table<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<SiteId, String>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = BTreeMap<SiteId, String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a table from hub site name to \"host:port\"")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(serde::de::Error::custom(
                "hub_endpoints is a table from hub site name to \"host:port\" now, not a list: \
                 write [hub_endpoints] with lines like hub1 = \"192.0.2.1:51820\"",
            ))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((site, endpoint)) = map.next_entry::<SiteId, String>()? {
                out.insert(site, endpoint);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Visitor)
}

impl Config {
    /// Reads and checks `DATA_DIR/enroll.toml`.
    pub fn load(data_dir: &Path) -> Result<Self, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        config.check().map_err(|problems| ConfigError::Invalid {
            path: path.clone(),
            problems,
        })?;
        Ok(config)
    }

    /// Every problem at once.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let hour = Duration::from_secs(3600);
        if self.cert_lifetime.0 < hour {
            problems.push("cert_lifetime: must be at least 1h".to_string());
        }
        if self.homeoffice_lifetime.0 < hour {
            problems.push("homeoffice_lifetime: must be at least 1h".to_string());
        }
        for (tenant, window) in &self.mfa_window {
            if !(Duration::from_secs(900)..=Duration::from_secs(86_400)).contains(&window.0) {
                problems.push(format!(
                    "mfa_window.{tenant}: {}s must lie between 15m and 24h",
                    window.0.as_secs()
                ));
            }
        }
        if self.token_ttl.0 < Duration::from_secs(60) {
            problems.push("token_ttl: must be at least 1m".to_string());
        }
        if self.tenant_prefix_v4 < self.tunnel_pool_v4.prefix_len() || self.tenant_prefix_v4 > 30 {
            problems.push(format!(
                "tenant_prefix_v4: {} must lie between the pool's /{} and /30",
                self.tenant_prefix_v4,
                self.tunnel_pool_v4.prefix_len()
            ));
        }
        if let Some(v6) = self.tunnel_pool_v6 {
            if self.tenant_prefix_v6 < v6.prefix_len() || self.tenant_prefix_v6 > 120 {
                problems.push(format!(
                    "tenant_prefix_v6: {} must lie between the pool's /{} and /120",
                    self.tenant_prefix_v6,
                    v6.prefix_len()
                ));
            }
        }
        if self.server_names.is_empty() {
            problems.push("server_names: at least one name is needed".to_string());
        }
        if self.enroll_urls.iter().any(|u| !u.starts_with("https://")) {
            problems.push("enroll_urls: every URL must start with https://".to_string());
        }
        if self.rate_limit.per_second <= 0.0 || self.rate_limit.burst == 0 {
            problems.push("rate_limit: per_second and burst must be positive".to_string());
        }
        if self.limits.max_body_bytes < 1024 {
            problems.push("limits.max_body_bytes: at least 1024".to_string());
        }
        let keepalive = self.registry_keepalive.0;
        if keepalive < Duration::from_secs(1) || keepalive > Duration::from_secs(300) {
            problems.push(format!(
                "registry_keepalive: {}s is outside 1s to 5m (hubs take a stream that missed \
                 three keep-alives for dead)",
                keepalive.as_secs()
            ));
        }
        if self.limits.client_timeout.0.is_zero() {
            problems.push("limits.client_timeout: must be positive".to_string());
        }
        if self.limits.max_connections == 0 {
            problems.push("limits.max_connections: must be positive".to_string());
        }
        if self.limits.max_connections_per_source == 0 {
            problems.push("limits.max_connections_per_source: must be positive".to_string());
        }
        for (site, endpoint) in &self.hub_endpoints {
            if let Err(e) = check_endpoint(endpoint) {
                problems.push(format!("hub_endpoints.{site}: {e}"));
            }
        }
        if let Some(key) = &self.policy_public_key {
            if let Err(e) = decode_policy_public_key(key) {
                problems.push(format!("policy_public_key: {e}"));
            }
        }
        if let Some(url) = &self.database {
            if let Err(e) = url.config() {
                problems.push(format!("database: {e}"));
            }
        }
        if self.database_ca.is_some() && self.database.is_none() {
            problems
                .push("database_ca: set, but there is no database (PostgreSQL) to use it".into());
        }
        if self.database_pool == 0 || self.database_pool > 1000 {
            problems.push(format!(
                "database_pool: {} is outside 1 to 1000",
                self.database_pool
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(HumanDuration::parse("7d").unwrap().0.as_secs(), 7 * 86_400);
        assert_eq!(HumanDuration::parse("90m").unwrap().0.as_secs(), 5400);
        assert!(HumanDuration::parse("7").is_err());
        assert!(HumanDuration::parse("7w").is_err());
        assert!(HumanDuration::parse("h").is_err());
    }

    #[test]
    fn default_config_round_trips_and_all_problems_are_reported() {
        let config = Config::default();
        let back: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(back, config);
        let mut bad = config;
        bad.cert_lifetime = HumanDuration(Duration::from_secs(60));
        bad.enroll_urls = vec!["http://x".into()];
        let problems = bad.check().unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn hub_endpoints_are_a_table_and_the_old_list_gets_a_hint() {
        let mut config = Config::default();
        config
            .hub_endpoints
            .insert(SiteId::parse("hub2").unwrap(), "[2001:db8::2]:51820".into());
        config
            .hub_endpoints
            .insert(SiteId::parse("hub1").unwrap(), "192.0.2.1:51820".into());
        let text = config.to_toml();
        assert!(text.contains("[hub_endpoints]"), "{text}");
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, config);
        assert!(back.check().is_ok());

        let old = text.replace(
            "[hub_endpoints]\nhub1 = \"192.0.2.1:51820\"\nhub2 = \"[2001:db8::2]:51820\"\n",
            "",
        );
        let old = format!("hub_endpoints = [\"192.0.2.1:51820\"]\n{old}");
        let e = toml::from_str::<Config>(&old).unwrap_err().to_string();
        assert!(e.contains("[hub_endpoints]"), "{e}");

        let mut bad = Config::default();
        for (site, endpoint) in [("a", "192.0.2.1"), ("b", "x:0"), ("c", "2001:db8::1:51820")] {
            bad.hub_endpoints
                .insert(SiteId::parse(site).unwrap(), endpoint.into());
        }
        let problems = bad.check().unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().all(|p| p.starts_with("hub_endpoints.")));
    }

    #[test]
    fn policy_public_key_must_be_32_bytes_of_base64() {
        let mut config = Config {
            policy_public_key: Some(format!("{}\n", STANDARD.encode([7u8; 32]))),
            ..Config::default()
        };
        assert!(config.check().is_ok());
        let back: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(back.policy_public_key, config.policy_public_key);
        config.policy_public_key = Some("not base64!".into());
        let problems = config.check().unwrap_err();
        assert!(
            problems[0].contains("policy_public_key: not base64"),
            "{problems:?}"
        );
        config.policy_public_key = Some(STANDARD.encode([7u8; 31]));
        let problems = config.check().unwrap_err();
        assert!(problems[0].contains("31 bytes"), "{problems:?}");
    }
}
