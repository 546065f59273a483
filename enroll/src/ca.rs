//! The certificate authority: an ECDSA P-256 root (whose key can be moved offline after `init`)
//! and an online issuing CA that signs identities, the service's own TLS certificate and CRLs.
//!
//! P-256 with SHA-256 is what BSI TR-02102-1 lists for ECDSA through 2030+; rcgen signs with
//! ring.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use komnet_proto::files::{self, FileError, Visibility};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::api::RevocationReason;
use crate::identity::{identity_uri, wg_key_uri, Role, SiteId, TenantId, WgPublicKey};

pub const ROOT_CERT: &str = "ca/root.pem";
pub const ROOT_KEY: &str = "ca/root.key";
pub const ISSUING_CERT: &str = "ca/issuing.pem";
pub const ISSUING_KEY: &str = "ca/issuing.key";

const ROOT_LIFETIME_SECS: i64 = 10 * 365 * 86_400;
const ISSUING_LIFETIME_SECS: i64 = 3 * 365 * 86_400;
/// The service's own TLS certificate is made at start and renewed while it runs (see
/// `server_cert`), never written to disk.
pub const SERVER_CERT_LIFETIME_SECS: i64 = 30 * 86_400;
/// Certificates are back-dated a little so a client whose clock is slightly behind accepts them.
pub const CLOCK_SKEW_SECS: i64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: already exists; init does not overwrite a CA")]
    Exists { path: PathBuf },
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("time {0} is out of range")]
    Time(i64),
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Rcgen { what, source }
}

pub(crate) fn datetime(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|_| CaError::Time(unix))
}

/// Writes a file readable by its owner only, refusing to replace an existing one.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    files::create_new(path, contents, Visibility::Secret).map_err(file_err)
}

fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    files::create_new(path, contents, Visibility::Public).map_err(file_err)
}

fn file_err(e: FileError) -> CaError {
    match e {
        FileError::Exists { path } => CaError::Exists { path },
        FileError::Io { path, source } => CaError::Io { path, source },
    }
}

pub use komnet_enroll_client::fingerprint;

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "komnet");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;
    params
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and never with a leading zero byte, so the hex form is stable and 16 bytes long.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// What `init` reports.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub root_fingerprint: String,
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
}

/// Creates the root and issuing CA under `DATA_DIR/ca/`. Refuses to overwrite.
pub fn init_ca(data_dir: &Path, now: i64) -> Result<InitReport, CaError> {
    let ca_dir = data_dir.join("ca");
    fs::create_dir_all(&ca_dir).map_err(io_err(&ca_dir))?;
    fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&ca_dir))?;
    for f in [ROOT_CERT, ROOT_KEY, ISSUING_CERT, ISSUING_KEY] {
        let p = data_dir.join(f);
        if p.exists() {
            return Err(CaError::Exists { path: p });
        }
    }

    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc("root key"))?;
    let mut root_params = ca_params("komnet root CA", Some(1));
    root_params.not_before = datetime(now - CLOCK_SKEW_SECS)?;
    root_params.not_after = datetime(now + ROOT_LIFETIME_SECS)?;
    root_params.serial_number = Some(random_serial());
    let root_cert = root_params
        .self_signed(&root_key)
        .map_err(rc("root certificate"))?;
    let root_issuer = Issuer::new(root_params, root_key);

    let issuing_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc("issuing key"))?;
    let mut issuing_params = ca_params("komnet issuing CA", Some(0));
    issuing_params.not_before = datetime(now - CLOCK_SKEW_SECS)?;
    issuing_params.not_after = datetime(now + ISSUING_LIFETIME_SECS)?;
    issuing_params.serial_number = Some(random_serial());
    let issuing_cert = issuing_params
        .signed_by(&issuing_key, &root_issuer)
        .map_err(rc("issuing certificate"))?;

    write_secret_file(
        &data_dir.join(ROOT_KEY),
        root_issuer.key().serialize_pem().as_bytes(),
    )?;
    write_secret_file(
        &data_dir.join(ISSUING_KEY),
        issuing_key.serialize_pem().as_bytes(),
    )?;
    write_public_file(&data_dir.join(ROOT_CERT), root_cert.pem().as_bytes())?;
    write_public_file(&data_dir.join(ISSUING_CERT), issuing_cert.pem().as_bytes())?;
    Ok(InitReport {
        root_fingerprint: fingerprint(root_cert.der()),
        root_cert: data_dir.join(ROOT_CERT),
        root_key: data_dir.join(ROOT_KEY),
    })
}

/// What goes into an identity certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec<'a> {
    pub tenant: &'a TenantId,
    pub site: &'a SiteId,
    pub role: Role,
    pub wg_public_key: &'a WgPublicKey,
    pub tunnel_addrs: &'a [IpNet],
    pub not_before: i64,
    pub not_after: i64,
}

/// A freshly signed certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub serial: String,
}

/// The online issuing CA, loaded from the data directory. The root key is not needed here.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    pub issuing_der: CertificateDer<'static>,
    pub issuing_pem: String,
    pub root_der: CertificateDer<'static>,
    pub root_pem: String,
    pub root_fingerprint: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("root_fingerprint", &self.root_fingerprint)
            .finish_non_exhaustive()
    }
}

fn read_pem_der(path: &Path) -> Result<(String, CertificateDer<'static>), CaError> {
    use rustls_pki_types::pem::PemObject as _;
    let pem = fs::read_to_string(path).map_err(io_err(path))?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok((pem, der))
}

impl CertificateAuthority {
    pub fn load(data_dir: &Path) -> Result<Self, CaError> {
        let (root_pem, root_der) = read_pem_der(&data_dir.join(ROOT_CERT))?;
        let (issuing_pem, issuing_der) = read_pem_der(&data_dir.join(ISSUING_CERT))?;
        let key_path = data_dir.join(ISSUING_KEY);
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(rc("issuing key"))?;
        let issuer =
            Issuer::from_ca_cert_der(&issuing_der, key).map_err(rc("issuing certificate"))?;
        Ok(CertificateAuthority {
            issuer,
            root_fingerprint: fingerprint(&root_der),
            issuing_der,
            issuing_pem,
            root_der,
            root_pem,
        })
    }

    /// Signs an identity certificate for `subject_key` (a DER SubjectPublicKeyInfo).
    ///
    /// The identity goes into the subject (O = tenant, OU = role, CN = site) and the SAN
    /// (identity URI, WireGuard key URI, tunnel addresses); the CSR's own requested names and
    /// extensions are never copied.
    pub fn issue_identity(
        &self,
        subject_key_spki: &[u8],
        spec: &LeafSpec<'_>,
    ) -> Result<Issued, CaError> {
        let spki =
            SubjectPublicKeyInfo::from_der(subject_key_spki).map_err(rc("subject public key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, spec.tenant.as_str());
        dn.push(DnType::OrganizationalUnitName, spec.role.as_str());
        dn.push(DnType::CommonName, spec.site.as_str());
        params.distinguished_name = dn;
        let uri = |s: String| -> Result<SanType, CaError> {
            Ok(SanType::URI(s.try_into().map_err(rc("SAN URI"))?))
        };
        params.subject_alt_names = vec![
            uri(identity_uri(spec.tenant, spec.site, spec.role))?,
            uri(wg_key_uri(spec.wg_public_key))?,
        ];
        for net in spec.tunnel_addrs {
            params
                .subject_alt_names
                .push(SanType::IpAddress(net.addr()));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = datetime(spec.not_before)?;
        params.not_after = datetime(spec.not_after)?;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&spki, &self.issuer)
            .map_err(rc("identity certificate"))?;
        Ok(Issued {
            pem: cert.pem(),
            der: cert.der().clone(),
            serial: serial_hex,
        })
    }

    /// A fresh TLS server certificate and key for the service (kept in memory only).
    pub fn server_tls(
        &self,
        names: &[String],
        now: i64,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc("server key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "komnet");
        dn.push(DnType::CommonName, "komnet enrollment service");
        params.distinguished_name = dn;
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().map_err(rc("server name"))?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = datetime(now - CLOCK_SKEW_SECS)?;
        params.not_after = datetime(now + SERVER_CERT_LIFETIME_SECS)?;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rc("server certificate"))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.issuing_der.clone()], key_der))
    }

    /// A certificate and key for a home-office identity: the stock WireGuard app never uses
    /// x509, so the key is made here and dropped; the certificate is the signed record of the
    /// identity (serial, lifetime, CRL entry on revocation).
    pub fn issue_identity_with_throwaway_key(
        &self,
        spec: &LeafSpec<'_>,
    ) -> Result<Issued, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc("identity key"))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        self.issue_identity(&spki, spec)
    }

    /// A CRL over the given revoked serials, valid for `validity_secs`.
    pub fn crl(
        &self,
        revoked: &[RevokedEntry],
        crl_number: u64,
        now: i64,
        validity_secs: i64,
    ) -> Result<Vec<u8>, CaError> {
        let mut list = Vec::with_capacity(revoked.len());
        for entry in revoked {
            let serial = hex::decode(&entry.serial).map_err(|_| CaError::Pem {
                path: PathBuf::from("store"),
                message: format!("serial {:?} is not hex", entry.serial),
            })?;
            list.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: datetime(entry.revoked_at)?,
                reason_code: Some(match entry.reason {
                    RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
                    RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
                    RevocationReason::AffiliationChanged => {
                        rcgen::RevocationReason::AffiliationChanged
                    }
                    RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
                    RevocationReason::CessationOfOperation => {
                        rcgen::RevocationReason::CessationOfOperation
                    }
                    RevocationReason::PrivilegeWithdrawn => {
                        rcgen::RevocationReason::PrivilegeWithdrawn
                    }
                }),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: datetime(now)?,
            next_update: datetime(now + validity_secs)?,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: list,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(rc("CRL"))?;
        Ok(crl.der().to_vec())
    }
}

/// A revoked certificate as the CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    pub serial: String,
    pub revoked_at: i64,
    pub reason: RevocationReason,
}
