//! Delegation without deadlocks (issue 19, part 1): what the operator or an owner changes in
//! their own file never makes another admin's file an error. A rule a guardrail overrides, or
//! one towards a service whose export was withdrawn, becomes an inactive rule with a warning that
//! names both places; a fragment that cannot be read reports its errors in itself only; a stray
//! file never displaces the real fragment; the home-office pool says what to do.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use komnet_policy::{
    decide, run_tests, Decider, Diagnostic, Origin, PacketMeta, Policy, PolicyErrors, Proto,
    Severity,
};

const OPERATOR: &str = r#"[policy]
name = "delegation"
version = 1
kinds = ["staff", "iot", "homeoffice"]

[tenants.kreis]
datacenter = ["10.0.0.0/24"]

[tenants.nohfelden]
datacenter = ["10.1.10.0/24"]
homeoffice = ["10.250.10.0/24"]
[tenants.nohfelden.sites.rathaus]
prefixes = ["10.30.0.0/16"]

[tenants.tholey]
datacenter = ["10.1.20.0/24"]
homeoffice = ["10.250.20.0/24"]
[tenants.tholey.sites.rathaus]
prefixes = ["10.40.0.0/16"]

[services.dms]
owner = "kreis"
addresses = ["10.0.0.10"]
ports = ["tcp/443"]
export = ["nohfelden", "tholey"]

[services.mail]
addresses = ["10.0.0.25"]
ports = ["tcp/25"]
export = ["*"]
"#;

const NOHFELDEN: &str = r#"tenant = "nohfelden"

[segments.verwaltung]
kind = "staff"
site = "rathaus"
prefixes = ["10.30.1.0/24"]
vlan = 10

[segments.technik]
kind = "iot"
site = "rathaus"
prefixes = ["10.30.4.0/24"]
vlan = 40

[segments.homeoffice]
kind = "homeoffice"

[services.nohfelden-fs]
addresses = ["10.1.10.5"]
ports = ["tcp/445"]
export = ["tholey"]

[[rule]]
name = "staff-dms"
from = ["verwaltung", "homeoffice"]
to = ["dms", "nohfelden-fs"]

[[rule]]
name = "technik-dms"
from = ["technik"]
to = ["dms"]
"#;

const THOLEY: &str = r#"tenant = "tholey"

[segments.verwaltung]
kind = "staff"
site = "rathaus"
prefixes = ["10.40.1.0/24"]

[segments.homeoffice]
kind = "homeoffice"

[[rule]]
name = "staff-apps"
from = ["verwaltung"]
to = ["dms", "nohfelden/nohfelden-fs"]

[[rule]]
name = "shared-files"
from = ["verwaltung"]
to = ["nohfelden/nohfelden-fs"]

[[expect]]
from = "verwaltung"
to = "dms:443"
verdict = "allow"
"#;

const GUARDRAIL: &str = r#"
[[guardrail]]
name = "iot-not-dms"
why = "Gebäudetechnik erreicht keine Fachverfahren"
from_kinds = ["iot"]
to = ["dms"]
"#;

fn load(op: &str, nohfelden: &str, tholey: &str) -> Result<Policy, PolicyErrors> {
    Policy::from_texts(
        op,
        &[("nohfelden.toml", nohfelden), ("tholey.toml", tholey)],
    )
}

fn loaded(op: &str, nohfelden: &str, tholey: &str) -> Policy {
    match load(op, nohfelden, tholey) {
        Ok(p) => p,
        Err(e) => panic!("the policy should load; got:\n{}", e.render()),
    }
}

/// `file:line:col: message` of each diagnostic of `severity`.
fn listed(
    diags: &[Diagnostic],
    sources: &komnet_policy::SourceMap,
    severity: Severity,
) -> Vec<String> {
    diags
        .iter()
        .filter(|d| d.severity == severity)
        .map(|d| match &d.loc {
            Some(l) => format!("{}: {}", sources.position(l), d.message),
            None => d.message.clone(),
        })
        .collect()
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn the_base_policy_loads_without_findings() {
    let p = loaded(OPERATOR, NOHFELDEN, THOLEY);
    assert!(p.warnings.is_empty(), "{:#?}", p.warnings);
    assert_eq!(p.rules.len(), 4);
}

#[test]
fn a_new_guardrail_makes_the_rules_it_overrides_inactive_with_a_warning_naming_both_places() {
    let op = format!("{OPERATOR}{GUARDRAIL}");
    let p = loaded(&op, NOHFELDEN, THOLEY);
    let warnings = listed(&p.warnings, &p.sources, Severity::Warning);
    let rule_line = line_of(NOHFELDEN, "name = \"technik-dms\"");
    let guard_line = line_of(&op, "name = \"iot-not-dms\"");
    let want = format!(
        "tenants/nohfelden.toml:{rule_line}:8: rule \"technik-dms\" in tenants/nohfelden.toml:{rule_line} is inactive: guardrail \"iot-not-dms\" in operator.toml:{guard_line} denies every flow it allows"
    );
    assert_eq!(warnings, vec![want], "{warnings:#?}");
    // Both places are shown, with their lines.
    let rendered = p.warnings[0].render(&p.sources);
    assert!(
        rendered.contains(&format!(
            "operator.toml:{guard_line}:8: note: the operator's guardrail"
        )),
        "{rendered}"
    );
    // The policy is usable: tests run, flows are decided, the guardrail wins.
    assert_eq!(run_tests(&p).failed, 0);
    let d = decide(
        &p,
        Origin::Address,
        &PacketMeta::new(
            "10.30.4.7".parse().unwrap(),
            "10.0.0.10".parse().unwrap(),
            Proto::Tcp,
            443,
        ),
    );
    assert!(!d.allow);
    assert!(matches!(d.by, Decider::Guardrail(_)));
}

#[test]
fn a_withdrawn_export_leaves_the_users_rules_working_where_they_still_can() {
    let nohfelden = NOHFELDEN.replace("export = [\"tholey\"]\n", "");
    let p = loaded(OPERATOR, &nohfelden, THOLEY);
    let warnings = listed(&p.warnings, &p.sources, Severity::Warning);
    let apps = line_of(THOLEY, "name = \"staff-apps\"");
    let files = line_of(THOLEY, "name = \"shared-files\"");
    let fs_line = line_of(&nohfelden, "[services.nohfelden-fs]");
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings[0].starts_with(&format!("tenants/tholey.toml:{}:14: rule \"staff-apps\" in tenants/tholey.toml:{apps} does not reach nohfelden/nohfelden-fs: its owner, tenant \"nohfelden\", does not export it to tenant \"tholey\" (tenants/nohfelden.toml:{fs_line}); the rule still allows its other services", apps + 2)),
        "{warnings:#?}"
    );
    assert!(
        warnings[1].contains(&format!(
            "rule \"shared-files\" in tenants/tholey.toml:{files} does not reach nohfelden/nohfelden-fs"
        )) && warnings[1].ends_with("the rule is inactive (it allows nothing)"),
        "{warnings:#?}"
    );
    // The inactive rule is gone, the other one keeps its DMS.
    let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["staff-dms", "technik-dms", "staff-apps"]);
    let verdict = |dst: &str, port| {
        decide(
            &p,
            Origin::Address,
            &PacketMeta::new(
                "10.40.1.9".parse().unwrap(),
                dst.parse().unwrap(),
                Proto::Tcp,
                port,
            ),
        )
        .allow
    };
    assert!(verdict("10.0.0.10", 443));
    assert!(!verdict("10.1.10.5", 445));
    assert_eq!(run_tests(&p).failed, 0);
    // An operator's shared service that stops being exported: the same.
    let op = OPERATOR.replace(
        "export = [\"nohfelden\", \"tholey\"]",
        "export = [\"nohfelden\"]",
    );
    let p = loaded(&op, NOHFELDEN, THOLEY);
    let warnings = listed(&p.warnings, &p.sources, Severity::Warning);
    assert!(
        warnings.iter().any(|w| w.contains("does not reach dms: its owner, tenant \"kreis\" (in operator.toml), does not export it to tenant \"tholey\"")),
        "{warnings:#?}"
    );
    // A rule's name is still unique among inactive rules.
    let tholey = format!(
        "{THOLEY}\n[[rule]]\nname = \"shared-files\"\nfrom = [\"verwaltung\"]\nto = [\"mail\"]\n"
    );
    let e = load(OPERATOR, &nohfelden, &tholey).unwrap_err();
    assert!(
        e.render()
            .contains("rule \"shared-files\" is declared twice"),
        "{}",
        e.render()
    );
}

#[test]
fn a_foreign_service_that_changes_its_ports_does_not_break_the_users_file() {
    let tholey = THOLEY.replace(
        "to = [\"nohfelden/nohfelden-fs\"]\n",
        "to = [\"nohfelden/nohfelden-fs\"]\nports = [\"tcp/445\"]\n",
    );
    loaded(OPERATOR, NOHFELDEN, &tholey);
    let nohfelden = NOHFELDEN.replace("ports = [\"tcp/445\"]", "ports = [\"tcp/139\"]");
    let p = loaded(OPERATOR, &nohfelden, &tholey);
    let warnings = listed(&p.warnings, &p.sources, Severity::Warning);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("no packet can match tcp/445: none of the rule's services offers it (they offer tcp/139)")),
        "{warnings:#?}"
    );
    // In the tenant's own file, the same mistake is an error: one admin makes and fixes it.
    let nohfelden = NOHFELDEN.replace(
        "to = [\"dms\", \"nohfelden-fs\"]",
        "to = [\"nohfelden-fs\"]\nports = [\"tcp/22\"]",
    );
    let e = load(OPERATOR, &nohfelden, THOLEY).unwrap_err();
    assert!(
        e.render().contains("error: no packet can match tcp/22"),
        "{}",
        e.render()
    );
}

#[test]
fn a_broken_fragment_reports_its_errors_in_itself_only() {
    // operator.toml and tholey.toml name nohfelden's definitions.
    let op = format!(
        "{OPERATOR}\n[[guardrail]]\nname = \"no-fs\"\nfrom_kinds = [\"iot\"]\nto = [\"nohfelden/nohfelden-fs\"]\n\n[[expect]]\nfrom = \"nohfelden/verwaltung\"\nto = \"nohfelden/nohfelden-fs:445\"\nverdict = \"allow\"\n"
    );
    loaded(&op, NOHFELDEN, THOLEY);
    let broken = NOHFELDEN.replace("kind = \"staff\"", "kind = \"staff"); // unterminated string
    let e = load(&op, &broken, THOLEY).unwrap_err();
    let errors = listed(&e.diagnostics, &e.sources, Severity::Error);
    assert_eq!(errors.len(), 1, "{}", e.render());
    assert!(
        errors[0].starts_with("tenants/nohfelden.toml:"),
        "{errors:#?}"
    );
    let notes = listed(&e.diagnostics, &e.sources, Severity::Note);
    assert_eq!(
        notes,
        vec!["tenants/nohfelden.toml:1:1: errors in tenants/nohfelden.toml hide its definitions: 5 references to nohfelden/… in other files were not checked"],
        "{}",
        e.render()
    );
    // Names of a tenant whose fragment is fine are still checked everywhere.
    let tholey = THOLEY.replace(
        "nohfelden/nohfelden-fs\"]\n\n[[rule]]",
        "nohfelden/nohfelden-f\"]\n\n[[rule]]",
    );
    let e = load(&op, NOHFELDEN, &tholey).unwrap_err();
    assert!(
        e.render().contains(
            "unknown service \"nohfelden/nohfelden-f\": did you mean \"nohfelden/nohfelden-fs\"?"
        ),
        "{}",
        e.render()
    );
}

#[test]
fn a_stray_fragment_is_refused_and_the_real_one_is_read() {
    // tenants/nohfelden-extra.toml sorts before tenants/nohfelden.toml.
    let stray = "tenant = \"nohfelden\"\n\n[segments.labor]\nkind = \"staff\"\nsite = \"rathaus\"\nprefixes = [\"10.30.9.0/24\"]\nvlan = 90\n";
    let e = Policy::from_texts(
        OPERATOR,
        &[
            ("nohfelden-extra.toml", stray),
            ("nohfelden.toml", NOHFELDEN),
            ("tholey.toml", THOLEY),
        ],
    )
    .unwrap_err();
    let errors = listed(&e.diagnostics, &e.sources, Severity::Error);
    assert_eq!(
        errors,
        vec!["tenants/nohfelden-extra.toml:1:10: this file is tenants/nohfelden-extra.toml but says tenant = \"nohfelden\": a tenant's fragment is tenants/nohfelden.toml, so this file is not read; move what it holds into that file (one fragment per tenant)"],
        "{}",
        e.render()
    );
    // A fragment for a tenant the operator never declared: the closest one is suggested.
    let e =
        Policy::from_texts(OPERATOR, &[("nohfeld.toml", "tenant = \"nohfeld\"\n")]).unwrap_err();
    assert!(
        e.render().contains(
            "tenant \"nohfeld\" is not declared in operator.toml (did you mean \"nohfelden\"?)"
        ),
        "{}",
        e.render()
    );
}

#[test]
fn the_home_office_pool_says_what_to_do() {
    // A pool carved out of the town hall's range.
    let op = OPERATOR.replace(
        "homeoffice = [\"10.250.10.0/24\"]",
        "homeoffice = [\"10.30.250.0/24\"]",
    );
    let e = load(&op, NOHFELDEN, THOLEY).unwrap_err();
    let errors = listed(&e.diagnostics, &e.sources, Severity::Error);
    assert!(
        errors.iter().any(|m| m.contains("10.30.0.0/16 of site nohfelden/rathaus overlaps 10.30.250.0/24 of tenant \"nohfelden\" (home-office pool): a home-office pool is a range of its own")
            && m.contains("move the pool")),
        "{}",
        e.render()
    );
    // A pool without a home-office segment: the devices would reach nothing.
    let tholey = THOLEY.replace("[segments.homeoffice]\nkind = \"homeoffice\"\n", "");
    let p = loaded(OPERATOR, NOHFELDEN, &tholey);
    let warnings = listed(&p.warnings, &p.sources, Severity::Warning);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].starts_with("tenants/tholey.toml:1:10: tenant \"tholey\" has a home-office pool (10.250.20.0/24) but no home-office segment")
            && warnings[0].contains("add [segments.homeoffice] with kind = \"homeoffice\" and no site"),
        "{warnings:#?}"
    );
    // A home-office segment without a pool.
    let op = OPERATOR.replace("homeoffice = [\"10.250.20.0/24\"]\n", "");
    let e = load(&op, NOHFELDEN, THOLEY).unwrap_err();
    assert!(
        e.render()
            .contains("the operator adds one to [tenants.tholey] in operator.toml"),
        "{}",
        e.render()
    );
}

#[test]
fn a_broken_operator_file_reports_its_errors_and_the_fragments_only_their_syntax() {
    let broken = OPERATOR.replace("version = 1", "version = ");
    let e = load(&broken, NOHFELDEN, THOLEY).unwrap_err();
    let errors = listed(&e.diagnostics, &e.sources, Severity::Error);
    assert_eq!(errors.len(), 1, "{}", e.render());
    assert!(errors[0].starts_with("operator.toml:3:"), "{}", e.render());
    assert_eq!(
        listed(&e.diagnostics, &e.sources, Severity::Note),
        ["operator.toml:1:1: errors in operator.toml hide the tenants, sites and shared services: 2 fragments were checked for syntax only"]
    );
    // A fragment's own syntax errors are still reported.
    let tholey = THOLEY.replace("kind = \"staff\"", "kind = staff");
    let e = load(&broken, NOHFELDEN, &tholey).unwrap_err();
    let errors = listed(&e.diagnostics, &e.sources, Severity::Error);
    assert_eq!(errors.len(), 2, "{}", e.render());
    assert!(
        errors[1].starts_with("tenants/tholey.toml:4:8:"),
        "{}",
        e.render()
    );
}
