//! `komnet policy check --format json|gitlab|sarif` and `komnet policy diff --format markdown`:
//! the findings and changes in the forms CI systems read, so that a merge request shows each
//! finding at its line (GitLab's code-quality report, SARIF for Gitea/GitHub-style code
//! scanning) and its description says which flows a change opens or closes.

use std::fmt::Write as _;
use std::path::Path;

use komnet_policy::{Diagnostic, FlowChange, Loc, Severity, SourceMap};
use serde_json::{json, Value};

/// What `check` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CheckFormat {
    /// For people: each finding with its line and a caret, then a summary.
    Text,
    /// One JSON document: {"valid", "errors", "warnings", "diagnostics": [...]}.
    Json,
    /// GitLab's code-quality report (artifacts:reports:codequality): findings on the merge
    /// request's diff.
    Gitlab,
    /// SARIF 2.1.0, for code-scanning views (Gitea, GitHub and others).
    Sarif,
}

/// What `diff` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DiffFormat {
    /// One line per change (`+ allow …`, `- deny …`, `~ …`).
    Text,
    /// Markdown tables for a merge request's description.
    Markdown,
}

/// A place as CI systems want it: path, 1-based line and column, and the end.
struct Place {
    path: String,
    line: usize,
    column: usize,
    end_line: usize,
    end_column: usize,
}

fn place(sources: &SourceMap, loc: &Loc) -> Place {
    let (line, column) = sources.line_col(loc.file, loc.span.start);
    let (end_line, end_column) = sources.line_col(loc.file, loc.span.end.max(loc.span.start));
    Place {
        path: sources.file(loc.file).path.display().to_string(),
        line,
        column,
        end_line,
        end_column,
    }
}

fn severity(d: &Diagnostic) -> &'static str {
    d.severity.label()
}

/// The findings of one `check` as JSON.
pub(crate) fn json(
    dir: &Path,
    sources: &SourceMap,
    diagnostics: &[Diagnostic],
    valid: bool,
) -> Value {
    let items: Vec<Value> = diagnostics
        .iter()
        .map(|d| {
            let mut item = json!({
                "severity": severity(d),
                "message": d.message,
            });
            if let Some(loc) = &d.loc {
                let p = place(sources, loc);
                item["file"] = json!(p.path);
                item["line"] = json!(p.line);
                item["column"] = json!(p.column);
                item["end_line"] = json!(p.end_line);
                item["end_column"] = json!(p.end_column);
            }
            if let Some((loc, note)) = &d.related {
                let p = place(sources, loc);
                item["related"] = json!({
                    "file": p.path, "line": p.line, "column": p.column, "message": note,
                });
            }
            item
        })
        .collect();
    let count = |s: Severity| diagnostics.iter().filter(|d| d.severity == s).count();
    json!({
        "policy": dir.display().to_string(),
        "valid": valid,
        "errors": count(Severity::Error),
        "warnings": count(Severity::Warning),
        "diagnostics": items,
    })
}

/// A stable fingerprint of a finding (GitLab matches findings across pipelines by it): the
/// file, the message and how many identical findings came before in that file, not the line,
/// so that an edit above a finding does not make it "new".
fn fingerprint(path: &str, message: &str, nth: usize) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{path}\0{message}\0{nth}").as_bytes(),
    );
    digest.as_ref()[..16]
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// GitLab's code-quality report: a JSON array of issues.
pub(crate) fn gitlab(dir: &Path, sources: &SourceMap, diagnostics: &[Diagnostic]) -> Value {
    let mut seen: std::collections::HashMap<(String, String), usize> = Default::default();
    let issues: Vec<Value> = diagnostics
        .iter()
        .map(|d| {
            let (path, line) = match &d.loc {
                Some(loc) => {
                    let p = place(sources, loc);
                    (p.path, p.line)
                }
                None => (dir.join("operator.toml").display().to_string(), 1),
            };
            let nth = seen.entry((path.clone(), d.message.clone())).or_default();
            *nth += 1;
            json!({
                "description": d.message,
                "check_name": format!("komnet-policy-{}", severity(d)),
                "fingerprint": fingerprint(&path, &d.message, *nth),
                "severity": match d.severity {
                    Severity::Error => "critical",
                    Severity::Warning => "minor",
                    Severity::Note => "info",
                },
                "location": { "path": path, "lines": { "begin": line } },
            })
        })
        .collect();
    Value::Array(issues)
}

/// SARIF 2.1.0 with one run of `komnet policy check`.
pub(crate) fn sarif(dir: &Path, sources: &SourceMap, diagnostics: &[Diagnostic]) -> Value {
    let results: Vec<Value> = diagnostics
        .iter()
        .map(|d| {
            let mut result = json!({
                "ruleId": format!("komnet-policy/{}", severity(d)),
                "level": severity(d),
                "message": { "text": d.message },
            });
            let location = |loc: &Loc| {
                let p = place(sources, loc);
                json!({
                    "physicalLocation": {
                        "artifactLocation": { "uri": p.path },
                        "region": {
                            "startLine": p.line,
                            "startColumn": p.column,
                            "endLine": p.end_line,
                            "endColumn": p.end_column.max(p.column + usize::from(p.end_line == p.line)),
                        },
                    },
                })
            };
            result["locations"] = match &d.loc {
                Some(loc) => json!([location(loc)]),
                None => json!([{
                    "physicalLocation": {
                        "artifactLocation": { "uri": dir.join("operator.toml").display().to_string() },
                    },
                }]),
            };
            if let Some((loc, note)) = &d.related {
                let mut related = location(loc);
                related["id"] = json!(1);
                related["message"] = json!({ "text": note });
                result["relatedLocations"] = json!([related]);
            }
            result
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {
                "driver": {
                    "name": "komnet policy check",
                    "version": env!("CARGO_PKG_VERSION"),
                    "rules": [
                        { "id": "komnet-policy/error", "shortDescription": { "text": "The policy is not usable until this is fixed." } },
                        { "id": "komnet-policy/warning", "shortDescription": { "text": "The policy is usable; a rule may be inactive (--deny-warnings makes this an error)." } },
                        { "id": "komnet-policy/note", "shortDescription": { "text": "Explains another finding." } },
                    ],
                },
            },
            "results": results,
        }],
    })
}

/// `diff --format markdown`: what a change opens and closes, for a merge request.
pub(crate) fn diff_markdown(
    name: &str,
    versions: (u64, u64),
    changes: &[FlowChange],
    moved: &[String],
    version_warning: Option<&str>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Policy \"{}\": version {} → {}\n",
        escape(name),
        versions.0,
        versions.1
    );
    if let Some(w) = version_warning {
        let _ = writeln!(out, "> **Warning:** {}\n", escape(w));
    }
    let allowed: Vec<&FlowChange> = changes.iter().filter(|c| c.now_allowed).collect();
    let denied: Vec<&FlowChange> = changes.iter().filter(|c| !c.now_allowed).collect();
    if changes.is_empty() && moved.is_empty() {
        out.push_str("No flow is newly allowed or denied, and no address changed.\n");
        return out;
    }
    for (title, list) in [("Newly allowed", &allowed), ("Newly denied", &denied)] {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(out, "**{title}** ({})\n", list.len());
        out.push_str("| from (segment) | to (service) | ports |\n|---|---|---|\n");
        for c in list.iter() {
            let ports: Vec<String> = c.ports.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "| `{}` | `{}` | {} |",
                c.segment,
                c.service,
                ports.join(", ")
            );
        }
        out.push('\n');
    }
    if !moved.is_empty() {
        let _ = writeln!(out, "**Addresses changed** ({})\n", moved.len());
        for m in moved {
            let _ = writeln!(out, "- {}", escape(m));
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{} newly allowed, {} newly denied, {} address change{}.",
        allowed.len(),
        denied.len(),
        moved.len(),
        if moved.len() == 1 { "" } else { "s" }
    );
    out
}

/// Markdown's special characters in free text (names are plain: letters, digits, `-_.`).
fn escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if matches!(c, '|' | '*' | '_' | '`' | '<' | '>' | '[' | ']') {
            out.push('\\');
        }
        out.push(c);
        out
    })
}
