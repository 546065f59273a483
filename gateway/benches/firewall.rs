//! The hub firewall per packet: a packet of an established flow, and a new flow decided by
//! the 10,000-rule synthetic district policy. The peers' addresses (for the data-centre spoof
//! check) are every site's prefixes in an allowed-IPs table, as on a hub with all spokes up.
//!
//! `cargo bench -p komnet-gateway --bench firewall`

#![allow(clippy::unwrap_used)] // bench code: a failed setup should panic loudly

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use komnet_gateway::allowed_ips::AllowedIps;
use komnet_gateway::core::PeerId;
use komnet_gateway::firewall::{Firewall, FirewallConfig};
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

criterion_group!(benches, bench);
criterion_main!(benches);
