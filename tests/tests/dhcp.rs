//! DHCP on the town hall's LAN (issue 13, part 2), end to end: the spoke writes the DHCP
//! server's configuration from the policy, dnsmasq runs with it as `komnet-dhcp.service` runs
//! it (the unit's command line and capabilities, restarted on every change like
//! `komnet-dhcp.path` does), and real DHCP clients (busybox udhcpc) and SLAAC in the LAN
//! namespaces get their addresses from their own segment and reach what the policy allows.
//! Needs root; never skipped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use komnet_netns_tests::dhcp::{obtain_lease, DhcpServer, Lease};
use komnet_netns_tests::district::{copy_policy, destination, edit_file, District, Options, DMS};
use komnet_netns_tests::{require_root_and_tools, wait_until, Netns};

fn netprobe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netprobe"))
}

/// The district's policy as `version`, with IPv6 on Nohfelden's staff LAN and the DHCP settings
/// of `dhcp` appended to Nohfelden's fragment (and a DNS server in its data centre that the
/// staff may use).
fn policy_with_dhcp(district: &District, version: u64, dhcp: &str) -> PathBuf {
    let dir = district.path(&format!("policy-dhcp-v{version}"));
    copy_policy(&dir, version).expect("copy policy");
    edit_file(
        &dir.join("operator.toml"),
        "prefixes = [\"10.30.0.0/16\"]",
        "prefixes = [\"10.30.0.0/16\", \"fd00:30::/48\"]",
    )
    .expect("operator.toml");
    let noh = dir.join("tenants/nohfelden.toml");
    edit_file(
        &noh,
        "prefixes = [\"10.30.1.0/24\"]",
        "prefixes = [\"10.30.1.0/24\", \"fd00:30:0:1::/64\"]",
    )
    .expect("nohfelden.toml");
    let mut text = std::fs::read_to_string(&noh).expect("nohfelden.toml");
    text.push_str(
        "\n[services.dns]\ndescription = \"Nameserver der Gemeinde\"\naddresses = [\"10.1.10.53\"]\nports = [\"udp/53\", \"tcp/53\"]\n\n\
         [[rule]]\nname = \"staff-dns\"\nfrom = [\"verwaltung\"]\nto = [\"dns\"]\n\n",
    );
    text.push_str(dhcp);
    std::fs::write(&noh, text).expect("write nohfelden.toml");
    dir
}

/// Takes the static address and route off `dev` in `ns` (the district's LAN hosts start with
/// one), so that what it has afterwards came from DHCP or SLAAC.
fn unconfigure(ns: &Netns, dev: &str) {
    ns.ip(&["addr", "flush", "dev", dev, "scope", "global"])
        .expect("flush addresses");
    let _ = ns.ip(&["route", "flush", "dev", dev]);
}

fn in_range(lease: &Lease, first: &str, last: &str) -> bool {
    let a: Ipv4Addr = lease.address.parse().expect("address");
    let (f, l): (Ipv4Addr, Ipv4Addr) = (first.parse().expect("first"), last.parse().expect("last"));
    a >= f && a <= l
}

fn wait_for_server(server: &DhcpServer, conf: &Path, starts: u32) {
    wait_until(
        &format!("dnsmasq start number {starts} with {}", conf.display()),
        Duration::from_secs(20),
        || Ok((server.starts() >= starts && server.pid().is_some()).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
}

#[test]
fn town_hall_hosts_get_addresses_from_their_own_segment_by_dhcp_and_slaac() {
    require_root_and_tools();
    let district = District::start(&netprobe(), Options::default()).expect("district");
    let mut district = district;
    let run_dir = district.path("dhcp-run");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let conf = run_dir.join("dnsmasq.conf");
    let mut appliance = district
        .add_appliance_spoke_with(
            "dhcp",
            30,
            42,
            &format!("dhcp_config = \"{}\"\n", conf.display()),
        )
        .expect("appliance spoke");
    let server = DhcpServer::start(&appliance.gw, &conf, &run_dir).expect("DHCP server");

    // Version 2: the staff LAN has printers and servers at .2-.99 and one reservation; the
    // guests get no DNS server (they may reach none) and short leases.
    let v2 = policy_with_dhcp(
        &district,
        2,
        "[dhcp]\ndns = [\"10.1.10.53\"]\n\n\
         [segments.verwaltung.dhcp]\nreserved = [\"10.30.1.2-10.30.1.99\"]\n\
         hosts = [{ mac = \"52:54:00:0d:0c:01\", address = \"10.30.1.20\", name = \"drucker-eg\" }]\n\n\
         [segments.gaeste.dhcp]\ndns = []\nlease = \"1h\"\n",
    );
    district
        .publish_policy(&v2, "policy-dhcp-v2.bundle")
        .expect("publish v2");
    let token = district
        .token("nohfelden", "rathaus", "spoke")
        .expect("token");
    appliance.deliver_bootstrap(&token).expect("bootstrap");
    appliance
        .spoke
        .wait_running(2, Duration::from_secs(30))
        .expect("version 2 in force");
    wait_for_server(&server, &conf, 1);
    let written = std::fs::read_to_string(&conf).expect("the DHCP configuration");
    assert!(
        written.contains("interface=eth1\n")
            && written.contains("dhcp-range=set:r2,10.30.1.100,10.30.1.254,255.255.255.0,43200\n")
            && written.contains("dhcp-range=set:r3,fd00:30:0:1::,ra-only,64,43200\n")
            && written.contains("interface=guest0\n"),
        "{written}"
    );

    // A staff PC: a lease from the pool, the appliance as router, the tenant's DNS server;
    // with it, the DMS through the tunnel.
    let host = &appliance.host;
    unconfigure(host, "eth0");
    host.exec(&["sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=1"])
        .expect("accept_ra");
    let staff =
        obtain_lease(host, "eth0", &run_dir).unwrap_or_else(|e| panic!("{e:#}\n{}", server.log()));
    assert!(in_range(&staff, "10.30.1.100", "10.30.1.254"), "{staff:?}");
    assert_eq!(
        (
            staff.prefix_len,
            staff.router.as_str(),
            staff.dns.as_str(),
            staff.lease_secs
        ),
        (24, "10.30.1.1", "10.1.10.53", 43200),
        "{staff:?}"
    );
    assert!(
        district.reaches(host, &staff.address, destination(DMS)),
        "the staff PC with its DHCP lease {} does not reach the DMS",
        staff.address
    );
    // IPv6: the staff LAN's /64 by SLAAC from the appliance's router advertisements.
    wait_until(
        "a SLAAC address on the staff PC",
        Duration::from_secs(20),
        || {
            let out = host.ip(&["-6", "-brief", "addr", "show", "dev", "eth0"])?;
            Ok(out.contains("fd00:30:0:1:").then_some(out))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));

    // A guest: the guest range, no DNS server, an hour; the DMS stays out of reach.
    let guest = &appliance.guest;
    unconfigure(guest, "eth0");
    let lease =
        obtain_lease(guest, "eth0", &run_dir).unwrap_or_else(|e| panic!("{e:#}\n{}", server.log()));
    assert!(
        in_range(&lease, "10.30.100.2", "10.30.100.254"),
        "{lease:?}"
    );
    assert_eq!(
        (lease.router.as_str(), lease.dns.as_str(), lease.lease_secs),
        ("10.30.100.1", "", 3600),
        "{lease:?}"
    );
    assert!(!district.reaches(guest, &lease.address, destination(DMS)));

    // The printer, by its MAC: its reserved address and name.
    host.ip(&["link", "set", "eth0", "address", "52:54:00:0d:0c:01"])
        .expect("MAC");
    unconfigure(host, "eth0");
    let printer =
        obtain_lease(host, "eth0", &run_dir).unwrap_or_else(|e| panic!("{e:#}\n{}", server.log()));
    assert_eq!(
        (printer.address.as_str(), printer.hostname.as_str()),
        ("10.30.1.20", "drucker-eg"),
        "{printer:?}"
    );
    let status = appliance.spoke.status_text().expect("status");
    assert!(
        status.contains("dhcp: nohfelden/verwaltung on eth1: 10.30.1.100-10.30.1.254, RA fd00:30:0:1::/64, 1 reserved by MAC\n")
            && status.contains("dhcp: nohfelden/gaeste on guest0: 10.30.100.2-10.30.100.254\n"),
        "{status}"
    );
    let leases = std::fs::read_to_string(&server.leases).expect("lease file");
    assert!(
        leases.contains(&staff.address)
            && leases.contains("52:54:00:0d:0c:01 10.30.1.20 drucker-eg"),
        "{leases}"
    );

    // The DHCP server dies: nothing opens (the firewall is the gateway's), and it comes back
    // with its leases.
    let ruleset = appliance
        .gw
        .exec(&["nft", "-s", "list", "table", "inet", "komnet"])
        .expect("nft");
    let pid = server.pid().expect("dnsmasq runs");
    komnet_netns_tests::run(
        std::process::Command::new("kill").args(["-KILL", &pid.to_string()]),
        komnet_netns_tests::COMMAND_TIMEOUT,
    )
    .expect("kill");
    assert!(!district.reaches(guest, &lease.address, destination(DMS)));
    assert_eq!(
        appliance
            .gw
            .exec(&["nft", "-s", "list", "table", "inet", "komnet"])
            .expect("nft"),
        ruleset
    );
    wait_for_server(&server, &conf, 2);

    // Version 3 narrows the staff pool and switches DHCP off for the guests: the file changes,
    // the server restarts with it (the leases stay), a new staff PC gets an address from the
    // new pool, a guest none. Version 4 changes nothing for DHCP: no restart.
    let v3 = policy_with_dhcp(
        &district,
        3,
        "[dhcp]\ndns = [\"10.1.10.53\"]\n\n\
         [segments.verwaltung.dhcp]\nreserved = [\"10.30.1.2-10.30.1.199\"]\n\n\
         [segments.gaeste.dhcp]\nenabled = false\n",
    );
    district
        .publish_policy(&v3, "policy-dhcp-v3.bundle")
        .expect("publish v3");
    appliance
        .spoke
        .wait_running(3, Duration::from_secs(20))
        .expect("version 3 in force");
    wait_for_server(&server, &conf, 3);
    host.ip(&["link", "set", "eth0", "address", "52:54:00:0d:0c:02"])
        .expect("MAC");
    unconfigure(host, "eth0");
    let narrowed =
        obtain_lease(host, "eth0", &run_dir).unwrap_or_else(|e| panic!("{e:#}\n{}", server.log()));
    assert!(
        in_range(&narrowed, "10.30.1.200", "10.30.1.254"),
        "{narrowed:?}"
    );
    assert!(district.reaches(host, &narrowed.address, destination(DMS)));
    unconfigure(guest, "eth0");
    assert!(
        obtain_lease(guest, "eth0", &run_dir).is_err(),
        "a guest got a lease with DHCP off on the guest WLAN"
    );
    let leases = std::fs::read_to_string(&server.leases).expect("lease file");
    assert!(leases.contains(&staff.address), "{leases}");

    let starts = server.starts();
    let v4 = policy_with_dhcp(
        &district,
        4,
        "[dhcp]\ndns = [\"10.1.10.53\"]\n\n\
         [segments.verwaltung.dhcp]\nreserved = [\"10.30.1.2-10.30.1.199\"]\n\n\
         [segments.gaeste.dhcp]\nenabled = false\n\n\
         [[expect]]\nfrom = \"verwaltung\"\nto = \"dns:udp/53\"\nverdict = \"allow\"\n",
    );
    district
        .publish_policy(&v4, "policy-dhcp-v4.bundle")
        .expect("publish v4");
    appliance
        .spoke
        .wait_running(4, Duration::from_secs(20))
        .expect("version 4 in force");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.starts(),
        starts,
        "a policy version that changes nothing for DHCP restarted it"
    );
}
