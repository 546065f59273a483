//! The identity in a certificate: komnet's names and [`Identity`] come from `komnet-proto`;
//! this module reads them back from a certificate the CA wrote ([`from_certificate_der`]), so a
//! hub needs nothing but the certificate.

use std::net::IpAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ipnet::IpNet;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

pub use komnet_proto::identity::*;

/// Reads the identity a komnet CA wrote into a certificate. It does not check the
/// signature or validity period: that is the TLS verifier's job.
pub fn from_certificate_der(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::CertificateParse(e.to_string()))?;
    let mut ident: Option<(TenantId, SiteId, Role)> = None;
    let mut wg_key = None;
    let mut addrs = Vec::new();
    for ext in cert.extensions() {
        let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
            continue;
        };
        for name in &san.general_names {
            match name {
                GeneralName::URI(uri) => {
                    if let Some(rest) = uri.strip_prefix(SAN_IDENTITY_PREFIX) {
                        let mut parts = rest.split(':');
                        let (Some(t), Some(s), Some(r), None) =
                            (parts.next(), parts.next(), parts.next(), parts.next())
                        else {
                            return Err(IdentityError::CertificateMissing(
                                "identity URI is not tenant:site:role",
                            ));
                        };
                        ident = Some((TenantId::parse(t)?, SiteId::parse(s)?, r.parse()?));
                    } else if let Some(rest) = uri.strip_prefix(SAN_WG_KEY_PREFIX) {
                        let raw = URL_SAFE_NO_PAD
                            .decode(rest)
                            .map_err(|e| IdentityError::WgKeyEncoding(e.to_string()))?;
                        let bytes: [u8; 32] = raw.try_into().map_err(|v: Vec<u8>| {
                            IdentityError::WgKeyEncoding(format!("{} bytes", v.len()))
                        })?;
                        wg_key = Some(WgPublicKey::from_bytes(bytes)?);
                    }
                }
                GeneralName::IPAddress(raw) => {
                    let ip =
                        match raw.len() {
                            4 => IpAddr::from(<[u8; 4]>::try_from(*raw).map_err(|_| {
                                IdentityError::CertificateMissing("bad IPv4 address")
                            })?),
                            16 => IpAddr::from(<[u8; 16]>::try_from(*raw).map_err(|_| {
                                IdentityError::CertificateMissing("bad IPv6 address")
                            })?),
                            _ => {
                                return Err(IdentityError::CertificateMissing(
                                    "IP address SAN of odd length",
                                ))
                            }
                        };
                    addrs.push(IpNet::from(ip));
                }
                _ => {}
            }
        }
    }
    let (tenant, site, role) = ident.ok_or(IdentityError::CertificateMissing("no identity URI"))?;
    let wg_public_key = wg_key.ok_or(IdentityError::CertificateMissing("no WireGuard key URI"))?;
    Ok(Identity {
        tenant,
        site,
        role,
        wg_public_key,
        tunnel_addrs: addrs,
        not_after: cert.validity().not_after.timestamp(),
        serial: hex::encode(cert.raw_serial()),
        admitted_until: None,
    })
}
