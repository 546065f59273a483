//! The core's encapsulate + decapsulate of one packet, next to ring's raw ChaCha20-Poly1305
//! seal + open of the same payload, in the same run: the ratio says how much the core adds on
//! top of the AEAD it cannot avoid (targets: ≥ 90 % of raw at 1420 B, ≥ 2 M packets/s at 64 B).
//!
//! `cargo bench -p komnet-gateway --bench core`

use std::net::SocketAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use komnet_gateway::core::{Action, Core};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

const SIZES: [usize; 3] = [64, 512, 1420];

fn public(secret: [u8; 32]) -> [u8; 32] {
    boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(secret)).to_bytes()
}

/// An IPv4/UDP packet of `len` bytes from 10.0.0.1 to 10.0.0.2.
fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p
}

/// Two cores with a finished handshake: A (10.0.0.1) and B (10.0.0.2).
fn connected_pair(now: Instant) -> (Core, Core, SocketAddr, SocketAddr) {
    let (ka, kb) = ([1u8; 32], [2u8; 32]);
    let (addr_a, addr_b): (SocketAddr, SocketAddr) = (
        "192.0.2.1:51820".parse().expect("addr"),
        "192.0.2.2:51820".parse().expect("addr"),
    );
    let mut a = Core::new(now, [7; 32]);
    let mut b = Core::new(now, [8; 32]);
    a.set_private_key(now, Some(ka));
    b.set_private_key(now, Some(kb));
    let pa = a.upsert_peer(now, public(kb)).expect("peer");
    a.set_endpoint(pa, addr_b);
    a.add_allowed_ip(pa, "10.0.0.2/32".parse().expect("net"));
    let pb = b.upsert_peer(now, public(ka)).expect("peer");
    b.set_endpoint(pb, addr_a);
    b.add_allowed_ip(pb, "10.0.0.1/32".parse().expect("net"));

    // Handshake: A's first packet triggers an initiation; bounce messages until quiet.
    let mut buf = vec![0u8; 2048];
    let mut reply = vec![0u8; 2048];
    let pkt = ipv4_packet(64);
    let mut in_flight: Vec<(bool, Vec<u8>)> = Vec::new();
    if let Action::ToNetwork { offset, len, .. } = a.handle_tun_packet(now, &pkt, &mut buf) {
        in_flight.push((true, buf[offset..offset + len].to_vec()));
    }
    while let Some((from_a, msg)) = in_flight.pop() {
        let (to, src) = if from_a {
            (&mut b, addr_a)
        } else {
            (&mut a, addr_b)
        };
        if let Action::ToNetwork { offset, len, .. } =
            to.handle_datagram(now, src, None, &msg, &mut reply)
        {
            in_flight.push((!from_a, reply[offset..offset + len].to_vec()));
        }
        while let Some((_, len)) = to.poll_transmit(&mut reply) {
            in_flight.push((!from_a, reply[..len].to_vec()));
        }
    }
    (a, b, addr_a, addr_b)
}

fn bench(c: &mut Criterion) {
    let now = Instant::now();
    let (mut a, mut b, addr_a, _) = connected_pair(now);
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[3; 32]).expect("key"));
    let mut group = c.benchmark_group("encap+decap");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let pkt = ipv4_packet(size);
        let mut wire = vec![0u8; 2048];
        let mut plain = vec![0u8; 2048];
        group.bench_with_input(BenchmarkId::new("komnet-core", size), &size, |bench, _| {
            bench.iter(|| {
                let Action::ToNetwork { offset, len, .. } =
                    a.handle_tun_packet(now, &pkt, &mut wire)
                else {
                    panic!("encapsulation failed");
                };
                let action =
                    b.handle_datagram(now, addr_a, None, &wire[offset..offset + len], &mut plain);
                assert!(matches!(action, Action::ToTun { .. }), "{action:?}");
            })
        });
        let mut counter = 0u64;
        let mut buf = pkt.clone();
        group.bench_with_input(
            BenchmarkId::new("ring-chacha20poly1305", size),
            &size,
            |bench, _| {
                bench.iter(|| {
                    counter += 1;
                    let mut nonce = [0u8; 12];
                    nonce[4..].copy_from_slice(&counter.to_le_bytes());
                    buf.truncate(size);
                    let tag = key
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(nonce),
                            Aad::empty(),
                            &mut buf,
                        )
                        .expect("seal");
                    buf.extend_from_slice(tag.as_ref());
                    let opened = key
                        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
                        .expect("open");
                    assert_eq!(opened.len(), size);
                })
            },
        );
    }
    group.finish();

    // Padding (issue 20): the same packet encapsulated + decapsulated with an MTU equal to its
    // size (no padding) and with the usual 1420 (padded to the next multiple of 16), in the
    // same run, through the driver's entry point `handle_tun_buffer`.
    let mut group = c.benchmark_group("padding");
    for size in [84usize, 1400] {
        group.throughput(Throughput::Bytes(size as u64));
        let pkt = ipv4_packet(size);
        let mut tun_buf = vec![0u8; 65_535];
        let mut wire = vec![0u8; 2048];
        let mut plain = vec![0u8; 2048];
        for (label, mtu) in [("unpadded", size as u32), ("padded-mtu1420", 1420)] {
            a.set_mtu(mtu);
            group.bench_with_input(BenchmarkId::new(label, size), &size, |bench, _| {
                bench.iter(|| {
                    tun_buf[..size].copy_from_slice(&pkt);
                    let Action::ToNetwork { offset, len, .. } =
                        a.handle_tun_buffer(now, &mut tun_buf, size, &mut wire)
                    else {
                        panic!("encapsulation failed");
                    };
                    let action = b.handle_datagram(
                        now,
                        addr_a,
                        None,
                        &wire[offset..offset + len],
                        &mut plain,
                    );
                    assert!(matches!(action, Action::ToTun { .. }), "{action:?}");
                })
            });
        }
    }
    group.finish();

    // Sticky source addresses (issue 20, defect 8), both halves in the same run:
    // - "core": encapsulate at A + decapsulate at B of a 1420-byte packet, once as before
    //   (no local address passed in or stored) and once recording B's local address on every
    //   authenticated packet and handing A's stored source to the driver;
    // - "sendmsg": what the driver then asks of the kernel, a GSO send of 16 x 1452 bytes over
    //   loopback through quinn-udp, without and with an IP_PKTINFO source address.
    let mut group = c.benchmark_group("sticky-source");
    let size = 1420;
    group.throughput(Throughput::Bytes(size as u64));
    let pkt = ipv4_packet(size);
    let mut wire = vec![0u8; 2048];
    let mut plain = vec![0u8; 2048];
    let (ip_a, ip_b) = (addr_a.ip(), "192.0.2.2".parse().expect("ip"));
    for (label, local) in [("core-routing-table", None), ("core-sticky", Some(ip_b))] {
        // A learns (or forgets) its own sticky source from one packet of B's.
        let back = ipv4_packet(64);
        let mut back_pkt = back.clone();
        back_pkt[12..16].copy_from_slice(&[10, 0, 0, 2]);
        back_pkt[16..20].copy_from_slice(&[10, 0, 0, 1]);
        let Action::ToNetwork { offset, len, .. } = b.handle_tun_packet(now, &back_pkt, &mut wire)
        else {
            panic!("encapsulation at B failed");
        };
        let a_local = local.map(|_| ip_a);
        let action = a.handle_datagram(
            now,
            "192.0.2.2:51820".parse().expect("addr"),
            a_local,
            &wire[offset..offset + len],
            &mut plain,
        );
        assert!(matches!(action, Action::ToTun { .. }), "{action:?}");
        group.bench_with_input(BenchmarkId::new(label, size), &size, |bench, _| {
            bench.iter(|| {
                let Action::ToNetwork {
                    offset,
                    len,
                    src_ip,
                    ..
                } = a.handle_tun_packet(now, &pkt, &mut wire)
                else {
                    panic!("encapsulation failed");
                };
                assert_eq!(src_ip, a_local);
                let action =
                    b.handle_datagram(now, addr_a, local, &wire[offset..offset + len], &mut plain);
                assert!(matches!(action, Action::ToTun { .. }), "{action:?}");
            })
        });
    }
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
    let sender = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind sender");
    let state = quinn_udp::UdpSocketState::new((&sender).into()).expect("quinn-udp state");
    let segments = state.max_gso_segments().min(16);
    let batch = vec![0u8; 1452 * segments];
    group.throughput(Throughput::Bytes(batch.len() as u64));
    let destination = receiver.local_addr().expect("addr");
    for (label, src_ip) in [
        ("sendmsg-routing-table", None),
        ("sendmsg-pktinfo", Some("127.0.0.1".parse().expect("ip"))),
    ] {
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents: &batch,
            segment_size: (segments > 1).then_some(1452),
            src_ip,
        };
        group.bench_with_input(BenchmarkId::new(label, segments), &segments, |bench, _| {
            bench.iter(|| {
                // The receiver is never read: the kernel drops what overflows its buffer, as
                // it would for a slow peer; the sender's cost is what is measured.
                state
                    .try_send((&sender).into(), &transmit)
                    .or_else(|e| {
                        if e.kind() == std::io::ErrorKind::WouldBlock {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .expect("send");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
