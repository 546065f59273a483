//! Conformance with the kernel's WireGuard (issue 20): clamped keys, low-order points, padding,
//! ICMP unreachable, sticky source addresses, routing loops.

use super::*;

#[test]
fn the_private_key_is_stored_and_shown_clamped() {
    // Low three bits set, top bit set, second-highest clear: all three get clamped.
    let mut unclamped = [0x5a; 32];
    unclamped[0] = 0xff;
    unclamped[31] = 0x80;
    let mut clamped = unclamped;
    clamped[0] = 0xf8;
    clamped[31] = 0x40;
    let mut core = Core::new(Instant::now(), [7; 32]);
    let set = uapi::parse_set([format!("private_key={}", hex::encode(unclamped)).as_str()])
        .expect("a well-formed request");
    uapi::apply_set(&mut core, Instant::now(), &set);
    assert_eq!(core.private_key(), Some(clamped));
    assert_eq!(core.public_key(), Some(public_key(clamped)));
    let get = uapi::format_get(&mut core, Instant::now(), wall_clock());
    assert!(
        get.contains(&format!("private_key={}\n", hex::encode(clamped))),
        "{get}"
    );
    // Setting the clamped form of the same key changes nothing (no session restart).
    assert_eq!(komnet_gateway::core::clamp_private_key(unclamped), clamped);
}

/// The low-order points of Curve25519 the kernel selftest tries (as 32-byte keys).
fn low_order_points() -> Vec<[u8; 32]> {
    let mut points = vec![[0u8; 32]];
    let mut one = [0u8; 32];
    one[0] = 1;
    points.push(one);
    for hex_point in [
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ] {
        let mut p = [0u8; 32];
        hex::decode_to_slice(hex_point, &mut p).expect("literal");
        points.push(p);
    }
    points
}

#[test]
fn a_peer_with_a_low_order_public_key_gets_no_handshake_ever() {
    let start = Instant::now();
    let mut core = Core::new(start, [3; 32]);
    core.set_private_key(start, Some(KEY_A));
    let mut ids = Vec::new();
    for (i, point) in low_order_points().into_iter().enumerate() {
        let id = core.upsert_peer(start, point).expect("room");
        core.set_endpoint(id, SocketAddr::from(([127, 0, 0, 1], 1111)));
        core.add_allowed_ip(id, net(&format!("10.9.{i}.0/24")));
        // Turning keepalive on sends one at once to a normal peer.
        core.set_persistent_keepalive(start, id, Some(1));
        ids.push(id);
    }
    let mut out = vec![0u8; BUF_LEN];
    for (i, id) in ids.iter().enumerate() {
        let packet = ipv4_udp(A_V4, Ipv4Addr::new(10, 9, i as u8, 1), b"hello?");
        assert_eq!(
            core.handle_tun_packet(start, &packet, &mut out),
            Action::Drop(DropReason::LowOrderKey)
        );
        assert_eq!(
            core.peer_drops(*id)
                .expect("configured")
                .get(DropReason::LowOrderKey),
            1
        );
    }
    let mut now = start;
    for _ in 0..(30_000 / TIMER_INTERVAL.as_millis()) {
        now += TIMER_INTERVAL;
        core.update_timers(now);
    }
    assert_eq!(core.poll_transmit(&mut out), None, "nothing is ever sent");
    assert_eq!(core.peers_with_state(), 0);

    // A new private key is checked again: still refused, and a normal peer is unaffected.
    core.set_private_key(now, Some(KEY_C));
    let b = core.upsert_peer(now, public_key(KEY_B)).expect("room");
    core.set_endpoint(b, b_addr());
    core.add_allowed_ip(b, net("10.0.0.2/32"));
    assert_eq!(
        core.handle_tun_packet(
            now,
            &ipv4_udp(A_V4, Ipv4Addr::new(10, 9, 0, 1), b"x"),
            &mut out
        ),
        Action::Drop(DropReason::LowOrderKey)
    );
    assert!(matches!(
        core.handle_tun_packet(now, &ipv4_udp(A_V4, B_V4, b"x"), &mut out),
        Action::ToNetwork { .. }
    ));
}

#[test]
fn a_packet_from_a_disallowed_source_is_dropped_but_its_endpoint_is_learnt() {
    let mut pair = Pair::new();
    pair.handshake();
    let (rx_before, _) = pair.transfer_counters(Side::A);
    // B roams and its first packet from there carries a source it may not use.
    let roamed = SocketAddr::from(([203, 0, 113, 9], 61000));
    pair.b.addr = roamed;
    pair.send(
        Side::B,
        &ipv4_udp(Ipv4Addr::new(10, 0, 0, 99), A_V4, b"spoofed"),
    );
    pair.run();
    assert_eq!(pair.a.drops, vec![DropReason::SpoofedSource]);
    assert!(pair.a.tun.is_empty());
    assert_eq!(
        pair.peer_endpoint(Side::A),
        Some(roamed),
        "the kernel learns the endpoint from any authenticated packet"
    );
    let (rx_after, _) = pair.transfer_counters(Side::A);
    assert_eq!(
        rx_after, rx_before,
        "a dishonest packet is not counted as received"
    );
}

#[test]
fn data_packets_are_padded_to_sixteen_bytes_but_never_past_the_mtu() {
    use komnet_gateway::core::padding_len;
    assert_eq!(padding_len(84, 1420), 12);
    assert_eq!(padding_len(96, 1420), 0);
    assert_eq!(padding_len(1419, 1420), 1, "up to the MTU, not to 1424");
    assert_eq!(padding_len(1420, 1420), 0);
    assert_eq!(padding_len(0, 1420), 0, "keepalives stay empty");
    assert_eq!(
        padding_len(85, 0),
        11,
        "unknown MTU: the next multiple of 16"
    );

    let mut pair = Pair::new();
    pair.a.core.set_mtu(1420);
    pair.b.core.set_mtu(1420);
    pair.handshake();
    let (_, tx_before) = pair.transfer_counters(Side::A);
    let packet = ipv4_udp(A_V4, B_V4, &[7u8; 56]); // 84 bytes, as a ping
    let Action::ToNetwork { len, .. } = pair.send(Side::A, &packet) else {
        panic!("a session exists");
    };
    assert_eq!(len, 96 + DATA_OVERHEAD, "84 bytes padded to 96");
    pair.run();
    assert_eq!(
        pair.b.tun.last(),
        Some(&packet),
        "the padding is gone on arrival"
    );
    let (_, tx_after) = pair.transfer_counters(Side::A);
    assert_eq!(tx_after - tx_before, 128);
}

#[test]
fn a_packet_no_peer_can_take_is_answered_with_icmp_unreachable_within_a_rate_limit() {
    let mut pair = Pair::new();
    pair.handshake();
    let mut out = vec![0u8; BUF_LEN];
    let now = pair.now;
    let stray = ipv4_udp(A_V4, C_V4, b"for nobody");
    let Action::Unreachable {
        reason,
        offset,
        len,
    } = pair.a.core.handle_tun_packet(now, &stray, &mut out)
    else {
        panic!("no answer to an unroutable packet");
    };
    assert_eq!(reason, DropReason::NoRoute);
    let answer = &out[offset..offset + len];
    assert_eq!(
        komnet_gateway::unreachable::addresses(answer),
        Some((C_V4.into(), A_V4.into())),
        "from the unreachable address to the sender"
    );
    assert_eq!((answer[20], answer[21]), (3, 1), "ICMP host unreachable");
    assert_eq!(&answer[28..], &stray[..], "quotes the packet");
    // At most ICMP_PER_SECOND answers per second; then plain drops until the next second.
    let limit = komnet_gateway::core::ICMP_PER_SECOND;
    for _ in 1..limit {
        assert!(matches!(
            pair.a.core.handle_tun_packet(now, &stray, &mut out),
            Action::Unreachable { .. }
        ));
    }
    assert_eq!(
        pair.a.core.handle_tun_packet(now, &stray, &mut out),
        Action::Drop(DropReason::NoRoute)
    );
    let later = now + Duration::from_secs(1);
    assert!(matches!(
        pair.a.core.handle_tun_packet(later, &stray, &mut out),
        Action::Unreachable { .. }
    ));
    assert!(pair.in_flight.is_empty(), "nothing went to the network");
}

/// Issue 20, defect 8: B is multi-homed (198.51.100.2, its routing table's choice, and
/// 198.51.100.3) and A talks to the second address. Everything B sends A (the handshake
/// response, data, keepalives) leaves from the address A sent to, so A's endpoint, its NAT and
/// its firewalls keep seeing the address they talk to.
#[test]
fn a_multi_homed_peer_answers_from_the_address_it_was_sent_to() {
    let mut pair = Pair::new();
    let second = SocketAddr::from(([198, 51, 100, 3], b_addr().port()));
    pair.b.more_addrs.push(second.ip());
    let a_peer = pair.a.peer;
    pair.a.core.set_endpoint(a_peer, second);
    pair.handshake();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"answer"));
    let b_peer = pair.b.peer;
    let now = pair.now;
    pair.b.core.set_persistent_keepalive(now, b_peer, Some(1));
    pair.advance(Duration::from_secs(3));

    let from_b: Vec<SocketAddr> = pair
        .sent
        .iter()
        .filter(|s| s.from == Side::B)
        .map(|s| s.datagram.src)
        .collect();
    assert!(from_b.len() >= 4, "response, data, keepalives: {from_b:?}");
    assert!(
        from_b.iter().all(|src| *src == second),
        "B sent from other addresses than the one A talks to: {from_b:?}"
    );
    assert_eq!(pair.peer_endpoint(Side::A), Some(second));
    assert_eq!(pair.b.core.source_ip(b_peer), Some(second.ip()));
}

/// Defect 8, "not too sticky": when B loses the address A talked to, its next datagram cannot
/// leave from it (the driver's send fails): the core forgets it, the datagram goes
/// from the routing table's choice, A follows B there and traffic goes on.
#[test]
fn a_sticky_source_address_the_host_lost_is_forgotten() {
    let mut pair = Pair::new();
    let second = SocketAddr::from(([198, 51, 100, 3], b_addr().port()));
    pair.b.more_addrs.push(second.ip());
    let a_peer = pair.a.peer;
    pair.a.core.set_endpoint(a_peer, second);
    pair.handshake();
    let b_peer = pair.b.peer;
    assert_eq!(pair.b.core.source_ip(b_peer), Some(second.ip()));

    pair.b.more_addrs.clear();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"after renumbering"));
    assert_eq!(pair.sent.last().map(|s| s.datagram.src), Some(b_addr()));
    assert_eq!(pair.b.core.source_ip(b_peer), None);
    assert_eq!(
        pair.peer_endpoint(Side::A),
        Some(b_addr()),
        "A roamed with B"
    );
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"and back"));
    assert_eq!(
        pair.b.core.source_ip(b_peer),
        Some(b_addr().ip()),
        "learnt again from A's packet to the remaining address"
    );
}

/// Defect 8, like the kernel: an endpoint set by configuration drops the learnt source
/// address, and so does a handshake initiation that went unanswered (its retransmission leaves
/// from the routing table's choice, in case the sticky address is what no longer works).
#[test]
fn a_sticky_source_is_dropped_by_a_configured_endpoint_and_by_an_unanswered_handshake() {
    let mut pair = Pair::new();
    let second = SocketAddr::from(([198, 51, 100, 3], b_addr().port()));
    pair.b.more_addrs.push(second.ip());
    let a_peer = pair.a.peer;
    pair.a.core.set_endpoint(a_peer, second);
    pair.handshake();
    let b_peer = pair.b.peer;
    assert_eq!(pair.b.core.source_ip(b_peer), Some(second.ip()));
    pair.b.core.set_endpoint(b_peer, a_addr());
    assert_eq!(pair.b.core.source_ip(b_peer), None);

    // Learnt again, then B starts a handshake that A never hears.
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"again"));
    assert_eq!(pair.b.core.source_ip(b_peer), Some(second.ip()));
    let now = pair.now;
    pair.b.core.force_handshake(now, b_peer);
    pair.collect_queued();
    let first = pair.take_in_flight(second, a_addr());
    assert_eq!(first.message_type(), MSG_HANDSHAKE_INIT);
    pair.lost.push(first);
    // REKEY_TIMEOUT plus boringtun's up to 1/3 s of jitter, without delivering.
    let mut retry = None;
    for _ in 0..40 {
        pair.tick(TIMER_INTERVAL);
        if let Some(at) = pair
            .in_flight
            .iter()
            .position(|d| d.message_type() == MSG_HANDSHAKE_INIT)
        {
            retry = pair.in_flight.remove(at);
            break;
        }
    }
    let retry = retry.expect("B retransmits its initiation within REKEY_TIMEOUT");
    assert!(pair.now - now >= REKEY_TIMEOUT);
    assert_eq!(
        retry.src,
        b_addr(),
        "the retry leaves from the routing table's choice"
    );
    assert_eq!(pair.b.core.source_ip(b_peer), None);
}

/// The selftest's routing loop: A's route to B's endpoint goes through the tunnel itself (B's
/// allowed IPs cover it), so the host hands A's own encrypted datagram back to it through the
/// TUN device. The core drops it as a routing loop, as the kernel does (ELOOP), instead of
/// encrypting it again for ever; other traffic to that address still goes.
#[test]
fn an_own_datagram_routed_back_into_the_tunnel_is_dropped_as_a_routing_loop() {
    let mut pair = Pair::new();
    pair.handshake();
    let b = pair.a.peer;
    pair.a.core.set_listen_port(a_addr().port());
    let std::net::IpAddr::V4(endpoint_ip) = b_addr().ip() else {
        panic!("B's test address is IPv4");
    };
    pair.a
        .core
        .add_allowed_ip(b, net(&format!("{endpoint_ip}/32")));
    let with_ports = |sport: u16, dport: u16| {
        let mut p = ipv4_udp(A_V4, endpoint_ip, b"looped");
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    };
    let own = with_ports(a_addr().port(), b_addr().port());
    assert_eq!(
        pair.send(Side::A, &own),
        Action::Drop(DropReason::RoutingLoop)
    );
    assert_eq!(pair.a.peer_drops(DropReason::RoutingLoop), 1);
    for other in [
        with_ports(a_addr().port() + 1, b_addr().port()),
        with_ports(a_addr().port(), b_addr().port() + 1),
    ] {
        assert!(matches!(
            pair.send(Side::A, &other),
            Action::ToNetwork { .. }
        ));
    }
}
