//! What the checker says about rules, guardrails, delegation and groups.

use super::*;

#[test]
fn the_base_policy_is_valid() {
    let p = load(OPERATOR, TENANT_A, TENANT_B).unwrap();
    assert_eq!(p.tenants.len(), 2);
    assert_eq!(p.rules.len(), 1);
}

#[test]
fn unknown_segment_in_a_rule() {
    let a = TENANT_A.replace(r#"from = ["staff"]"#, r#"from = ["stafff"]"#);
    assert_error(
        OPERATOR,
        &a,
        TENANT_B,
        "tenants/a.toml:21:9",
        "unknown segment or group \"stafff\"",
    );
}

#[test]
fn overlapping_tenant_prefixes() {
    let op = OPERATOR.replace(
        r#"prefixes = ["10.20.0.0/16"]"#,
        r#"prefixes = ["10.10.128.0/17"]"#,
    );
    let b = TENANT_B.replace("10.20.1.0/24", "10.10.200.0/24");
    assert_error(
        &op,
        TENANT_A,
        &b,
        "operator.toml:15:13",
        "10.10.128.0/17 of site b/hq overlaps 10.10.0.0/16 of site a/hq",
    );
}

#[test]
fn rule_no_packet_can_match() {
    // The guest segment is IPv4 only, the service IPv6 only: the service is the operator's, so
    // its change must not break the tenant's file — a warning, the rule inactive.
    let op = OPERATOR.replace(
        r#"addresses = ["10.1.1.10", "fd00:1:1::10"]"#,
        r#"addresses = ["fd00:1:1::10"]"#,
    );
    let a = TENANT_A
        .replace(r#"to = ["dms", "files"]"#, r#"to = ["dms"]"#)
        .replace(
            r#"prefixes = ["10.10.1.0/24", "fd00:10:0:1::/64"]"#,
            r#"prefixes = ["10.10.1.0/24"]"#,
        );
    let p = load(&op, &a, TENANT_B).unwrap();
    let w = warnings(&p);
    assert!(
        w.iter().any(|w| w.starts_with("tenants/a.toml:20:8")
            && w.contains("can match no packet")
            && w.ends_with("the rule is inactive")),
        "{w:#?}"
    );
    // The same with the tenant's own service: an error.
    let a = TENANT_A
        .replace(r#"to = ["dms", "files"]"#, r#"to = ["files"]"#)
        .replace(
            r#"addresses = ["10.1.1.5"]"#,
            r#"addresses = ["fd00:1:1::5"]"#,
        )
        .replace(
            r#"prefixes = ["10.10.1.0/24", "fd00:10:0:1::/64"]"#,
            r#"prefixes = ["10.10.1.0/24"]"#,
        );
    assert_error(
        OPERATOR,
        &a,
        TENANT_B,
        "tenants/a.toml:20:8",
        "can match no packet",
    );
    // A port the service does not offer.
    let a = TENANT_A.replace(
        r#"to = ["dms", "files"]"#,
        "to = [\"files\"]\nports = [\"tcp/22\"]",
    );
    assert_error(
        OPERATOR,
        &a,
        TENANT_B,
        "tenants/a.toml:23:10",
        "no packet can match tcp/22",
    );
}

#[test]
fn rule_shadowed_by_guardrail() {
    let a = TENANT_A.replace(r#"from = ["staff"]"#, r#"from = ["guests"]"#);
    let p = load(OPERATOR, &a, TENANT_B).unwrap();
    assert!(
        warnings(&p).iter().any(|w| w.starts_with("tenants/a.toml:20:8")
            && w.contains("is inactive: guardrail \"guest-isolation\" in operator.toml:23 denies every flow it allows")),
        "{:#?}",
        warnings(&p)
    );
}

#[test]
fn partly_shadowed_rule_is_a_warning() {
    let a = TENANT_A.replace(r#"from = ["staff"]"#, r#"from = ["staff", "guests"]"#);
    let p = load(OPERATOR, &a, TENANT_B).unwrap();
    assert!(p
        .warnings
        .iter()
        .any(|w| w.message.contains("partly overridden")));
}

#[test]
fn delegation_is_enforced() {
    // b may not use a's segments (an error), nor a's service (not exported) or dms (exported to
    // a only): those do not reach anything, with a warning each, and the rule is inactive.
    let b = format!(
        "{TENANT_B}\n[[rule]]\nname = \"grab\"\nfrom = [\"a/staff\"]\nto = [\"a/files\", \"dms\"]\n"
    );
    let (list, rendered) = errors(OPERATOR, TENANT_A, &b);
    assert!(
        list.iter().any(|e| e.starts_with("tenants/b.toml:10:9")
            && e.contains("may name only its own segments")),
        "{rendered}"
    );
    let b = format!(
        "{TENANT_B}\n[[rule]]\nname = \"grab\"\nfrom = [\"staff\"]\nto = [\"a/files\", \"dms\"]\n"
    );
    let p = load(OPERATOR, TENANT_A, &b).unwrap();
    let w = warnings(&p);
    let want = [
        (
            "tenants/b.toml:11:7",
            "does not reach a/files: its owner, tenant \"a\", does not export it to tenant \"b\"",
        ),
        (
            "tenants/b.toml:11:18",
            "does not reach dms: the operator does not export it to tenant \"b\"",
        ),
    ];
    for (at, needle) in want {
        assert!(
            w.iter().any(|e| e.starts_with(at)
                && e.contains(needle)
                && e.ends_with("the rule is inactive (it allows nothing)")),
            "wanted {at} {needle:?}; got:\n{w:#?}"
        );
    }
    assert!(p.rules.iter().all(|r| r.name != "grab"));
    // A tenant cannot declare a service in another tenant's address space.
    let b =
        format!("{TENANT_B}\n[services.spy]\naddresses = [\"10.1.1.5\"]\nports = [\"tcp/445\"]\n");
    assert_error(
        OPERATOR,
        TENANT_A,
        &b,
        "tenants/b.toml:9:14",
        "outside tenant \"b\"",
    );
    // Nor add a tenant.
    let c = "tenant = \"c\"\n";
    let (list, _) = match Policy::from_texts(OPERATOR, &[("c.toml", c)]) {
        Err(e) => (
            e.diagnostics
                .iter()
                .map(|d| d.message.clone())
                .collect::<Vec<_>>(),
            (),
        ),
        Ok(_) => panic!("unknown tenant accepted"),
    };
    assert!(list[0].contains("only the operator adds tenants"));
}

#[test]
fn cycles_in_groups() {
    let a = format!(
        "{TENANT_A}\n[groups]\nx = [\"y\"]\ny = [\"x\"]\n\n[[rule]]\nname = \"loop\"\nfrom = [\"x\"]\nto = [\"files\"]\n"
    );
    let (list, rendered) = errors(OPERATOR, &a, TENANT_B);
    assert!(
        list.iter()
            .any(|e| e.contains("groups form a cycle: x -> y -> x")),
        "{rendered}"
    );
}
