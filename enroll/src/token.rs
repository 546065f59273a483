//! One-time enrollment tokens and the bootstrap file a field technician carries on a USB stick.
//!
//! A token reads `kmt1.ID.SECRET`: `ID` (8 random bytes, hex) finds the row, `SECRET` (32 random
//! bytes, base64url, 256 bits) is never stored — only its SHA-256, which is compared in
//! constant time. A fast hash is enough because the secret is random, not a password. Tenant,
//! site, role and expiry live in the row, so a request cannot choose them.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

const PREFIX: &str = "kmt1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenFormatError {
    #[error("token is not of the form kmt1.ID.SECRET")]
    Shape,
}

/// A token as the client presents it, split but not yet checked against the store.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedToken {
    pub id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl PresentedToken {
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenFormatError::Shape);
        };
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenFormatError::Shape);
        }
        let secret = URL_SAFE_NO_PAD
            .decode(secret)
            .map_err(|_| TokenFormatError::Shape)?;
        if secret.len() != 32 {
            return Err(TokenFormatError::Shape);
        }
        Ok(PresentedToken {
            id: id.to_ascii_lowercase(),
            secret,
        })
    }

    /// Constant-time comparison of this token's secret hash with the stored one.
    pub fn matches(&self, stored_hash: &[u8]) -> bool {
        hash_secret(&self.secret).ct_eq(stored_hash).into()
    }
}

fn hash_secret(secret: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret)
        .as_ref()
        .to_vec()
}

/// A new token: the text to hand out once, and what the store keeps.
#[derive(Clone)]
pub struct NewToken {
    pub text: String,
    pub id: String,
    pub secret_hash: Vec<u8>,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl NewToken {
    pub fn generate() -> Self {
        let id: [u8; 8] = rand::random();
        let secret: [u8; 32] = rand::random();
        let id = hex::encode(id);
        NewToken {
            text: format!("{PREFIX}.{id}.{}", URL_SAFE_NO_PAD.encode(secret)),
            id,
            secret_hash: hash_secret(&secret),
        }
    }
}

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
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("enroll_urls", &self.enroll_urls)
            .field("root_fingerprint", &self.root_fingerprint)
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
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: crate::ca::CaError,
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
        }
    }

    pub fn read(path: &Path) -> Result<Self, BootstrapError> {
        let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| BootstrapError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Writes the file with mode 0600 (it holds a secret); refuses to overwrite.
    pub fn write(&self, path: &Path) -> Result<(), BootstrapError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        crate::ca::write_secret_file(path, text.as_bytes()).map_err(|source| {
            BootstrapError::Write {
                path: path.display().to_string(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_compare_by_hash() {
        let t = NewToken::generate();
        let p = PresentedToken::parse(&t.text).unwrap();
        assert_eq!(p.id, t.id);
        assert!(p.matches(&t.secret_hash));
        let other = NewToken::generate();
        assert!(!p.matches(&other.secret_hash));
        assert!(
            !format!("{t:?}").contains(&t.text[22..]),
            "Debug leaks the secret"
        );
        for bad in [
            "",
            "kmt1",
            "kmt1.zz.abc",
            "kmt2.0011223344556677.AAAA",
            "a.b.c.d",
        ] {
            assert_eq!(
                PresentedToken::parse(bad),
                Err(TokenFormatError::Shape),
                "{bad}"
            );
        }
    }
}
