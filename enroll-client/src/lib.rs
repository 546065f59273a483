//! komnet-enroll-client: the client library an appliance (the gateway) and a hub call: first
//! enrollment from a bootstrap file, renewal over mutual TLS, following the registry, and
//! fetching the signed policy bundle and the hub list. It builds its own CSR ([`csr`]) and the
//! WireGuard possession proof ([`proof`]).
//!
//! It owns no server, no database and no certificate authority: those are `komnet-enroll`'s,
//! and an appliance never compiles them (`scripts/check-crate-graph.sh`).
//!
//! It trusts exactly one root: the one in the bootstrap file, after checking it against the
//! pinned fingerprint. Service URLs are tried in order; the first that answers decides (an
//! answer that refuses is final, only connection failures move on to the next URL).
//!
//! ```no_run
//! # async fn first_boot() -> Result<(), komnet_enroll_client::ClientError> {
//! use komnet_enroll_client::{self as client, WgKeys};
//! use komnet_proto::bootstrap::Bootstrap;
//! let bootstrap = Bootstrap::read("/media/usb/komnet-bootstrap.json".as_ref()).unwrap();
//! let keys = WgKeys::generate();
//! let enrollment = client::enroll(&bootstrap, &keys).await?;
//! enrollment.save("/var/lib/komnet/enrollment.json".as_ref()).unwrap();
//! // ... from enrollment.renew_after on:
//! let renewed = client::renew(&enrollment, &keys).await?;
//! # let _ = renewed; Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod csr;
pub mod proof;
mod registry;
mod transport;

pub use registry::{RegistryFollower, RegistryItem};
pub use transport::Client;

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hyper::{Method, StatusCode};
use ipnet::IpNet;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x25519_dalek::StaticSecret;

use komnet_proto::api::{
    self, ApiError, EnrollRequest, EnrollResponse, HubPeer, RegistrySnapshot, RenewRequest,
    ServiceInfo,
};
use komnet_proto::bootstrap::Bootstrap;
use komnet_proto::files::{write_atomic, FileError, Visibility};
use komnet_proto::identity::{Identity, WgPublicKey};
use transport::MAX_RESPONSE_BYTES;

/// Largest registry snapshot read (about 250 bytes a peer: room for ~250,000 peers).
const MAX_SNAPSHOT_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bootstrap: the root CA's fingerprint {actual} is not the pinned {expected}")]
    PinMismatch { expected: String, actual: String },
    #[error("{0}")]
    Config(String),
    #[error("{url}: cannot connect: {message}")]
    Connect { url: String, message: String },
    #[error("{url}: the service refused ({status}): {error}")]
    Api {
        url: String,
        status: u16,
        error: ApiError,
    },
    #[error("{url}: unexpected answer: {message}")]
    Protocol { url: String, message: String },
}

impl ClientError {
    /// The service's typed error, if it answered with one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A WireGuard key pair held by the appliance; the private half never leaves it.
#[derive(Clone)]
pub struct WgKeys {
    secret: StaticSecret,
}

impl std::fmt::Debug for WgKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgKeys")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl WgKeys {
    pub fn generate() -> Self {
        WgKeys {
            secret: StaticSecret::from(rand::random::<[u8; 32]>()),
        }
    }

    pub fn from_secret(secret: StaticSecret) -> Self {
        WgKeys { secret }
    }

    /// The private key in wg's base64 form (for a wg-quick file; handle with care).
    pub fn private_base64(&self) -> String {
        STANDARD.encode(self.secret.to_bytes())
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    pub fn public(&self) -> WgPublicKey {
        let bytes = x25519_dalek::PublicKey::from(&self.secret).to_bytes();
        // A clamped scalar times the base point is never a low-order point.
        WgPublicKey::from_bytes(bytes).unwrap_or_else(|_| unreachable_key())
    }
}

#[allow(clippy::unwrap_used)]
fn unreachable_key() -> WgPublicKey {
    // Only reachable if x25519 were broken; keep a panic out of the type signature anyway.
    WgPublicKey::from_bytes([9; 32]).unwrap()
}

/// What an appliance keeps after enrolling: its identity, certificate, TLS key and where to
/// renew. Stored as JSON with mode 0600 (it holds the TLS private key).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub identity: Identity,
    pub certificate_chain_pem: String,
    pub private_key_pem: String,
    pub root_ca_pem: String,
    pub enroll_urls: Vec<String>,
    /// The service's proof key, from the bootstrap file.
    pub wg_proof_public_key: WgPublicKey,
    pub renew_after: i64,
    pub hub_endpoints: Vec<String>,
    pub hubs: Vec<HubPeer>,
    pub allowed_ips: Vec<IpNet>,
    pub policy_version: u64,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("identity", &self.identity)
            .field("renew_after", &self.renew_after)
            .field("hub_endpoints", &self.hub_endpoints)
            .finish_non_exhaustive()
    }
}

impl Enrollment {
    fn from_response(
        resp: EnrollResponse,
        private_key_pem: String,
        root_ca_pem: String,
        enroll_urls: Vec<String>,
        wg_proof_public_key: WgPublicKey,
    ) -> Self {
        Enrollment {
            identity: resp.identity,
            certificate_chain_pem: resp.certificate_chain_pem,
            private_key_pem,
            root_ca_pem,
            enroll_urls,
            wg_proof_public_key,
            renew_after: resp.renew_after,
            hub_endpoints: resp.hub_endpoints,
            hubs: resp.hubs,
            allowed_ips: resp.allowed_ips,
            policy_version: resp.policy_version,
        }
    }

    /// Writes the enrollment atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), FileError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| FileError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(path, text.as_bytes(), Visibility::Secret)
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }
}

/// The service back-dates its certificate by this much (its own `CLOCK_SKEW_SECS`): its clock
/// read the certificate's notBefore plus this when it made it.
const SERVICE_BACKDATE_SECS: i64 = 300;

/// A TLS failure in words; a certificate "not valid yet" or "expired" on the appliance's side
/// means its clock is wrong, which is what a field technician can fix.
pub(crate) fn describe_tls_error(e: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    let cert_error = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(c) => Some(c),
            _ => None,
        });
    match cert_error {
        Some(C::NotValidYetContext { time, not_before }) => {
            let here = time.as_secs() as i64;
            let service = not_before.as_secs() as i64 + SERVICE_BACKDATE_SECS;
            clock_skew_message(here, service)
        }
        Some(C::ExpiredContext { time, not_after }) => {
            let here = time.as_secs() as i64;
            let until = not_after.as_secs() as i64;
            format!(
                "this appliance's clock ({}) is past the end of the enrollment service's \
                 certificate ({}), which the service renews long before: the clock is at least {} \
                 ahead; check NTP",
                utc(here),
                utc(until),
                span(here - until)
            )
        }
        _ => format!("TLS: {e}"),
    }
}

/// "this appliance's clock is 1 day behind the enrollment service …", with both times.
pub fn clock_skew_message(appliance_now: i64, service_now: i64) -> String {
    let behind = service_now - appliance_now;
    let (amount, direction) = if behind >= 0 {
        (behind, "behind")
    } else {
        (-behind, "ahead of")
    };
    format!(
        "this appliance's clock is {} {direction} the enrollment service (appliance: {}, \
         service: about {}); check NTP",
        span(amount),
        utc(appliance_now),
        utc(service_now)
    )
}

/// A Unix time as `2026-12-02 10:00 UTC`, for messages people read.
pub fn utc(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{} {:02}:{:02} UTC",
            t.date(),
            t.time().hour(),
            t.time().minute()
        ),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

/// A duration as people say it: the largest unit, rounded down.
fn span(secs: i64) -> String {
    let plural = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    match secs {
        s if s >= 86_400 => plural(s / 86_400, "day"),
        s if s >= 3600 => plural(s / 3600, "hour"),
        s if s >= 60 => plural(s / 60, "minute"),
        s => plural(s.max(0), "second"),
    }
}

fn check_pin(bootstrap: &Bootstrap) -> Result<(), ClientError> {
    let der = CertificateDer::from_pem_slice(bootstrap.root_ca_pem.as_bytes())
        .map_err(|e| ClientError::Config(format!("bootstrap root CA: {e}")))?;
    let actual = fingerprint(&der);
    let expected = bootstrap
        .root_fingerprint
        .to_ascii_lowercase()
        .replace(':', "");
    if actual != expected {
        return Err(ClientError::PinMismatch { expected, actual });
    }
    Ok(())
}

/// Lower-case hex SHA-256 of a DER certificate: the pin appliances compare the root against.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

fn key_request(
    keys: &WgKeys,
    service_key: &WgPublicKey,
    csr_der: &[u8],
) -> (String, String, String) {
    let proof = proof::prove(keys.secret(), service_key, csr_der);
    (
        STANDARD.encode(csr_der),
        keys.public().to_base64(),
        STANDARD.encode(proof),
    )
}

fn new_csr(identity: Option<&Identity>) -> Result<csr::NewKey, ClientError> {
    csr::new_key_and_csr(identity).map_err(|e| ClientError::Config(e.to_string()))
}

/// First enrollment: the bootstrap file's token buys an identity for the WireGuard key, with
/// a fresh TLS key.
pub async fn enroll(bootstrap: &Bootstrap, keys: &WgKeys) -> Result<Enrollment, ClientError> {
    enroll_with_key(bootstrap, keys, &new_csr(None)?).await
}

/// A fresh TLS key and CSR for a first enrollment, for a caller that keeps them (with the
/// WireGuard key) until the answer is saved: see [`enroll_with_key`].
pub fn new_enrollment_key() -> Result<csr::NewKey, ClientError> {
    new_csr(None)
}

/// First enrollment with a TLS key and CSR the caller made before and kept: a retry after a
/// lost answer (the service committed, the connection broke, or the appliance restarted) with
/// the same token, WireGuard key and TLS key gets the same certificate again, where a fresh key
/// would be refused as `token_used`.
pub async fn enroll_with_key(
    bootstrap: &Bootstrap,
    keys: &WgKeys,
    key: &csr::NewKey,
) -> Result<Enrollment, ClientError> {
    check_pin(bootstrap)?;
    let client = Client::new(&bootstrap.root_ca_pem, None, &bootstrap.enroll_urls)?;
    let (csr, wg_public_key, wg_proof) =
        key_request(keys, &bootstrap.wg_proof_public_key, &key.csr_der);
    let body = request_body(&EnrollRequest {
        token: bootstrap.token.clone(),
        csr,
        wg_public_key,
        wg_proof,
    })?;
    let resp: EnrollResponse = client
        .call(Method::POST, api::routes::ENROLL, Some(body))
        .await?;
    Ok(Enrollment::from_response(
        resp,
        key.private_key_pem.clone(),
        bootstrap.root_ca_pem.clone(),
        bootstrap.enroll_urls.clone(),
        bootstrap.wg_proof_public_key,
    ))
}

fn request_body(request: &impl Serialize) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(request).map_err(|e| ClientError::Config(format!("request: {e}")))
}

/// Renewal over mutual TLS with the current certificate; `keys` may be the same WireGuard key
/// or a new one. A fresh TLS key is made every time.
pub async fn renew(current: &Enrollment, keys: &WgKeys) -> Result<Enrollment, ClientError> {
    Client::for_enrollment(current)?.renew(current, keys).await
}

/// The valid peers now (a hub calls this at start, then follows from its version). One
/// connection for this call; see [`Client::registry_snapshot`].
pub async fn registry_snapshot(hub: &Enrollment) -> Result<RegistrySnapshot, ClientError> {
    Client::for_enrollment(hub)?.registry_snapshot().await
}

/// The service's CA certificates and proof key (`GET /v1/info`), trusting the given root.
pub async fn service_info(root_ca_pem: &str, urls: &[String]) -> Result<ServiceInfo, ClientError> {
    Client::new(root_ca_pem, None, urls)?.service_info().await
}

/// What [`Client::fetch_policy`] found.
#[derive(Clone, PartialEq, Eq)]
pub enum PolicyFetch {
    /// The published version is the one the caller has.
    NotModified,
    /// Nothing is published yet.
    NoneYet,
    /// The signed bundle as published; the caller verifies it with its pinned key
    /// (`komnet_policy::bundle`) before using it, the service's word is not enough.
    Bundle { version: u64, bytes: Vec<u8> },
}

impl std::fmt::Debug for PolicyFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyFetch::NotModified => f.write_str("NotModified"),
            PolicyFetch::NoneYet => f.write_str("NoneYet"),
            PolicyFetch::Bundle { version, bytes } => f
                .debug_struct("Bundle")
                .field("version", version)
                .field("bytes", &bytes.len())
                .finish(),
        }
    }
}

/// The published policy bundle; one connection for this call, see [`Client::fetch_policy`].
pub async fn fetch_policy(
    current: &Enrollment,
    have: Option<u64>,
) -> Result<PolicyFetch, ClientError> {
    Client::for_enrollment(current)?.fetch_policy(have).await
}

/// The hubs; one connection for this call, see [`Client::fetch_hubs`].
pub async fn fetch_hubs(current: &Enrollment) -> Result<Vec<HubPeer>, ClientError> {
    Client::for_enrollment(current)?.fetch_hubs().await
}

/// The DER CRL (public).
pub async fn fetch_crl(root_ca_pem: &str, urls: &[String]) -> Result<Vec<u8>, ClientError> {
    Client::new(root_ca_pem, None, urls)?.fetch_crl().await
}

/// Follows the registry from `since`; see [`Client::follow_registry`].
pub async fn follow_registry(
    hub: &Enrollment,
    since: u64,
) -> Result<RegistryFollower, ClientError> {
    Client::for_enrollment(hub)?.follow_registry(since).await
}

/// The calls of an enrolled appliance (mutual TLS) and the public ones.
impl Client {
    /// A client for an enrolled appliance: the enrollment's root, its certificate for mutual
    /// TLS and its service URLs. A renewed enrollment needs a new client.
    pub fn for_enrollment(e: &Enrollment) -> Result<Self, ClientError> {
        Client::new(
            &e.root_ca_pem,
            Some((&e.certificate_chain_pem, &e.private_key_pem)),
            &e.enroll_urls,
        )
    }

    /// Renewal (`POST /v1/renew`); see [`renew`].
    pub async fn renew(
        &self,
        current: &Enrollment,
        keys: &WgKeys,
    ) -> Result<Enrollment, ClientError> {
        let key = new_csr(Some(&current.identity))?;
        let (csr, wg_public_key, wg_proof) =
            key_request(keys, &current.wg_proof_public_key, &key.csr_der);
        let body = request_body(&RenewRequest {
            csr,
            wg_public_key,
            wg_proof,
        })?;
        let resp: EnrollResponse = self
            .call(Method::POST, api::routes::RENEW, Some(body))
            .await?;
        Ok(Enrollment::from_response(
            resp,
            key.private_key_pem,
            current.root_ca_pem.clone(),
            current.enroll_urls.clone(),
            current.wg_proof_public_key,
        ))
    }

    /// The valid peers now (`GET /v1/registry`; a hub calls this at start, then follows from
    /// its version).
    pub async fn registry_snapshot(&self) -> Result<RegistrySnapshot, ClientError> {
        self.call_limited(Method::GET, api::routes::REGISTRY, None, MAX_SNAPSHOT_BYTES)
            .await
    }

    /// The service's CA certificates and proof key (`GET /v1/info`).
    pub async fn service_info(&self) -> Result<ServiceInfo, ClientError> {
        self.call(Method::GET, api::routes::INFO, None).await
    }

    /// The published policy bundle (`GET /v1/policy`) over mutual TLS with the appliance's
    /// certificate; `have` is the version the caller runs, if any.
    pub async fn fetch_policy(&self, have: Option<u64>) -> Result<PolicyFetch, ClientError> {
        let path = match have {
            Some(v) => format!("{}?have={v}", api::routes::POLICY),
            None => api::routes::POLICY.to_owned(),
        };
        let (resp, conn) = self.send(Method::GET, &path, None).await?;
        let status = resp.status();
        let version = resp
            .headers()
            .get(api::POLICY_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = conn
            .read_body(resp, komnet_policy::bundle::MAX_BUNDLE_BYTES)
            .await?;
        let result = if status == StatusCode::NOT_MODIFIED {
            Ok(PolicyFetch::NotModified)
        } else if status != StatusCode::OK {
            conn.api_error(status, &bytes).and_then(|error| {
                if error.code == api::ErrorCode::NoPolicy {
                    Ok(PolicyFetch::NoneYet)
                } else {
                    Err(ClientError::Api {
                        url: conn.url.clone(),
                        status: status.as_u16(),
                        error,
                    })
                }
            })
        } else {
            match version {
                Some(version) => Ok(PolicyFetch::Bundle {
                    version,
                    bytes: bytes.to_vec(),
                }),
                None => Err(conn.protocol(format!(
                    "policy bundle without a valid {} header",
                    api::POLICY_VERSION_HEADER
                ))),
            }
        };
        self.keep(conn);
        result
    }

    /// A hub's report of its peers (`POST /v1/hub/report`).
    pub async fn report_hub(
        &self,
        report: &komnet_proto::status::HubReport,
    ) -> Result<(), ClientError> {
        let body = request_body(report)?;
        let _: serde_json::Value = self
            .call(Method::POST, api::routes::HUB_REPORT, Some(body))
            .await?;
        Ok(())
    }

    /// The hubs (`GET /v1/hubs`) with their keys, tunnel addresses and endpoints, by site: a
    /// spoke that enrolled before a hub existed learns of it here.
    pub async fn fetch_hubs(&self) -> Result<Vec<HubPeer>, ClientError> {
        self.call(Method::GET, api::routes::HUBS, None).await
    }

    /// The DER CRL (`GET /v1/crl`, public).
    pub async fn fetch_crl(&self) -> Result<Vec<u8>, ClientError> {
        let (resp, conn) = self.send(Method::GET, api::routes::CRL, None).await?;
        if resp.status() != StatusCode::OK {
            return Err(conn.protocol(format!("CRL: status {}", resp.status())));
        }
        let body = conn.read_body(resp, MAX_RESPONSE_BYTES * 16).await?;
        self.keep(conn);
        Ok(body.to_vec())
    }

    /// Follows the registry from `since` (0: the whole history; usually a snapshot's version).
    /// The stream has a connection of its own for as long as it runs.
    pub async fn follow_registry(&self, since: u64) -> Result<RegistryFollower, ClientError> {
        let path = format!("{}?since={since}", api::routes::REGISTRY_EVENTS);
        let (resp, conn) = self.send(Method::GET, &path, None).await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let bytes = conn
                .read_body(resp, MAX_RESPONSE_BYTES)
                .await
                .unwrap_or_default();
            let error = serde_json::from_slice(&bytes).map_err(|_| {
                conn.protocol(format!("status {} without a typed error", status.as_u16()))
            })?;
            return Err(ClientError::Api {
                url: conn.url.clone(),
                status: status.as_u16(),
                error,
            });
        }
        // An older service announces nothing and sends keep-alives at the default interval.
        let keepalive = resp
            .headers()
            .get(api::REGISTRY_KEEPALIVE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| (1..=300).contains(s))
            .unwrap_or(api::REGISTRY_DEFAULT_KEEPALIVE_SECS);
        Ok(RegistryFollower::new(
            conn,
            resp.into_body(),
            since,
            Duration::from_secs(keepalive),
        ))
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn a_wrong_clock_is_told_in_words_with_both_times() {
        // 2026-12-02 10:00 UTC on the service, the appliance a day behind.
        let service = 1_796_205_600;
        let m = clock_skew_message(service - 86_400, service);
        assert_eq!(
            m,
            "this appliance's clock is 1 day behind the enrollment service (appliance: \
             2026-12-01 10:00 UTC, service: about 2026-12-02 10:00 UTC); check NTP"
        );
        let m = clock_skew_message(service + 3 * 3600 + 59, service);
        assert!(
            m.starts_with("this appliance's clock is 3 hours ahead of"),
            "{m}"
        );
        assert_eq!(span(59), "59 seconds");
        assert_eq!(span(120), "2 minutes");
    }
}
