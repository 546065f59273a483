//! The district end to end (`komnet_netns_tests::district`): the demo's scenario asserted
//! cell by cell, revocation time, spoofing, restarts, live policy updates, refused bundles,
//! fail-closed after `kill -9`, and failover between two hubs. Needs root; never skipped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use komnet_netns_tests::district::{
    destination, render_matrix, Destination, District, Options, Source, DESTINATIONS, DMS,
};
use komnet_netns_tests::{require_root_and_tools, run, wait_until, COMMAND_TIMEOUT};
use komnet_policy::Origin;

fn netprobe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netprobe"))
}

fn counter(status: &serde_json::Value, group: &str, key: &str) -> u64 {
    status[group][key].as_u64().unwrap_or(0)
}

/// The WireGuard key an appliance's enrollment file (`DATA_DIR/<file>`) was issued for.
fn enrolled_key(data_dir: &Path, file: &str) -> String {
    let text = std::fs::read_to_string(data_dir.join(file)).expect("enrollment file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("enrollment JSON");
    v["identity"]["wg_public_key"]
        .as_str()
        .expect("key")
        .to_owned()
}

/// The keys a hub's status lists for tenant/site.
fn hub_keys(status: &serde_json::Value, tenant: &str, site: &str) -> Vec<String> {
    status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter(|p| p["tenant"] == tenant && p["site"] == site)
        .filter_map(|p| p["public_key"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn district_matrix_revocation_spoofing_and_homeoffice() {
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: true,
            ..Options::default()
        },
    )
    .expect("district");
    let rows = district.matrix().expect("matrix");
    let table = render_matrix(&rows);
    assert_eq!(rows.len(), 15, "{table}");
    let wrong: Vec<String> = rows
        .iter()
        .filter(|(_, _, e, o)| e != o)
        .map(|(s, d, e, o)| format!("{} -> {}: policy {e}, observed {o}", s.label, d.label))
        .collect();
    assert!(wrong.is_empty(), "{}\n{table}", wrong.join("\n"));
    // The matrix is not trivially all-deny or all-allow.
    assert!(
        rows.iter().any(|r| r.2) && rows.iter().any(|r| !r.2),
        "{table}"
    );

    // The home-office worker reaches its own commune's file server and the DMS, not Tholey's.
    let ho = district
        .sources()
        .into_iter()
        .find(|s| s.label.starts_with("Home office"))
        .expect("home office source");
    let seen = district
        .probe(
            &ho,
            &[
                destination("Dateiserver Nohfelden"),
                destination(DMS),
                destination("Dateiserver Tholey"),
            ],
            Duration::from_millis(1500),
        )
        .expect("home office probe");
    assert_eq!(seen, vec![true, true, false], "{table}");

    // A spent token: a second appliance with Nohfelden's bootstrap file is refused, says why,
    // and leaves no key or identity behind.
    let spare = district
        .wan_namespace("spare", 31)
        .expect("spare namespace");
    let data = district.path("spare-data");
    let config = district.path("spare.toml");
    std::fs::write(
        &config,
        format!(
            "role = \"spoke\"\ndata_dir = \"{}\"\nbootstrap = \"{}\"\nlan = [\"lo\"]\npolicy_public_key = \"{}\"\n",
            data.display(),
            district.path("nohfelden-rathaus.bootstrap.json").display(),
            district.path("policy.pub").display()
        ),
    )
    .expect("config");
    let refused = run(
        spare
            .command(komnet_netns_tests::komnet_gateway_binary().expect("binary"))
            .arg("run")
            .arg("--config")
            .arg(&config),
        Duration::from_secs(30),
    )
    .expect("second appliance");
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("token"), "{refused:?}");
    assert!(!data.join("enrollment.json").exists() && !data.join("wg.key").exists());
    drop(spare);
    let district = district;

    // Spoofing: the Nohfelden appliance sends with Tholey's staff address as inner source.
    // Its allowed IPs at the hub do not contain it: dropped there, and counted.
    let hub = &district.hubs[0];
    let before = hub.status().expect("hub status");
    let nohfelden = district.commune("nohfelden");
    nohfelden
        .gw
        .ip(&["addr", "add", "10.40.1.99/32", "dev", "lo"])
        .expect("spoof address");
    let spoofed = Source {
        label: "spoofer".into(),
        netns: nohfelden.gw.name().to_owned(),
        addr: "10.40.1.99".parse().expect("addr"),
        origin: Origin::Address,
    };
    let reached = district
        .probe(
            &spoofed,
            &[destination("Dateiserver Tholey")],
            Duration::from_millis(1500),
        )
        .expect("spoof probe");
    assert_eq!(reached, vec![false], "a spoofed inner source got through");
    let after = hub.status().expect("hub status");
    let reason = "spoofed_source";
    assert!(
        counter(&after, "drops", reason) > counter(&before, "drops", reason),
        "the hub did not count the spoofed packets under {reason}: {:#}",
        after["drops"]
    );

    // Spoofing from the data centre and from a LAN segment (issue 14, part 4): a data-centre
    // host sends with Tholey's staff address, a Nohfelden guest with a staff address. The
    // kernels drop both before forwarding them: strict reverse-path filtering, which the hub
    // sets on its outside interfaces and the spoke on its LAN interfaces (the route back to
    // such a source leaves through another interface). Without it the hub's kernel forwards
    // the data centre's packet into the tunnel interface (the hub's firewall drops it there,
    // but the hub's own addresses would answer it), and a flushed spoke ruleset would let a
    // guest speak as staff towards the hub.
    let dc_spoofed = counter(
        &hub.status().expect("hub status"),
        "drops",
        "dc_spoofed_source",
    );
    for (label, ns, from, to, router) in [
        (
            "data centre",
            &district.srv,
            "10.40.1.77",
            "10.40.1.10",
            &district.dc,
        ),
        (
            "guest WLAN",
            &nohfelden.guest,
            "10.30.1.77",
            "10.0.1.10",
            &nohfelden.gw,
        ),
    ] {
        // At the spoke its nftables see the guest's packets first (issue 13: a LAN source is
        // checked against the segment of the VLAN or port it arrived on, before routing) and
        // count them as segment_spoof; reverse-path filtering is the layer beneath, for when
        // the table is gone.
        let spoke_drops = || {
            if label == "guest WLAN" {
                counter(
                    &nohfelden.spoke.status().expect("spoke status"),
                    "drops",
                    "segment_spoof",
                )
            } else {
                0
            }
        };
        let before = router.reverse_path_drops().expect("netstat") + spoke_drops();
        ns.add_address("eth0", from.parse().expect("addr"), 32)
            .expect("spoof address");
        let ping = ns
            .exec_output(
                &["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", from, to],
                COMMAND_TIMEOUT,
            )
            .expect("ping");
        assert!(
            !ping.succeeded(),
            "{label}: a spoofed ping was answered: {ping:?}"
        );
        // The spoke's guard reads its table's counters every second.
        let after = wait_until(
            "the spoofed packets to be counted",
            Duration::from_secs(3),
            || {
                let now = router.reverse_path_drops()? + spoke_drops();
                Ok((now >= before + 3).then_some(now))
            },
        )
        .unwrap_or_else(|_| router.reverse_path_drops().unwrap_or(0) + spoke_drops());
        let settings = router
            .exec(&["sysctl", "-a", "--pattern", "\\.rp_filter$"])
            .unwrap_or_default();
        assert!(
            after >= before + 3,
            "{label}: {} did not drop the spoofed packets by reverse-path filtering \
             or as segment_spoof (dropped {before} -> {after}):\n{settings}",
            router.name()
        );
    }
    assert_eq!(
        counter(
            &hub.status().expect("hub status"),
            "drops",
            "dc_spoofed_source"
        ),
        dc_spoofed,
        "the data centre's spoofed packets reached the hub's tunnel interface"
    );

    // Issue 13: the guest with the staff address (above) does not get the staff's rights:
    // the spoke's nftables drop it before routing (the segment is where it arrives) and count
    // it; the same address on the staff LAN works.
    nohfelden
        .staff
        .ip(&["addr", "add", "10.30.1.77/24", "dev", "eth0"])
        .expect("the same address on the staff LAN");
    let dms = destination(DMS);
    let from = |ns: &komnet_netns_tests::Netns| Source {
        label: String::new(),
        netns: ns.name().to_owned(),
        addr: "10.30.1.77".parse().expect("addr"),
        origin: Origin::Address,
    };
    let spoke_before = nohfelden.spoke.status().expect("spoke status");
    assert_eq!(
        district
            .probe(&from(&nohfelden.guest), &[dms], Duration::from_millis(1500))
            .expect("probe"),
        vec![false],
        "a staff address on the guest WLAN reached the DMS"
    );
    assert_eq!(
        district
            .probe(&from(&nohfelden.staff), &[dms], Duration::from_millis(1500))
            .expect("probe"),
        vec![true],
        "the staff address on the staff LAN does not reach the DMS"
    );
    let reason = "segment_spoof";
    wait_until(
        "the spoke to count the spoofed packets",
        Duration::from_secs(5),
        || {
            let now = nohfelden.spoke.status()?;
            Ok(
                (counter(&now, "drops", reason) > counter(&spoke_before, "drops", reason))
                    .then_some(()),
            )
        },
    )
    .expect("segment_spoof counted");
    let text = nohfelden.spoke.status_text().expect("komnet status");
    assert!(text.contains(&format!(" {reason}=")), "{text}");

    // Revocation: Tholey's appliance is cut off within 2 s, Nohfelden keeps working.
    let took = district.revoke_and_time("tholey").expect("revocation");
    println!("revocation effective after {took:?}");
    assert!(took <= Duration::from_secs(2), "revocation took {took:?}");
    let tholey = district.staff("tholey");
    assert_eq!(
        district
            .probe(&tholey, &DESTINATIONS, Duration::from_millis(1000))
            .expect("probe"),
        vec![false, false, false]
    );
    let noh = district.staff("nohfelden");
    assert_eq!(
        district
            .probe(&noh, &[destination(DMS)], Duration::from_millis(1500))
            .expect("probe"),
        vec![true]
    );
    let status = hub.status().expect("hub status");
    let peers = status["peers"].as_array().expect("peers");
    assert!(
        peers.iter().all(|p| p["tenant"] != "tholey"),
        "the hub still lists tholey: {status:#}"
    );
    let metrics = hub.metrics_text().expect("metrics");
    for needle in [
        "komnet_peers{tenant=\"nohfelden\",role=\"spoke\",state=\"up\"} 1",
        "komnet_policy_version 1",
        "komnet_drops_total{reason=\"spoofed_source\"}",
        "komnet_certificate_expiry_seconds",
        "komnet_registry_connected 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
}

/// Issue 15, part 2: the enrollment host crashes while the path to it is blackholed (no RST
/// reaches the hub: a half-open registry stream), a revocation is made meanwhile. The hub
/// notices the silent stream after three missed keep-alives, says so in `komnet status` and
/// `/metrics` (the alarm after `registry_outage_alarm`), keeps its peers (keep-peers), and
/// once the path is back it reconnects, takes a fresh snapshot and the revoked town hall is cut
/// off within seconds.
#[test]
fn a_hub_notices_a_dead_registry_says_so_and_hears_the_revocation_after_it() {
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    let tho = district.staff("tholey");
    let fs_tho = destination("Dateiserver Tholey");
    let reaches = |d: &District| {
        d.probe(&tho, &[fs_tho], Duration::from_millis(1500))
            .expect("probe")[0]
    };
    assert!(reaches(&district));
    let status = district.hubs[0]
        .wait_status("the registry connected", Duration::from_secs(10), |s| {
            s["registry"]["state"] == "connected"
        })
        .expect("registry status");
    assert!(
        status["registry"]["version"].as_u64().is_some(),
        "{status:#}"
    );

    district.blackhole_registry(true).expect("blackhole");
    district
        .crash_and_restart_enroll("enroll-after-crash.log")
        .expect("enrollment service restart");
    district
        .admin(&[
            "revoke",
            "--tenant",
            "tholey",
            "--site",
            "rathaus",
            "--reason",
            "key-compromise",
        ])
        .expect("revoke");
    let blackholed = Instant::now();
    let status = district.hubs[0]
        .wait_status("the registry outage alarm", Duration::from_secs(30), |s| {
            s["registry"]["alarm"] == true
        })
        .expect("the hub reports the outage");
    eprintln!(
        "outage alarm {:.1} s after the blackhole and crash",
        blackholed.elapsed().as_secs_f64()
    );
    assert_ne!(status["registry"]["state"], "connected", "{status:#}");
    assert!(
        counter(&status, "counters", "registry_silent") >= 1,
        "{status:#}"
    );
    let text = district.hubs[0].status_text().expect("status text");
    assert!(
        text.contains("registry: UNREACHABLE since") && text.contains("known peers stay admitted"),
        "{text}"
    );
    let metrics = district.hubs[0].metrics_text().expect("metrics");
    for needle in [
        "komnet_registry_connected 0",
        "komnet_registry_outage_alarm 1",
        "komnet_registry_outage_seconds ",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    // keep-peers: the revocation is not heard yet, Tholey keeps working.
    assert!(
        reaches(&district),
        "keep-peers removed a peer during the outage"
    );

    district.blackhole_registry(false).expect("restore");
    let restored = Instant::now();
    loop {
        if !reaches(&district) {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(30),
            "Tholey still reaches its file server 30 s after the registry came back:\n{}",
            district.hubs[0].log_tail()
        );
    }
    let cut_after = restored.elapsed();
    eprintln!(
        "revoked peer cut {:.1} s after the path came back",
        cut_after.as_secs_f64()
    );
    let status = district.hubs[0]
        .wait_status(
            "the registry connected again",
            Duration::from_secs(10),
            |s| s["registry"]["state"] == "connected" && s["registry"]["alarm"] == false,
        )
        .expect("registry back");
    assert!(
        status["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .all(|p| p["tenant"] != "tholey"),
        "{status:#}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("tenants")).expect("mkdir");
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).expect("prefix");
        std::fs::copy(&entry, to.join(rel)).expect("copy");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A policy version that also lets Tholey's staff use Nohfelden's file server.
fn policy_v2(district: &District, version: u64) -> PathBuf {
    let dir = district.dir.path().join(format!("policy-v{version}"));
    copy_dir(&komnet_netns_tests::district::policy_dir(), &dir);
    let op = dir.join("operator.toml");
    let text = std::fs::read_to_string(&op).expect("operator.toml");
    std::fs::write(
        &op,
        text.replace("version = 1", &format!("version = {version}")),
    )
    .expect("write");
    let noh = dir.join("tenants/nohfelden.toml");
    let text = std::fs::read_to_string(&noh).expect("nohfelden.toml");
    std::fs::write(
        &noh,
        text.replace(
            "ports = [\"tcp/445\"]",
            "ports = [\"tcp/445\"]\nexport = [\"tholey\"]",
        ),
    )
    .expect("write");
    let tho = dir.join("tenants/tholey.toml");
    let mut text = std::fs::read_to_string(&tho).expect("tholey.toml");
    text.push_str(
        "\n[[rule]]\nname = \"shared-building-office\"\nfrom = [\"verwaltung\"]\nto = [\"nohfelden/dateiserver\"]\n",
    );
    std::fs::write(&tho, text).expect("write");
    dir
}

fn wait_version(district: &mut District, version: u64) {
    for hub in &mut district.hubs {
        hub.wait_running(version, Duration::from_secs(20))
            .expect("hub policy version");
    }
    for c in &mut district.communes {
        c.spoke
            .wait_running(version, Duration::from_secs(20))
            .expect("spoke policy version");
    }
}

#[test]
fn restarts_live_policy_updates_refused_bundles_and_fail_closed() {
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    let noh = district.staff("nohfelden");
    let tho = district.staff("tholey");
    let dms = destination(DMS);
    let fs_noh = destination("Dateiserver Nohfelden");
    let ok = |d: &District, s: &Source, to: Destination| {
        d.probe(s, &[to], Duration::from_millis(1500))
            .expect("probe")[0]
    };
    assert!(ok(&district, &noh, dms));
    assert!(!ok(&district, &tho, fs_noh));

    // A live update: a connection Nohfelden holds to the DMS survives it, and Tholey's new
    // rule works once the gateways run version 2.
    let mut hold = std::process::Command::new("ip");
    hold.args(["netns", "exec", district.commune("nohfelden").staff.name()])
        .arg(netprobe())
        .args(["hold", "10.30.1.10", "10.0.1.10", "443", "8"]);
    let held = std::thread::spawn(move || run(&mut hold, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(1000));
    let v2 = policy_v2(&district, 2);
    district
        .publish_policy(&v2, "policy-v2.bundle")
        .expect("publish v2");
    wait_version(&mut district, 2);
    assert!(
        ok(&district, &tho, fs_noh),
        "version 2's new rule does not work"
    );
    let held = held.join().expect("hold thread").expect("hold");
    assert!(
        held.stdout.contains("held"),
        "the established connection did not survive the update: {held:?}"
    );

    // Refused bundles: a lower version, and one signed with another key. The service refuses
    // to publish them; the gateways keep version 2.
    let v1 = district.dir.path().join("policy-v1.bundle");
    let err = district
        .admin(&["policy-publish", &v1.to_string_lossy()])
        .expect_err("a rollback was published");
    assert!(format!("{err:#}").contains("version"), "{err:#}");
    let other_key = district.dir.path().join("other.key");
    district
        .komnet(&["policy", "keygen", "--out", &other_key.to_string_lossy()])
        .expect("keygen");
    let v3 = policy_v2(&district, 3);
    let forged = district.dir.path().join("forged.bundle");
    district
        .komnet(&[
            "policy",
            "bundle",
            &v3.to_string_lossy(),
            "--key",
            &other_key.to_string_lossy(),
            "--out",
            &forged.to_string_lossy(),
        ])
        .expect("bundle");
    let err = district
        .admin(&["policy-publish", &forged.to_string_lossy()])
        .expect_err("a forged bundle was published");
    assert!(format!("{err:#}").contains("signature"), "{err:#}");
    // A gateway must not trust the service either: a forged bundle placed as its
    // last-known-good is refused at restart; it forwards nothing until the good one arrives.
    let spoke = &mut district.commune_mut("tholey").spoke;
    spoke.stop().expect("stop");
    let lkg = spoke.data_dir.join("policy/policy.bundle");
    std::fs::copy(&forged, &lkg).expect("plant forged bundle");
    spoke.restart().expect("start");
    spoke
        .wait_running(2, Duration::from_secs(20))
        .expect("tholey back on version 2");
    assert!(spoke.log_tail().contains("refused"), "{}", spoke.log_tail());
    assert!(ok(&district, &tho, fs_noh));

    // Hub restart: peers come back from the registry and the last-known-good policy, without
    // new tokens.
    for f in std::fs::read_dir(district.dir.path()).expect("dir") {
        let p = f.expect("entry").path();
        if p.to_string_lossy().ends_with(".bootstrap.json") {
            std::fs::remove_file(p).expect("remove bootstrap");
        }
    }
    district.hubs[0].restart().expect("hub restart");
    district.hubs[0]
        .wait_running(2, Duration::from_secs(20))
        .expect("hub back");
    let t = Instant::now();
    wait_until(
        "nohfelden to reach the DMS again",
        Duration::from_secs(20),
        || Ok(ok(&district, &noh, dms).then_some(())),
    )
    .expect("traffic after hub restart");
    println!("traffic back {:?} after the hub restart", t.elapsed());

    // Spoke restart: the stored identity, no token (the bootstrap files are gone).
    let spoke = &mut district.commune_mut("nohfelden").spoke;
    spoke.restart().expect("spoke restart");
    spoke
        .wait_running(2, Duration::from_secs(20))
        .expect("spoke back");
    wait_until(
        "nohfelden to reach the DMS after its restart",
        Duration::from_secs(20),
        || Ok(ok(&district, &noh, dms).then_some(())),
    )
    .expect("traffic after spoke restart");

    // kill -9 of a spoke: its LAN is cut off from the tunnel (and from the WAN), not open.
    let spoke = &mut district.commune_mut("nohfelden").spoke;
    spoke.kill_hard().expect("kill -9");
    let gw = &district.commune("nohfelden").gw;
    let table = gw
        .exec(&["nft", "list", "table", "inet", "komnet"])
        .expect("komnet table after kill -9");
    assert!(table.contains("policy drop"), "{table}");
    assert!(
        !ok(&district, &noh, dms),
        "the LAN reaches the DMS with the spoke killed"
    );
    let wan = Destination {
        label: "enrollment service on the WAN",
        addr: komnet_netns_tests::district::DC_WAN,
        port: 8443,
    };
    assert!(
        !ok(&district, &noh, wan),
        "the LAN reaches the WAN with the spoke killed"
    );
}

#[test]
fn spoke_fails_over_to_the_second_hub_within_5s() {
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: true,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    let noh = district.staff("nohfelden");
    let dms = destination(DMS);
    assert!(
        district
            .probe(&noh, &[dms], Duration::from_millis(1500))
            .expect("probe")[0]
    );
    let hub1_peers = district.hubs[0].status().expect("status")["peers"].clone();
    assert!(
        hub1_peers.as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["tenant"] == "nohfelden" && p["last_handshake"].is_i64())),
        "nohfelden is not on hub1 first: {hub1_peers:#}"
    );
    let t0 = Instant::now();
    district.hubs[0].kill_hard().expect("kill hub1");
    let back = loop {
        let started = t0.elapsed();
        if district
            .probe(&noh, &[dms], Duration::from_millis(500))
            .expect("probe")[0]
        {
            break t0.elapsed();
        }
        assert!(started < Duration::from_secs(20), "no failover within 20 s");
    };
    println!("traffic through hub2 {back:?} after hub1 was killed");
    assert!(back <= Duration::from_secs(5), "failover took {back:?}");
    let status = district
        .commune("nohfelden")
        .spoke
        .status()
        .expect("spoke status");
    assert!(counter(&status, "counters", "failover") >= 1, "{status:#}");
}

/// The spoke of the generic appliance image (no policy key in its gateway.toml,
/// `wait_for_bootstrap`, `lan_addresses`): it waits for its bootstrap file and says so; a spent
/// token is refused, moved aside, and nothing is written; a fresh token (which carries the policy
/// key) enrols it, and it puts the first address of each of its site's segments on its LAN port.
#[test]
fn an_image_spoke_waits_refuses_a_spent_token_then_enrols_and_takes_its_lan_addresses() {
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    let mut appliance = district
        .add_appliance_spoke("image", 50, 40)
        .expect("appliance spoke");
    let state = |s: &serde_json::Value| s["state"].as_str().unwrap_or_default().to_owned();
    appliance
        .spoke
        .wait_status(
            "waiting for its bootstrap file",
            Duration::from_secs(15),
            |s| state(s).starts_with("waiting for a bootstrap file at "),
        )
        .expect("waiting");

    // Nohfelden's own spoke used this token when the district started.
    appliance
        .deliver_bootstrap(&district.path("nohfelden-rathaus.bootstrap.json"))
        .expect("deliver spent token");
    let refused = appliance
        .spoke
        .wait_status("refusing the spent token", Duration::from_secs(15), |s| {
            state(s).starts_with("enrollment refused: ")
                && state(s).contains("waiting for a new bootstrap file")
        })
        .expect("refused");
    assert!(state(&refused).contains("used"), "{refused}");
    assert!(appliance.refused_bootstrap().exists());
    let data = appliance.spoke.data_dir.clone();
    for f in ["bootstrap.json", "wg.key", "enrollment.json", "policy.pub"] {
        assert!(!data.join(f).exists(), "{f} left behind after a refusal");
    }
    assert!(appliance.lan_addresses().expect("lan").is_empty());

    let fresh = district
        .token("nohfelden", "rathaus", "spoke")
        .expect("fresh token");
    appliance.deliver_bootstrap(&fresh).expect("deliver token");
    let running = appliance
        .spoke
        .wait_status("running with a policy", Duration::from_secs(30), |s| {
            state(s) == "running" && !s["policy"].is_null()
        })
        .expect("running");
    assert!(
        data.join("policy.pub").exists(),
        "the policy key from the bootstrap file is kept"
    );
    // Nohfelden's rathaus segments: verwaltung 10.30.1.0/24 on port eth1, gaeste
    // 10.30.100.0/24 on port guest0: each gateway address where its segment arrives.
    assert_eq!(appliance.lan_addresses().expect("lan"), ["10.30.1.1/24"]);
    assert_eq!(
        appliance.addresses_on("guest0").expect("guest0"),
        ["10.30.100.1/24"]
    );
    let mut on_lan = vec!["10.30.1.1/24".to_owned(), "10.30.100.1/24".to_owned()];
    on_lan.sort();
    let mut reported: Vec<String> = running["lan_addresses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    reported.sort();
    assert_eq!(reported, on_lan, "{running}");

    // Issue 15, part 3: the image appliance took over nohfelden/rathaus with a new key; the
    // replaced box (the district's Nohfelden spoke, its certificate still valid, still running)
    // is withdrawn at the hub: its LAN reaches nothing any more, and the hub lists one key for
    // the site, the new one.
    let new_key = enrolled_key(&data, "enrollment.json");
    let noh = district.staff("nohfelden");
    let dms = destination(DMS);
    wait_until(
        "the replaced Nohfelden spoke to be cut off",
        Duration::from_secs(10),
        || {
            Ok((!district
                .probe(&noh, &[dms], Duration::from_millis(1000))
                .expect("probe")[0])
                .then_some(()))
        },
    )
    .expect("the replaced appliance still reaches the DMS");
    let hub = district.hubs[0].status().expect("hub status");
    assert_eq!(hub_keys(&hub, "nohfelden", "rathaus"), [new_key], "{hub:#}");

    // Issue 13: a policy that moves the guests to another port takes effect without a
    // restart: the address leaves guest0 for guest1, and the firewall takes the guests'
    // packets from guest1 only.
    let pid = appliance.spoke.pid();
    let v2 = district.dir.path().join("policy-v2-guests-moved");
    copy_dir(&komnet_netns_tests::district::policy_dir(), &v2);
    let op = v2.join("operator.toml");
    let text = std::fs::read_to_string(&op).expect("operator.toml");
    std::fs::write(&op, text.replace("version = 1", "version = 2")).expect("write");
    let noh = v2.join("tenants/nohfelden.toml");
    let text = std::fs::read_to_string(&noh).expect("nohfelden.toml");
    assert!(text.contains("port = \"guest0\""), "{text}");
    std::fs::write(&noh, text.replace("port = \"guest0\"", "port = \"guest1\"")).expect("write");
    district
        .publish_policy(&v2, "policy-v2-guests-moved.bundle")
        .expect("publish v2");
    appliance
        .spoke
        .wait_running(2, Duration::from_secs(20))
        .expect("version 2 in force");
    wait_until(
        "the guests' address to move to guest1",
        Duration::from_secs(10),
        || {
            Ok((appliance.addresses_on("guest1")? == ["10.30.100.1/24"]
                && appliance.addresses_on("guest0")?.is_empty())
            .then_some(()))
        },
    )
    .expect("address moved");
    assert_eq!(appliance.spoke.pid(), pid, "the spoke restarted");
    let table = appliance
        .gw
        .exec(&["nft", "list", "chain", "inet", "komnet", "lan_source"])
        .expect("lan_source");
    assert!(
        table.contains("iifname \"guest1\" ip saddr @seg_nohfelden_gaeste_v4 return")
            && !table.contains("\"guest0\""),
        "{table}"
    );

    // A policy that binds the guests to a port this appliance lacks (guest7) and gives the
    // staff a second prefix: the missing port is reported and retried, and does not keep the
    // staff's new gateway address off eth1 (the segments are set up in policy order, gaeste
    // before verwaltung: one failing interface used to stop the rest).
    let v3 = district.dir.path().join("policy-v3-missing-port");
    copy_dir(&v2, &v3);
    let op = v3.join("operator.toml");
    let text = std::fs::read_to_string(&op).expect("operator.toml");
    std::fs::write(&op, text.replace("version = 2", "version = 3")).expect("write");
    let noh = v3.join("tenants/nohfelden.toml");
    let text = std::fs::read_to_string(&noh).expect("nohfelden.toml");
    let text = text
        .replace("port = \"guest1\"", "port = \"guest7\"")
        .replace(
            "prefixes = [\"10.30.1.0/24\"]",
            "prefixes = [\"10.30.1.0/24\", \"10.30.2.0/24\"]",
        );
    assert!(
        text.contains("10.30.2.0/24") && text.contains("guest7"),
        "{text}"
    );
    std::fs::write(&noh, text).expect("write");
    district
        .publish_policy(&v3, "policy-v3-missing-port.bundle")
        .expect("publish v3");
    appliance
        .spoke
        .wait_running(3, Duration::from_secs(20))
        .expect("version 3 in force");
    wait_until(
        "the staff's second gateway address on eth1",
        Duration::from_secs(10),
        || {
            let mut on_eth1 = appliance.lan_addresses()?;
            on_eth1.sort();
            Ok((on_eth1 == ["10.30.1.1/24", "10.30.2.1/24"]
                && appliance.addresses_on("guest1")?.is_empty())
            .then_some(()))
        },
    )
    .expect("the staff's addresses on eth1");
    appliance
        .spoke
        .wait_status("the missing port reported", Duration::from_secs(10), |s| {
            s["lan_errors"].as_array().is_some_and(|e| {
                e.iter()
                    .any(|e| e.as_str().is_some_and(|e| e.contains("guest7")))
            })
        })
        .expect("lan_errors names guest7");
    assert_eq!(appliance.spoke.pid(), pid, "the spoke restarted");
}

/// Pings started now in `ns` towards `dst`, every 2 ms for `seconds` (ended by SIGINT, so
/// ping prints its summary; a deadline would end it at the first ICMP error).
fn start_ping(ns: &str, dst: &str, seconds: u32) -> std::process::Child {
    std::process::Command::new("timeout")
        .args(["-s", "INT", &seconds.to_string()])
        .args(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-i", "0.002"])
        .args(["-W", "1", "-c", "1000000", dst])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ping")
}

fn replies(child: std::process::Child) -> (u32, u32, String) {
    let out = child.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = komnet_netns_tests::parse_ping_summary(&text).expect("ping summary");
    (summary.received, summary.transmitted, text)
}

#[test]
fn a_flushed_firewall_does_not_open_a_spoke() {
    // Issue 14, part 5: `nft flush ruleset` (what Debian's nftables.service does when it stops
    // or restarts) on a running spoke. With forwarding on and no rules, the kernel would
    // forward LAN <-> WAN; the spoke's fence (policy-routing rules) holds meanwhile and its
    // guard reinstalls the table.
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    // A host on the WAN (the town hall's router side) that knows the way to the LAN.
    let wanhost = district.wan_namespace("wanhost", 50).expect("WAN host");
    let noh = district.commune("nohfelden");
    let lan = format!("10.{}.0.0/16", noh.lan);
    wanhost
        .ip(&["route", "add", &lan, "via", "192.0.2.11"])
        .expect("route to the LAN");
    let gw = noh.gw.name().to_owned();
    let staff_ns = noh.staff.name().to_owned();
    let guest_ns = noh.guest.name().to_owned();
    let staff_addr = noh.staff_addr().to_string();
    let nft = |args: &[&str]| {
        run(
            std::process::Command::new("ip")
                .args(["netns", "exec", &gw, "nft"])
                .args(args),
            COMMAND_TIMEOUT,
        )
        .expect("nft")
    };
    assert!(nft(&["list", "table", "inet", "komnet"]).succeeded());

    // Pings, 500 a second, that must never be answered: LAN -> WAN, WAN -> LAN, guest -> staff.
    let probes = [
        ("LAN -> WAN", start_ping(&staff_ns, "192.0.2.50", 8)),
        ("WAN -> LAN", start_ping(wanhost.name(), &staff_addr, 8)),
        ("guest -> staff", start_ping(&guest_ns, &staff_addr, 8)),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let mut back_after = Vec::new();
    for round in 0..3 {
        let args: &[&str] = if round == 2 {
            &["delete", "table", "inet", "komnet"]
        } else {
            &["flush", "ruleset"]
        };
        let flushed = Instant::now();
        assert!(nft(args).succeeded(), "nft {args:?}");
        // The guard reinstalls the table within a second.
        loop {
            if nft(&["list", "table", "inet", "komnet"]).succeeded() {
                back_after.push(flushed.elapsed());
                break;
            }
            assert!(
                flushed.elapsed() < Duration::from_secs(1),
                "round {round}: the komnet table is not back after 1 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(1200));
    }
    println!("the komnet table was back after {back_after:?}");
    // What the package makes nftables.service run instead of `nft flush ruleset` (stop) and
    // `nft -f /etc/nftables.conf` (start, reload), with a configuration that begins with
    // `flush ruleset` as Debian's default does: the komnet table is there at once, every time.
    let conf = district.path("nftables.conf");
    std::fs::write(
        &conf,
        "flush ruleset\ntable inet filter {\n chain input {\n  type filter hook input priority 0; policy accept;\n }\n}\n",
    )
    .expect("nftables.conf");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/nftables/nftables-keep-komnet");
    // Stateless listings (-s): the counters move with the pings meanwhile.
    let before = nft(&["-s", "list", "table", "inet", "komnet"]).stdout;
    for verb in ["stop", "start", "reload", "stop", "start"] {
        let out = run(
            std::process::Command::new("ip")
                .args(["netns", "exec", &gw, "env"])
                .arg(format!("NFTABLES_CONF={}", conf.display()))
                .arg(&script)
                .arg(verb),
            COMMAND_TIMEOUT,
        )
        .expect("nftables-keep-komnet");
        assert!(out.succeeded(), "nftables-keep-komnet {verb}: {out}");
        let now = nft(&["-s", "list", "table", "inet", "komnet"]);
        assert!(now.succeeded(), "after {verb} the komnet table is gone");
        assert_eq!(now.stdout, before, "after {verb} the komnet table changed");
    }
    assert!(nft(&["list", "table", "inet", "filter"]).succeeded());
    for (what, child) in probes {
        let (received, sent, text) = replies(child);
        assert!(sent > 300, "{what}: only {sent} pings sent: {text}");
        assert_eq!(received, 0, "{what}: {received} of {sent} pings answered");
    }
    // The town hall still reaches what it may.
    let staff = district.staff("nohfelden");
    assert_eq!(
        district
            .probe(&staff, &[destination(DMS)], Duration::from_millis(1500))
            .expect("probe"),
        vec![true]
    );
    let status = district
        .commune("nohfelden")
        .spoke
        .status()
        .expect("status");
    assert!(
        counter(&status, "counters", "nft_reinstalled") >= 3,
        "{:#}",
        status["counters"]
    );
    drop(wanhost);
}

/// Issue 15, part 1: a town hall closed for two weeks — its appliance's certificate expired
/// while it was off. At start it says so and takes a new token (a stick, here the bootstrap
/// file put in place); the expired enrollment is kept aside, the new key replaces the old one at
/// the hub, and the LAN works again.
#[test]
fn an_appliance_whose_certificate_expired_while_off_enrols_again_from_a_new_token() {
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    // The service's clock runs 8 days behind while the appliance first enrols: its 7-day
    // certificate has expired by the time the appliance starts again.
    district
        .restart_enroll_with_clock(Some("-8d"), "enroll-past.log")
        .expect("enrollment service in the past");
    let mut appliance = district
        .add_appliance_spoke("image", 40, 41)
        .expect("appliance spoke");
    let state = |s: &serde_json::Value| s["state"].as_str().unwrap_or_default().to_owned();
    let old_token = district
        .token("tholey", "rathaus", "spoke")
        .expect("token (in the past)");
    appliance.deliver_bootstrap(&old_token).expect("deliver");
    let enrolled = appliance
        .spoke
        .wait_status("enrolled (in the past)", Duration::from_secs(30), |s| {
            s["certificate"]["serial"].is_string()
        })
        .expect("first enrollment");
    let old_serial = enrolled["certificate"]["serial"].clone();
    assert!(
        enrolled["certificate"]["not_after"]
            .as_i64()
            .unwrap_or(i64::MAX)
            < std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        "the first certificate should have expired already: {enrolled:#}"
    );
    let data = appliance.spoke.data_dir.clone();
    let enrollment_key = |file: &str| enrolled_key(&data, file);
    let old_key = enrollment_key("enrollment.json");

    // Switched off; meanwhile the service runs on time again.
    appliance.spoke.stop().expect("stop");
    district
        .restart_enroll_with_clock(None, "enroll-now.log")
        .expect("enrollment service on time");
    appliance.spoke.start().expect("start");
    let waiting = appliance
        .spoke
        .wait_status(
            "saying the certificate expired and waiting for a token",
            Duration::from_secs(30),
            |s| {
                state(s).contains("expired on")
                    && state(s).contains("needs a new bootstrap token")
                    && state(s).contains("waiting for a bootstrap file")
                    && !state(s).contains("refused")
            },
        )
        .expect("waiting for a new token");
    eprintln!("state: {}", state(&waiting));
    assert!(
        data.join("enrollment.json").exists(),
        "the expired enrollment must stay until a new one is issued"
    );
    assert!(
        data.join("bootstrap.json.used").exists() && !data.join("bootstrap.json").exists(),
        "the spent bootstrap file should have been set aside after the first enrollment"
    );

    let fresh = district
        .token("tholey", "rathaus", "spoke")
        .expect("fresh token");
    appliance.deliver_bootstrap(&fresh).expect("deliver");
    let running = appliance
        .spoke
        .wait_status("running again", Duration::from_secs(30), |s| {
            state(s) == "running" && !s["policy"].is_null()
        })
        .expect("running after re-enrolment");
    assert_ne!(running["certificate"]["serial"], old_serial, "{running:#}");
    assert_eq!(enrollment_key("enrollment.json.expired"), old_key);
    let new_key = enrollment_key("enrollment.json");
    assert_ne!(new_key, old_key);

    let host = Source {
        label: "Tholey (image appliance)".into(),
        netns: appliance.host.name().to_owned(),
        addr: "10.40.1.10".parse().expect("addr"),
        origin: Origin::Address,
    };
    assert_eq!(
        district
            .probe(&host, &[destination(DMS)], Duration::from_millis(3000))
            .expect("probe"),
        vec![true],
        "the re-enrolled town hall does not reach the DMS"
    );
    let hub = district.hubs[0].status().expect("hub status");
    assert_eq!(hub_keys(&hub, "tholey", "rathaus"), [new_key], "{hub:#}");
}

/// Issue 15, part 1: the renewal loop end to end. The district is enrolled by a service whose
/// clock ran 4 days 15 h 59 min behind, then the service runs on time again: every appliance's
/// renewal window (two thirds of 7 days) opens about 45 s after it enrolled. The hub and both
/// spokes renew over mutual TLS while traffic flows (not one probe fails), the hub follows the
/// registry again with its new certificate, and a home office's identity is re-issued for the
/// same key (the stock app cannot renew; its operator re-issues) without a new handshake setup.
#[test]
fn hub_spokes_and_home_office_renew_while_traffic_flows() {
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: true,
            enroll_clock: Some("-403155"),
            ..Options::default()
        },
    )
    .expect("district");
    let serial = |s: &serde_json::Value| s["certificate"]["serial"].as_str().map(str::to_owned);
    let mut before = Vec::new();
    for g in district
        .hubs
        .iter()
        .chain(district.communes.iter().map(|c| &c.spoke))
    {
        before.push(serial(&g.status().expect("status")).expect("serial"));
    }
    district
        .restart_enroll_with_clock(None, "enroll-now.log")
        .expect("the service on time");
    let noh = district.staff("nohfelden");
    let dms = destination(DMS);
    let started = Instant::now();
    let mut probes = 0;
    loop {
        assert!(
            district
                .probe(&noh, &[dms], Duration::from_millis(1500))
                .expect("probe")[0],
            "Nohfelden lost the DMS {:.1} s into the renewals",
            started.elapsed().as_secs_f64()
        );
        probes += 1;
        let mut renewed = 0;
        for (g, old) in district
            .hubs
            .iter()
            .chain(district.communes.iter().map(|c| &c.spoke))
            .zip(&before)
        {
            if serial(&g.status().expect("status")).is_some_and(|s| s != *old) {
                renewed += 1;
            }
        }
        if renewed == before.len() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "{renewed} of {} appliances renewed after 150 s; hub log:\n{}",
            before.len(),
            district.hubs[0].log_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "hub and spokes renewed {:.1} s after the service ran on time ({probes} probes, none failed)",
        started.elapsed().as_secs_f64()
    );
    let hub = district.hubs[0]
        .wait_status(
            "following the registry with the new certificate",
            Duration::from_secs(20),
            |s| s["registry"]["state"] == "connected",
        )
        .expect("registry");
    assert!(counter(&hub, "counters", "renewed") >= 1, "{hub:#}");

    // The home office: re-issued for the key it has.
    let anna = |s: &serde_json::Value| -> (String, i64) {
        let p = s["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .find(|p| p["role"] == "homeoffice")
            .cloned()
            .expect("the home office at the hub");
        (
            p["public_key"].as_str().expect("key").to_owned(),
            p["cert_not_after"].as_i64().expect("not_after"),
        )
    };
    let (key, not_after) = anna(&hub);
    let out = district.path("reissued");
    district
        .admin(&[
            "homeoffice",
            "issue",
            "--tenant",
            "nohfelden",
            "--user",
            "anna",
            "--public-key",
            &key,
            "--no-qr",
            "--out-dir",
            &out.to_string_lossy(),
        ])
        .expect("re-issue");
    let hub = district.hubs[0]
        .wait_status("the re-issued home office", Duration::from_secs(10), |s| {
            anna(s).1 > not_after
        })
        .expect("re-issued identity at the hub");
    assert_eq!(anna(&hub).0, key);
    let ho = district
        .sources()
        .into_iter()
        .find(|s| s.label.starts_with("Home office"))
        .expect("home office source");
    assert!(
        district
            .probe(&ho, &[dms], Duration::from_millis(3000))
            .expect("probe")[0],
        "the home office lost the DMS after its re-issue"
    );
}

/// The district's policy as version `version`, Nohfelden's fragment with `extra` appended.
fn policy_with(district: &District, version: u64, extra: &str) -> PathBuf {
    let dir = district.dir.path().join(format!("policy-v{version}"));
    copy_dir(&komnet_netns_tests::district::policy_dir(), &dir);
    let op = dir.join("operator.toml");
    let text = std::fs::read_to_string(&op).expect("operator.toml");
    std::fs::write(
        &op,
        text.replace("version = 1", &format!("version = {version}")),
    )
    .expect("write");
    let noh = dir.join("tenants/nohfelden.toml");
    let mut text = std::fs::read_to_string(&noh).expect("nohfelden.toml");
    text.push_str(extra);
    std::fs::write(&noh, text).expect("write");
    dir
}

#[test]
fn staff_and_guests_of_one_town_hall_talk_only_where_a_rule_says_so_and_on_the_lan() {
    // Issue 13: traffic between two segments of one town hall follows the policy (default
    // deny), and what a rule allows is routed between the segments by the spoke itself, not
    // through the tunnel (the hub never sees it), from the policy version on that allows it,
    // without a restart, and no longer once a later version drops the rule.
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    let noh = district.commune("nohfelden");
    // A citizen terminal in the guest WLAN that the staff maintain remotely (VNC), and a staff
    // PC that listens on the same port.
    let _kiosk = district
        .serve_tcp(&noh.guest, &noh.guest_addr().to_string(), 5900)
        .expect("netprobe serve");
    let _staff_pc = district
        .serve_tcp(&noh.staff, &noh.staff_addr().to_string(), 5900)
        .expect("netprobe serve");
    let vnc = |addr| Destination {
        label: "VNC",
        addr,
        port: 5900,
    };
    let staff_to_kiosk = (
        Source {
            label: "staff".into(),
            netns: noh.staff.name().to_owned(),
            addr: noh.staff_addr(),
            origin: Origin::Address,
        },
        vnc(noh.guest_addr()),
    );
    let guest_to_staff = (
        Source {
            label: "guest".into(),
            netns: noh.guest.name().to_owned(),
            addr: noh.guest_addr(),
            origin: Origin::Address,
        },
        vnc(noh.staff_addr()),
    );
    let reached = |district: &District, (source, dest): &(Source, Destination), ms| {
        district
            .probe(source, &[*dest], Duration::from_millis(ms))
            .expect("probe")[0]
    };
    // What the hub counts when a LAN packet reaches it through the tunnel and is refused (the
    // firewall's reasons, and the routing and source checks); handshake and session counters
    // (no_session, unknown_index, ...) move on their own under load and say nothing here.
    let hub_drops = |district: &District| -> u64 {
        let status = district.hubs[0].status().expect("hub status");
        status["drops"]
            .as_object()
            .map(|d| {
                d.iter()
                    .filter(|(reason, _)| {
                        reason.starts_with("policy_")
                            || matches!(
                                reason.as_str(),
                                "segment_spoof"
                                    | "spoofed_source"
                                    | "no_route"
                                    | "no_identity"
                                    | "fragment"
                            )
                    })
                    .filter_map(|(_, n)| n.as_u64())
                    .sum()
            })
            .unwrap_or(0)
    };
    let rules = |district: &District| {
        district
            .commune("nohfelden")
            .gw
            .exec(&["ip", "-4", "rule", "show"])
            .expect("ip rule")
    };
    let pid = noh.spoke.pid();

    // Version 1: no rule between the segments: denied both ways, and neither attempt went
    // into the tunnel (the hub would have dropped and counted it).
    let hub_before = hub_drops(&district);
    assert!(
        !reached(&district, &staff_to_kiosk, 1500),
        "staff reached the kiosk"
    );
    assert!(
        !reached(&district, &guest_to_staff, 1500),
        "a guest reached a staff PC"
    );
    assert_eq!(
        hub_drops(&district),
        hub_before,
        "traffic between the town hall's segments reached the hub"
    );
    let listed = rules(&district);
    assert!(!listed.contains(" to 10.30."), "{listed}");

    // Version 2 lets the staff reach the kiosk: the spoke routes it on the LAN at once.
    let v2 = policy_with(
        &district,
        2,
        "\n[services.buergerterminal]\ndescription = \"Bürgerterminal im Gäste-WLAN\"\n\
         addresses = [\"10.30.100.10\"]\nports = [\"tcp/5900\"]\n\n\
         [[rule]]\nname = \"terminal-support\"\nfrom = [\"verwaltung\"]\nto = [\"buergerterminal\"]\n",
    );
    district
        .publish_policy(&v2, "policy-v2.bundle")
        .expect("publish v2");
    wait_version(&mut district, 2);
    let hub_before = hub_drops(&district);
    wait_until(
        "staff to reach the kiosk in the guest WLAN",
        Duration::from_secs(5),
        || Ok(reached(&district, &staff_to_kiosk, 1000).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", rules(&district)));
    // The guests still do not reach the staff: the replies' route is no permission, the
    // guest-isolation guardrail and the default deny still hold.
    assert!(
        !reached(&district, &guest_to_staff, 1500),
        "a guest reached a staff PC"
    );
    assert_eq!(hub_drops(&district), hub_before, "the hub saw LAN traffic");
    let listed = rules(&district);
    assert!(
        listed.contains("to 10.30.100.10 iif eth1 lookup main")
            && listed.contains("to 10.30.1.0/24 iif guest0 lookup main"),
        "{listed}"
    );
    assert_eq!(
        district.commune("nohfelden").spoke.pid(),
        pid,
        "the spoke restarted"
    );

    // Version 3 drops the rule again: denied, and the LAN-to-LAN routes are gone.
    let v3 = policy_with(&district, 3, "");
    district
        .publish_policy(&v3, "policy-v3.bundle")
        .expect("publish v3");
    wait_version(&mut district, 3);
    wait_until(
        "the LAN-to-LAN routes to go",
        Duration::from_secs(5),
        || Ok((!rules(&district).contains(" to 10.30.")).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", rules(&district)));
    assert!(
        !reached(&district, &staff_to_kiosk, 1500),
        "staff still reach the kiosk"
    );
    assert_eq!(
        district.commune("nohfelden").spoke.pid(),
        pid,
        "the spoke restarted"
    );
}

#[test]
fn an_appliance_whose_enrollment_answer_was_lost_asks_again_and_gets_its_certificate() {
    // Issue 15, part 4: the service committed the enrollment, the answer never arrived (a
    // proxy loses it), and the appliance lost power before it tried again. After the restart
    // it asks with the same token, WireGuard key and TLS key, and the service answers with the
    // certificate it issued: no `token_used`, no trip to the town hall with a new stick.
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    let (flag, proxy_log) = district.answer_losing_proxy(8444).expect("proxy");
    let mut appliance = district
        .add_appliance_spoke_with(
            "image",
            40,
            41,
            &format!(
                "enroll_urls = [\"https://{}:8444\"]\n",
                komnet_netns_tests::district::DC_WAN
            ),
        )
        .expect("appliance spoke");
    let token = district.token("tholey", "rathaus", "spoke").expect("token");
    appliance.deliver_bootstrap(&token).expect("deliver");
    wait_until("an answer lost", Duration::from_secs(30), || {
        Ok(std::fs::read_to_string(&proxy_log)?
            .contains("lost answer 1")
            .then_some(()))
    })
    .expect("the proxy lost the first answer");
    // Power cut before the retry (1 s after the loss).
    appliance.spoke.kill_hard().expect("kill");
    let data = appliance.spoke.data_dir.clone();
    assert!(
        !data.join("enrollment.json").exists() && !data.join("wg.key").exists(),
        "nothing but the request's keys is kept before the answer"
    );
    let pending: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("enrollment.pending.json")).expect("pending file"),
    )
    .expect("pending JSON");
    let kept_key = pending["wg_private_key"]
        .as_str()
        .expect("kept key")
        .to_owned();

    std::fs::remove_file(&flag).expect("answers get through again");
    appliance.spoke.start().expect("start again");
    let running = appliance
        .spoke
        .wait_status("enrolled after the restart", Duration::from_secs(30), |s| {
            s["state"] == "running" && s["certificate"]["serial"].is_string()
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nproxy: {}",
                std::fs::read_to_string(&proxy_log).unwrap_or_default()
            )
        });
    assert!(
        !appliance.refused_bootstrap().exists(),
        "the token was refused: {running:#}"
    );
    let wg_key = std::fs::read_to_string(data.join("wg.key")).expect("wg.key");
    assert_eq!(
        wg_key.trim(),
        kept_key,
        "the kept WireGuard key is the one enrolled"
    );
    assert!(
        !data.join("enrollment.pending.json").exists(),
        "the request's keys are gone once the enrollment is saved"
    );
    let enrolled = enrolled_key(&data, "enrollment.json");
    wait_until(
        "the hub to list the enrolled key alone for tholey/rathaus",
        Duration::from_secs(10),
        || {
            let hub = district.hubs[0].status()?;
            Ok((hub_keys(&hub, "tholey", "rathaus") == [enrolled.clone()]).then_some(()))
        },
    )
    .expect("hub keys");
    // The service answered the same request again (audit action `enroll.retry`).
    let audit = district
        .admin(&["audit", "--json", "--limit", "1000"])
        .expect("audit");
    let retries = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["action"] == "enroll.retry")
        .count();
    assert!(retries >= 1, "no retry answered: {audit}");
}

#[test]
fn a_reflashed_appliance_refuses_a_policy_older_than_the_service_vouched_for() {
    // Issue 15, part 6: a new (or re-flashed) appliance has no bundle to compare with; the
    // policy version in the enrollment answer is its floor. The service here serves the signed
    // bundle of version 1 while it vouches for version 2 (a restored backup, a stale mirror):
    // the appliance refuses version 1 and forwards nothing until version 2 arrives.
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            ..Options::default()
        },
    )
    .expect("district");
    district
        .admin(&["policy-version", "set", "2"])
        .expect("policy-version set 2");
    let mut appliance = district
        .add_appliance_spoke("image", 40, 41)
        .expect("appliance spoke");
    let token = district.token("tholey", "rathaus", "spoke").expect("token");
    appliance.deliver_bootstrap(&token).expect("deliver");
    let refused = appliance
        .spoke
        .wait_status("version 1 refused", Duration::from_secs(30), |s| {
            s["policy_error"]
                .as_str()
                .is_some_and(|e| e.contains("below this gateway's policy floor 2"))
        })
        .expect("the old bundle refused");
    assert!(refused["policy"].is_null(), "{refused:#}");
    assert_eq!(refused["state"], "waiting for policy", "{refused:#}");
    let floor = std::fs::read_to_string(appliance.spoke.data_dir.join("policy/policy-floor"))
        .expect("policy floor file");
    assert_eq!(floor.trim(), "2");
    // Fail-closed meanwhile: the town hall reaches nothing.
    let lan = appliance
        .host
        .exec_output(
            &[
                &netprobe().to_string_lossy(),
                "probe",
                "--timeout-ms",
                "1000",
                "tcp,10.40.1.10,10.0.1.10,443",
            ],
            Duration::from_secs(10),
        )
        .expect("probe");
    assert_eq!(lan.stdout.trim(), "blocked", "{lan:?}");

    // Version 2, signed and published: in force.
    let v2 = district.dir.path().join("policy-v2");
    copy_dir(&komnet_netns_tests::district::policy_dir(), &v2);
    let op = v2.join("operator.toml");
    let text = std::fs::read_to_string(&op).expect("operator.toml");
    std::fs::write(&op, text.replace("version = 1", "version = 2")).expect("write");
    district
        .publish_policy(&v2, "policy-v2.bundle")
        .expect("publish v2");
    appliance
        .spoke
        .wait_running(2, Duration::from_secs(30))
        .expect("version 2 in force");
}

#[test]
fn a_spoke_whose_certificate_runs_out_while_it_runs_stops_and_waits_for_a_new_token() {
    // Issue 15, part 1. The service's clock runs 7 days less 40 s behind (from its `init`
    // on, so that its CA is valid in its own time): the 7-day certificates it issues run out
    // within a minute of real time, while the service, by its clock, will not renew them
    // for days.
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
            two_hubs: false,
            homeoffice: false,
            enroll_clock: Some("-604760s"),
            ..Options::default()
        },
    )
    .expect("district");
    let mut appliance = district
        .add_appliance_spoke("image", 40, 41)
        .expect("appliance spoke");
    let token = district.token("tholey", "rathaus", "spoke").expect("token");
    appliance.deliver_bootstrap(&token).expect("deliver");
    // The service refuses every renewal as too early (by its own clock), so renewal fails
    // until the certificate runs out; then the spoke stops (its unit would start it again).
    let ended = appliance
        .spoke
        .wait_exit(Duration::from_secs(150))
        .expect("the spoke stops");
    assert!(!ended.success(), "{ended:?}");
    let log = appliance.spoke.log_tail();
    assert!(
        log.contains("stopping so that the next start waits for a new bootstrap token")
            && log.contains("this appliance's clock is ahead or the service's is behind"),
        "{log}"
    );

    // Started again (as Restart=on-failure does): it says why and waits for a new stick,
    // which brings it back.
    district
        .restart_enroll_with_clock(None, "enroll-now.log")
        .expect("enrollment service on time");
    appliance.spoke.start().expect("start again");
    appliance
        .spoke
        .wait_status("waiting for a new token", Duration::from_secs(30), |s| {
            let state = s["state"].as_str().unwrap_or_default();
            state.contains("expired on") && state.contains("waiting for a bootstrap file")
        })
        .expect("waiting for a new token");
    let new_token = district
        .token("tholey", "rathaus", "spoke")
        .expect("new token");
    appliance.deliver_bootstrap(&new_token).expect("deliver");
    appliance
        .spoke
        .wait_running(1, Duration::from_secs(30))
        .expect("running again");
}
