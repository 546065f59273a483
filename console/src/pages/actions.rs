//! What changes things: creating a token (the answer is the bootstrap file itself: the token
//! is in it only, the console keeps nothing) and revoking a site (reason and confirmation).
//! The enrollment service records each in its audit log with the person's name from the
//! identity provider.

use axum::extract::{Path, Query, State};
use axum::http::header::{self, HeaderMap};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;

use komnet_proto::api::admin::{CreateTokenRequest, RevokeRequest};
use komnet_proto::api::RevocationReason;
use komnet_proto::bootstrap::Bootstrap;
use komnet_proto::identity::{Role as PeerRole, SiteId, TenantId};

use super::layout::{page, tr};
use super::{managed_site, require_manager};
use crate::oidc::Role;
use crate::web::{check_form, PageError, Shared, Signed};

/// Token lifetimes on offer (the technician's visit is within a week).
const TTLS: [(&str, &str, u64); 3] = [
    ("Stunde", "hour", 3600),
    ("Tag", "day", 86_400),
    ("Woche", "week", 7 * 86_400),
];

#[derive(Debug, Default, Deserialize)]
pub(super) struct TokenPrefill {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    site: String,
}

fn token_page(signed: &Signed, prefill: &TokenPrefill, problem: Option<&str>) -> Markup {
    let lang = signed.lang;
    let person = &signed.session.person;
    let body = html! {
        @if let Some(p) = problem { p class="error" role="alert" { (p) } }
        p { (tr(lang,
            "Das Token steht nur in der Bootstrap-Datei, die sofort heruntergeladen wird; die Konsole behält es nicht. Kopieren Sie die Datei auf den USB-Stick für die Einrichtung vor Ort.",
            "The token is only in the bootstrap file, which downloads at once; the console keeps nothing. Copy the file to the USB stick for the installation on site.")) }
        form method="post" action="/tokens" class="stacked" {
            input type="hidden" name="csrf" value=(signed.session.csrf);
            @match &person.role {
                Role::CommuneAdmin(t) => {
                    p { (tr(lang, "Kommune: ", "Commune: ")) strong { (t) } }
                }
                _ => {
                    label for="t-tenant" { (tr(lang, "Kommune", "Commune")) }
                    input id="t-tenant" name="tenant" type="text" required value=(prefill.tenant)
                        autocomplete="off";
                }
            }
            label for="t-site" { (tr(lang, "Standort (z. B. rathaus)", "Site (e.g. rathaus)")) }
            input id="t-site" name="site" type="text" required value=(prefill.site) autocomplete="off";
            label for="t-role" { (tr(lang, "Art", "Kind")) }
            select id="t-role" name="role" {
                option value="spoke" { (tr(lang, "Rathaus/Standort (Spoke)", "Site appliance (spoke)")) }
                @if person.role == Role::Operator {
                    option value="hub" { "Hub" }
                }
            }
            label for="t-ttl" { (tr(lang, "Gültig für", "Valid for")) }
            select id="t-ttl" name="ttl" {
                @for (de, en, secs) in TTLS {
                    option value=(secs) selected[secs == 86_400] { "1 " (tr(lang, de, en)) }
                }
            }
            button type="submit" { (tr(lang, "Token erstellen und Datei herunterladen", "Create token and download file")) }
        }
    };
    page(
        signed,
        "/tokens",
        tr(lang, "Token erstellen", "Create token"),
        body,
    )
}

pub(super) async fn token_form(
    signed: Signed,
    Query(prefill): Query<TokenPrefill>,
) -> Result<Markup, PageError> {
    require_manager(&signed)?;
    Ok(token_page(&signed, &prefill, None))
}

#[derive(Debug, Deserialize)]
pub(super) struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    tenant: String,
    site: String,
    role: String,
    ttl: u64,
}

pub(super) async fn token_create(
    State(app): State<Shared>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Result<Response, PageError> {
    check_form(&app, &signed, &headers, &form.csrf)?;
    require_manager(&signed)?;
    let lang = signed.lang;
    let person = &signed.session.person;
    let again = |problem: String| {
        let prefill = TokenPrefill {
            tenant: form.tenant.clone(),
            site: form.site.clone(),
        };
        Ok((
            StatusCode::BAD_REQUEST,
            token_page(&signed, &prefill, Some(&problem)),
        )
            .into_response())
    };
    // A commune admin's tokens are for their own tenant, whatever the form says.
    let tenant = match &person.role {
        Role::CommuneAdmin(t) => t.clone(),
        _ => match TenantId::parse(form.tenant.trim()) {
            Ok(t) => t,
            Err(e) => return again(format!("{}: {e}", tr(lang, "Kommune", "Commune"))),
        },
    };
    let site = match SiteId::parse(form.site.trim()) {
        Ok(s) => s,
        Err(e) => return again(format!("{}: {e}", tr(lang, "Standort", "Site"))),
    };
    let role = match (form.role.as_str(), &person.role) {
        ("spoke", _) => PeerRole::Spoke,
        // Hubs are the data centre's: operators only.
        ("hub", Role::Operator) => PeerRole::Hub,
        _ => return Err(PageError::forbidden(lang)),
    };
    if !TTLS.iter().any(|(_, _, s)| *s == form.ttl) {
        return again(format!(
            "{}: {}",
            tr(lang, "Gültigkeit", "Validity"),
            form.ttl
        ));
    }
    let resp = app
        .admin
        .create_token(
            &CreateTokenRequest {
                tenant: tenant.clone(),
                site: site.clone(),
                role,
                ttl_secs: form.ttl,
            },
            &person.audit_name(),
        )
        .await
        .map_err(|e| PageError::service(lang, &e))?;
    tracing::info!(person = %person.audit_name(), %tenant, %site, token_id = %resp.token_id, "token created");
    let file = Bootstrap::from_token(resp, Vec::new());
    let json = serde_json::to_string_pretty(&file)
        .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, lang, e.to_string()))?;
    let name = format!("komnet-bootstrap-{tenant}-{site}.json");
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        json,
    )
        .into_response())
}

/// RFC 5280 reasons as the form offers them.
const REASONS: [(&str, &str, &str); 5] = [
    (
        "cessation_of_operation",
        "Standort aufgegeben (Adressen werden frei)",
        "Site decommissioned (addresses released)",
    ),
    (
        "key_compromise",
        "Schlüssel kompromittiert (Gerät gestohlen, verloren)",
        "Key compromised (device stolen, lost)",
    ),
    (
        "affiliation_changed",
        "Zugehörigkeit geändert",
        "Affiliation changed",
    ),
    (
        "privilege_withdrawn",
        "Berechtigung entzogen",
        "Privilege withdrawn",
    ),
    ("unspecified", "Ohne Angabe", "Unspecified"),
];

pub(super) fn revoke_form(signed: &Signed, tenant: &TenantId, site: &SiteId) -> Markup {
    let lang = signed.lang;
    html! {
        h2 { (tr(lang, "Widerrufen", "Revoke")) }
        form method="post" action={ "/sites/" (tenant) "/" (site) "/revoke" } class="stacked danger" {
            input type="hidden" name="csrf" value=(signed.session.csrf);
            label for="r-reason" { (tr(lang, "Grund", "Reason")) }
            select id="r-reason" name="reason" required {
                @for (value, de, en) in REASONS { option value=(value) { (tr(lang, de, en)) } }
            }
            div class="check" {
                input id="r-confirm" name="confirm" type="checkbox" value="yes" required;
                label for="r-confirm" { (tr(lang,
                    "Ich bestätige: die Hubs trennen diesen Standort sofort, bis er neu eingerichtet wird.",
                    "I confirm: the hubs cut this site off at once, until it is enrolled again.")) }
            }
            button type="submit" { (tr(lang, "Zertifikat widerrufen", "Revoke certificate")) }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RevokeForm {
    #[serde(default)]
    csrf: String,
    reason: String,
    #[serde(default)]
    confirm: String,
}

pub(super) async fn revoke(
    State(app): State<Shared>,
    signed: Signed,
    headers: HeaderMap,
    Path((tenant, site)): Path<(String, String)>,
    Form(form): Form<RevokeForm>,
) -> Result<Response, PageError> {
    check_form(&app, &signed, &headers, &form.csrf)?;
    let (tenant, site) = managed_site(&signed, &tenant, &site)?;
    let lang = signed.lang;
    if form.confirm != "yes" {
        return Err(PageError::new(
            StatusCode::BAD_REQUEST,
            lang,
            tr(
                lang,
                "Bitte bestätigen Sie den Widerruf.",
                "Please confirm the revocation.",
            ),
        ));
    }
    let reason: RevocationReason = REASONS
        .iter()
        .find(|(v, _, _)| *v == form.reason)
        .and_then(|(v, _, _)| serde_json::from_value(serde_json::Value::String((*v).into())).ok())
        .ok_or_else(|| {
            PageError::new(
                StatusCode::BAD_REQUEST,
                lang,
                format!("reason {:?}", form.reason),
            )
        })?;
    let person = signed.session.person.audit_name();
    let resp = app
        .admin
        .revoke(
            &RevokeRequest {
                serial: None,
                tenant: Some(tenant.clone()),
                site: Some(site.clone()),
                reason,
            },
            &person,
        )
        .await
        .map_err(|e| PageError::service(lang, &e))?;
    tracing::info!(%person, %tenant, %site, serials = ?resp.revoked_serials, "revoked");
    Ok(Redirect::to(&format!("/sites/{tenant}/{site}")).into_response())
}
