//! The hub firewall per packet: a packet of an established flow, and a new flow decided by
//! the 10,000-rule synthetic district policy. The peers' addresses (for the data-centre spoof
//! check) are every site's prefixes in an allowed-IPs table, as on a hub with all spokes up.
//!
//! Also (group `parser`): the one IP parser of the core, firewall and gate
//! (`packet::IpPacket`) next to etherparse's sliced parsers on the same packets, down to
//! addresses, transport protocol and ports (issue 14, part 6: a crate is welcome if it does
//! not cost throughput).
//!
//! `cargo bench -p komnet-gateway --bench firewall`

#![allow(clippy::unwrap_used)] // bench code: a failed setup should panic loudly

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::{LaxNetSlice, LaxSlicedPacket, NetSlice, SlicedPacket, TransportSlice};
use komnet_gateway::allowed_ips::AllowedIps;
use komnet_gateway::core::PeerId;
use komnet_gateway::firewall::{Firewall, FirewallConfig};
use komnet_gateway::packet::IpPacket;
use komnet_policy::synthetic::{generate, packets, Shape};
use komnet_policy::{CompiledPolicy, Origin, PacketMeta, PeerIdentity, Policy, Role};

/// A TCP SYN (20-byte IPv4 or 40-byte IPv6 header + 20-byte TCP header) for `meta`.
fn wire(meta: &PacketMeta, sport: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&meta.dport.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x02;
    match (meta.src, meta.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
            h.extend(s.octets());
            h.extend(d.octets());
            h.extend(tcp);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
            h.extend(s.octets());
            h.extend(d.octets());
            h.extend(tcp);
            h
        }
        _ => unreachable!(),
    }
}

fn bench(c: &mut Criterion) {
    let (op, tenants) = generate(Shape::DISTRICT);
    let refs: Vec<(&str, &str)> = tenants
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let policy = CompiledPolicy::from_policy(Policy::from_texts(&op, &refs).unwrap()).unwrap();
    let metas: Vec<PacketMeta> = packets(&policy.policy, 4096)
        .into_iter()
        .filter(|m| policy.classify(Origin::Address, m).allow && m.ip_proto == 6)
        .collect();
    let wires: Vec<Vec<u8>> = metas
        .iter()
        .enumerate()
        .map(|(i, m)| wire(m, 10_000 + i as u16))
        .collect();

    // The hub's allowed IPs: every town hall's site prefixes (its spoke) and a home-office pool
    // per commune (one peer standing for its home offices). The data-centre direction below
    // feeds the same packets as before the spoof check existed; they come from town-hall
    // addresses, which a hub refuses from that side. So it looks them up in a table of the
    // same shape (the same prefixes moved to other address space): the same work, a miss, as
    // for every legitimate data-centre packet.
    let mut spokes = AllowedIps::default();
    let mut elsewhere = AllowedIps::default();
    let moved = |net: &IpNet| -> IpNet {
        match net {
            IpNet::V4(n) => {
                let a = Ipv4Addr::from(u32::from(n.network()) ^ 0x5a00_0000);
                IpNet::V4(Ipv4Net::new(a, n.prefix_len()).unwrap())
            }
            IpNet::V6(n) => {
                let a = Ipv6Addr::from(u128::from(n.network()) ^ (0x0010 << 112));
                IpNet::V6(Ipv6Net::new(a, n.prefix_len()).unwrap())
            }
        }
    };
    let mut identities = Vec::new();
    for (i, site) in policy.policy.sites.iter().enumerate() {
        let tenant = &policy.policy.tenants[site.tenant.index()].name;
        let id = policy
            .policy
            .peer_identity(tenant, Some(&site.name), Role::Spoke)
            .unwrap();
        for net in &site.prefixes {
            spokes.insert(*net, PeerId(i as u32));
            elsewhere.insert(moved(net), PeerId(i as u32));
            identities.push((*net, PeerId(i as u32), id));
        }
    }
    // Peer handles are dense slot numbers, as the core hands them out.
    let n_sites = policy.policy.sites.len();
    for (i, t) in policy.policy.tenants.iter().enumerate() {
        let id = policy
            .policy
            .peer_identity(&t.name, None, Role::HomeOffice)
            .unwrap();
        for net in &t.homeoffice_pool {
            spokes.insert(*net, PeerId((n_sites + i) as u32));
            elsewhere.insert(moved(net), PeerId((n_sites + i) as u32));
            identities.push((*net, PeerId((n_sites + i) as u32), id));
        }
    }
    let dc_side = |a: IpAddr| elsewhere.lookup(a);
    let peer_side = |a: IpAddr| spokes.lookup(a);
    let senders: Vec<(PeerId, Option<PeerIdentity>)> = metas
        .iter()
        .map(|m| {
            let (_, peer, id) = identities
                .iter()
                .find(|(net, _, _)| net.contains(&m.src))
                .unwrap();
            (*peer, Some(*id))
        })
        .collect();

    let mut g = c.benchmark_group("firewall");
    g.throughput(Throughput::Elements(wires.len() as u64));
    let now = Instant::now();
    let mut fw = Firewall::new(FirewallConfig::default());
    for w in &wires {
        fw.to_peer(now, &policy, &dc_side, w).unwrap();
    }
    g.bench_function("established_flow", |b| {
        b.iter(|| {
            for w in &wires {
                let _ = black_box(fw.to_peer(now, &policy, &dc_side, black_box(w)));
            }
        })
    });
    let mut t = now;
    g.bench_function("new_flow_by_policy", |b| {
        b.iter(|| {
            // Every round starts on an empty table: each packet is a flow start.
            let mut fw = Firewall::new(FirewallConfig::default());
            t += Duration::from_secs(1);
            for w in &wires {
                let _ = black_box(fw.to_peer(t, &policy, &dc_side, black_box(w)));
            }
        })
    });
    // The same packets in their real direction: from the town halls' spokes.
    let mut fw = Firewall::new(FirewallConfig::default());
    for (w, (peer, id)) in wires.iter().zip(&senders) {
        fw.from_peer(now, &policy, *peer, *id, &peer_side, w)
            .unwrap();
    }
    g.bench_function("peer_established_flow", |b| {
        b.iter(|| {
            for (w, (peer, id)) in wires.iter().zip(&senders) {
                let _ = black_box(fw.from_peer(now, &policy, *peer, *id, &peer_side, black_box(w)));
            }
        })
    });
    g.bench_function("peer_new_flow", |b| {
        b.iter(|| {
            let mut fw = Firewall::new(FirewallConfig::default());
            t += Duration::from_secs(1);
            for (w, (peer, id)) in wires.iter().zip(&senders) {
                let _ = black_box(fw.from_peer(t, &policy, *peer, *id, &peer_side, black_box(w)));
            }
        })
    });
    g.finish();
}

/// What a firewall needs from a packet, folded into one number so nothing is optimised away:
/// both addresses, the transport protocol, both ports.
fn ours(p: &[u8]) -> u64 {
    let Ok(ip) = IpPacket::parse(p, false) else {
        return 0;
    };
    let t = ip.transport(p);
    let ports = t.get(..4).map_or(0, |b| {
        u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    });
    fold(ip.header.src, ip.header.dst) ^ u64::from(ip.proto) ^ ports
}

fn fold(src: IpAddr, dst: IpAddr) -> u64 {
    let n = |a: IpAddr| match a {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a) as u64,
    };
    n(src).rotate_left(17) ^ n(dst)
}

fn ports_of(t: &Option<TransportSlice<'_>>) -> (u64, u64) {
    match t {
        Some(TransportSlice::Tcp(t)) => (
            6,
            u64::from(t.source_port()) << 16 | u64::from(t.destination_port()),
        ),
        Some(TransportSlice::Udp(u)) => (
            17,
            u64::from(u.source_port()) << 16 | u64::from(u.destination_port()),
        ),
        _ => (0, 0),
    }
}

fn etherparse_strict(p: &[u8]) -> u64 {
    let Ok(s) = SlicedPacket::from_ip(p) else {
        return 0;
    };
    let addrs = match &s.net {
        Some(NetSlice::Ipv4(v4)) => fold(
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
        ),
        Some(NetSlice::Ipv6(v6)) => fold(
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
        ),
        _ => 0,
    };
    let (proto, ports) = ports_of(&s.transport);
    addrs ^ proto ^ ports
}

fn etherparse_lax(p: &[u8]) -> u64 {
    let Ok(s) = LaxSlicedPacket::from_ip(p) else {
        return 0;
    };
    let addrs = match &s.net {
        Some(LaxNetSlice::Ipv4(v4)) => fold(
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
        ),
        Some(LaxNetSlice::Ipv6(v6)) => fold(
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
        ),
        _ => 0,
    };
    let (proto, ports) = ports_of(&s.transport);
    addrs ^ proto ^ ports
}

/// The three parsers on: a TCP SYN over IPv4 and over IPv6, a 1,420-byte IPv4 TCP data
/// segment, and IPv6 with hop-by-hop options and an authentication header before UDP.
fn parsers(c: &mut Criterion) {
    let v4 = [10, 30, 1, 10];
    let v4d = [10, 0, 1, 10];
    let tcp = |len: usize| {
        let mut t = vec![0u8; len];
        t[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        t[2..4].copy_from_slice(&443u16.to_be_bytes());
        t[12] = 0x50;
        t[13] = 0x02;
        t
    };
    let ipv4 = |payload: Vec<u8>| {
        let total = (20 + payload.len()) as u16;
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h.extend(v4);
        h.extend(v4d);
        h.extend(payload);
        h
    };
    let ipv6 = |next: u8, payload: Vec<u8>| {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, next, 64];
        h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend([0xfd, 0, 0, 0x30, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        h.extend([0xfd, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        h.extend(payload);
        h
    };
    let mut ah_udp = vec![51, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop: PadN, next AH
    let mut ah = vec![17, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]; // AH: next UDP, (4 + 2) * 4 bytes
    ah.resize(24, 0);
    ah_udp.extend(ah);
    ah_udp.extend([0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
    let packets = [
        ("ipv4_tcp_syn", ipv4(tcp(20))),
        ("ipv6_tcp_syn", ipv6(6, tcp(20))),
        ("ipv4_tcp_1420", ipv4(tcp(1400))),
        ("ipv6_hbh_ah_udp", ipv6(0, ah_udp)),
    ];
    for (name, p) in &packets {
        // All three read the same fields from each packet.
        assert_eq!(ours(p), etherparse_strict(p), "{name}");
        assert_eq!(ours(p), etherparse_lax(p), "{name}");
        assert_ne!(ours(p), 0, "{name}");
    }
    let mut g = c.benchmark_group("parser");
    for (name, p) in &packets {
        g.bench_function(format!("{name}/komnet"), |b| b.iter(|| ours(black_box(p))));
        g.bench_function(format!("{name}/etherparse_sliced"), |b| {
            b.iter(|| etherparse_strict(black_box(p)))
        });
        g.bench_function(format!("{name}/etherparse_lax"), |b| {
            b.iter(|| etherparse_lax(black_box(p)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench, parsers);
criterion_main!(benches);
