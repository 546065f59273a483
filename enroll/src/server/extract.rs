//! What a handler takes from a request, and how a refusal is answered: the connection
//! ([`Conn`]: address, verified client certificate, admin uid), the client certificate a route
//! requires ([`ClientCert`]), a JSON body under the configured size and time limits
//! ([`LimitedJson`]), a policy bundle's bytes ([`BundleBody`]). A rejected extraction answers
//! with the typed error and is logged with its route, like every refusal.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;

use super::*;

/// The HTTP status every error code is answered with.
pub(super) fn http_status(e: &ApiError) -> StatusCode {
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

/// The answer to a refused request: its status and the typed error as JSON.
pub(super) fn refusal(e: ApiError) -> Response {
    let status = http_status(&e);
    let mut resp = (status, Json(e)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

pub(super) fn api_err(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
    }
}

/// Logs a refusal, at most once per source and interval (a flood must not flood the journal).
pub(super) fn log_rejection(
    state: &AppState,
    route: &str,
    remote: Option<SocketAddr>,
    e: &ApiError,
) {
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

/// A refusal already logged, answered as [`refusal`].
#[derive(Debug)]
pub(super) struct Refusal(ApiError);

impl Refusal {
    fn logged(parts: &Parts, state: &AppState, e: ApiError) -> Self {
        let remote = parts.extensions.get::<ConnInfo>().and_then(|i| i.remote);
        log_rejection(state, parts.uri.path(), remote, &e);
        Refusal(e)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        refusal(self.0)
    }
}

/// Answers a handler's result: the value as JSON, or the refusal (logged).
pub(super) fn respond<T: serde::Serialize>(
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

/// Runs a store or CA call off the async workers.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| api_err(ErrorCode::Internal, "worker task failed"))?
}

/// Who is on the other end of a connection; the accept loop puts it into every request.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The leaf certificate the client presented, already chain-verified by rustls.
    pub client_cert: Option<Arc<Vec<u8>>>,
    /// For the admin socket: the peer's uid.
    pub admin_actor: Option<String>,
}

/// The request's [`ConnInfo`].
#[derive(Debug)]
pub(super) struct Conn(pub ConnInfo);

impl<S: Send + Sync> FromRequestParts<S> for Conn {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Conn(parts.extensions.get::<ConnInfo>().cloned().unwrap_or(
            ConnInfo {
                remote: None,
                client_cert: None,
                admin_actor: None,
            },
        )))
    }
}

impl Conn {
    /// Who the audit log names for an admin request.
    pub(super) fn actor(&self) -> String {
        self.0.admin_actor.clone().unwrap_or_else(|| "admin".into())
    }
}

/// The client certificate (mutual TLS) the route requires; chain-checked by rustls, expiry and
/// revocation are the route's to check against the store.
#[derive(Debug)]
pub(super) struct ClientCert(pub Arc<Vec<u8>>);

/// What a route needs a certificate for, in its refusal.
pub(super) fn certificate_needed(path: &str) -> &'static str {
    match path {
        api::routes::RENEW => "renewal needs mutual TLS with the current certificate",
        api::routes::REGISTRY | api::routes::REGISTRY_EVENTS => {
            "the registry needs mutual TLS with a hub certificate"
        }
        api::routes::POLICY => "the policy needs mutual TLS with an appliance certificate",
        api::routes::HUBS => "the hub list needs mutual TLS with an appliance certificate",
        _ => "this route needs mutual TLS with a client certificate",
    }
}

impl FromRequestParts<Shared> for ClientCert {
    type Rejection = Refusal;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        match parts
            .extensions
            .get::<ConnInfo>()
            .and_then(|i| i.client_cert.clone())
        {
            Some(cert) => Ok(ClientCert(cert)),
            None => Err(Refusal::logged(
                parts,
                state,
                api_err(
                    ErrorCode::CertificateRequired,
                    certificate_needed(parts.uri.path()),
                ),
            )),
        }
    }
}

/// A JSON body of at most `limits.max_body_bytes` that arrives within
/// `limits.client_timeout`; fields the type does not know are refused.
#[derive(Debug)]
pub(super) struct LimitedJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Shared> for LimitedJson<T> {
    type Rejection = Refusal;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, Self::Rejection> {
        let limit = state.service.config.limits.max_body_bytes;
        read_json(req, state, limit, "the expected JSON")
            .await
            .map(LimitedJson)
    }
}

/// A JSON body of at most `limit` bytes within `limits.client_timeout`, refused (and logged)
/// as not being `what` when it does not parse.
async fn read_json<T: DeserializeOwned>(
    req: Request,
    state: &Shared,
    limit: usize,
    what: &str,
) -> Result<T, Refusal> {
    let timeout = state.service.config.limits.client_timeout.0;
    let (parts, body) = req.into_parts();
    let bytes = read_body(&parts, body, limit, timeout)
        .await
        .map_err(|e| Refusal::logged(&parts, state, e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Refusal::logged(
            &parts,
            state,
            api_err(ErrorCode::BadRequest, format!("body is not {what}: {e}")),
        )
    })
}

/// The bytes of a signed policy bundle: up to the bundle's own ceiling, not `max_body_bytes` (a
/// whole county's policy is far larger than any enrollment request, and the admin socket is
/// the owner's only).
#[derive(Debug)]
pub(super) struct BundleBody(pub axum::body::Bytes);

impl FromRequest<Shared> for BundleBody {
    type Rejection = Refusal;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, Self::Rejection> {
        let timeout = state.service.config.limits.client_timeout.0;
        let (parts, body) = req.into_parts();
        read_body(
            &parts,
            body,
            komnet_policy::bundle::MAX_BUNDLE_BYTES,
            timeout,
        )
        .await
        .map(BundleBody)
        .map_err(|e| Refusal::logged(&parts, state, e))
    }
}

/// A hub's report of its peers: larger than `max_body_bytes` allows (a county hub reports
/// 10,000 peers, about 2.5 MB), so its own ceiling; only holders of a certificate of this CA
/// get this far (the handler then requires a hub's).
#[derive(Debug)]
pub(super) struct HubReportBody(pub komnet_proto::status::HubReport);

/// The largest hub report taken.
pub(super) const MAX_HUB_REPORT_BYTES: usize = 8 << 20;

impl FromRequest<Shared> for HubReportBody {
    type Rejection = Refusal;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, Self::Rejection> {
        read_json(req, state, MAX_HUB_REPORT_BYTES, "a hub report")
            .await
            .map(HubReportBody)
    }
}

/// Reads a body with a size and a time limit.
async fn read_body(
    parts: &Parts,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<axum::body::Bytes, ApiError> {
    if let Some(len) = parts
        .headers
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
    let body = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(timeout, body.collect()).await {
        Err(_) => Err(api_err(
            ErrorCode::Timeout,
            format!("body did not arrive within {}s", timeout.as_secs_f32()),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(api_err(
            ErrorCode::BodyTooLarge,
            format!("body larger than {limit} bytes"),
        )),
        Ok(Err(e)) => Err(api_err(ErrorCode::BadRequest, format!("body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}
