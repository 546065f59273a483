//! The console's pages. Every handler decides from the session's role what the person may
//! see: an operator everything, a commune admin their tenant (another tenant's site answers
//! 404, exactly like a site that does not exist), a user only their own devices.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup};

use komnet_proto::api::admin::{AuditQuery, FleetResponse};
use komnet_proto::identity::{Identity, Role as PeerRole, SiteId, TenantId};

use crate::config::Lang;
use crate::oidc::Role;
use crate::web::{PageError, Shared, Signed};

mod actions;
mod audit;
pub mod devices;
pub mod layout;
mod policy;

use layout::{date_time, page, relative, tr};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/fleet", get(fleet))
        .route("/sites/{tenant}/{site}", get(site))
        .route("/sites/{tenant}/{site}/revoke", post(actions::revoke))
        .route(
            "/tokens",
            get(actions::token_form).post(actions::token_create),
        )
        .route("/audit", get(audit::audit))
        .route("/policy", get(policy::policy))
        .route("/devices", get(devices::devices).post(devices::create))
        .route("/devices/{site}/revoke", post(devices::revoke))
}

/// The sign-in page (with the reason a sign-in failed, if one did).
pub fn login(lang: Lang, problem: Option<&str>) -> Markup {
    html! {
        (maud::DOCTYPE)
        html lang=(if lang == Lang::De { "de" } else { "en" }) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (tr(lang, "Anmelden", "Sign in")) " – komnet" }
                link rel="stylesheet" href="/static/console.css";
            }
            body {
                header {
                    p class="brand" { "komnet" }
                    div class="who" {
                        @if lang == Lang::De {
                            a class="lang" href="/lang/en?back=/login" hreflang="en" lang="en" { "English" }
                        } @else {
                            a class="lang" href="/lang/de?back=/login" hreflang="de" lang="de" { "Deutsch" }
                        }
                    }
                }
                main id="main" {
                    h1 { (tr(lang, "komnet-Konsole", "komnet console")) }
                    @if let Some(p) = problem {
                        p class="error" role="alert" {
                            (tr(lang, "Die Anmeldung ist fehlgeschlagen: ", "Sign-in failed: ")) (p)
                        }
                    }
                    p { (tr(lang,
                        "Melden Sie sich mit dem Konto Ihrer Verwaltung an (Single Sign-on).",
                        "Sign in with your administration's account (single sign-on).")) }
                    p { a class="button" href="/auth/start" { (tr(lang, "Anmelden", "Sign in")) } }
                }
            }
        }
    }
}

/// Operators and commune admins only.
pub(crate) fn require_manager(signed: &Signed) -> Result<(), PageError> {
    match signed.session.person.role {
        Role::User(_) => Err(PageError::forbidden(signed.lang)),
        _ => Ok(()),
    }
}

fn role_name(lang: Lang, role: PeerRole) -> &'static str {
    match role {
        PeerRole::Spoke => tr(lang, "Rathaus/Standort", "Site appliance"),
        PeerRole::Hub => "Hub",
        PeerRole::HomeOffice => tr(lang, "Homeoffice", "Home office"),
    }
}

/// Certificates that expire within this are marked: appliances renew from two thirds of
/// their lifetime (a week by default), so one this close to its end is not renewing.
const EXPIRY_WARNING_SECS: i64 = 2 * 86_400;

fn expiry_cell(lang: Lang, now: i64, not_after: i64) -> Markup {
    let soon = not_after - now < EXPIRY_WARNING_SECS;
    html! {
        td class=[soon.then_some("warn")] {
            time datetime=(not_after) { (date_time(not_after)) }
            " (" (relative(lang, now, not_after)) ")"
            @if soon { " – " strong { (tr(lang, "läuft bald ab", "expires soon")) } }
        }
    }
}

async fn fleet(State(app): State<Shared>, signed: Signed) -> Result<Markup, PageError> {
    require_manager(&signed)?;
    let lang = signed.lang;
    let person = &signed.session.person;
    let fleet: FleetResponse = app
        .admin
        .fleet(&person.audit_name())
        .await
        .map_err(|e| PageError::service(lang, &e))?;
    let mut peers: Vec<&Identity> = fleet
        .peers
        .iter()
        .filter(|p| person.manages(&p.tenant))
        .collect();
    peers.sort_by(|a, b| (&a.tenant, a.role, &a.site).cmp(&(&b.tenant, b.role, &b.site)));
    let policy = match &fleet.published_policy {
        Some(p) => format!(
            "{} {} ({} {})",
            tr(lang, "Version", "version"),
            p.version,
            tr(lang, "veröffentlicht", "published"),
            date_time(p.published_at)
        ),
        None => format!(
            "{} {}",
            tr(
                lang,
                "keine veröffentlicht; ausgegebene Version",
                "none published; version handed out"
            ),
            fleet.policy_version
        ),
    };
    let body = html! {
        dl class="facts" {
            dt { (tr(lang, "Richtlinie in Kraft", "Policy in force")) } dd { (policy) }
            dt { (tr(lang, "Registerstand", "Registry version")) } dd { (fleet.registry_version) }
            dt { (tr(lang, "Gültige Identitäten", "Valid identities")) } dd { (peers.len()) }
        }
        table {
            caption { (tr(lang, "Standorte, Hubs und Homeoffice-Geräte mit gültigem Zertifikat",
                              "Sites, hubs and home-office devices with a valid certificate")) }
            thead { tr {
                th scope="col" { (tr(lang, "Kommune", "Commune")) }
                th scope="col" { (tr(lang, "Name", "Name")) }
                th scope="col" { (tr(lang, "Art", "Kind")) }
                th scope="col" { (tr(lang, "Tunneladressen", "Tunnel addresses")) }
                th scope="col" { (tr(lang, "Zertifikat gültig bis", "Certificate valid until")) }
            } }
            tbody {
                @for p in &peers {
                    tr {
                        td { (p.tenant) }
                        td { a href={ "/sites/" (p.tenant) "/" (p.site) } { (p.site) } }
                        td { (role_name(lang, p.role)) }
                        td { (addrs(p)) }
                        (expiry_cell(lang, fleet.now, p.not_after))
                    }
                }
            }
        }
        @if peers.is_empty() {
            p { (tr(lang, "Noch keine gültigen Identitäten.", "No valid identities yet.")) }
        }
        p class="note" { (tr(lang,
            "Handshakes, Verkehr und Verwürfe kennt jeder Hub selbst (komnet status, /metrics); diese Seite zeigt, was der Enrollment-Dienst weiß.",
            "Handshakes, traffic and drops are known to each hub (komnet status, /metrics); this page shows what the enrollment service knows.")) }
    };
    Ok(page(
        &signed,
        "/fleet",
        tr(lang, "Standorte", "Sites"),
        body,
    ))
}

fn addrs(p: &Identity) -> String {
    p.tunnel_addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tenant and site in a URL, refused as "not found" for anyone who does not manage them.
pub(crate) fn managed_site(
    signed: &Signed,
    tenant: &str,
    site: &str,
) -> Result<(TenantId, SiteId), PageError> {
    let lang = signed.lang;
    require_manager(signed)?;
    let tenant = TenantId::parse(tenant).map_err(|_| PageError::not_found(lang))?;
    let site = SiteId::parse(site).map_err(|_| PageError::not_found(lang))?;
    if !signed.session.person.manages(&tenant) {
        return Err(PageError::not_found(lang));
    }
    Ok((tenant, site))
}

async fn site(
    State(app): State<Shared>,
    signed: Signed,
    Path((tenant, site)): Path<(String, String)>,
) -> Result<Markup, PageError> {
    let (tenant, site) = managed_site(&signed, &tenant, &site)?;
    let lang = signed.lang;
    let person = signed.session.person.audit_name();
    let fleet = app
        .admin
        .fleet(&person)
        .await
        .map_err(|e| PageError::service(lang, &e))?;
    let identity = fleet
        .peers
        .iter()
        .find(|p| p.tenant == tenant && p.site == site);
    let mut history = app
        .admin
        .audit(
            &AuditQuery {
                tenant: Some(tenant.clone()),
                limit: Some(1000),
                ..Default::default()
            },
            &person,
        )
        .await
        .map_err(|e| PageError::service(lang, &e))?;
    history.retain(|r| audit::mentions_site(r, &site));
    history.reverse();
    history.truncate(50);
    let here = format!("/sites/{tenant}/{site}");
    let title = format!("{tenant} / {site}");
    let body = html! {
        @match identity {
            Some(id) => {
                dl class="facts" {
                    dt { (tr(lang, "Art", "Kind")) } dd { (role_name(lang, id.role)) }
                    dt { (tr(lang, "Tunneladressen", "Tunnel addresses")) } dd { (addrs(id)) }
                    dt { (tr(lang, "WireGuard-Schlüssel", "WireGuard key")) } dd { code { (id.wg_public_key.to_base64()) } }
                    dt { (tr(lang, "Zertifikat (Seriennummer)", "Certificate (serial)")) } dd { code { (id.serial) } }
                    dt { (tr(lang, "Gültig bis", "Valid until")) } dd {
                        (date_time(id.not_after)) " (" (relative(lang, fleet.now, id.not_after)) ")"
                    }
                }
                (actions::revoke_form(&signed, &tenant, &site))
            }
            None => {
                p class="note" { (tr(lang,
                    "Dieser Standort hat kein gültiges Zertifikat (noch nicht eingerichtet, widerrufen oder abgelaufen).",
                    "This site has no valid certificate (not yet enrolled, revoked or expired).")) }
            }
        }
        p { a href={ "/tokens?tenant=" (tenant) "&site=" (site) } {
            (tr(lang, "Token für diesen Standort erstellen", "Create a token for this site")) } }
        h2 { (tr(lang, "Verlauf", "History")) }
        (audit::table(lang, &history))
    };
    Ok(page(&signed, &here, &title, body))
}
