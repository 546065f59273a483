//! Issue 13, part 3: a town hall keeps its own numbering (`local` prefixes, translated 1:1 by
//! its appliance at the tunnel). Two communes may use the same 192.168.178.0/24; the checker
//! refuses translations that cannot work, each at its place; the appliance's ruleset matches
//! its LAN as the LAN numbers it and translates at the tunnel; the oracle and `explain` take
//! local addresses at a named site.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::net::IpAddr;

use komnet_policy::nft::{ruleset_for_site, Interfaces};
use komnet_policy::{
    decide_arrival, explain_at, Arrival, Binding, PacketMeta, Policy, PolicyErrors,
};

const OPERATOR: &str = r#"[policy]
name = "test district"
version = 1
kinds = ["staff", "guest", "homeoffice"]
tunnel = ["10.96.0.0/12"]

[tenants.a]
datacenter = ["10.1.1.0/24"]
homeoffice = ["10.250.1.0/24"]
[tenants.a.sites.hq]
prefixes = ["10.10.0.0/16", "fd00:10::/48"]

[tenants.b]
datacenter = ["10.1.2.0/24"]
[tenants.b.sites.hq]
prefixes = ["10.20.0.0/16"]

[services.dms]
addresses = ["10.1.1.10"]
ports = ["tcp/443"]
export = ["a", "b"]
"#;

const TENANT_A: &str = r#"tenant = "a"

[segments.staff]
kind = "staff"
site = "hq"
prefixes = ["10.10.1.0/24", "fd00:10:0:1::/64"]
local = ["192.168.178.0/24", "fd00:178::/64"]
vlan = 10

[segments.guests]
kind = "guest"
site = "hq"
prefixes = ["10.10.100.0/24"]
local = ["192.168.100.0/24"]
vlan = 100

[[rule]]
name = "staff-dms"
from = ["staff"]
to = ["dms"]
"#;

const TENANT_B: &str = r#"tenant = "b"

[segments.staff]
kind = "staff"
site = "hq"
prefixes = ["10.20.1.0/24"]
local = ["192.168.178.0/24"]

[[rule]]
name = "staff-dms"
from = ["staff"]
to = ["dms"]
"#;

fn load(op: &str, a: &str, b: &str) -> Result<Policy, PolicyErrors> {
    Policy::from_texts(op, &[("a.toml", a), ("b.toml", b)])
}

fn assert_error(op: &str, a: &str, b: &str, at: &str, needle: &str) {
    let e = load(op, a, b).expect_err("expected errors");
    let list: Vec<String> = e
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| match &d.loc {
            Some(l) => format!("{}: {}", e.sources.position(l), d.message),
            None => d.message.clone(),
        })
        .collect();
    assert!(
        list.iter().any(|l| l.starts_with(at) && l.contains(needle)),
        "wanted an error at {at} containing {needle:?}; got:\n{}",
        e.render()
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn two_communes_keep_the_same_local_lan_and_the_district_sees_unique_ones() {
    let p = load(OPERATOR, TENANT_A, TENANT_B).unwrap_or_else(|e| panic!("{}", e.render()));
    let a = p.find_site("a/hq").unwrap();
    let b = p.find_site("b/hq").unwrap();
    assert_eq!(p.unique_of(a, ip("192.168.178.77")), ip("10.10.1.77"));
    assert_eq!(p.unique_of(b, ip("192.168.178.77")), ip("10.20.1.77"));
    assert_eq!(p.unique_of(a, ip("fd00:178::5")), ip("fd00:10:0:1::5"));
    // Not local: as it is.
    assert_eq!(p.unique_of(a, ip("10.1.1.10")), ip("10.1.1.10"));
    let staff = &p.segments[p.find_segment("a/staff", None).unwrap().index()];
    assert_eq!(
        staff
            .lan_prefixes()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["192.168.178.0/24", "fd00:178::/64"]
    );
    // DHCP hands out the local addresses.
    assert_eq!(
        format!("{:?}", staff.dhcp_pools()[0]),
        "(192.168.178.0/24, 192.168.178.2, 192.168.178.254)"
    );

    // The oracle at the town hall: a staff PC by its local address reaches the DMS; the same
    // local address on the guest VLAN is a spoof; a guest's local address on its VLAN is a
    // guest (no rule).
    let dms = |src: &str| PacketMeta {
        src: ip(src),
        dst: ip("10.1.1.10"),
        ip_proto: 6,
        dport: 443,
    };
    assert!(decide_arrival(&p, a, &Binding::Vlan(10), &dms("192.168.178.77")).allow);
    let spoof = decide_arrival(&p, a, &Binding::Vlan(100), &dms("192.168.178.77"));
    assert_eq!(spoof.by, komnet_policy::Decider::SegmentSpoof);
    let guest = decide_arrival(&p, a, &Binding::Vlan(100), &dms("192.168.100.5"));
    assert_eq!(guest.by, komnet_policy::Decider::DefaultDeny);
    assert!(decide_arrival(&p, b, &Binding::Lan, &dms("192.168.178.77")).allow);

    // explain with --site: the local address, shown with its unique one.
    let lines = explain_at(
        &p,
        "192.168.178.77",
        "dms:tcp/443",
        Some(&Arrival {
            site: Some("b/hq".into()),
            binding: None,
        }),
    )
    .unwrap();
    let text = lines[0].to_string();
    assert!(
        text.starts_with("IPv4 10.20.1.77 -> 10.1.1.10:tcp/443: allow (rule \"staff-dms\"")
            && text.contains("192.168.178.77 at b/hq is 10.20.1.77 in the district"),
        "{text}"
    );
    let lines = explain_at(
        &p,
        "192.168.178.77",
        "dms:tcp/443",
        Some(&Arrival {
            site: Some("a/hq".into()),
            binding: Some(Binding::Vlan(100)),
        }),
    )
    .unwrap();
    assert!(!lines[0].decision.allow, "{}", lines[0]);

    // The appliance of a/hq: its LAN matched as numbered there, translated at the tunnel.
    let interfaces = Interfaces {
        lan: vec!["eth1".into()],
        tunnel: "komnet0".into(),
    };
    let text = ruleset_for_site(&p, a, &interfaces).unwrap().to_string();
    let set = text.split("set seg_a_staff_v4 {").nth(1).unwrap();
    assert!(
        set.split('}')
            .next()
            .unwrap()
            .contains("elements = { 192.168.178.0/24 "),
        "{text}"
    );
    assert!(
        text.contains("table inet komnet_nat {")
            && text.contains("iifname \"komnet0\" ip daddr 10.10.1.0/24 dnat ip prefix to ip daddr map { 10.10.1.0/24 : 192.168.178.0/24 }")
            && text.contains("oifname \"komnet0\" ip saddr 192.168.178.0/24 snat ip prefix to ip saddr map { 192.168.178.0/24 : 10.10.1.0/24 }")
            && text.contains("oifname \"komnet0\" ip6 saddr fd00:178::/64 snat ip6 prefix to ip6 saddr map { fd00:178::/64 : fd00:10:0:1::/64 }"),
        "{text}"
    );
    let json =
        komnet_policy::nft::to_json_pretty(&ruleset_for_site(&p, a, &interfaces).unwrap()).unwrap();
    assert!(
        json.contains("\"netmap\"") && json.contains("komnet_nat"),
        "{json}"
    );
}

#[test]
fn translations_that_cannot_work_are_refused_where_they_are_written() {
    // Another length, another family, nothing to stand for.
    assert_error(
        OPERATOR,
        &TENANT_A.replace("\"192.168.178.0/24\", \"fd00:178::/64\"", "\"192.168.178.0/23\""),
        TENANT_B,
        "tenants/a.toml:7:10",
        "local prefix 192.168.178.0/23 is a /23, but 10.10.1.0/24 (prefixes[0]) that it stands for is a /24",
    );
    assert_error(
        OPERATOR,
        &TENANT_A.replace(
            "\"192.168.178.0/24\", \"fd00:178::/64\"",
            "\"fd00:178::/64\"",
        ),
        TENANT_B,
        "tenants/a.toml:7:10",
        "which is of the other address family",
    );
    assert_error(
        OPERATOR,
        &TENANT_A.replace(
            "\"fd00:178::/64\"]",
            "\"fd00:178::/64\", \"192.168.179.0/24\"]",
        ),
        TENANT_B,
        "tenants/a.toml:7:47",
        "local prefix 192.168.179.0/24 stands for nothing",
    );
    // Hiding what the district routes: a data centre, another site, the tunnel pool.
    assert_error(
        OPERATOR,
        &TENANT_A.replace("\"192.168.178.0/24\", \"fd00:178::/64\"", "\"10.1.2.0/24\""),
        TENANT_B,
        "tenants/a.toml:7:10",
        "local prefix 10.1.2.0/24 overlaps 10.1.2.0/24 of tenant \"b\" (data centre): a host on this LAN could not reach those addresses",
    );
    assert_error(
        OPERATOR,
        &TENANT_A.replace(
            "\"192.168.178.0/24\", \"fd00:178::/64\"",
            "\"10.20.1.0/24\"",
        ),
        TENANT_B,
        "tenants/a.toml:7:10",
        "overlaps 10.20.0.0/16 of site b/hq",
    );
    assert_error(
        OPERATOR,
        &TENANT_A.replace(
            "\"192.168.178.0/24\", \"fd00:178::/64\"",
            "\"10.96.5.0/24\"",
        ),
        TENANT_B,
        "tenants/a.toml:7:10",
        "overlaps 10.96.0.0/12 of the enrollment service's tunnel pool",
    );
    // Two segments of one site with overlapping local prefixes.
    assert_error(
        OPERATOR,
        &TENANT_A.replace("\"192.168.100.0/24\"", "\"192.168.178.0/24\""),
        TENANT_B,
        "tenants/a.toml:14:10",
        "overlaps 192.168.178.0/24 of segment \"staff\" at the same site",
    );
    // The home office has no town-hall LAN; a site may not overlap the tunnel pool.
    assert_error(
        OPERATOR,
        &TENANT_A.replace(
            "[[rule]]",
            "[segments.home]\nkind = \"homeoffice\"\nlocal = [\"192.168.1.0/24\"]\n\n[[rule]]",
        ),
        TENANT_B,
        "tenants/a.toml:19:10",
        "it has no town-hall LAN, so it takes no local prefixes",
    );
    assert_error(
        &OPERATOR.replace(
            "prefixes = [\"10.20.0.0/16\"]",
            "prefixes = [\"10.100.0.0/16\"]",
        ),
        TENANT_A,
        &TENANT_B.replace("10.20.1.0/24", "10.100.1.0/24"),
        "operator.toml:16:13",
        "overlaps 10.96.0.0/12 of the enrollment service's tunnel pool",
    );
}
