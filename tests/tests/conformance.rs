//! WireGuard conformance: the scenarios of the kernel's own selftest
//! (tools/testing/selftests/wireguard/netns.sh) that a userspace daemon can meet, written from
//! what it checks, in the selftest's topology (`komnet_netns_tests::conformance::Trio`: daemons
//! born in one namespace, interfaces moved to two others). Each scenario runs against
//! komnet-gateway and, as the reference, wireguard-go 0.0.20231211
//! (`scripts/wireguard-go-2023.sh`); where wireguard-go is known to differ from the kernel the
//! reference run is left out and docs/conformance.md says so.
//!
//! Needs root; never skipped.

// Scenario steps panic with context on purpose: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use komnet_netns_tests::conformance::{Trio, TUNNEL_V4, TUNNEL_V6};
use komnet_netns_tests::{uapi_socket_path, wait_until, DaemonKind};

/// One `#[test]` per implementation for a scenario `fn NAME(kind)`.
macro_rules! scenario {
    ($name:ident: $($kind:ident),+) => {
        mod $name {
            $(
                #[test]
                #[allow(non_snake_case)]
                fn $kind() {
                    super::$name(komnet_netns_tests::DaemonKind::$kind);
                }
            )+
        }
    };
}

fn trio(kind: DaemonKind) -> Trio {
    Trio::new(kind).unwrap_or_else(|e| panic!("building the selftest topology for {kind}: {e:?}"))
}

/// Defect 1 of issue 20: the interface is created in one namespace and moved to another (the
/// selftest does this for every interface). The daemon keeps running, its UAPI keeps
/// answering, traffic flows, and deleting the interface in its new namespace still stops it.
fn interface_moved_to_another_namespace(kind: DaemonKind) {
    let mut t = trio(kind);
    t.set_loopback_endpoints(false).unwrap();
    // Longer than the 250 ms in which the old name check shut the daemon down.
    std::thread::sleep(Duration::from_millis(600));
    t.ensure_running().unwrap();
    t.ping(1, &["-c", "10", "-f", "-W", "1"], TUNNEL_V4[0])
        .unwrap();
    t.ping(0, &["-c", "10", "-f", "-W", "1"], TUNNEL_V6[1])
        .unwrap();
    let show = t
        .wg(0, &["show", &t.ifname[0], "latest-handshakes"])
        .unwrap();
    assert!(
        show.contains(&t.keys[1].public) && !show.trim_end().ends_with("\t0"),
        "UAPI after the move: {show:?}"
    );
    t.ensure_running().unwrap();

    // Deleted where it now lives: the daemon notices through its TUN descriptor.
    let ifname = t.ifname[0].clone();
    t.end_ns(0).ip(&["link", "del", "dev", &ifname]).unwrap();
    let daemon = t.daemon_mut(0).unwrap();
    let status = wait_until(
        "the daemon to exit after its moved interface was deleted",
        Duration::from_secs(5),
        || Ok(daemon.poll_exit()),
    )
    .unwrap();
    assert!(status.success(), "{status}");
    if kind == DaemonKind::Komnet {
        assert!(!uapi_socket_path(&ifname).exists());
    }
}
scenario!(interface_moved_to_another_namespace: Komnet, WireguardGo2023);
