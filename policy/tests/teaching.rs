//! Errors and output that teach (issue 19, part 2): one port syntax (PROTO/PORT; the other order
//! is taken with a hint), the closest name for a misspelt one, another tenant's service named
//! without `TENANT/`, a backwards range, `explain` from a host of the segment, and a flow whose
//! address families do not meet answered as a deny.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use komnet_policy::{explain, run_tests, Policy, PolicyErrors};

const OPERATOR: &str = r#"[policy]
name = "teaching"
version = 1
kinds = ["staff", "guest"]

[tenants.kreis]
datacenter = ["10.0.0.0/24"]

[tenants.nohfelden]
datacenter = ["10.1.10.0/24", "fd00:10::/64"]
[tenants.nohfelden.sites.rathaus]
prefixes = ["10.30.0.0/16", "fd00:30::/48"]

[tenants.tholey]
datacenter = ["10.1.20.0/24"]
[tenants.tholey.sites.rathaus]
prefixes = ["10.40.0.0/16"]

[services.dms]
owner = "kreis"
addresses = ["10.0.0.10"]
ports = ["tcp/443"]
export = ["*"]
"#;

const NOHFELDEN: &str = r#"tenant = "nohfelden"

[segments.verwaltung]
kind = "staff"
site = "rathaus"
prefixes = ["10.30.1.0/24", "fd00:30:0:1::/64"]

[services.nohfelden-fs]
addresses = ["10.1.10.5", "fd00:10::5"]
ports = ["tcp/445"]

[services.archiv]
addresses = ["10.1.10.6"]
ports = ["tcp/443"]
export = ["tholey"]

[[rule]]
name = "staff"
from = ["verwaltung"]
to = ["dms", "nohfelden-fs"]
"#;

const THOLEY: &str = r#"tenant = "tholey"

[segments.verwaltung]
kind = "staff"
site = "rathaus"
prefixes = ["10.40.1.0/24"]

[[rule]]
name = "staff"
from = ["verwaltung"]
to = ["dms"]
"#;

fn load(op: &str, nohfelden: &str, tholey: &str) -> Result<Policy, PolicyErrors> {
    Policy::from_texts(
        op,
        &[("nohfelden.toml", nohfelden), ("tholey.toml", tholey)],
    )
}

fn loaded(op: &str, nohfelden: &str, tholey: &str) -> Policy {
    load(op, nohfelden, tholey).unwrap_or_else(|e| panic!("{}", e.render()))
}

fn error_text(op: &str, nohfelden: &str, tholey: &str) -> String {
    match load(op, nohfelden, tholey) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.render(),
    }
}

fn warnings(p: &Policy) -> Vec<String> {
    p.warnings
        .iter()
        .filter(|w| w.is_warning())
        .map(|w| {
            format!(
                "{}: {}",
                p.sources.position(w.loc.as_ref().unwrap()),
                w.message
            )
        })
        .collect()
}

#[test]
fn ports_are_proto_slash_port_everywhere_and_the_other_order_is_taken_with_a_hint() {
    let nohfelden = format!(
        "{}\n[[expect]]\nfrom = \"verwaltung\"\nto = \"dms:443/tcp\"\nverdict = \"allow\"\n\n[[expect]]\nfrom = \"verwaltung\"\nto = \"dms:tcp/443\"\nverdict = \"allow\"\n",
        NOHFELDEN.replace("ports = [\"tcp/445\"]", "ports = [\"445/tcp\"]")
    );
    let p = loaded(OPERATOR, &nohfelden, THOLEY);
    assert_eq!(
        warnings(&p),
        [
            "tenants/nohfelden.toml:10:10: write \"tcp/445\", not \"445/tcp\": ports are PROTO/PORT everywhere in the policy (services, rules, tests, explain)",
            "tenants/nohfelden.toml:24:6: write \"dms:tcp/443\", not \"dms:443/tcp\": ports are PROTO/PORT everywhere in the policy (services, rules, tests, explain)",
        ]
    );
    let report = run_tests(&p);
    assert_eq!(
        (report.passed, report.failed),
        (2, 0),
        "{:#?}",
        report.outcomes
    );
    // A backwards range says which one was meant.
    let text = error_text(
        OPERATOR,
        &NOHFELDEN.replace("ports = [\"tcp/445\"]", "ports = [\"tcp/445-139\"]"),
        THOLEY,
    );
    assert!(
        text.contains("port range 445-139 in \"tcp/445-139\" is backwards (low > high): did you mean \"tcp/139-445\"?"),
        "{text}"
    );
    // A test names one port.
    let text = error_text(
        OPERATOR,
        &format!("{NOHFELDEN}\n[[expect]]\nfrom = \"verwaltung\"\nto = \"dms:tcp/1-9\"\nverdict = \"deny\"\n"),
        THOLEY,
    );
    assert!(
        text.contains("a test decides one packet: name one port"),
        "{text}"
    );
}

#[test]
fn misspelt_names_get_the_closest_one() {
    let cases = [
        // (file changed, from, to, message)
        (
            "n",
            "from = [\"verwaltung\"]",
            "from = [\"verwaltun\"]",
            "unknown segment or group \"verwaltun\"; did you mean \"verwaltung\"?",
        ),
        (
            "n",
            "kind = \"staff\"",
            "kind = \"staf\"",
            "unknown segment kind \"staf\"; did you mean \"staff\"?",
        ),
        (
            "n",
            "site = \"rathaus\"",
            "site = \"rathuas\"",
            "tenant \"nohfelden\" has no site \"rathuas\"; did you mean \"rathaus\"?",
        ),
        (
            "n",
            "to = [\"dms\", \"nohfelden-fs\"]",
            "to = [\"dsm\", \"nohfelden-fs\"]",
            "unknown service \"dsm\": did you mean \"dms\"?",
        ),
        (
            "o",
            "export = [\"*\"]",
            "export = [\"nohfeldn\"]",
            "export to \"nohfeldn\": no such tenant (did you mean \"nohfelden\"?)",
        ),
        (
            "o",
            "owner = \"kreis\"",
            "owner = \"kries\"",
            "owner \"kries\" is not a tenant declared in this file (did you mean \"kreis\"?)",
        ),
    ];
    for (which, from, to, needle) in cases {
        let (op, n) = match which {
            "o" => (OPERATOR.replacen(from, to, 1), NOHFELDEN.to_owned()),
            _ => (OPERATOR.to_owned(), NOHFELDEN.replacen(from, to, 1)),
        };
        let text = error_text(&op, &n, THOLEY);
        assert!(text.contains(needle), "{needle}\n{text}");
    }
    // A test's source and destination too.
    let n = format!("{NOHFELDEN}\n[[expect]]\nfrom = \"verwaltnug\"\nto = \"nohfelden-f:tcp/445\"\nverdict = \"allow\"\n");
    let text = error_text(OPERATOR, &n, THOLEY);
    assert!(text.contains("did you mean \"verwaltung\"?"), "{text}");
    assert!(
        text.contains("unknown service \"nohfelden-f\": did you mean \"nohfelden-fs\"?"),
        "{text}"
    );
}

#[test]
fn another_tenants_service_named_without_its_tenant_is_explained() {
    // Exported to tholey: say how to write it.
    let t = THOLEY.replace("to = [\"dms\"]", "to = [\"dms\", \"archiv\"]");
    let text = error_text(OPERATOR, NOHFELDEN, &t);
    assert!(
        text.contains("unknown service \"archiv\": another tenant's service is written TENANT/SERVICE; did you mean nohfelden/archiv?"),
        "{text}"
    );
    // Not exported to tholey: say that too.
    let t = THOLEY.replace("to = [\"dms\"]", "to = [\"dms\", \"nohfelden-fs\"]");
    let text = error_text(OPERATOR, NOHFELDEN, &t);
    assert!(
        text.contains("did you mean nohfelden/nohfelden-fs (not exported to tenant \"tholey\")?"),
        "{text}"
    );
}

#[test]
fn explain_uses_a_host_of_the_segment_and_answers_a_family_that_does_not_meet_with_a_deny() {
    let p = loaded(OPERATOR, NOHFELDEN, THOLEY);
    let lines: Vec<String> = explain(&p, "nohfelden/verwaltung", "nohfelden/nohfelden-fs")
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            "IPv4 10.30.1.1 -> 10.1.10.5:tcp/445: allow (rule \"staff\", tenants/nohfelden.toml:18)",
            "IPv6 fd00:30:0:1::1 -> [fd00:10::5]:tcp/445: allow (rule \"staff\", tenants/nohfelden.toml:18)",
        ]
    );
    // The DMS has no IPv6 address: the IPv6 side is a deny that says why, not an error.
    let lines: Vec<String> = explain(&p, "nohfelden/verwaltung", "dms:tcp/443")
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            "IPv4 10.30.1.1 -> 10.0.0.10:tcp/443: allow (rule \"staff\", tenants/nohfelden.toml:18)",
            "IPv6 fd00:30:0:1::1 -> dms:tcp/443: deny (the service has no IPv6 address)",
        ]
    );
    let lines: Vec<String> = explain(&p, "fd00:30:0:1::9", "dms")
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        ["IPv6 fd00:30:0:1::9 -> dms:tcp/443: deny (the service has no IPv6 address)"]
    );
    // A test that expects exactly that passes.
    let n = format!("{NOHFELDEN}\n[[expect]]\nfrom = \"fd00:30:0:1::9\"\nto = \"dms:tcp/443\"\nverdict = \"deny\"\n");
    let report = run_tests(&loaded(OPERATOR, &n, THOLEY));
    assert_eq!(
        (report.passed, report.failed),
        (1, 0),
        "{:#?}",
        report.outcomes
    );
    assert!(report.outcomes[0]
        .line
        .ends_with("(IPv6): deny (the service has no IPv6 address)"));
    // Misspelt names in explain get the closest one.
    let e = explain(&p, "nohfelden/verwaltun", "dms").unwrap_err();
    assert!(e.ends_with("did you mean \"nohfelden/verwaltung\"?"), "{e}");
    let e = explain(&p, "nohfelden/verwaltung", "nohfelden/archive").unwrap_err();
    assert!(e.ends_with("did you mean \"nohfelden/archiv\"?"), "{e}");
}
