//! The hub's firewall with the worked example policy: new flows by policy and identity,
//! replies by state, related ICMP errors, timeouts, the table bound, and bad packets.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use komnet_gateway::firewall::{Firewall, FirewallConfig, FirewallDrop};
use komnet_policy::{CompiledPolicy, Decider, PeerIdentity, Role};
use proptest::prelude::*;

fn policy() -> CompiledPolicy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
    CompiledPolicy::load(&dir).unwrap()
}

fn spoke(p: &CompiledPolicy, tenant: &str, site: &str) -> Option<PeerIdentity> {
    p.policy.peer_identity(tenant, Some(site), Role::Spoke)
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
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    // Staff PC -> DMS: allowed; the DMS's reply passes; the DMS cannot start a flow back.
    let syn = packet("10.20.1.7", "10.0.1.10", 6, 40000, 443, SYN);
    assert_eq!(fw.from_peer(now, &p, town, &syn), Ok(()));
    let reply = packet("10.0.1.10", "10.20.1.7", 6, 443, 40000, SYN | ACK);
    assert_eq!(fw.to_peer(now, &p, &reply), Ok(()));
    let unsolicited = packet("10.0.1.10", "10.20.1.7", 6, 443, 40001, SYN);
    // The DMS's address is in no segment: nothing may start a flow from it.
    assert!(matches!(
        fw.to_peer(now, &p, &unsolicited),
        Err(FirewallDrop::Policy(Decider::NoSegment))
    ));
    // Same over IPv6.
    let syn6 = packet("fd00:20:0:1::7", "fd00:0:0:1::10", 6, 40000, 443, SYN);
    assert_eq!(fw.from_peer(now, &p, town, &syn6), Ok(()));
    assert_eq!(
        fw.to_peer(
            now,
            &p,
            &packet("fd00:0:0:1::10", "fd00:20:0:1::7", 6, 443, 40000, ACK)
        ),
        Ok(())
    );
    // Guest WLAN: the guardrail, with the guardrail as the reason.
    let guest = packet("10.20.100.5", "10.0.1.53", 17, 5353, 53, 0);
    assert!(matches!(
        fw.from_peer(now, &p, town, &guest),
        Err(FirewallDrop::Policy(Decider::Guardrail(_)))
    ));
    // A spoke sending from another site's or another commune's address.
    let foreign = packet("10.30.1.7", "10.0.1.10", 6, 40000, 443, SYN);
    assert!(matches!(
        fw.from_peer(now, &p, town, &foreign),
        Err(FirewallDrop::Policy(Decider::ForeignSource))
    ));
    let other_site = spoke(&p, "musterstadt", "bauhof");
    assert!(matches!(
        fw.from_peer(now, &p, other_site, &syn),
        Err(FirewallDrop::Policy(Decider::ForeignSource))
    ));
    // A peer without identity gets nothing through.
    assert_eq!(
        fw.from_peer(now, &p, None, &syn),
        Err(FirewallDrop::NoIdentity)
    );
    // The data centre's monitoring may start flows to the town hall's printer.
    let probe = packet("10.0.16.10", "10.20.1.50", 6, 50000, 9100, SYN);
    assert_eq!(fw.to_peer(now, &p, &probe), Ok(()));
    assert_eq!(
        fw.from_peer(
            now,
            &p,
            town,
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
}

#[test]
fn home_office_peers_are_classified_by_their_role() {
    let p = policy();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let home = p
        .policy
        .peer_identity("musterstadt", None, Role::HomeOffice);
    let to_files = packet("10.250.20.9", "10.1.20.5", 6, 40000, 445, SYN);
    assert_eq!(fw.from_peer(now, &p, home, &to_files), Ok(()));
    // The same address sent by a spoke identity is not the spoke's to use.
    let town = spoke(&p, "musterstadt", "rathaus");
    assert!(fw
        .from_peer(
            now,
            &p,
            town,
            &packet("10.250.20.9", "10.1.20.5", 6, 40001, 445, SYN)
        )
        .is_err());
    // Another commune's home office cannot reach Musterstadt's files.
    let other = p.policy.peer_identity("kreis", None, Role::HomeOffice);
    assert!(fw
        .from_peer(
            now,
            &p,
            other,
            &packet("10.250.1.9", "10.1.20.5", 6, 40000, 445, SYN)
        )
        .is_err());
}

#[test]
fn flows_expire_by_protocol_and_closing_tcp_goes_quickly() {
    let p = policy();
    let config = FirewallConfig::default();
    let mut fw = Firewall::new(config.clone());
    let t0 = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    let dns = packet("10.20.1.7", "10.0.1.53", 17, 33000, 53, 0);
    let answer = packet("10.0.1.53", "10.20.1.7", 17, 53, 33000, 0);
    assert_eq!(fw.from_peer(t0, &p, town, &dns), Ok(()));
    assert_eq!(
        fw.to_peer(t0 + Duration::from_secs(60), &p, &answer),
        Ok(())
    );
    // Idle past the UDP timeout: the answer is now an unsolicited packet.
    let later = t0 + Duration::from_secs(60) + config.udp_idle + Duration::from_secs(1);
    assert!(fw.to_peer(later, &p, &answer).is_err());
    // TCP after FIN: gone after the closing timeout, not the hour.
    let syn = packet("10.20.1.7", "10.0.1.20", 6, 41000, 993, SYN);
    let fin = packet("10.20.1.7", "10.0.1.20", 6, 41000, 993, FIN_ACK);
    let late_ack = packet("10.0.1.20", "10.20.1.7", 6, 993, 41000, ACK);
    assert_eq!(fw.from_peer(t0, &p, town, &syn), Ok(()));
    assert_eq!(fw.from_peer(t0, &p, town, &fin), Ok(()));
    let after_close = t0 + config.tcp_closing + Duration::from_secs(1);
    assert!(fw.to_peer(after_close, &p, &late_ack).is_err());
    fw.expire(t0 + Duration::from_secs(7200));
    assert_eq!(fw.flow_count(), 0);
    assert!(fw.counters().expired >= 1);
}

#[test]
fn the_table_is_bounded_and_evictions_are_counted() {
    let p = policy();
    let mut fw = Firewall::new(FirewallConfig {
        max_flows: 100,
        ..FirewallConfig::default()
    });
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    for port in 0..1000u16 {
        let syn = packet("10.20.1.7", "10.0.1.10", 6, 20000 + port, 443, SYN);
        assert_eq!(
            fw.from_peer(now + Duration::from_millis(u64::from(port)), &p, town, &syn),
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
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    // VoIP phones may ping the PBX; the echo reply passes back.
    let echo = packet("10.20.3.7", "10.0.2.10", 1, 8, 77, 0);
    assert_eq!(fw.from_peer(now, &p, town, &echo), Ok(()));
    assert_eq!(
        fw.to_peer(now, &p, &packet("10.0.2.10", "10.20.3.7", 1, 0, 77, 0)),
        Ok(())
    );
    // An unsolicited echo reply is no flow start.
    assert!(fw
        .to_peer(now, &p, &packet("10.0.2.10", "10.20.3.7", 1, 0, 78, 0))
        .is_err());
    // Packet-too-big for a remembered TCP flow passes (path MTU discovery); an unrelated one not.
    let syn = packet("fd00:20:0:1::7", "fd00:0:0:1::10", 6, 40000, 443, SYN);
    assert_eq!(fw.from_peer(now, &p, town, &syn), Ok(()));
    let mut ptb = vec![2u8, 0, 0, 0, 0, 0, 5, 0x78];
    ptb.extend(&syn[..48]);
    let icmp = ip(
        "fd99::1".parse().unwrap(),
        "fd00:20:0:1::7".parse().unwrap(),
        58,
        &ptb,
    );
    assert_eq!(fw.to_peer(now, &p, &icmp), Ok(()));
    let mut other = vec![2u8, 0, 0, 0, 0, 0, 5, 0x78];
    other.extend(&packet("fd00:20:0:1::7", "fd00:0:0:1::10", 6, 40999, 443, SYN)[..48]);
    let icmp = ip(
        "fd99::1".parse().unwrap(),
        "fd00:20:0:1::7".parse().unwrap(),
        58,
        &other,
    );
    assert_eq!(
        fw.to_peer(now, &p, &icmp),
        Err(FirewallDrop::UnrelatedIcmpError)
    );
    assert_eq!(fw.counters().related_icmp, 1);
}

#[test]
fn fragments_and_malformed_packets_are_dropped_and_counted() {
    let p = policy();
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let town = spoke(&p, "musterstadt", "rathaus");
    let mut frag = packet("10.20.1.7", "10.0.1.10", 6, 40000, 443, SYN);
    frag[6] = 0x00;
    frag[7] = 0x10; // fragment offset 16
    assert_eq!(
        fw.from_peer(now, &p, town, &frag),
        Err(FirewallDrop::Fragment)
    );
    let syn = packet("10.20.1.7", "10.0.1.10", 6, 40000, 443, SYN);
    assert_eq!(
        fw.from_peer(now, &p, town, &syn[..22]),
        Err(FirewallDrop::Malformed)
    );
    assert_eq!(
        fw.from_peer(now, &p, town, &[]),
        Err(FirewallDrop::Malformed)
    );
    assert_eq!(fw.counters().drops["fragment"], 1);
    assert_eq!(fw.counters().drops["malformed_inner_packet"], 2);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120), v6 in any::<bool>()) {
        let p = policy();
        let mut fw = Firewall::new(FirewallConfig::default());
        let mut bytes = bytes;
        if let Some(b) = bytes.first_mut() {
            *b = (*b & 0x0f) | if v6 { 0x60 } else { 0x45 };
        }
        let town = spoke(&p, "musterstadt", "rathaus");
        let _ = fw.from_peer(Instant::now(), &p, town, &bytes);
        let _ = fw.to_peer(Instant::now(), &p, &bytes);
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
    let rathaus = spoke(&v1, "musterstadt", "rathaus");
    let mut fw = Firewall::new(FirewallConfig::default());
    let now = Instant::now();
    let dms = packet("10.20.1.7", "10.0.1.10", 6, 40000, 443, SYN);
    let files = packet("10.20.1.7", "10.1.20.5", 6, 40001, 445, SYN);
    assert_eq!(fw.from_peer(now, &v1, rathaus, &dms), Ok(()));
    assert_eq!(fw.from_peer(now, &v1, rathaus, &files), Ok(()));
    assert_eq!(fw.flow_count(), 2);

    // Version 8 still allows both: both flows go on, with identities resolved in version 8.
    let v8 = edited_policy(8, |t| t);
    fw.on_policy_change(&v1, &v8);
    assert_eq!(fw.flow_count(), 2);
    let rathaus8 = spoke(&v8, "musterstadt", "rathaus");
    let ack = packet("10.20.1.7", "10.1.20.5", 6, 40001, 445, ACK);
    assert_eq!(fw.from_peer(now, &v8, rathaus8, &ack), Ok(()));
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
    assert!(fw.from_peer(now, &v9, rathaus9, &ack).is_err());
    let dms_ack = packet("10.20.1.7", "10.0.1.10", 6, 40000, 443, ACK);
    assert_eq!(fw.from_peer(now, &v9, rathaus9, &dms_ack), Ok(()));
}
