//! Signed, versioned policy bundles: how the data centre ships a checked policy to gateways.
//!
//! A bundle is one file: the policy's text files and its version, signed with the operator's
//! Ed25519 key. A gateway verifies the signature against the key it pinned, refuses a version
//! lower than (or equal to, with other content) the one it runs — anti-rollback — compiles it,
//! and only then stores it as its last-known-good bundle (written to a temporary file, synced,
//! renamed), so a restart comes back with the last policy that worked.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::model::{Policy, PolicyErrors};
use crate::reload::{CompiledPolicy, ReloadError};

const FORMAT: &str = "komnet-policy-bundle/1";
/// A bundle larger than this is refused before any parsing.
pub const MAX_BUNDLE_BYTES: usize = 64 << 20;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is not a komnet policy bundle: {0}")]
    Format(String),
    #[error(
        "the bundle's signature does not verify with the pinned key (key id {key_id}): refusing it"
    )]
    BadSignature { key_id: String },
    #[error("version {offered} is older than the running version {running}: refusing a rollback")]
    Rollback { offered: u64, running: u64 },
    #[error(
        "version {0} is already running with other content: a changed policy needs a new version"
    )]
    SameVersionDifferentContent(u64),
    #[error("the bundled policy is invalid: {0}")]
    Invalid(PolicyErrors),
    #[error("the bundled policy does not load: {0}")]
    Load(ReloadError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing key: {0}")]
    Key(String),
    #[error(
        "version {offered} is below this gateway's policy floor {floor} (the newest version the \
         enrollment service or an earlier bundle vouched for): refusing an old signed bundle"
    )]
    BelowFloor { offered: u64, floor: u64 },
    #[error(
        "version {version} is valid only from {not_before} (Unix time), it is {now}: check this \
         gateway's clock (NTP)"
    )]
    NotYetValid {
        version: u64,
        not_before: i64,
        now: i64,
    },
    #[error(
        "version {version} expired at {expires} (Unix time), it is {now}: the operator must \
         publish a fresh bundle; the gateway keeps the policy it runs"
    )]
    Expired {
        version: u64,
        expires: i64,
        now: i64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What is signed: the policy's files and its version, when it may be used, and the key that
/// signs the next bundles (a key rotation announced with the current key).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Payload {
    format: String,
    version: u64,
    name: String,
    /// `operator.toml` and `tenants/<tenant>.toml` → text.
    files: BTreeMap<String, String>,
    /// Unix seconds; older bundles (without these) are valid at any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<i64>,
    /// Base64 of the Ed25519 public key that will sign later bundles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_key: Option<String>,
}

/// How a bundle is made beyond its files: validity window and an announced successor key.
#[derive(Debug, Clone, Default)]
pub struct BundleOptions {
    /// Unix seconds from which the bundle may be used (a few minutes before "now" tolerates
    /// skewed clocks).
    pub not_before: Option<i64>,
    /// Unix seconds after which gateways refuse to install it.
    pub expires: Option<i64>,
    /// Raw Ed25519 public key of the key that signs the next bundles.
    pub next_key: Option<Vec<u8>>,
}

/// Clocks of appliances drift; a bundle is usable this long before its `not_before`.
pub const CLOCK_SKEW_SECS: i64 = 300;

/// The file on disk and on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    format: String,
    key_id: String,
    payload: String,
    signature: String,
}

/// The short, printable identity of a public key (first 16 hex digits of its SHA-256).
pub fn key_id(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Creates an Ed25519 signing key: returns (PKCS#8 private key, raw public key).
pub fn generate_key() -> Result<(Vec<u8>, Vec<u8>), BundleError> {
    let rng = SystemRandom::new();
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| BundleError::Key(e.to_string()))?;
    let pair =
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| BundleError::Key(e.to_string()))?;
    Ok((pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec()))
}

/// Builds a signed bundle from a policy directory. The policy must load and pass its inline
/// tests: an operator never ships a policy `check` or `test` would reject.
pub fn create(dir: &Path, private_key_pkcs8: &[u8]) -> Result<Vec<u8>, BundleError> {
    create_with(dir, private_key_pkcs8, &BundleOptions::default())
}

/// [`create`] with a validity window and/or an announced successor key.
pub fn create_with(
    dir: &Path,
    private_key_pkcs8: &[u8],
    options: &BundleOptions,
) -> Result<Vec<u8>, BundleError> {
    if let (Some(nb), Some(ex)) = (options.not_before, options.expires) {
        if ex <= nb {
            return Err(BundleError::Format(format!(
                "expires ({ex}) must come after not_before ({nb})"
            )));
        }
    }
    if let Some(k) = &options.next_key {
        if k.len() != 32 {
            return Err(BundleError::Key(format!(
                "the next key is {} bytes, an Ed25519 public key has 32",
                k.len()
            )));
        }
    }
    let compiled = CompiledPolicy::load(dir).map_err(BundleError::Load)?;
    let mut files = BTreeMap::new();
    for (_, f) in compiled.policy.sources.files() {
        let rel = f
            .path
            .strip_prefix(dir)
            .unwrap_or(&f.path)
            .to_string_lossy()
            .into_owned();
        files.insert(rel, f.text.clone());
    }
    let payload = Payload {
        format: FORMAT.to_owned(),
        version: compiled.policy.version,
        name: compiled.policy.name.clone(),
        files,
        not_before: options.not_before,
        expires: options.expires,
        next_key: options.next_key.as_ref().map(|k| B64.encode(k)),
    };
    sign(&payload, private_key_pkcs8)
}

fn sign(payload: &Payload, private_key_pkcs8: &[u8]) -> Result<Vec<u8>, BundleError> {
    let pair = Ed25519KeyPair::from_pkcs8(private_key_pkcs8)
        .map_err(|e| BundleError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
    let bytes = serde_json::to_vec(payload).map_err(|e| BundleError::Format(e.to_string()))?;
    let signature = pair.sign(&bytes);
    let envelope = Envelope {
        format: FORMAT.to_owned(),
        key_id: key_id(pair.public_key().as_ref()),
        payload: B64.encode(&bytes),
        signature: B64.encode(signature.as_ref()),
    };
    serde_json::to_vec_pretty(&envelope).map_err(|e| BundleError::Format(e.to_string()))
}

/// A verified bundle, not yet compiled.
#[derive(Debug)]
pub struct VerifiedBundle {
    pub version: u64,
    pub name: String,
    pub not_before: Option<i64>,
    pub expires: Option<i64>,
    /// The successor key this bundle announces (raw Ed25519 public key).
    pub next_key: Option<Vec<u8>>,
    /// The key that signed it.
    pub signed_by: Vec<u8>,
    files: BTreeMap<String, String>,
    raw: Vec<u8>,
}

impl VerifiedBundle {
    /// Refuses a bundle outside its validity window at `now` (Unix seconds).
    pub fn check_time(&self, now: i64) -> Result<(), BundleError> {
        if let Some(nb) = self.not_before {
            if now + CLOCK_SKEW_SECS < nb {
                return Err(BundleError::NotYetValid {
                    version: self.version,
                    not_before: nb,
                    now,
                });
            }
        }
        if let Some(ex) = self.expires {
            if now >= ex {
                return Err(BundleError::Expired {
                    version: self.version,
                    expires: ex,
                    now,
                });
            }
        }
        Ok(())
    }
}

/// [`verify`] with the first of `keys` that verifies the signature.
pub fn verify_any(bytes: &[u8], keys: &[Vec<u8>]) -> Result<VerifiedBundle, BundleError> {
    let mut last = None;
    for key in keys {
        match verify(bytes, key) {
            Err(e @ BundleError::BadSignature { .. }) => last = Some(e),
            other => return other,
        }
    }
    Err(last.unwrap_or_else(|| BundleError::Key("no policy key to verify with".into())))
}

/// Checks format and signature; nothing in the bundle is parsed before the signature verifies.
pub fn verify(bytes: &[u8], public_key: &[u8]) -> Result<VerifiedBundle, BundleError> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::Format(format!(
            "{} bytes, more than the {MAX_BUNDLE_BYTES} allowed",
            bytes.len()
        )));
    }
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| BundleError::Format(e.to_string()))?;
    if envelope.format != FORMAT {
        return Err(BundleError::Format(format!(
            "format {:?}, expected {FORMAT:?}",
            envelope.format
        )));
    }
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|e| BundleError::Format(format!("payload: {e}")))?;
    let signature = B64
        .decode(&envelope.signature)
        .map_err(|e| BundleError::Format(format!("signature: {e}")))?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&payload, &signature)
        .map_err(|_| BundleError::BadSignature {
            key_id: key_id(public_key),
        })?;
    let payload: Payload =
        serde_json::from_slice(&payload).map_err(|e| BundleError::Format(e.to_string()))?;
    if payload.format != FORMAT {
        return Err(BundleError::Format(
            "signed payload of another format".into(),
        ));
    }
    let next_key = match &payload.next_key {
        None => None,
        Some(text) => match B64.decode(text) {
            Ok(k) if k.len() == 32 => Some(k),
            _ => {
                return Err(BundleError::Format(
                    "next_key is not a base64 Ed25519 public key".into(),
                ))
            }
        },
    };
    Ok(VerifiedBundle {
        version: payload.version,
        name: payload.name,
        not_before: payload.not_before,
        expires: payload.expires,
        next_key,
        signed_by: public_key.to_vec(),
        files: payload.files,
        raw: bytes.to_vec(),
    })
}

impl VerifiedBundle {
    /// The policy's files as signed: `operator.toml` and `tenants/<tenant>.toml` → text (the
    /// console shows what changed between two versions).
    pub fn files(&self) -> &BTreeMap<String, String> {
        &self.files
    }

    /// Parses, checks, tests and compiles the bundled policy.
    pub fn compile(&self) -> Result<CompiledPolicy, BundleError> {
        let operator = self
            .files
            .get("operator.toml")
            .ok_or_else(|| BundleError::Format("no operator.toml in the bundle".into()))?;
        let tenants: Vec<(&str, &str)> = self
            .files
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("tenants/")?, v.as_str())))
            .collect();
        let policy = Policy::from_texts(operator, &tenants).map_err(BundleError::Invalid)?;
        if policy.version != self.version {
            return Err(BundleError::Format(format!(
                "the envelope says version {} but operator.toml says {}",
                self.version, policy.version
            )));
        }
        CompiledPolicy::from_policy(policy).map_err(BundleError::Load)
    }
}

/// A gateway's policy state on disk: the pinned key, the last-known-good bundle, the key the
/// bundles in force announced (`policy-keys.json`) and the version floor (`policy-floor`).
///
/// Key rotation: a bundle signed with the current key announces its successor; from then on
/// bundles signed with either verify, and the first one installed that the successor signed
/// makes it the only key. A bundle signed with the old key is refused after that, so an old
/// key that leaks later cannot bring back old policies.
#[derive(Debug)]
pub struct BundleStore {
    dir: PathBuf,
    public_key: Vec<u8>,
}

const CURRENT: &str = "policy.bundle";
const KEYS: &str = "policy-keys.json";
const FLOOR: &str = "policy-floor";

/// The keys a gateway trusts beyond the configured one, learnt from signed bundles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct TrustedKeys {
    /// The configured key this chain started from (a new configured key starts a new chain).
    pinned: String,
    /// The key bundles are signed with now.
    current: String,
    /// A successor the current key announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

impl BundleStore {
    pub fn new(dir: impl Into<PathBuf>, public_key: Vec<u8>) -> Self {
        BundleStore {
            dir: dir.into(),
            public_key,
        }
    }

    fn trusted(&self) -> TrustedKeys {
        let pinned = B64.encode(&self.public_key);
        let fresh = TrustedKeys {
            pinned: pinned.clone(),
            current: pinned.clone(),
            next: None,
        };
        match fs::read(self.dir.join(KEYS)) {
            Ok(bytes) => match serde_json::from_slice::<TrustedKeys>(&bytes) {
                Ok(t) if t.pinned == pinned => t,
                _ => fresh,
            },
            Err(_) => fresh,
        }
    }

    /// The keys a bundle may be signed with now: the current one and an announced successor.
    pub fn accepted_keys(&self) -> Vec<Vec<u8>> {
        let t = self.trusted();
        std::iter::once(t.current)
            .chain(t.next)
            .filter_map(|k| B64.decode(k).ok())
            .collect()
    }

    /// The lowest version this gateway installs (0: none).
    pub fn floor(&self) -> u64 {
        fs::read_to_string(self.dir.join(FLOOR))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Raises the floor (never lowers it): the enrollment service's current policy version,
    /// handed out with every enrollment answer, so a new or re-flashed appliance refuses
    /// bundles older than what the district already runs.
    pub fn raise_floor(&self, version: u64) -> Result<(), BundleError> {
        if version <= self.floor() {
            return Ok(());
        }
        write_atomic(&self.dir, FLOOR, format!("{version}\n").as_bytes())
    }

    /// The last-known-good policy, verified again (the disk is not trusted more than the wire);
    /// `None` when no bundle was ever installed.
    pub fn load_last_known_good(
        &self,
    ) -> Result<Option<(VerifiedBundle, CompiledPolicy)>, BundleError> {
        let path = self.dir.join(CURRENT);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let bundle = verify_any(&bytes, &self.accepted_keys())?;
        let compiled = bundle.compile()?;
        Ok(Some((bundle, compiled)))
    }

    /// Verifies, checks anti-rollback against `running` (version and bytes of the bundle in
    /// force), compiles, and stores the bundle as last-known-good. On any error nothing on disk
    /// changed and the caller keeps its policy.
    pub fn install(
        &self,
        bytes: &[u8],
        running: Option<&VerifiedBundle>,
    ) -> Result<(VerifiedBundle, CompiledPolicy), BundleError> {
        let (bundle, compiled) = self.prepare(bytes, running)?;
        self.commit(&bundle)?;
        Ok((bundle, compiled))
    }

    /// Everything [`BundleStore::install`] checks, without storing: for callers that must
    /// put the policy in force (e.g. install nftables rules) before it becomes last-known-good.
    pub fn prepare(
        &self,
        bytes: &[u8],
        running: Option<&VerifiedBundle>,
    ) -> Result<(VerifiedBundle, CompiledPolicy), BundleError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.prepare_at(bytes, running, now)
    }

    /// [`BundleStore::prepare`] at `now` (Unix seconds): signature with an accepted key, the
    /// floor, anti-rollback against the running bundle, the validity window, compilation.
    pub fn prepare_at(
        &self,
        bytes: &[u8],
        running: Option<&VerifiedBundle>,
        now: i64,
    ) -> Result<(VerifiedBundle, CompiledPolicy), BundleError> {
        let bundle = verify_any(bytes, &self.accepted_keys())?;
        // The bundle in force again (a restart re-applying it) is not refused for its age:
        // refusing it would leave the gateway without any policy.
        let same_as_running = running.is_some_and(|r| r.raw == bundle.raw);
        if !same_as_running {
            bundle.check_time(now)?;
        }
        if let Some(cur) = running {
            if bundle.version < cur.version {
                return Err(BundleError::Rollback {
                    offered: bundle.version,
                    running: cur.version,
                });
            }
            if bundle.version == cur.version && bundle.files != cur.files {
                return Err(BundleError::SameVersionDifferentContent(bundle.version));
            }
        }
        let floor = self.floor();
        if bundle.version < floor {
            return Err(BundleError::BelowFloor {
                offered: bundle.version,
                floor,
            });
        }
        let compiled = bundle.compile()?;
        Ok((bundle, compiled))
    }

    /// Stores a prepared bundle as last-known-good, atomically (tmp, fsync, rename); raises the
    /// floor to its version and follows its key rotation.
    pub fn commit(&self, bundle: &VerifiedBundle) -> Result<(), BundleError> {
        write_atomic(&self.dir, CURRENT, &bundle.raw)?;
        self.raise_floor(bundle.version)?;
        let mut keys = self.trusted();
        let signer = B64.encode(&bundle.signed_by);
        if keys.next.as_deref() == Some(signer.as_str()) {
            // The successor signed: from now on it is the only key.
            keys.current = signer;
            keys.next = None;
        }
        if let Some(next) = &bundle.next_key {
            let next = B64.encode(next);
            if next != keys.current {
                keys.next = Some(next);
            }
        }
        if keys != self.trusted() {
            let text =
                serde_json::to_vec_pretty(&keys).map_err(|e| BundleError::Format(e.to_string()))?;
            write_atomic(&self.dir, KEYS, &text)?;
        }
        Ok(())
    }
}

/// Writes `dir/name` atomically: temporary file, fsync, rename, fsync of the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), BundleError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    let dst = dir.join(name);
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
