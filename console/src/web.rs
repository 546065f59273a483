//! The HTTP side: shared state, the request context (language, session), security headers,
//! sign-on routes and the router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use komnet_enroll_admin::AdminClient;

use crate::config::{Config, Lang};
use crate::oidc::{Oidc, Role};
use crate::pages::{self, layout};
use crate::session::{self, Session, Sessions, Throttle, LOGIN_COOKIE, SESSION_COOKIE};

/// The language cookie (not a secret; the person's choice).
const LANG_COOKIE: &str = "komnet-lang";

/// Pages allow nothing but their own stylesheet, images (the QR code is a data: PNG) and the
/// fleet page's one script file, which may fetch only from here; forms post only here; no
/// framing, no inline script.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
                   script-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[derive(Debug)]
pub struct App {
    pub config: Arc<Config>,
    pub oidc: Oidc,
    pub sessions: Sessions,
    pub throttle: Throttle,
    pub admin: AdminClient,
}

pub type Shared = Arc<App>;

/// What every page needs: the language, and the session if signed in.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub lang: Lang,
    pub session: Option<(String, Session)>,
}

/// A signed-in request; anything else is sent to the login page.
#[derive(Debug, Clone)]
pub struct Signed {
    pub lang: Lang,
    pub id: String,
    pub session: Session,
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl FromRequestParts<Shared> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Self::Rejection> {
        let lang = match cookie(&parts.headers, LANG_COOKIE) {
            Some("en") => Lang::En,
            Some("de") => Lang::De,
            _ => app.config.language,
        };
        let session = cookie(&parts.headers, SESSION_COOKIE).and_then(|id| {
            app.sessions
                .get(id, Instant::now())
                .map(|s| (id.to_owned(), s))
        });
        Ok(Ctx { lang, session })
    }
}

impl FromRequestParts<Shared> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Self::Rejection> {
        let Ok(ctx) = Ctx::from_request_parts(parts, app).await;
        match ctx.session {
            Some((id, session)) => Ok(Signed {
                lang: ctx.lang,
                id,
                session,
            }),
            None => Err(Redirect::to("/login").into_response()),
        }
    }
}

/// A refused or failed request, shown as a page.
#[derive(Debug)]
pub struct PageError {
    pub status: StatusCode,
    pub lang: Lang,
    pub message: String,
}

impl PageError {
    pub fn new(status: StatusCode, lang: Lang, message: impl Into<String>) -> Self {
        PageError {
            status,
            lang,
            message: message.into(),
        }
    }
    /// Another tenant's site looks exactly like one that does not exist.
    pub fn not_found(lang: Lang) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            lang,
            layout::tr(lang, "Diese Seite gibt es nicht.", "There is no such page."),
        )
    }
    pub fn forbidden(lang: Lang) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            lang,
            layout::tr(
                lang,
                "Ihre Rolle erlaubt diese Seite nicht.",
                "Your role does not allow this page.",
            ),
        )
    }
    /// The enrollment service refused or could not be reached.
    pub fn service(lang: Lang, e: &komnet_enroll_admin::AdminError) -> Self {
        tracing::warn!(error = %e, "admin call failed");
        let status = match e {
            komnet_enroll_admin::AdminError::Refused(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self::new(status, lang, e.to_string())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = layout::tr(self.lang, "Fehler", "Error");
        let page = layout::bare(self.lang, title, &self.message);
        (self.status, page).into_response()
    }
}

/// Checks a state-changing form: the session's CSRF token, and the Origin header when the
/// browser sends one (every current browser does for POST).
pub fn check_form(
    app: &App,
    signed: &Signed,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(), PageError> {
    let origin_ok = headers
        .get(header::ORIGIN)
        .is_none_or(|o| o.as_bytes() == app.config.origin().as_bytes());
    if !origin_ok || !session::csrf_ok(&signed.session, csrf) {
        tracing::warn!(person = %signed.session.person.audit_name(), origin_ok, "form refused: CSRF check failed");
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            signed.lang,
            layout::tr(
                signed.lang,
                "Das Formular ist abgelaufen oder kam nicht von dieser Seite. Bitte laden Sie die Seite neu.",
                "The form has expired or did not come from this site. Please reload the page.",
            ),
        ));
    }
    Ok(())
}

/// `Set-Cookie` for a `__Host-` cookie; `max_age` 0 deletes it.
fn host_cookie(name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
    let age = max_age
        .map(|a| format!("; Max-Age={a}"))
        .unwrap_or_default();
    // SameSite=Lax, not Strict: the identity provider's redirect back to /auth/callback is a
    // cross-site navigation that must carry the login cookie. Every state change is a POST
    // with a CSRF token, which Lax does not send cross-site anyway.
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax{age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on form
    // posts, which the CSRF check refuses.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("console.css"),
    )
        .into_response()
}

/// The fleet page's live updates (a progressive enhancement; no page needs it).
async fn live_script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("live.js"),
    )
        .into_response()
}

async fn home(ctx: Ctx) -> Response {
    match ctx.session {
        None => Redirect::to("/login").into_response(),
        Some((_, s)) => match s.person.role {
            Role::User(_) => Redirect::to("/devices").into_response(),
            _ => Redirect::to("/fleet").into_response(),
        },
    }
}

async fn login_page(ctx: Ctx) -> Response {
    if ctx.session.is_some() {
        return Redirect::to("/").into_response();
    }
    pages::login(ctx.lang, None).into_response()
}

async fn auth_start(
    State(app): State<Shared>,
    ctx: Ctx,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !app.throttle.allow(peer.ip(), Instant::now()) {
        tracing::warn!(source = %peer.ip(), "login throttled");
        let mut resp = PageError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ctx.lang,
            layout::tr(
                ctx.lang,
                "Zu viele Anmeldeversuche von dieser Adresse. Bitte warten Sie eine Minute.",
                "Too many sign-in attempts from this address. Please wait a minute.",
            ),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return resp;
    }
    let (url, pending) = match app.oidc.start().await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "login cannot start");
            return PageError::new(StatusCode::BAD_GATEWAY, ctx.lang, e.to_string())
                .into_response();
        }
    };
    let browser = session::random_id();
    if !app
        .sessions
        .start_login(browser.clone(), pending, Instant::now())
    {
        return PageError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ctx.lang,
            "too many logins under way",
        )
        .into_response();
    }
    let mut resp = Redirect::to(&url).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        host_cookie(LOGIN_COOKIE, &browser, Some(600)),
    );
    resp
}

#[derive(Debug, Deserialize)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn auth_callback(
    State(app): State<Shared>,
    ctx: Ctx,
    headers: HeaderMap,
    Query(cb): Query<Callback>,
) -> Response {
    let lang = ctx.lang;
    let refuse = |status, message: String| {
        tracing::warn!(%message, "login refused");
        let mut resp = (status, pages::login(lang, Some(&message))).into_response();
        resp.headers_mut()
            .append(header::SET_COOKIE, host_cookie(LOGIN_COOKIE, "", Some(0)));
        resp
    };
    if let Some(e) = cb.error {
        let detail = cb.error_description.unwrap_or_default();
        return refuse(StatusCode::UNAUTHORIZED, format!("{e} {detail}"));
    }
    let (Some(code), Some(state)) = (cb.code, cb.state) else {
        return refuse(StatusCode::BAD_REQUEST, "code or state missing".into());
    };
    let browser = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    let Some(pending) = app.sessions.finish_login(&state, browser, Instant::now()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            layout::tr(
                lang,
                "Diese Anmeldung ist unbekannt oder abgelaufen; bitte melden Sie sich neu an.",
                "This sign-in is unknown or has expired; please sign in again.",
            )
            .into(),
        );
    };
    let person = match app.oidc.finish(code, pending).await {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::FORBIDDEN, e.to_string()),
    };
    tracing::info!(person = %person.audit_name(), acr = ?person.acr, amr = ?person.amr, mfa = person.mfa_at.is_some(), "signed in");
    open_mfa_window(&app, &person).await;
    let id = app.sessions.create(person, Instant::now());
    let mut resp = Redirect::to("/").into_response();
    let h = resp.headers_mut();
    h.append(header::SET_COOKIE, host_cookie(SESSION_COOKIE, &id, None));
    h.append(header::SET_COOKIE, host_cookie(LOGIN_COOKIE, "", Some(0)));
    resp
}

/// A user who signed in with a second factor: their home-office devices get through the hubs
/// for their commune's MFA window (where it has one; the service decides). A failure is
/// logged and the sign-in stands: the devices page then shows them closed.
async fn open_mfa_window(app: &Shared, person: &crate::oidc::Person) {
    let (crate::oidc::Role::User(tenant), Some(at)) = (&person.role, person.mfa_at) else {
        return;
    };
    let Some(owner) = pages::devices::owner_name(&person.name)
        .and_then(|o| komnet_proto::identity::SiteId::parse(&o).ok())
    else {
        return;
    };
    let request = komnet_proto::api::admin::MfaWindowRequest {
        tenant: tenant.clone(),
        owner,
        authenticated_at: at,
    };
    match app
        .admin
        .open_mfa_window(&request, &person.audit_name())
        .await
    {
        Ok(resp) => {
            if let Some(until) = resp.admitted_until {
                tracing::info!(person = %person.audit_name(), until, devices = resp.devices.len(), "MFA window opened");
            }
        }
        Err(e) => {
            tracing::error!(person = %person.audit_name(), error = %e, "the MFA window could not be opened")
        }
    }
}

#[derive(Debug, Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(app): State<Shared>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, PageError> {
    check_form(&app, &signed, &headers, &form.csrf)?;
    app.sessions.revoke(&signed.id);
    tracing::info!(person = %signed.session.person.audit_name(), "signed out");
    let mut resp = pages::login(signed.lang, None).into_response();
    resp.headers_mut()
        .append(header::SET_COOKIE, host_cookie(SESSION_COOKIE, "", Some(0)));
    Ok(resp)
}

#[derive(Debug, Deserialize)]
struct Back {
    back: Option<String>,
}

/// Switches the language and goes back to the page (a local path only).
async fn set_lang(
    axum::extract::Path(lang): axum::extract::Path<String>,
    Query(q): Query<Back>,
) -> Response {
    let value = if lang == "en" { "en" } else { "de" };
    let back = q
        .back
        .filter(|b| b.starts_with('/') && !b.starts_with("//") && !b.contains('\\'))
        .unwrap_or_else(|| "/".into());
    let mut resp = Redirect::to(&back).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{LANG_COOKIE}={value}; Path=/; Secure; SameSite=Lax; Max-Age=31536000"
    )) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

async fn not_found(ctx: Ctx) -> PageError {
    PageError::not_found(ctx.lang)
}

pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/static/console.css", get(stylesheet))
        .route("/static/live.js", get(live_script))
        .route("/login", get(login_page))
        .route("/auth/start", get(auth_start))
        .route("/auth/callback", get(auth_callback))
        .route("/logout", post(logout))
        .route("/lang/{lang}", get(set_lang))
        .merge(pages::routes())
        .fallback(not_found)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}
