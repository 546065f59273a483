//! Hubs on separate machines, routes by BGP (issue 17): each hub in its own namespace with a
//! real BIRD 2 that announces the hub's announcement table to the data-centre router (BIRD as
//! well), which installs the routes in its kernel. A spoke fails over from hub 1 to hub 2
//! after `kill -9` of hub 1: the router's route follows and the DMS's answers reach the town
//! hall again within 5 s; hub 1, restarted, does not take the route back (it announces only
//! sessions it carries). The same with FRR as the data-centre router, configured as
//! docs/operations.md shows. Needs root, BIRD and FRR (`scripts/setup.sh test`); never skipped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use komnet_netns_tests::bgp::{
    announced, hub_dc, require_bird, require_frr, route_via, RouterDaemon,
};
use komnet_netns_tests::district::{destination, District, Options, DMS};
use komnet_netns_tests::{require_root_and_tools, wait_until};

/// Nohfelden's prefix (its tenant's, as the policy gives it to the town hall's spoke), which
/// the hub carrying the spoke announces.
const NOHFELDEN_PREFIX: &str = "10.30.0.0/16";

#[test]
fn the_routers_route_follows_a_failed_over_spoke_and_a_restarted_hub_does_not_take_it_back() {
    require_root_and_tools();
    require_bird();
    failover_and_restart(RouterDaemon::Bird);
}

/// The guide's FRR configuration for the data-centre router (read from docs/operations.md):
/// it takes the hubs' routes, follows the failover and keeps the route on a hub restart.
#[test]
fn an_frr_router_configured_as_the_guide_shows_follows_a_failed_over_spoke() {
    require_root_and_tools();
    require_bird();
    require_frr();
    failover_and_restart(RouterDaemon::Frr);
}

fn failover_and_restart(router_daemon: RouterDaemon) {
    let started = Instant::now();
    let mut district = District::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_netprobe")),
        Options {
            two_hubs: true,
            bgp: true,
            router: router_daemon,
            ..Options::default()
        },
    )
    .expect("district with two hub machines and BGP");
    let router = district.dc.name().to_owned();
    let noh = district.staff("nohfelden");
    let dms = destination(DMS);
    println!("district up after {:?}", started.elapsed());

    // Nohfelden uses hub 1: hub 1 announces its LAN, the router routes it there.
    wait_until(
        "the router to route Nohfelden's LAN to hub 1",
        Duration::from_secs(20),
        || Ok((route_via(&router, noh.addr)? == Some(hub_dc(0))).then_some(())),
    )
    .unwrap_or_else(|e| {
        let bgp = district.bgp.as_ref().expect("bgp");
        panic!(
            "{e:#}\nhub1's table: {:?}\nhub1's log:\n{}\nhub1's BIRD:\n{}\nthe router's daemon:\n{}",
            announced(&bgp.hub_ns[0]),
            district.hubs[0].log_tail(),
            bgp.hub_birds[0].log_tail(),
            bgp.router.log_tail()
        )
    });
    assert!(
        district
            .probe(&noh, &[dms], Duration::from_millis(1500))
            .expect("probe")[0],
        "Nohfelden does not reach the DMS through hub 1"
    );
    {
        let bgp = district.bgp.as_ref().expect("bgp");
        let on_hub2 = announced(&bgp.hub_ns[1]).expect("hub2's table");
        assert!(
            !on_hub2.iter().any(|p| p == NOHFELDEN_PREFIX),
            "hub 2 announces Nohfelden without carrying its session: {on_hub2:?}"
        );
    }

    // kill -9 of hub 1: the spoke fails over, hub 2 announces, the router follows.
    let t0 = Instant::now();
    district.hubs[0].kill_hard().expect("kill -9 hub1");
    let mut moved = None;
    let back = loop {
        let probing = t0.elapsed();
        if moved.is_none() && route_via(&router, noh.addr).expect("route") == Some(hub_dc(1)) {
            moved = Some(t0.elapsed());
        }
        if district
            .probe(&noh, &[dms], Duration::from_millis(500))
            .expect("probe")[0]
        {
            break t0.elapsed();
        }
        assert!(
            probing < Duration::from_secs(20),
            "Nohfelden does not reach the DMS 20 s after hub 1 was killed; router's route: {:?}\nhub2's log:\n{}",
            route_via(&router, noh.addr),
            district.hubs[1].log_tail()
        );
    };
    let moved = match moved {
        Some(m) => m,
        None => {
            wait_until(
                "the router's route to hub 2",
                Duration::from_secs(5),
                || Ok((route_via(&router, noh.addr)? == Some(hub_dc(1))).then_some(())),
            )
            .expect("the route follows the spoke");
            t0.elapsed()
        }
    };
    println!(
        "{router_daemon:?} router, after kill -9 of hub 1: the router routes Nohfelden to hub 2 after {moved:?}, the DMS answers again after {back:?}"
    );
    assert!(back <= Duration::from_secs(5), "failover took {back:?}");

    // Hub 1 comes back. It has no session with the spoke (which stays on hub 2), so it
    // announces nothing: the router's route must not move, not even for a moment.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let watching = watching.clone();
        let router = router.clone();
        let staff_addr = noh.addr;
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while watching.load(Ordering::Relaxed) {
                seen.push(route_via(&router, staff_addr).ok().flatten());
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    district.hubs[0].start().expect("restart hub1");
    let restarted = Instant::now();
    district.hubs[0]
        .wait_running(1, Duration::from_secs(30))
        .expect("hub1 runs again");
    // Longer than a spoke's hold (3 s): a hub that announced on handshakes would have done
    // so by now.
    std::thread::sleep(Duration::from_secs(4));
    watching.store(false, Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    let elsewhere: Vec<_> = seen.iter().filter(|v| **v != Some(hub_dc(1))).collect();
    assert!(
        elsewhere.is_empty(),
        "the router's route left hub 2 while hub 1 restarted ({} of {} samples): {elsewhere:?}",
        elsewhere.len(),
        seen.len()
    );
    let bgp = district.bgp.as_ref().expect("bgp");
    let on_hub1 = announced(&bgp.hub_ns[0]).expect("hub1's table");
    assert!(
        on_hub1.is_empty(),
        "restarted hub 1 announces {on_hub1:?} without carrying a session"
    );
    let on_hub2 = announced(&bgp.hub_ns[1]).expect("hub2's table");
    assert!(
        on_hub2.iter().any(|p| p == NOHFELDEN_PREFIX),
        "hub 2 no longer announces Nohfelden: {on_hub2:?}"
    );
    // The hubs say so themselves (`komnet status`, /metrics).
    let status = district.hubs[0].status().expect("hub1's status");
    assert_eq!(
        status["announced"]["prefixes"],
        serde_json::json!([]),
        "{status:#}"
    );
    let status = district.hubs[1].status().expect("hub2's status");
    assert!(
        status["announced"]["prefixes"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == NOHFELDEN_PREFIX)),
        "{status:#}"
    );
    println!(
        "hub 1 restarted and running for {:?}: {} samples of the router's route, all via hub 2",
        restarted.elapsed(),
        seen.len()
    );
    assert!(
        district
            .probe(&noh, &[dms], Duration::from_millis(1500))
            .expect("probe")[0],
        "Nohfelden lost the DMS while hub 1 restarted"
    );
    println!("test took {:?}", started.elapsed());
}

/// Drops (`true`) or lets through again (`false`) the WireGuard traffic between hub 1 and
/// Nohfelden's spoke (192.0.2.11), in hub 1's namespace: a path that breaks while both live.
fn cut_hub1_from_nohfelden(district: &District, cut: bool) {
    let ns = &district.bgp.as_ref().expect("bgp").hub_ns[0];
    if cut {
        let rules = "table inet komnet_test_cut {\n\
             chain inp { type filter hook input priority -10; policy accept;\n\
             ip saddr 192.0.2.11 udp dport 51820 drop\n}\n\
             chain out { type filter hook output priority -10; policy accept;\n\
             ip daddr 192.0.2.11 udp sport 51820 drop\n}\n}\n";
        let file = district.path("cut.nft");
        std::fs::write(&file, rules).expect("rules");
        ns.exec(&["nft", "-f", &file.to_string_lossy()])
            .expect("cut");
    } else {
        ns.exec(&["nft", "delete", "table", "inet", "komnet_test_cut"])
            .expect("uncut");
    }
}

/// The spoke moves while hub 1 stays up: hub 1 withdraws once the spoke fell silent for the
/// hold time, hub 2 announces it, and when the path to hub 1 is back (hub 1 still has the
/// spoke's endpoint and keeps sending it keepalives) hub 1 does not take the route back.
#[test]
fn a_hub_the_spoke_left_while_it_lived_withdraws_and_does_not_take_the_route_back() {
    require_root_and_tools();
    require_bird();
    let started = Instant::now();
    let mut district = District::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_netprobe")),
        Options {
            two_hubs: true,
            bgp: true,
            ..Options::default()
        },
    )
    .expect("district with two hub machines and BGP");
    let router = district.dc.name().to_owned();
    let noh = district.staff("nohfelden");
    let dms = destination(DMS);
    wait_until(
        "the router to route Nohfelden's LAN to hub 1",
        Duration::from_secs(20),
        || Ok((route_via(&router, noh.addr)? == Some(hub_dc(0))).then_some(())),
    )
    .expect("hub 1 announces Nohfelden");

    let t0 = Instant::now();
    cut_hub1_from_nohfelden(&district, true);
    let mut moved = None;
    let back = loop {
        let probing = t0.elapsed();
        if route_via(&router, noh.addr).expect("route") == Some(hub_dc(1)) {
            let moved = *moved.get_or_insert(probing);
            if district
                .probe(&noh, &[dms], Duration::from_millis(500))
                .expect("probe")[0]
            {
                break (moved, t0.elapsed());
            }
        }
        assert!(
            probing < Duration::from_secs(20),
            "Nohfelden is not routed through hub 2 20 s after its path to hub 1 broke: {:?}\nhub1's log:\n{}",
            route_via(&router, noh.addr),
            district.hubs[0].log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (moved, back) = back;
    println!(
        "path to hub 1 cut: the router routes Nohfelden to hub 2 after {moved:?}, the DMS answers after {back:?}"
    );
    // The spoke fails over after 3 s of silence, hub 1 withdraws after 3 s without data:
    // about the same moment.
    assert!(
        moved <= Duration::from_secs(5),
        "the route moved after {moved:?}"
    );
    assert!(
        back <= Duration::from_secs(5),
        "the DMS answered after {back:?}"
    );
    let bgp = district.bgp.as_ref().expect("bgp");
    assert!(
        !announced(&bgp.hub_ns[0])
            .expect("hub1's table")
            .iter()
            .any(|p| p == NOHFELDEN_PREFIX),
        "hub 1 still announces Nohfelden"
    );

    cut_hub1_from_nohfelden(&district, false);
    let mut seen = Vec::new();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        seen.push(route_via(&router, noh.addr).expect("route"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let elsewhere: Vec<_> = seen.iter().filter(|v| **v != Some(hub_dc(1))).collect();
    assert!(
        elsewhere.is_empty(),
        "the route left hub 2 after the path to hub 1 came back ({} of {} samples): {elsewhere:?}",
        elsewhere.len(),
        seen.len()
    );
    assert!(
        district
            .probe(&noh, &[dms], Duration::from_millis(1500))
            .expect("probe")[0],
        "Nohfelden lost the DMS"
    );

    // Hub 2 watches its BGP session (`[bgp] bird_socket`): the router drops it, hub 2 says so
    // within its 5 s watch; the router takes it back, hub 2 says that too.
    let session_of_hub2 = |district: &District| -> Result<(bool, String), anyhow::Error> {
        let status = district.hubs[1].status()?;
        let session = &status["announced"]["sessions"]["sessions"][0];
        anyhow::ensure!(session["name"] == "dc", "no session dc: {status:#}");
        Ok((
            session["established"] == true,
            session["state"].as_str().unwrap_or_default().to_owned(),
        ))
    };
    wait_until(
        "hub 2 to see its BGP session up",
        Duration::from_secs(10),
        || Ok(session_of_hub2(&district)?.0.then_some(())),
    )
    .expect("hub 2 reads its session from BIRD");
    let router_bird = |district: &mut District, command: &str| {
        district
            .bgp
            .as_mut()
            .expect("bgp")
            .router
            .bird()
            .expect("the router runs BIRD")
            .birdc(&[command, "hub2"])
            .unwrap_or_else(|e| panic!("birdc {command} hub2: {e:#}"));
    };
    router_bird(&mut district, "disable");
    let cut = Instant::now();
    let state = wait_until(
        "hub 2 to report its BGP session down",
        Duration::from_secs(10),
        || {
            let (up, state) = session_of_hub2(&district)?;
            Ok((!up).then_some(state))
        },
    )
    .expect("hub 2 notices");
    println!(
        "router dropped hub 2's session: hub 2 reported it after {:?} ({state})",
        cut.elapsed()
    );
    let metrics = district.hubs[1].metrics_text().expect("hub2's metrics");
    assert!(
        metrics.contains("komnet_bgp_session_established{session=\"dc\"} 0\n")
            && metrics.contains("komnet_events_total{event=\"bgp_session_down\"} 1\n"),
        "{metrics}"
    );
    assert!(district.hubs[1]
        .status_text()
        .expect("komnet status")
        .contains("bgp session dc: WARNING not established"),);
    router_bird(&mut district, "enable");
    wait_until(
        "hub 2 to see its BGP session up again",
        Duration::from_secs(20),
        || Ok(session_of_hub2(&district)?.0.then_some(())),
    )
    .expect("hub 2 reports the session back");
    println!("test took {:?}", started.elapsed());
}
