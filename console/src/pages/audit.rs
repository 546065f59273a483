//! The audit log: who did what when, filtered by tenant, actor, action and time. A commune
//! admin's tenant filter is fixed to their own tenant by the server, whatever the form sent.

use axum::extract::{Query, State};
use maud::{html, Markup};
use serde::Deserialize;

use komnet_proto::api::admin::{AuditQuery, AuditRecord};
use komnet_proto::identity::{SiteId, TenantId};

use super::layout::{date_time, day_start, page, tr};
use super::require_manager;
use crate::config::Lang;
use crate::oidc::Role;
use crate::web::{PageError, Shared, Signed};

/// The actions the service records, for the filter's choice.
const ACTIONS: [&str; 8] = [
    "token.create",
    "enroll",
    "enroll.retry",
    "renew",
    "revoke",
    "homeoffice.issue",
    "policy.publish",
    "policy.version",
];

#[derive(Debug, Default, Deserialize)]
pub(super) struct Filter {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    /// `YYYY-MM-DD` (the date input's format), from the start of that day (the console's zone).
    #[serde(default)]
    since: String,
    /// `YYYY-MM-DD`, to the end of that day (the console's zone).
    #[serde(default)]
    until: String,
}

/// Does the entry concern this site (its details name it)?
pub(super) fn mentions_site(r: &AuditRecord, site: &SiteId) -> bool {
    let d = &r.details;
    let named = ["site", "user"]
        .iter()
        .any(|k| d.get(k).and_then(|v| v.as_str()) == Some(site.as_str()));
    let selector = d
        .get("selector")
        .and_then(|v| v.as_str())
        .and_then(|s| s.strip_prefix("site "))
        .and_then(|s| s.split_once('/'))
        .is_some_and(|(_, s)| s == site.as_str());
    let renewing = r.action == "renew"
        && r.actor
            .split_once('/')
            .is_some_and(|(_, s)| s == site.as_str());
    named || selector || renewing
}

pub(super) async fn audit(
    State(app): State<Shared>,
    signed: Signed,
    Query(f): Query<Filter>,
) -> Result<Markup, PageError> {
    require_manager(&signed)?;
    let lang = signed.lang;
    let person = &signed.session.person;
    let mut problems = Vec::new();
    let tenant = match &person.role {
        Role::CommuneAdmin(t) => Some(t.clone()),
        _ if f.tenant.trim().is_empty() => None,
        _ => match TenantId::parse(f.tenant.trim()) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(format!("{}: {e}", tr(lang, "Kommune", "Commune")));
                None
            }
        },
    };
    let date = |text: &str, what: &str, problems: &mut Vec<String>| {
        if text.trim().is_empty() {
            return None;
        }
        let d = day_start(text.trim());
        if d.is_none() {
            problems.push(format!("{what}: {text:?} (JJJJ-MM-TT / YYYY-MM-DD)"));
        }
        d
    };
    let since = date(&f.since, tr(lang, "von", "from"), &mut problems);
    let until = date(&f.until, tr(lang, "bis", "to"), &mut problems).map(|d| d + 86_399);
    let query = AuditQuery {
        limit: Some(200),
        tenant,
        actor: Some(f.actor.trim().to_owned()).filter(|a| !a.is_empty()),
        action: Some(f.action.trim().to_owned()).filter(|a| !a.is_empty()),
        since,
        until,
    };
    let mut records = if problems.is_empty() {
        app.admin
            .audit(&query, &person.audit_name())
            .await
            .map_err(|e| PageError::service(lang, &e))?
    } else {
        Vec::new()
    };
    records.reverse();
    let fixed_tenant = matches!(person.role, Role::CommuneAdmin(_));
    let body = html! {
        form method="get" action="/audit" class="filter" {
            fieldset {
                legend { (tr(lang, "Filter", "Filter")) }
                @if let Role::CommuneAdmin(t) = &person.role {
                    p { (tr(lang, "Kommune: ", "Commune: ")) strong { (t) } }
                }
                @if !fixed_tenant {
                    label for="f-tenant" { (tr(lang, "Kommune", "Commune")) }
                    input id="f-tenant" name="tenant" type="text" value=(f.tenant);
                }
                label for="f-actor" { (tr(lang, "Person oder Gerät", "Person or device")) }
                input id="f-actor" name="actor" type="text" value=(f.actor);
                label for="f-action" { (tr(lang, "Aktion", "Action")) }
                select id="f-action" name="action" {
                    option value="" { (tr(lang, "alle", "all")) }
                    @for a in ACTIONS {
                        option value=(a) selected[f.action == a] { (a) }
                    }
                }
                label for="f-since" { (tr(lang, "von (Tag)", "from (day)")) }
                input id="f-since" name="since" type="date" value=(f.since);
                label for="f-until" { (tr(lang, "bis (Tag)", "to (day)")) }
                input id="f-until" name="until" type="date" value=(f.until);
                button type="submit" { (tr(lang, "Anzeigen", "Show")) }
            }
        }
        @for p in &problems { p class="error" role="alert" { (p) } }
        (table(lang, &records))
    };
    Ok(page(
        &signed,
        "/audit",
        tr(lang, "Protokoll", "Audit log"),
        body,
    ))
}

/// Audit entries, newest first as given.
pub(super) fn table(lang: Lang, records: &[AuditRecord]) -> Markup {
    html! {
        @if records.is_empty() {
            p { (tr(lang, "Keine Einträge.", "No entries.")) }
        } @else {
            table class="audit" {
                caption { (tr(lang, "Einträge, neueste zuerst", "Entries, newest first")) }
                thead { tr {
                    th scope="col" { (tr(lang, "Zeit", "Time")) }
                    th scope="col" { (tr(lang, "Wer", "Who")) }
                    th scope="col" { (tr(lang, "Aktion", "Action")) }
                    th scope="col" { (tr(lang, "Einzelheiten", "Details")) }
                } }
                tbody {
                    @for r in records {
                        tr {
                            td { time datetime=(r.at) { (date_time(r.at)) } }
                            td { (r.actor) }
                            td { code { (r.action) } }
                            td { code class="details" { (r.details.to_string()) } }
                        }
                    }
                }
            }
        }
    }
}
