//! Sessions: the first handshake, rekeying, replay, the allowed-IPs source filter, roaming and
//! key expiry.

use super::*;

#[test]
fn handshake_delivers_the_queued_packet_then_data_flows_both_ways() {
    let mut pair = Pair::via_uapi();
    let first = ipv4_udp(A_V4, B_V4, b"queued until the handshake is done");

    let action = pair.send(Side::A, &first);
    assert!(
        matches!(action, Action::ToNetwork { dst, len: HANDSHAKE_INIT_LEN, .. } if dst == b_addr()),
        "the first packet starts a handshake instead of going out: {action:?}"
    );
    assert_eq!(pair.in_flight[0].message_type(), MSG_HANDSHAKE_INIT);
    assert!(pair.b.tun.is_empty());

    pair.run();

    assert_eq!(
        pair.b.tun,
        vec![first.clone()],
        "identical bytes arrive at B"
    );
    let wire: Vec<(Side, u8, usize)> = pair
        .sent
        .iter()
        .map(|s| (s.from, s.datagram.message_type(), s.datagram.bytes.len()))
        .collect();
    assert_eq!(
        wire,
        [
            (Side::A, MSG_HANDSHAKE_INIT, HANDSHAKE_INIT_LEN),
            (Side::B, MSG_HANDSHAKE_RESP, HANDSHAKE_RESP_LEN),
            // The initiator confirms the session with a keepalive, then flushes its queue
            // (padded to a multiple of 16).
            (Side::A, MSG_DATA, DATA_OVERHEAD),
            (
                Side::A,
                MSG_DATA,
                first.len().next_multiple_of(16) + DATA_OVERHEAD
            ),
        ]
    );

    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"v4 back"));
    pair.transfer(Side::A, &ipv6_udp(A_V6, B_V6, b"v6 there"));
    pair.transfer(Side::B, &ipv6_udp(B_V6, A_V6, b"v6 back"));
    let big = ipv4_udp(A_V4, B_V4, &[0x5a; 1400]);
    pair.transfer(Side::A, &big);

    assert_eq!(pair.b.tun.len(), 3);
    assert_eq!(pair.a.tun.len(), 2);
    assert!(pair.a.drops.is_empty() && pair.b.drops.is_empty());
    assert_eq!(pair.a.drops_counted() + pair.b.drops_counted(), 0);
    assert_eq!(pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len(), 1);
    assert!(pair.times_sent(Side::B, MSG_HANDSHAKE_INIT).is_empty());

    let now = pair.now;
    let a_sees_b = &pair.a.core.peers(now, wall_clock())[0];
    assert_eq!(a_sees_b.public_key, public_key(KEY_B));
    assert!(a_sees_b.tx_bytes > 0 && a_sees_b.rx_bytes > 0);
}

/// One packet each way, every simulated second.
fn chat_for(pair: &mut Pair, until: Duration) {
    while pair.elapsed() < until {
        let second = u32::try_from(pair.elapsed().as_secs()).expect("short test");
        pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, &second.to_be_bytes()));
        pair.transfer(Side::B, &ipv6_udp(B_V6, A_V6, &second.to_be_bytes()));
        pair.advance(Duration::from_secs(1));
    }
}

#[test]
fn the_initiator_rekeys_every_two_minutes_and_traffic_never_stops() {
    let mut pair = Pair::new();
    pair.handshake();

    chat_for(&mut pair, REKEY_AFTER_TIME + Duration::from_secs(10));
    let inits = pair.times_sent(Side::A, MSG_HANDSHAKE_INIT);
    assert_eq!(inits.len(), 2, "one rekey in the first 130 s: {inits:?}");
    assert!(
        inits[1] >= REKEY_AFTER_TIME && inits[1] <= REKEY_AFTER_TIME + Duration::from_secs(2),
        "rekey at {:?}",
        inits[1]
    );

    let ten_minutes = Duration::from_secs(600);
    chat_for(&mut pair, ten_minutes);
    let inits = pair.times_sent(Side::A, MSG_HANDSHAKE_INIT);
    assert!(inits.len() >= 5, "handshakes in 10 minutes: {inits:?}");
    for gap in inits.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap >= REKEY_AFTER_TIME && gap <= REKEY_AFTER_TIME + Duration::from_secs(2),
            "sessions renew every REKEY_AFTER_TIME: {inits:?}"
        );
    }
    let last_init = *inits.last().expect("at least one");
    assert!(pair.elapsed() - last_init <= REKEY_AFTER_TIME + Duration::from_secs(2));

    // Only the initiator rekeys on time (paper, section 6.2); every init got a response.
    assert!(pair.times_sent(Side::B, MSG_HANDSHAKE_INIT).is_empty());
    assert_eq!(
        pair.times_sent(Side::B, MSG_HANDSHAKE_RESP).len(),
        inits.len()
    );

    // Each handshake really produced a session that carried data: A's data packets name one
    // receiver index per session.
    let sessions: HashSet<u32> = pair
        .sent
        .iter()
        .filter(|s| s.from == Side::A && s.datagram.message_type() == MSG_DATA)
        .map(|s| receiver_index(&s.datagram.bytes))
        .collect();
    assert_eq!(sessions.len(), inits.len());

    assert!(pair.lost.is_empty());
    assert!(pair.a.drops.is_empty(), "A dropped {:?}", pair.a.drops);
    assert!(pair.b.drops.is_empty(), "B dropped {:?}", pair.b.drops);
    assert_eq!(pair.a.tun.len(), pair.b.tun.len() - 1, "everything arrived");
}

#[test]
fn a_replayed_data_packet_is_dropped_and_counted() {
    let mut pair = Pair::new();
    pair.handshake();

    let first = ipv4_udp(B_V4, A_V4, b"first");
    let second = ipv4_udp(B_V4, A_V4, b"second");
    pair.send(Side::B, &first);
    let first_wire = pair.take_in_flight(b_addr(), a_addr());
    pair.send(Side::B, &second);
    let second_wire = pair.take_in_flight(b_addr(), a_addr());

    // Reordering within the window is fine...
    assert!(matches!(
        pair.deliver(second_wire.clone()),
        Some(Action::ToTun { .. })
    ));
    assert!(matches!(
        pair.deliver(first_wire.clone()),
        Some(Action::ToTun { .. })
    ));
    assert_eq!(pair.a.tun, vec![second, first]);

    // ...a second copy of either is not.
    assert_eq!(
        pair.deliver(first_wire),
        Some(Action::Drop(DropReason::Replay))
    );
    assert_eq!(
        pair.deliver(second_wire),
        Some(Action::Drop(DropReason::Replay))
    );
    assert_eq!(pair.a.tun.len(), 2, "no replay reached the TUN device");
    assert_eq!(pair.a.peer_drops(DropReason::Replay), 2);
    assert_eq!(pair.a.drops_counted(), 2);
    assert_eq!(pair.a.core.device_drops().total(), 0);
}

#[test]
fn a_packet_with_a_source_outside_the_senders_allowed_ips_is_dropped() {
    let mut pair = Pair::new();
    // A third peer on A owns 10.0.0.3: B must not be able to speak for it either.
    let now = pair.now;
    let c = pair
        .a
        .core
        .upsert_peer(now, public_key(KEY_C))
        .expect("room for a second peer");
    pair.a.core.add_allowed_ip(c, net("10.0.0.3/32"));
    pair.handshake();

    let spoofed = [
        ipv4_udp(Ipv4Addr::new(10, 0, 0, 99), A_V4, b"nobody's address"),
        ipv4_udp(C_V4, A_V4, b"another peer's address"),
        ipv4_udp(A_V4, A_V4, b"A's own address"),
        ipv6_udp(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99), A_V6, b"v6"),
    ];
    for packet in &spoofed {
        // B's core routes by destination only, so it encrypts and sends these.
        assert!(matches!(
            pair.send(Side::B, packet),
            Action::ToNetwork { .. }
        ));
        pair.run();
    }

    assert!(pair.a.tun.is_empty(), "no spoofed packet reached the TUN");
    assert_eq!(pair.a.drops, vec![DropReason::SpoofedSource; spoofed.len()]);
    assert_eq!(
        pair.a.peer_drops(DropReason::SpoofedSource),
        spoofed.len() as u64
    );
    let c_drops = pair.a.core.peer_drops(c).expect("C is configured");
    assert_eq!(c_drops.total(), 0, "the drop is B's, not C's");

    // The session is fine: B's own address still gets through.
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"legit"));
}

#[test]
fn a_roaming_peer_is_followed_only_after_it_authenticates() {
    let mut pair = Pair::new();
    pair.handshake();
    assert_eq!(pair.peer_endpoint(Side::A), Some(b_addr()));

    // Someone else replays B's session index with a tampered body: no authentication, no move.
    pair.send(Side::B, &ipv4_udp(B_V4, A_V4, b"captured"));
    let mut forged = pair.take_in_flight(b_addr(), a_addr());
    forged.src = stranger_addr();
    *forged.bytes.last_mut().expect("non-empty") ^= 1;
    assert_eq!(
        pair.deliver(forged),
        Some(Action::Drop(DropReason::DecryptFailed))
    );
    assert_eq!(pair.peer_endpoint(Side::A), Some(b_addr()));

    // B's NAT rebinds: its datagrams now come from elsewhere.
    let roamed = SocketAddr::from(([203, 0, 113, 9], 61000));
    pair.b.addr = roamed;
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"from my new address"));
    assert_eq!(pair.peer_endpoint(Side::A), Some(roamed));

    let answer = ipv6_udp(A_V6, B_V6, b"found you");
    let action = pair.send(Side::A, &answer);
    assert!(
        matches!(action, Action::ToNetwork { dst, .. } if dst == roamed),
        "A answers at the new address: {action:?}"
    );
    pair.run();
    assert_eq!(pair.b.tun.last(), Some(&answer));
    assert!(pair.lost.is_empty(), "nothing went to the old address");
}

#[test]
fn keys_expire_after_silence_and_the_next_packet_starts_over() {
    let mut pair = Pair::new();
    pair.handshake();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"ack"));
    let handshake_at = pair.elapsed();

    // A packet of the current session, held back until its keys are gone.
    pair.send(Side::B, &ipv4_udp(B_V4, A_V4, b"late"));
    let stale = pair.take_in_flight(b_addr(), a_addr());

    // Silence: nobody sends, and whatever the timers send is lost.
    let keys_zeroed_after = REJECT_AFTER_TIME * 3;
    while pair.elapsed() < handshake_at + keys_zeroed_after + Duration::from_secs(10) {
        pair.tick(Duration::from_secs(1));
        pair.lose_in_flight();
    }

    let action = pair.deliver(stale);
    assert!(
        matches!(
            action,
            Some(Action::Drop(DropReason::NoSession | DropReason::Expired))
        ),
        "data from the expired session: {action:?}"
    );
    let counted = pair.a.peer_drops(DropReason::NoSession) + pair.a.peer_drops(DropReason::Expired);
    assert_eq!(counted, 1);
    assert_eq!(pair.a.tun.len(), 1, "only the first `ack` was delivered");
    assert_eq!(
        pair.a.core.peers_with_state(),
        0,
        "A freed the expired Noise state"
    );
    assert_eq!(
        pair.b.core.peers_with_state(),
        0,
        "B freed the expired Noise state"
    );
    // The expired session's state is gone, but `wg show` still tells when the last handshake
    // was (within boringtun's 250 ms timer granularity).
    let now = pair.now;
    let wall = wall_clock();
    let reported = pair.a.core.peers(now, wall)[0]
        .last_handshake
        .expect("a handshake happened");
    let ago = wall.duration_since(reported).expect("in the past");
    let expected = pair.elapsed() - handshake_at;
    assert!(
        ago <= expected + Duration::from_millis(300)
            && ago + Duration::from_millis(300) >= expected,
        "last handshake {ago:?} ago, expected about {expected:?}"
    );

    let inits_before = pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len();
    let again = ipv4_udp(A_V4, B_V4, b"hello again");
    let action = pair.send(Side::A, &again);
    assert!(
        matches!(
            action,
            Action::ToNetwork {
                len: HANDSHAKE_INIT_LEN,
                ..
            }
        ),
        "sending after expiry starts a fresh handshake: {action:?}"
    );
    assert_eq!(
        pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len(),
        inits_before + 1
    );
    pair.run();
    assert_eq!(pair.b.tun.last(), Some(&again));
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"welcome back"));
}

/// Keepalives (data messages with nothing inside) `from` sent, relative to the start.
fn keepalives_sent(pair: &Pair, from: Side) -> Vec<Duration> {
    pair.sent
        .iter()
        .filter(|s| s.from == from && s.datagram.bytes.len() == DATA_OVERHEAD)
        .map(|s| s.at)
        .collect()
}

#[test]
fn idle_sessions_run_their_timers_only_at_their_deadlines() {
    let mut pair = Pair::new();
    pair.handshake();
    let handshake_at = pair.elapsed();
    pair.advance(Duration::from_secs(1));
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"ack"));
    let runs_before = pair.a.core.timer_runs() + pair.b.core.timer_runs();
    // (A answered B's handshake response with a keepalive.)
    let (a_before, b_before) = (
        keepalives_sent(&pair, Side::A).len(),
        keepalives_sent(&pair, Side::B).len(),
    );

    // 100 s of silence, ticking every 250 ms as the driver does.
    pair.advance(Duration::from_secs(100));
    // A received data and sent nothing after it: one keepalive, KEEPALIVE_TIMEOUT after what
    // it sent last.
    let keepalives = keepalives_sent(&pair, Side::A).split_off(a_before);
    assert_eq!(keepalives.len(), 1, "{keepalives:?}");
    let after = keepalives[0] - handshake_at;
    assert!(
        after >= Duration::from_secs(10) && after <= Duration::from_millis(10_500),
        "keepalive {after:?} after A's last packet"
    );
    assert_eq!(keepalives_sent(&pair, Side::B).len(), b_before);
    // 800 ticks for each core, but the timers ran only around the few events.
    let runs = pair.a.core.timer_runs() + pair.b.core.timer_runs() - runs_before;
    assert!(runs <= 20, "{runs} timer runs in 100 idle seconds");

    // The sessions woke with the next packet: it goes through the session made 100 s ago...
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"still there?"));
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"yes"));
    assert_eq!(pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len(), 1);
    // ...and the initiator, having sent data, renews it REKEY_AFTER_TIME after it was made,
    // although its timers slept in between.
    pair.advance(Duration::from_secs(30));
    let inits = pair.times_sent(Side::A, MSG_HANDSHAKE_INIT);
    assert_eq!(inits.len(), 2, "{inits:?}");
    let rekey = inits[1] - handshake_at;
    assert!(
        rekey >= REKEY_AFTER_TIME && rekey <= REKEY_AFTER_TIME + Duration::from_millis(500),
        "rekey {rekey:?} after the handshake"
    );

    // Then silence until the keys are zeroed: both free their Noise state on time.
    let renewed_at = pair.elapsed();
    let runs_before = pair.a.core.timer_runs() + pair.b.core.timer_runs();
    pair.advance(REJECT_AFTER_TIME * 3);
    assert_eq!(pair.a.core.peers_with_state(), 0, "A freed its Noise state");
    assert_eq!(pair.b.core.peers_with_state(), 0, "B freed its Noise state");
    let runs = pair.a.core.timer_runs() + pair.b.core.timer_runs() - runs_before;
    assert!(
        runs <= 20,
        "{runs} timer runs in {:?} idle",
        pair.elapsed() - renewed_at
    );
    assert!(pair.a.drops.is_empty(), "A dropped {:?}", pair.a.drops);
    assert!(pair.b.drops.is_empty(), "B dropped {:?}", pair.b.drops);
}

#[test]
fn both_sides_sending_first_converge_on_sessions_and_deliver_both_packets() {
    // Both ends send before any handshake (a ping answered by a ping): each queues its
    // packet and starts a handshake. The responder's queued packet must go out once it has a
    // usable session, not start yet another handshake.
    let mut pair = Pair::new();
    let from_a = ipv4_udp(A_V4, B_V4, b"a speaks first");
    let from_b = ipv4_udp(B_V4, A_V4, b"b speaks first too");
    pair.send(Side::A, &from_a);
    pair.send(Side::B, &from_b);
    pair.run();
    assert_eq!(pair.b.tun, vec![from_a]);
    assert_eq!(pair.a.tun, vec![from_b]);
    assert!(
        pair.a.drops.is_empty() && pair.b.drops.is_empty(),
        "{:?} {:?}",
        pair.a.drops,
        pair.b.drops
    );
    // One initiation each (the crossing ones), and no third one from a premature flush.
    assert_eq!(pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len(), 1);
    assert_eq!(pair.times_sent(Side::B, MSG_HANDSHAKE_INIT).len(), 1);

    // Data keeps flowing both ways afterwards.
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"again"));
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"again back"));
    assert_eq!(pair.a.tun.len(), 2);
    assert_eq!(pair.b.tun.len(), 2);
}
