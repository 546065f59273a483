//! The HTTPS service (axum on hyper, rustls with ring, TLS 1.3 only) and the admin socket.
//!
//! Our own accept loop instead of `axum::serve`: it bounds the TLS handshake by a timeout, hands
//! each request the client's address and verified certificate (mutual TLS is optional at the
//! TLS layer and required by the routes that need it), and caps concurrent connections.
//! Handlers take what they need through extractors (`extract.rs`): the connection's address
//! and certificate, a JSON body under a size and a time limit, with typed JSON errors for
//! each. Public routes are in `routes.rs`, the admin socket's in `admin_routes.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::Service as _;

use crate::api::{self, admin, ApiError, ErrorCode, RegistryEvent};

mod admin_routes;
mod extract;
mod limits;
pub mod metrics;
mod routes;

use crate::identity::Role;
use crate::server_cert::{Renewal, RotatingServerCert};
use crate::service::{Clock, PolicyAnswer, Service};
use crate::store::CertificateRecord;
use admin_routes::admin_router;
pub use extract::ConnInfo;
use extract::*;
pub use limits::{source_key, RateLimiter, RefusalLog, SourceConnections, SourceSlot};
use routes::public_router;

/// File name of the admin socket inside the data directory.
pub const ADMIN_SOCKET: &str = "admin.sock";

#[derive(Debug)]
struct AppState {
    service: Arc<Service>,
    limiter: RateLimiter,
    refusals: RefusalLog,
    followers: Arc<metrics::Followers>,
}

type Shared = Arc<AppState>;

/// Checks client certificates against the CA with the service's clock, and lets an expired
/// (but otherwise valid) certificate through so the route can answer `certificate_expired` in
/// JSON instead of a bare TLS alert. Every route that reads the certificate checks its expiry
/// and revocation against the store.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    clock: Arc<dyn Clock>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let now = UnixTime::since_unix_epoch(Duration::from_secs(self.clock.now().max(0) as u64));
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                let not_after = x509_parser::parse_x509_certificate(end_entity)
                    .map(|(_, c)| c.validity().not_after.timestamp())
                    .map_err(|_| {
                        rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
                    })?;
                let at_expiry =
                    UnixTime::since_unix_epoch(Duration::from_secs((not_after - 1).max(0) as u64));
                self.inner
                    .verify_client_cert(end_entity, intermediates, at_expiry)
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("applying [mfa_window] to the home-office devices: {0}")]
    MfaConfig(String),
}

fn tls_config(
    service: &Service,
) -> Result<(rustls::ServerConfig, Arc<RotatingServerCert>), ServeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(service.ca.root_der.clone())
        .map_err(|e| ServeError::Tls(format!("root CA: {e}")))?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServeError::Tls(format!("client verifier: {e}")))?;
    let verifier = Arc::new(ClientVerifier {
        inner,
        clock: service.clock.clone(),
    });
    let cert = Arc::new(
        RotatingServerCert::new(
            &service.ca,
            &service.config.server_names,
            service.now(),
            provider.clone(),
        )
        .map_err(|e| ServeError::Tls(e.to_string()))?,
    );
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, cert))
}

/// Renews the service's TLS certificate two thirds into its lifetime, checked every second
/// against the service's clock; a failed renewal is retried and, once less than a third of the
/// lifetime is left, logged as an error every minute until it works.
/// Ends when the server stops (its `shutdown` waits for every task).
async fn renew_server_cert(
    service: Arc<Service>,
    cert: Arc<RotatingServerCert>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_alarm = None::<i64>;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
        }
        let now = service.now();
        match cert.renew_if_due(&service.ca, now) {
            Ok(Renewal::NotDue) => {}
            Ok(Renewal::Renewed { not_after }) => {
                tracing::info!(not_after, "renewed the service's TLS certificate");
                last_alarm = None;
            }
            Err(e) => {
                if last_alarm.is_none_or(|t| now - t >= 60) {
                    last_alarm = Some(now);
                    tracing::error!(
                        error = %e,
                        expires_in_secs = cert.not_after() - now,
                        "cannot renew the service's TLS certificate: appliances cannot reach \
                         the service once it expires"
                    );
                }
            }
        }
    }
}

/// `GET /metrics` (Prometheus text) on its own plain-HTTP listener, until the server stops.
async fn serve_metrics(
    listener: TcpListener,
    state: Shared,
    server_cert: Arc<RotatingServerCert>,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let state = state.clone();
            let server_cert = server_cert.clone();
            async move {
                let service = state.service.clone();
                let followers = state.followers.count();
                let text = blocking(move || {
                    let now = service.now();
                    let held = metrics::held(&service, &server_cert);
                    let registry = service.store.registry_version()?;
                    let policy = service.store.published_policy_version()?.unwrap_or(0);
                    Ok(metrics::render(&held, registry, policy, followers, now))
                })
                .await;
                match text {
                    Ok(t) => (
                        [(
                            header::CONTENT_TYPE,
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )],
                        t,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }
        }),
    );
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "/metrics server failed");
    }
}

/// A running service; dropping it (or calling `shutdown`) stops it.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The service's TLS certificate, renewed while it runs.
    pub server_cert: Arc<RotatingServerCert>,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    pub admin_socket: Option<PathBuf>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(p) = &self.admin_socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve_connection<I>(io: I, router: Router, info: ConnInfo, header_timeout: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(info.clone());
        let mut router = router.clone();
        async move { router.call(req.map(Body::new)).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Starts the HTTPS service on `listen` and, if given, the admin socket at `admin_socket`
/// (mode 0600; only the service's own user and root may use it).
pub async fn start(
    service: Arc<Service>,
    listen: SocketAddr,
    admin_socket: Option<&Path>,
) -> Result<RunningServer, ServeError> {
    // Before anything is served: a tenant gated or ungated since the last start has its
    // devices taken out or let in again.
    let changed = service
        .apply_mfa_config()
        .map_err(|e| ServeError::MfaConfig(e.to_string()))?;
    if changed > 0 {
        tracing::info!(
            changed,
            "[mfa_window] changed: home-office devices brought in line"
        );
    }
    let (tls, server_cert) = tls_config(&service)?;
    let tls = Arc::new(tls);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            what: "listen on",
            addr: listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        what: "listen on",
        addr: listen.to_string(),
        source,
    })?;
    let state = Arc::new(AppState {
        refusals: RefusalLog::new(Duration::from_secs(10)),
        limiter: RateLimiter::new(
            service.config.rate_limit.per_second,
            service.config.rate_limit.burst,
        ),
        service: service.clone(),
        followers: Arc::default(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let timeout = service.config.limits.client_timeout.0;
    let permits = Arc::new(Semaphore::new(service.config.limits.max_connections));
    let per_source = Arc::new(SourceConnections::default());
    let max_per_source = service.config.limits.max_connections_per_source;
    let refusals = RefusalLog::new(Duration::from_secs(10));
    let router = public_router(state.clone());
    let mut tasks = vec![tokio::spawn(renew_server_cert(
        service.clone(),
        server_cert.clone(),
        stop_rx.clone(),
    ))];
    let mut metrics_bound = None;
    if let Some(metrics_addr) = service.config.metrics_listen {
        let listener =
            TcpListener::bind(metrics_addr)
                .await
                .map_err(|source| ServeError::Bind {
                    what: "serve /metrics on (metrics_listen)",
                    addr: metrics_addr.to_string(),
                    source,
                })?;
        metrics_bound = listener.local_addr().ok();
        tasks.push(tokio::spawn(serve_metrics(
            listener,
            state.clone(),
            server_cert.clone(),
            stop_rx.clone(),
        )));
    }
    let mut stop_https = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let permit = tokio::select! {
                _ = stop_https.changed() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (tcp, remote) = tokio::select! {
                _ = stop_https.changed() => break,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = per_source.take(remote.ip(), max_per_source) else {
                // Closed before any TLS work: one host holding many silent connections must
                // not take the slots of every town hall.
                if let Some(left_out) = refusals.admit(remote.ip(), Instant::now()) {
                    tracing::warn!(
                        remote = %remote,
                        limit = max_per_source,
                        refused_meanwhile = left_out,
                        "connection refused: this source holds limits.max_connections_per_source connections already"
                    );
                }
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            conns.spawn(async move {
                let _permit = permit;
                let _slot = slot;
                let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(remote = %remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(remote = %remote, "TLS handshake timed out");
                        return;
                    }
                };
                let client_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Arc::new(c.to_vec()));
                let info = ConnInfo {
                    remote: Some(remote),
                    client_cert,
                    admin_actor: None,
                };
                serve_connection(tls, router, info, timeout).await;
            });
            while conns.try_join_next().is_some() {}
        }
        conns.shutdown().await;
    }));

    let mut admin_path = None;
    if let Some(path) = admin_socket {
        if path.exists() {
            // A socket left by a killed service; a live one would still accept.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::Bind {
                    what: "admin socket",
                    addr: path.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another komnet-enroll serves this data directory",
                    ),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ServeError::Bind {
            what: "admin socket",
            addr: path.display().to_string(),
            source,
        };
        let unix = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let owner = std::fs::metadata(path).map_err(bind_err)?.uid();
        let router = admin_router(state.clone());
        let mut stop_admin = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let stream = tokio::select! {
                    _ = stop_admin.changed() => break,
                    a = unix.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                let uid = stream.peer_cred().map(|c| c.uid()).ok();
                // The socket's mode already keeps others out; checking the peer's uid as well
                // means a permissive umask or a copied socket path cannot open it up.
                if uid != Some(owner) && uid != Some(0) {
                    tracing::warn!(uid = ?uid, "admin connection from a foreign user refused");
                    continue;
                }
                let info = ConnInfo {
                    remote: None,
                    client_cert: None,
                    admin_actor: Some(format!("uid:{}", uid.unwrap_or(u32::MAX))),
                };
                let router = router.clone();
                conns.spawn(serve_connection(stream, router, info, timeout));
                while conns.try_join_next().is_some() {}
            }
            conns.shutdown().await;
        }));
        admin_path = Some(path.to_owned());
    }
    tracing::info!(%addr, admin_socket = ?admin_path, root_fingerprint = %service.ca.root_fingerprint, "komnet-enroll serving");
    Ok(RunningServer {
        addr,
        server_cert,
        metrics_addr: metrics_bound,
        admin_socket: admin_path,
        stop,
        tasks,
    })
}
