//! Two town halls with the same LAN (issue 13, part 3): Nohfelden's and Tholey's staff both use
//! 192.168.178.0/24 (the host 192.168.178.10 exists in both), the district knows them as
//! 10.30.1.0/24 and 10.40.1.0/24. Each appliance translates 1:1 at the tunnel: both PCs reach the
//! DMS and their own file server, the data centre sees only the unique addresses, and one
//! commune reaches the other's PC only where a rule says so. Nohfelden's PC gets its local
//! address by DHCP. Needs root; never skipped.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use komnet_netns_tests::dhcp::{obtain_lease, DhcpServer};
use komnet_netns_tests::district::{
    copy_policy, destination, edit_file, Destination, District, Options, DMS,
};
use komnet_netns_tests::{require_root_and_tools, SeenBySource};

fn netprobe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netprobe"))
}

#[test]
fn two_town_halls_with_the_same_lan_reach_the_dc_by_their_unique_addresses() {
    require_root_and_tools();
    let mut district = District::start(&netprobe(), Options::default()).expect("district");
    let run_dir = district.path("noh-run");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let conf = run_dir.join("dnsmasq.conf");
    let mut noh = district
        .add_appliance_spoke_with(
            "noh",
            30,
            43,
            &format!("dhcp_config = \"{}\"\n", conf.display()),
        )
        .expect("Nohfelden's appliance");
    let mut tho = district
        .add_appliance_spoke_with("tho", 40, 44, "")
        .expect("Tholey's appliance");
    let server = DhcpServer::start(&noh.gw, &conf, &run_dir).expect("DHCP server");

    // Version 2: both staff LANs are 192.168.178.0/24 at the town hall; Nohfelden's PC has a
    // reservation for .10; Tholey offers a terminal on its PC (10.40.1.10, tcp/8080) to
    // Nohfelden's staff.
    let v2 = district.path("policy-local-v2");
    copy_policy(&v2, 2).expect("copy");
    for (tenant, unique) in [("nohfelden", "10.30.1.0/24"), ("tholey", "10.40.1.0/24")] {
        edit_file(
            &v2.join(format!("tenants/{tenant}.toml")),
            &format!("prefixes = [\"{unique}\"]\n"),
            &format!("prefixes = [\"{unique}\"]\nlocal = [\"192.168.178.0/24\"]\n"),
        )
        .expect("local prefix");
    }
    let noh_file = v2.join("tenants/nohfelden.toml");
    let mut text = std::fs::read_to_string(&noh_file).expect("read");
    text.push_str(
        "\n[[rule]]\nname = \"tholey-terminal\"\nfrom = [\"verwaltung\"]\nto = [\"tholey/terminal\"]\n\n\
         [segments.verwaltung.dhcp]\nhosts = [{ mac = \"52:54:00:0d:0c:10\", address = \"192.168.178.10\" }]\n",
    );
    std::fs::write(&noh_file, text).expect("write");
    let tho_file = v2.join("tenants/tholey.toml");
    let mut text = std::fs::read_to_string(&tho_file).expect("read");
    text.push_str(
        "\n[services.terminal]\ndescription = \"Zeiterfassung am PC der Verwaltung\"\naddresses = [\"10.40.1.10\"]\nports = [\"tcp/8080\"]\nexport = [\"nohfelden\"]\n",
    );
    std::fs::write(&tho_file, text).expect("write");
    district
        .publish_policy(&v2, "policy-local-v2.bundle")
        .expect("publish v2");
    for (spoke, tenant) in [(&mut noh, "nohfelden"), (&mut tho, "tholey")] {
        let token = district.token(tenant, "rathaus", "spoke").expect("token");
        spoke.deliver_bootstrap(&token).expect("bootstrap");
    }
    for spoke in [&mut noh, &mut tho] {
        spoke
            .spoke
            .wait_running(2, Duration::from_secs(30))
            .expect("version 2 in force");
    }
    // Each appliance is the LAN's 192.168.178.1.
    assert_eq!(noh.lan_addresses().expect("lan"), ["192.168.178.1/24"]);
    assert_eq!(tho.lan_addresses().expect("lan"), ["192.168.178.1/24"]);

    // Nohfelden's PC by DHCP (its reservation), Tholey's by hand: the same address twice.
    noh.host
        .ip(&["addr", "flush", "dev", "eth0", "scope", "global"])
        .expect("flush");
    noh.host
        .ip(&["link", "set", "eth0", "address", "52:54:00:0d:0c:10"])
        .expect("MAC");
    let lease = obtain_lease(&noh.host, "eth0", &run_dir)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", server.log()));
    assert_eq!(
        (lease.address.as_str(), lease.router.as_str()),
        ("192.168.178.10", "192.168.178.1"),
        "{lease:?}"
    );
    tho.host
        .ip(&["addr", "flush", "dev", "eth0", "scope", "global"])
        .expect("flush");
    tho.host
        .ip(&["addr", "add", "192.168.178.10/24", "dev", "eth0"])
        .expect("address");
    tho.host
        .ip(&["route", "replace", "default", "via", "192.168.178.1"])
        .expect("route");

    // What the data centre receives, by source.
    let seen = SeenBySource::install(
        &district.srv,
        "komnet_test_seen",
        &["10.30.1.10", "10.40.1.10", "192.168.178.0/24"],
    )
    .expect("counters in the data centre");

    let (dms, noh_files, tho_files) = (
        destination(DMS),
        destination("Dateiserver Nohfelden"),
        destination("Dateiserver Tholey"),
    );
    let local = "192.168.178.10";
    assert!(
        district.reaches(&noh.host, local, dms),
        "Nohfelden's PC -> DMS"
    );
    assert!(
        district.reaches(&tho.host, local, dms),
        "Tholey's PC -> DMS"
    );
    assert!(district.reaches(&noh.host, local, noh_files));
    assert!(district.reaches(&tho.host, local, tho_files));
    assert!(!district.reaches(&noh.host, local, tho_files));
    assert!(!district.reaches(&tho.host, local, noh_files));
    let counts = seen.packets().expect("counters");
    assert!(
        counts[0] > 0 && counts[1] > 0 && counts[2] == 0,
        "the data centre saw {counts:?} packets from 10.30.1.10, 10.40.1.10, 192.168.178.0/24"
    );

    // Between the two town halls, by the unique addresses and only where a rule says so:
    // Nohfelden's staff reach Tholey's terminal, Tholey's staff do not reach Nohfelden's PC.
    let _terminal = district
        .serve_tcp(&tho.host, "0.0.0.0", 8080)
        .expect("netprobe serve");
    let _other = district
        .serve_tcp(&noh.host, "0.0.0.0", 8080)
        .expect("netprobe serve");
    let port = |addr: &str| Destination {
        label: "8080",
        addr: addr.parse().expect("address"),
        port: 8080,
    };
    assert!(
        district.reaches(&noh.host, local, port("10.40.1.10")),
        "Nohfelden's PC does not reach Tholey's terminal at 10.40.1.10"
    );
    assert!(
        !district.reaches(&tho.host, local, port("10.30.1.10")),
        "Tholey's PC reached Nohfelden's PC"
    );
    let nat = tho
        .gw
        .exec(&["nft", "list", "table", "inet", "komnet_nat"])
        .expect("komnet_nat");
    assert!(
        nat.contains("dnat ip prefix to ip daddr map { 10.40.1.0/24 : 192.168.178.0/24 }"),
        "{nat}"
    );
    // The policy explains a local address at a named site.
    let out = Command::new(komnet_netns_tests::komnet_cli_binary().expect("komnet"))
        .args(["policy", "explain"])
        .arg(&v2)
        .args([
            "--from",
            local,
            "--to",
            "dms:tcp/443",
            "--site",
            "tholey/rathaus",
        ])
        .output()
        .expect("komnet policy explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("IPv4 10.40.1.10 -> 10.0.1.10:tcp/443: allow")
            && text.contains("192.168.178.10 at tholey/rathaus is 10.40.1.10 in the district"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
