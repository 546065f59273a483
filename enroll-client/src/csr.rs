//! The certificate signing request an appliance sends: a fresh ECDSA P-256 key (ring) and a
//! PKCS#10 request (RFC 2986) for it, subject O/OU/CN = tenant/role/site when known, signed
//! with ecdsa-with-SHA256. Exactly the one shape the service accepts (`komnet-enroll`'s CSR
//! check), written out in DER here so that an appliance needs no certificate-generation
//! library.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use komnet_proto::identity::Identity;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};

/// Why no CSR could be made (the system's random source or ring failed).
#[derive(Debug, thiserror::Error)]
#[error("cannot make a P-256 key and CSR: {0}")]
pub struct CsrBuildError(&'static str);

/// A fresh TLS key and the DER CSR for it.
pub struct NewKey {
    /// PKCS#8 private key as PEM (`-----BEGIN PRIVATE KEY-----`), as rustls reads it.
    pub private_key_pem: String,
    /// DER PKCS#10 request.
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("csr_der", &self.csr_der.len())
            .finish_non_exhaustive()
    }
}

// OIDs, DER-encoded content octets.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_ECDSA_WITH_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const OID_ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
const OID_ORGANIZATIONAL_UNIT: &[u8] = &[0x55, 0x04, 0x0b];
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// A DER TLV.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    out.push(tag);
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0xff {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        // A CSR is a few hundred bytes; two length octets cover 64 KiB.
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// RDNSequence with one attribute per RDN, in the order O, OU, CN.
fn subject(identity: Option<&Identity>) -> Vec<u8> {
    let mut rdns = Vec::new();
    if let Some(id) = identity {
        for (oid, value) in [
            (OID_ORGANIZATION, id.tenant.as_str()),
            (OID_ORGANIZATIONAL_UNIT, id.role.as_str()),
            (OID_COMMON_NAME, id.site.as_str()),
        ] {
            let atv = seq(&[&tlv(0x06, oid), &tlv(0x0c, value.as_bytes())]);
            rdns.extend(tlv(0x31, &atv));
        }
    }
    tlv(0x30, &rdns)
}

/// A fresh P-256 key and a CSR for it; the subject names `identity` when given (renewal), and
/// is empty on first enrollment (the token decides who the appliance is).
pub fn new_key_and_csr(identity: Option<&Identity>) -> Result<NewKey, CsrBuildError> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| CsrBuildError("key generation"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| CsrBuildError("reading the generated key"))?;
    let mut point = vec![0u8];
    point.extend_from_slice(key.public_key().as_ref());
    let spki = seq(&[
        &seq(&[&tlv(0x06, OID_EC_PUBLIC_KEY), &tlv(0x06, OID_PRIME256V1)]),
        &tlv(0x03, &point),
    ]);
    let info = seq(&[
        &tlv(0x02, &[0]), // version v1(0)
        &subject(identity),
        &spki,
        &tlv(0xa0, &[]), // attributes [0]: none
    ]);
    let signature = key
        .sign(&rng, &info)
        .map_err(|_| CsrBuildError("signing"))?;
    let mut sig_bits = vec![0u8];
    sig_bits.extend_from_slice(signature.as_ref());
    let csr_der = seq(&[
        &info,
        &seq(&[&tlv(0x06, OID_ECDSA_WITH_SHA256)]),
        &tlv(0x03, &sig_bits),
    ]);
    Ok(NewKey {
        private_key_pem: pem("PRIVATE KEY", pkcs8.as_ref()),
        csr_der,
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_use_the_short_and_long_forms() {
        assert_eq!(tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = tlv(0x04, &[0; 200]);
        assert_eq!(&long[..3], &[0x04, 0x81, 200]);
        let longer = tlv(0x04, &[0; 300]);
        assert_eq!(&longer[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn the_key_is_pkcs8_pem_that_rustls_reads() {
        use rustls_pki_types::pem::PemObject as _;
        let k = new_key_and_csr(None).unwrap();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(k.private_key_pem.as_bytes()).unwrap();
        assert!(matches!(key, rustls_pki_types::PrivateKeyDer::Pkcs8(_)));
        // Each key is new.
        assert_ne!(new_key_and_csr(None).unwrap().csr_der, k.csr_der);
    }
}
