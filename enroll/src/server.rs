//! The HTTPS service (axum on hyper, rustls with ring, TLS 1.3 only) and the admin socket.
//!
//! Our own accept loop instead of `axum::serve`: it bounds the TLS handshake by a timeout, hands
//! each request the client's address and verified certificate (mutual TLS is optional at the
//! TLS layer and required by the routes that need it), and caps concurrent connections.
//! Every route reads its body through [`read_json`]: a size limit and a time limit, and typed
//! JSON errors for both.

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
use crate::identity::Role;
use crate::server_cert::{Renewal, RotatingServerCert};
use crate::service::{Clock, PolicyAnswer, Service};
use crate::store::CertificateRecord;

/// File name of the admin socket inside the data directory.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// The HTTP status every error code is answered with.
fn http_status(e: &ApiError) -> StatusCode {
    {
        use ErrorCode::*;
        match e.code {
            TokenInvalid | TokenExpired | CertificateRequired | CertificateExpired => {
                StatusCode::UNAUTHORIZED
            }
            TokenUsed | WgKeyInUse | NoHub | RenewTooEarly | PolicyKeyMissing | PolicyRollback
            | PolicyVersionReused | NotInPolicy => StatusCode::CONFLICT,
            CsrInvalid
            | CsrSignatureInvalid
            | CsrKeyType
            | CsrIdentityMismatch
            | WgKeyInvalid
            | WgProofInvalid
            | BadRequest
            | PolicySignatureInvalid
            | PolicyInvalid => StatusCode::BAD_REQUEST,
            CertificateRevoked | CertificateSuperseded | Forbidden => StatusCode::FORBIDDEN,
            AddressPoolExhausted => StatusCode::SERVICE_UNAVAILABLE,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Timeout => StatusCode::REQUEST_TIMEOUT,
            RateLimited => StatusCode::TOO_MANY_REQUESTS,
            NotFound | NothingToRevoke | NoPolicy => StatusCode::NOT_FOUND,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The answer to a refused request: its status and the typed error as JSON.
fn refusal(e: ApiError) -> Response {
    let status = http_status(&e);
    let mut resp = (status, Json(e)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn api_err(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The leaf certificate the client presented, already chain-verified by rustls.
    pub client_cert: Option<Arc<Vec<u8>>>,
    /// For the admin socket: the peer's uid.
    pub admin_actor: Option<String>,
}

/// Reads a JSON body with a size and a time limit.
pub async fn read_json<T: DeserializeOwned>(
    req: Request,
    limit: usize,
    timeout: Duration,
) -> Result<T, ApiError> {
    let bytes = read_body(req, limit, timeout).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        api_err(
            ErrorCode::BadRequest,
            format!("body is not the expected JSON: {e}"),
        )
    })
}

/// Reads a body with a size and a time limit.
pub async fn read_body(
    req: Request,
    limit: usize,
    timeout: Duration,
) -> Result<axum::body::Bytes, ApiError> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(api_err(
                ErrorCode::BodyTooLarge,
                format!("body of {len} bytes; this route takes at most {limit}"),
            ));
        }
    }
    let body = http_body_util::Limited::new(req.into_body(), limit);
    let bytes = match tokio::time::timeout(timeout, body.collect()).await {
        Err(_) => {
            return Err(api_err(
                ErrorCode::Timeout,
                format!("body did not arrive within {}s", timeout.as_secs_f32()),
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(api_err(
                ErrorCode::BodyTooLarge,
                format!("body larger than {limit} bytes"),
            ))
        }
        Ok(Err(e)) => return Err(api_err(ErrorCode::BadRequest, format!("body: {e}"))),
        Ok(Ok(c)) => c.to_bytes(),
    };
    Ok(bytes)
}

/// What one client is, for limits: an IPv4 address, or the /64 of an IPv6 address (one host
/// holds a whole /64 and picks addresses from it at will). IPv4-mapped IPv6 is IPv4.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
    }
}

/// Connections held per source, so one host cannot take every slot.
#[derive(Debug, Default)]
pub struct SourceConnections {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One held connection; dropping it gives the slot back.
#[derive(Debug)]
pub struct SourceSlot {
    table: Arc<SourceConnections>,
    key: IpAddr,
}

impl SourceConnections {
    /// A slot for `ip`'s source, or `None` when it holds `max` already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut held = self.held.lock();
        let n = held.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: self.clone(),
            key,
        })
    }

    pub fn held(&self, ip: IpAddr) -> usize {
        self.held.lock().get(&source_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.table.held.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Log lines about refused requests and connections, at most one per source and interval:
/// a flood must not flood the journal. The line after a quiet interval says how many were
/// left out.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

impl RefusalLog {
    pub fn new(interval: Duration) -> Self {
        RefusalLog {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(left_out)` when a line for `ip` may be written now (with the number of refusals
    /// since the last line that were not logged), `None` when it is to be left out.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let key = source_key(ip);
        let mut seen = self.seen.lock();
        if seen.len() > 100_000 {
            let interval = self.interval;
            seen.retain(|_, (at, _)| now.duration_since(*at) < interval);
        }
        match seen.get_mut(&key) {
            Some((at, left_out)) if now.duration_since(*at) < self.interval => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                let n = *left_out;
                *at = now;
                *left_out = 0;
                Some(n)
            }
            None => {
                seen.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// A token bucket per client (see [`source_key`]).
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> Self {
        RateLimiter {
            per_second,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `ip` at `now`; false when the bucket is empty.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Forget sources whose buckets have refilled: they are indistinguishable from new.
            let full = self.burst / self.per_second;
            buckets.retain(|_, (_, last)| now.duration_since(*last).as_secs_f64() < full);
        }
        let (tokens, last) = buckets.entry(source_key(ip)).or_insert((self.burst, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct AppState {
    service: Arc<Service>,
    limiter: RateLimiter,
    refusals: RefusalLog,
}

type Shared = Arc<AppState>;

fn conn_info(req: &Request) -> ConnInfo {
    req.extensions()
        .get::<ConnInfo>()
        .cloned()
        .unwrap_or(ConnInfo {
            remote: None,
            client_cert: None,
            admin_actor: None,
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| api_err(ErrorCode::Internal, "worker task failed"))?
}

fn log_rejection(state: &AppState, route: &str, remote: Option<SocketAddr>, e: &ApiError) {
    let left_out = match remote {
        Some(r) => match state.refusals.admit(r.ip(), Instant::now()) {
            Some(n) => n,
            None => return,
        },
        None => 0,
    };
    let remote = remote
        .map(|r| r.to_string())
        .unwrap_or_else(|| "admin socket".into());
    // Only the code and message: neither contains a token secret or a private key.
    tracing::warn!(
        route,
        remote = %remote,
        code = ?e.code,
        refused_meanwhile = left_out,
        "request refused: {}",
        e.message
    );
}

async fn rate_limit(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let info = conn_info(&req);
    if let Some(remote) = info.remote {
        if !state.limiter.allow(remote.ip(), Instant::now()) {
            let e = api_err(
                ErrorCode::RateLimited,
                format!("too many requests from {}; retry later", remote.ip()),
            );
            log_rejection(&state, req.uri().path(), info.remote, &e);
            return refusal(e);
        }
    }
    next.run(req).await
}

async fn info_route(State(state): State<Shared>) -> Response {
    Json(state.service.info()).into_response()
}

async fn enroll_route(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let limits = &state.service.config.limits;
    let result = async {
        let body: api::EnrollRequest =
            read_json(req, limits.max_body_bytes, limits.client_timeout.0).await?;
        let service = state.service.clone();
        let source = info
            .remote
            .map(|r| r.ip().to_string())
            .unwrap_or_else(|| "local".into());
        blocking(move || service.enroll(&body, &source)).await
    }
    .await;
    respond(&state, api::routes::ENROLL, info.remote, result)
}

async fn renew_route(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let limits = &state.service.config.limits;
    let result = async {
        let cert = info.client_cert.clone().ok_or_else(|| {
            api_err(
                ErrorCode::CertificateRequired,
                "renewal needs mutual TLS with the current certificate",
            )
        })?;
        let body: api::RenewRequest =
            read_json(req, limits.max_body_bytes, limits.client_timeout.0).await?;
        let service = state.service.clone();
        blocking(move || service.renew(&cert, &body)).await
    }
    .await;
    respond(&state, api::routes::RENEW, info.remote, result)
}

fn respond<T: serde::Serialize>(
    state: &AppState,
    route: &str,
    remote: Option<SocketAddr>,
    result: Result<T, ApiError>,
) -> Response {
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            log_rejection(state, route, remote, &e);
            refusal(e)
        }
    }
}

/// A valid appliance (spoke or hub) certificate over mutual TLS: current, not revoked, not
/// superseded. Home-office certificates are records only (their key was thrown away), so one
/// presented here is refused as well.
async fn require_appliance(
    state: &Shared,
    info: &ConnInfo,
    what: &str,
    needed: &str,
) -> Result<CertificateRecord, ApiError> {
    let cert = info.client_cert.clone().ok_or_else(|| {
        api_err(
            ErrorCode::CertificateRequired,
            format!("{what} needs mutual TLS with {needed}"),
        )
    })?;
    let service = state.service.clone();
    let record = blocking(move || service.check_client_certificate(&cert)).await?;
    if !matches!(record.identity.role, Role::Spoke | Role::Hub) {
        return Err(api_err(
            ErrorCode::Forbidden,
            format!(
                "{what} is for appliances; this certificate is a {}",
                record.identity.role
            ),
        ));
    }
    Ok(record)
}

/// The registry is for hubs: a valid, unrevoked hub certificate over mutual TLS.
async fn require_hub(state: &Shared, info: &ConnInfo) -> Result<CertificateRecord, ApiError> {
    let record = require_appliance(state, info, "the registry", "a hub certificate").await?;
    if record.identity.role != Role::Hub {
        return Err(api_err(
            ErrorCode::Forbidden,
            format!(
                "the registry is for hubs; this certificate is a {}",
                record.identity.role
            ),
        ));
    }
    Ok(record)
}

async fn registry_route(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let result = async {
        require_hub(&state, &info).await?;
        let service = state.service.clone();
        blocking(move || Ok(service.store.registry_snapshot(service.now())?)).await
    }
    .await;
    respond(&state, api::routes::REGISTRY, info.remote, result)
}

/// The one optional version parameter `name=VERSION` of a query string.
fn parse_version_query(query: Option<&str>, name: &str) -> Result<Option<u64>, ApiError> {
    let Some(q) = query else { return Ok(None) };
    let mut found = None;
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((key, v)) if key == name && found.is_none() => {
                found = Some(v.parse().map_err(|_| {
                    api_err(
                        ErrorCode::BadRequest,
                        format!("query {name}={v:?}: not a version number"),
                    )
                })?);
            }
            _ => {
                return Err(api_err(
                    ErrorCode::BadRequest,
                    format!("query: unexpected {pair:?}; only {name}=VERSION, once"),
                ))
            }
        }
    }
    Ok(found)
}

fn parse_since(query: Option<&str>) -> Result<u64, ApiError> {
    Ok(parse_version_query(query, "since")?.unwrap_or(0))
}

/// `GET /v1/policy?have=V`: the published bundle, 304 when the caller has it.
async fn policy_route(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    // Parsed before the async block: holding `&req` across an await would make the future
    // need `Request: Sync`, which a body is not.
    let have = parse_version_query(req.uri().query(), "have");
    let result = async {
        require_appliance(&state, &info, "the policy", "an appliance certificate").await?;
        let have = have?;
        let service = state.service.clone();
        blocking(move || service.policy_bundle(have)).await
    }
    .await;
    let version_header = |v: u64| {
        (
            header::HeaderName::from_static(api::POLICY_VERSION_HEADER),
            HeaderValue::from(v),
        )
    };
    match result {
        Ok(PolicyAnswer::NotModified { version }) => {
            (StatusCode::NOT_MODIFIED, [version_header(version)]).into_response()
        }
        Ok(PolicyAnswer::Bundle { version, bytes }) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                version_header(version),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => {
            // Polled often before the first publish: not worth a warning each time.
            if e.code != ErrorCode::NoPolicy {
                log_rejection(&state, api::routes::POLICY, info.remote, &e);
            }
            refusal(e)
        }
    }
}

/// `GET /v1/hubs`: the hubs with their keys, addresses and endpoints.
async fn hubs_route(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let result = async {
        require_appliance(&state, &info, "the hub list", "an appliance certificate").await?;
        let service = state.service.clone();
        blocking(move || service.hub_peers(service.now())).await
    }
    .await;
    respond(&state, api::routes::HUBS, info.remote, result)
}

struct Follow {
    service: Arc<Service>,
    rx: tokio::sync::broadcast::Receiver<Arc<RegistryEvent>>,
    last: u64,
    backlog: std::collections::VecDeque<RegistryEvent>,
    caught_up: bool,
    /// The watching hub: its stream ends when its own certificate is revoked, replaced or
    /// expires, so it must come back with a valid one.
    hub: crate::identity::Identity,
    hub_gone: bool,
}

impl Follow {
    /// True when `ev` ends the hub's own certificate.
    fn ends_hub(&self, ev: &RegistryEvent) -> bool {
        match &ev.change {
            api::RegistryChange::Remove { serial, .. } => *serial == self.hub.serial,
            api::RegistryChange::Upsert(id) => {
                id.tenant == self.hub.tenant
                    && id.site == self.hub.site
                    && id.serial != self.hub.serial
            }
        }
    }

    async fn next(&mut self) -> Option<Result<RegistryEvent, ApiError>> {
        let ev = self.next_event().await?;
        if let Ok(ev) = &ev {
            if self.ends_hub(ev) {
                self.hub_gone = true;
            }
        }
        Some(ev)
    }

    async fn next_event(&mut self) -> Option<Result<RegistryEvent, ApiError>> {
        loop {
            if self.hub_gone {
                return None;
            }
            if let Some(ev) = self.backlog.pop_front() {
                if ev.version > self.last {
                    self.last = ev.version;
                    return Some(Ok(ev));
                }
                continue;
            }
            if !self.caught_up {
                let service = self.service.clone();
                let since = self.last;
                match blocking(move || Ok(service.store.registry_events_since(since, 1000)?)).await
                {
                    Ok(events) if events.is_empty() => self.caught_up = true,
                    Ok(events) => self.backlog.extend(events),
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            let left = self.hub.not_after - self.service.now();
            if left <= 0 {
                return None;
            }
            let received = tokio::select! {
                r = self.rx.recv() => r,
                _ = tokio::time::sleep(Duration::from_secs(left as u64)) => continue,
            };
            match received {
                Ok(ev) if ev.version <= self.last => continue,
                Ok(ev) if ev.version == self.last + 1 => {
                    self.last = ev.version;
                    return Some(Ok((*ev).clone()));
                }
                // A gap or a lag: the store has every event, read them from there.
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    self.caught_up = false
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

async fn registry_events_route(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let since = match parse_since(req.uri().query()) {
        Ok(s) => s,
        Err(e) => return respond::<()>(&state, api::routes::REGISTRY_EVENTS, info.remote, Err(e)),
    };
    let hub = match require_hub(&state, &info).await {
        Ok(h) => h,
        Err(e) => return respond::<()>(&state, api::routes::REGISTRY_EVENTS, info.remote, Err(e)),
    };
    tracing::info!(hub = %format!("{}/{}", hub.identity.tenant, hub.identity.site), since, "hub follows the registry");
    // Subscribe before reading the backlog, so nothing committed in between is missed.
    let follow = Follow {
        rx: state.service.store.subscribe(),
        service: state.service.clone(),
        last: since,
        backlog: Default::default(),
        caught_up: false,
        hub: hub.identity.clone(),
        hub_gone: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        let item = f.next().await?;
        let event = match item {
            Ok(ev) => Event::default()
                .id(ev.version.to_string())
                .event("registry")
                .json_data(&ev)
                .map_err(|e| api_err(ErrorCode::Internal, e.to_string())),
            Err(e) => Err(e),
        };
        // A store failure ends the stream; the hub reconnects with its last version.
        match event {
            Ok(ev) => Some((Ok::<_, std::convert::Infallible>(ev), f)),
            Err(e) => {
                tracing::error!(error = %e, "registry stream ends");
                None
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn crl_route(State(state): State<Shared>) -> Response {
    let service = state.service.clone();
    match blocking(move || service.crl()).await {
        Ok(der) => (
            [(header::CONTENT_TYPE, "application/pkix-crl")],
            der.as_ref().clone(),
        )
            .into_response(),
        Err(e) => refusal(e),
    }
}

async fn not_found(req: Request) -> Response {
    refusal(api_err(
        ErrorCode::NotFound,
        format!("no route {} {}", req.method(), req.uri().path()),
    ))
}

/// The public HTTPS routes.
fn public_router(state: Shared) -> Router {
    Router::new()
        .route(api::routes::INFO, get(info_route))
        .route(api::routes::ENROLL, post(enroll_route))
        .route(api::routes::RENEW, post(renew_route))
        .route(api::routes::REGISTRY, get(registry_route))
        .route(api::routes::REGISTRY_EVENTS, get(registry_events_route))
        .route(api::routes::CRL, get(crl_route))
        .route(api::routes::POLICY, get(policy_route))
        .route(api::routes::HUBS, get(hubs_route))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit))
        .with_state(state)
}

fn admin_actor(info: &ConnInfo) -> String {
    info.admin_actor.clone().unwrap_or_else(|| "admin".into())
}

async fn admin_tokens(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let limits = &state.service.config.limits;
    let result = async {
        let body: admin::CreateTokenRequest =
            read_json(req, limits.max_body_bytes, limits.client_timeout.0).await?;
        let service = state.service.clone();
        let actor = admin_actor(&info);
        blocking(move || service.create_token(&body, &actor)).await
    }
    .await;
    respond(&state, admin::TOKENS, None, result)
}

async fn admin_revoke(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let limits = &state.service.config.limits;
    let result = async {
        let body: admin::RevokeRequest =
            read_json(req, limits.max_body_bytes, limits.client_timeout.0).await?;
        let service = state.service.clone();
        let actor = admin_actor(&info);
        blocking(move || service.revoke(&body, &actor)).await
    }
    .await;
    respond(&state, admin::REVOKE, None, result)
}

async fn admin_homeoffice(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let limits = &state.service.config.limits;
    let result = async {
        let body: admin::HomeOfficeRequest =
            read_json(req, limits.max_body_bytes, limits.client_timeout.0).await?;
        let service = state.service.clone();
        let actor = admin_actor(&info);
        blocking(move || service.issue_homeoffice(&body, &actor)).await
    }
    .await;
    respond(&state, admin::HOMEOFFICE, None, result)
}

async fn admin_policy_version(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let limits = &state.service.config.limits;
    let result = async {
        let body: admin::PolicyVersionRequest =
            read_json(req, limits.max_body_bytes, limits.client_timeout.0).await?;
        let service = state.service.clone();
        let actor = admin_actor(&info);
        blocking(move || service.set_policy_version(body.version, &actor)).await
    }
    .await;
    respond(&state, admin::POLICY_VERSION, None, result)
}

async fn admin_policy_publish(State(state): State<Shared>, req: Request) -> Response {
    let info = conn_info(&req);
    let timeout = state.service.config.limits.client_timeout.0;
    let result = async {
        // The bundle's own ceiling, not max_body_bytes: a whole county's policy is far larger
        // than any enrollment request, and this socket is the owner's only.
        let bytes = read_body(req, komnet_policy::bundle::MAX_BUNDLE_BYTES, timeout).await?;
        let service = state.service.clone();
        let actor = admin_actor(&info);
        blocking(move || service.publish_policy(&bytes, &actor)).await
    }
    .await;
    respond(&state, admin::POLICY_PUBLISH, None, result)
}

async fn admin_audit(State(state): State<Shared>, req: Request) -> Response {
    let limit = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("limit="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(100)
        .min(10_000);
    let service = state.service.clone();
    let result = blocking(move || Ok(service.store.audit_log(limit)?)).await;
    respond(&state, admin::AUDIT, None, result)
}

fn admin_router(state: Shared) -> Router {
    Router::new()
        .route(admin::TOKENS, post(admin_tokens))
        .route(admin::REVOKE, post(admin_revoke))
        .route(admin::HOMEOFFICE, post(admin_homeoffice))
        .route(admin::POLICY_VERSION, post(admin_policy_version))
        .route(admin::POLICY_PUBLISH, post(admin_policy_publish))
        .route(admin::AUDIT, get(admin_audit))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(state)
}

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
async fn renew_server_cert(service: Arc<Service>, cert: Arc<RotatingServerCert>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_alarm = None::<i64>;
    loop {
        tick.tick().await;
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

/// A running service; dropping it (or calling `shutdown`) stops it.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The service's TLS certificate, renewed while it runs.
    pub server_cert: Arc<RotatingServerCert>,
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
    ))];
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
        admin_socket: admin_path,
        stop,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let key = |s: &str| source_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
    }

    #[test]
    fn a_rate_limit_counts_a_whole_ipv6_64() {
        let limiter = RateLimiter::new(0.001, 3);
        let now = Instant::now();
        for host in 1..=3 {
            let ip: IpAddr = format!("2001:db8::{host}").parse().unwrap();
            assert!(limiter.allow(ip, now));
        }
        assert!(!limiter.allow("2001:db8::99".parse().unwrap(), now));
        assert!(limiter.allow("2001:db8:0:1::1".parse().unwrap(), now));
    }

    #[test]
    fn refusals_are_logged_once_per_source_and_interval_with_a_count() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(log.admit(ip, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.admit(ip, t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(log.admit("192.0.2.8".parse().unwrap(), t0), Some(0));
        assert_eq!(log.admit(ip, t0 + Duration::from_secs(11)), Some(5));
        assert_eq!(log.admit(ip, t0 + Duration::from_secs(12)), None);
    }

    #[test]
    fn connection_slots_per_source_come_back() {
        let table = Arc::new(SourceConnections::default());
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let a = table.take(ip, 2).unwrap();
        let _b = table.take("2001:db8::2".parse().unwrap(), 2).unwrap();
        assert!(table.take(ip, 2).is_none(), "one /64 is one source");
        drop(a);
        assert_eq!(table.held(ip), 1);
        assert!(table.take(ip, 2).is_some());
    }
}
