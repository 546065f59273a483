//! A town hall's segments on VLANs of one trunk (issue 13, part 4): a policy change that moves
//! a segment to another VLAN takes effect without restarting the appliance. The spoke is set
//! up like the image (LAN port `eth1`, the trunk of a switch namespace), its DHCP server is
//! dnsmasq as `komnet-dhcp.service` runs it, the staff PC a real DHCP client (busybox udhcpc).
//! Needs root; never skipped.
//!
//! On a kernel with 802.1Q the VLANs travel tagged on the trunk and the spoke makes and
//! removes `eth1.10`, `eth1.20` itself; without it the switch hands the spoke one link per VLAN
//! under the same names (see `Switch`), and everything above layer 2 is the same.

use std::path::{Path, PathBuf};
use std::time::Duration;

use komnet_netns_tests::dhcp::{obtain_lease, DhcpServer};
use komnet_netns_tests::district::{copy_policy, destination, edit_file, District, Options, DMS};
use komnet_netns_tests::{require_root_and_tools, wait_until, Netns};

fn netprobe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netprobe"))
}

/// The district's policy as `version`, with Nohfelden's town hall on a trunk: the staff on
/// VLAN `staff_vlan`, the guests on VLAN 100.
fn policy_on_vlans(district: &District, version: u64, staff_vlan: u16) -> PathBuf {
    let dir = district.path(&format!("policy-vlan-v{version}"));
    copy_policy(&dir, version).expect("copy policy");
    let noh = dir.join("tenants/nohfelden.toml");
    edit_file(&noh, "port = \"eth1\"", &format!("vlan = {staff_vlan}")).expect("staff VLAN");
    edit_file(&noh, "port = \"guest0\"", "vlan = 100").expect("guest VLAN");
    dir
}

/// What the spoke's nftables take as a LAN segment's packets (chain `lan_source`).
fn lan_source(gw: &Netns) -> String {
    gw.exec(&["nft", "list", "chain", "inet", "komnet", "lan_source"])
        .expect("nft list chain lan_source")
}

/// The VLAN id of the spoke's interface `dev` if it is a VLAN interface on `eth1`.
fn vlan_id(gw: &Netns, dev: &str) -> Option<u64> {
    let out = gw.ip(&["-j", "-d", "link", "show", "dev", dev]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let link = &v[0];
    if link["link"] != "eth1" {
        return None;
    }
    link["linkinfo"]["info_data"]["id"].as_u64()
}

fn wait_for_dhcp(server: &DhcpServer, conf: &Path, wanted: &str, starts: u32) {
    wait_until(
        &format!(
            "dnsmasq (start {starts}) with {wanted} in {}",
            conf.display()
        ),
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(conf).unwrap_or_default();
            Ok(
                (text.contains(wanted) && server.starts() >= starts && server.pid().is_some())
                    .then_some(()),
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
}

#[test]
fn a_segment_moved_to_another_vlan_is_served_there_without_a_restart() {
    require_root_and_tools();
    let mut district = District::start(&netprobe(), Options::default()).expect("district");
    let run_dir = district.path("vlan-run");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let conf = run_dir.join("dnsmasq.conf");
    let mut appliance = district
        .add_trunk_appliance("vl", 47, &format!("dhcp_config = \"{}\"\n", conf.display()))
        .expect("appliance on a trunk");
    let server = DhcpServer::start(&appliance.gw, &conf, &run_dir).expect("DHCP server");
    let staff = Netns::new("vl-staff").expect("staff PC");
    let staff_port = appliance
        .switch
        .access_port(&staff, Some(10))
        .expect("staff port");
    let guest = Netns::new("vl-guest").expect("guest PC");
    appliance
        .switch
        .access_port(&guest, Some(100))
        .expect("guest port");

    // Version 2: staff on VLAN 10, guests on VLAN 100. The appliance enrols as Nohfelden's.
    let v2 = policy_on_vlans(&district, 2, 10);
    district
        .publish_policy(&v2, "policy-vlan-v2.bundle")
        .expect("publish v2");
    let token = district
        .token("nohfelden", "rathaus", "spoke")
        .expect("token");
    appliance.deliver_bootstrap(&token).expect("bootstrap");
    appliance
        .spoke
        .wait_running(2, Duration::from_secs(30))
        .expect("version 2 in force");
    assert_eq!(
        appliance.addresses_on("eth1.10").expect("eth1.10"),
        ["10.30.1.1/24"]
    );
    assert_eq!(
        appliance.addresses_on("eth1.100").expect("eth1.100"),
        ["10.30.100.1/24"]
    );
    wait_for_dhcp(&server, &conf, "interface=eth1.10\n", 1);
    let lease = obtain_lease(&staff, "eth0", &run_dir)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", server.log()));
    assert_eq!(lease.router, "10.30.1.1", "{lease:?}");
    assert!(
        district.reaches(&staff, &lease.address, destination(DMS)),
        "the staff PC on VLAN 10 ({}) does not reach the DMS",
        lease.address
    );
    let pid = appliance.spoke.pid();

    // The staff's switch ports move to VLAN 20 before the policy says so: nothing passes.
    appliance
        .switch
        .move_port(staff_port, Some(10), Some(20))
        .expect("re-patch");
    assert!(
        !district.reaches(&staff, &lease.address, destination(DMS)),
        "the staff PC reached the DMS on VLAN 20, which no policy names"
    );

    // Version 3 moves the staff to VLAN 20: the gateway address, the firewall's idea of where
    // the staff arrive and the DHCP server follow, in the running process.
    let v3 = policy_on_vlans(&district, 3, 20);
    district
        .publish_policy(&v3, "policy-vlan-v3.bundle")
        .expect("publish v3");
    appliance
        .spoke
        .wait_running(3, Duration::from_secs(20))
        .expect("version 3 in force");
    wait_until(
        "the staff's gateway address to move to eth1.20",
        Duration::from_secs(10),
        || {
            Ok((appliance.addresses_on("eth1.20")? == ["10.30.1.1/24"]
                && appliance
                    .addresses_on("eth1.10")
                    .map_or(true, |a| a.is_empty()))
            .then_some(()))
        },
    )
    .expect("address moved");
    assert_eq!(appliance.spoke.pid(), pid, "the spoke restarted");
    if appliance.switch.tagged() {
        // The spoke made the new VLAN interface and removed the one no segment uses.
        assert_eq!(vlan_id(&appliance.gw, "eth1.20"), Some(20));
        assert!(
            appliance
                .gw
                .ip(&["link", "show", "dev", "eth1.10"])
                .is_err(),
            "eth1.10 is still there"
        );
    }
    let chain = lan_source(&appliance.gw);
    assert!(
        chain.contains("iifname \"eth1.20\" ip saddr @seg_nohfelden_verwaltung_v4 return")
            && !chain.contains("\"eth1.10\""),
        "{chain}"
    );
    wait_for_dhcp(&server, &conf, "interface=eth1.20\n", 2);
    let written = std::fs::read_to_string(&conf).expect("DHCP configuration");
    assert!(!written.contains("interface=eth1.10\n"), "{written}");
    staff
        .ip(&["addr", "flush", "dev", "eth0", "scope", "global"])
        .expect("flush");
    let lease = obtain_lease(&staff, "eth0", &run_dir)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", server.log()));
    assert_eq!(lease.router, "10.30.1.1", "{lease:?}");
    assert!(
        district.reaches(&staff, &lease.address, destination(DMS)),
        "the staff PC on VLAN 20 ({}) does not reach the DMS",
        lease.address
    );

    // A PC left on VLAN 10 with a staff address gets nothing any more.
    let left = Netns::new("vl-left").expect("left-behind PC");
    appliance
        .switch
        .access_port(&left, Some(10))
        .expect("VLAN 10 port");
    left.ip(&["addr", "add", "10.30.1.77/24", "dev", "eth0"])
        .expect("address");
    left.ip(&["route", "add", "default", "via", "10.30.1.1"])
        .expect("route");
    assert!(
        !district.reaches(&left, "10.30.1.77", destination(DMS)),
        "a PC on VLAN 10, which the policy no longer names, reached the DMS"
    );
    assert_eq!(appliance.spoke.pid(), pid, "the spoke restarted");
}
