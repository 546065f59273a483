//! The page frame (skip link, header, navigation, language switch, sign-out) and small helpers:
//! translations, dates.

use maud::{html, Markup, DOCTYPE};

use crate::config::Lang;
use crate::oidc::Role;
use crate::web::Signed;

/// The text in the page's language; both are written side by side where they are used.
pub fn tr(lang: Lang, de: &'static str, en: &'static str) -> &'static str {
    match lang {
        Lang::De => de,
        Lang::En => en,
    }
}

fn lang_code(lang: Lang) -> &'static str {
    match lang {
        Lang::De => "de",
        Lang::En => "en",
    }
}

/// Unix seconds as `2026-05-01 14:03 UTC`.
pub fn date_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// How far away `at` is, for people: "in 3 Tagen", "vor 2 Stunden".
pub fn relative(lang: Lang, now: i64, at: i64) -> String {
    let d = at - now;
    let (n, unit_de, unit_en) = match d.abs() {
        s if s < 3600 => (s / 60, "Minuten", "minutes"),
        s if s < 2 * 86_400 => (s / 3600, "Stunden", "hours"),
        s => (s / 86_400, "Tagen", "days"),
    };
    match (lang, d >= 0) {
        (Lang::De, true) => format!("in {n} {unit_de}"),
        (Lang::De, false) => format!("vor {n} {unit_de}"),
        (Lang::En, true) => format!("in {n} {unit_en}"),
        (Lang::En, false) => format!("{n} {unit_en} ago"),
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " – komnet" }
            link rel="stylesheet" href="/static/console.css";
        }
    }
}

/// The language switch: a link to the other language, back to this page.
fn lang_switch(lang: Lang, here: &str) -> Markup {
    let (code, label, name) = match lang {
        Lang::De => ("en", "English", "en"),
        Lang::En => ("de", "Deutsch", "de"),
    };
    html! {
        a class="lang" href={ "/lang/" (code) "?back=" (here) } hreflang=(name) lang=(name) { (label) }
    }
}

/// A page for a signed-in person.
pub fn page(signed: &Signed, here: &str, title: &str, body: Markup) -> Markup {
    let lang = signed.lang;
    let person = &signed.session.person;
    let role = match &person.role {
        Role::Operator => tr(lang, "Betrieb", "Operator").to_owned(),
        Role::CommuneAdmin(t) => format!("{} {t}", tr(lang, "Verwaltung", "Admin of")),
        Role::User(t) => format!("{} {t}", tr(lang, "Homeoffice", "Home office,")),
    };
    let nav: Vec<(&str, &str)> = match person.role {
        Role::User(_) => vec![("/devices", tr(lang, "Meine Geräte", "My devices"))],
        _ => vec![
            ("/fleet", tr(lang, "Standorte", "Sites")),
            ("/tokens", tr(lang, "Token erstellen", "Create token")),
            ("/policy", tr(lang, "Richtlinie", "Policy")),
            ("/audit", tr(lang, "Protokoll", "Audit log")),
        ],
    };
    html! {
        (DOCTYPE)
        html lang=(lang_code(lang)) {
            (head(title))
            body {
                a class="skip" href="#main" { (tr(lang, "Zum Inhalt springen", "Skip to content")) }
                header {
                    p class="brand" { "komnet" }
                    nav aria-label=(tr(lang, "Hauptnavigation", "Main navigation")) {
                        ul {
                            @for (href, label) in &nav {
                                li {
                                    @if here.starts_with(href) {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    div class="who" {
                        span { (person.name) " · " (role) }
                        (lang_switch(lang, here))
                        form method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(signed.session.csrf);
                            button type="submit" { (tr(lang, "Abmelden", "Sign out")) }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page without a session (login, errors).
pub fn bare(lang: Lang, title: &str, message: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang=(lang_code(lang)) {
            (head(title))
            body {
                header { p class="brand" { "komnet" } div class="who" { (lang_switch(lang, "/")) } }
                main id="main" {
                    h1 { (title) }
                    p role="alert" { (message) }
                    p { a href="/" { (tr(lang, "Zur Startseite", "To the start page")) } }
                }
            }
        }
    }
}
