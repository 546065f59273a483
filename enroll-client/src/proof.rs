//! Proof that an enrolling client holds the private key of the WireGuard public key it names.
//!
//! A WireGuard key is an X25519 key: it cannot sign, but it can agree. The service has a static
//! X25519 key (`enroll-dh.key`, public half in `GET /v1/info`). The client computes
//!
//! ```text
//! shared = X25519(wg_private, service_public)
//! key    = HKDF-SHA256(salt = "komnet-enroll wg-possession v1", ikm = shared)
//! proof  = HMAC-SHA256(key, "komnet-enroll wg-possession v1" || SHA-256(csr_der) || wg_public)
//! ```
//!
//! and the service recomputes it from its own private key. Only the holder of `wg_private` (or
//! of the service's key) can produce `shared`. The proof covers the CSR, so it cannot be lifted
//! onto another request: the CSR in turn carries a fresh P-256 key, and on first enrollment the
//! single-use token. A low-order WireGuard key is refused before any of this
//! (`WgPublicKey::from_bytes`), so `shared` is never a constant.

use ring::{hkdf, hmac};
use x25519_dalek::{PublicKey, StaticSecret};

use komnet_proto::identity::WgPublicKey;

const LABEL: &[u8] = b"komnet-enroll wg-possession v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("WireGuard key possession proof does not verify")]
    Mismatch,
    #[error("WireGuard key possession proof is not 32 bytes")]
    Length,
}

struct HmacKeyLen;
impl hkdf::KeyType for HmacKeyLen {
    fn len(&self) -> usize {
        32
    }
}

fn proof_key(shared: &[u8; 32]) -> hmac::Key {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, LABEL).extract(shared);
    let mut okm = [0u8; 32];
    // HKDF-Expand of 32 bytes from SHA-256 cannot fail (the limit is 255 * 32).
    if let Ok(o) = prk.expand(&[], HmacKeyLen) {
        let _ = o.fill(&mut okm);
    }
    hmac::Key::new(hmac::HMAC_SHA256, &okm)
}

fn message(csr_der: &[u8], wg_public: &WgPublicKey) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, csr_der);
    let mut msg = Vec::with_capacity(LABEL.len() + 32 + 32);
    msg.extend_from_slice(LABEL);
    msg.extend_from_slice(digest.as_ref());
    msg.extend_from_slice(wg_public.as_bytes());
    msg
}

/// Client side: the proof for `csr_der` made with the WireGuard private key.
pub fn prove(wg_private: &StaticSecret, service_public: &WgPublicKey, csr_der: &[u8]) -> Vec<u8> {
    let wg_public = PublicKey::from(wg_private);
    let shared = wg_private.diffie_hellman(&PublicKey::from(*service_public.as_bytes()));
    let key = proof_key(shared.as_bytes());
    // The public key of a StaticSecret is never low order.
    let wg_public = WgPublicKey::from_bytes(wg_public.to_bytes()).unwrap_or(*service_public);
    hmac::sign(&key, &message(csr_der, &wg_public))
        .as_ref()
        .to_vec()
}

/// Service side: checks `proof` (constant time, via ring's HMAC verify).
pub fn verify(
    service_private: &StaticSecret,
    wg_public: &WgPublicKey,
    csr_der: &[u8],
    proof: &[u8],
) -> Result<(), ProofError> {
    if proof.len() != 32 {
        return Err(ProofError::Length);
    }
    let shared = service_private.diffie_hellman(&PublicKey::from(*wg_public.as_bytes()));
    if !shared.was_contributory() {
        return Err(ProofError::Mismatch);
    }
    let key = proof_key(shared.as_bytes());
    hmac::verify(&key, &message(csr_der, wg_public), proof).map_err(|_| ProofError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_verifies_only_for_the_key_holder_and_the_same_csr() {
        let service = StaticSecret::from([1u8; 32]);
        let service_pub = WgPublicKey::from_bytes(PublicKey::from(&service).to_bytes()).unwrap();
        let wg = StaticSecret::from([2u8; 32]);
        let wg_pub = WgPublicKey::from_bytes(PublicKey::from(&wg).to_bytes()).unwrap();
        let proof = prove(&wg, &service_pub, b"csr-1");
        assert_eq!(verify(&service, &wg_pub, b"csr-1", &proof), Ok(()));
        assert_eq!(
            verify(&service, &wg_pub, b"csr-2", &proof),
            Err(ProofError::Mismatch)
        );
        let other = StaticSecret::from([3u8; 32]);
        let forged = prove(&other, &service_pub, b"csr-1");
        assert_eq!(
            verify(&service, &wg_pub, b"csr-1", &forged),
            Err(ProofError::Mismatch)
        );
        assert_eq!(
            verify(&service, &wg_pub, b"csr-1", &proof[..31]),
            Err(ProofError::Length)
        );
    }
}
