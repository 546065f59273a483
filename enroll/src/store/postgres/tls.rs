//! TLS to a database server on another machine, as libpq's `sslmode=verify-full`: the server's
//! certificate must chain to enroll.toml's `database_ca` and name the host the connection
//! string gives. Without `database_ca` the connection is plain, for a Unix socket or a server
//! on the same machine; a connection string that asks for TLS then (`sslmode=require`) is
//! refused rather than given a connection whose server nobody checked.

use std::path::Path;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::*;

/// How the store reaches its database.
#[derive(Clone)]
pub(super) enum Transport {
    Plain,
    /// TLS with the server's certificate verified.
    Verified(MakeRustlsConnect),
}

impl Transport {
    /// The transport for `config` and `database_ca`; with a CA, `config` is set to require
    /// TLS (a server that does not offer it is refused, never used in the clear).
    pub(super) fn for_database(
        config: &mut tokio_postgres::Config,
        ca: Option<&Path>,
    ) -> Result<Self, String> {
        let mode = config.get_ssl_mode();
        match ca {
            None if mode == SslMode::Require => Err(
                "the connection string asks for sslmode=require: set database_ca to the \
                 certificate of the CA that signed the server's (komnet verifies it and the \
                 host name, as libpq's verify-full)"
                    .into(),
            ),
            None => Ok(Transport::Plain),
            Some(ca) if mode == SslMode::Disable => Err(format!(
                "database_ca {} is set, but the connection string says sslmode=disable",
                ca.display()
            )),
            Some(ca) => {
                let tls = client_config(ca)?;
                config.ssl_mode(SslMode::Require);
                Ok(Transport::Verified(MakeRustlsConnect::new(tls)))
            }
        }
    }
}

/// Trusts exactly the certificates in the PEM file `ca`.
fn client_config(ca: &Path) -> Result<rustls::ClientConfig, String> {
    let named = |e: &dyn std::fmt::Display| format!("database_ca {}: {e}", ca.display());
    let pem = std::fs::read(ca).map_err(|e| named(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| named(&e))?;
        roots.add(cert).map_err(|e| named(&e))?;
    }
    if roots.is_empty() {
        return Err(named(&"no PEM certificate in it"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| named(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
