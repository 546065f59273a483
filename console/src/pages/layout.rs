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

/// The zone pages show times in: set once at start from `time_zone` in console.toml; UTC
/// until then (unit tests).
static ZONE: std::sync::OnceLock<jiff::tz::TimeZone> = std::sync::OnceLock::new();
static UTC: jiff::tz::TimeZone = jiff::tz::TimeZone::UTC;

pub fn set_time_zone(zone: jiff::tz::TimeZone) {
    let _ = ZONE.set(zone);
}

pub fn time_zone() -> &'static jiff::tz::TimeZone {
    ZONE.get().unwrap_or(&UTC)
}

/// Unix seconds in the console's zone, as `2026-05-01 14:03 CEST`.
pub fn date_time(unix: i64) -> String {
    date_time_in(time_zone(), unix)
}

fn date_time_in(zone: &jiff::tz::TimeZone, unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| {
            t.to_zoned_datetime(zone.clone())
                .strftime("%Y-%m-%d %H:%M %Z")
                .to_string()
        })
        .unwrap_or_else(|_| unix.to_string())
}

/// The first second (Unix) of the day `YYYY-MM-DD` in the console's zone.
pub fn day_start(text: &str) -> Option<i64> {
    day_start_in(time_zone(), text)
}

fn day_start_in(zone: &jiff::tz::TimeZone, text: &str) -> Option<i64> {
    let date: jiff::civil::Date = text.parse().ok()?;
    let start = date
        .to_zoned_datetime(zone.clone())
        .ok()?
        .start_of_day()
        .ok()?;
    Some(start.timestamp().as_second())
}

/// How far away `at` is, for people: "in 3 Tagen", "vor 2 Stunden".
pub fn relative(lang: Lang, now: i64, at: i64) -> String {
    let d = at - now;
    // (count, German singular, German dative plural, English singular)
    let (n, one_de, many_de, unit_en) = match d.abs() {
        s if s < 60 => (s, "Sekunde", "Sekunden", "second"),
        s if s < 3600 => (s / 60, "Minute", "Minuten", "minute"),
        s if s < 2 * 86_400 => (s / 3600, "Stunde", "Stunden", "hour"),
        s => (s / 86_400, "Tag", "Tagen", "day"),
    };
    let de = if n == 1 { one_de } else { many_de };
    let en = if n == 1 { "" } else { "s" };
    match (lang, d >= 0) {
        (Lang::De, true) => format!("in {n} {de}"),
        (Lang::De, false) => format!("vor {n} {de}"),
        (Lang::En, true) => format!("in {n} {unit_en}{en}"),
        (Lang::En, false) => format!("{n} {unit_en}{en} ago"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_the_districts_zone_with_daylight_saving() {
        let berlin = jiff::tz::TimeZone::get("Europe/Berlin").expect("tzdata");
        // 2026-12-05 06:12 UTC is winter time (UTC+1), 2026-07-01 10:00 UTC summer (UTC+2).
        assert_eq!(date_time_in(&berlin, 1_796_451_120), "2026-12-05 07:12 CET");
        assert_eq!(
            date_time_in(&berlin, 1_782_900_000),
            "2026-07-01 12:00 CEST"
        );
        assert_eq!(
            date_time_in(&jiff::tz::TimeZone::UTC, 1_796_451_120),
            "2026-12-05 06:12 UTC"
        );
        // A day filter starts at local midnight: 23:00 UTC the evening before in winter.
        assert_eq!(day_start_in(&berlin, "2026-12-05"), Some(1_796_425_200));
        assert_eq!(day_start_in(&berlin, "05.12.2026"), None);
    }

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(relative(Lang::De, 1000, 940), "vor 1 Minute");
        assert_eq!(relative(Lang::De, 1000, 1000 + 3 * 86_400), "in 3 Tagen");
        assert_eq!(relative(Lang::De, 1000, 990), "vor 10 Sekunden");
        assert_eq!(relative(Lang::En, 1000, 940), "1 minute ago");
        assert_eq!(relative(Lang::En, 1000, 1000 + 7200), "in 2 hours");
    }
}
