//! The public HTTPS routes: service info, enroll, renew, the registry (snapshot and change
//! stream), the CRL, the policy bundle and the hub list; a rate limit per client address in
//! front of all of them.

use super::*;

async fn rate_limit(
    State(state): State<Shared>,
    Conn(info): Conn,
    req: Request,
    next: Next,
) -> Response {
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

async fn enroll_route(
    State(state): State<Shared>,
    Conn(info): Conn,
    LimitedJson(body): LimitedJson<api::EnrollRequest>,
) -> Response {
    let service = state.service.clone();
    let source = info
        .remote
        .map(|r| r.ip().to_string())
        .unwrap_or_else(|| "local".into());
    let result = blocking(move || service.enroll(&body, &source)).await;
    respond(&state, api::routes::ENROLL, info.remote, result)
}

async fn renew_route(
    State(state): State<Shared>,
    Conn(info): Conn,
    ClientCert(cert): ClientCert,
    LimitedJson(body): LimitedJson<api::RenewRequest>,
) -> Response {
    let service = state.service.clone();
    let result = blocking(move || service.renew(&cert, &body)).await;
    respond(&state, api::routes::RENEW, info.remote, result)
}

/// A valid appliance (spoke or hub) certificate: current, not revoked, not superseded.
/// Home-office certificates are records only (their key was thrown away), so one presented
/// here is refused as well.
async fn require_appliance(
    state: &Shared,
    cert: Arc<Vec<u8>>,
    what: &str,
) -> Result<CertificateRecord, ApiError> {
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

/// The registry is for hubs: a valid, unrevoked hub certificate.
async fn require_hub(state: &Shared, cert: Arc<Vec<u8>>) -> Result<CertificateRecord, ApiError> {
    let record = require_appliance(state, cert, "the registry").await?;
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

async fn registry_route(
    State(state): State<Shared>,
    Conn(info): Conn,
    ClientCert(cert): ClientCert,
) -> Response {
    let result = async {
        require_hub(&state, cert).await?;
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
async fn policy_route(
    State(state): State<Shared>,
    Conn(info): Conn,
    ClientCert(cert): ClientCert,
    uri: axum::http::Uri,
) -> Response {
    let have = parse_version_query(uri.query(), "have");
    let result = async {
        let appliance = require_appliance(&state, cert, "the policy").await?.identity;
        let have = have?;
        let service = state.service.clone();
        blocking(move || {
            if let Some(version) = have {
                // What the fleet page shows per site; a failure here must not cost the poll.
                if let Err(e) = service.store.note_policy_held(
                    &appliance.tenant,
                    &appliance.site,
                    version,
                    service.now(),
                ) {
                    tracing::warn!(error = %e, "could not note the policy version an appliance holds");
                }
            }
            service.policy_bundle(have)
        })
        .await
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
async fn hubs_route(
    State(state): State<Shared>,
    Conn(info): Conn,
    ClientCert(cert): ClientCert,
) -> Response {
    let result = async {
        require_appliance(&state, cert, "the hub list").await?;
        let service = state.service.clone();
        blocking(move || service.hub_peers(service.now())).await
    }
    .await;
    respond(&state, api::routes::HUBS, info.remote, result)
}

/// A hub's report of its peers (`POST /v1/hub/report`), kept for the web console's fleet.
async fn hub_report_route(
    State(state): State<Shared>,
    Conn(info): Conn,
    ClientCert(cert): ClientCert,
    HubReportBody(report): HubReportBody,
) -> Response {
    let result = async {
        let hub = require_hub(&state, cert).await?.identity;
        let service = state.service.clone();
        blocking(move || {
            let text = serde_json::to_string(&report).unwrap_or_default();
            service
                .store
                .put_hub_report(&hub.tenant, &hub.site, service.now(), &text)?;
            Ok(serde_json::json!({"peers": report.peers.len()}))
        })
        .await
    }
    .await;
    respond(&state, api::routes::HUB_REPORT, info.remote, result)
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
    /// Counts this stream in `komnet_enroll_registry_followers` while it lasts.
    _counted: super::metrics::FollowerGuard,
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

async fn registry_events_route(
    State(state): State<Shared>,
    Conn(info): Conn,
    req: Request,
) -> Response {
    let since = match parse_since(req.uri().query()) {
        Ok(s) => s,
        Err(e) => return respond::<()>(&state, api::routes::REGISTRY_EVENTS, info.remote, Err(e)),
    };
    let Some(cert) = info.client_cert.clone() else {
        let e = api_err(
            ErrorCode::CertificateRequired,
            certificate_needed(api::routes::REGISTRY_EVENTS),
        );
        return respond::<()>(&state, api::routes::REGISTRY_EVENTS, info.remote, Err(e));
    };
    let hub = match require_hub(&state, cert).await {
        Ok(h) => h,
        Err(e) => return respond::<()>(&state, api::routes::REGISTRY_EVENTS, info.remote, Err(e)),
    };
    tracing::info!(hub = %format!("{}/{}", hub.identity.tenant, hub.identity.site), since, "hub follows the registry");
    // Subscribe before reading the backlog, so nothing committed in between is missed.
    let follow = Follow {
        _counted: state.followers.enter(),
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
    let keepalive = state.service.config.registry_keepalive.0;
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keepalive))
        .into_response();
    response.headers_mut().insert(
        api::REGISTRY_KEEPALIVE_HEADER,
        header::HeaderValue::from(keepalive.as_secs()),
    );
    response
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

pub(super) async fn not_found(req: Request) -> Response {
    refusal(api_err(
        ErrorCode::NotFound,
        format!("no route {} {}", req.method(), req.uri().path()),
    ))
}

/// The public HTTPS routes.
pub(super) fn public_router(state: Shared) -> Router {
    Router::new()
        .route(api::routes::INFO, get(info_route))
        .route(api::routes::ENROLL, post(enroll_route))
        .route(api::routes::RENEW, post(renew_route))
        .route(api::routes::REGISTRY, get(registry_route))
        .route(api::routes::REGISTRY_EVENTS, get(registry_events_route))
        .route(api::routes::CRL, get(crl_route))
        .route(api::routes::POLICY, get(policy_route))
        .route(api::routes::HUBS, get(hubs_route))
        .route(api::routes::HUB_REPORT, post(hub_report_route))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit))
        .with_state(state)
}
