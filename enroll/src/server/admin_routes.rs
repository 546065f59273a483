//! The admin socket's routes (`DATA_DIR/admin.sock`, mode 0600, peer uid checked by the accept
//! loop): every one has the same shape, [`admin_call`]: a typed body, the caller's uid as the
//! audit actor, one service call off the async workers, the answer or the typed refusal.

use super::*;

/// The one admin handler shape.
async fn admin_call<B, T>(
    state: Shared,
    conn: Conn,
    route: &'static str,
    body: B,
    call: fn(&Service, B, &str) -> Result<T, ApiError>,
) -> Response
where
    B: Send + 'static,
    T: serde::Serialize + Send + 'static,
{
    let service = state.service.clone();
    let actor = conn.actor();
    let result = blocking(move || call(&service, body, &actor)).await;
    respond(&state, route, None, result)
}

async fn tokens(
    State(s): State<Shared>,
    conn: Conn,
    LimitedJson(body): LimitedJson<admin::CreateTokenRequest>,
) -> Response {
    admin_call(s, conn, admin::TOKENS, body, |svc, b, actor| {
        svc.create_token(&b, actor)
    })
    .await
}

async fn revoke(
    State(s): State<Shared>,
    conn: Conn,
    LimitedJson(body): LimitedJson<admin::RevokeRequest>,
) -> Response {
    admin_call(s, conn, admin::REVOKE, body, |svc, b, actor| {
        svc.revoke(&b, actor)
    })
    .await
}

async fn homeoffice(
    State(s): State<Shared>,
    conn: Conn,
    LimitedJson(body): LimitedJson<admin::HomeOfficeRequest>,
) -> Response {
    admin_call(s, conn, admin::HOMEOFFICE, body, |svc, b, actor| {
        svc.issue_homeoffice(&b, actor)
    })
    .await
}

async fn policy_version(
    State(s): State<Shared>,
    conn: Conn,
    LimitedJson(body): LimitedJson<admin::PolicyVersionRequest>,
) -> Response {
    admin_call(s, conn, admin::POLICY_VERSION, body, |svc, b, actor| {
        svc.set_policy_version(b.version, actor)
    })
    .await
}

async fn policy_publish(
    State(s): State<Shared>,
    conn: Conn,
    BundleBody(bytes): BundleBody,
) -> Response {
    admin_call(s, conn, admin::POLICY_PUBLISH, bytes, |svc, b, actor| {
        svc.publish_policy(&b, actor)
    })
    .await
}

async fn audit(State(s): State<Shared>, conn: Conn, uri: axum::http::Uri) -> Response {
    let limit = uri
        .query()
        .and_then(|q| q.strip_prefix("limit="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(100)
        .min(10_000);
    admin_call(s, conn, admin::AUDIT, limit, |svc, limit, _| {
        Ok(svc.store.audit_log(limit)?)
    })
    .await
}

pub(super) fn admin_router(state: Shared) -> Router {
    Router::new()
        .route(admin::TOKENS, post(tokens))
        .route(admin::REVOKE, post(revoke))
        .route(admin::HOMEOFFICE, post(homeoffice))
        .route(admin::POLICY_VERSION, post(policy_version))
        .route(admin::POLICY_PUBLISH, post(policy_publish))
        .route(admin::AUDIT, get(audit))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::not_found)
        .with_state(state)
}
