//! The service's own TLS certificate, renewed while the service runs.
//!
//! The certificate (30 days) is made at start. A service that runs longer than that would
//! otherwise fail every renewal, policy poll and registry stream after 30 days, and the district
//! would go dark when the appliances' certificates lapse. The resolver hands rustls the current
//! certificate; [`RotatingServerCert::renew_if_due`] replaces it, atomically for new handshakes,
//! once two thirds of its lifetime have passed.

use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::ca::{CaError, CertificateAuthority, CLOCK_SKEW_SECS, SERVER_CERT_LIFETIME_SECS};

/// One server certificate and when it is valid.
#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    not_before: i64,
    not_after: i64,
}

/// Why a server certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServerCertError {
    #[error("server certificate: {0}")]
    Ca(#[from] CaError),
    #[error("server certificate key: {0}")]
    Key(String),
}

/// The current server certificate, swapped while the service runs.
#[derive(Debug)]
pub struct RotatingServerCert {
    provider: Arc<CryptoProvider>,
    names: Vec<String>,
    current: RwLock<Current>,
}

/// What a renewal check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still in the first two thirds of its lifetime.
    NotDue,
    /// Replaced; the new one is valid until `not_after`.
    Renewed { not_after: i64 },
}

impl RotatingServerCert {
    pub fn new(
        ca: &CertificateAuthority,
        names: &[String],
        now: i64,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ServerCertError> {
        let current = make(ca, names, now, &provider)?;
        Ok(RotatingServerCert {
            provider,
            names: names.to_vec(),
            current: RwLock::new(current),
        })
    }

    /// When the certificate in use became valid (Unix seconds).
    pub fn not_before(&self) -> i64 {
        self.current.read().not_before
    }

    /// When the certificate in use expires (Unix seconds).
    pub fn not_after(&self) -> i64 {
        self.current.read().not_after
    }

    /// When the next renewal is due: two thirds into the lifetime.
    pub fn renew_at(&self) -> i64 {
        let c = self.current.read();
        c.not_before + (c.not_after - c.not_before) * 2 / 3
    }

    /// Renews the certificate when two thirds of its lifetime have passed at `now`.
    pub fn renew_if_due(
        &self,
        ca: &CertificateAuthority,
        now: i64,
    ) -> Result<Renewal, ServerCertError> {
        if now < self.renew_at() {
            return Ok(Renewal::NotDue);
        }
        let next = make(ca, &self.names, now, &self.provider)?;
        let not_after = next.not_after;
        *self.current.write() = next;
        Ok(Renewal::Renewed { not_after })
    }
}

impl ResolvesServerCert for RotatingServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().key.clone())
    }
}

fn make(
    ca: &CertificateAuthority,
    names: &[String],
    now: i64,
    provider: &CryptoProvider,
) -> Result<Current, ServerCertError> {
    let (chain, key) = ca.server_tls(names, now)?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| ServerCertError::Key(e.to_string()))?;
    Ok(Current {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        not_before: now - CLOCK_SKEW_SECS,
        not_after: now + SERVER_CERT_LIFETIME_SECS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca;

    /// A year of the service's life in 6-hour steps: the certificate in use is never expired
    /// and never older than two thirds of its lifetime when checked.
    #[test]
    fn a_year_of_renewals_never_lets_the_certificate_lapse() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_800_000_000;
        ca::init_ca(dir.path(), t0).unwrap();
        let authority = CertificateAuthority::load(dir.path()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let names = vec!["enroll.dc.example".to_string()];
        let cert = RotatingServerCert::new(&authority, &names, t0, provider).unwrap();
        let mut renewals = 0;
        let mut now = t0;
        while now < t0 + 365 * 86_400 {
            now += 6 * 3600;
            if let Renewal::Renewed { not_after } = cert.renew_if_due(&authority, now).unwrap() {
                renewals += 1;
                assert_eq!(not_after, now + SERVER_CERT_LIFETIME_SECS);
            }
            assert!(now < cert.not_after(), "expired at {now}");
            assert!(
                cert.not_after() - now > SERVER_CERT_LIFETIME_SECS / 3 - 6 * 3600,
                "less than a third left at {now}"
            );
        }
        // Every 20 days: 18 renewals in a year.
        assert!((17..=19).contains(&renewals), "{renewals} renewals");
    }
}
