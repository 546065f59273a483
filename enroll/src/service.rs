//! The enrollment service's decisions, without HTTP: tokens, enroll, renew, revoke, home-office
//! identities, the registry and the CRL. `server` calls these from blocking tasks; tests and
//! benchmarks can call them directly.
//!
//! Time comes from a [`Clock`], so a test can walk a certificate through its renewal window.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use komnet_policy::bundle::{self, BundleError};
use komnet_policy::CompiledPolicy;
use parking_lot::Mutex;
use serde_json::json;
use x25519_dalek::StaticSecret;

use crate::api::admin::{
    CreateTokenRequest, CreateTokenResponse, HomeOfficeRequest, HomeOfficeResponse,
    PolicyPublishResponse, RevokeRequest, RevokeResponse,
};
use crate::api::{
    ApiError, EnrollRequest, EnrollResponse, ErrorCode, HubPeer, RegistryChange, RenewRequest,
    RevocationReason, ServiceInfo,
};
use crate::ca::{self, CaError, CertificateAuthority, Issued, LeafSpec};
use crate::config::{decode_policy_public_key, Config, ConfigError, CONFIG_FILE};
use crate::csr::{CsrError, VerifiedCsr};
use crate::identity::{Identity, Role, SiteId, TenantId, WgPublicKey};
use crate::store::{
    CertStatus, CertificateRecord, PublishedPolicy, Selector, SqliteStore, Store, StoreError,
    TokenRecord, Txn,
};
use crate::token::{NewToken, PresentedToken};
use crate::wgproof;

/// File of the service's static X25519 key for WireGuard possession proofs.
pub const WG_PROOF_KEY: &str = "enroll-dh.key";
/// Where the service follows policy signing-key rotations (see [`bundle::BundleStore`]).
pub const POLICY_KEYS_DIR: &str = "policy-keys";

/// Where "now" comes from (Unix seconds).
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// A clock a test sets and advances; starts at the system time.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock(AtomicI64::new(SystemClock.now()))
    }
}

impl ManualClock {
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
    pub fn set(&self, unix: i64) {
        self.0.store(unix, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn err(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        err(ErrorCode::Internal, "internal store error")
    }
}

impl From<CaError> for ApiError {
    fn from(e: CaError) -> Self {
        tracing::error!(error = %e, "CA failure");
        err(ErrorCode::Internal, "internal CA error")
    }
}

/// A bundle refused at publishing, or a stored one that no longer loads.
fn bundle_error(e: BundleError) -> ApiError {
    let code = match e {
        BundleError::BadSignature { .. } => ErrorCode::PolicySignatureInvalid,
        BundleError::Rollback { .. } | BundleError::BelowFloor { .. } => ErrorCode::PolicyRollback,
        BundleError::NotYetValid { .. } | BundleError::Expired { .. } => ErrorCode::PolicyInvalid,
        BundleError::SameVersionDifferentContent(_) => ErrorCode::PolicyVersionReused,
        BundleError::Io { .. } | BundleError::Key(_) => ErrorCode::Internal,
        BundleError::Format(_) | BundleError::Invalid(_) | BundleError::Load(_) => {
            ErrorCode::PolicyInvalid
        }
    };
    err(code, e.to_string())
}

fn no_policy_key() -> ApiError {
    err(
        ErrorCode::PolicyKeyMissing,
        "no policy_public_key in enroll.toml: set it to the content of the .pub file \
         `komnet policy keygen` wrote (or run init with --policy-public-key), then restart \
         komnet-enroll",
    )
}

impl From<CsrError> for ApiError {
    fn from(e: CsrError) -> Self {
        let code = match e {
            CsrError::Invalid(_) => ErrorCode::CsrInvalid,
            CsrError::Signature => ErrorCode::CsrSignatureInvalid,
            CsrError::KeyType(_) => ErrorCode::CsrKeyType,
            CsrError::IdentityMismatch { .. } => ErrorCode::CsrIdentityMismatch,
        };
        err(code, e.to_string())
    }
}

/// What `init` created.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub data_dir: PathBuf,
    pub root_fingerprint: String,
    pub root_key: PathBuf,
}

/// `komnet-enroll init`: data directory (0700), `enroll.toml` (kept if present), CA, proof key,
/// database.
pub fn init(data_dir: &Path, config: &Config, now: i64) -> Result<InitReport, OpenError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(data_dir).map_err(|source| OpenError::Io {
        path: data_dir.to_owned(),
        source,
    })?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).map_err(
        |source| OpenError::Io {
            path: data_dir.to_owned(),
            source,
        },
    )?;
    let config_path = data_dir.join(CONFIG_FILE);
    if !config_path.exists() {
        config.check().map_err(|problems| ConfigError::Invalid {
            path: config_path.clone(),
            problems,
        })?;
        std::fs::write(&config_path, config.to_toml()).map_err(|source| OpenError::Io {
            path: config_path.clone(),
            source,
        })?;
    }
    let report = ca::init_ca(data_dir, now)?;
    let secret: [u8; 32] = rand::random();
    ca::write_secret_file(
        &data_dir.join(WG_PROOF_KEY),
        STANDARD.encode(secret).as_bytes(),
    )?;
    SqliteStore::create(data_dir)?;
    Ok(InitReport {
        data_dir: data_dir.to_owned(),
        root_fingerprint: report.root_fingerprint,
        root_key: report.root_key,
    })
}

/// The service: configuration, CA, store, proof key and clock.
pub struct Service {
    pub config: Config,
    pub ca: CertificateAuthority,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    wg_proof_secret: StaticSecret,
    pub wg_proof_public: WgPublicKey,
    crl_cache: Mutex<Option<CachedCrl>>,
    /// The decoded `policy_public_key`.
    policy_key: Option<Vec<u8>>,
    /// The policy signing keys followed from `policy_public_key` through announced rotations
    /// (`DATA_DIR/policy-keys/`): which keys a published bundle may be signed with, and which
    /// key bootstrap files carry.
    policy_keys: Option<bundle::BundleStore>,
    policy_cache: Mutex<PolicyCache>,
}

/// The published bundle's bytes (served to every gateway that polls) and its compiled policy
/// (needed for home-office addresses and token checks), so neither is re-read from SQLite or
/// re-verified on each request. Keyed by version: a version names exactly one bundle, since
/// publishing refuses the same version with other bytes.
#[derive(Default)]
struct PolicyCache {
    /// `Bytes`: every answer shares the one copy.
    bundle: Option<(u64, Bytes)>,
    compiled: Option<Arc<CompiledPolicy>>,
}

/// What `GET /v1/policy` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyAnswer {
    /// The caller has the published version.
    NotModified {
        version: u64,
    },
    Bundle {
        version: u64,
        bytes: Bytes,
    },
}

struct CachedCrl {
    registry_version: u64,
    made_at: i64,
    der: Arc<Vec<u8>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("ca", &self.ca)
            .field("wg_proof_public", &self.wg_proof_public)
            .finish_non_exhaustive()
    }
}

/// CRLs are re-signed when revocations change and at least this often.
const CRL_REFRESH_SECS: i64 = 3600;
const CRL_VALIDITY_SECS: i64 = 2 * 86_400;

impl Service {
    /// Opens the data directory `init` created.
    pub fn open(data_dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, OpenError> {
        let config = Config::load(data_dir)?;
        Self::open_with_config(data_dir, config, clock)
    }

    /// Like [`Service::open`] with a configuration given in code (tests, benchmarks).
    pub fn open_with_config(
        data_dir: &Path,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, OpenError> {
        let ca = CertificateAuthority::load(data_dir)?;
        let key_path = data_dir.join(WG_PROOF_KEY);
        let text = std::fs::read_to_string(&key_path).map_err(|source| OpenError::Io {
            path: key_path.clone(),
            source,
        })?;
        let bytes: [u8; 32] = STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| OpenError::Key {
                path: key_path.clone(),
                message: "not 32 bytes of base64".into(),
            })?;
        let wg_proof_secret = StaticSecret::from(bytes);
        let wg_proof_public =
            WgPublicKey::from_bytes(x25519_dalek::PublicKey::from(&wg_proof_secret).to_bytes())
                .map_err(|e| OpenError::Key {
                    path: key_path.clone(),
                    message: e.to_string(),
                })?;
        let policy_key = config
            .policy_public_key
            .as_deref()
            .map(decode_policy_public_key)
            .transpose()
            .map_err(|e| ConfigError::Invalid {
                path: data_dir.join(CONFIG_FILE),
                problems: vec![format!("policy_public_key: {e}")],
            })?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data_dir)?);
        Ok(Service {
            config,
            ca,
            store,
            clock,
            wg_proof_secret,
            wg_proof_public,
            crl_cache: Mutex::new(None),
            policy_keys: policy_key
                .clone()
                .map(|k| bundle::BundleStore::new(data_dir.join(POLICY_KEYS_DIR), k)),
            policy_key,
            policy_cache: Mutex::new(PolicyCache::default()),
        })
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    pub fn info(&self) -> ServiceInfo {
        ServiceInfo {
            root_ca_pem: self.ca.root_pem.clone(),
            issuing_ca_pem: self.ca.issuing_pem.clone(),
            root_fingerprint: self.ca.root_fingerprint.clone(),
            wg_proof_public_key: self.wg_proof_public,
        }
    }

    /// Creates a one-time token bound to tenant, site and role.
    pub fn create_token(
        &self,
        req: &CreateTokenRequest,
        actor: &str,
    ) -> Result<CreateTokenResponse, ApiError> {
        if req.ttl_secs < 60 || req.ttl_secs > 30 * 86_400 {
            return Err(err(
                ErrorCode::BadRequest,
                format!("ttl of {}s: must lie between 1m and 30d", req.ttl_secs),
            ));
        }
        let now = self.now();
        let token = NewToken::generate();
        let expires_at = now + req.ttl_secs as i64;
        let mut txn = self.store.begin()?;
        // A spoke the policy does not know would be refused by every hub; say so now, while
        // the token is being made, not when the technician stands in the town hall. Hubs are
        // the data centre's own and not in the tenants' policy.
        if req.role == Role::Spoke {
            if let Some(compiled) = self.compiled_policy_in(&mut *txn)? {
                let policy = &compiled.policy;
                let tenant = policy.tenant_by_name(req.tenant.as_str()).ok_or_else(|| {
                    err(
                        ErrorCode::NotInPolicy,
                        format!(
                            "tenant {} is not in the published policy (version {}): a spoke's \
                             tenant and site must be in it",
                            req.tenant, policy.version
                        ),
                    )
                })?;
                if policy.site_by_name(tenant, req.site.as_str()).is_none() {
                    return Err(err(
                        ErrorCode::NotInPolicy,
                        format!(
                            "tenant {} has no site {} in the published policy (version {})",
                            req.tenant, req.site, policy.version
                        ),
                    ));
                }
            }
        }
        txn.insert_token(&TokenRecord {
            id: token.id.clone(),
            secret_hash: token.secret_hash.clone(),
            tenant: req.tenant.clone(),
            site: req.site.clone(),
            role: req.role,
            created_at: now,
            expires_at,
            used_at: None,
            created_by: actor.to_owned(),
        })?;
        txn.audit(
            now,
            actor,
            "token.create",
            &json!({"token_id": token.id, "tenant": req.tenant, "site": req.site,
                    "role": req.role, "expires_at": expires_at}),
        )?;
        txn.commit()?;
        Ok(CreateTokenResponse {
            token: token.text,
            token_id: token.id,
            expires_at,
            enroll_urls: self.config.enroll_urls.clone(),
            root_ca_pem: self.ca.root_pem.clone(),
            root_fingerprint: self.ca.root_fingerprint.clone(),
            wg_proof_public_key: self.wg_proof_public,
            policy_public_key: self.current_policy_key(),
        })
    }

    /// Checks the request parts that need no store: CSR, WireGuard key, possession proof.
    fn check_keys(
        &self,
        csr_b64: &str,
        wg_b64: &str,
        proof_b64: &str,
    ) -> Result<(VerifiedCsr, WgPublicKey), ApiError> {
        let csr_der = STANDARD
            .decode(csr_b64)
            .map_err(|e| err(ErrorCode::CsrInvalid, format!("csr: not base64: {e}")))?;
        let csr = VerifiedCsr::from_der(&csr_der)?;
        let wg = WgPublicKey::from_base64(wg_b64)
            .map_err(|e| err(ErrorCode::WgKeyInvalid, format!("wg_public_key: {e}")))?;
        let proof = STANDARD.decode(proof_b64).map_err(|e| {
            err(
                ErrorCode::WgProofInvalid,
                format!("wg_proof: not base64: {e}"),
            )
        })?;
        wgproof::verify(&self.wg_proof_secret, &wg, &csr_der, &proof)
            .map_err(|e| err(ErrorCode::WgProofInvalid, format!("wg_proof: {e}")))?;
        Ok((csr, wg))
    }

    /// The tunnel addresses of a site: its host number in its tenant's pools.
    fn allocate_addresses(
        &self,
        txn: &mut dyn Txn,
        tenant: &TenantId,
        site: &SiteId,
    ) -> Result<Vec<IpNet>, ApiError> {
        let c = &self.config;
        let v4_pools = 1u64 << (c.tenant_prefix_v4 - c.tunnel_pool_v4.prefix_len());
        let v6_pools = c
            .tunnel_pool_v6
            .map(|p| 1u64 << (c.tenant_prefix_v6 - p.prefix_len()).min(63))
            .unwrap_or(u64::MAX);
        let exhausted = |what: &str| {
            err(
                ErrorCode::AddressPoolExhausted,
                format!("tenant {tenant}: {what}"),
            )
        };
        let pool = txn
            .tenant_pool(tenant, v4_pools.min(v6_pools))
            .map_err(ApiError::from)?
            .ok_or_else(|| exhausted("no free tenant pool left in tunnel_pool_v4/v6"))?;
        let v4_hosts = (1u64 << (32 - c.tenant_prefix_v4)) - 2;
        let host = txn
            .site_host(tenant, site, v4_hosts)
            .map_err(ApiError::from)?
            .ok_or_else(|| exhausted("its pool has no free address"))?;
        let base4 = u32::from(c.tunnel_pool_v4.network()) as u64;
        let v4 = base4 + (pool << (32 - c.tenant_prefix_v4)) + host;
        let mut out = vec![IpNet::V4(Ipv4Net::from(Ipv4Addr::from(v4 as u32)))];
        if let Some(p6) = c.tunnel_pool_v6 {
            let base6 = u128::from(p6.network());
            let v6 = base6 + ((pool as u128) << (128 - c.tenant_prefix_v6)) + host as u128;
            out.push(IpNet::V6(Ipv6Net::from(Ipv6Addr::from(v6))));
        }
        Ok(out)
    }

    /// The valid hubs, ordered by site, each with its configured endpoint.
    pub fn hub_peers(&self, now: i64) -> Result<Vec<HubPeer>, ApiError> {
        let mut hubs: Vec<HubPeer> = self
            .store
            .hubs(now)?
            .into_iter()
            .map(|h| HubPeer {
                endpoint: self.config.hub_endpoints.get(&h.site).cloned(),
                site: h.site,
                wg_public_key: h.wg_public_key,
                tunnel_addrs: h.tunnel_addrs,
            })
            .collect();
        // The store orders by (tenant, site); endpoints are keyed by site alone.
        hubs.sort_by(|a, b| a.site.cmp(&b.site));
        Ok(hubs)
    }

    fn response_for(
        &self,
        issued: &Issued,
        identity: Identity,
        issued_at: i64,
    ) -> Result<EnrollResponse, ApiError> {
        let hubs = self.hub_peers(self.now())?;
        Ok(EnrollResponse {
            renew_after: renew_after(issued_at, identity.not_after),
            certificate_chain_pem: format!("{}{}", issued.pem, self.ca.issuing_pem),
            identity,
            hub_endpoints: self.config.hub_endpoints.values().cloned().collect(),
            hubs,
            allowed_ips: self.config.allowed_ips.clone(),
            policy_version: self.store.policy_version()?,
        })
    }

    /// Supersedes whatever valid certificate the site has (a re-enrollment replaces the old
    /// appliance) and checks the WireGuard key is not another site's. A superseded certificate
    /// with another WireGuard key is removed from the registry: the replaced box (stolen, lost,
    /// broken) must not keep its access until its certificate runs out. One with the same key
    /// is replaced by the new certificate's upsert.
    fn make_room(
        &self,
        txn: &mut dyn Txn,
        tenant: &TenantId,
        site: &SiteId,
        wg: &WgPublicKey,
        now: i64,
    ) -> Result<Vec<String>, ApiError> {
        if let Some(holder) = txn.valid_certificate_for_key(wg)? {
            if holder.identity.tenant != *tenant || holder.identity.site != *site {
                return Err(err(
                    ErrorCode::WgKeyInUse,
                    "wg_public_key: this WireGuard key belongs to another valid identity",
                ));
            }
        }
        let mut superseded = Vec::new();
        for old in txn.valid_certificates(&Selector::Site(tenant.clone(), site.clone()))? {
            let id = &old.identity;
            txn.end_certificate(
                &id.serial,
                CertStatus::Superseded,
                now,
                RevocationReason::Superseded,
            )?;
            if id.wg_public_key != *wg {
                txn.append_event(
                    RegistryChange::Remove {
                        tenant: id.tenant.clone(),
                        site: id.site.clone(),
                        role: id.role,
                        serial: id.serial.clone(),
                        wg_public_key: id.wg_public_key,
                        reason: RevocationReason::Superseded,
                    },
                    now,
                )?;
            }
            superseded.push(old.identity.serial);
        }
        Ok(superseded)
    }

    /// Issues, records and publishes one identity inside `txn`.
    #[allow(clippy::too_many_arguments)]
    fn issue_in(
        &self,
        txn: &mut dyn Txn,
        tenant: &TenantId,
        site: &SiteId,
        role: Role,
        wg: &WgPublicKey,
        addrs: Vec<IpNet>,
        spki: Option<&[u8]>,
        lifetime_secs: i64,
        now: i64,
    ) -> Result<(Issued, Identity), ApiError> {
        let spec = LeafSpec {
            tenant,
            site,
            role,
            wg_public_key: wg,
            tunnel_addrs: &addrs,
            not_before: now - ca::CLOCK_SKEW_SECS,
            not_after: now + lifetime_secs,
        };
        let issued = match spki {
            Some(spki) => self.ca.issue_identity(spki, &spec)?,
            None => self.ca.issue_identity_with_throwaway_key(&spec)?,
        };
        let not_after = spec.not_after;
        let identity = Identity {
            tenant: tenant.clone(),
            site: site.clone(),
            role,
            wg_public_key: *wg,
            tunnel_addrs: addrs,
            not_after,
            serial: issued.serial.clone(),
        };
        txn.insert_certificate(&CertificateRecord {
            identity: identity.clone(),
            not_before: now,
            status: CertStatus::Valid,
            revoked_at: None,
            reason: None,
            der: issued.der.to_vec(),
        })?;
        txn.append_event(RegistryChange::Upsert(identity.clone()), now)?;
        Ok((issued, identity))
    }

    /// `simpleenroll`: token + CSR + WireGuard key → identity, in one transaction.
    pub fn enroll(&self, req: &EnrollRequest, source: &str) -> Result<EnrollResponse, ApiError> {
        let presented = PresentedToken::parse(&req.token)
            .map_err(|e| err(ErrorCode::TokenInvalid, format!("token: {e}")))?;
        let (csr, wg) = self.check_keys(&req.csr, &req.wg_public_key, &req.wg_proof)?;
        let now = self.now();
        let mut txn = self.store.begin()?;
        let token = match txn.token(&presented.id)? {
            Some(t) if presented.matches(&t.secret_hash) => t,
            _ => {
                return Err(err(
                    ErrorCode::TokenInvalid,
                    "token: unknown or wrong secret",
                ))
            }
        };
        if token.used_at.is_some() {
            // The answer to the first use may have been lost (service killed after the commit,
            // connection dropped): the same appliance asking again with the same key and CSR
            // key gets the same certificate, not a trip to the town hall.
            if let Some((issued, identity, issued_at)) =
                self.answer_again(&mut *txn, &token.id, &csr, &wg, now)?
            {
                txn.audit(
                    now,
                    &format!("appliance@{source}"),
                    "enroll.retry",
                    &json!({"token_id": token.id, "serial": identity.serial}),
                )?;
                txn.commit()?;
                return self.response_for(&issued, identity, issued_at);
            }
            return Err(err(
                ErrorCode::TokenUsed,
                "token: already used; tokens are single-use (a retry is answered only with the \
                 same WireGuard key and CSR key as the first use, while that certificate is valid)",
            ));
        }
        if now >= token.expires_at {
            return Err(err(
                ErrorCode::TokenExpired,
                format!("token: expired {}s ago", now - token.expires_at),
            ));
        }
        csr.check_identity(&token.tenant, &token.site, token.role)?;
        if token.role == Role::HomeOffice {
            return Err(err(
                ErrorCode::BadRequest,
                "token: home-office identities are issued with `komnet homeoffice issue`",
            ));
        }
        if !txn.use_token(&token.id, now)? {
            return Err(err(
                ErrorCode::TokenUsed,
                "token: already used; tokens are single-use",
            ));
        }
        let superseded = self.make_room(&mut *txn, &token.tenant, &token.site, &wg, now)?;
        let lifetime = self.config.cert_lifetime.0.as_secs() as i64;
        let addrs = self.allocate_addresses(&mut *txn, &token.tenant, &token.site)?;
        let (issued, identity) = self.issue_in(
            &mut *txn,
            &token.tenant,
            &token.site,
            token.role,
            &wg,
            addrs,
            Some(&csr.spki_der),
            lifetime,
            now,
        )?;
        txn.set_token_certificate(&token.id, &identity.serial)?;
        txn.audit(
            now,
            &format!("appliance@{source}"),
            "enroll",
            &json!({"token_id": token.id, "serial": identity.serial, "tenant": identity.tenant,
                    "site": identity.site, "role": identity.role,
                    "wg_public_key": identity.wg_public_key, "tunnel_addrs": identity.tunnel_addrs,
                    "superseded": superseded}),
        )?;
        txn.commit()?;
        self.response_for(&issued, identity, now)
    }

    /// The certificate of a token's first use again, when the request carries the same
    /// WireGuard key and CSR key and the certificate is still the site's valid one. (The answer
    /// is made after the commit: it reads the store.)
    fn answer_again(
        &self,
        txn: &mut dyn Txn,
        token_id: &str,
        csr: &VerifiedCsr,
        wg: &WgPublicKey,
        now: i64,
    ) -> Result<Option<(Issued, Identity, i64)>, ApiError> {
        let Some(serial) = txn.token_certificate(token_id)? else {
            return Ok(None);
        };
        let Some(cert) = txn.certificate(&serial)? else {
            return Ok(None);
        };
        if cert.status != CertStatus::Valid
            || cert.identity.not_after <= now
            || cert.identity.wg_public_key != *wg
        {
            return Ok(None);
        }
        let same_key = x509_parser::parse_x509_certificate(&cert.der)
            .map(|(_, c)| c.public_key().raw == csr.spki_der.as_slice())
            .unwrap_or(false);
        if !same_key {
            return Ok(None);
        }
        let der = rustls_pki_types::CertificateDer::from(cert.der.clone());
        let pem = pem_certificate(&cert.der);
        let issued = Issued {
            der,
            pem,
            serial: cert.identity.serial.clone(),
        };
        Ok(Some((issued, cert.identity, cert.not_before)))
    }

    /// Checks a client certificate presented over mutual TLS against the store.
    pub fn check_client_certificate(&self, der: &[u8]) -> Result<CertificateRecord, ApiError> {
        let ident = crate::identity::from_certificate_der(der).map_err(|e| {
            err(
                ErrorCode::CertificateRequired,
                format!("client certificate: {e}"),
            )
        })?;
        let record = self.store.certificate(&ident.serial)?.ok_or_else(|| {
            err(
                ErrorCode::CertificateRevoked,
                "client certificate: serial unknown to this CA",
            )
        })?;
        match record.status {
            CertStatus::Revoked => {
                return Err(err(
                    ErrorCode::CertificateRevoked,
                    format!(
                        "client certificate {} was revoked ({})",
                        record.identity.serial,
                        record
                            .reason
                            .unwrap_or(RevocationReason::Unspecified)
                            .as_str()
                    ),
                ))
            }
            CertStatus::Superseded => {
                return Err(err(
                    ErrorCode::CertificateSuperseded,
                    format!(
                        "client certificate {} was replaced by a renewal",
                        record.identity.serial
                    ),
                ))
            }
            CertStatus::Valid => {}
        }
        if self.now() >= record.identity.not_after {
            return Err(err(
                ErrorCode::CertificateExpired,
                format!(
                    "client certificate {} expired; enroll again with a new token",
                    record.identity.serial
                ),
            ));
        }
        Ok(record)
    }

    /// `simplereenroll`: the current certificate (already checked by TLS) buys a new one from
    /// 2/3 of its lifetime on.
    pub fn renew(
        &self,
        client_cert_der: &[u8],
        req: &RenewRequest,
    ) -> Result<EnrollResponse, ApiError> {
        let current = self.check_client_certificate(client_cert_der)?;
        let now = self.now();
        let opens = renew_after(current.not_before, current.identity.not_after);
        if now < opens {
            return Err(err(
                ErrorCode::RenewTooEarly,
                format!("renewal opens in {}s (at 2/3 of the lifetime)", opens - now),
            ));
        }
        let (csr, wg) = self.check_keys(&req.csr, &req.wg_public_key, &req.wg_proof)?;
        let id = &current.identity;
        csr.check_identity(&id.tenant, &id.site, id.role)?;
        let mut txn = self.store.begin()?;
        // Re-read inside the transaction: a revocation or a concurrent renewal may have won.
        match txn.certificate(&id.serial)? {
            Some(c) if c.status == CertStatus::Valid => {}
            _ => {
                return Err(err(
                    ErrorCode::CertificateSuperseded,
                    "client certificate was revoked or renewed meanwhile",
                ))
            }
        }
        self.make_room(&mut *txn, &id.tenant, &id.site, &wg, now)?;
        let lifetime = self.config.cert_lifetime.0.as_secs() as i64;
        let addrs = self.allocate_addresses(&mut *txn, &id.tenant, &id.site)?;
        let (issued, identity) = self.issue_in(
            &mut *txn,
            &id.tenant,
            &id.site,
            id.role,
            &wg,
            addrs,
            Some(&csr.spki_der),
            lifetime,
            now,
        )?;
        txn.audit(
            now,
            &format!("{}/{}", id.tenant, id.site),
            "renew",
            &json!({"old_serial": id.serial, "serial": identity.serial,
                    "wg_key_changed": wg != id.wg_public_key}),
        )?;
        txn.commit()?;
        self.response_for(&issued, identity, now)
    }

    /// Revokes by serial, site or tenant; a decommission (`cessation_of_operation`) also
    /// releases the sites' tunnel addresses.
    pub fn revoke(&self, req: &RevokeRequest, actor: &str) -> Result<RevokeResponse, ApiError> {
        let selector = match (&req.serial, &req.tenant, &req.site) {
            (Some(s), None, None) => Selector::Serial(s.clone()),
            (None, Some(t), None) => Selector::Tenant(t.clone()),
            (None, Some(t), Some(s)) => Selector::Site(t.clone(), s.clone()),
            _ => {
                return Err(err(
                    ErrorCode::BadRequest,
                    "revoke: give either a serial, or a tenant, or a tenant and a site",
                ))
            }
        };
        let now = self.now();
        let mut txn = self.store.begin()?;
        let certs = txn.valid_certificates(&selector)?;
        let release = req.reason == RevocationReason::CessationOfOperation;
        if certs.is_empty() && !(release && matches!(selector, Selector::Site(..))) {
            return Err(err(
                ErrorCode::NothingToRevoke,
                format!("revoke: no valid certificate for {selector}"),
            ));
        }
        let mut serials = Vec::new();
        let mut version = 0;
        for c in &certs {
            let id = &c.identity;
            txn.end_certificate(&id.serial, CertStatus::Revoked, now, req.reason)?;
            version = txn.append_event(
                RegistryChange::Remove {
                    tenant: id.tenant.clone(),
                    site: id.site.clone(),
                    role: id.role,
                    serial: id.serial.clone(),
                    wg_public_key: id.wg_public_key,
                    reason: req.reason,
                },
                now,
            )?;
            if release {
                txn.release_site_host(&id.tenant, &id.site)?;
                txn.release_homeoffice_user(&id.tenant, &id.site)?;
            }
            serials.push(id.serial.clone());
        }
        if let (true, Selector::Site(t, s)) = (release, &selector) {
            txn.release_site_host(t, s)?;
            txn.release_homeoffice_user(t, s)?;
        }
        txn.audit(
            now,
            actor,
            "revoke",
            &json!({"selector": selector.to_string(), "reason": req.reason,
                    "serials": serials, "addresses_released": release}),
        )?;
        txn.commit()?;
        Ok(RevokeResponse {
            revoked_serials: serials,
            registry_version: version,
        })
    }

    /// A home-office device identity for the stock WireGuard app (no CSR, no renewal).
    pub fn issue_homeoffice(
        &self,
        req: &HomeOfficeRequest,
        actor: &str,
    ) -> Result<HomeOfficeResponse, ApiError> {
        let lifetime = match req.ttl_secs {
            Some(s) if !(3600..=400 * 86_400).contains(&s) => {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("ttl of {s}s: must lie between 1h and 400d"),
                ))
            }
            Some(s) => s as i64,
            None => self.config.homeoffice_lifetime.0.as_secs() as i64,
        };
        let now = self.now();
        let hubs = self.hub_peers(now)?;
        if hubs.is_empty() {
            return Err(err(
                ErrorCode::NoHub,
                "no hub is enrolled yet: a home-office configuration needs a hub to connect to",
            ));
        }
        if hubs.iter().all(|h| h.endpoint.is_none()) {
            let sites: Vec<&str> = hubs.iter().map(|h| h.site.as_str()).collect();
            return Err(err(
                ErrorCode::NoHub,
                format!(
                    "no enrolled hub has an endpoint: add SITE = \"host:port\" under \
                     [hub_endpoints] in enroll.toml for one of the hubs {} and restart",
                    sites.join(", ")
                ),
            ));
        }
        let mut txn = self.store.begin()?;
        let compiled = self.compiled_policy_in(&mut *txn)?.ok_or_else(|| {
            err(
                ErrorCode::NoPolicy,
                "no policy bundle is published yet: home-office addresses come from the \
                 tenant's home-office pool in the policy; publish one with \
                 `komnet policy-publish BUNDLE`",
            )
        })?;
        let superseded =
            self.make_room(&mut *txn, &req.tenant, &req.user, &req.wg_public_key, now)?;
        let addrs = allocate_homeoffice(
            &mut *txn,
            &compiled.policy,
            &req.tenant,
            &req.user,
            now + lifetime,
            now,
        )?;
        let (issued, identity) = self.issue_in(
            &mut *txn,
            &req.tenant,
            &req.user,
            Role::HomeOffice,
            &req.wg_public_key,
            addrs,
            None,
            lifetime,
            now,
        )?;
        txn.audit(
            now,
            actor,
            "homeoffice.issue",
            &json!({"serial": identity.serial, "tenant": identity.tenant, "user": identity.site,
                    "wg_public_key": identity.wg_public_key, "tunnel_addrs": identity.tunnel_addrs,
                    "policy_version": compiled.policy.version, "superseded": superseded}),
        )?;
        txn.commit()?;
        Ok(HomeOfficeResponse {
            enrollment: self.response_for(&issued, identity, now)?,
        })
    }

    /// The policy key new appliances pin: the configured one, or the one it rotated to.
    fn current_policy_key(&self) -> Option<String> {
        match &self.policy_keys {
            Some(store) => store.accepted_keys().first().map(|k| STANDARD.encode(k)),
            None => None,
        }
    }

    /// The keys a bundle may be signed with: the current one and an announced successor.
    /// The published bundle's validity window (`not_before` or its publication time,
    /// `expires`), when it has an expiry.
    pub fn published_policy_validity(&self) -> Option<(i64, i64)> {
        let published = self.store.published_policy().ok()??;
        let verified = bundle::verify_any(&published.bytes, &self.accepted_policy_keys()).ok()?;
        Some((
            verified.not_before.unwrap_or(published.published_at),
            verified.expires?,
        ))
    }

    fn accepted_policy_keys(&self) -> Vec<Vec<u8>> {
        self.policy_keys
            .as_ref()
            .map(bundle::BundleStore::accepted_keys)
            .unwrap_or_default()
    }

    /// Verifies, compiles and publishes a signed policy bundle: it is then served at
    /// `/v1/policy`, and its version is handed out with enrollments. Refuses a bundle that does
    /// not verify with `policy_public_key` or does not compile, a lower version than the
    /// published one, and the published version with other bytes. Publishing the published
    /// bundle again changes nothing.
    pub fn publish_policy(
        &self,
        bytes: &[u8],
        actor: &str,
    ) -> Result<PolicyPublishResponse, ApiError> {
        self.policy_key.as_deref().ok_or_else(no_policy_key)?;
        // Verified and compiled before the transaction: compiling runs the policy's tests and
        // should not hold the store's write lock.
        let verified =
            bundle::verify_any(bytes, &self.accepted_policy_keys()).map_err(bundle_error)?;
        let key_id = bundle::key_id(&verified.signed_by);
        // Gateways would refuse it: refuse it here, where the operator sees why.
        verified.check_time(self.now()).map_err(bundle_error)?;
        let compiled = Arc::new(verified.compile().map_err(bundle_error)?);
        let response = PolicyPublishResponse {
            version: verified.version,
            name: verified.name.clone(),
            key_id: key_id.clone(),
            unchanged: false,
        };
        let now = self.now();
        let mut txn = self.store.begin()?;
        if let Some(current) = txn.published_policy()? {
            if verified.version < current.version {
                return Err(err(
                    ErrorCode::PolicyRollback,
                    format!(
                        "bundle version {} is older than the published version {}: refusing \
                         a rollback (to undo a change, publish the old policy as version {})",
                        verified.version,
                        current.version,
                        current.version + 1
                    ),
                ));
            }
            if verified.version == current.version {
                if current.bytes != bytes {
                    return Err(err(
                        ErrorCode::PolicyVersionReused,
                        format!(
                            "version {} is already published with other content: a changed \
                             policy needs a new version in operator.toml",
                            verified.version
                        ),
                    ));
                }
                return Ok(PolicyPublishResponse {
                    unchanged: true,
                    ..response
                });
            }
        }
        txn.publish_policy(&PublishedPolicy {
            version: verified.version,
            bytes: bytes.to_vec(),
            key_id: key_id.clone(),
            published_at: now,
        })?;
        txn.set_policy_version(verified.version)?;
        txn.audit(
            now,
            actor,
            "policy.publish",
            &json!({"version": verified.version, "key_id": key_id, "name": verified.name,
                    "bytes": bytes.len()}),
        )?;
        txn.commit()?;
        if let Some(store) = &self.policy_keys {
            // Follows an announced or completed key rotation. The database has the bundle
            // already; a failure here only delays the rotation until the next publish.
            let before = store.accepted_keys();
            match store.commit(&verified) {
                Ok(()) if store.accepted_keys() != before => tracing::info!(
                    keys = ?store.accepted_keys().iter().map(|k| bundle::key_id(k)).collect::<Vec<_>>(),
                    "policy signing keys changed: bundles are accepted with these keys, \
                     bootstrap files carry the first; set policy_public_key in enroll.toml to it \
                     once the rotation is complete"
                ),
                Ok(()) => {}
                Err(e) => tracing::error!(error = %e, "cannot record the policy signing keys"),
            }
        }
        let mut cache = self.policy_cache.lock();
        cache.bundle = Some((verified.version, Bytes::copy_from_slice(bytes)));
        cache.compiled = Some(compiled);
        Ok(response)
    }

    /// The published bundle for a caller that has version `have`.
    pub fn policy_bundle(&self, have: Option<u64>) -> Result<PolicyAnswer, ApiError> {
        let version = self.store.published_policy_version()?.ok_or_else(|| {
            err(
                ErrorCode::NoPolicy,
                "no policy bundle is published yet; try again later",
            )
        })?;
        if have == Some(version) {
            return Ok(PolicyAnswer::NotModified { version });
        }
        if let Some((v, bytes)) = &self.policy_cache.lock().bundle {
            if *v == version {
                return Ok(PolicyAnswer::Bundle {
                    version,
                    bytes: bytes.clone(),
                });
            }
        }
        // Read without the cache lock: a bundle can be megabytes.
        let published = self
            .store
            .published_policy()?
            .ok_or_else(|| err(ErrorCode::NoPolicy, "no policy bundle is published yet"))?;
        let bytes = Bytes::from(published.bytes);
        self.policy_cache.lock().bundle = Some((published.version, bytes.clone()));
        Ok(PolicyAnswer::Bundle {
            version: published.version,
            bytes,
        })
    }

    /// The compiled published policy as `txn` sees it; `None` when none is published. Read
    /// inside the caller's transaction so a decision and what it writes rest on one version.
    fn compiled_policy_in(
        &self,
        txn: &mut dyn Txn,
    ) -> Result<Option<Arc<CompiledPolicy>>, ApiError> {
        let Some(version) = txn.published_policy_version()? else {
            return Ok(None);
        };
        if let Some(c) = &self.policy_cache.lock().compiled {
            if c.policy.version == version {
                return Ok(Some(c.clone()));
            }
        }
        // Once per version after a start: the store is not trusted more than the wire, so the
        // bundle is verified again with the configured key.
        let published = txn
            .published_policy()?
            .ok_or_else(|| err(ErrorCode::Internal, "published policy vanished"))?;
        if self.policy_key.is_none() {
            return Err(err(
                ErrorCode::PolicyKeyMissing,
                format!(
                    "policy version {version} is published but enroll.toml has no \
                     policy_public_key to verify it with: set it and restart komnet-enroll"
                ),
            ));
        }
        let loaded = bundle::verify_any(&published.bytes, &self.accepted_policy_keys())
            .and_then(|b| b.compile());
        let compiled = Arc::new(loaded.map_err(|e| {
            let mut e = bundle_error(e);
            e.message = format!(
                "the published policy bundle (version {version}) does not load: {}; publish a \
                 bundle signed with the configured policy_public_key",
                e.message
            );
            e
        })?);
        self.policy_cache.lock().compiled = Some(compiled.clone());
        Ok(Some(compiled))
    }

    /// Sets the policy version handed out with enrollments by hand (publishing a bundle sets
    /// it too; this stays for policies distributed some other way).
    pub fn set_policy_version(&self, version: u64, actor: &str) -> Result<(), ApiError> {
        let now = self.now();
        let mut txn = self.store.begin()?;
        txn.set_policy_version(version)?;
        txn.audit(now, actor, "policy.version", &json!({"version": version}))?;
        txn.commit()?;
        Ok(())
    }

    /// The DER CRL, re-signed when a revocation happened or an hour passed.
    pub fn crl(&self) -> Result<Arc<Vec<u8>>, ApiError> {
        let now = self.now();
        let version = self.store.registry_version()?;
        let mut cache = self.crl_cache.lock();
        if let Some(c) = cache.as_ref() {
            if c.registry_version == version && now - c.made_at < CRL_REFRESH_SECS {
                return Ok(c.der.clone());
            }
        }
        let revoked = self.store.revoked_unexpired(now)?;
        // CRL numbers must grow: the registry version dominates, the time breaks ties.
        let number = (version << 32) | (now as u64 & 0xffff_ffff);
        let der = Arc::new(self.ca.crl(&revoked, number, now, CRL_VALIDITY_SECS)?);
        *cache = Some(CachedCrl {
            registry_version: version,
            made_at: now,
            der: der.clone(),
        });
        Ok(der)
    }
}

/// A home-office user's tunnel addresses: one host address from each address family of the
/// tenant's home-office pool in the policy. The user keeps the addresses it holds as long as
/// they lie in the pool; others are held until their holder expires (or is decommissioned).
fn allocate_homeoffice(
    txn: &mut dyn Txn,
    policy: &komnet_policy::Policy,
    tenant: &TenantId,
    user: &SiteId,
    until: i64,
    now: i64,
) -> Result<Vec<IpNet>, ApiError> {
    let version = policy.version;
    let t = policy.tenant_by_name(tenant.as_str()).ok_or_else(|| {
        err(
            ErrorCode::NotInPolicy,
            format!("tenant {tenant} is not in the published policy (version {version})"),
        )
    })?;
    let pool = &policy.tenants[t.index()].homeoffice_pool;
    if pool.is_empty() {
        return Err(err(
            ErrorCode::NotInPolicy,
            format!(
                "tenant {tenant} has no home-office pool in the published policy (version \
                 {version}): set `homeoffice = [...]` for it in operator.toml and publish"
            ),
        ));
    }
    let held = txn.homeoffice_addrs(tenant)?;
    let mut out = Vec::new();
    let mut kept = Vec::new();
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let prefixes: Vec<IpNet> = pool
            .iter()
            .copied()
            .filter(|p| matches!(p, IpNet::V6(_)) == v6)
            .collect();
        if prefixes.is_empty() {
            continue;
        }
        // A host address of the pool: a pool moved by a new policy version can turn a held
        // address into a network or broadcast address.
        let in_pool = |a: &IpAddr| {
            prefixes.iter().any(|p| {
                p.contains(a)
                    && *a != p.network()
                    && !(matches!(p, IpNet::V4(_)) && *a == p.broadcast())
            })
        };
        let own = held
            .iter()
            .filter(|h| h.user == *user && in_pool(&h.addr))
            .map(|h| h.addr)
            .min();
        let addr = match own {
            Some(a) => a,
            None => {
                let taken: BTreeSet<IpAddr> = held
                    .iter()
                    .filter(|h| h.user != *user && h.held_until > now)
                    .map(|h| h.addr)
                    .collect();
                lowest_free(&prefixes, &taken).ok_or_else(|| {
                    err(
                        ErrorCode::AddressPoolExhausted,
                        format!(
                            "tenant {tenant}: the {family} home-office pool {} (policy version \
                             {version}) has no free address",
                            addr_list(&prefixes)
                        ),
                    )
                })?
            }
        };
        txn.hold_homeoffice_addr(tenant, user, addr, until)?;
        kept.push(addr);
        out.push(IpNet::from(addr));
    }
    // Addresses the user held outside the current pool (the policy changed) go back.
    for h in held.iter().filter(|h| h.user == *user) {
        if !kept.contains(&h.addr) {
            txn.release_homeoffice_addr(tenant, h.addr)?;
        }
    }
    Ok(out)
}

/// The lowest host address in `prefixes` (in their order) not in `taken`: never a network
/// address, and for IPv4 never a broadcast address.
fn lowest_free(prefixes: &[IpNet], taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    for prefix in prefixes {
        let (first, last) = match prefix {
            IpNet::V4(n) => (
                u128::from(u32::from(n.network())).checked_add(1),
                u128::from(u32::from(n.broadcast())).checked_sub(1),
            ),
            IpNet::V6(n) => (
                u128::from(n.network()).checked_add(1),
                Some(u128::from(n.broadcast())),
            ),
        };
        let make = |v: u128| match prefix {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
        };
        let (Some(mut candidate), Some(last)) = (first, last) else {
            continue;
        };
        // Each step skips one taken address, so this ends after at most |taken| + 1 steps.
        while candidate <= last {
            let addr = make(candidate);
            if !taken.contains(&addr) {
                return Some(addr);
            }
            candidate += 1;
        }
    }
    None
}

/// Renewal opens at 2/3 of the lifetime (as step-ca does).
/// A certificate as PEM, 64 base64 characters per line (RFC 7468).
fn pem_certificate(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

pub fn renew_after(issued_at: i64, not_after: i64) -> i64 {
    issued_at + (not_after - issued_at) * 2 / 3
}

/// Formats the tunnel address list of an identity, for humans.
pub fn addr_list(addrs: &[IpNet]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn lowest_free_skips_network_broadcast_and_taken() {
        let v4: Vec<IpNet> = vec!["10.250.1.0/30".parse().unwrap()];
        assert_eq!(
            lowest_free(&v4, &set(&[])),
            Some("10.250.1.1".parse().unwrap())
        );
        assert_eq!(
            lowest_free(&v4, &set(&["10.250.1.1"])),
            Some("10.250.1.2".parse().unwrap())
        );
        // .3 is the broadcast address.
        assert_eq!(lowest_free(&v4, &set(&["10.250.1.1", "10.250.1.2"])), None);
        // A full first prefix moves on to the next.
        let two: Vec<IpNet> = vec![
            "10.250.1.0/30".parse().unwrap(),
            "10.250.9.0/29".parse().unwrap(),
        ];
        assert_eq!(
            lowest_free(&two, &set(&["10.250.1.1", "10.250.1.2"])),
            Some("10.250.9.1".parse().unwrap())
        );
        // IPv6 has no broadcast: the last address is a host.
        let v6: Vec<IpNet> = vec!["fd00::/127".parse().unwrap()];
        assert_eq!(
            lowest_free(&v6, &set(&[])),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(lowest_free(&v6, &set(&["fd00::1"])), None);
        // Degenerate pools have no host address at all, without overflow at the edges.
        for p in [
            "0.0.0.0/32",
            "255.255.255.255/32",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ] {
            assert_eq!(lowest_free(&[p.parse().unwrap()], &set(&[])), None, "{p}");
        }
    }
}
