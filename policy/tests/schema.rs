//! The policy files' JSON Schema (issue 19, part 3): the copies in docs/schema are what the
//! parser's types generate, and a real validator (Python's jsonschema, Debian's
//! python3-jsonschema) accepts every file of both examples and refuses a misspelt key.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::path::{Path, PathBuf};
use std::process::Command;

use komnet_policy::schema::{schema_text, FileKind};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_shipped_schemas_are_the_generated_ones() {
    for kind in [FileKind::Operator, FileKind::Tenant] {
        let path = root().join("docs/schema").join(kind.schema_file_name());
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert!(
            on_disk == schema_text(kind),
            "{} is outdated: run `komnet policy schema --out-dir docs/schema`",
            path.display()
        );
    }
}

/// Validates TOML files against a schema with Python's jsonschema (draft 7), after checking the
/// schema itself against the draft-7 meta-schema. Prints one line per file: `ok PATH` or
/// `invalid PATH: MESSAGE; …`.
const VALIDATE: &str = r#"
import json, sys, tomllib
import jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft7Validator.check_schema(schema)
validator = jsonschema.Draft7Validator(schema)
for path in sys.argv[2:]:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        print("invalid", path + ":", "; ".join(e.message for e in errors))
    else:
        print("ok", path)
"#;

fn validate(kind: FileKind, files: &[PathBuf]) -> Vec<String> {
    let schema = root().join("docs/schema").join(kind.schema_file_name());
    let out = Command::new("python3")
        .arg("-c")
        .arg(VALIDATE)
        .arg(&schema)
        .args(files)
        .output()
        .expect("python3 is needed for this test (scripts/setup.sh test)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the validator failed (is python3-jsonschema installed? scripts/setup.sh test installs it): {stderr}"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn example_files(name: &str) -> (PathBuf, Vec<PathBuf>) {
    let dir = root().join("examples/policy").join(name);
    let mut tenants: Vec<PathBuf> = std::fs::read_dir(dir.join("tenants"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    tenants.sort();
    (dir.join("operator.toml"), tenants)
}

#[test]
fn a_real_validator_accepts_both_examples() {
    for example in ["landkreis", "st-wendel"] {
        let (operator, tenants) = example_files(example);
        for line in validate(FileKind::Operator, &[operator])
            .into_iter()
            .chain(validate(FileKind::Tenant, &tenants))
        {
            assert!(line.starts_with("ok "), "{example}: {line}");
        }
    }
}

#[test]
fn a_real_validator_refuses_a_misspelt_key_and_a_reversed_port() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (operator, tenants) = example_files("landkreis");
    let musterstadt = tenants
        .iter()
        .find(|p| p.ends_with("musterstadt.toml"))
        .unwrap();
    let text = std::fs::read_to_string(musterstadt).unwrap();
    let misspelt = dir.join("misspelt.toml");
    std::fs::write(&misspelt, text.replacen("prefixes = [", "prefixe = [", 1)).unwrap();
    let reversed = dir.join("reversed.toml");
    std::fs::write(&reversed, text.replacen("\"tcp/445\"", "\"445/tcp\"", 1)).unwrap();
    let lines = validate(FileKind::Tenant, &[misspelt, reversed]);
    assert!(
        lines[0].starts_with("invalid ") && lines[0].contains("'prefixe' was unexpected"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("invalid ") && lines[1].contains("'445/tcp' does not match"),
        "{lines:?}"
    );
    // A tenant's key in the operator file, and the other way round.
    let op_text = std::fs::read_to_string(&operator).unwrap();
    let wrong = dir.join("operator.toml");
    std::fs::write(&wrong, format!("tenant = \"x\"\n{op_text}")).unwrap();
    let lines = validate(FileKind::Operator, &[wrong]);
    assert!(lines[0].contains("'tenant' was unexpected"), "{lines:?}");
}

/// Every key the parser accepts is in docs/policy.md's tables, in the row of its table.
#[test]
fn every_accepted_key_is_documented() {
    let doc = std::fs::read_to_string(root().join("docs/policy.md")).unwrap();
    let rows = |prefixes: &[&str]| -> String {
        doc.lines()
            .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let cases: &[(FileKind, &str, &[&str])] = &[
        (FileKind::Operator, "PolicyHeader", &["| `[policy]` |"]),
        (FileKind::Operator, "TenantDecl", &["| `[tenants.T]` |"]),
        (
            FileKind::Operator,
            "SiteDecl",
            &["| `[tenants.T.sites.S]` |"],
        ),
        (FileKind::Operator, "ServiceDecl", &["| `[services.N]` |"]),
        (
            FileKind::Operator,
            "GuardrailDecl",
            &["| `[[guardrail]]` |"],
        ),
        (FileKind::Operator, "ExpectDecl", &["| `[[expect]]` |"]),
        (FileKind::Tenant, "SegmentDecl", &["| `[segments.N]`"]),
        (
            FileKind::Tenant,
            "TenantServiceDecl",
            &["| `[services.N]` `"],
        ),
        (FileKind::Tenant, "RuleDecl", &["| `[[rule]]`"]),
        (FileKind::Tenant, "ExpectDecl", &["| `[[expect]]` `"]),
    ];
    let schema = |kind| -> serde_json::Value { serde_json::from_str(&schema_text(kind)).unwrap() };
    for (kind, def, prefixes) in cases {
        let text = rows(prefixes);
        assert!(!text.is_empty(), "no row for {def} in docs/policy.md");
        let s = schema(*kind);
        let props = s["definitions"][def]["properties"].as_object().unwrap();
        for key in props.keys() {
            // A table of named entries has a row of its own (`[tenants.T.sites.S]`).
            let own_row = format!(".{key}.");
            assert!(
                text.contains(&format!("`{key}`"))
                    || doc
                        .lines()
                        .any(|l| l.starts_with("| `[") && l.contains(&own_row)),
                "docs/policy.md does not document `{key}` of {def} (rows: {prefixes:?})"
            );
        }
    }
    // The files' top-level keys and tables.
    for kind in [FileKind::Operator, FileKind::Tenant] {
        let s = schema(kind);
        for key in s["properties"].as_object().unwrap().keys() {
            let forms = [
                format!("| `[{key}]`"),
                format!("| `[{key}."),
                format!("| `[[{key}]]`"),
                format!("| `{key} = "),
            ];
            assert!(
                forms.iter().any(|f| doc.contains(f.as_str())),
                "docs/policy.md has no row for `{key}` of {}",
                kind.schema_file_name()
            );
        }
    }
}
