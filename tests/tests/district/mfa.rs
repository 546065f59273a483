//! MFA-gated home offices with a real hub and the stock WireGuard peer (wireguard-go): a
//! device issued from the shell stays outside until its person signs in with a second factor;
//! the sign-in (the admin call the web console makes) admits it at the hub within 2 s; when the
//! window ends the hub removes the peer on its own clock and the tunnel carries nothing more.

use super::*;

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[test]
fn an_mfa_gated_home_office_gets_through_only_for_the_window_its_sign_in_opened() {
    require_root_and_tools();
    // The service's clock runs 880 s behind the hub's: the 15-minute window it opens for a
    // sign-in now ends 20 s from now on the hub's clock, so the test sees it close.
    let district = District::start(
        &netprobe(),
        Options {
            homeoffice: true,
            enroll_clock: Some("-880s"),
            mfa_window: Some(("nohfelden", "15m")),
            ..Options::default()
        },
    )
    .expect("district with an MFA-gated home office");
    let ho = district
        .sources()
        .into_iter()
        .find(|s| s.label.starts_with("Home office"))
        .expect("home office source");
    let dms = destination(DMS);
    let through = |district: &District| -> bool {
        district
            .probe(&ho, &[dms], Duration::from_millis(800))
            .expect("probe")[0]
    };
    let admitted = |district: &District| -> bool {
        let status = district.hubs[0].status().expect("hub status");
        !hub_keys(&status, "nohfelden", "anna").is_empty()
    };

    // Issued from the shell, without a second factor: not admitted, nothing gets through.
    assert!(!admitted(&district), "admitted before any sign-in");
    assert!(!through(&district), "through before any sign-in");

    // Anna signs in with a second factor: the console asks the service to open her window.
    let signed_in = unix_now();
    let (code, body) = district
        .admin_post(
            "/admin/homeoffice/window",
            &serde_json::json!({
                "tenant": "nohfelden", "owner": "anna", "authenticated_at": signed_in
            }),
            "anna (oidc sub anna, user of nohfelden)",
        )
        .expect("admin call");
    assert_eq!(code, 200, "{body}");
    let asked = Instant::now();
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    assert_eq!(answer["devices"], serde_json::json!(["anna"]), "{answer}");
    let until = answer["admitted_until"].as_i64().expect("admitted_until");
    assert!(
        (signed_in + 15..=signed_in + 25).contains(&until),
        "window until {until}, signed in at {signed_in}"
    );
    wait_until(
        "the hub to admit the home office",
        Duration::from_secs(5),
        || Ok(admitted(&district).then_some(())),
    )
    .expect("admitted");
    let admitted_after = asked.elapsed();
    assert!(
        admitted_after <= Duration::from_secs(2),
        "the hub admitted the home office {admitted_after:?} after the sign-in"
    );
    // The stock app retries its handshake every 5 s.
    wait_until(
        "the home office to reach the DMS",
        Duration::from_secs(12),
        || Ok(through(&district).then_some(())),
    )
    .expect("through while the window is open");
    println!(
        "window open: admitted at the hub {admitted_after:?} after the sign-in, traffic after {:?}",
        asked.elapsed()
    );

    // The window ends: the hub removes the peer by its own clock; nothing gets through.
    wait_until(
        "the home office to be cut off at the window's end",
        Duration::from_secs((until - unix_now()).max(0) as u64 + 10),
        || Ok((!through(&district)).then_some(())),
    )
    .expect("cut off");
    let cut = unix_now();
    assert!(
        cut >= until,
        "cut off at {cut}, before the window's end {until}"
    );
    assert!(
        cut <= until + 3,
        "cut off at {cut}, {} s after the window's end",
        cut - until
    );
    assert!(!admitted(&district), "still admitted after the window");
    let metrics = district.hubs[0].metrics_text().expect("hub metrics");
    assert!(
        metrics.contains("komnet_events_total{event=\"mfa_window_closed\"} 1\n"),
        "{metrics}"
    );
    println!("window closed at {until}: cut off at {cut}");

    // The hub reports its peers to the service every 15 s (the console's fleet): Nohfelden's
    // town hall with a recent handshake.
    let (code, body) = district
        .admin_get("/admin/fleet", "anna (oidc sub anna, operator)")
        .expect("fleet");
    assert_eq!(code, 200, "{body}");
    let fleet: serde_json::Value = serde_json::from_str(&body).expect("fleet JSON");
    let reports = fleet["hub_reports"].as_array().expect("hub_reports");
    let hub1 = reports
        .iter()
        .find(|r| r["site"] == "hub1")
        .unwrap_or_else(|| panic!("no report of hub1 after {:?}: {fleet:#}", asked.elapsed()));
    let town_hall = hub1["report"]["peers"]
        .as_array()
        .and_then(|peers| {
            peers
                .iter()
                .find(|p| p["tenant"] == "nohfelden" && p["site"] == "rathaus")
        })
        .unwrap_or_else(|| panic!("hub1's report lacks nohfelden/rathaus: {hub1:#}"));
    let handshake = town_hall["last_handshake"].as_i64().expect("a handshake");
    assert!(
        unix_now() - handshake < 200,
        "nohfelden's last handshake {handshake} is old: {town_hall}"
    );
}
