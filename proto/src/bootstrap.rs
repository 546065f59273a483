//! The bootstrap file a field technician carries on a USB stick: everything an appliance
//! needs to enroll without anyone typing a key. `komnet token create` writes it, the gateway
//! reads it on first start.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file written to a USB stick for a field technician: everything an appliance needs to
/// enroll without anyone typing a key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    pub version: u32,
    pub token: String,
    pub enroll_urls: Vec<String>,
    /// Lower-case hex SHA-256 of the root certificate's DER; the appliance checks
    /// `root_ca_pem` against it and trusts nothing else.
    pub root_fingerprint: String,
    pub root_ca_pem: String,
    /// The service's X25519 key for the WireGuard possession proof (also in `GET /v1/info`);
    /// carried here so that enrolling is one request.
    pub wg_proof_public_key: crate::identity::WgPublicKey,
    /// The policy signing key (base64 of the raw Ed25519 key, as enroll.toml's
    /// `policy_public_key`), when the service has one: a gateway without a configured key pins
    /// this one at enrollment. Absent in files from services without a key (and older ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_public_key: Option<String>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("enroll_urls", &self.enroll_urls)
            .field("root_fingerprint", &self.root_fingerprint)
            .field("policy_public_key", &self.policy_public_key)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a komnet bootstrap file: {message}")]
    Parse { path: String, message: String },
    /// The file's `policy_public_key` is not a base64 Ed25519 public key.
    #[error("policy_public_key: {0}")]
    PolicyKey(String),
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: crate::files::FileError,
    },
}

impl Bootstrap {
    /// The file for a freshly created token; `urls` replace the service's configured ones
    /// when not empty.
    pub fn from_token(resp: crate::api::admin::CreateTokenResponse, urls: Vec<String>) -> Self {
        Bootstrap {
            version: 1,
            token: resp.token,
            enroll_urls: if urls.is_empty() {
                resp.enroll_urls
            } else {
                urls
            },
            root_fingerprint: resp.root_fingerprint,
            root_ca_pem: resp.root_ca_pem,
            wg_proof_public_key: resp.wg_proof_public_key,
            policy_public_key: resp.policy_public_key,
        }
    }

    /// Reads and parses the file; a `policy_public_key` that is not a key makes it unreadable.
    pub fn read(path: &Path) -> Result<Self, BootstrapError> {
        let bytes = std::fs::read(path).map_err(|source| BootstrapError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses a bootstrap file's content already read from `path` (named in errors).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, BootstrapError> {
        std::str::from_utf8(bytes)
            .map_err(|e| e.to_string())
            .and_then(Self::parse)
            .map_err(|message| BootstrapError::Parse {
                path: path.display().to_string(),
                message,
            })
    }

    /// The file's text to a bootstrap, or what is wrong with it.
    fn parse(text: &str) -> Result<Self, String> {
        let bootstrap: Bootstrap = serde_json::from_str(text).map_err(|e| e.to_string())?;
        bootstrap.policy_key().map_err(|e| e.to_string())?;
        Ok(bootstrap)
    }

    /// The decoded policy signing key (32 bytes), if the file carries one.
    ///
    /// ```
    /// # use komnet_proto::bootstrap::Bootstrap;
    /// # fn f(b: &Bootstrap) -> Result<(), komnet_proto::bootstrap::BootstrapError> {
    /// if let Some(key) = b.policy_key()? {
    ///     assert_eq!(key.len(), 32);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn policy_key(&self) -> Result<Option<Vec<u8>>, BootstrapError> {
        self.policy_public_key
            .as_deref()
            .map(|k| crate::config::decode_policy_public_key(k).map_err(BootstrapError::PolicyKey))
            .transpose()
    }

    /// Writes the file with mode 0600 (it holds a secret); refuses to overwrite.
    pub fn write(&self, path: &Path) -> Result<(), BootstrapError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        crate::files::create_secret(path, text.as_bytes()).map_err(|source| BootstrapError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(policy_public_key: Option<String>) -> Bootstrap {
        Bootstrap {
            version: 1,
            token: "kmt1.0011223344556677.c2VjcmV0".into(),
            enroll_urls: vec!["https://enroll.example:8443".into()],
            root_fingerprint: "00".repeat(32),
            root_ca_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
            wg_proof_public_key: crate::identity::WgPublicKey::from_bytes([9; 32]).unwrap(),
            policy_public_key,
        }
    }

    #[test]
    fn bootstrap_round_trips_with_and_without_the_policy_key() {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine as _;
        let with = sample(Some(STANDARD.encode([7u8; 32])));
        let text = serde_json::to_string_pretty(&with).unwrap();
        assert!(text.contains("\"policy_public_key\""), "{text}");
        let back = Bootstrap::parse(&text).unwrap();
        assert!(back == with);
        assert_eq!(back.policy_key().unwrap(), Some(vec![7u8; 32]));
        assert!(format!("{back:?}").contains("policy_public_key"));
        assert!(
            !format!("{back:?}").contains(&back.token),
            "Debug leaks the token"
        );

        // Without a key the field is left out, and files written before it existed parse.
        let without = sample(None);
        let text = serde_json::to_string_pretty(&without).unwrap();
        assert!(!text.contains("policy_public_key"), "{text}");
        let back = Bootstrap::parse(&text).unwrap();
        assert!(back == without);
        assert_eq!(back.policy_key().unwrap(), None);
    }

    #[test]
    fn a_bootstrap_file_with_a_broken_policy_key_does_not_parse() {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine as _;
        let text = serde_json::to_string(&sample(Some(STANDARD.encode([7u8; 31])))).unwrap();
        let e = Bootstrap::parse(&text).unwrap_err();
        assert!(e.starts_with("policy_public_key: 31 bytes"), "{e}");
        let text = serde_json::to_string(&sample(Some("not a key!".into()))).unwrap();
        let e = Bootstrap::parse(&text).unwrap_err();
        assert!(e.starts_with("policy_public_key: not base64"), "{e}");
    }
}
