//! Single sign-on: OpenID Connect authorization code flow with PKCE (RFC 7636) against the
//! municipality's identity provider, through the `openidconnect` crate (discovery, the ID
//! token's signature, issuer, audience, nonce and expiry). Roles and tenant come from the
//! userinfo endpoint's claims (OIDC Core §5.3), as configured (`[claims]`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreGenderClaim, CoreProviderMetadata,
};
use openidconnect::{
    reqwest, AdditionalClaims, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, Nonce, OAuth2TokenResponse as _,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope, TokenResponse as _, UserInfoClaims,
};
use serde::{Deserialize, Serialize};

use komnet_proto::identity::TenantId;

use crate::config::Config;

/// The metadata and keys are fetched again after this long, so a key rotation at the provider
/// reaches the console without a restart.
const REDISCOVER_AFTER: Duration = Duration::from_secs(3600);

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("identity provider {issuer}: discovery failed: {message}")]
    Discovery { issuer: String, message: String },
    #[error("identity provider: {0}")]
    Config(String),
    #[error("identity provider: the code exchange failed: {0}")]
    Exchange(String),
    #[error("identity provider: the ID token was refused: {0}")]
    IdToken(String),
    #[error("identity provider: userinfo failed: {0}")]
    UserInfo(String),
    #[error("{0}")]
    NoRole(String),
}

/// The console's roles (docs/console.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Everything, every tenant.
    Operator,
    /// Their tenant's sites, devices, tokens and audit entries.
    CommuneAdmin(TenantId),
    /// Their own home-office devices.
    User(TenantId),
}

/// A signed-in person, as their identity provider describes them.
#[derive(Debug, Clone)]
pub struct Person {
    pub subject: String,
    pub name: String,
    pub role: Role,
    /// Authentication context class and methods of the login (for MFA-gated tunnels).
    pub acr: Option<String>,
    pub amr: Vec<String>,
    /// When this sign-in proved a second factor (Unix seconds: the ID token's `auth_time`),
    /// as `[claims] mfa_amr`/`mfa_acr` recognise one; `None`: no second factor.
    pub mfa_at: Option<i64>,
}

impl Person {
    /// May this person see and act on the tenant's sites, tokens and audit entries?
    pub fn manages(&self, tenant: &TenantId) -> bool {
        match &self.role {
            Role::Operator => true,
            Role::CommuneAdmin(t) => t == tenant,
            Role::User(_) => false,
        }
    }

    /// How the audit log names them: name, the provider's subject, role.
    pub fn audit_name(&self) -> String {
        let role = match &self.role {
            Role::Operator => "operator".to_owned(),
            Role::CommuneAdmin(t) => format!("commune admin of {t}"),
            Role::User(t) => format!("user of {t}"),
        };
        format!("{} (oidc sub {}, {role})", self.name, self.subject)
    }
}

/// Claims beyond the standard ones (groups, tenant, whatever the provider adds).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OtherClaims {
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}
impl AdditionalClaims for OtherClaims {}

/// A login under way: what the callback needs to finish it.
#[derive(Debug)]
pub struct Pending {
    pub state: String,
    pub nonce: Nonce,
    pub verifier: PkceCodeVerifier,
}

#[derive(Debug)]
pub struct Oidc {
    config: Arc<Config>,
    http: reqwest::Client,
    client: tokio::sync::Mutex<Option<(Instant, Client)>>,
}

impl Oidc {
    pub fn new(config: Arc<Config>) -> Result<Self, OidcError> {
        let mut builder = reqwest::Client::builder()
            // Following redirects would open the client to SSRF (openidconnect's advice).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10));
        if let Some(pem) = &config.ca_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| OidcError::Config(format!("oidc.ca_file: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| OidcError::Config(format!("HTTP client: {e}")))?;
        Ok(Oidc {
            config,
            http,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The client from the provider's discovery document, fetched at most hourly.
    async fn client(&self) -> Result<Client, OidcError> {
        let mut cached = self.client.lock().await;
        if let Some((at, client)) = &*cached {
            if at.elapsed() < REDISCOVER_AFTER {
                return Ok(client.clone());
            }
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone())
            .map_err(|e| OidcError::Config(format!("oidc.issuer: {e}")))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| OidcError::Discovery {
                issuer: self.config.issuer.clone(),
                message: error_chain(&e),
            })?;
        let redirect = RedirectUrl::new(self.config.redirect_url())
            .map_err(|e| OidcError::Config(format!("public_url: {e}")))?;
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            self.config.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect);
        *cached = Some((Instant::now(), client.clone()));
        Ok(client)
    }

    /// Where to send the browser, and what the callback will need.
    pub async fn start(&self) -> Result<(String, Pending), OidcError> {
        let client = self.client().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in &self.config.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.url();
        Ok((
            url.to_string(),
            Pending {
                state: state.secret().clone(),
                nonce,
                verifier,
            },
        ))
    }

    /// Exchanges the code (with the PKCE verifier), verifies the ID token and reads the
    /// person's claims.
    pub async fn finish(&self, code: String, pending: Pending) -> Result<Person, OidcError> {
        let client = self.client().await?;
        let token = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| OidcError::Config(format!("no token endpoint: {e}")))?
            .set_pkce_verifier(pending.verifier)
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Exchange(error_chain(&e)))?;
        let id_token = token
            .id_token()
            .ok_or_else(|| OidcError::IdToken("the provider sent no ID token".into()))?;
        let verifier = client.id_token_verifier();
        let claims = id_token
            .claims(&verifier, &pending.nonce)
            .map_err(|e| OidcError::IdToken(error_chain(&e)))?;
        let subject = claims.subject().clone();
        let acr = claims.auth_context_ref().map(|a| a.as_str().to_owned());
        let amr: Vec<String> = claims
            .auth_method_refs()
            .map(|v| v.iter().map(|m| m.as_str().to_owned()).collect())
            .unwrap_or_default();
        let auth_time = claims.auth_time().map(|t| t.timestamp());
        let userinfo: UserInfoClaims<OtherClaims, CoreGenderClaim> = client
            .user_info(token.access_token().clone(), Some(subject.clone()))
            .map_err(|e| OidcError::UserInfo(format!("no userinfo endpoint: {e}")))?
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::UserInfo(error_chain(&e)))?;
        let mut all =
            serde_json::to_value(&userinfo).map_err(|e| OidcError::UserInfo(e.to_string()))?;
        // The ID token's claims count where userinfo lacks them (some providers put groups
        // only into the token).
        if let (Some(all), Ok(serde_json::Value::Object(id))) =
            (all.as_object_mut(), serde_json::to_value(claims))
        {
            for (k, v) in id {
                all.entry(k).or_insert(v);
            }
        }
        let mut person = person_from_claims(&self.config, subject.as_str(), &all, acr, amr)?;
        person.mfa_at =
            second_factor(&self.config.claims, &person).then(|| auth_time.unwrap_or_else(unix_now));
        Ok(person)
    }
}

/// Whether the sign-in's `amr`/`acr` show a second factor as `[claims]` defines one.
fn second_factor(claims: &crate::config::Claims, person: &Person) -> bool {
    person.amr.iter().any(|m| claims.mfa_amr.contains(m))
        || person
            .acr
            .as_ref()
            .is_some_and(|a| claims.mfa_acr.contains(a))
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Resolves name, role and tenant from the claims as `[claims]` configures.
fn person_from_claims(
    config: &Config,
    subject: &str,
    all: &serde_json::Value,
    acr: Option<String>,
    amr: Vec<String>,
) -> Result<Person, OidcError> {
    let c = &config.claims;
    let name = all
        .get(&c.name)
        .and_then(|v| v.as_str())
        .unwrap_or(subject)
        .to_owned();
    let roles: Vec<&str> = match all.get(&c.roles) {
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    let tenant = || -> Result<TenantId, OidcError> {
        let raw = all.get(&c.tenant).and_then(|v| v.as_str()).ok_or_else(|| {
            OidcError::NoRole(format!(
                "{name}: the claim \"{}\" (the commune) is missing",
                c.tenant
            ))
        })?;
        TenantId::parse(raw).map_err(|e| {
            OidcError::NoRole(format!("{name}: claim \"{}\" = {raw:?}: {e}", c.tenant))
        })
    };
    let role = if roles.contains(&c.operator.as_str()) {
        Role::Operator
    } else if roles.contains(&c.commune_admin.as_str()) {
        Role::CommuneAdmin(tenant()?)
    } else if roles.contains(&c.user.as_str()) {
        Role::User(tenant()?)
    } else {
        return Err(OidcError::NoRole(format!(
            "{name}: the claim \"{}\" names none of {}, {}, {}",
            c.roles, c.operator, c.commune_admin, c.user
        )));
    };
    Ok(Person {
        subject: subject.to_owned(),
        name,
        role,
        acr,
        amr,
        mfa_at: None,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Config {
        Config::parse(
            std::path::Path::new("console.toml"),
            r#"
listen = "127.0.0.1:8080"
public_url = "http://localhost:8080"
admin_socket = "/tmp/admin.sock"
[oidc]
issuer = "http://localhost:9000"
client_id = "c"
"#,
        )
        .expect("config")
    }

    #[test]
    fn roles_and_tenant_from_claims() {
        let c = config();
        let p = person_from_claims(
            &c,
            "s1",
            &json!({"preferred_username": "tom", "groups": ["x", "komnet-commune-admin"],
                    "komnet_tenant": "tholey"}),
            None,
            vec![],
        )
        .expect("admin");
        assert_eq!(
            p.role,
            Role::CommuneAdmin(TenantId::parse("tholey").expect("t"))
        );
        assert_eq!(p.name, "tom");
        let op = person_from_claims(
            &c,
            "s2",
            &json!({"groups": "komnet-operator"}),
            None,
            vec![],
        )
        .expect("operator needs no tenant");
        assert_eq!(op.role, Role::Operator);
        assert_eq!(op.name, "s2");
        let e = person_from_claims(&c, "s3", &json!({"groups": ["komnet-user"]}), None, vec![])
            .expect_err("user without tenant");
        assert!(e.to_string().contains("komnet_tenant"), "{e}");
        let e = person_from_claims(&c, "s4", &json!({"groups": ["staff"]}), None, vec![])
            .expect_err("no role");
        assert!(e.to_string().contains("none of"), "{e}");
    }
}
