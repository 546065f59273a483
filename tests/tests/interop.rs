//! End-to-end tests: two network namespaces joined by a veth pair, a userspace WireGuard daemon
//! in each, configured with the stock `wg` tools. Every scenario runs for each pairing of
//! komnet-gateway and Debian's wireguard-go; the left side speaks first (it initiates the
//! handshake). The wireguard-go <-> wireguard-go pairing is the control: when a komnet variant
//! fails and the control passes, the difference is in komnet.
//!
//! Needs root (see `require_root_and_tools`); never skipped. Run with
//! `cargo test -p komnet-netns-tests --release` after `cargo build --release -p komnet-gateway`.

use komnet_netns_tests::{
    is_socket_path, parse_wg_dump, process_executable, require_root_and_tools, run_ok,
    same_executable, uapi_socket_path, unix_now, wait_until, wg_quick, write_private_file,
    DaemonKind, End, KeyPair, Netns, Tunnel, TunnelConfig,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const MB: u64 = 1 << 20;

/// Generates one `#[test]` per daemon pairing for a scenario `fn NAME(left, right)`.
macro_rules! for_each_pairing {
    ($scenario:ident) => {
        mod $scenario {
            use super::DaemonKind::{Komnet, WireguardGo};

            #[test]
            fn komnet_to_komnet() {
                super::$scenario(Komnet, Komnet);
            }

            #[test]
            fn komnet_to_wireguard_go() {
                super::$scenario(Komnet, WireguardGo);
            }

            #[test]
            fn wireguard_go_to_komnet() {
                super::$scenario(WireguardGo, Komnet);
            }

            #[test]
            fn wireguard_go_to_wireguard_go() {
                super::$scenario(WireguardGo, WireguardGo);
            }
        }
    };
}

fn tunnel(config: TunnelConfig) -> Tunnel {
    Tunnel::new(config).unwrap_or_else(|err| {
        panic!(
            "cannot set up the {} -> {} tunnel ({:?} underlay): {err:?}",
            config.left, config.right, config.underlay
        )
    })
}

fn v4(tunnel: &Tunnel, end: End) -> IpAddr {
    tunnel.side(end).tunnel_v4.into()
}

fn v6(tunnel: &Tunnel, end: End) -> IpAddr {
    tunnel.side(end).tunnel_v6.into()
}

/// Left pings right until the first reply: the handshake is done when this returns.
fn establish(tunnel: &Tunnel) {
    let summary = tunnel
        .ping_until_reply(End::Left, v4(tunnel, End::Right), 10)
        .expect("the first ping through a fresh tunnel (left initiates) must get a reply");
    assert!(summary.received >= 1, "{summary:?}");
}

/// `count` pings from `from` to `to`, all of which must come back.
fn assert_ping_works(tunnel: &Tunnel, from: End, to: IpAddr, count: u32) {
    let summary = tunnel
        .ping(from, to, count)
        .unwrap_or_else(|err| panic!("ping {from:?} -> {to} could not run: {err:?}"));
    assert!(
        summary.all_replied(),
        "ping {from:?} -> {to}: {} of {} replies ({summary:?})",
        summary.received,
        summary.transmitted
    );
}

/// Three pings from `from` to `to`, none of which may come back.
fn assert_ping_fails(tunnel: &Tunnel, from: End, to: IpAddr) {
    let summary = tunnel
        .ping(from, to, 3)
        .unwrap_or_else(|err| panic!("ping {from:?} -> {to} could not run: {err:?}"));
    assert!(
        summary.transmitted >= 3,
        "ping sent too little: {summary:?}"
    );
    assert_eq!(
        summary.received, 0,
        "ping {from:?} -> {to} must fail but got replies: {summary:?}"
    );
}

fn assert_transfer(tunnel: &Tunnel, from: End, bytes: u64) {
    let report = tunnel
        .transfer(from, bytes, Duration::from_secs(120))
        .unwrap_or_else(|err| panic!("TCP transfer of {bytes} bytes from {from:?}: {err:?}"));
    assert_eq!(
        report.received_bytes, bytes,
        "receiver got a different byte count: {report:?}"
    );
    assert!(
        report.checksums_match(),
        "sha256 differs between the ends: {report:?}"
    );
    eprintln!(
        "tunnel {} ({} -> {}): {} MB {from:?}->{:?} in {:.2} s = {:.2} Gbit/s, sha256 {}",
        tunnel.id(),
        tunnel.left.kind,
        tunnel.right.kind,
        bytes / MB,
        from.other(),
        report.seconds,
        report.gbit_per_s(),
        report.sent_sha256
    );
}

fn assert_daemons_running(tunnel: &mut Tunnel) {
    tunnel
        .ensure_daemons_running()
        .expect("both daemons must still be running at the end of the test");
}

// ---------------------------------------------------------------------------------------------

/// Ping through the tunnel, inner IPv4 and IPv6, both directions; both sides' `wg show` report
/// the handshake, traffic and each other's endpoint.
fn ping_inner_v4_and_v6(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right));
    establish(&t);
    for (from, to) in [
        (End::Left, v4(&t, End::Right)),
        (End::Left, v6(&t, End::Right)),
        (End::Right, v4(&t, End::Left)),
        (End::Right, v6(&t, End::Left)),
    ] {
        assert_ping_works(&t, from, to, 5);
    }
    for end in [End::Left, End::Right] {
        let view = t.peer_view(end).expect("wg show dump");
        assert!(
            view.latest_handshake.is_some(),
            "{end:?}: no handshake: {view:?}"
        );
        assert!(
            view.rx_bytes > 0 && view.tx_bytes > 0,
            "{end:?}: no traffic: {view:?}"
        );
        assert_eq!(
            view.endpoint,
            Some(t.endpoint_of(end.other())),
            "{end:?}: {view:?}"
        );
    }
    assert_daemons_running(&mut t);
}
for_each_pairing!(ping_inner_v4_and_v6);

/// 50 MB over TCP each way, sha256 compared at both ends; the peers' byte counters agree.
fn tcp_transfer_50mb_both_directions(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right));
    establish(&t);
    assert_transfer(&t, End::Left, 50 * MB);
    assert_transfer(&t, End::Right, 50 * MB);
    let left_view = t.peer_view(End::Left).expect("wg show dump");
    let right_view = t.peer_view(End::Right).expect("wg show dump");
    for view in [&left_view, &right_view] {
        assert!(
            view.tx_bytes >= 50 * MB && view.rx_bytes >= 50 * MB,
            "each side sent and received at least 50 MB: {view:?}"
        );
    }
    assert_daemons_running(&mut t);
}
for_each_pairing!(tcp_transfer_50mb_both_directions);

/// Endpoints on the IPv6 underlay ([fd00:n::x]:port): pings and a transfer over inner IPv6.
fn ipv6_underlay(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right).with_ipv6_underlay());
    establish(&t);
    assert_ping_works(&t, End::Left, v6(&t, End::Right), 3);
    assert_ping_works(&t, End::Right, v4(&t, End::Left), 3);
    assert_ping_works(&t, End::Right, v6(&t, End::Left), 3);
    let report = t
        .start_transfer(End::Left, true, 20 * MB, None)
        .and_then(|transfer| transfer.finish(Duration::from_secs(120)))
        .expect("TCP transfer over inner IPv6 through the IPv6 underlay");
    assert!(report.checksums_match(), "{report:?}");
    for end in [End::Left, End::Right] {
        let view = t.peer_view(end).expect("wg show dump");
        let endpoint = view.endpoint.expect("endpoint set");
        assert!(
            endpoint.is_ipv6(),
            "{end:?} must use the IPv6 underlay: {view:?}"
        );
        assert_eq!(endpoint, t.endpoint_of(end.other()), "{end:?}: {view:?}");
    }
    assert_daemons_running(&mut t);
}
for_each_pairing!(ipv6_underlay);

/// The left side changes its underlay address in the middle of a (paced) TCP transfer. It keeps
/// sending, so the right side learns the new endpoint from its authenticated packets: the
/// transfer completes intact, and `wg show` on the right shows the new endpoint.
fn endpoint_roaming_during_transfer(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right));
    establish(&t);
    let old_endpoint = t.endpoint_of(End::Left);
    // 16 MB at 4 MB/s: about 4 s, with the move 1 s in.
    let mut transfer = t
        .start_transfer(End::Left, false, 16 * MB, Some(4 * MB))
        .expect("start the transfer");
    thread::sleep(Duration::from_secs(1));
    assert!(transfer.is_running(), "the transfer ended before the move");
    let new_endpoint = t
        .roam(End::Left)
        .expect("move left to a new underlay address");
    assert_ne!(old_endpoint, new_endpoint);
    assert!(transfer.is_running(), "the transfer ended during the move");
    let report = transfer
        .finish(Duration::from_secs(60))
        .expect("the transfer must resume after the move and complete");
    assert!(report.checksums_match(), "{report:?}");

    assert_ping_works(&t, End::Left, v4(&t, End::Right), 3);
    assert_right_follows(&t, new_endpoint);
    // Traffic the right side starts now goes to the new endpoint.
    assert_ping_works(&t, End::Right, v4(&t, End::Left), 3);
    assert_ping_works(&t, End::Right, v6(&t, End::Left), 3);
    assert_daemons_running(&mut t);
}
for_each_pairing!(endpoint_roaming_during_transfer);

/// The right side's `wg show` must show the left side's new endpoint within a few seconds.
fn assert_right_follows(t: &Tunnel, new_endpoint: std::net::SocketAddr) {
    let seen = wait_until(
        "the right side to show the left side's new endpoint",
        Duration::from_secs(5),
        || {
            let view = t.peer_view(End::Right)?;
            Ok((view.endpoint == Some(new_endpoint)).then_some(view))
        },
    )
    .expect("right's `wg show` must show the new endpoint");
    assert_eq!(seen.endpoint, Some(new_endpoint));
}

/// Roaming on the IPv6 underlay, between pings: the left side moves to another address of the
/// /64, pings, and the right side follows.
fn endpoint_roaming_ipv6_underlay(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right).with_ipv6_underlay());
    establish(&t);
    let old_endpoint = t.endpoint_of(End::Left);
    let new_endpoint = t
        .roam(End::Left)
        .expect("move left to a new underlay address");
    assert_ne!(old_endpoint, new_endpoint);
    // The first packets after the move may go out from the old, now missing, address while
    // the daemon notices: give it a few seconds.
    t.ping_until_reply(End::Left, v4(&t, End::Right), 10)
        .expect("traffic from the moved side must resume");
    assert_right_follows(&t, new_endpoint);
    assert_ping_works(&t, End::Right, v6(&t, End::Left), 3);
    assert_daemons_running(&mut t);
}
for_each_pairing!(endpoint_roaming_ipv6_underlay);

/// The right daemon is killed with SIGKILL (a crash: no clean-up, its UAPI socket stays behind)
/// and started again with the same key and configuration. The restarted side speaks first: a
/// new handshake happens and traffic flows both ways.
fn restart_of_one_side(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right));
    establish(&t);
    let left_handshake_before = t
        .peer_view(End::Left)
        .expect("wg show dump")
        .latest_handshake
        .expect("handshake before the restart");
    t.crash_daemon(End::Right)
        .expect("kill -9 the right daemon");
    let right_socket = uapi_socket_path(&t.right.ifname);
    assert!(
        is_socket_path(&right_socket),
        "precondition: a killed daemon leaves its socket {} behind",
        right_socket.display()
    );
    t.start_daemon(End::Right)
        .expect("a fresh daemon must start despite the stale socket, and take the configuration");
    let fresh = t.peer_view(End::Right).expect("wg show dump");
    assert_eq!(
        fresh.latest_handshake, None,
        "a restarted daemon starts without a session: {fresh:?}"
    );
    t.ping_until_reply(End::Right, v4(&t, End::Left), 10)
        .expect("the restarted side must handshake again and get replies");
    let right_view = t.peer_view(End::Right).expect("wg show dump");
    assert!(right_view.latest_handshake.is_some(), "{right_view:?}");
    let left_view = t.peer_view(End::Left).expect("wg show dump");
    assert!(
        left_view.latest_handshake.expect("handshake") >= left_handshake_before,
        "{left_view:?}"
    );
    assert_ping_works(&t, End::Left, v4(&t, End::Right), 3);
    assert_ping_works(&t, End::Left, v6(&t, End::Right), 3);
    assert_transfer(&t, End::Left, 5 * MB);
    assert_daemons_running(&mut t);
}
for_each_pairing!(restart_of_one_side);

/// `wg set IF peer KEY remove` on the left stops traffic both ways; adding the peer back brings
/// it back (so it was the removal that stopped it).
fn peer_removal_stops_traffic(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right));
    establish(&t);
    assert_ping_works(&t, End::Right, v4(&t, End::Left), 2);
    let right_key = t.right.keys.public.clone();
    t.left
        .wg(&["set", &t.left.ifname, "peer", &right_key, "remove"])
        .expect("wg set peer remove");
    let dump = t.dump(End::Left).expect("wg show dump");
    assert!(dump.peers.is_empty(), "the peer must be gone: {dump:?}");
    assert_ping_fails(&t, End::Left, v4(&t, End::Right));
    assert_ping_fails(&t, End::Left, v6(&t, End::Right));
    assert_ping_fails(&t, End::Right, v4(&t, End::Left));

    t.configure_wireguard(End::Left).expect("add the peer back");
    t.ping_until_reply(End::Left, v4(&t, End::Right), 10)
        .expect("traffic must resume once the peer is back");
    assert_daemons_running(&mut t);
}
for_each_pairing!(peer_removal_stops_traffic);

/// The right side sends packets whose inner source is not in the left side's allowed-ips for
/// it (it owns the address on its tunnel interface, so they are properly encrypted). The left
/// daemon must drop them: no reply, and the left TUN device receives nothing. Normal pings from
/// the right side still work.
fn spoofed_inner_source_is_dropped(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right));
    establish(&t);
    let octet = (t.id() % 256) as u8;
    let spoofed_v4: IpAddr = [10, 203, octet, 99].into();
    let spoofed_v6: IpAddr = format!("fd01:{:x}::99", t.id() as u16)
        .parse()
        .expect("valid IPv6 literal");
    // The spoofed addresses are /32 and /128 so they add no subnet route. The IPv6 one is
    // deprecated (preferred_lft 0): the kernel would otherwise pick it as the source of the
    // normal pings to the left side too (it is used only where `ping -I` asks for it).
    let v4_cidr = format!("{spoofed_v4}/32");
    let v6_cidr = format!("{spoofed_v6}/128");
    let right_if = t.right.ifname.as_str();
    for args in [
        ["address", "add", v4_cidr.as_str(), "dev", right_if].as_slice(),
        &[
            "address",
            "add",
            &v6_cidr,
            "dev",
            right_if,
            "nodad",
            "preferred_lft",
            "0",
        ],
    ] {
        t.right
            .netns
            .ip(args)
            .expect("add a spoofed source address on the right tunnel interface");
    }
    let left_rx_before = t.left.tunnel_link_stats().expect("ip -s link").rx_packets;
    let right_tx_before = t.peer_view(End::Right).expect("wg show dump").tx_bytes;

    for (source, destination) in [
        (spoofed_v4, v4(&t, End::Left)),
        (spoofed_v6, v6(&t, End::Left)),
    ] {
        let summary = komnet_netns_tests::ping(&t.right.netns, Some(source), destination, 3)
            .expect("ping -I runs");
        assert_eq!(summary.transmitted, 3, "{summary:?}");
        assert_eq!(
            summary.received, 0,
            "a reply to the spoofed source {source} means the left side accepted it: {summary:?}"
        );
    }
    let left_rx_after = t.left.tunnel_link_stats().expect("ip -s link").rx_packets;
    let right_tx_after = t.peer_view(End::Right).expect("wg show dump").tx_bytes;
    // Precondition: the spoofed packets really went out encrypted; otherwise the left side's
    // filter was never exercised.
    assert!(
        right_tx_after - right_tx_before >= 6 * 84,
        "the right daemon did not send the spoofed pings (tx {right_tx_before} -> \
         {right_tx_after}), so the left side's filtering was not tested"
    );
    assert_eq!(
        left_rx_after, left_rx_before,
        "the left TUN device received packets with a source outside the peer's allowed-ips"
    );

    assert_ping_works(&t, End::Right, v4(&t, End::Left), 3);
    assert_ping_works(&t, End::Right, v6(&t, End::Left), 3);
    let left_rx_normal = t.left.tunnel_link_stats().expect("ip -s link").rx_packets;
    assert!(
        left_rx_normal >= left_rx_after + 6,
        "normal pings must reach the left TUN device: rx {left_rx_after} -> {left_rx_normal}"
    );
    assert_daemons_running(&mut t);
}
for_each_pairing!(spoofed_inner_source_is_dropped);

/// The left side is brought up by `wg-quick up` with WG_QUICK_USERSPACE_IMPLEMENTATION set to
/// the left daemon (there is no kernel WireGuard here, so wg-quick starts it), pings the right
/// side, and `wg-quick down` removes the interface and ends the daemon.
fn wg_quick_up_and_down(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right));
    t.stop_daemon(End::Left)
        .expect("stop the fixture's left daemon");
    let config = t
        .write_wg_quick_config(End::Left)
        .expect("write the config");
    let implementation = left.binary().expect("daemon binary");
    let ifname = t.left.ifname.clone();

    let up = wg_quick(&t.left.netns, "up", &config, &implementation).expect("wg-quick up runs");
    assert!(up.succeeded(), "wg-quick up failed: {up}");
    assert!(
        is_socket_path(&uapi_socket_path(&ifname)),
        "no UAPI socket after wg-quick up: {up}"
    );
    let pids = t.left.netns.pids().expect("ip netns pids");
    assert_eq!(
        pids.len(),
        1,
        "exactly the daemon wg-quick started must run: {pids:?}"
    );
    let running = process_executable(pids[0]).expect("/proc/PID/exe");
    assert!(
        same_executable(&running, &implementation),
        "wg-quick started {}, not {}",
        running.display(),
        implementation.display()
    );
    let dump = t
        .dump(End::Left)
        .expect("wg show dump of the wg-quick interface");
    assert_eq!(dump.public_key, t.left.keys.public);
    assert_eq!(dump.listen_port, t.left.listen_port);
    let peer = dump
        .peer(&t.right.keys.public)
        .expect("wg-quick configured the peer");
    assert_eq!(peer.endpoint, Some(t.endpoint_of(End::Right)));
    let allowed: BTreeSet<&str> = peer.allowed_ips.iter().map(String::as_str).collect();
    let expected_allowed = t.allowed_ips_of(End::Right);
    assert_eq!(
        allowed,
        expected_allowed.split(',').collect::<BTreeSet<_>>()
    );

    establish(&t);
    assert_ping_works(&t, End::Left, v6(&t, End::Right), 3);
    assert_ping_works(&t, End::Right, v4(&t, End::Left), 3);

    let down =
        wg_quick(&t.left.netns, "down", &config, &implementation).expect("wg-quick down runs");
    assert!(down.succeeded(), "wg-quick down failed: {down}");
    assert!(
        !t.left.netns.link_exists(&ifname),
        "{ifname} still exists after wg-quick down"
    );
    wait_until(
        "the daemon to exit after wg-quick down",
        Duration::from_secs(5),
        || Ok(t.left.netns.pids()?.is_empty().then_some(())),
    )
    .expect("the daemon started by wg-quick must exit once its interface is deleted");
    wait_until(
        "the UAPI socket to be removed after wg-quick down",
        Duration::from_secs(5),
        || Ok((!uapi_socket_path(&ifname).exists()).then_some(())),
    )
    .expect("the daemon must remove its UAPI socket when it exits");
}
for_each_pairing!(wg_quick_up_and_down);

/// Parses a wg config into sections of key -> set of values (AllowedIPs order and line
/// splitting do not matter), sections in a canonical order: equal when configs are equivalent.
fn normalize_config(text: &str) -> Vec<BTreeMap<String, BTreeSet<String>>> {
    let mut sections: Vec<BTreeMap<String, BTreeSet<String>>> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            let mut section = BTreeMap::new();
            section.insert("[section]".to_owned(), BTreeSet::from([line.to_owned()]));
            sections.push(section);
        } else if let (Some(section), Some((key, values))) =
            (sections.last_mut(), line.split_once('='))
        {
            let values = values.split(',').map(|value| value.trim().to_owned());
            section
                .entry(key.trim().to_lowercase())
                .or_default()
                .extend(values);
        }
    }
    sections.sort();
    sections
}

/// `wg show` in its forms, and `wg showconf` round-tripping through `wg syncconf` and
/// `wg setconf`, against `end`'s daemon.
fn check_wg_tools(t: &Tunnel, end: End) {
    let side = t.side(end);
    let other = t.side(end.other());
    let ifname = side.ifname.as_str();

    let show = side.wg(&["show", ifname]).expect("wg show");
    let endpoint_line = format!("endpoint: {}", t.endpoint_of(end.other()));
    for expected in [
        format!("interface: {ifname}"),
        format!("public key: {}", side.keys.public),
        "private key: (hidden)".to_owned(),
        format!("listening port: {}", side.listen_port),
        format!("peer: {}", other.keys.public),
        endpoint_line,
        format!("{}/32", other.tunnel_v4),
        format!("{}/128", other.tunnel_v6),
        "latest handshake:".to_owned(),
        "transfer:".to_owned(),
    ] {
        assert!(
            show.contains(&expected),
            "{end:?}: `wg show` lacks {expected:?}:\n{show}"
        );
    }
    let field = |name: &str| side.wg(&["show", ifname, name]).expect("wg show FIELD");
    assert_eq!(field("public-key").trim(), side.keys.public);
    assert_eq!(field("private-key").trim(), side.keys.private);
    assert_eq!(field("listen-port").trim(), side.listen_port.to_string());
    assert_eq!(
        field("endpoints").trim(),
        format!("{}\t{}", other.keys.public, t.endpoint_of(end.other()))
    );
    assert_eq!(field("peers").trim(), other.keys.public);

    // latest-handshakes: "KEY\tUNIXTIME", within a few seconds of now just after a handshake.
    let handshakes = field("latest-handshakes");
    let (key, time) = handshakes
        .trim()
        .split_once('\t')
        .unwrap_or_else(|| panic!("{end:?}: malformed latest-handshakes {handshakes:?}"));
    assert_eq!(key, other.keys.public);
    let time: u64 = time.parse().expect("latest handshake is a Unix time");
    let now = unix_now();
    assert!(
        time <= now + 2 && now - time <= 10,
        "{end:?}: latest handshake {time} is not within a few seconds of now ({now})"
    );

    // showconf
    let original = side.wg(&["showconf", ifname]).expect("wg showconf");
    for expected in [
        "[Interface]".to_owned(),
        format!("PrivateKey = {}", side.keys.private),
        format!("ListenPort = {}", side.listen_port),
        "[Peer]".to_owned(),
        format!("PublicKey = {}", other.keys.public),
        format!("Endpoint = {}", t.endpoint_of(end.other())),
        "AllowedIPs = ".to_owned(),
    ] {
        assert!(
            original.contains(&expected),
            "{end:?}: showconf lacks {expected:?}"
        );
    }
    let config_path = t.work_dir().join(format!("{ifname}.showconf"));
    write_private_file(&config_path, &original).expect("save showconf output");
    let config_arg = config_path.to_string_lossy().into_owned();

    // syncconf: an extra peer disappears, the live session with the real peer is kept.
    let extra = KeyPair::generate().expect("wg genkey");
    let extra_allowed = format!("10.203.{}.50/32", t.id() % 256);
    side.wg(&[
        "set",
        ifname,
        "peer",
        &extra.public,
        "allowed-ips",
        &extra_allowed,
    ])
    .expect("add an extra peer");
    let with_extra =
        parse_wg_dump(&side.wg(&["show", ifname, "dump"]).expect("dump")).expect("parse");
    assert_eq!(with_extra.peers.len(), 2, "{with_extra:?}");
    let session_before = with_extra
        .peer(&other.keys.public)
        .expect("real peer")
        .latest_handshake;
    side.wg(&["syncconf", ifname, &config_arg])
        .expect("wg syncconf");
    let synced = side.dump().expect("dump");
    assert_eq!(
        synced.peers.len(),
        1,
        "syncconf must remove the extra peer: {synced:?}"
    );
    assert_eq!(
        synced
            .peer(&other.keys.public)
            .expect("real peer")
            .latest_handshake,
        session_before,
        "syncconf with an unchanged peer must keep its session"
    );
    let after_sync = side.wg(&["showconf", ifname]).expect("wg showconf");
    assert_eq!(
        normalize_config(&after_sync),
        normalize_config(&original),
        "{end:?}: showconf after syncconf differs:\n{after_sync}\nvs\n{original}"
    );
    assert_ping_works(t, end, v4(t, end.other()), 2);

    // setconf: replaces the whole configuration (the peer is re-created, so it handshakes
    // anew), and showconf gives back the same configuration.
    side.wg(&["setconf", ifname, &config_arg])
        .expect("wg setconf");
    let after_set = side.wg(&["showconf", ifname]).expect("wg showconf");
    assert_eq!(
        normalize_config(&after_set),
        normalize_config(&original),
        "{end:?}: showconf after setconf differs:\n{after_set}\nvs\n{original}"
    );
    t.ping_until_reply(end, v4(t, end.other()), 10)
        .expect("traffic after setconf");
    assert_ping_works(t, end, v6(t, end.other()), 2);
}

/// `wg show`, `wg showconf`, `wg setconf`, `wg syncconf` against both daemons.
fn wg_tools_round_trip(left: DaemonKind, right: DaemonKind) {
    let mut t = tunnel(TunnelConfig::new(left, right));
    establish(&t);
    assert_ping_works(&t, End::Right, v4(&t, End::Left), 1);
    check_wg_tools(&t, End::Left);
    check_wg_tools(&t, End::Right);
    assert_daemons_running(&mut t);
}
for_each_pairing!(wg_tools_round_trip);

/// The preconditions check passes on a machine that can run these tests (elsewhere it fails
/// with the list of what is missing, never a silent skip), and the namespace guard cleans up:
/// on drop it ends the processes inside and deletes the namespace.
#[test]
fn namespace_guard_cleans_up() {
    require_root_and_tools();
    let netns = Netns::new("guard").expect("create a namespace");
    let name = netns.name().to_owned();
    let listed = |name: &str| {
        run_ok(
            Command::new("ip").args(["netns", "list"]),
            Duration::from_secs(10),
        )
        .expect("ip netns list")
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name))
    };
    assert!(listed(&name), "{name} not in `ip netns list`");
    let mut sleeper = netns
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("start a process in the namespace");
    let sleeper_pid = sleeper.id();
    wait_until(
        "the process to show up in the namespace",
        Duration::from_secs(5),
        || Ok(netns.pids()?.contains(&sleeper_pid).then_some(())),
    )
    .expect("ip netns pids sees the process");
    let started = Instant::now();
    drop(netns);
    let status = sleeper.wait().expect("reap the process");
    assert!(
        !status.success(),
        "the process must have been ended by a signal: {status}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!listed(&name), "{name} still exists after drop");
}
