//! Addresses: operator services, owners, overlaps, and where segments arrive (VLAN, DHCP).

use super::*;

/// The operator file's own services are checked like the tenants': they must lie in the data
/// centre, never in a site, a home-office pool or everywhere.
#[test]
fn operator_service_as_a_default_route_is_refused() {
    let op = OPERATOR
        .replace(
            r#"addresses = ["10.1.1.10", "fd00:1:1::10"]"#,
            r#"addresses = ["0.0.0.0/0", "fd00:1:1::10"]"#,
        )
        .replace(r#"export = ["a"]"#, r#"export = ["*"]"#);
    assert_error(
        &op,
        TENANT_A,
        TENANT_B,
        "operator.toml:18:14",
        "is a default route",
    );
}

#[test]
fn operator_service_inside_a_site_is_refused() {
    // A typo that puts a shared service into tenant a's staff segment.
    let op = OPERATOR.replace(
        r#"addresses = ["10.1.1.10", "fd00:1:1::10"]"#,
        r#"addresses = ["10.10.1.10", "fd00:1:1::10"]"#,
    );
    let (list, rendered) = errors(&op, TENANT_A, TENANT_B);
    let at_address: Vec<&String> = list
        .iter()
        .filter(|e| e.starts_with("operator.toml:18:14"))
        .collect();
    assert!(
        at_address
            .iter()
            .any(|e| e.contains("overlaps 10.10.0.0/16 of site a/hq")),
        "{rendered}"
    );
    assert!(
        at_address
            .iter()
            .any(|e| e.contains("outside any tenant's data-centre ranges")),
        "{rendered}"
    );
}

#[test]
fn operator_service_inside_a_home_office_pool_is_refused() {
    let op = OPERATOR.replace(
        r#"addresses = ["10.1.1.10", "fd00:1:1::10"]"#,
        r#"addresses = ["10.250.1.0/28", "fd00:1:1::10"]"#,
    );
    assert_error(
        &op,
        TENANT_A,
        TENANT_B,
        "operator.toml:18:14",
        "the home-office pool of tenant \"a\"",
    );
}

#[test]
fn owned_operator_service_lies_in_its_owners_data_centre() {
    // Owned by b, but at an address in a's data centre.
    let op = OPERATOR.replace("[services.dms]\n", "[services.dms]\nowner = \"b\"\n");
    assert_error(
        &op,
        TENANT_A,
        TENANT_B,
        "operator.toml:19:14",
        "outside its owner \"b\"'s data-centre ranges (10.1.2.0/24)",
    );
}

#[test]
fn one_service_address_has_one_owner() {
    // Tenant a declares its file server at the operator's DMS address.
    let a = TENANT_A.replace(
        r#"addresses = ["10.1.1.5"]"#,
        r#"addresses = ["10.1.1.10"]"#,
    );
    assert_error(
        OPERATOR,
        &a,
        TENANT_B,
        "tenants/a.toml:16:14",
        "10.1.1.10/32 of service \"files\" (tenant \"a\") overlaps 10.1.1.10/32 of service \"dms\" (the operator)",
    );
}

#[test]
fn every_overlap_is_reported_and_blamed_on_the_later_definition() {
    // Tenant "z" is written before tenant "b" but sorts after it: the overlap is b's fault, the
    // later one in reading order. A second, independent overlap is reported in the same run.
    let op = OPERATOR
        .replace(
            "[tenants.b]\n",
            "[tenants.z]\ndatacenter = [\"10.1.9.0/24\"]\n[tenants.z.sites.hq]\nprefixes = [\"10.90.0.0/16\"]\n\n[tenants.b]\n",
        )
        .replace(
            r#"datacenter = ["10.1.2.0/24"]"#,
            r#"datacenter = ["10.1.9.128/25"]"#,
        )
        .replace(r#"prefixes = ["10.20.0.0/16"]"#, r#"prefixes = ["10.90.4.0/24"]"#);
    let b = TENANT_B.replace("10.20.1.0/24", "10.90.4.0/25");
    let (list, rendered) = errors(&op, TENANT_A, &b);
    assert!(
        list.iter().any(|e| e.starts_with("operator.toml:18:15")
            && e.contains(
                "10.1.9.128/25 of tenant \"b\" (data centre) overlaps 10.1.9.0/24 of tenant \"z\""
            )),
        "{rendered}"
    );
    assert!(
        list.iter().any(|e| e.starts_with("operator.toml:20:13")
            && e.contains("10.90.4.0/24 of site b/hq overlaps 10.90.0.0/16 of site z/hq")),
        "{rendered}"
    );
}

/// Issue 13: every segment of a site with several says where it reaches the appliance (a VLAN
/// on the trunk or an untagged port), each VLAN or port once per site.
#[test]
fn segments_say_where_they_arrive() {
    let p = load(OPERATOR, TENANT_A, TENANT_B).unwrap();
    let binding = |tenant: &str, seg: &str| {
        let t = p.tenant_by_name(tenant).unwrap();
        let s = p.find_segment(seg, Some(t)).unwrap();
        p.segments[s.index()].binding.clone()
    };
    assert_eq!(binding("a", "staff"), Some(Binding::Vlan(10)));
    assert_eq!(binding("a", "guests"), Some(Binding::Vlan(100)));
    // A site's only segment may say nothing: it arrives untagged on the LAN port, as before.
    assert_eq!(binding("b", "staff"), Some(Binding::Lan));
    let with_home = TENANT_A.replace(
        "[services.files]",
        "[segments.home]\nkind = \"homeoffice\"\n\n[services.files]",
    );
    let p = load(OPERATOR, &with_home, TENANT_B).unwrap();
    let t = p.tenant_by_name("a").unwrap();
    let home = p.find_segment("home", Some(t)).unwrap();
    assert_eq!(p.segments[home.index()].binding, None);

    for bad in ["0", "4095", "5000", "-1"] {
        assert_error(
            OPERATOR,
            &TENANT_A.replace("vlan = 100", &format!("vlan = {bad}")),
            TENANT_B,
            "tenants/a.toml:13:8",
            &format!("VLAN id {bad} is outside 1-4094"),
        );
    }
    // Two segments of one site on one VLAN, or one port.
    assert_error(
        OPERATOR,
        &TENANT_A.replace("vlan = 100", "vlan = 10"),
        TENANT_B,
        "tenants/a.toml:13:8",
        "segment \"guests\" arrives on VLAN 10 like segment \"staff\"",
    );
    assert_error(
        OPERATOR,
        &TENANT_A
            .replace("vlan = 10\n", "port = \"eth2\"\n")
            .replace("vlan = 100", "port = \"eth2\""),
        TENANT_B,
        "tenants/a.toml:13:8",
        "arrives on port eth2 like segment \"staff\"",
    );
    // Untagged on a port and tagged on the trunk are two bindings, fine together.
    load(
        OPERATOR,
        &TENANT_A.replace("vlan = 10\n", "port = \"eth1\"\n"),
        TENANT_B,
    )
    .unwrap();
    // Several segments at a site: each must say where it arrives.
    assert_error(
        OPERATOR,
        &TENANT_A.replace("vlan = 100\n", ""),
        TENANT_B,
        "tenants/a.toml:9:11",
        "segment \"guests\" says neither vlan nor port: site \"hq\" has 2 segments",
    );
    assert_error(
        OPERATOR,
        &TENANT_A.replace("vlan = 100", "vlan = 100\nport = \"eth2\""),
        TENANT_B,
        "tenants/a.toml:14:8",
        "either tagged on the LAN trunk (vlan) or untagged on a port (port), not both",
    );
    assert_error(
        OPERATOR,
        &TENANT_A.replace("vlan = 100", "port = \"eth 2\""),
        TENANT_B,
        "tenants/a.toml:13:8",
        "port: interface name \"eth 2\" contains",
    );
    assert_error(
        OPERATOR,
        &TENANT_A.replace("vlan = 100", "vlan = \"100\""),
        TENANT_B,
        "tenants/a.toml:13:8",
        "`segments.guests.vlan` must be a whole number, not a string",
    );
    // The home-office segment arrives through the tunnel.
    assert_error(
        OPERATOR,
        &with_home.replace("kind = \"homeoffice\"", "kind = \"homeoffice\"\nvlan = 30"),
        TENANT_B,
        "tenants/a.toml:17:8",
        "it arrives through the tunnel, not on a LAN port",
    );
    // All of them at once, each at its place.
    let (list, rendered) = errors(
        OPERATOR,
        &TENANT_A.replace("vlan = 100", "vlan = 10"),
        &TENANT_B.replace(
            "prefixes = [\"10.20.1.0/24\"]",
            "prefixes = [\"10.20.1.0/24\"]\nvlan = 9999\n\n[segments.guests]\nkind = \"guest\"\nsite = \"hq\"\nprefixes = [\"10.20.100.0/24\"]",
        ),
    );
    assert_eq!(list.len(), 3, "{rendered}");
    assert!(rendered.contains("13 | vlan = 10"), "{rendered}");
}

/// Issue 13, part 2: DHCP per segment. Every segment of a site is served unless it says
/// `enabled = false`: the pool is its IPv4 prefixes minus the appliance's address and the
/// reserved ranges, DNS and lease time come from the segment, else the tenant, else the
/// operator; IPv6 /64s get router advertisements. Mistakes are errors at their place.
#[test]
fn segments_are_served_by_dhcp_as_the_fragment_says() {
    let op = OPERATOR.replace(
        "[[guardrail]]",
        "[dhcp]\ndns = [\"10.1.1.53\"]\nlease = \"1d\"\n\n[[guardrail]]",
    );
    let a = TENANT_A
        .replace(
            "vlan = 10\n",
            "vlan = 10\n[segments.staff.dhcp]\nreserved = [\"10.10.1.2-10.10.1.49\", \"10.10.1.200-10.10.1.254\"]\nhosts = [{ mac = \"52:54:00:AA:00:01\", address = \"10.10.1.20\", name = \"drucker-eg\" }]\n",
        )
        .replace(
            "vlan = 100\n",
            "vlan = 100\ndhcp = { dns = [\"9.9.9.9\"], lease = \"1h\" }\n",
        );
    let p = load(&op, &a, TENANT_B).unwrap_or_else(|e| panic!("{}", e.render()));
    let seg = |tenant: &str, name: &str| {
        let t = p.tenant_by_name(tenant).unwrap();
        &p.segments[p.find_segment(name, Some(t)).unwrap().index()]
    };
    let pools = |s: &komnet_policy::Segment| -> Vec<String> {
        s.dhcp_pools()
            .iter()
            .map(|(n, a, b)| format!("{n} {a}-{b}"))
            .collect()
    };
    let staff = seg("a", "staff");
    assert_eq!(pools(staff), ["10.10.1.0/24 10.10.1.50-10.10.1.199"]);
    let dhcp = staff.dhcp.as_ref().unwrap();
    assert_eq!(dhcp.dns, ["10.1.1.53".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(dhcp.lease_secs, 86_400);
    assert_eq!(dhcp.hosts[0].mac_text(), "52:54:00:aa:00:01");
    assert_eq!(dhcp.hosts[0].name.as_deref(), Some("drucker-eg"));
    assert_eq!(staff.ra_prefixes()[0].to_string(), "fd00:10:0:1::/64");
    let guests = seg("a", "guests").dhcp.as_ref().unwrap();
    assert_eq!(guests.dns, ["9.9.9.9".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(guests.lease_secs, 3600);
    assert_eq!(
        pools(seg("a", "guests")),
        ["10.10.100.0/24 10.10.100.2-10.10.100.254"]
    );
    // Tenant b says nothing: the operator's defaults, the whole prefix but the gateway.
    let b = seg("b", "staff").dhcp.as_ref().unwrap();
    assert_eq!((b.dns.len(), b.lease_secs), (1, 86_400));
    // The guests' DNS server is out of their reach (guest isolation): a warning at the list.
    let warned: Vec<String> = p
        .warnings
        .iter()
        .map(|d| {
            format!(
                "{}: {}",
                p.sources.position(d.loc.as_ref().unwrap()),
                d.message
            )
        })
        .collect();
    assert!(
        warned.iter().any(|w| w.starts_with("tenants/a.toml:17:17")
            && w.contains("segment a/guests is handed DNS server 9.9.9.9 by DHCP, but no rule lets them reach")),
        "{warned:#?}"
    );
    // The operator's default for everyone: one warning for all segments that miss it.
    assert!(
        warned.iter().any(|w| w.starts_with("operator.toml:23:8")
            && w.contains("segments a/staff, b/staff are handed DNS server 10.1.1.53")),
        "{warned:#?}"
    );
    assert_eq!(
        warned.iter().filter(|w| w.contains("DNS server")).count(),
        2,
        "{warned:#?}"
    );
    // A tenant's [dhcp] over the operator's; a segment that is off has none.
    let p = load(
        &op,
        &TENANT_A
            .replace(
                "tenant = \"a\"\n",
                "tenant = \"a\"\n[dhcp]\ndns = []\nlease = \"8h\"\n",
            )
            .replace("vlan = 100\n", "vlan = 100\ndhcp = { enabled = false }\n"),
        TENANT_B,
    )
    .unwrap_or_else(|e| panic!("{}", e.render()));
    let t = p.tenant_by_name("a").unwrap();
    let staff = &p.segments[p.find_segment("staff", Some(t)).unwrap().index()];
    assert!(staff.dhcp.as_ref().unwrap().dns.is_empty());
    assert_eq!(staff.dhcp.as_ref().unwrap().lease_secs, 8 * 3600);
    let guests = &p.segments[p.find_segment("guests", Some(t)).unwrap().index()];
    assert!(guests.dhcp.is_none() && guests.dhcp_pools().is_empty());

    // Mistakes, each at its place.
    let staff_dhcp = |body: &str| {
        TENANT_A.replace(
            "vlan = 10\n",
            &format!("vlan = 10\n[segments.staff.dhcp]\n{body}\n"),
        )
    };
    for (body, at, needle) in [
        ("reserved = [\"10.10.2.1-10.10.2.9\"]", "tenants/a.toml:9:13", "is not inside one IPv4 prefix of segment \"staff\""),
        ("reserved = [\"10.10.1.9-10.10.1.2\"]", "tenants/a.toml:9:13", "ends before it starts"),
        ("reserved = [\"10.10.1.x\"]", "tenants/a.toml:9:13", "is not an IPv4 address or range"),
        ("hosts = [{ mac = \"52:54:00:aa:00\", address = \"10.10.1.20\" }]", "tenants/a.toml:9:18", "is not six hex bytes"),
        ("hosts = [{ mac = \"52:54:00:aa:00:01\", address = \"10.10.9.20\" }]", "tenants/a.toml:9:49", "is outside segment \"staff\""),
        ("hosts = [{ mac = \"52:54:00:aa:00:01\", address = \"10.10.1.1\" }]", "tenants/a.toml:9:49", "the appliance's own address there"),
        ("hosts = [{ mac = \"52:54:00:aa:00:01\", address = \"10.10.1.255\" }]", "tenants/a.toml:9:49", "the broadcast address"),
        ("hosts = [{ mac = \"52:54:00:aa:00:01\", address = \"fd00:10:0:1::9\" }]", "tenants/a.toml:9:49", "reservations are for DHCPv4"),
        ("hosts = [{ mac = \"52:54:00:aa:00:01\", address = \"10.10.1.20\" }, { mac = \"52:54:00:aa:00:01\", address = \"10.10.1.21\" }]", "tenants/a.toml:9:73", "this MAC address has a reservation already"),
        ("hosts = [{ mac = \"52:54:00:aa:00:01\", address = \"10.10.1.20\" }, { mac = \"52:54:00:aa:00:02\", address = \"10.10.1.20\" }]", "tenants/a.toml:9:104", "10.10.1.20 is reserved for another host already"),
        ("hosts = [{ mac = \"52:54:00:aa:00:01\", address = \"10.10.1.20\", name = \"drucker eg\" }]", "tenants/a.toml:9:70", "host name \"drucker eg\" is not valid"),
        ("dns = [\"10.1.1.53\", \"dns.example\"]", "tenants/a.toml:9:21", "is not an IP address"),
        ("lease = \"30s\"", "tenants/a.toml:9:9", "a lease lasts from 2m to 365d"),
        ("lease = \"12\"", "tenants/a.toml:9:9", "needs a unit"),
        ("colour = \"blue\"", "tenants/a.toml:9:1", "unknown key `colour` in `segments.staff.dhcp`"),
    ] {
        assert_error(&op, &staff_dhcp(body), TENANT_B, at, needle);
    }
    // Nothing left to hand out, written out: an error; the home office has no LAN.
    let tiny = TENANT_A
        .replace(
            "[\"10.10.1.0/24\", \"fd00:10:0:1::/64\"]",
            "[\"10.10.1.0/30\"]",
        )
        .replace(
            "vlan = 10\n",
            "vlan = 10\ndhcp = { reserved = [\"10.10.1.2\"] }\n",
        );
    assert_error(
        &op,
        &tiny,
        TENANT_B,
        "tenants/a.toml:8:8",
        "segment \"staff\" has nothing to hand out",
    );
    let home = TENANT_A.replace(
        "[services.files]",
        "[segments.home]\nkind = \"homeoffice\"\ndhcp = { lease = \"1h\" }\n\n[services.files]",
    );
    assert_error(
        &op,
        &home,
        TENANT_B,
        "tenants/a.toml:17:8",
        "the home-office segment has no LAN",
    );
    assert_error(
        &op.replace("lease = \"1d\"", "lease = \"1y\""),
        TENANT_A,
        TENANT_B,
        "operator.toml:24:9",
        "unit must be s, m, h or d",
    );
}
