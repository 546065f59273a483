//! The admin socket's routes (`DATA_DIR/admin.sock`, mode 0600, peer uid checked by the accept
//! loop): every one has the same shape, [`admin_call`]: a typed body, the caller's uid as the
//! audit actor, one service call off the async workers, the answer or the typed refusal.
//!
//! The caller's uid is the actor; a call made for a person (the web console's signed-in user)
//! names them in [`admin::ON_BEHALF_OF_HEADER`], and the actor becomes `PERSON via uid:N`.

use axum::extract::Query;
use axum::http::HeaderMap;

use super::*;

/// The longest person name the audit log takes from the console.
const MAX_PERSON_LEN: usize = 200;

/// The audit actor: the socket's uid, and the person the call is made for, if named.
fn actor(conn: &Conn, headers: &HeaderMap) -> Result<String, ApiError> {
    let uid = conn.actor();
    let Some(value) = headers.get(admin::ON_BEHALF_OF_HEADER) else {
        return Ok(uid);
    };
    let person = value
        .to_str()
        .ok()
        .filter(|p| {
            !p.trim().is_empty() && p.len() <= MAX_PERSON_LEN && !p.chars().any(char::is_control)
        })
        .ok_or_else(|| {
            api_err(
                ErrorCode::BadRequest,
                format!(
                    "{}: must be printable text of 1 to {MAX_PERSON_LEN} bytes",
                    admin::ON_BEHALF_OF_HEADER
                ),
            )
        })?;
    Ok(format!("{} via {uid}", person.trim()))
}

/// The one admin handler shape.
async fn admin_call<B, T>(
    state: Shared,
    conn: Conn,
    headers: HeaderMap,
    route: &'static str,
    body: B,
    call: fn(&Service, B, &str) -> Result<T, ApiError>,
) -> Response
where
    B: Send + 'static,
    T: serde::Serialize + Send + 'static,
{
    let service = state.service.clone();
    let result = match actor(&conn, &headers) {
        Ok(actor) => blocking(move || call(&service, body, &actor)).await,
        Err(e) => Err(e),
    };
    respond(&state, route, None, result)
}

async fn tokens(
    State(s): State<Shared>,
    conn: Conn,
    headers: HeaderMap,
    LimitedJson(body): LimitedJson<admin::CreateTokenRequest>,
) -> Response {
    admin_call(s, conn, headers, admin::TOKENS, body, |svc, b, actor| {
        svc.create_token(&b, actor)
    })
    .await
}

async fn revoke(
    State(s): State<Shared>,
    conn: Conn,
    headers: HeaderMap,
    LimitedJson(body): LimitedJson<admin::RevokeRequest>,
) -> Response {
    admin_call(s, conn, headers, admin::REVOKE, body, |svc, b, actor| {
        svc.revoke(&b, actor)
    })
    .await
}

async fn homeoffice(
    State(s): State<Shared>,
    conn: Conn,
    headers: HeaderMap,
    LimitedJson(body): LimitedJson<admin::HomeOfficeRequest>,
) -> Response {
    admin_call(
        s,
        conn,
        headers,
        admin::HOMEOFFICE,
        body,
        |svc, b, actor| svc.issue_homeoffice(&b, actor),
    )
    .await
}

async fn homeoffice_window(
    State(s): State<Shared>,
    conn: Conn,
    headers: HeaderMap,
    LimitedJson(body): LimitedJson<admin::MfaWindowRequest>,
) -> Response {
    admin_call(
        s,
        conn,
        headers,
        admin::HOMEOFFICE_WINDOW,
        body,
        |svc, b, actor| svc.open_mfa_window(&b, actor),
    )
    .await
}

async fn policy_version(
    State(s): State<Shared>,
    conn: Conn,
    headers: HeaderMap,
    LimitedJson(body): LimitedJson<admin::PolicyVersionRequest>,
) -> Response {
    admin_call(
        s,
        conn,
        headers,
        admin::POLICY_VERSION,
        body,
        |svc, b, actor| svc.set_policy_version(b.version, actor),
    )
    .await
}

async fn policy_publish(
    State(s): State<Shared>,
    conn: Conn,
    headers: HeaderMap,
    BundleBody(bytes): BundleBody,
) -> Response {
    admin_call(
        s,
        conn,
        headers,
        admin::POLICY_PUBLISH,
        bytes,
        |svc, b, actor| svc.publish_policy(&b, actor),
    )
    .await
}

async fn audit(
    State(s): State<Shared>,
    conn: Conn,
    headers: HeaderMap,
    query: Result<Query<admin::AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            let refused: Result<(), _> =
                Err(api_err(ErrorCode::BadRequest, format!("audit query: {e}")));
            return respond(&s, admin::AUDIT, None, refused);
        }
    };
    admin_call(s, conn, headers, admin::AUDIT, query, |svc, q, _| {
        let limit = q.limit.unwrap_or(100).min(admin::AUDIT_WINDOW);
        let unfiltered = admin::AuditQuery {
            limit: q.limit,
            ..Default::default()
        };
        if q == unfiltered {
            return Ok(svc.store.audit_log(limit)?);
        }
        // Filtered in memory over the newest entries: both backends' audit tables stay
        // as they are, and a console page never needs more than the recent past.
        let mut found = svc.store.audit_log(admin::AUDIT_WINDOW)?;
        // audit_log answers oldest first; a filter keeps the newest `limit` matches.
        found.retain(|r| q.matches(r));
        let skip = found.len().saturating_sub(limit);
        Ok(found.split_off(skip))
    })
    .await
}

async fn policy(State(s): State<Shared>, conn: Conn, headers: HeaderMap) -> Response {
    admin_call(s, conn, headers, admin::POLICY, (), |svc, (), _| {
        use base64::Engine as _;
        let p = svc.store.published_policy()?.ok_or_else(|| {
            api_err(
                ErrorCode::NoPolicy,
                "no policy bundle is published yet (komnet policy-publish BUNDLE)",
            )
        })?;
        // By version, not "the one before the newest": a publication between the two reads
        // cannot pair this bundle with the wrong predecessor.
        let previous = svc
            .store
            .policy_before(p.version)?
            .map(|q| admin::PreviousBundle {
                version: q.version,
                bundle: base64::engine::general_purpose::STANDARD.encode(&q.bytes),
                key_id: q.key_id,
                published_at: q.published_at,
            });
        Ok(admin::PolicyBundleResponse {
            info: admin::PublishedPolicyInfo {
                version: p.version,
                key_id: p.key_id,
                published_at: p.published_at,
            },
            bundle: base64::engine::general_purpose::STANDARD.encode(&p.bytes),
            policy_public_key: svc.current_policy_key(),
            previous,
        })
    })
    .await
}

async fn fleet(State(s): State<Shared>, conn: Conn, headers: HeaderMap) -> Response {
    admin_call(s, conn, headers, admin::FLEET, (), |svc, (), _| {
        let now = svc.now();
        let snapshot = svc.store.registry_snapshot(now)?;
        let published_policy = svc
            .store
            .published_policy()?
            .map(|p| admin::PublishedPolicyInfo {
                version: p.version,
                key_id: p.key_id,
                published_at: p.published_at,
            });
        Ok(admin::FleetResponse {
            now,
            registry_version: snapshot.version,
            policy_version: svc.store.policy_version()?,
            published_policy,
            // Admitted or not: a home office waiting for its MFA window is still a device.
            peers: svc.store.valid_identities(now)?,
            mfa_windows: svc
                .config
                .mfa_window
                .iter()
                .map(|(t, w)| (t.clone(), w.0.as_secs()))
                .collect(),
            hub_reports: hub_reports(svc)?,
            policy_held: svc
                .store
                .policy_held()?
                .into_iter()
                .filter_map(|(tenant, site, version, at)| {
                    Some(admin::PolicyHeld {
                        tenant: crate::identity::TenantId::parse(&tenant).ok()?,
                        site: crate::identity::SiteId::parse(&site).ok()?,
                        version: u64::try_from(version).ok()?,
                        at,
                    })
                })
                .collect(),
        })
    })
    .await
}

/// The hubs' last reports; one that does not parse (a hub of another version) is left out
/// with a warning rather than failing the fleet page.
fn hub_reports(svc: &Service) -> Result<Vec<admin::HubReportSeen>, ApiError> {
    let mut out = Vec::new();
    for (tenant, site, at, text) in svc.store.hub_reports()? {
        let parsed = (
            crate::identity::TenantId::parse(&tenant),
            crate::identity::SiteId::parse(&site),
            serde_json::from_str(&text),
        );
        match parsed {
            (Ok(tenant), Ok(site), Ok(report)) => out.push(admin::HubReportSeen {
                tenant,
                site,
                at,
                report,
            }),
            _ => tracing::warn!(%tenant, %site, "a hub report that does not parse is left out"),
        }
    }
    Ok(out)
}

pub(super) fn admin_router(state: Shared) -> Router {
    Router::new()
        .route(admin::TOKENS, post(tokens))
        .route(admin::REVOKE, post(revoke))
        .route(admin::HOMEOFFICE, post(homeoffice))
        .route(admin::HOMEOFFICE_WINDOW, post(homeoffice_window))
        .route(admin::POLICY_VERSION, post(policy_version))
        .route(admin::POLICY_PUBLISH, post(policy_publish))
        .route(admin::AUDIT, get(audit))
        .route(admin::FLEET, get(fleet))
        .route(admin::POLICY, get(policy))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::not_found)
        .with_state(state)
}
