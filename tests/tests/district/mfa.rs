//! MFA-gated home offices end to end: the web console (komnet-console) and a real OpenID
//! provider (npm oidc-provider) on the district's enrollment service, Debian's Chromium signing
//! in (console/tests/e2e/mfa.mjs), a real hub and the stock WireGuard peer (wireguard-go) in
//! network namespaces. A device issued from the shell stays outside; a sign-in without a second
//! factor leaves it so; one with a TOTP code admits it at the hub within 2 s; when the window
//! ends the hub removes the peer on its own clock and the tunnel carries nothing more. Needs
//! node, Chromium and the npm packages (`scripts/setup.sh test`); never skipped.

use super::*;
use komnet_netns_tests::console::{e2e_dir, Console};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Signs in as `who` in Chromium (with the TOTP code when `second_factor`) and returns what
/// the devices page says of each device's access.
fn sign_in(console: &Console, who: &str, second_factor: bool) -> Vec<String> {
    let chromium = std::env::var("KOMNET_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists() && e2e_dir().join("node_modules/playwright-core").is_dir(),
        "the MFA test needs {chromium} and the npm packages in {}: run `sudo scripts/setup.sh test`",
        e2e_dir().display()
    );
    let mut cmd = std::process::Command::new("node");
    cmd.arg(e2e_dir().join("mfa.mjs"))
        .arg(who)
        .env("CONSOLE_URL", &console.url)
        .env("CHROMIUM", &chromium);
    if second_factor {
        cmd.arg("--otp");
    }
    let out = run(&mut cmd, Duration::from_secs(60)).expect("node mfa.mjs");
    assert!(
        out.succeeded(),
        "the browser sign-in failed: {out:?}\nconsole:\n{}",
        console.log_text()
    );
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ACCESS "))
        .map(str::to_owned)
        .collect()
}

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
            homeoffice_user: Some("heidi"),
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
        !hub_keys(&status, "nohfelden", "heidi").is_empty()
    };

    // Issued from the shell, without a second factor: not admitted, nothing gets through.
    assert!(!admitted(&district), "admitted before any sign-in");
    assert!(!through(&district), "through before any sign-in");

    // Heidi signs in to the web console without a second factor: her device stays closed.
    let console = Console::start(&district, free_port(), free_port()).expect("console");
    let access = sign_in(&console, "heidi", false);
    assert!(
        access.iter().all(|a| a.contains("gesperrt")),
        "without a second factor the portal must say closed: {access:?}"
    );
    assert!(
        !admitted(&district),
        "admitted after a sign-in without a second factor"
    );

    // With her one-time code: the console has the service open her window.
    let signed_in = unix_now();
    let access = sign_in(&console, "heidi", true);
    let asked = Instant::now();
    assert!(
        access.iter().all(|a| a.starts_with("verbunden bis")),
        "after a sign-in with a second factor the portal must say until when: {access:?}"
    );
    let (code, body) = district.admin_get("/admin/fleet", "test").expect("fleet");
    assert_eq!(code, 200, "{body}");
    let fleet: serde_json::Value = serde_json::from_str(&body).expect("fleet JSON");
    let until = fleet["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["site"] == "heidi"))
        .and_then(|p| p["admitted_until"].as_i64())
        .unwrap_or_else(|| panic!("heidi's device has no window: {fleet:#}"));
    assert!(
        (signed_in + 10..=signed_in + 30).contains(&until),
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
