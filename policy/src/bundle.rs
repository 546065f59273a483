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
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What is signed: the policy's files and its version.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Payload {
    format: String,
    version: u64,
    name: String,
    /// `operator.toml` and `tenants/<tenant>.toml` → text.
    files: BTreeMap<String, String>,
}

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
    files: BTreeMap<String, String>,
    raw: Vec<u8>,
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
    Ok(VerifiedBundle {
        version: payload.version,
        name: payload.name,
        files: payload.files,
        raw: bytes.to_vec(),
    })
}

impl VerifiedBundle {
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

/// A gateway's policy state on disk: the pinned key and the last-known-good bundle.
#[derive(Debug)]
pub struct BundleStore {
    dir: PathBuf,
    public_key: Vec<u8>,
}

const CURRENT: &str = "policy.bundle";

impl BundleStore {
    pub fn new(dir: impl Into<PathBuf>, public_key: Vec<u8>) -> Self {
        BundleStore {
            dir: dir.into(),
            public_key,
        }
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
        let bundle = verify(&bytes, &self.public_key)?;
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
        let bundle = verify(bytes, &self.public_key)?;
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
        let compiled = bundle.compile()?;
        Ok((bundle, compiled))
    }

    /// Stores a prepared bundle as last-known-good, atomically (tmp, fsync, rename).
    pub fn commit(&self, bundle: &VerifiedBundle) -> Result<(), BundleError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let tmp = self.dir.join(format!("{CURRENT}.tmp"));
        {
            let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&bundle.raw).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        let dst = self.dir.join(CURRENT);
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}
