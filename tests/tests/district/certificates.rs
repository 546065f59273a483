//! Certificates over time: renewal under traffic, expiry while off and while running, a lost
//! enrollment answer.

use super::*;

/// Issue 15, part 1: a town hall closed for two weeks — its appliance's certificate expired
/// while it was off. At start it says so and takes a new token (a stick, here the bootstrap
/// file put in place); the expired enrollment is kept aside, the new key replaces the old one at
/// the hub, and the LAN works again.
#[test]
fn an_appliance_whose_certificate_expired_while_off_enrols_again_from_a_new_token() {
    require_root_and_tools();
    let mut district = District::start(&netprobe(), Options::default()).expect("district");
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

#[test]
fn an_appliance_whose_enrollment_answer_was_lost_asks_again_and_gets_its_certificate() {
    // Issue 15, part 4: the service committed the enrollment, the answer never arrived (a
    // proxy loses it), and the appliance lost power before it tried again. After the restart
    // it asks with the same token, WireGuard key and TLS key, and the service answers with the
    // certificate it issued: no `token_used`, no trip to the town hall with a new stick.
    require_root_and_tools();
    let mut district = District::start(&netprobe(), Options::default()).expect("district");
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
fn a_spoke_whose_certificate_runs_out_while_it_runs_stops_and_waits_for_a_new_token() {
    // Issue 15, part 1. The service's clock runs 7 days less 40 s behind (from its `init`
    // on, so that its CA is valid in its own time): the 7-day certificates it issues run out
    // within a minute of real time, while the service, by its clock, will not renew them
    // for days.
    require_root_and_tools();
    let mut district = District::start(
        &netprobe(),
        Options {
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
