//! PKCS#10 certificate signing requests: parsed and checked with x509-parser before anything
//! of them reaches the CA.
//!
//! Accepted is exactly one shape: an ECDSA P-256 key (TR-02102-1), signed with ecdsa-with-SHA256,
//! a valid self-signature (proof of possession of the TLS key), no trailing bytes. Only the key
//! is taken from the request; a subject the client fills in must agree with what the token (or
//! the current certificate) says, and everything else is decided by the service.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::FromDer;

use crate::identity::{Role, SiteId, TenantId};

/// Largest CSR accepted (a P-256 CSR is about 250 bytes).
pub const MAX_CSR_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("CSR is not a DER PKCS#10 request: {0}")]
    Invalid(String),
    #[error("CSR signature does not verify")]
    Signature,
    #[error("CSR key type: {0}; only ECDSA P-256 with SHA-256 is accepted")]
    KeyType(String),
    #[error("CSR subject {field} is {requested:?}, but this enrollment is for {expected:?}")]
    IdentityMismatch {
        field: &'static str,
        requested: String,
        expected: String,
    },
}

/// A CSR whose structure, key type and signature have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    /// DER SubjectPublicKeyInfo of the requested key.
    pub spki_der: Vec<u8>,
    organization: Vec<String>,
    organizational_unit: Vec<String>,
    common_name: Vec<String>,
}

fn strings<'a>(
    it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
) -> Result<Vec<String>, CsrError> {
    it.map(|atv| {
        atv.as_str()
            .map(str::to_owned)
            .map_err(|e| CsrError::Invalid(format!("subject attribute is not a string: {e}")))
    })
    .collect()
}

impl VerifiedCsr {
    /// Parses and verifies a DER CSR.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_BYTES {
            return Err(CsrError::Invalid(format!(
                "{} bytes, more than {MAX_CSR_BYTES}",
                der.len()
            )));
        }
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Invalid(format!(
                "{} trailing bytes after the request",
                rest.len()
            )));
        }
        let info = &csr.certification_request_info;
        let alg = &info.subject_pki.algorithm;
        if alg.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
            return Err(CsrError::KeyType(format!(
                "key algorithm {}",
                alg.algorithm
            )));
        }
        let curve = alg
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::KeyType("EC key without a named curve".into()))?;
        if curve != OID_EC_P256 {
            return Err(CsrError::KeyType(format!("curve {curve}")));
        }
        if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
            return Err(CsrError::KeyType(format!(
                "signature algorithm {}",
                csr.signature_algorithm.algorithm
            )));
        }
        csr.verify_signature().map_err(|_| CsrError::Signature)?;
        let subject = &info.subject;
        Ok(VerifiedCsr {
            spki_der: info.subject_pki.raw.to_vec(),
            organization: strings(subject.iter_organization())?,
            organizational_unit: strings(subject.iter_organizational_unit())?,
            common_name: strings(subject.iter_common_name())?,
        })
    }

    /// Checks that whatever subject the client asked for names this tenant, role and site
    /// (O, OU, CN). An empty subject is fine: the service fills it in.
    pub fn check_identity(
        &self,
        tenant: &TenantId,
        site: &SiteId,
        role: Role,
    ) -> Result<(), CsrError> {
        let checks: [(&'static str, &Vec<String>, &str); 3] = [
            ("O (tenant)", &self.organization, tenant.as_str()),
            ("OU (role)", &self.organizational_unit, role.as_str()),
            ("CN (site)", &self.common_name, site.as_str()),
        ];
        for (field, requested, expected) in checks {
            if requested.iter().any(|r| r != expected) {
                return Err(CsrError::IdentityMismatch {
                    field,
                    requested: requested.join(","),
                    expected: expected.to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// Builds the CSR an appliance sends: a fresh P-256 key, subject O/OU/CN = tenant/role/site.
/// Returns (key pair, DER CSR). Used by `client` and by tests.
pub fn build_csr(
    tenant: Option<&TenantId>,
    site: Option<&SiteId>,
    role: Option<Role>,
) -> Result<(rcgen::KeyPair, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = build_csr_for_key(&key, tenant, site, role)?;
    Ok((key, csr))
}

/// Like [`build_csr`] for an existing key.
pub fn build_csr_for_key(
    key: &rcgen::KeyPair,
    tenant: Option<&TenantId>,
    site: Option<&SiteId>,
    role: Option<Role>,
) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    if let Some(t) = tenant {
        dn.push(rcgen::DnType::OrganizationName, t.as_str());
    }
    if let Some(r) = role {
        dn.push(rcgen::DnType::OrganizationalUnitName, r.as_str());
    }
    if let Some(s) = site {
        dn.push(rcgen::DnType::CommonName, s.as_str());
    }
    params.distinguished_name = dn;
    Ok(params.serialize_request(key)?.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_csr_verifies_and_its_subject_is_checked() {
        let t = TenantId::parse("nohfelden").unwrap();
        let s = SiteId::parse("rathaus").unwrap();
        let (_, der) = build_csr(Some(&t), Some(&s), Some(Role::Spoke)).unwrap();
        let csr = VerifiedCsr::from_der(&der).unwrap();
        csr.check_identity(&t, &s, Role::Spoke).unwrap();
        let other = TenantId::parse("tholey").unwrap();
        let err = csr.check_identity(&other, &s, Role::Spoke).unwrap_err();
        assert!(err.to_string().contains("O (tenant)"), "{err}");
        assert!(csr.check_identity(&t, &s, Role::Hub).is_err());
        let (_, bare) = build_csr(None, None, None).unwrap();
        VerifiedCsr::from_der(&bare)
            .unwrap()
            .check_identity(&t, &s, Role::Hub)
            .unwrap();
    }

    /// The appliance builds its CSR without rcgen (`komnet_enroll_client::csr`): the service
    /// must accept exactly that shape, with and without a subject.
    #[test]
    fn the_clients_own_csr_verifies_and_names_its_identity() {
        use komnet_enroll_client::csr::new_key_and_csr;
        let identity = crate::identity::Identity {
            tenant: TenantId::parse("nohfelden").unwrap(),
            site: SiteId::parse("rathaus").unwrap(),
            role: Role::Spoke,
            wg_public_key: crate::identity::WgPublicKey::from_bytes([7; 32]).unwrap(),
            tunnel_addrs: Vec::new(),
            not_after: 0,
            serial: "01".into(),
            admitted_until: None,
        };
        let renewal = new_key_and_csr(Some(&identity)).unwrap();
        let csr = VerifiedCsr::from_der(&renewal.csr_der).unwrap();
        csr.check_identity(&identity.tenant, &identity.site, Role::Spoke)
            .unwrap();
        assert!(csr
            .check_identity(&identity.tenant, &identity.site, Role::Hub)
            .is_err());
        let first = new_key_and_csr(None).unwrap();
        VerifiedCsr::from_der(&first.csr_der)
            .unwrap()
            .check_identity(&identity.tenant, &identity.site, Role::Hub)
            .unwrap();
        // A flipped signature bit is caught, so the signature really covers the request.
        let mut bad = first.csr_der.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        assert_eq!(VerifiedCsr::from_der(&bad), Err(CsrError::Signature));
    }

    #[test]
    fn bad_csrs_are_rejected_with_their_reason() {
        let (_, der) = build_csr(None, None, None).unwrap();
        // Flip a bit in the signature (the last bytes).
        let mut bad_sig = der.clone();
        let n = bad_sig.len();
        bad_sig[n - 3] ^= 0x01;
        assert_eq!(VerifiedCsr::from_der(&bad_sig), Err(CsrError::Signature));
        assert!(matches!(
            VerifiedCsr::from_der(b"garbage"),
            Err(CsrError::Invalid(_))
        ));
        assert!(matches!(
            VerifiedCsr::from_der(&[]),
            Err(CsrError::Invalid(_))
        ));
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(matches!(
            VerifiedCsr::from_der(&trailing),
            Err(CsrError::Invalid(_))
        ));
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let der = build_csr_for_key(&key, None, None, None).unwrap();
            assert!(
                matches!(VerifiedCsr::from_der(&der), Err(CsrError::KeyType(_))),
                "{alg:?}"
            );
        }
    }
}
