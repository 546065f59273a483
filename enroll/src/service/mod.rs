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
    MfaWindowRequest, MfaWindowResponse, PolicyPublishResponse, RevokeRequest, RevokeResponse,
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
    self, CertStatus, CertificateRecord, Location, PublishedPolicy, Selector, Store, StoreError,
    TokenRecord, Txn,
};
use crate::token::{NewToken, PresentedToken};
use crate::wgproof;

mod certificates;
mod enrollment;
mod homeoffice;
mod policy;

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

/// Where `init --database-ca` puts the database's CA certificate, in the data directory.
pub const DATABASE_CA: &str = "database-ca.pem";

/// `komnet-enroll init`: data directory (0700), `enroll.toml` (kept if present), CA, proof key,
/// database (the SQLite file, or the schema in the PostgreSQL database `database` names, which
/// must not have been initialised by another CA: checked before anything is written).
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
    let kept = config_path.exists();
    let effective = if kept {
        Config::load(data_dir)?
    } else {
        config.check().map_err(|problems| ConfigError::Invalid {
            path: config_path.clone(),
            problems,
        })?;
        config.clone()
    };
    store::check_uninitialised(Location::of(data_dir, &effective))?;
    let mut config = config.clone();
    if let (false, Some(ca)) = (kept, &config.database_ca) {
        // Into the data directory, which replicas copy: each then has the database's CA.
        let copy = data_dir.join(DATABASE_CA);
        if data_dir.join(ca) != copy {
            std::fs::copy(data_dir.join(ca), &copy).map_err(|source| OpenError::Io {
                path: ca.clone(),
                source,
            })?;
        }
        config.database_ca = Some(PathBuf::from(DATABASE_CA));
    }
    let effective = if kept { effective } else { config.clone() };
    if !kept {
        std::fs::write(&config_path, config.to_toml()).map_err(|source| OpenError::Io {
            path: config_path.clone(),
            source,
        })?;
        if config.database.is_some() {
            // The connection string may carry the database password.
            std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))
                .map_err(|source| OpenError::Io {
                    path: config_path.clone(),
                    source,
                })?;
        }
    }
    let report = ca::init_ca(data_dir, now)?;
    let secret: [u8; 32] = rand::random();
    ca::write_secret_file(
        &data_dir.join(WG_PROOF_KEY),
        STANDARD.encode(secret).as_bytes(),
    )?;
    store::create(Location::of(data_dir, &effective), &report.root_fingerprint)?;
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
        let store = store::open(Location::of(data_dir, &config), &ca.root_fingerprint)?;
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
}

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

/// Renewal opens at 2/3 of the lifetime (as step-ca does).
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
