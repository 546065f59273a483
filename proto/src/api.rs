//! The wire types the enrollment service and its clients share: requests, responses, registry events and the
//! typed error every route answers with.
//!
//! Binary fields (DER, proofs) travel as standard base64 strings inside JSON. Every request type
//! denies unknown fields, so a client that sends something the service would ignore learns so.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, Role, SiteId, TenantId, WgPublicKey};

/// Routes of the HTTPS service (EST-like names, RFC 7030 §3.2.2).
pub mod routes {
    /// `GET`: root and issuing CA, the service's proof-of-possession key.
    pub const INFO: &str = "/v1/info";
    /// `POST` [`super::EnrollRequest`]: a token buys the first certificate (`simpleenroll`).
    pub const ENROLL: &str = "/v1/simpleenroll";
    /// `POST` [`super::RenewRequest`] over mutual TLS with the current certificate
    /// (`simplereenroll`).
    pub const RENEW: &str = "/v1/simplereenroll";
    /// `GET` over mutual TLS with a hub certificate: [`super::RegistrySnapshot`].
    pub const REGISTRY: &str = "/v1/registry";
    /// `GET ?since=VERSION` over mutual TLS with a hub certificate: server-sent events, one
    /// [`super::RegistryEvent`] each.
    pub const REGISTRY_EVENTS: &str = "/v1/registry/events";
    /// `GET`: the DER CRL of the issuing CA.
    pub const CRL: &str = "/v1/crl";
    /// `GET ?have=VERSION` over mutual TLS with any valid appliance certificate: the published
    /// signed policy bundle (its bytes as `komnet policy bundle` wrote them), its version in
    /// [`super::POLICY_VERSION_HEADER`]; 304 when `have` is the published version.
    pub const POLICY: &str = "/v1/policy";
    /// `GET` over mutual TLS with any valid appliance certificate: the hubs as
    /// `Vec<`[`super::HubPeer`]`>`.
    pub const HUBS: &str = "/v1/hubs";
    /// `POST` [`crate::status::HubReport`] over mutual TLS with a hub certificate: how the
    /// hub's peers are doing (the web console's fleet page).
    pub const HUB_REPORT: &str = "/v1/hub/report";
}

/// The response header of `GET /v1/policy` (200 and 304) that carries the published version.
pub const POLICY_VERSION_HEADER: &str = "x-komnet-policy-version";

/// The response header of `GET /v1/registry/events` that says how often the service sends a
/// keep-alive comment on an otherwise quiet stream, in seconds. A hub that hears nothing for
/// [`REGISTRY_MISSED_KEEPALIVES`] intervals takes the stream for dead (a half-open connection
/// after a crash of the enrollment host or a firewall that forgot the connection) and connects
/// again. Without the header (older services) [`REGISTRY_DEFAULT_KEEPALIVE_SECS`] applies.
pub const REGISTRY_KEEPALIVE_HEADER: &str = "x-komnet-keepalive-seconds";

/// The keep-alive interval of services that do not announce one.
pub const REGISTRY_DEFAULT_KEEPALIVE_SECS: u64 = 15;

/// Keep-alives a hub may miss before it takes the registry stream for dead.
pub const REGISTRY_MISSED_KEEPALIVES: u32 = 3;

/// A stable, machine-readable reason for every rejected request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The token is unknown or its secret does not match (the two are not told apart).
    TokenInvalid,
    TokenExpired,
    TokenUsed,
    /// The CSR is not DER PKCS#10 or its structure is broken.
    CsrInvalid,
    CsrSignatureInvalid,
    /// The CSR's key is not ECDSA P-256 with SHA-256.
    CsrKeyType,
    /// The CSR asks for a tenant, site or role other than the token's (or certificate's).
    CsrIdentityMismatch,
    WgKeyInvalid,
    /// The WireGuard key possession proof does not verify.
    WgProofInvalid,
    /// The WireGuard key already belongs to another valid identity.
    WgKeyInUse,
    /// Renew and registry need a client certificate.
    CertificateRequired,
    CertificateExpired,
    CertificateRevoked,
    /// The certificate was replaced by a renewal; only the newest one may renew.
    CertificateSuperseded,
    /// Renewal opens at 2/3 of the lifetime.
    RenewTooEarly,
    /// The route is for hubs only.
    Forbidden,
    AddressPoolExhausted,
    BodyTooLarge,
    /// The body did not arrive in time.
    Timeout,
    RateLimited,
    /// The JSON body or query does not match the route's type.
    BadRequest,
    NotFound,
    /// Nothing matched (e.g. a revocation of a site with no certificate).
    NothingToRevoke,
    /// A hub identity is needed for this, and none is enrolled (or none has an endpoint).
    NoHub,
    /// No policy bundle has been published yet.
    NoPolicy,
    /// `policy_public_key` is not set in enroll.toml, so no bundle can be verified.
    PolicyKeyMissing,
    /// The bundle's signature does not verify with `policy_public_key`.
    PolicySignatureInvalid,
    /// The bundle is malformed, or its policy does not check, test or compile.
    PolicyInvalid,
    /// The bundle's version is lower than the published one.
    PolicyRollback,
    /// The bundle has the published version but other content.
    PolicyVersionReused,
    /// The tenant or site (or the tenant's home-office pool) is not in the published policy.
    NotInPolicy,
    Internal,
}

/// The body of every error answer: a stable code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// `simpleenroll`: a one-time token, a CSR for a fresh P-256 key and the WireGuard public key
/// with its possession proof (see `komnet_enroll_client::proof`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// base64 DER PKCS#10.
    pub csr: String,
    pub wg_public_key: String,
    /// base64 HMAC, see `komnet_enroll_client::proof`.
    pub wg_proof: String,
}

/// `simplereenroll`: like enroll, but the current certificate (mutual TLS) replaces the token.
/// The WireGuard key may stay or change; either way its possession is proven again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr: String,
    pub wg_public_key: String,
    pub wg_proof: String,
}

/// A hub a spoke or home-office device connects to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubPeer {
    pub site: SiteId,
    pub wg_public_key: WgPublicKey,
    pub tunnel_addrs: Vec<IpNet>,
    /// `host:port` configured for this hub's site (`[hub_endpoints]` in enroll.toml); `None`
    /// when none is. Defaulted so enrollments saved before it existed still load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// What an enrollment or renewal answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    pub identity: Identity,
    /// Leaf, then issuing CA (PEM).
    pub certificate_chain_pem: String,
    /// Unix seconds from which `simplereenroll` is accepted (2/3 of the lifetime).
    pub renew_after: i64,
    /// `host:port` of the data centre's WireGuard hubs (every configured endpoint, ordered by
    /// hub site; [`HubPeer::endpoint`] says which hub answers where).
    pub hub_endpoints: Vec<String>,
    /// The hubs' identities: their WireGuard keys, tunnel addresses and endpoints, by site.
    pub hubs: Vec<HubPeer>,
    /// Routes to send through the tunnel (the data centre's networks).
    pub allowed_ips: Vec<IpNet>,
    /// The policy bundle version current at issue time.
    pub policy_version: u64,
}

/// `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInfo {
    pub root_ca_pem: String,
    pub issuing_ca_pem: String,
    /// Lower-case hex SHA-256 of the root certificate's DER.
    pub root_fingerprint: String,
    /// The service's static X25519 key that WireGuard possession proofs are made against.
    pub wg_proof_public_key: WgPublicKey,
}

/// The valid peers at one registry version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySnapshot {
    pub version: u64,
    pub peers: Vec<Identity>,
}

/// One change of the registry. Peers are keyed by (tenant, site): an upsert replaces whatever
/// that site had (a renewal, a new key), a removal cuts it off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEvent {
    pub version: u64,
    pub change: RegistryChange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RegistryChange {
    Upsert(Identity),
    Remove {
        tenant: TenantId,
        site: SiteId,
        role: Role,
        serial: String,
        wg_public_key: WgPublicKey,
        reason: RevocationReason,
    },
}

/// Why a certificate stopped being valid (RFC 5280 §5.3.1 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    /// Replaced by a renewal or a re-enrollment of the same site.
    Superseded,
    /// Decommissioned: the site's tunnel addresses are released.
    CessationOfOperation,
    PrivilegeWithdrawn,
}

impl RevocationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key_compromise",
            RevocationReason::AffiliationChanged => "affiliation_changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation_of_operation",
            RevocationReason::PrivilegeWithdrawn => "privilege_withdrawn",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "unspecified" => RevocationReason::Unspecified,
            "key_compromise" => RevocationReason::KeyCompromise,
            "affiliation_changed" => RevocationReason::AffiliationChanged,
            "superseded" => RevocationReason::Superseded,
            "cessation_of_operation" => RevocationReason::CessationOfOperation,
            "privilege_withdrawn" => RevocationReason::PrivilegeWithdrawn,
            _ => return None,
        })
    }
}

/// Admin API (local Unix socket only). Not for appliances.
pub mod admin {
    use super::*;

    pub const TOKENS: &str = "/admin/tokens";
    pub const REVOKE: &str = "/admin/revoke";
    pub const HOMEOFFICE: &str = "/admin/homeoffice";
    /// `POST` [`MfaWindowRequest`]: [`MfaWindowResponse`].
    pub const HOMEOFFICE_WINDOW: &str = "/admin/homeoffice/window";
    pub const AUDIT: &str = "/admin/audit";
    pub const POLICY_VERSION: &str = "/admin/policy-version";
    /// `POST` the bytes of a signed policy bundle (not JSON): [`PolicyPublishResponse`].
    pub const POLICY_PUBLISH: &str = "/admin/policy-publish";
    /// `GET`: [`PolicyBundleResponse`], the published bundle and the one before it (the
    /// console's policy page and its diff).
    pub const POLICY: &str = "/admin/policy";
    /// `GET`: [`FleetResponse`], what the web console's fleet overview shows.
    pub const FLEET: &str = "/admin/fleet";

    /// Request header of an admin call made for a person rather than for the socket's user:
    /// the web console (`komnet-console`) sends the signed-in person as their identity
    /// provider names them, and the audit entry records both (`PERSON via uid=N`). Whoever can
    /// open the admin socket is trusted with every admin action already; the header only
    /// makes the audit log say who asked.
    pub const ON_BEHALF_OF_HEADER: &str = "x-komnet-on-behalf-of";

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CreateTokenRequest {
        pub tenant: TenantId,
        pub site: SiteId,
        pub role: Role,
        /// Seconds.
        pub ttl_secs: u64,
    }

    /// The token is in this answer only; the service keeps its hash.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CreateTokenResponse {
        pub token: String,
        pub token_id: String,
        pub expires_at: i64,
        pub enroll_urls: Vec<String>,
        pub root_ca_pem: String,
        pub root_fingerprint: String,
        pub wg_proof_public_key: WgPublicKey,
        /// enroll.toml's `policy_public_key` (base64), when set: it goes into the bootstrap
        /// file, so an appliance needs no site-specific key in its own configuration.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub policy_public_key: Option<String>,
    }

    /// Exactly one selector: a serial, or a tenant with optionally a site.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RevokeRequest {
        pub serial: Option<String>,
        pub tenant: Option<TenantId>,
        pub site: Option<SiteId>,
        pub reason: RevocationReason,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RevokeResponse {
        pub revoked_serials: Vec<String>,
        pub registry_version: u64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HomeOfficeRequest {
        pub tenant: TenantId,
        pub user: SiteId,
        pub wg_public_key: WgPublicKey,
        /// Seconds; the stock app cannot renew, so this is longer than an appliance's.
        pub ttl_secs: Option<u64>,
        /// When the person asking proved a second factor at the identity provider (Unix
        /// seconds; the console sets it): in a tenant with an MFA window the device is admitted
        /// from then for the window; absent there, only after the person's next such sign-in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub mfa_at: Option<i64>,
    }

    /// A person signed in to the console with a second factor: the home-office devices they
    /// own (`OWNER` or `OWNER_DEVICE`) in `tenant` are admitted for the tenant's MFA window.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MfaWindowRequest {
        pub tenant: TenantId,
        pub owner: SiteId,
        /// When the second factor was proven (Unix seconds; the ID token's `auth_time`).
        pub authenticated_at: i64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MfaWindowResponse {
        /// The window's end; `None`: the tenant's home offices are not MFA-gated.
        pub admitted_until: Option<i64>,
        /// The devices (identity names) the window applies to.
        pub devices: Vec<SiteId>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HomeOfficeResponse {
        pub enrollment: EnrollResponse,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AuditRecord {
        pub id: i64,
        pub at: i64,
        pub actor: String,
        pub action: String,
        pub details: serde_json::Value,
    }

    impl AuditRecord {
        /// The tenants an entry concerns, read from what each action records: `tenant` (tokens,
        /// enrollments, home offices), `tenants` (revocations), the selector of older
        /// revocations (`tenant T`, `site T/S`), the renewing appliance (`T/S`). Empty for
        /// entries about the whole service (policy) and for those that name no tenant
        /// (`enroll.retry`): only operators see those.
        pub fn tenants(&self) -> Vec<&str> {
            let d = &self.details;
            let mut out: Vec<&str> = Vec::new();
            if let Some(t) = d.get("tenant").and_then(|v| v.as_str()) {
                out.push(t);
            }
            if let Some(ts) = d.get("tenants").and_then(|v| v.as_array()) {
                out.extend(ts.iter().filter_map(|t| t.as_str()));
            }
            if let Some(sel) = d.get("selector").and_then(|v| v.as_str()) {
                if let Some(t) = sel.strip_prefix("tenant ") {
                    out.push(t);
                } else if let Some((t, _)) =
                    sel.strip_prefix("site ").and_then(|s| s.split_once('/'))
                {
                    out.push(t);
                }
            }
            if self.action == "renew" {
                if let Some((t, _)) = self.actor.split_once('/') {
                    out.push(t);
                }
            }
            out.sort_unstable();
            out.dedup();
            out
        }
    }

    /// `GET /admin/audit?…`: which entries, newest first. Filters combine (all must match);
    /// `actor` and `action` match a part of the text, `since`/`until` are Unix seconds
    /// (inclusive). The service filters the newest [`AUDIT_WINDOW`] entries.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AuditQuery {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub limit: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tenant: Option<TenantId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub actor: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub action: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub since: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub until: Option<i64>,
    }

    /// How many of the newest audit entries a filtered query looks at.
    pub const AUDIT_WINDOW: usize = 10_000;

    impl AuditQuery {
        pub fn matches(&self, r: &AuditRecord) -> bool {
            self.tenant
                .as_ref()
                .is_none_or(|t| r.tenants().contains(&t.as_str()))
                && self
                    .actor
                    .as_ref()
                    .is_none_or(|a| r.actor.contains(a.as_str()))
                && self
                    .action
                    .as_ref()
                    .is_none_or(|a| r.action.contains(a.as_str()))
                && self.since.is_none_or(|s| r.at >= s)
                && self.until.is_none_or(|u| r.at <= u)
        }
    }

    /// The published policy bundle, without its bytes.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PublishedPolicyInfo {
        pub version: u64,
        /// The signing key's id.
        pub key_id: String,
        pub published_at: i64,
    }

    /// The published policy bundle as gateways get it, with the key to verify it with.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PolicyBundleResponse {
        pub info: PublishedPolicyInfo,
        /// The signed bundle, standard base64.
        pub bundle: String,
        /// The signing key bootstrap files carry now (base64), when the service has one.
        pub policy_public_key: Option<String>,
        /// The bundle published before this one (the console shows what changed); `None` for
        /// the first one, and from a service that keeps no history.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub previous: Option<PreviousBundle>,
    }

    /// A bundle published before the one in force.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PreviousBundle {
        pub version: u64,
        /// The signed bundle, standard base64.
        pub bundle: String,
        /// The signing key's id (after a key rotation not the current key's).
        pub key_id: String,
        pub published_at: i64,
    }

    /// What the service knows of its fleet: every valid identity (appliances, hubs, home
    /// offices) with its certificate's expiry, and the policy in force.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct FleetResponse {
        /// The service's clock (Unix seconds), for "expires in".
        pub now: i64,
        pub registry_version: u64,
        /// The policy version handed out with enrollments.
        pub policy_version: u64,
        pub published_policy: Option<PublishedPolicyInfo>,
        /// Every valid identity, admitted or (an MFA-gated home office) waiting for its window.
        pub peers: Vec<Identity>,
        /// Tenants whose home offices are MFA-gated, with their window (seconds).
        #[serde(default)]
        pub mfa_windows: BTreeMap<TenantId, u64>,
        /// Each hub's last report of its peers (handshakes, refusals), oldest hub first.
        #[serde(default)]
        pub hub_reports: Vec<HubReportSeen>,
        /// The policy version each appliance last said it holds.
        #[serde(default)]
        pub policy_held: Vec<PolicyHeld>,
    }

    /// An appliance's policy version, as it said when it last polled for a newer one.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PolicyHeld {
        pub tenant: TenantId,
        pub site: SiteId,
        pub version: u64,
        /// When it said so (Unix seconds).
        pub at: i64,
    }

    /// A hub's last report as the service keeps it.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HubReportSeen {
        /// The hub.
        pub tenant: TenantId,
        pub site: SiteId,
        /// When the service took it (Unix seconds).
        pub at: i64,
        pub report: crate::status::HubReport,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PolicyVersionRequest {
        pub version: u64,
    }

    /// What `policy-publish` did.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PolicyPublishResponse {
        pub version: u64,
        /// The policy's name (`[policy] name` in operator.toml).
        pub name: String,
        /// The signing key's id (first 16 hex digits of its SHA-256).
        pub key_id: String,
        /// True when exactly this bundle was already published: nothing changed.
        pub unchanged: bool,
    }
}

#[cfg(test)]
mod tests {
    use super::admin::{AuditQuery, AuditRecord};
    use crate::identity::TenantId;
    use serde_json::json;

    fn record(actor: &str, action: &str, details: serde_json::Value) -> AuditRecord {
        AuditRecord {
            id: 1,
            at: 1000,
            actor: actor.into(),
            action: action.into(),
            details,
        }
    }

    #[test]
    fn audit_entries_name_their_tenants_as_each_action_records_them() {
        let token = record(
            "uid:0",
            "token.create",
            json!({"tenant": "tholey", "site": "rathaus"}),
        );
        assert_eq!(token.tenants(), ["tholey"]);
        let by_serial = record(
            "uid:0",
            "revoke",
            json!({"selector": "serial 5f", "tenants": ["nohfelden", "tholey"]}),
        );
        assert_eq!(by_serial.tenants(), ["nohfelden", "tholey"]);
        let older = record("uid:0", "revoke", json!({"selector": "site tholey/bauhof"}));
        assert_eq!(older.tenants(), ["tholey"]);
        let whole = record("uid:0", "revoke", json!({"selector": "tenant marpingen"}));
        assert_eq!(whole.tenants(), ["marpingen"]);
        let renew = record("tholey/rathaus", "renew", json!({"serial": "ab"}));
        assert_eq!(renew.tenants(), ["tholey"]);
        let policy = record("uid:0", "policy.publish", json!({"version": 3}));
        assert!(policy.tenants().is_empty(), "operators only");
    }

    #[test]
    fn audit_filters_combine() {
        let r = record(
            "tom (oidc sub 7) via uid:0",
            "token.create",
            json!({"tenant": "tholey"}),
        );
        let tholey = TenantId::parse("tholey").expect("name");
        let q = |f: fn(&mut AuditQuery)| {
            let mut q = AuditQuery::default();
            f(&mut q);
            q
        };
        assert!(AuditQuery::default().matches(&r));
        assert!(q(|q| q.actor = Some("tom (oidc".into())).matches(&r));
        assert!(!q(|q| q.actor = Some("nina".into())).matches(&r));
        assert!(q(|q| q.action = Some("token".into())).matches(&r));
        assert!(
            q(|q| q.since = Some(1000)).matches(&r),
            "since is inclusive"
        );
        assert!(!q(|q| q.until = Some(999)).matches(&r));
        let mut both = q(|q| q.action = Some("token.create".into()));
        both.tenant = Some(tholey);
        assert!(both.matches(&r));
        both.tenant = Some(TenantId::parse("nohfelden").expect("name"));
        assert!(!both.matches(&r));
    }
}
