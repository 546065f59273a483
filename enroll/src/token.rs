//! One-time enrollment tokens (the bootstrap file that carries one is `komnet-proto`'s).
//!
//! A token reads `kmt1.ID.SECRET`: `ID` (8 random bytes, hex) finds the row, `SECRET` (32 random
//! bytes, base64url, 256 bits) is never stored — only its SHA-256, which is compared in
//! constant time. A fast hash is enough because the secret is random, not a password. Tenant,
//! site, role and expiry live in the row, so a request cannot choose them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
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

pub use komnet_proto::bootstrap::{Bootstrap, BootstrapError};

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
