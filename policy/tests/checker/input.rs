//! Bad files of every kind: each error names its place, all are reported in one run, nothing
//! panics; the worked example and the docs agree.

use super::*;

#[test]
fn invalid_values_name_their_place() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "10.10.1.0/24",
            "10.10.1.0/33",
            "tenants/a.toml:6:13",
            "not an IP address or prefix",
        ),
        (
            "10.10.1.0/24",
            "10.10.1.7/24",
            "tenants/a.toml:6:13",
            "host bits set; did you mean 10.10.1.0/24",
        ),
        (
            "tcp/445",
            "tcp/70000",
            "tenants/a.toml:17:10",
            "out of range",
        ),
        ("tcp/445", "tcp/0", "tenants/a.toml:17:10", "out of range"),
        (
            "tcp/445",
            "gre/1",
            "tenants/a.toml:17:10",
            "unknown protocol",
        ),
        (
            "kind = \"guest\"",
            "kind = \"printer\"",
            "tenants/a.toml:10:8",
            "unknown segment kind \"printer\"",
        ),
        (
            "site = \"hq\"\nprefixes = [\"10.10.100",
            "site = \"annex\"\nprefixes = [\"10.10.100",
            "tenants/a.toml:11:8",
            "no site \"annex\"",
        ),
    ];
    for (from, to, at, needle) in cases {
        let a = TENANT_A.replacen(from, to, 1);
        assert_ne!(a, TENANT_A, "case {from} did not apply");
        assert_error(OPERATOR, &a, TENANT_B, at, needle);
    }
}

#[test]
fn unknown_keys_and_duplicates() {
    let a = TENANT_A.replace("kind = \"staff\"", "kind = \"staff\"\ncolour = \"blue\"");
    assert_error(
        OPERATOR,
        &a,
        TENANT_B,
        "tenants/a.toml:5:1",
        "unknown key `colour` in `segments.staff`; known keys here: description, dhcp, kind, local, port, prefixes, site, vlan",
    );
    let a = format!("{TENANT_A}\n[segments.staff]\nkind = \"staff\"\nsite = \"hq\"\nprefixes = [\"10.10.9.0/24\"]\n");
    assert_error(
        OPERATOR,
        &a,
        TENANT_B,
        "tenants/a.toml:24:11",
        "duplicate key",
    );
    let a = format!(
        "{TENANT_A}\n[[rule]]\nname = \"staff-dms\"\nfrom = [\"staff\"]\nto = [\"files\"]\n"
    );
    assert_error(
        OPERATOR,
        &a,
        TENANT_B,
        "tenants/a.toml:25:8",
        "rule \"staff-dms\" is declared twice",
    );
}

#[test]
fn every_unknown_key_wrong_type_and_syntax_error_of_a_file_is_reported_in_one_run() {
    let a = TENANT_A
        .replace("prefixes = [\"10.10.1.0/24\"", "prefix = [\"10.10.1.0/24\"")
        .replace("vlan = 100", "vlan = \"100\"")
        .replace(
            "to = [\"dms\", \"files\"]",
            "to = [\"dms\", \"files\"]\ndescripton = \"x\"",
        );
    let (list, rendered) = errors(OPERATOR, &a, TENANT_B);
    assert_eq!(
        list,
        [
            "tenants/a.toml:6:1: unknown key `prefix` in `segments.staff`; did you mean `prefixes`?",
            "tenants/a.toml:13:8: `segments.guests.vlan` must be a whole number, not a string",
            "tenants/a.toml:23:1: unknown key `descripton` in `rule`; did you mean `description`?",
        ],
        "{rendered}"
    );
    // Several syntax errors: the parser recovers and reports each.
    let a = TENANT_A
        .replace("kind = \"staff\"", "kind = staff")
        .replace("kind = \"guest\"", "kind = \"guest");
    let (list, rendered) = errors(OPERATOR, &a, TENANT_B);
    assert!(list.len() >= 2, "{rendered}");
    assert!(list[0].starts_with("tenants/a.toml:4:"), "{rendered}");
    assert!(
        list.iter().any(|e| e.starts_with("tenants/a.toml:10:")),
        "{rendered}"
    );
}

#[test]
fn all_errors_are_reported_at_once() {
    let a = TENANT_A
        .replace(r#"from = ["staff"]"#, r#"from = ["nobody"]"#)
        .replace("tcp/445", "tcp/99999");
    let b = TENANT_B.replace("10.20.1.0/24", "10.99.1.0/24");
    let (list, rendered) = errors(OPERATOR, &a, &b);
    assert!(list.len() >= 3, "{rendered}");
    // Rendered with the source line and a caret under the spot.
    assert!(rendered.contains("21 | from = [\"nobody\"]"), "{rendered}");
    assert!(rendered.contains("^^^^^^^^"), "{rendered}");
}

#[test]
fn garbage_huge_and_deep_inputs_get_errors_not_panics() {
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let text = String::from_utf8_lossy(&garbage).into_owned();
    assert!(load(&text, TENANT_A, TENANT_B).is_err());
    assert!(load(OPERATOR, &text, TENANT_B).is_err());

    let deep = format!("x = {}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let (list, _) = errors(OPERATOR, &deep, TENANT_B);
    assert!(!list.is_empty());
    let deep_tables = format!("[{}]\n", vec!["a"; 50_000].join("."));
    assert!(load(OPERATOR, &deep_tables, TENANT_B).is_err());

    // Over the size limit on disk: refused before parsing, with the limit in the message.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("operator.toml"), OPERATOR).unwrap();
    std::fs::create_dir_all(dir.join("tenants")).unwrap();
    let big = format!("tenant = \"a\"\n# {}\n", "x".repeat(10 << 20));
    std::fs::write(dir.join("tenants/a.toml"), big).unwrap();
    std::fs::write(dir.join("tenants/b.toml"), [0xff, 0xfe, 0x00]).unwrap();
    let err = Policy::load(dir).unwrap_err();
    let text = err.render();
    assert!(
        text.contains("policy files are limited to 1048576 bytes"),
        "{text}"
    );
    assert!(text.contains("not UTF-8"), "{text}");
}

#[test]
fn missing_directory_or_operator_file() {
    let err = Policy::load(Path::new("/nonexistent/komnet-policy")).unwrap_err();
    assert!(err.render().contains("not a directory"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let err = Policy::load(dir).unwrap_err();
    assert!(
        err.render().contains("operator.toml: cannot read"),
        "{}",
        err.render()
    );
}

#[test]
fn worked_example_passes_check_and_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
    let p = match Policy::load(&dir) {
        Ok(p) => p,
        Err(e) => panic!("{}", e.render()),
    };
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let report = run_tests(&p);
    assert_eq!(report.failed, 0, "{:#?}", report.outcomes);
    assert!(report.passed >= 20);
}

#[test]
fn docs_show_the_worked_example_verbatim() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/policy.md")).unwrap();
    let mut shown = 0;
    for block in doc.split("```toml\n").skip(1) {
        let Some(body) = block.split("```\n").next() else {
            continue;
        };
        let Some(rest) = body.strip_prefix("# file: ") else {
            continue;
        };
        let (name, text) = rest.split_once('\n').unwrap();
        let on_disk =
            std::fs::read_to_string(root.join("examples/policy/landkreis").join(name)).unwrap();
        assert_eq!(text, on_disk, "docs/policy.md shows an outdated {name}");
        shown += 1;
    }
    let files = 1 + std::fs::read_dir(root.join("examples/policy/landkreis/tenants"))
        .unwrap()
        .count();
    assert_eq!(
        shown, files,
        "docs/policy.md must show every file of the example"
    );
}
