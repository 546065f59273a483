//! Any bytes as a CSR and as a certificate: parsing never panics, and a CSR that verifies has a
//! P-256 key the CA can sign.
#![no_main]

use komnet_enroll::csr::VerifiedCsr;
use komnet_enroll::identity::{Role, SiteId, TenantId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = VerifiedCsr::from_der(data) {
        assert!(!csr.spki_der.is_empty());
        let t = TenantId::parse("nohfelden").expect("valid name");
        let s = SiteId::parse("rathaus").expect("valid name");
        let _ = csr.check_identity(&t, &s, Role::Spoke);
        rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der)
            .expect("a verified CSR's key is one rcgen can put in a certificate");
    }
    let _ = komnet_enroll::identity::from_certificate_der(data);
});
