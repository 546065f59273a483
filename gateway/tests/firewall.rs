//! The hub's firewall with the worked example policy: new flows by policy and identity,
//! replies by state, related ICMP errors, timeouts, the table bound, and bad packets.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use komnet_gateway::core::PeerId;
use komnet_gateway::firewall::{
    Firewall, FirewallConfig, FirewallDrop, FlowOwner, OwnerStats, PeerAddresses,
};
use komnet_policy::{CompiledPolicy, Decider, PeerIdentity, Role};
use proptest::prelude::*;

fn policy() -> CompiledPolicy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
    CompiledPolicy::load(&dir).unwrap()
}

fn spoke(p: &CompiledPolicy, tenant: &str, site: &str) -> Option<PeerIdentity> {
    p.policy.peer_identity(tenant, Some(site), Role::Spoke)
}

/// The peer handle a test gives an identity (home offices: one per tenant here).
fn peer(identity: Option<PeerIdentity>) -> PeerId {
    match identity {
        None => PeerId(0xffff),
        Some(i) => PeerId(
            (i.tenant.index() as u32) << 8
                | i.site.map_or(0x7f, |s| s.index() as u32)
                | if i.role == Role::HomeOffice { 0x80 } else { 0 },
        ),
    }
}

/// Which peer owns an address: the example district's spokes own their sites' prefixes, the
/// home offices their tenant's home-office pool (what the hub's allowed IPs would say).
struct Peers(Vec<(IpNet, PeerId)>);

impl PeerAddresses for Peers {
    fn peer_of(&self, addr: IpAddr) -> Option<PeerId> {
        self.0
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, id)| *id)
    }
}

fn peers() -> Peers {
    let p = policy();
    let home = |t| peer(p.policy.peer_identity(t, None, Role::HomeOffice));
    let mut v = Vec::new();
    for (tenant, site, nets) in [
        ("kreis", "kreishaus", ["10.10.0.0/16", "fd00:10::/48"]),
        ("musterstadt", "rathaus", ["10.20.0.0/16", "fd00:20::/48"]),
        ("musterstadt", "bauhof", ["10.21.0.0/16", "fd00:21::/48"]),
        ("beispieldorf", "rathaus", ["10.30.0.0/16", "fd00:30::/48"]),
    ] {
        for n in nets {
            v.push((n.parse().unwrap(), peer(spoke(&p, tenant, site))));
        }
    }
    for (tenant, nets) in [
        ("kreis", ["10.250.1.0/24", "fd00:250:1::/64"]),
        ("musterstadt", ["10.250.20.0/24", "fd00:250:20::/64"]),
        ("beispieldorf", ["10.250.30.0/24", "fd00:250:30::/64"]),
    ] {
        for n in nets {
            v.push((n.parse().unwrap(), home(tenant)));
        }
    }
    Peers(v)
}

/// An IPv4 or IPv6 packet with a transport header (TCP flags, UDP, or ICMP type+id).
fn packet(src: &str, dst: &str, proto: u8, sport: u16, dport: u16, tcp_flags: u8) -> Vec<u8> {
    let src: IpAddr = src.parse().unwrap();
    let dst: IpAddr = dst.parse().unwrap();
    let mut l4 = vec![0u8; 20];
    match proto {
        6 => {
            l4[0..2].copy_from_slice(&sport.to_be_bytes());
            l4[2..4].copy_from_slice(&dport.to_be_bytes());
            l4[12] = 0x50;
            l4[13] = tcp_flags;
        }
        17 => {
            l4.truncate(8);
            l4[0..2].copy_from_slice(&sport.to_be_bytes());
            l4[2..4].copy_from_slice(&dport.to_be_bytes());
        }
        _ => {
            // ICMP: type in `sport`, identifier in `dport`.
            l4.truncate(8);
            l4[0] = sport as u8;
            l4[4..6].copy_from_slice(&dport.to_be_bytes());
        }
    }
    ip(src, dst, proto, &l4)
}

fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + payload.len();
            let mut h = vec![
                0x45,
                0,
                (total >> 8) as u8,
                total as u8,
                0,
                0,
                0,
                0,
                64,
                proto,
                0,
                0,
            ];
            h.extend(s.octets());
            h.extend(d.octets());
            h.extend(payload);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = payload.len();
            let mut h = vec![0x60, 0, 0, 0, (len >> 8) as u8, len as u8, proto, 64];
            h.extend(s.octets());
            h.extend(d.octets());
            h.extend(payload);
            h
        }
        _ => panic!("mixed families"),
    }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;

#[test]
fn new_flows_by_policy_replies_by_state() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    // Staff PC -> DMS: allowed; the DMS's reply passes; the DMS cannot start a flow back.
    let syn = packet("10.20.1.7", "10.1.0.10", 6, 40000, 443, SYN);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &syn),
        Ok(())
    );
    let reply = packet("10.1.0.10", "10.20.1.7", 6, 443, 40000, SYN | ACK);
    assert_eq!(fw.to_peer(now, &p, &peers, &reply), Ok(()));
    let unsolicited = packet("10.1.0.10", "10.20.1.7", 6, 443, 40001, SYN);
    // The DMS's address is in no segment: nothing may start a flow from it.
    assert!(matches!(
        fw.to_peer(now, &p, &peers, &unsolicited),
        Err(FirewallDrop::Policy(Decider::NoSegment))
    ));
    // Same over IPv6.
    let syn6 = packet("fd00:20:0:1::7", "fd00:1::10", 6, 40000, 443, SYN);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &syn6),
        Ok(())
    );
    assert_eq!(
        fw.to_peer(
            now,
            &p,
            &peers,
            &packet("fd00:1::10", "fd00:20:0:1::7", 6, 443, 40000, ACK)
        ),
        Ok(())
    );
    // Guest WLAN: the guardrail, with the guardrail as the reason.
    let guest = packet("10.20.100.5", "10.0.1.53", 17, 5353, 53, 0);
    assert!(matches!(
        fw.from_peer(now, &p, peer(town), town, &peers, &guest),
        Err(FirewallDrop::Policy(Decider::Guardrail(_)))
    ));
    // A spoke sending from another site's or another commune's address.
    let foreign = packet("10.30.1.7", "10.1.0.10", 6, 40000, 443, SYN);
    assert!(matches!(
        fw.from_peer(now, &p, peer(town), town, &peers, &foreign),
        Err(FirewallDrop::Policy(Decider::ForeignSource))
    ));
    let other_site = spoke(&p, "musterstadt", "bauhof");
    assert!(matches!(
        fw.from_peer(now, &p, peer(other_site), other_site, &peers, &syn),
        Err(FirewallDrop::Policy(Decider::ForeignSource))
    ));
    // A peer without identity gets nothing through.
    assert_eq!(
        fw.from_peer(now, &p, peer(None), None, &peers, &syn),
        Err(FirewallDrop::NoIdentity)
    );
    // The data centre's monitoring may start flows to the town hall's printer.
    let probe = packet("10.0.16.10", "10.20.1.50", 6, 50000, 9100, SYN);
    assert_eq!(fw.to_peer(now, &p, &peers, &probe), Ok(()));
    assert_eq!(
        fw.from_peer(
            now,
            &p,
            peer(town),
            town,
            &peers,
            &packet("10.20.1.50", "10.0.16.10", 6, 9100, 50000, SYN | ACK)
        ),
        Ok(())
    );
    let c = fw.counters();
    assert_eq!(c.new_flows, 3);
    assert_eq!(c.established_packets, 3);
    assert_eq!(c.drops["policy_guardrail"], 1);
    assert_eq!(c.drops["policy_foreign_source"], 2);
    assert_eq!(c.drops["no_identity"], 1);
    // Each sender's refusals are its own (the fleet shows them per site).
    assert_eq!(fw.owner_stats(FlowOwner::Peer(peer(town))).denied, 2);
    assert_eq!(fw.owner_stats(FlowOwner::Peer(peer(other_site))).denied, 1);
}

#[test]
fn home_office_peers_are_classified_by_their_role() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let home = p
        .policy
        .peer_identity("musterstadt", None, Role::HomeOffice);
    let to_files = packet("10.250.20.9", "10.1.20.5", 6, 40000, 445, SYN);
    assert_eq!(
        fw.from_peer(now, &p, peer(home), home, &peers, &to_files),
        Ok(())
    );
    // The same address sent by a spoke identity is not the spoke's to use.
    let town = spoke(&p, "musterstadt", "rathaus");
    assert!(fw
        .from_peer(
            now,
            &p,
            peer(town),
            town,
            &peers,
            &packet("10.250.20.9", "10.1.20.5", 6, 40001, 445, SYN)
        )
        .is_err());
    // Another commune's home office cannot reach Musterstadt's files.
    let other = p.policy.peer_identity("kreis", None, Role::HomeOffice);
    assert!(fw
        .from_peer(
            now,
            &p,
            peer(other),
            other,
            &peers,
            &packet("10.250.1.9", "10.1.20.5", 6, 40000, 445, SYN)
        )
        .is_err());
}

#[test]
fn flows_expire_by_protocol_and_closing_tcp_goes_quickly() {
    let p = policy();
    let peers = peers();
    let config = FirewallConfig::default();
    let mut fw = Firewall::new(config.clone());
    let t0 = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    let dns = packet("10.20.1.7", "10.0.1.53", 17, 33000, 53, 0);
    let answer = packet("10.0.1.53", "10.20.1.7", 17, 53, 33000, 0);
    assert_eq!(fw.from_peer(t0, &p, peer(town), town, &peers, &dns), Ok(()));
    assert_eq!(
        fw.to_peer(t0 + Duration::from_secs(60), &p, &peers, &answer),
        Ok(())
    );
    // Idle past the UDP timeout: the answer is now an unsolicited packet.
    let later = t0 + Duration::from_secs(60) + config.udp_idle + Duration::from_secs(1);
    assert!(fw.to_peer(later, &p, &peers, &answer).is_err());
    // TCP after FIN: gone after the closing timeout, not the hour.
    let syn = packet("10.20.1.7", "10.0.1.20", 6, 41000, 993, SYN);
    let fin = packet("10.20.1.7", "10.0.1.20", 6, 41000, 993, FIN_ACK);
    let late_ack = packet("10.0.1.20", "10.20.1.7", 6, 993, 41000, ACK);
    assert_eq!(fw.from_peer(t0, &p, peer(town), town, &peers, &syn), Ok(()));
    assert_eq!(fw.from_peer(t0, &p, peer(town), town, &peers, &fin), Ok(()));
    let after_close = t0 + config.tcp_closing + Duration::from_secs(1);
    assert!(fw.to_peer(after_close, &p, &peers, &late_ack).is_err());
    fw.expire(t0 + Duration::from_secs(7200));
    assert_eq!(fw.flow_count(), 0);
    assert!(fw.counters().expired >= 1);
}

#[test]
fn the_table_is_bounded_and_evictions_are_counted() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig {
        max_flows: 100,
        ..FirewallConfig::default()
    });
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    for port in 0..1000u16 {
        let syn = packet("10.20.1.7", "10.1.0.10", 6, 20000 + port, 443, SYN);
        assert_eq!(
            fw.from_peer(
                now + Duration::from_millis(u64::from(port)),
                &p,
                peer(town),
                town,
                &peers,
                &syn
            ),
            Ok(())
        );
    }
    assert_eq!(fw.flow_count(), 100);
    assert_eq!(fw.counters().evicted, 900);
    assert_eq!(fw.counters().new_flows, 1000);
}

#[test]
fn icmp_echo_and_related_errors() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    // VoIP phones may ping the PBX; the echo reply passes back.
    let echo = packet("10.20.3.7", "10.0.2.10", 1, 8, 77, 0);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &echo),
        Ok(())
    );
    assert_eq!(
        fw.to_peer(
            now,
            &p,
            &peers,
            &packet("10.0.2.10", "10.20.3.7", 1, 0, 77, 0)
        ),
        Ok(())
    );
    // An unsolicited echo reply is no flow start.
    assert!(fw
        .to_peer(
            now,
            &p,
            &peers,
            &packet("10.0.2.10", "10.20.3.7", 1, 0, 78, 0)
        )
        .is_err());
    // Packet-too-big for a remembered TCP flow passes (path MTU discovery); an unrelated one not.
    let syn = packet("fd00:20:0:1::7", "fd00:1::10", 6, 40000, 443, SYN);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &syn),
        Ok(())
    );
    let mut ptb = vec![2u8, 0, 0, 0, 0, 0, 5, 0x78];
    ptb.extend(&syn[..48]);
    let icmp = ip(
        "fd99::1".parse().unwrap(),
        "fd00:20:0:1::7".parse().unwrap(),
        58,
        &ptb,
    );
    assert_eq!(fw.to_peer(now, &p, &peers, &icmp), Ok(()));
    let mut other = vec![2u8, 0, 0, 0, 0, 0, 5, 0x78];
    other.extend(&packet("fd00:20:0:1::7", "fd00:1::10", 6, 40999, 443, SYN)[..48]);
    let icmp = ip(
        "fd99::1".parse().unwrap(),
        "fd00:20:0:1::7".parse().unwrap(),
        58,
        &other,
    );
    assert_eq!(
        fw.to_peer(now, &p, &peers, &icmp),
        Err(FirewallDrop::UnrelatedIcmpError)
    );
    assert_eq!(fw.counters().related_icmp, 1);
}

#[test]
fn fragments_and_malformed_packets_are_dropped_and_counted() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    let mut frag = packet("10.20.1.7", "10.1.0.10", 6, 40000, 443, SYN);
    frag[6] = 0x00;
    frag[7] = 0x10; // fragment offset 16
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &frag),
        Err(FirewallDrop::Fragment)
    );
    let syn = packet("10.20.1.7", "10.1.0.10", 6, 40000, 443, SYN);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &syn[..22]),
        Err(FirewallDrop::Malformed)
    );
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &[]),
        Err(FirewallDrop::Malformed)
    );
    assert_eq!(fw.counters().drops["fragment"], 1);
    assert_eq!(fw.counters().drops["malformed_inner_packet"], 2);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120), v6 in any::<bool>()) {
        let p = policy();
    let peers = peers();
        let mut fw = Firewall::new(FirewallConfig::default());
        let mut bytes = bytes;
        if let Some(b) = bytes.first_mut() {
            *b = (*b & 0x0f) | if v6 { 0x60 } else { 0x45 };
        }
        let town = spoke(&p, "musterstadt", "rathaus");
        let _ = fw.from_peer(Instant::now(), &p, peer(town), town, &peers, &bytes);
        let _ = fw.to_peer(Instant::now(), &p, &peers, &bytes);
    }
}

/// The example policy with `edit` applied to the Musterstadt fragment and a new version.
fn edited_policy(version: u64, edit: impl Fn(String) -> String) -> CompiledPolicy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
    let operator = read("operator.toml").replace("version = 7", &format!("version = {version}"));
    let musterstadt = edit(read("tenants/musterstadt.toml"));
    let others: Vec<(String, String)> = ["beispieldorf", "kreis", "rz"]
        .iter()
        .map(|t| (format!("{t}.toml"), read(&format!("tenants/{t}.toml"))))
        .collect();
    let mut tenants: Vec<(&str, &str)> = vec![("musterstadt.toml", musterstadt.as_str())];
    tenants.extend(others.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    let policy = komnet_policy::Policy::from_texts(&operator, &tenants).unwrap();
    CompiledPolicy::from_policy(policy).unwrap()
}

#[test]
fn a_policy_change_keeps_flows_it_allows_and_cuts_the_others() {
    let v1 = policy();
    let peers = peers();
    let rathaus = spoke(&v1, "musterstadt", "rathaus");
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let dms = packet("10.20.1.7", "10.1.0.10", 6, 40000, 443, SYN);
    let files = packet("10.20.1.7", "10.1.20.5", 6, 40001, 445, SYN);
    assert_eq!(
        fw.from_peer(now, &v1, peer(rathaus), rathaus, &peers, &dms),
        Ok(())
    );
    assert_eq!(
        fw.from_peer(now, &v1, peer(rathaus), rathaus, &peers, &files),
        Ok(())
    );
    assert_eq!(fw.flow_count(), 2);

    // Version 8 still allows both: both flows go on, with identities resolved in version 8.
    let v8 = edited_policy(8, |t| t);
    fw.on_policy_change(&v1, &v8);
    assert_eq!(fw.flow_count(), 2);
    let rathaus8 = spoke(&v8, "musterstadt", "rathaus");
    let ack = packet("10.20.1.7", "10.1.20.5", 6, 40001, 445, ACK);
    assert_eq!(
        fw.from_peer(now, &v8, peer(rathaus8), rathaus8, &peers, &ack),
        Ok(())
    );
    assert_eq!(fw.counters().cut_by_policy, 0);

    // Version 9 takes the file server away from staff: that flow is cut, the DMS flow stays.
    let v9 = edited_policy(9, |t| {
        t.replace(
            "name = \"staff-files\"\nfrom = [\"mitarbeiter\"]",
            "name = \"staff-files\"\nfrom = [\"bauhof-buero\", \"homeoffice\"]",
        )
    });
    fw.on_policy_change(&v8, &v9);
    assert_eq!(fw.flow_count(), 1);
    assert_eq!(fw.counters().cut_by_policy, 1);
    let rathaus9 = spoke(&v9, "musterstadt", "rathaus");
    assert!(fw
        .from_peer(now, &v9, peer(rathaus9), rathaus9, &peers, &ack)
        .is_err());
    let dms_ack = packet("10.20.1.7", "10.1.0.10", 6, 40000, 443, ACK);
    assert_eq!(
        fw.from_peer(now, &v9, peer(rathaus9), rathaus9, &peers, &dms_ack),
        Ok(())
    );
}

// ---- issue 14: the packet path under attack --------------------------------------------

/// An ICMP (v4) or ICMPv6 error of `ty`/`code` from `src` to `dst` quoting `quoted`; `rest` is
/// the header's second word (the MTU of "packet too big" / "fragmentation needed").
fn icmp_error(src: &str, dst: &str, ty: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
    let src: IpAddr = src.parse().unwrap();
    let dst: IpAddr = dst.parse().unwrap();
    let mut l4 = vec![ty, code, 0, 0];
    l4.extend(rest.to_be_bytes());
    l4.extend(quoted);
    let proto = if src.is_ipv4() { 1 } else { 58 };
    ip(src, dst, proto, &l4)
}

#[test]
fn one_peer_opening_many_flows_cannot_evict_another_peers_flows() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig {
        max_flows: 1000,
        ..FirewallConfig::default()
    });
    let t0 = Instant::now();
    let b = spoke(&p, "musterstadt", "rathaus");
    let a = spoke(&p, "beispieldorf", "rathaus");
    // B: ten flows to the DMS, first.
    for i in 0..10u16 {
        let syn = packet("10.20.1.7", "10.1.0.10", 6, 40000 + i, 443, SYN);
        assert_eq!(fw.from_peer(t0, &p, peer(b), b, &peers, &syn), Ok(()));
    }
    // A: ten thousand flows to the same service (1 h idle timeout each), later.
    for i in 0..10_000u32 {
        let src = format!("10.30.1.{}", 1 + i % 200);
        let syn = packet(&src, "10.1.0.10", 6, 20000 + (i / 200) as u16, 443, SYN);
        let t = t0 + Duration::from_millis(u64::from(i));
        assert_eq!(fw.from_peer(t, &p, peer(a), a, &peers, &syn), Ok(()));
    }
    assert_eq!(fw.flow_count(), 1000);
    // Every reply to B still belongs to a remembered flow.
    let t = t0 + Duration::from_secs(11);
    for i in 0..10u16 {
        let reply = packet("10.1.0.10", "10.20.1.7", 6, 443, 40000 + i, SYN | ACK);
        assert_eq!(
            fw.to_peer(t, &p, &peers, &reply),
            Ok(()),
            "reply to B's flow {i}"
        );
    }
    // A lost its own oldest flows; B lost none, and /metrics reads these numbers.
    assert_eq!(
        fw.owner_stats(FlowOwner::Peer(peer(a))),
        OwnerStats {
            flows: 990,
            evicted: 9010,
            denied: 0,
        }
    );
    assert_eq!(
        fw.owner_stats(FlowOwner::Peer(peer(b))),
        OwnerStats {
            flows: 10,
            evicted: 0,
            denied: 0,
        }
    );
    assert_eq!(fw.counters().evicted, 9010);
    // A's newest flows are the ones it kept.
    let newest = packet("10.30.1.200", "10.1.0.10", 6, 20049, 443, ACK);
    assert_eq!(fw.from_peer(t, &p, peer(a), a, &peers, &newest), Ok(()));
}

#[test]
fn icmp_errors_pass_only_from_the_flows_far_side_to_its_near_end() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    let other = spoke(&p, "beispieldorf", "rathaus");
    // Musterstadt's staff PC talks to the DMS, over IPv4 and IPv6.
    let syn = packet("10.20.1.7", "10.1.0.10", 6, 40000, 443, SYN);
    let syn_ack = packet("10.1.0.10", "10.20.1.7", 6, 443, 40000, SYN | ACK);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &syn),
        Ok(())
    );
    assert_eq!(fw.to_peer(now, &p, &peers, &syn_ack), Ok(()));
    let syn6 = packet("fd00:20:0:1::7", "fd00:1::10", 6, 40000, 443, SYN);
    let syn_ack6 = packet("fd00:1::10", "fd00:20:0:1::7", 6, 443, 40000, SYN | ACK);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &syn6),
        Ok(())
    );
    assert_eq!(fw.to_peer(now, &p, &peers, &syn_ack6), Ok(()));

    // Covert channel: another commune's spoke sends "host unreachable" errors carrying its own
    // bytes to Musterstadt's PC, dressed up as errors about that flow.
    let mut quoted = syn[..28].to_vec();
    quoted.extend(b"secret bytes for the other side");
    let covert = icmp_error("10.30.1.9", "10.20.1.7", 3, 1, 0, &quoted);
    assert_eq!(
        fw.from_peer(now, &p, peer(other), other, &peers, &covert),
        Err(FirewallDrop::ForgedIcmpError)
    );
    // Forged "packet too big" to the DMS about Musterstadt's flow, from Beispieldorf.
    let ptb = icmp_error("fd00:30:0:1::9", "fd00:1::10", 2, 0, 1280, &syn_ack6[..48]);
    assert_eq!(
        fw.from_peer(now, &p, peer(other), other, &peers, &ptb),
        Err(FirewallDrop::ForgedIcmpError)
    );
    // The same from a router in Musterstadt's own town hall (the flow's far side for the DMS's
    // packets) is path-MTU discovery and passes.
    let ptb_own = icmp_error("fd00:20:0:1::1", "fd00:1::10", 2, 0, 1280, &syn_ack6[..48]);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &ptb_own),
        Ok(())
    );
    // An error from the data centre's side about the PC's packets, to the PC: passes.
    let frag_needed = icmp_error("10.0.0.1", "10.20.1.7", 3, 4, 1400, &syn[..28]);
    assert_eq!(fw.to_peer(now, &p, &peers, &frag_needed), Ok(()));
    // ...but not to another host than the one that sent the quoted packet,
    let misdirected = icmp_error("10.0.0.1", "10.20.1.8", 3, 4, 1400, &syn[..28]);
    assert_eq!(
        fw.to_peer(now, &p, &peers, &misdirected),
        Err(FirewallDrop::ForgedIcmpError)
    );
    // nor from the PC's side about its own packets (the error goes the wrong way),
    let backwards = icmp_error("10.20.1.7", "10.20.1.7", 3, 1, 0, &syn[..28]);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &backwards),
        Err(FirewallDrop::ForgedIcmpError)
    );
    // nor with a type that does not belong to a TCP flow (port unreachable is UDP's answer),
    let port_unreachable = icmp_error("10.1.0.10", "10.20.1.7", 3, 3, 0, &syn[..28]);
    assert_eq!(
        fw.to_peer(now, &p, &peers, &port_unreachable),
        Err(FirewallDrop::ForgedIcmpError)
    );
    // nor an ICMPv6 error quoting an IPv4 packet.
    let mixed = icmp_error("fd00::1", "fd00:20:0:1::7", 1, 0, 0, &syn[..28]);
    assert_eq!(
        fw.to_peer(now, &p, &peers, &mixed),
        Err(FirewallDrop::ForgedIcmpError)
    );
    assert_eq!(fw.counters().related_icmp, 2);
}

#[test]
fn the_data_centre_side_cannot_send_with_a_tunnel_peers_source() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    // Musterstadt's home office may print on the town hall's printer (a peer-to-peer flow the
    // hub carries). A data-centre host that takes the home office's address must not.
    let spoofed = packet("10.250.20.9", "10.20.1.50", 6, 40000, 9100, SYN);
    assert_eq!(
        fw.to_peer(now, &p, &peers, &spoofed),
        Err(FirewallDrop::DataCentreSpoof)
    );
    let spoofed6 = packet("fd00:250:20::9", "fd00:20:0:1::50", 6, 40000, 9100, SYN);
    assert_eq!(
        fw.to_peer(now, &p, &peers, &spoofed6),
        Err(FirewallDrop::DataCentreSpoof)
    );
    // Nor can it ride on the home office's real flow by copying its addresses and ports.
    let home = p
        .policy
        .peer_identity("musterstadt", None, Role::HomeOffice);
    let syn = packet("10.250.20.9", "10.20.1.50", 6, 40001, 9100, SYN);
    assert_eq!(
        fw.from_peer(now, &p, peer(home), home, &peers, &syn),
        Ok(())
    );
    let ride = packet("10.250.20.9", "10.20.1.50", 6, 40001, 9100, ACK);
    assert_eq!(
        fw.to_peer(now, &p, &peers, &ride),
        Err(FirewallDrop::DataCentreSpoof)
    );
    // Nor answer in the printer's name before the printer does; the printer's own answer,
    // from its town hall's spoke, still passes.
    let fake_answer = packet("10.20.1.50", "10.250.20.9", 6, 9100, 40001, SYN | ACK);
    assert_eq!(
        fw.to_peer(now, &p, &peers, &fake_answer),
        Err(FirewallDrop::DataCentreSpoof)
    );
    let town = spoke(&p, "musterstadt", "rathaus");
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &fake_answer),
        Ok(())
    );
    assert_eq!(fw.counters().drops["dc_spoofed_source"], 4);
}

#[test]
fn a_removed_peer_takes_its_flows_with_it() {
    let p = policy();
    let peers = peers();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    let other = spoke(&p, "beispieldorf", "rathaus");
    let syn = packet("10.20.1.7", "10.1.0.10", 6, 40000, 443, SYN);
    let probe = packet("10.0.16.10", "10.20.1.50", 6, 50000, 9100, SYN);
    let answer = packet("10.20.1.50", "10.0.16.10", 6, 9100, 50000, SYN | ACK);
    let theirs = packet("10.30.1.7", "10.1.0.10", 6, 40000, 443, SYN);
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &syn),
        Ok(())
    );
    assert_eq!(fw.to_peer(now, &p, &peers, &probe), Ok(()));
    assert_eq!(
        fw.from_peer(now, &p, peer(town), town, &peers, &answer),
        Ok(())
    );
    assert_eq!(
        fw.from_peer(now, &p, peer(other), other, &peers, &theirs),
        Ok(())
    );
    fw.forget_peer(peer(town));
    // Both flows it took part in are gone (the one it started, the one it answered).
    assert_eq!(fw.flow_count(), 1);
    assert_eq!(fw.counters().cut_peer_removed, 2);
    assert_eq!(
        fw.owner_stats(FlowOwner::Peer(peer(town))),
        OwnerStats::default()
    );
    assert_eq!(fw.owner_stats(FlowOwner::DataCentre), OwnerStats::default());
    let reply = packet("10.1.0.10", "10.20.1.7", 6, 443, 40000, ACK);
    assert!(fw.to_peer(now, &p, &peers, &reply).is_err());
}
