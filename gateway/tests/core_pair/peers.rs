//! Bad input, removed peers, and what the core reports about its peers.

use super::*;

#[test]
fn bad_input_is_dropped_with_a_reason_and_counted_never_panicking() {
    let mut pair = Pair::new();
    pair.handshake();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"ack"));
    let real: Vec<Datagram> = pair.sent.iter().map(|s| s.datagram.clone()).collect();
    let live_index = real
        .iter()
        .rev()
        .find(|d| d.message_type() == MSG_DATA)
        .map(|d| receiver_index(&d.bytes))
        .expect("data was sent");

    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut garbage: Vec<Vec<u8>> = Vec::new();
    for len in 0..=300 {
        garbage.push(vec![0; len]);
        let mut random = vec![0; len];
        rng.fill_bytes(&mut random);
        garbage.push(random.clone());
        // The same random bytes behind each valid message header (type, zero reserved bytes
        // and, where there is one, a receiver index in use) so they get past the classifier.
        for message_type in [
            MSG_HANDSHAKE_INIT,
            MSG_HANDSHAKE_RESP,
            MSG_COOKIE_REPLY,
            MSG_DATA,
        ] {
            let mut headed = random.clone();
            if len >= 4 {
                headed[..4].copy_from_slice(&[message_type, 0, 0, 0]);
            }
            let index_at = if message_type == MSG_HANDSHAKE_RESP {
                8
            } else {
                4
            };
            if message_type != MSG_HANDSHAKE_INIT && len >= index_at + 4 {
                headed[index_at..index_at + 4].copy_from_slice(&live_index.to_le_bytes());
            }
            garbage.push(headed);
        }
    }
    // Every real message cut short, and one byte too long.
    for datagram in &real {
        for cut in 0..datagram.bytes.len() {
            garbage.push(datagram.bytes[..cut].to_vec());
        }
        let mut longer = datagram.bytes.clone();
        longer.push(0);
        garbage.push(longer);
    }
    let total_garbage = garbage.len();

    let deliver_garbage = |pair: &mut Pair, to: Side, bytes: Vec<u8>| {
        let before = pair.node(to).drops_counted();
        let dst = pair.node(to).addr;
        let len = bytes.len();
        let head: Vec<u8> = bytes.iter().copied().take(8).collect();
        let action = pair.deliver(Datagram {
            src: stranger_addr(),
            dst,
            bytes,
        });
        assert!(
            matches!(action, Some(Action::Drop(_))),
            "{len}-byte datagram starting {head:02x?} to {to:?}: {action:?}"
        );
        assert_eq!(
            pair.node(to).drops_counted(),
            before + 1,
            "{len}-byte datagram starting {head:02x?} to {to:?} not counted"
        );
    };
    for bytes in garbage {
        deliver_garbage(&mut pair, Side::A, bytes.clone());
        deliver_garbage(&mut pair, Side::B, bytes);
    }

    // Valid MAC1 (anyone with the public key can compute it) and garbage behind it: these
    // get past the DoS checks and into the Noise code. One per source, to stay under the
    // per-source handshake limit.
    for (i, (to, message_type, len)) in [
        (Side::A, MSG_HANDSHAKE_INIT, HANDSHAKE_INIT_LEN),
        (Side::B, MSG_HANDSHAKE_INIT, HANDSHAKE_INIT_LEN),
        (Side::A, MSG_HANDSHAKE_RESP, HANDSHAKE_RESP_LEN),
        (Side::B, MSG_HANDSHAKE_RESP, HANDSHAKE_RESP_LEN),
    ]
    .into_iter()
    .enumerate()
    {
        let mut message = vec![0; len];
        rng.fill_bytes(&mut message);
        message[..4].copy_from_slice(&[message_type, 0, 0, 0]);
        if message_type == MSG_HANDSHAKE_RESP {
            message[8..12].copy_from_slice(&live_index.to_le_bytes());
        }
        let responder = match to {
            Side::A => public_key(KEY_A),
            Side::B => public_key(KEY_B),
        };
        sign_mac1(&mut message, &responder);
        let before = pair.node(to).drops_counted();
        let dst = pair.node(to).addr;
        let last = u8::try_from(i).expect("few");
        let action = pair.deliver(Datagram {
            src: SocketAddr::from(([203, 0, 113, last], 1000)),
            dst,
            bytes: message,
        });
        assert!(
            matches!(action, Some(Action::Drop(reason)) if reason != DropReason::InvalidMac),
            "garbage with a valid MAC1 to {to:?}: {action:?}"
        );
        assert_eq!(pair.node(to).drops_counted(), before + 1);
    }

    assert!(pair.a.drops.len() > total_garbage && pair.b.drops.len() > total_garbage);
    for node in [&pair.a, &pair.b] {
        let reasons: HashSet<DropReason> = node.drops.iter().copied().collect();
        for expected in [
            DropReason::Malformed,
            DropReason::InvalidMac,
            DropReason::DecryptFailed,
        ] {
            assert!(reasons.contains(&expected), "{expected} never seen");
        }
    }
    // None of it was taken for the peer, or moved it.
    assert_eq!(pair.peer_endpoint(Side::A), Some(b_addr()));
    assert_eq!(pair.peer_endpoint(Side::B), Some(a_addr()));
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"still here"));
    pair.transfer(Side::B, &ipv6_udp(B_V6, A_V6, b"me too"));
}

#[test]
fn a_removed_peer_is_unknown_and_unroutable() {
    let mut pair = Pair::new();
    pair.handshake();
    pair.send(Side::B, &ipv4_udp(B_V4, A_V4, b"after removal"));
    let orphan = pair.take_in_flight(b_addr(), a_addr());

    let removed = pair.a.peer;
    pair.a.core.remove_peer(removed);
    assert_eq!(pair.a.core.peer_count(), 0);
    assert!(pair.a.core.peer_drops(removed).is_none());

    assert_eq!(
        pair.deliver(orphan.clone()),
        Some(Action::Drop(DropReason::UnknownIndex))
    );
    // Unroutable: refused and answered with an ICMP unreachable (see unreachable.rs).
    assert!(matches!(
        pair.send(Side::A, &ipv4_udp(A_V4, B_V4, b"v4")),
        Action::Unreachable {
            reason: DropReason::NoRoute,
            ..
        }
    ));
    assert!(matches!(
        pair.send(Side::A, &ipv6_udp(A_V6, B_V6, b"v6")),
        Action::Unreachable {
            reason: DropReason::NoRoute,
            ..
        }
    ));
    let device = pair.a.core.device_drops();
    assert_eq!(device.get(DropReason::UnknownIndex), 1);
    assert_eq!(device.get(DropReason::NoRoute), 2);
    assert!(
        pair.in_flight.is_empty(),
        "nothing was sent to the removed peer"
    );

    // A new peer may reuse the slot; the old index must still lead nowhere.
    let now = pair.now;
    let newcomer = pair
        .a
        .core
        .upsert_peer(now, public_key(KEY_C))
        .expect("room for a peer");
    assert_ne!(newcomer, removed);
    assert_eq!(
        pair.deliver(orphan),
        Some(Action::Drop(DropReason::UnknownIndex))
    );
    assert!(pair.a.tun.is_empty());
}

#[test]
fn last_handshake_is_reported_as_wall_clock_time() {
    let mut pair = Pair::new();
    // The driver ticks the timers from the start; let some idle time pass first.
    pair.advance(Duration::from_secs(30));
    let now = pair.now;
    let before = pair.a.core.peers(now, wall_clock());
    assert_eq!(before[0].last_handshake, None, "no handshake yet");

    pair.handshake();
    let handshake_at = pair.now;
    let since = Duration::from_secs(7);
    pair.advance(since);
    assert_eq!(pair.now - handshake_at, since);

    let wall = wall_clock();
    let expected = wall - since;
    for side in [Side::A, Side::B] {
        let now = pair.now;
        let info = pair.node(side).core.peers(now, wall);
        let reported = info[0]
            .last_handshake
            .unwrap_or_else(|| panic!("{side:?} reports no handshake"));
        // boringtun stamps a handshake with the time of the last timer tick.
        let error = reported
            .duration_since(expected)
            .unwrap_or_else(|e| e.duration());
        assert!(
            error <= TIMER_INTERVAL,
            "{side:?}: last handshake {reported:?}, expected {expected:?}"
        );
    }

    let now = pair.now;
    let get = uapi::format_get(&mut pair.a.core, now, wall);
    let expected_secs = expected
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    assert!(
        get.contains(&format!("last_handshake_time_sec={expected_secs}\n")),
        "{get}"
    );
}

/// Housekeeping reads `activity_into` several times a second instead of `peers`: it must say
/// the same of each peer, and `allowed_ips_version` must move exactly when addresses change.
#[test]
fn activity_and_allowed_ips_of_say_what_peers_says() {
    let mut pair = Pair::new();
    pair.advance(Duration::from_secs(2));
    pair.handshake();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"and back"));
    pair.advance(Duration::from_secs(1));
    for side in [Side::A, Side::B] {
        let now = pair.now;
        let core = &mut pair.node(side).core;
        let version = core.allowed_ips_version();
        let info = core.peers(now, wall_clock());
        let mut activity = vec![];
        core.activity_into(now, &mut activity);
        assert_eq!(activity.len(), 1);
        let (a, p) = (activity[0], &info[0]);
        let wall_form = a.handshake_at.map(|at| wall_clock() - (now - at));
        assert_eq!(
            (a.id, a.public_key, wall_form, a.last_data),
            (p.id, p.public_key, p.last_handshake, p.last_data),
            "{side:?}"
        );
        assert!(
            a.handshake_at.is_some() && a.last_data.is_some(),
            "{side:?}"
        );
        // Read again a tick later, without a new handshake: the same instant, so housekeeping
        // does not take it for a new handshake and claim the peer's routes again.
        core.activity_into(now + TIMER_INTERVAL, &mut activity);
        assert_eq!(activity[0].handshake_at, a.handshake_at, "{side:?}");
        assert_eq!(core.allowed_ips_of(a.id), p.allowed_ips, "{side:?}");
        // Traffic and handshakes leave the version alone; an address change moves it.
        assert_eq!(core.allowed_ips_version(), version);
        core.add_allowed_ip(a.id, net("10.9.0.0/16"));
        assert_ne!(core.allowed_ips_version(), version);
        assert!(core.allowed_ips_of(a.id).contains(&net("10.9.0.0/16")));
    }
    let id = pair.a.peer;
    pair.a.core.remove_peer(id);
    assert!(pair.a.core.allowed_ips_of(id).is_empty());
    let now = pair.now;
    let mut activity = vec![];
    pair.a.core.activity_into(now, &mut activity);
    assert!(activity.is_empty());
}

/// `last_data` says whether the peer uses this device as its gateway (a hub announces a
/// spoke's routes by it): data and keepalives count, handshakes do not, so a hub that only
/// gets its own handshakes answered (by a spoke for which it is the standby) does not count
/// the spoke as its own.
#[test]
fn last_data_moves_with_data_and_keepalives_not_with_handshakes() {
    let mut pair = Pair::new();
    pair.advance(Duration::from_secs(3));
    let last_data = |pair: &mut Pair, side: Side| {
        let now = pair.now;
        pair.node(side).core.peers(now, wall_clock())[0].last_data
    };
    assert_eq!(last_data(&mut pair, Side::A), None);
    // A initiates: B gets the initiation, A the response, then B A's keepalive and packet.
    pair.handshake();
    let handshake_at = pair.now;
    assert_eq!(last_data(&mut pair, Side::A), None, "a response is no data");
    assert_eq!(last_data(&mut pair, Side::B), Some(handshake_at));
    pair.advance(Duration::from_secs(2));
    assert_eq!(last_data(&mut pair, Side::A), None);
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"back"));
    assert_eq!(last_data(&mut pair, Side::A), Some(pair.now));
    // A packet with a source B may not use is refused and does not count.
    pair.advance(Duration::from_secs(2));
    let refused = pair.send(Side::B, &ipv4_udp(C_V4, A_V4, b"spoofed"));
    assert!(matches!(refused, Action::ToNetwork { .. }), "{refused:?}");
    let sent_back_at = pair.now - Duration::from_secs(2);
    pair.run();
    assert_eq!(last_data(&mut pair, Side::A), Some(sent_back_at));
}
