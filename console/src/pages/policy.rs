//! The policy in force: version, name, signing key, when and by whom it was published, an
//! "explain" form (can segment X reach service Y on port P, and why) answered by the policy
//! language's own `explain`, on the bundle the gateways get, verified here with the service's
//! policy key, and what changed from the version published before (`diff.rs`).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use maud::{html, Markup};
use serde::Deserialize;

use komnet_proto::api::admin::AuditQuery;

use super::layout::{date_time, page, tr};
use super::require_manager;
use crate::web::{PageError, Shared, Signed};

mod diff;

#[derive(Debug, Default, Deserialize)]
pub(super) struct ExplainForm {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

pub(super) async fn policy(
    State(app): State<Shared>,
    signed: Signed,
    Query(form): Query<ExplainForm>,
) -> Result<Markup, PageError> {
    require_manager(&signed)?;
    let lang = signed.lang;
    let person = signed.session.person.audit_name();
    let published = app
        .admin
        .policy(&person)
        .await
        .map_err(|e| PageError::service(lang, &e))?;
    let failed = |what: String| PageError::new(StatusCode::BAD_GATEWAY, lang, what);
    let key = published
        .policy_public_key
        .as_deref()
        .and_then(|k| STANDARD.decode(k.trim()).ok())
        .ok_or_else(|| {
            failed("the service has no policy_public_key to verify the bundle with".into())
        })?;
    let bytes = STANDARD
        .decode(&published.bundle)
        .map_err(|e| failed(format!("bundle: {e}")))?;
    let verified = komnet_policy::bundle::verify(&bytes, &key)
        .map_err(|e| failed(format!("bundle version {}: {e}", published.info.version)))?;
    let compiled = verified
        .compile()
        .map_err(|e| failed(format!("bundle version {}: {e}", published.info.version)))?;
    let p = &compiled.policy;
    let previous = diff::previous(lang, published.previous.as_ref(), &key);
    // Who published it: the newest policy.publish entry of this version.
    let publisher = app
        .admin
        .audit(
            &AuditQuery {
                action: Some("policy.publish".into()),
                limit: Some(20),
                ..Default::default()
            },
            &person,
        )
        .await
        .map_err(|e| PageError::service(lang, &e))?
        .into_iter()
        .rev()
        .find(|r| r.details["version"].as_u64() == Some(published.info.version))
        .map(|r| r.actor);
    let (from, to) = (form.from.trim(), form.to.trim());
    let answer = (!from.is_empty() && !to.is_empty()).then(|| komnet_policy::explain(p, from, to));
    let body = html! {
        dl class="facts" {
            dt { (tr(lang, "Name", "Name")) } dd { (p.name) }
            dt { (tr(lang, "Version", "Version")) } dd { (p.version) }
            dt { (tr(lang, "Veröffentlicht", "Published")) } dd { (date_time(published.info.published_at)) }
            dt { (tr(lang, "von", "by")) } dd { (publisher.as_deref().unwrap_or("–")) }
            dt { (tr(lang, "Signaturschlüssel", "Signing key")) } dd { code { (published.info.key_id) } }
            dt { (tr(lang, "Kommunen", "Communes")) } dd { (p.tenants.len()) }
            dt { (tr(lang, "Regeln", "Rules")) } dd { (p.rules.len()) }
        }
        h2 { (tr(lang, "Erklären: darf X auf Y zugreifen, und warum?", "Explain: may X reach Y, and why?")) }
        form method="get" action="/policy" class="stacked" {
            label for="e-from" { (tr(lang, "Von (Segment wie tholey/verwaltung, oder Adresse)", "From (segment such as tholey/verwaltung, or address)")) }
            input id="e-from" name="from" type="text" required value=(form.from) autocomplete="off";
            label for="e-to" { (tr(lang, "Nach (Dienst wie tholey/dateiserver, auch mit :tcp/445, oder Adresse)", "To (service such as tholey/dateiserver, also with :tcp/445, or address)")) }
            input id="e-to" name="to" type="text" required value=(form.to) autocomplete="off";
            button type="submit" { (tr(lang, "Erklären", "Explain")) }
        }
        @match &answer {
            Some(Ok(lines)) => {
                ul class="explain" aria-live="polite" {
                    @for l in lines { li { code { (l.to_string()) } } }
                }
            }
            Some(Err(e)) => { p class="error" role="alert" { (e) } }
            None => {}
        }
        p class="note" { (tr(lang,
            "Die Antwort kommt aus derselben Richtlinie, die die Gateways anwenden (komnet policy explain).",
            "The answer comes from the same policy the gateways apply (komnet policy explain).")) }
        (diff::section(lang, &previous, &verified, p))
    };
    Ok(page(
        &signed,
        "/policy",
        tr(lang, "Richtlinie", "Policy"),
        body,
    ))
}
