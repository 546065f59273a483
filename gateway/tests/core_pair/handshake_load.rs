//! Handshakes under load: cookies and mac2, per-source budgets, stale initiations.

use super::*;

#[test]
fn under_load_a_cookie_reply_is_sent_and_the_retry_with_mac2_is_accepted() {
    // A accepts one handshake per second in total and one per source.
    let strict = HandshakeLimits {
        global_per_second: 1,
        per_source_per_second: 1,
        per_source_burst: 1,
        // No allowance for quiet sources: here B is to need the cookie.
        quiet_burst: 0,
        ..HandshakeLimits::default()
    };
    let mut pair = Pair::with_limits_on_a(strict);
    let a_public = public_key(KEY_A);

    // An attacker that knows A's public key (so its MAC1 is valid) but is not A's peer.
    let now = pair.now;
    let mut attacker = Core::new(now, [3; 32]);
    configure_with_methods(
        &mut attacker,
        now,
        KEY_C,
        &PeerConfig {
            public_key: a_public,
            endpoint: a_addr(),
            allowed_ips: vec![net("10.0.0.1/32")],
        },
    );
    let mut out = vec![0; BUF_LEN];
    let Action::ToNetwork { offset, len, .. } =
        attacker.handle_tun_packet(now, &ipv4_udp(C_V4, A_V4, b"x"), &mut out)
    else {
        panic!("the attacker's core starts a handshake");
    };
    let flood = Datagram {
        src: stranger_addr(),
        dst: a_addr(),
        bytes: out[offset..offset + len].to_vec(),
    };

    // The flood uses up this second's budget.
    assert_eq!(
        pair.deliver(flood.clone()),
        Some(Action::Drop(DropReason::UnknownPeer))
    );
    assert!(matches!(
        pair.deliver(flood.clone()),
        Some(Action::ToNetwork { dst, len: COOKIE_REPLY_LEN, .. }) if dst == stranger_addr()
    ));

    // B, an honest peer, starts a handshake while A is under load: it gets a cookie reply.
    let packet = ipv4_udp(B_V4, A_V4, b"made it through the load");
    pair.send(Side::B, &packet);
    let first_init = pair.take_in_flight(b_addr(), a_addr());
    assert_eq!(first_init.message_type(), MSG_HANDSHAKE_INIT);
    assert_eq!(
        mac2_of(&first_init.bytes),
        [0; 16],
        "no cookie yet, no MAC2"
    );
    let cookies_before = pair.a.core.device_drops().get(DropReason::CookieRequired);
    let action = pair.deliver(first_init.clone());
    assert!(
        matches!(action, Some(Action::ToNetwork { dst, len: COOKIE_REPLY_LEN, .. }) if dst == b_addr()),
        "{action:?}"
    );
    assert_eq!(
        pair.a.core.device_drops().get(DropReason::CookieRequired),
        cookies_before + 1
    );
    let cookie_reply = pair.take_in_flight(a_addr(), b_addr());
    assert_eq!(cookie_reply.message_type(), MSG_COOKIE_REPLY);
    assert_eq!(cookie_reply.bytes.len(), COOKIE_REPLY_LEN);
    let cookie = open_cookie_reply(&cookie_reply.bytes, &a_public, mac1_of(&first_init.bytes));

    // B's core takes the cookie; a cookie reply is not a reason to move an endpoint.
    assert_eq!(pair.deliver(cookie_reply), Some(Action::Nothing));
    assert!(pair.b.drops.is_empty());
    assert_eq!(pair.peer_endpoint(Side::B), Some(a_addr()));
    pair.lose_in_flight(); // the cookie for the attacker

    // B retries after REKEY_TIMEOUT, from its timers.
    while pair.times_sent(Side::B, MSG_HANDSHAKE_INIT).len() < 2 {
        assert!(pair.elapsed() <= REKEY_TIMEOUT + Duration::from_secs(1));
        pair.tick(TIMER_INTERVAL);
    }
    assert!(pair.elapsed() >= REKEY_TIMEOUT);
    let retry = pair.take_in_flight(b_addr(), a_addr());
    assert_eq!(retry.message_type(), MSG_HANDSHAKE_INIT);
    let expected_mac2 = blake2s_mac16(&cookie, &retry.bytes[..HANDSHAKE_INIT_LEN - 16]);
    assert_eq!(
        mac2_of(&retry.bytes),
        expected_mac2,
        "the retry carries MAC2 = MAC(cookie, message up to MAC2)"
    );

    // Still under load when the retry arrives: the flood is back.
    assert_eq!(
        pair.deliver(flood.clone()),
        Some(Action::Drop(DropReason::UnknownPeer))
    );
    assert!(matches!(
        pair.deliver(flood),
        Some(Action::ToNetwork {
            len: COOKIE_REPLY_LEN,
            ..
        })
    ));
    let cookies_before = pair.a.core.device_drops().get(DropReason::CookieRequired);
    let action = pair.deliver(retry.clone());
    assert!(
        matches!(action, Some(Action::ToNetwork { dst, len: HANDSHAKE_RESP_LEN, .. }) if dst == b_addr()),
        "the retry with a valid MAC2 is accepted under load: {action:?}"
    );
    assert_eq!(
        pair.a.core.device_drops().get(DropReason::CookieRequired),
        cookies_before
    );

    pair.run();
    assert_eq!(pair.a.tun, vec![packet], "B's queued packet arrives");
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"and back"));

    // Without its MAC2 the same message would have been answered with a cookie again.
    let mut stripped = retry;
    let at = stripped.bytes.len() - 16;
    stripped.bytes[at..].fill(0);
    assert!(matches!(
        pair.deliver(stripped),
        Some(Action::ToNetwork {
            len: COOKIE_REPLY_LEN,
            ..
        })
    ));
}

#[test]
fn a_peer_completes_a_new_handshake_at_once_while_many_sources_flood() {
    // Default limits. Someone with a peer's configuration floods from 300 spoofed addresses of
    // one /24, twenty initiations from each, all at the same moment (issue 14).
    let mut pair = Pair::new();
    let a_public = public_key(KEY_A);
    let now = pair.now;
    let mut attacker = Core::new(now, [3; 32]);
    configure_with_methods(
        &mut attacker,
        now,
        KEY_C,
        &PeerConfig {
            public_key: a_public,
            endpoint: a_addr(),
            allowed_ips: vec![net("10.0.0.1/32")],
        },
    );
    let mut out = vec![0; BUF_LEN];
    let Action::ToNetwork { offset, len, .. } =
        attacker.handle_tun_packet(now, &ipv4_udp(C_V4, A_V4, b"x"), &mut out)
    else {
        panic!("the attacker's core starts a handshake");
    };
    let init = out[offset..offset + len].to_vec();
    for _ in 0..20 {
        for host in 0..300u16 {
            let src = SocketAddr::from(([100, 64, 7, (host % 250) as u8 + 1], 1000 + host));
            pair.deliver(Datagram {
                src,
                dst: a_addr(),
                bytes: init.clone(),
            });
        }
    }
    let drops = pair.a.core.device_drops();
    let cookies = drops.get(DropReason::CookieRequired);
    let limited = drops.get(DropReason::RateLimited);
    // Each admitted initiation cost a Diffie-Hellman (and then proved to be no peer's).
    let admitted = drops.get(DropReason::UnknownPeer);
    assert_eq!(admitted + cookies + limited, 20 * 300);
    // The device went under load: past it, only each address's quiet allowance.
    let limits = HandshakeLimits::default();
    assert!(
        admitted <= u64::from(limits.global_per_second + 250 * limits.quiet_burst),
        "{admitted} admitted"
    );
    assert!(
        cookies <= 250 * u64::from(limits.reply_burst),
        "{cookies} cookie replies"
    );
    pair.lose_in_flight();

    // B, an honest peer, needs a new handshake right now: it completes without the cookie
    // round trip (which would cost it REKEY_TIMEOUT) and its packet arrives.
    let packet = ipv4_udp(B_V4, A_V4, b"through the flood");
    pair.send(Side::B, &packet);
    pair.run();
    assert_eq!(
        pair.a.tun,
        vec![packet],
        "A dropped {:?}, B dropped {:?}",
        &pair.a.drops[pair.a.drops.len().saturating_sub(5)..],
        pair.b.drops
    );
    assert_eq!(pair.elapsed(), Duration::ZERO);
    assert_eq!(
        pair.a.core.device_drops().get(DropReason::CookieRequired),
        cookies,
        "B was sent no cookie"
    );
}

#[test]
fn an_initiation_that_waited_longer_than_its_sender_waits_is_not_answered() {
    let mut pair = Pair::new();
    let hello = ipv4_udp(A_V4, B_V4, b"after a long queue");
    pair.send(Side::A, &hello);
    let init = pair.take_in_flight(a_addr(), b_addr());
    assert_eq!(init.message_type(), MSG_HANDSHAKE_INIT);
    // B reads it only now: it sat in B's receive queue past the bound. B spends nothing on it.
    let now = pair.now;
    let mut out = vec![0; BUF_LEN];
    let waited = STALE_INITIATION + Duration::from_millis(1);
    let action = pair.b.core.handle_received(
        now,
        waited,
        init.src,
        Some(init.dst.ip()),
        &init.bytes,
        &mut out,
    );
    assert_eq!(action, Action::Drop(DropReason::StaleHandshake));
    assert_eq!(
        pair.b.core.device_drops().get(DropReason::StaleHandshake),
        1
    );
    // The same initiation read within the bound is answered, and the queued packet follows.
    let action = pair.b.core.handle_received(
        now,
        STALE_INITIATION,
        init.src,
        Some(init.dst.ip()),
        &init.bytes,
        &mut out,
    );
    let Action::ToNetwork {
        dst, offset, len, ..
    } = action
    else {
        panic!("an initiation within the bound is answered: {action:?}");
    };
    assert_eq!(out[offset], MSG_HANDSHAKE_RESP);
    let response = Datagram {
        src: b_addr(),
        dst,
        bytes: out[offset..offset + len].to_vec(),
    };
    // Only initiations go stale: a response (and data) that waited as long is still taken.
    let now = pair.now;
    let mut out_a = vec![0; BUF_LEN];
    let action = pair.a.core.handle_received(
        now,
        Duration::from_secs(10),
        response.src,
        Some(response.dst.ip()),
        &response.bytes,
        &mut out_a,
    );
    match action {
        Action::ToNetwork {
            dst, offset, len, ..
        } => pair.transmit(
            Side::A,
            Datagram {
                src: a_addr(),
                dst,
                bytes: out_a[offset..offset + len].to_vec(),
            },
        ),
        Action::Nothing => {}
        other => panic!("a late response was refused: {other:?}"),
    }
    pair.run();
    assert_eq!(pair.b.tun.last().map(Vec::as_slice), Some(&hello[..]));
}
