//! `komnet policy fmt`: one layout for every policy file, so that diffs between admins show what
//! changed and not who edited. Keys of a table in one order (the order of the docs' tables:
//! `kind, site, prefixes, vlan, port` for a segment, `name, from, to, ports` for a rule, …),
//! `key = value` with single spaces, lists as `["a", "b"]` (or one entry per line, when the admin
//! wrote them that way), no indentation, one blank line before each table (a table's own
//! sub-tables, `[tenants.T.sites.S]` after `[tenants.T]`, may follow it directly) and at most one
//! anywhere. Comments stay where they are (a comment above a key moves with the key), so do the
//! order of tables and of `[[rule]]`s (which matters) and the admin's blank lines between keys.
//!
//! The result is checked to mean exactly what the input meant (the same TOML data) before it is
//! returned; formatting twice gives the same text.

use toml_edit::{Array, DocumentMut, Item, Key, RawString, Table, Value};

use crate::schema::FileKind;

/// Why a file could not be formatted.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not valid TOML: `check` says where and why.
    #[error("not valid TOML, so it cannot be formatted (komnet policy check shows why): {0}")]
    Syntax(String),
    /// The formatter would have changed what the file means: a bug, never written.
    #[error("formatting would change what the file means; it was left as it is")]
    Changed,
}

/// The file `text` in the one layout; `kind` says which keys go in which order.
///
/// ```
/// use komnet_policy::format::format_file;
/// use komnet_policy::schema::FileKind;
/// let messy = "tenant=\"a\"\n[[rule]]\nto=[\"dms\",\"mail\"]   # shared\n  from = [\"staff\"]\nname = \"r\"\n";
/// let tidy = format_file(FileKind::Tenant, messy).unwrap();
/// assert_eq!(
///     tidy,
///     "tenant = \"a\"\n\n[[rule]]\nname = \"r\"\nfrom = [\"staff\"]\nto = [\"dms\", \"mail\"]   # shared\n"
/// );
/// ```
pub fn format_file(kind: FileKind, text: &str) -> Result<String, FormatError> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| FormatError::Syntax(e.message().to_owned()))?;
    let mut first = true;
    normalise_table(kind, doc.as_table_mut(), &mut Vec::new(), &mut first, false);
    let trailing = doc.trailing().as_str().unwrap_or("").to_owned();
    doc.set_trailing(clean_lines(&trailing, Blank::Keep).trim_end_matches('\n'));
    let mut out = doc.to_string();
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out.push('\n');
    let before: toml::Table =
        toml::from_str(text).map_err(|e| FormatError::Syntax(e.message().to_owned()))?;
    let after: toml::Table = toml::from_str(&out).map_err(|_| FormatError::Changed)?;
    if before != after {
        return Err(FormatError::Changed);
    }
    Ok(out)
}

/// The keys of a table, in the order they are written; keys not listed keep their order after
/// these.
fn key_order(kind: FileKind, path: &[String]) -> &'static [&'static str] {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match (kind, p.as_slice()) {
        (FileKind::Operator, ["policy"]) => &["name", "version", "kinds"],
        (FileKind::Operator, ["tenants", _]) => &["description", "datacenter", "homeoffice"],
        (FileKind::Operator, ["tenants", _, "sites", _]) => &["description", "prefixes"],
        (FileKind::Operator, ["services", _]) => {
            &["description", "owner", "addresses", "ports", "export"]
        }
        (FileKind::Operator, ["guardrail"]) => &["name", "why", "from_kinds", "from_tenants", "to"],
        (_, ["expect"]) => &["from", "to", "verdict"],
        (FileKind::Tenant, []) => &["tenant"],
        (FileKind::Tenant, ["segments", _]) => {
            &["description", "kind", "site", "prefixes", "vlan", "port"]
        }
        (FileKind::Tenant, ["services", _]) => &["description", "addresses", "ports", "export"],
        (FileKind::Tenant, ["rule"]) => &["name", "description", "from", "to", "ports"],
        _ => &[],
    }
}

/// `nested`: the table is (inside) a table with a header of its own — its sub-tables
/// (`[tenants.T.sites.S]` under `[tenants.T]`) may follow it without a blank line.
fn normalise_table(
    kind: FileKind,
    table: &mut Table,
    path: &mut Vec<String>,
    first: &mut bool,
    nested: bool,
) {
    let order = key_order(kind, path);
    if !order.is_empty() {
        let rank = |k: &Key| {
            order
                .iter()
                .position(|o| *o == k.get())
                .unwrap_or(order.len())
        };
        table.sort_values_by(|k1, _, k2, _| rank(k1).cmp(&rank(k2)));
    }
    for (mut key, item) in table.iter_mut() {
        let name = key.get().to_owned();
        match item {
            Item::Value(value) => {
                let prefix = raw(key.leaf_decor().prefix());
                let cleaned = clean_lines(&prefix, if *first { Blank::Strip } else { Blank::Keep });
                key.leaf_decor_mut().set_prefix(cleaned);
                key.leaf_decor_mut().set_suffix(" ");
                normalise_value(value);
                *first = false;
            }
            Item::Table(sub) => {
                let explicit = !sub.is_implicit() && !sub.is_dotted();
                if explicit {
                    let prefix = raw(sub.decor().prefix());
                    let blank = match (*first, nested) {
                        (true, _) => Blank::Strip,
                        (false, true) => Blank::Keep,
                        (false, false) => Blank::One,
                    };
                    sub.decor_mut().set_prefix(clean_lines(&prefix, blank));
                    *first = false;
                }
                path.push(name);
                normalise_table(kind, sub, path, first, nested || explicit);
                path.pop();
            }
            Item::ArrayOfTables(list) => {
                path.push(name);
                for sub in list.iter_mut() {
                    let prefix = raw(sub.decor().prefix());
                    let cleaned =
                        clean_lines(&prefix, if *first { Blank::Strip } else { Blank::One });
                    sub.decor_mut().set_prefix(cleaned);
                    *first = false;
                    normalise_table(kind, sub, path, first, true);
                }
                path.pop();
            }
            Item::None => {}
        }
    }
}

fn raw(s: Option<&RawString>) -> String {
    s.and_then(RawString::as_str).unwrap_or("").to_owned()
}

fn has_comment(s: Option<&RawString>) -> bool {
    raw(s).contains('#')
}

fn normalise_value(value: &mut Value) {
    // ` = value`, and a comment after it as the admin aligned it (only trailing spaces go).
    let suffix = raw(value.decor().suffix());
    let suffix = suffix.trim_end();
    let suffix = if suffix.trim_start().starts_with('#') && !suffix.starts_with([' ', '\t']) {
        format!(" {suffix}")
    } else if suffix.trim().is_empty() {
        String::new()
    } else {
        suffix.to_owned()
    };
    value.decor_mut().set_prefix(" ");
    value.decor_mut().set_suffix(suffix);
    if let Value::Array(array) = value {
        normalise_array(array);
    }
}

/// `["a", "b"]`; one entry per line (indented by four, with a trailing comma) when the admin
/// broke the list over lines. A list with comments inside is left as it is.
fn normalise_array(array: &mut Array) {
    let commented = has_comment(Some(array.trailing()))
        || array
            .iter()
            .any(|v| has_comment(v.decor().prefix()) || has_comment(v.decor().suffix()));
    if commented || array.is_empty() {
        if array.is_empty() {
            array.set_trailing("");
            array.set_trailing_comma(false);
        }
        return;
    }
    let multiline = raw(Some(array.trailing())).contains('\n')
        || array.iter().any(|v| raw(v.decor().prefix()).contains('\n'));
    for (i, v) in array.iter_mut().enumerate() {
        let prefix = match (multiline, i) {
            (true, _) => "\n    ",
            (false, 0) => "",
            (false, _) => " ",
        };
        v.decor_mut().set_prefix(prefix);
        v.decor_mut().set_suffix("");
    }
    array.set_trailing_comma(multiline);
    array.set_trailing(if multiline { "\n" } else { "" });
}

/// What to do with blank lines at the start of a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blank {
    /// None (the first thing in the file).
    Strip,
    /// Exactly one (before a table).
    One,
    /// As many as there were, but at most one.
    Keep,
}

/// The lines before an item: no indentation, at most one blank line in a row, comments kept.
/// The last piece (the indentation before the item itself) goes.
fn clean_lines(prefix: &str, blank: Blank) -> String {
    let mut lines: Vec<&str> = prefix.split('\n').collect();
    lines.pop(); // what stands before the item on its own line: indentation only
    let mut out: Vec<&str> = Vec::new();
    for line in lines {
        let line = line.trim();
        if line.is_empty() && out.last().is_some_and(|l: &&str| l.is_empty()) {
            continue;
        }
        out.push(line);
    }
    match blank {
        Blank::Strip => {
            while out.first().is_some_and(|l| l.is_empty()) {
                out.remove(0);
            }
        }
        Blank::One => {
            if out.first().is_none_or(|l| !l.is_empty()) {
                out.insert(0, "");
            }
        }
        Blank::Keep => {}
    }
    out.iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messy_fragment_gets_the_one_layout_and_keeps_its_comments() {
        let messy = "# Gemeinde X\n\n\n   tenant   =   \"x\"\n[segments.staff]\n  prefixes=[ \"10.0.1.0/24\",\"fd00::/64\" ]\n# the VLAN of the staff\nvlan=10\nsite = \"rathaus\"\nkind = \"staff\"   # people\n\n\n\n[groups]\nall = [\n  \"staff\",\n  \"guests\"\n]\n[[rule]]\nto = [\"dms\"]\nfrom = [\"all\"]\nname = \"r1\"\n[[rule]]\nname = \"r0\"\nfrom = [\"all\"]\nto = [\n  \"mail\", # why\n]\n\n\n";
        let tidy = format_file(FileKind::Tenant, messy).unwrap();
        assert_eq!(
            tidy,
            "# Gemeinde X\n\ntenant = \"x\"\n\n[segments.staff]\nkind = \"staff\"   # people\nsite = \"rathaus\"\nprefixes = [\"10.0.1.0/24\", \"fd00::/64\"]\n# the VLAN of the staff\nvlan = 10\n\n[groups]\nall = [\n    \"staff\",\n    \"guests\",\n]\n\n[[rule]]\nname = \"r1\"\nfrom = [\"all\"]\nto = [\"dms\"]\n\n[[rule]]\nname = \"r0\"\nfrom = [\"all\"]\nto = [\n  \"mail\", # why\n]\n"
        );
        assert_eq!(format_file(FileKind::Tenant, &tidy).unwrap(), tidy);
    }

    #[test]
    fn invalid_toml_is_refused() {
        assert!(matches!(
            format_file(FileKind::Tenant, "tenant = \n"),
            Err(FormatError::Syntax(_))
        ));
    }
}
