//! The home-office portal: a user names a device and gets its wg-quick configuration as a file
//! and a QR code, sees their devices and revokes them.
//!
//! The key pair is made here, in the console, for this one answer: the private key goes into
//! the page and the download link and nowhere else (the service sees only the public key; the
//! console keeps nothing). A device is the home-office identity `OWNER_DEVICE` in the user's
//! commune, OWNER being their name from the identity provider: names of devices have no `_`,
//! so the last `_` separates owner and device unambiguously.

use axum::extract::{Path, State};
use axum::http::header::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use maud::{html, Markup};
use serde::Deserialize;

use komnet_enroll_client::WgKeys;
use komnet_proto::api::admin::{HomeOfficeRequest, RevokeRequest};
use komnet_proto::api::RevocationReason;
use komnet_proto::identity::{Identity, Role as PeerRole, SiteId, TenantId};

use super::layout::{date_time, page, relative, tr};
use crate::config::Lang;
use crate::oidc::{Person, Role};
use crate::web::{check_form, PageError, Shared, Signed};

/// The longest device name (the identity name is at most 63 characters with the owner's).
const MAX_DEVICE: usize = 20;

/// A person's name as their devices' identities carry it (lower case; characters a name may
/// not have become `.`); `None` when no device name can be made of it.
pub(crate) fn owner_name(name: &str) -> Option<String> {
    let owner: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' {
                c
            } else {
                '.'
            }
        })
        .collect();
    let owner = owner.trim_start_matches(['.', '-']).to_owned();
    (!owner.is_empty() && owner.len() + 1 + MAX_DEVICE <= 63).then_some(owner)
}

/// The user's commune and their name as identities carry it.
fn owner(signed: &Signed) -> Result<(TenantId, String), PageError> {
    let lang = signed.lang;
    let Person { role, name, .. } = &signed.session.person;
    let Role::User(tenant) = role else {
        return Err(PageError::forbidden(lang));
    };
    let Some(owner) = owner_name(name) else {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            lang,
            format!("{name}: {}", tr(lang,
                "aus diesem Namen lässt sich kein Gerätename bilden; bitte wenden Sie sich an Ihre IT.",
                "no device name can be made of this name; please ask your IT.")),
        ));
    };
    Ok((tenant.clone(), owner))
}

/// The device's name when it is one of the owner's home-office devices
/// ([`SiteId::device_of`]).
fn device_of<'a>(owner: &str, id: &'a Identity) -> Option<&'a str> {
    (id.role == PeerRole::HomeOffice)
        .then(|| id.site.device_of(owner))
        .flatten()
}

/// Whether and until when a device gets through the hubs, for people.
fn access(lang: Lang, gated: bool, now: i64, id: &Identity) -> Markup {
    match id.admitted_until {
        Some(until) if until > now && gated => html! {
            (tr(lang, "verbunden bis ", "connected until ")) (date_time(until.min(id.not_after)))
        },
        Some(_) if gated => html! {
            strong { (tr(lang, "gesperrt", "closed")) } " – "
            (tr(lang, "öffnet sich bei Ihrer nächsten Anmeldung mit zweitem Faktor",
                "opens at your next sign-in with a second factor"))
        },
        _ => {
            html! { (tr(lang, "solange das Zertifikat gilt", "as long as the certificate is valid")) }
        }
    }
}

/// The devices page; `window`: the commune's MFA window (seconds), when its home offices are
/// MFA-gated.
fn devices_page(
    signed: &Signed,
    devices: &[(String, &Identity)],
    now: i64,
    window: Option<u64>,
    problem: Option<&str>,
) -> Markup {
    let lang = signed.lang;
    let mfa_now = signed.session.person.mfa_at.is_some();
    let body = html! {
        @if let Some(p) = problem { p class="error" role="alert" { (p) } }
        @if let Some(window) = window {
            p class="note" id="mfa-note" {
                (tr(lang, "Ihre Kommune lässt Heimarbeitsplätze nur nach einer Anmeldung mit zweitem Faktor herein, jeweils für ",
                    "Your commune lets home offices in only after a sign-in with a second factor, each time for "))
                @if window >= 3600 { (window / 3600) (tr(lang, " Stunden", " hours")) }
                @if window >= 3600 && window % 3600 != 0 { " " }
                @if window % 3600 != 0 { (window % 3600 / 60) (tr(lang, " Minuten", " minutes")) }
                ". "
                @if mfa_now {
                    (tr(lang, "Ihre Anmeldung hatte einen zweiten Faktor.", "Your sign-in had a second factor."))
                } @else {
                    strong { (tr(lang, "Ihre Anmeldung hatte keinen zweiten Faktor: Ihre Geräte bleiben gesperrt.",
                        "Your sign-in had no second factor: your devices stay closed.")) }
                }
            }
        }
        @if devices.is_empty() {
            p { (tr(lang, "Sie haben noch kein Gerät eingerichtet.", "You have not set up a device yet.")) }
        } @else {
            table {
                caption { (tr(lang, "Ihre Geräte", "Your devices")) }
                thead { tr {
                    th scope="col" { (tr(lang, "Gerät", "Device")) }
                    th scope="col" { (tr(lang, "Tunneladressen", "Tunnel addresses")) }
                    th scope="col" { (tr(lang, "Gültig bis", "Valid until")) }
                    th scope="col" { (tr(lang, "Zugang", "Access")) }
                    th scope="col" { (tr(lang, "Widerrufen", "Revoke")) }
                } }
                tbody {
                    @for (name, id) in devices {
                        tr {
                            td { (name) }
                            td { (id.tunnel_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")) }
                            td { (date_time(id.not_after)) " (" (relative(lang, now, id.not_after)) ")" }
                            td class="access" { (access(lang, window.is_some(), now, id)) }
                            td {
                                form method="post" action={ "/devices/" (id.site) "/revoke" } class="inline danger" {
                                    input type="hidden" name="csrf" value=(signed.session.csrf);
                                    div class="check" {
                                        input id={ "c-" (name) } name="confirm" type="checkbox" value="yes" required;
                                        label for={ "c-" (name) } { (tr(lang, "Ja, ", "Yes, ")) (name) (tr(lang, " sperren", " is to be cut off")) }
                                    }
                                    button type="submit" { (tr(lang, "Widerrufen", "Revoke")) " " span class="visually-hidden" { (name) } }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { (tr(lang, "Neues Gerät", "New device")) }
        form method="post" action="/devices" class="stacked" {
            input type="hidden" name="csrf" value=(signed.session.csrf);
            label for="d-name" { (tr(lang, "Gerätename (z. B. laptop, handy)", "Device name (e.g. laptop, phone)")) }
            input id="d-name" name="device" type="text" required maxlength=(MAX_DEVICE)
                pattern="[a-z0-9][a-z0-9-]*" aria-describedby="d-hint" autocomplete="off";
            p id="d-hint" class="note" { (tr(lang,
                "Kleinbuchstaben, Ziffern und Bindestrich. Ein Gerät mit demselben Namen wird ersetzt.",
                "Lower-case letters, digits and hyphens. A device of the same name is replaced.")) }
            button type="submit" { (tr(lang, "Gerät einrichten", "Set up device")) }
        }
    };
    page(
        signed,
        "/devices",
        tr(lang, "Meine Geräte", "My devices"),
        body,
    )
}

pub(super) async fn devices(
    State(app): State<Shared>,
    signed: Signed,
) -> Result<Markup, PageError> {
    let (tenant, owner) = owner(&signed)?;
    let fleet = app
        .admin
        .fleet(&signed.session.person.audit_name())
        .await
        .map_err(|e| PageError::service(signed.lang, &e))?;
    let mine: Vec<(String, &Identity)> = fleet
        .peers
        .iter()
        .filter(|p| p.tenant == tenant)
        .filter_map(|p| device_of(&owner, p).map(|d| (d.to_owned(), p)))
        .collect();
    let window = fleet.mfa_windows.get(&tenant).copied();
    Ok(devices_page(&signed, &mine, fleet.now, window, None))
}

#[derive(Debug, Deserialize)]
pub(super) struct NewDevice {
    #[serde(default)]
    csrf: String,
    device: String,
}

pub(super) async fn create(
    State(app): State<Shared>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<NewDevice>,
) -> Result<Response, PageError> {
    check_form(&app, &signed, &headers, &form.csrf)?;
    let (tenant, owner) = owner(&signed)?;
    let lang = signed.lang;
    let device = form.device.trim();
    let valid = !device.is_empty()
        && device.len() <= MAX_DEVICE
        && device.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && device
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let site = SiteId::parse(&format!("{owner}_{device}"))
        .ok()
        .filter(|_| valid);
    let Some(site) = site else {
        let problem = format!(
            "{device:?}: {}",
            tr(
                lang,
                "nur Kleinbuchstaben, Ziffern und Bindestrich, höchstens 20 Zeichen",
                "only lower-case letters, digits and hyphens, at most 20 characters"
            )
        );
        return Ok((
            StatusCode::BAD_REQUEST,
            devices_page(&signed, &[], 0, None, Some(&problem)),
        )
            .into_response());
    };
    let keys = WgKeys::generate();
    let person = signed.session.person.audit_name();
    let resp = app
        .admin
        .homeoffice(
            &HomeOfficeRequest {
                tenant: tenant.clone(),
                user: site.clone(),
                wg_public_key: keys.public(),
                ttl_secs: None,
                mfa_at: signed.session.person.mfa_at,
            },
            &person,
        )
        .await
        .map_err(|e| PageError::service(lang, &e))?;
    let private = keys.private_base64();
    let config = komnet_enroll_admin::homeoffice::wg_quick_config(&resp.enrollment, Some(&private))
        .map_err(|e| PageError::new(StatusCode::BAD_GATEWAY, lang, e.to_string()))?;
    let png = komnet_enroll_admin::homeoffice::qr_png(&config)
        .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, lang, e.to_string()))?;
    tracing::info!(%person, %tenant, %site, serial = %resp.enrollment.identity.serial, "home-office device issued");
    let file = format!("komnet-{tenant}-{device}.conf");
    let until = resp.enrollment.identity.not_after;
    let body = html! {
        p class="warn-box" role="status" { strong { (tr(lang,
            "Diese Konfiguration enthält den privaten Schlüssel des Geräts und wird nur jetzt angezeigt: komnet speichert ihn nicht.",
            "This configuration holds the device's private key and is shown only now: komnet does not store it.")) } }
        p { (tr(lang, "Gültig bis ", "Valid until ")) (date_time(until)) "." }
        @if resp.enrollment.identity.admitted_until.is_some() {
            p class="note" { (tr(lang, "Zugang: ", "Access: "))
                (access(lang, true, crate::oidc::unix_now(), &resp.enrollment.identity)) "." }
        }
        h2 { (tr(lang, "Am Telefon: QR-Code scannen", "On a phone: scan the QR code")) }
        p { (tr(lang, "In der WireGuard-App: „+“ → „QR-Code scannen“.", "In the WireGuard app: \"+\" → \"Scan from QR code\".")) }
        img class="qr" width="320" height="320" src={ "data:image/png;base64," (STANDARD.encode(&png)) }
            alt=(tr(lang, "QR-Code mit der WireGuard-Konfiguration", "QR code with the WireGuard configuration"));
        h2 { (tr(lang, "Am Rechner: Datei importieren", "On a computer: import the file")) }
        p { a class="button" download=(file) href={ "data:text/plain;charset=utf-8;base64," (STANDARD.encode(&config)) } {
            (tr(lang, "Konfiguration herunterladen", "Download configuration")) " (" (file) ")" } }
        details {
            summary { (tr(lang, "Konfiguration als Text", "Configuration as text")) }
            pre class="config" { (config) }
        }
        p { a href="/devices" { (tr(lang, "Zurück zu meinen Geräten", "Back to my devices")) } }
    };
    let title = format!(
        "{} {device}",
        tr(lang, "Gerät eingerichtet:", "Device set up:")
    );
    Ok(page(&signed, "/devices", &title, body).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct RevokeDevice {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirm: String,
}

pub(super) async fn revoke(
    State(app): State<Shared>,
    signed: Signed,
    headers: HeaderMap,
    Path(site): Path<String>,
    Form(form): Form<RevokeDevice>,
) -> Result<Response, PageError> {
    check_form(&app, &signed, &headers, &form.csrf)?;
    let (tenant, owner) = owner(&signed)?;
    let lang = signed.lang;
    // Someone else's device looks exactly like one that does not exist.
    let site = SiteId::parse(&site)
        .ok()
        .filter(|s| s.device_of(&owner).is_some())
        .ok_or_else(|| PageError::not_found(lang))?;
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
    app.admin
        .revoke(
            &RevokeRequest {
                serial: None,
                tenant: Some(tenant),
                site: Some(site),
                // The device is gone for good: its tunnel address is released.
                reason: RevocationReason::CessationOfOperation,
            },
            &signed.session.person.audit_name(),
        )
        .await
        .map_err(|e| PageError::service(lang, &e))?;
    Ok(Redirect::to("/devices").into_response())
}
