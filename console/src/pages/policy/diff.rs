//! What changed from the policy version published before: per file of the two bundles, a line
//! diff (longest common subsequence, the files are small) with three unchanged lines around each
//! change. Each row says in text what happened to its line — a visible `+`/`-` and, for screen
//! readers, a word — and marks it up as `<ins>`/`<del>`; the colours only repeat that
//! (WCAG 1.4.1: not colour alone).

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use komnet_policy::bundle::{BundleError, VerifiedBundle};
use komnet_proto::api::admin::PreviousBundle;
use maud::{html, Markup};

use crate::config::Lang;
use crate::pages::layout::{date_time, tr};

/// Unchanged lines shown before and after a change.
const CONTEXT: usize = 3;

/// The largest table (lines of the old × lines of the new part between the common beginning
/// and end) the diff is computed with: 4 million cells are 16 MB for a moment. Policy files
/// have hundreds of lines; a file beyond this is shown as all its differing part removed and
/// added, still correct, only not the shortest diff.
const MAX_CELLS: usize = 4_000_000;

/// What happened to a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Same,
    Removed,
    Added,
}

/// One line of a diff, with its numbers (from 1) in the old and the new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Line<'a> {
    pub(super) op: Op,
    pub(super) old: Option<usize>,
    pub(super) new: Option<usize>,
    pub(super) text: &'a str,
}

/// The line diff from `old` to `new`: every line of both, in order, unchanged ones once.
pub(super) fn line_diff<'a>(old: &'a str, new: &'a str) -> Vec<Line<'a>> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // A policy edit changes a few lines: the common beginning and end need no table.
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let same = |i: usize, j: usize| Line {
        op: Op::Same,
        old: Some(i + 1),
        new: Some(j + 1),
        text: a[i],
    };
    let mut out: Vec<Line<'a>> = (0..prefix).map(|i| same(i, i)).collect();
    let (a_mid, b_mid) = (prefix..a.len() - suffix, prefix..b.len() - suffix);
    out.extend(middle(&a, &b, a_mid, b_mid));
    out.extend((0..suffix).map(|k| same(a.len() - suffix + k, b.len() - suffix + k)));
    out
}

/// The diff of `a[ra]` and `b[rb]`, by the table of their longest common subsequences.
fn middle<'a>(
    a: &[&'a str],
    b: &[&'a str],
    ra: std::ops::Range<usize>,
    rb: std::ops::Range<usize>,
) -> Vec<Line<'a>> {
    let removed = |i: usize| Line {
        op: Op::Removed,
        old: Some(i + 1),
        new: None,
        text: a[i],
    };
    let added = |j: usize| Line {
        op: Op::Added,
        old: None,
        new: Some(j + 1),
        text: b[j],
    };
    let (n, m) = (ra.len(), rb.len());
    if (n + 1).saturating_mul(m + 1) > MAX_CELLS {
        return ra.map(removed).chain(rb.map(added)).collect();
    }
    let (x, y) = (&a[ra.clone()], &b[rb.clone()]);
    // lcs[i * w + j]: the length of the longest common subsequence of x[i..] and y[j..].
    let w = m + 1;
    let mut lcs = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i * w + j] = if x[i] == y[j] {
                lcs[(i + 1) * w + j + 1] + 1
            } else {
                lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
            };
        }
    }
    let mut out = Vec::with_capacity(n + m);
    let (mut i, mut j) = (0, 0);
    while i < n && j < m {
        if x[i] == y[j] {
            out.push(Line {
                op: Op::Same,
                old: Some(ra.start + i + 1),
                new: Some(rb.start + j + 1),
                text: x[i],
            });
            i += 1;
            j += 1;
        } else if lcs[(i + 1) * w + j] >= lcs[i * w + j + 1] {
            // Removals before additions, as diff(1) shows a replaced line.
            out.push(removed(ra.start + i));
            i += 1;
        } else {
            out.push(added(rb.start + j));
            j += 1;
        }
    }
    out.extend((ra.start + i..ra.end).map(removed));
    out.extend((rb.start + j..rb.end).map(added));
    out
}

/// A row of the shown diff: a line, or unchanged lines left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Row<'a> {
    Line(Line<'a>),
    Skipped(usize),
}

/// The changed lines with [`CONTEXT`] unchanged ones around each; the other unchanged lines
/// become one [`Row::Skipped`] per run (a run of one line is shown: saying so takes a row too).
pub(super) fn with_context<'a>(lines: &[Line<'a>]) -> Vec<Row<'a>> {
    let mut keep = vec![false; lines.len()];
    for (k, l) in lines.iter().enumerate() {
        if l.op != Op::Same {
            let end = (k + CONTEXT + 1).min(lines.len());
            keep[k.saturating_sub(CONTEXT)..end].fill(true);
        }
    }
    let mut rows = Vec::new();
    let mut k = 0;
    while k < lines.len() {
        let run = keep[k..].iter().take_while(|kept| !**kept).count();
        if run > 1 {
            rows.push(Row::Skipped(run));
            k += run;
        } else {
            rows.push(Row::Line(lines[k]));
            k += 1;
        }
    }
    rows
}

/// How the files of two bundles differ.
#[derive(Debug)]
pub(super) struct Changes<'a> {
    pub(super) added: Vec<(&'a str, usize)>,
    pub(super) removed: Vec<(&'a str, usize)>,
    pub(super) changed: Vec<(&'a str, Vec<Line<'a>>)>,
    pub(super) unchanged: Vec<&'a str>,
}

pub(super) fn compare<'a>(
    old: &'a BTreeMap<String, String>,
    new: &'a BTreeMap<String, String>,
) -> Changes<'a> {
    let mut changes = Changes {
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
        unchanged: Vec::new(),
    };
    for (name, text) in new {
        match old.get(name) {
            None => changes.added.push((name, text.lines().count())),
            Some(before) if before == text => changes.unchanged.push(name),
            Some(before) => changes.changed.push((name, line_diff(before, text))),
        }
    }
    for (name, text) in old {
        if !new.contains_key(name) {
            changes.removed.push((name, text.lines().count()));
        }
    }
    changes
}

/// The bundle published before the one in force, as the page can show it.
#[derive(Debug)]
pub(super) enum Previous {
    /// The service kept none: the first version (or the first since the service keeps them).
    None,
    /// Kept, but not shown: it does not verify with the key the service gives now.
    Unreadable { version: u64, why: String },
    Bundle {
        version: u64,
        published_at: i64,
        bundle: VerifiedBundle,
    },
}

/// Decodes and verifies the previous bundle with the same key as the one in force: the page
/// shows only signed text.
pub(super) fn previous(lang: Lang, previous: Option<&PreviousBundle>, key: &[u8]) -> Previous {
    let Some(p) = previous else {
        return Previous::None;
    };
    let unreadable = |why: String| Previous::Unreadable {
        version: p.version,
        why,
    };
    let bytes = match STANDARD.decode(&p.bundle) {
        Ok(bytes) => bytes,
        Err(e) => return unreadable(format!("base64: {e}")),
    };
    match komnet_policy::bundle::verify(&bytes, key) {
        Ok(bundle) => Previous::Bundle {
            version: p.version,
            published_at: p.published_at,
            bundle,
        },
        // After a key rotation the earlier versions are signed with a key the service no
        // longer names; their text is not shown unverified.
        Err(BundleError::BadSignature { .. }) => unreadable(format!(
            "{} {} {}",
            tr(lang, "signiert mit dem Schlüssel", "signed with the key"),
            p.key_id,
            tr(
                lang,
                "vor dem Schlüsselwechsel; der Dienst nennt nur noch den aktuellen Schlüssel",
                "from before the key rotation; the service names only the current key now"
            )
        )),
        Err(e) => unreadable(e.to_string()),
    }
}

/// What the change means for traffic: the policy language's own diff (`komnet policy diff`),
/// flows newly allowed and newly denied, and segments or services whose addresses moved.
fn effect(lang: Lang, old: &VerifiedBundle, current: &komnet_policy::Policy) -> Markup {
    let old = match old.compile() {
        Ok(compiled) => compiled,
        Err(e) => {
            return html! { p class="note" { (tr(lang, "Wirkung nicht bestimmbar: ", "Effect not known: ")) (e) } }
        }
    };
    let (flows, moved) = komnet_policy::diff(&old.policy, current);
    html! {
        h3 { (tr(lang, "Wirkung auf den Verkehr", "Effect on traffic")) }
        @if flows.is_empty() && moved.is_empty() {
            p { (tr(lang, "Keine: dieselben Verbindungen sind erlaubt wie vorher.",
                    "None: the same connections are allowed as before.")) }
        } @else {
            ul class="effect" {
                @for f in &flows {
                    li {
                        strong { (if f.now_allowed { tr(lang, "neu erlaubt", "newly allowed") } else { tr(lang, "neu verboten", "newly denied") }) }
                        ": " code { (f.segment) " → " (f.service) } " "
                        (f.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
                    }
                }
                @for m in &moved {
                    li { strong { (tr(lang, "Adressen geändert", "addresses changed")) } ": " code { (m) } }
                }
            }
        }
    }
}

/// The page's section "Changes from version N".
pub(super) fn section(
    lang: Lang,
    previous: &Previous,
    current: &VerifiedBundle,
    current_policy: &komnet_policy::Policy,
) -> Markup {
    html! {
        @match previous {
            Previous::None => {
                h2 id="changes" { (tr(lang, "Änderungen", "Changes")) }
                p class="note" { (tr(lang,
                    "Keine frühere Version gespeichert, mit der sich diese vergleichen ließe: es ist die erste, die der Dienst aufbewahrt hat.",
                    "No earlier version is kept to compare this one with: it is the first the service has kept.")) }
            }
            Previous::Unreadable { version, why } => {
                h2 id="changes" { (tr(lang, "Änderungen gegenüber Version", "Changes from version")) " " (version) }
                p class="note" {
                    (tr(lang, "Version", "Version")) " " (version) " "
                    (tr(lang, "lässt sich hier nicht prüfen", "cannot be verified here")) " (" (why) ")."
                }
            }
            Previous::Bundle { version, published_at, bundle } => {
                h2 id="changes" { (tr(lang, "Änderungen gegenüber Version", "Changes from version")) " " (version) }
                p class="note" {
                    (tr(lang, "Version", "Version")) " " (version) " "
                    (tr(lang, "wurde veröffentlicht am", "was published on")) " " (date_time(*published_at)) "."
                }
                (effect(lang, bundle, current_policy))
                (files(lang, &compare(bundle.files(), current.files())))
            }
        }
    }
}

fn files(lang: Lang, changes: &Changes<'_>) -> Markup {
    let nothing =
        changes.added.is_empty() && changes.removed.is_empty() && changes.changed.is_empty();
    html! {
        @if nothing {
            p { (tr(lang, "Die Dateien der Richtlinie sind unverändert.", "The policy's files are unchanged.")) }
        }
        @if !changes.added.is_empty() {
            h3 { (tr(lang, "Neue Dateien", "Added files")) }
            ul class="diff-files" {
                @for (name, lines) in &changes.added {
                    li { code { (name) } " (" (lines) " " (tr(lang, "Zeilen", "lines")) ")" }
                }
            }
        }
        @if !changes.removed.is_empty() {
            h3 { (tr(lang, "Entfernte Dateien", "Removed files")) }
            ul class="diff-files" {
                @for (name, lines) in &changes.removed {
                    li { code { (name) } " (" (lines) " " (tr(lang, "Zeilen", "lines")) ")" }
                }
            }
        }
        @for (i, (name, lines)) in changes.changed.iter().enumerate() {
            (file(lang, i, name, lines))
        }
        @if !changes.unchanged.is_empty() {
            p class="note" {
                (tr(lang, "Unverändert:", "Unchanged:")) " "
                @for (i, name) in changes.unchanged.iter().enumerate() {
                    @if i > 0 { ", " }
                    code { (name) }
                }
            }
        }
    }
}

/// One changed file: its name as a heading, what changed in numbers, and the table.
fn file(lang: Lang, index: usize, name: &str, lines: &[Line<'_>]) -> Markup {
    let count = |op: Op| lines.iter().filter(|l| l.op == op).count();
    let id = format!("diff-{index}");
    html! {
        h3 id=(id) { code { (name) } }
        p class="note" {
            (tr(lang, "Zeilen hinzugefügt", "Lines added")) ": " (count(Op::Added)) ", "
            (tr(lang, "entfernt", "removed")) ": " (count(Op::Removed))
        }
        table class="diff" aria-labelledby=(id) {
            thead {
                tr {
                    th scope="col" class="num" { (tr(lang, "Zeile vorher", "Old line")) }
                    th scope="col" class="num" { (tr(lang, "Zeile jetzt", "New line")) }
                    th scope="col" class="mark" { (tr(lang, "Änderung", "Change")) }
                    th scope="col" { (tr(lang, "Inhalt", "Text")) }
                }
            }
            tbody {
                @for row in with_context(lines) {
                    @match row {
                        Row::Skipped(n) => {
                            tr class="gap" {
                                td colspan="4" {
                                    "⋯ " (n) " " (tr(lang, "unveränderte Zeilen", "unchanged lines"))
                                }
                            }
                        }
                        Row::Line(l) => {
                            tr class=(match l.op { Op::Same => "same", Op::Removed => "del", Op::Added => "add" }) {
                                td class="num" { @if let Some(n) = l.old { (n) } }
                                td class="num" { @if let Some(n) = l.new { (n) } }
                                @match l.op {
                                    Op::Same => {
                                        td class="mark" {
                                            span class="visually-hidden" { (tr(lang, "unverändert", "unchanged")) }
                                        }
                                        td class="text" { (l.text) }
                                    }
                                    Op::Removed => {
                                        td class="mark" {
                                            span aria-hidden="true" { "-" }
                                            span class="visually-hidden" { (tr(lang, "entfernt", "removed")) }
                                        }
                                        td class="text" { del { (l.text) } }
                                    }
                                    Op::Added => {
                                        td class="mark" {
                                            span aria-hidden="true" { "+" }
                                            span class="visually-hidden" { (tr(lang, "hinzugefügt", "added")) }
                                        }
                                        td class="text" { ins { (l.text) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The section as the page renders it, the current bundle compiled as the page does.
    fn show(lang: Lang, previous: &Previous, current: &VerifiedBundle) -> String {
        let compiled = current.compile().unwrap();
        section(lang, previous, current, &compiled.policy).into_string()
    }

    #[test]
    fn a_changed_line_is_removed_and_added_and_the_rest_is_kept() {
        let lines = line_diff("a\nb\nc\nd\n", "a\nB\nc\nd\ne\n");
        let shown: Vec<(Op, Option<usize>, Option<usize>, &str)> =
            lines.iter().map(|l| (l.op, l.old, l.new, l.text)).collect();
        assert_eq!(
            shown,
            [
                (Op::Same, Some(1), Some(1), "a"),
                (Op::Removed, Some(2), None, "b"),
                (Op::Added, None, Some(2), "B"),
                (Op::Same, Some(3), Some(3), "c"),
                (Op::Same, Some(4), Some(4), "d"),
                (Op::Added, None, Some(5), "e"),
            ]
        );
        // Lines moved apart by an insertion stay unchanged: the longest common subsequence.
        let lines = line_diff("x\ny\nz", "x\nq\nr\ny\nz");
        let ops: Vec<Op> = lines.iter().map(|l| l.op).collect();
        assert_eq!(ops, [Op::Same, Op::Added, Op::Added, Op::Same, Op::Same]);
        assert!(line_diff("same\n", "same\n")
            .iter()
            .all(|l| l.op == Op::Same));
        assert_eq!(line_diff("", "").len(), 0);
    }

    #[test]
    fn unchanged_lines_far_from_a_change_are_left_out() {
        let old: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let new = old.replace("\n10\n", "\nzehn\n");
        let rows = with_context(&line_diff(&old, &new));
        // 1..=6 skipped, 7 8 9, -10 +zehn, 11 12 13, 14..=20 skipped.
        assert_eq!(rows.len(), 10, "{rows:?}");
        assert_eq!(rows[0], Row::Skipped(6));
        assert!(matches!(rows[1], Row::Line(Line { text: "7", .. })));
        assert!(matches!(
            rows[4],
            Row::Line(Line {
                op: Op::Removed,
                text: "10",
                ..
            })
        ));
        assert!(matches!(
            rows[5],
            Row::Line(Line {
                op: Op::Added,
                text: "zehn",
                old: None,
                new: Some(10)
            })
        ));
        assert_eq!(rows[9], Row::Skipped(7));
        // One unchanged line left over is shown rather than summarised.
        let rows = with_context(&line_diff("1\n2\n3\n4\n5", "1\n2\n3\n4\nfünf"));
        assert!(rows.iter().all(|r| matches!(r, Row::Line(_))), "{rows:?}");
    }

    #[test]
    fn a_long_file_beyond_the_table_is_all_removed_and_added() {
        let old: String = (0..3000).map(|i| format!("a{i}\n")).collect();
        let new: String = (0..3000).map(|i| format!("b{i}\n")).collect();
        let lines = line_diff(&old, &new);
        assert_eq!(lines.len(), 6000);
        assert!(lines[..3000].iter().all(|l| l.op == Op::Removed));
        assert!(lines[3000..].iter().all(|l| l.op == Op::Added));
    }

    /// examples/policy/st-wendel with `edit` applied, signed with `key`, verified again.
    fn bundle(
        dir: &Path,
        key: &(Vec<u8>, Vec<u8>),
        edit: impl Fn(&Path),
    ) -> (Vec<u8>, VerifiedBundle) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/st-wendel");
        std::fs::create_dir_all(dir.join("tenants")).unwrap();
        std::fs::copy(src.join("operator.toml"), dir.join("operator.toml")).unwrap();
        for entry in std::fs::read_dir(src.join("tenants")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join("tenants").join(entry.file_name())).unwrap();
        }
        edit(dir);
        let bytes = komnet_policy::bundle::create(dir, &key.0).unwrap();
        let verified = komnet_policy::bundle::verify(&bytes, &key.1).unwrap();
        (bytes, verified)
    }

    fn previous_of(bytes: &[u8], version: u64) -> PreviousBundle {
        PreviousBundle {
            version,
            bundle: STANDARD.encode(bytes),
            key_id: "k".into(),
            published_at: 1_767_225_600,
        }
    }

    #[test]
    fn the_page_shows_what_changed_between_two_real_bundles() {
        let tmp = tempfile::tempdir().unwrap();
        let key = komnet_policy::bundle::generate_key().unwrap();
        let (v1, v1_verified) = bundle(&tmp.path().join("v1"), &key, |_| {});
        // Version 2: a new site in Tholey, Namborn's settings file gone.
        let (v2_bytes, v2) = bundle(&tmp.path().join("v2"), &key, |dir| {
            let path = dir.join("operator.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            let marker = "[tenants.tholey.sites.rathaus]";
            assert!(text.contains(marker), "examples/policy/st-wendel changed");
            let text = text.replace("\nversion = 1\n", "\nversion = 2\n").replace(
                marker,
                "[tenants.tholey.sites.bauhof]\nprefixes = [\"10.41.0.0/16\"]\n\
                 [tenants.tholey.sites.rathaus]",
            );
            std::fs::write(&path, text).unwrap();
            std::fs::remove_file(dir.join("tenants/namborn.toml")).unwrap();
        });
        assert_eq!(v2.version, 2);

        let shown = previous(Lang::De, Some(&previous_of(&v1, 1)), &key.1);
        assert!(
            matches!(shown, Previous::Bundle { version: 1, .. }),
            "{shown:?}"
        );
        let html = show(Lang::De, &shown, &v2);
        assert!(html.contains("Änderungen gegenüber Version 1"), "{html}");
        // What it means for traffic, from the policy language's own diff: Namborn's file is
        // gone, so its flows are no longer allowed.
        assert!(html.contains("Wirkung auf den Verkehr"), "{html}");
        assert!(html.contains("neu verboten"), "{html}");
        // The changed file, with its changes marked up and said in text.
        assert!(
            html.contains("<h3 id=\"diff-0\"><code>operator.toml</code></h3>"),
            "{html}"
        );
        assert!(html.contains("<del>version = 1</del>"), "{html}");
        assert!(html.contains("<ins>version = 2</ins>"), "{html}");
        assert!(
            html.contains("<ins>[tenants.tholey.sites.bauhof]</ins>"),
            "{html}"
        );
        assert!(
            html.contains("<ins>prefixes = [&quot;10.41.0.0/16&quot;]</ins>"),
            "{html}"
        );
        assert!(html.contains("<span aria-hidden=\"true\">+</span><span class=\"visually-hidden\">hinzugefügt</span>"), "{html}");
        assert!(html.contains("<span aria-hidden=\"true\">-</span><span class=\"visually-hidden\">entfernt</span>"), "{html}");
        // Context around the change, the rest summarised.
        assert!(
            html.contains("<td class=\"text\">datacenter = [&quot;10.1.20.0/24&quot;]</td>"),
            "{html}"
        );
        assert!(html.contains("unveränderte Zeilen"), "{html}");
        assert!(
            !html.contains("Dokumentenmanagement des Kreises"),
            "far from any change: {html}"
        );
        assert!(
            html.contains("Zeilen hinzugefügt: 3, entfernt: 1"),
            "{html}"
        );
        // The removed file is listed, the unchanged ones named.
        assert!(html.contains("Entfernte Dateien"), "{html}");
        assert!(html.contains("<code>tenants/namborn.toml</code>"), "{html}");
        assert!(
            html.contains("Unverändert: <code>tenants/marpingen.toml</code>"),
            "{html}"
        );
        assert!(!html.contains("Neue Dateien"), "{html}");

        // In English, and the other way round: the file comes back as an added one.
        let back = previous(Lang::En, Some(&previous_of(&v2_bytes, 2)), &key.1);
        let html = show(Lang::En, &back, &v1_verified);
        assert!(html.contains("Changes from version 2"), "{html}");
        assert!(html.contains("Added files"), "{html}");
        assert!(html.contains("newly allowed"), "{html}");
        assert!(
            html.contains("<code>tenants/namborn.toml</code> ("),
            "{html}"
        );
        assert!(html.contains("Lines added: 1, removed: 3"), "{html}");
        assert!(!html.contains("Removed files"), "{html}");
    }

    #[test]
    fn without_a_previous_version_or_with_one_of_another_key_the_page_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let key = komnet_policy::bundle::generate_key().unwrap();
        let (v1, current) = bundle(&tmp.path().join("v1"), &key, |_| {});
        let html = show(Lang::De, &previous(Lang::De, None, &key.1), &current);
        assert!(html.contains("Keine frühere Version"), "{html}");
        assert!(!html.contains("<table"), "{html}");
        let html = show(Lang::En, &previous(Lang::En, None, &key.1), &current);
        assert!(html.contains("No earlier version"), "{html}");

        // Signed with the key before a rotation: named, not shown unverified.
        let old_key = komnet_policy::bundle::generate_key().unwrap();
        let (old, _) = bundle(&tmp.path().join("old"), &old_key, |_| {});
        let mut p = previous_of(&old, 1);
        p.key_id = komnet_policy::bundle::key_id(&old_key.1);
        let shown = previous(Lang::En, Some(&p), &key.1);
        assert!(
            matches!(shown, Previous::Unreadable { version: 1, .. }),
            "{shown:?}"
        );
        let html = show(Lang::En, &shown, &current);
        assert!(html.contains("Changes from version 1"), "{html}");
        assert!(
            html.contains(&p.key_id) && html.contains("key rotation"),
            "{html}"
        );
        assert!(!html.contains("<table"), "{html}");
        // Same bundle: nothing changed.
        let same = previous(Lang::En, Some(&previous_of(&v1, 1)), &key.1);
        let html = show(Lang::En, &same, &current);
        assert!(html.contains("files are unchanged"), "{html}");
        assert!(html.contains("None: the same connections"), "{html}");
    }
}
