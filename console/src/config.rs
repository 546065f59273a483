//! `console.toml`: where the console listens, how browsers reach it, the enrollment service's
//! admin socket, the identity provider and how its claims become roles.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use komnet_proto::config::HumanDuration;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}:\n  {}", path.display(), problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The language pages are shown in unless the person picks the other one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    #[default]
    De,
    En,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    public_url: String,
    admin_socket: PathBuf,
    #[serde(default)]
    language: Lang,
    #[serde(default = "default_idle")]
    session_idle: HumanDuration,
    #[serde(default = "default_max")]
    session_max: HumanDuration,
    #[serde(default = "default_logins")]
    logins_per_minute: u32,
    /// The zone the pages show times in (IANA name).
    #[serde(default = "default_time_zone")]
    time_zone: String,
    oidc: RawOidc,
    #[serde(default)]
    claims: Claims,
}

fn default_idle() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30 * 60))
}
fn default_max() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10 * 3600))
}
fn default_logins() -> u32 {
    10
}
fn default_time_zone() -> String {
    "Europe/Berlin".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    issuer: String,
    client_id: String,
    /// A confidential client's secret, read from this file (mode 0600); without it the console
    /// is a public client and relies on PKCE alone.
    client_secret_file: Option<PathBuf>,
    /// Scopes besides `openid`.
    #[serde(default = "default_scopes")]
    scopes: Vec<String>,
    /// Extra trusted root (PEM) for an identity provider with a private CA.
    ca_file: Option<PathBuf>,
}

fn default_scopes() -> Vec<String> {
    vec!["profile".into(), "email".into()]
}

/// Which claims carry what (from the ID token, completed by the userinfo endpoint).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Claims {
    /// The person's name as the audit log records it.
    pub name: String,
    /// A string or list of strings: groups or roles.
    pub roles: String,
    /// The commune (tenant) a commune admin or user belongs to.
    pub tenant: String,
    /// Values of `roles` that make a person an operator, a commune admin, a user.
    pub operator: String,
    pub commune_admin: String,
    pub user: String,
    /// A sign-in proved a second factor (for MFA-gated home-office tunnels) when its ID
    /// token's `amr` holds one of these methods (RFC 8176)...
    pub mfa_amr: Vec<String>,
    /// ... or its `acr` is one of these (whatever the provider calls its MFA level).
    pub mfa_acr: Vec<String>,
}

impl Default for Claims {
    fn default() -> Self {
        Claims {
            name: "preferred_username".into(),
            roles: "groups".into(),
            tenant: "komnet_tenant".into(),
            operator: "komnet-operator".into(),
            commune_admin: "komnet-commune-admin".into(),
            user: "komnet-user".into(),
            // Methods that are a factor beyond a password (RFC 8176 §2); "mfa" is the
            // provider saying so itself.
            mfa_amr: [
                "mfa", "otp", "hwk", "swk", "sms", "sc", "fpt", "face", "iris",
            ]
            .map(String::from)
            .to_vec(),
            mfa_acr: Vec::new(),
        }
    }
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Scheme, host and port the browsers use, without a trailing slash.
    pub public_url: String,
    pub admin_socket: PathBuf,
    pub language: Lang,
    pub session_idle: std::time::Duration,
    pub session_max: std::time::Duration,
    pub logins_per_minute: u32,
    /// The zone the pages show times in (`time_zone`, default Europe/Berlin).
    pub time_zone: jiff::tz::TimeZone,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub scopes: Vec<String>,
    pub ca_pem: Option<Vec<u8>>,
    pub claims: Claims,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut problems = Vec::new();
        let time_zone = jiff::tz::TimeZone::get(&raw.time_zone).unwrap_or_else(|e| {
            problems.push(format!(
                "time_zone = \"{}\": {e} (an IANA name such as Europe/Berlin, from \
                 /usr/share/zoneinfo: Debian's tzdata)",
                raw.time_zone
            ));
            jiff::tz::TimeZone::UTC
        });
        let public_url = raw.public_url.trim_end_matches('/').to_owned();
        let loopback = raw.listen.ip().is_loopback();
        if !loopback {
            // The console speaks plain HTTP: TLS ends at a reverse proxy on the same host.
            problems.push(format!(
                "listen = \"{}\": the console serves plain HTTP and listens on loopback only; \
                 put a TLS reverse proxy (nginx, Apache) in front of it (docs/console.md)",
                raw.listen
            ));
        }
        let local = public_url.starts_with("http://localhost")
            || public_url.starts_with("http://127.0.0.1");
        if !public_url.starts_with("https://") && !local {
            problems.push(format!(
                "public_url = \"{public_url}\": must be https:// (the session cookie is Secure); \
                 http:// only for localhost"
            ));
        }
        if !raw.oidc.issuer.starts_with("https://")
            && !raw.oidc.issuer.starts_with("http://localhost")
            && !raw.oidc.issuer.starts_with("http://127.0.0.1")
        {
            problems.push(format!(
                "oidc.issuer = \"{}\": must be https:// (http:// only for a provider on localhost)",
                raw.oidc.issuer
            ));
        }
        if raw.oidc.client_id.trim().is_empty() {
            problems.push("oidc.client_id: empty".into());
        }
        if raw.session_idle.0 > raw.session_max.0 {
            problems.push("session_idle is longer than session_max".into());
        }
        if raw.logins_per_minute == 0 {
            problems.push("logins_per_minute: 0 would let nobody sign in".into());
        }
        let client_secret = match &raw.oidc.client_secret_file {
            None => None,
            Some(p) => match std::fs::read_to_string(p) {
                Ok(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
                Ok(_) => {
                    problems.push(format!("oidc.client_secret_file {}: empty", p.display()));
                    None
                }
                Err(e) => {
                    problems.push(format!("oidc.client_secret_file {}: {e}", p.display()));
                    None
                }
            },
        };
        let ca_pem = match &raw.oidc.ca_file {
            None => None,
            Some(p) => match std::fs::read(p) {
                Ok(b) => Some(b),
                Err(e) => {
                    problems.push(format!("oidc.ca_file {}: {e}", p.display()));
                    None
                }
            },
        };
        let c = &raw.claims;
        for (key, value) in [
            ("claims.name", &c.name),
            ("claims.roles", &c.roles),
            ("claims.tenant", &c.tenant),
            ("claims.operator", &c.operator),
            ("claims.commune_admin", &c.commune_admin),
            ("claims.user", &c.user),
        ] {
            if value.trim().is_empty() {
                problems.push(format!("{key}: empty"));
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            });
        }
        Ok(Config {
            listen: raw.listen,
            public_url,
            admin_socket: raw.admin_socket,
            language: raw.language,
            session_idle: raw.session_idle.0,
            session_max: raw.session_max.0,
            logins_per_minute: raw.logins_per_minute,
            time_zone,
            issuer: raw.oidc.issuer,
            client_id: raw.oidc.client_id,
            client_secret,
            scopes: raw.oidc.scopes,
            ca_pem,
            claims: raw.claims,
        })
    }

    /// Where the identity provider sends the browser back.
    pub fn redirect_url(&self) -> String {
        format!("{}/auth/callback", self.public_url)
    }

    /// The origin forms must come from (the `Origin` header of a POST).
    pub fn origin(&self) -> &str {
        // public_url is scheme://host[:port] possibly with a path; the origin ends before it.
        let after_scheme = self.public_url.find("://").map_or(0, |i| i + 3);
        match self.public_url[after_scheme..].find('/') {
            Some(i) => &self.public_url[..after_scheme + i],
            None => &self.public_url,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:8080"
public_url = "https://console.example.de/"
admin_socket = "/var/lib/komnet-enroll/admin.sock"
[oidc]
issuer = "https://idp.example.de/realms/stwendel"
client_id = "komnet-console"
"#;

    #[test]
    fn parses_and_defaults() {
        let c = Config::parse(Path::new("console.toml"), GOOD).expect("parses");
        assert_eq!(c.public_url, "https://console.example.de");
        assert_eq!(c.redirect_url(), "https://console.example.de/auth/callback");
        assert_eq!(c.origin(), "https://console.example.de");
        assert_eq!(c.language, Lang::De);
        assert_eq!(c.claims.roles, "groups");
        assert_eq!(c.session_idle.as_secs(), 1800);
    }

    #[test]
    fn refuses_network_listen_and_plain_http_all_at_once() {
        let text = GOOD
            .replace("127.0.0.1:8080", "0.0.0.0:8080")
            .replace("https://console", "http://console")
            .replace("https://idp", "http://idp");
        let e = Config::parse(Path::new("console.toml"), &text)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("listen = \"0.0.0.0:8080\""), "{e}");
        assert!(e.contains("public_url"), "{e}");
        assert!(e.contains("oidc.issuer"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = Config::parse(
            Path::new("console.toml"),
            &format!("{GOOD}\nsurprise = 1\n"),
        )
        .expect_err("refused")
        .to_string();
        assert!(e.contains("surprise"), "{e}");
    }
}
