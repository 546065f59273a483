//! Restarts, live policy updates, refused bundles, fail-closed after kill -9, failover between
//! hubs.

use super::*;

#[test]
fn restarts_live_policy_updates_refused_bundles_and_fail_closed() {
    require_root_and_tools();
    let mut district = District::start(&netprobe(), Options::default()).expect("district");
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

#[test]
fn a_reflashed_appliance_refuses_a_policy_older_than_the_service_vouched_for() {
    // Issue 15, part 6: a new (or re-flashed) appliance has no bundle to compare with; the
    // policy version in the enrollment answer is its floor. The service here serves the signed
    // bundle of version 1 while it vouches for version 2 (a restored backup, a stale mirror):
    // the appliance refuses version 1 and forwards nothing until version 2 arrives.
    require_root_and_tools();
    let mut district = District::start(&netprobe(), Options::default()).expect("district");
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
    komnet_testkit::copy_dir(&komnet_netns_tests::district::policy_dir(), &v2);
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
