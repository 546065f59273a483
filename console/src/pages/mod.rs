//! The console's pages. Every handler decides from the session's role what the person may
//! see: an operator everything, a commune admin their tenant (another tenant's site answers
//! 404, exactly like a site that does not exist), a user only their own devices.

use std::collections::HashMap;

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
        .route("/fleet/table", get(fleet_table_only))
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

/// The fleet as this person may see it.
async fn managed_fleet(app: &Shared, signed: &Signed) -> Result<FleetResponse, PageError> {
    require_manager(signed)?;
    let person = &signed.session.person;
    let mut fleet: FleetResponse = app
        .admin
        .fleet(&person.audit_name())
        .await
        .map_err(|e| PageError::service(signed.lang, &e))?;
    fleet.peers.retain(|p| person.manages(&p.tenant));
    fleet
        .peers
        .sort_by(|a, b| (&a.tenant, a.role, &a.site).cmp(&(&b.tenant, b.role, &b.site)));
    Ok(fleet)
}

/// The fleet table alone: what the page's script swaps in every 10 s.
async fn fleet_table_only(State(app): State<Shared>, signed: Signed) -> Result<Markup, PageError> {
    let fleet = managed_fleet(&app, &signed).await?;
    Ok(fleet_table(signed.lang, &fleet))
}

/// What the hubs last reported of a peer: the hub that saw its newest handshake, and the
/// refusals every hub counted for it.
struct Seen<'a> {
    hub: &'a str,
    last_handshake: Option<i64>,
    refused: u64,
}

fn seen_by_hubs(fleet: &FleetResponse) -> HashMap<&str, Seen<'_>> {
    let mut seen: HashMap<&str, Seen<'_>> = HashMap::new();
    for report in &fleet.hub_reports {
        for p in &report.report.peers {
            let entry = seen.entry(p.public_key.as_str()).or_insert(Seen {
                hub: report.site.as_str(),
                last_handshake: None,
                refused: 0,
            });
            entry.refused += p.drops + p.denied;
            if p.last_handshake > entry.last_handshake {
                entry.last_handshake = p.last_handshake;
                entry.hub = report.site.as_str();
            }
        }
    }
    seen
}

/// A hub whose last report is older than this is marked: it or its link to the service is
/// down (it reports every 15 s).
const REPORT_STALE_SECS: i64 = 60;

fn fleet_table(lang: Lang, fleet: &FleetResponse) -> Markup {
    let seen = seen_by_hubs(fleet);
    let held: HashMap<(&str, &str), u64> = fleet
        .policy_held
        .iter()
        .map(|h| ((h.tenant.as_str(), h.site.as_str()), h.version))
        .collect();
    let current = fleet.published_policy.as_ref().map(|p| p.version);
    let reports: HashMap<(&str, &str), i64> = fleet
        .hub_reports
        .iter()
        .map(|r| ((r.tenant.as_str(), r.site.as_str()), r.at))
        .collect();
    html! {
        table {
            caption { (tr(lang, "Standorte, Hubs und Homeoffice-Geräte mit gültigem Zertifikat",
                              "Sites, hubs and home-office devices with a valid certificate")) }
            thead { tr {
                th scope="col" { (tr(lang, "Kommune", "Commune")) }
                th scope="col" { (tr(lang, "Name", "Name")) }
                th scope="col" { (tr(lang, "Art", "Kind")) }
                th scope="col" { (tr(lang, "Tunneladressen", "Tunnel addresses")) }
                th scope="col" { (tr(lang, "Zertifikat gültig bis", "Certificate valid until")) }
                th scope="col" { (tr(lang, "Zustand, letzter Handshake", "State, last handshake")) }
                th scope="col" { (tr(lang, "Verworfen", "Refused")) }
                th scope="col" { (tr(lang, "Richtlinie am Gerät", "Policy on the device")) }
            } }
            tbody {
                @for p in &fleet.peers {
                    @let key = p.wg_public_key.to_base64();
                    @let s = seen.get(key.as_str());
                    tr {
                        td { (p.tenant) }
                        td { a href={ "/sites/" (p.tenant) "/" (p.site) } { (p.site) } }
                        td { (role_name(lang, p.role)) }
                        td { (addrs(p)) }
                        (expiry_cell(lang, fleet.now, p.not_after))
                        @if p.role == PeerRole::Hub {
                            @match reports.get(&(p.tenant.as_str(), p.site.as_str())) {
                                Some(at) if fleet.now - at <= REPORT_STALE_SECS => td {
                                    (tr(lang, "Bericht ", "report ")) (relative(lang, fleet.now, *at))
                                },
                                Some(at) => td class="warn" {
                                    strong { (tr(lang, "kein Bericht seit ", "no report since ")) }
                                    (date_time(*at))
                                },
                                None => td { (tr(lang, "noch kein Bericht", "no report yet")) },
                            }
                            td { "–" }
                        } @else {
                            @match s.and_then(|s| s.last_handshake.map(|t| (t, s.hub))) {
                                // WireGuard renews a live session's keys every 2 minutes and a
                                // spoke keeps its session warm: an older handshake is a link down.
                                Some((t, hub)) if fleet.now - t <= komnet_proto::status::PEER_UP_SECS => td {
                                    (tr(lang, "verbunden", "connected")) " · "
                                    (relative(lang, fleet.now, t)) " (" (hub) ")"
                                },
                                Some((t, hub)) => td class="warn" {
                                    strong { (tr(lang, "getrennt", "disconnected")) } " · "
                                    (relative(lang, fleet.now, t)) " (" (hub) ")"
                                },
                                None => td { (tr(lang, "keiner", "none")) },
                            }
                            td { (s.map_or(0, |s| s.refused)) }
                        }
                        @if p.role == PeerRole::HomeOffice {
                            td { "–" }
                        } @else {
                            @match held.get(&(p.tenant.as_str(), p.site.as_str())) {
                                Some(v) if Some(*v) == current || current.is_none() => td {
                                    (tr(lang, "Version ", "version ")) (v)
                                },
                                Some(v) => td class="warn" {
                                    (tr(lang, "Version ", "version ")) (v) " – "
                                    strong { (tr(lang, "nicht die veröffentlichte", "not the published one")) }
                                },
                                None => td { (tr(lang, "noch nicht gemeldet", "not reported yet")) },
                            }
                        }
                    }
                }
            }
        }
        @if fleet.peers.is_empty() {
            p { (tr(lang, "Noch keine gültigen Identitäten.", "No valid identities yet.")) }
        }
    }
}

async fn fleet(State(app): State<Shared>, signed: Signed) -> Result<Markup, PageError> {
    let fleet = managed_fleet(&app, &signed).await?;
    let lang = signed.lang;
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
            dt { (tr(lang, "Gültige Identitäten", "Valid identities")) } dd { (fleet.peers.len()) }
        }
        p class="note" {
            span id="fleet-stamp" { (tr(lang, "Stand beim Laden der Seite", "As of loading the page")) }
            " "
            a href="/fleet" { (tr(lang, "Neu laden", "Reload")) }
        }
        div id="fleet-live" { (fleet_table(lang, &fleet)) }
        script src="/static/live.js" defer {}
        p class="note" { (tr(lang,
            "Handshakes und verworfene Pakete (vom Tunnel oder von der Richtlinie) melden die Hubs alle 15 s; Einzelheiten zeigt komnet status am Hub.",
            "Handshakes and refused packets (by the tunnel or the policy) are reported by the hubs every 15 s; komnet status on the hub has the details.")) }
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
