//! The allowed-IPs table: longest-prefix match over IPv4 and IPv6 prefixes, each owned by one
//! peer. One table serves both directions of the cryptokey routing of the WireGuard paper
//! (section 2): it routes an outgoing packet to the peer owning its destination, and it filters
//! an incoming one, whose inner source must be owned by the peer that sent it. The matching is
//! komnet's one [`PrefixTable`]; this adds who owns what.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use komnet_proto::prefix_table::PrefixTable;

use crate::core::PeerId;

/// Prefix → peer table. Inserting a prefix another peer owns moves it (as `wg` does).
#[derive(Default)]
pub struct AllowedIps {
    table: PrefixTable<PeerId>,
    /// Each peer's prefixes (host bits cleared), so that taking a peer's prefixes out touches
    /// only those: a walk over the whole table per removal made a hub's registry snapshot of
    /// 10,000 peers cost 10,000² (every admission clears the peer's prefixes first).
    owned: HashMap<PeerId, Vec<IpNet>>,
}

impl std::fmt::Debug for AllowedIps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v4, v6) = self.table.len_by_family();
        f.debug_struct("AllowedIps")
            .field("v4", &v4)
            .field("v6", &v6)
            .finish()
    }
}

impl AllowedIps {
    /// Gives `net` (host bits cleared) to `peer`; returns the previous owner if it moved.
    pub fn insert(&mut self, net: IpNet, peer: PeerId) -> Option<PeerId> {
        let net = net.trunc();
        let old = self.table.insert(net, peer).filter(|o| *o != peer);
        if let Some(o) = old {
            if let Some(list) = self.owned.get_mut(&o) {
                list.retain(|n| *n != net);
                if list.is_empty() {
                    self.owned.remove(&o);
                }
            }
        }
        let list = self.owned.entry(peer).or_default();
        if !list.contains(&net) {
            list.push(net);
        }
        old
    }

    /// The peer owning the longest prefix that contains `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<PeerId> {
        self.table.lookup(addr)
    }

    /// Removes every prefix of `peer`.
    pub fn remove_peer(&mut self, peer: PeerId) {
        for net in self.owned.remove(&peer).unwrap_or_default() {
            if self.table.get(&net) == Some(peer) {
                self.table.remove(&net);
            }
        }
    }

    /// The prefixes of `peer`: IPv4 first, each family sorted by address, then length.
    pub fn prefixes_of(&self, peer: PeerId) -> Vec<IpNet> {
        let mut nets = self.owned.get(&peer).cloned().unwrap_or_default();
        // IPv4 first (the enum's order), then by address, then by length.
        nets.sort();
        nets
    }

    /// Every (prefix, peer) pair, in the order of `prefixes_of`.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, PeerId)> + '_ {
        self.table.entries().into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_v4_and_v6() {
        let mut t = AllowedIps::default();
        t.insert(net("10.0.0.0/8"), PeerId(1));
        t.insert(net("10.1.0.0/16"), PeerId(2));
        t.insert(net("fd00::/8"), PeerId(3));
        t.insert(net("fd00:1::/32"), PeerId(4));
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(PeerId(2)));
        assert_eq!(t.lookup("10.2.2.3".parse().unwrap()), Some(PeerId(1)));
        assert_eq!(t.lookup("11.0.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("fd00:1::5".parse().unwrap()), Some(PeerId(4)));
        assert_eq!(t.lookup("fd00:2::5".parse().unwrap()), Some(PeerId(3)));
        assert_eq!(t.lookup("fe80::1".parse().unwrap()), None);
    }

    #[test]
    fn default_routes_match_everything_of_their_family() {
        let mut t = AllowedIps::default();
        t.insert(net("0.0.0.0/0"), PeerId(1));
        t.insert(net("::/0"), PeerId(2));
        t.insert(net("10.0.0.7/32"), PeerId(3));
        assert_eq!(t.lookup("203.0.113.9".parse().unwrap()), Some(PeerId(1)));
        assert_eq!(t.lookup("10.0.0.7".parse().unwrap()), Some(PeerId(3)));
        assert_eq!(t.lookup("2001:db8::1".parse().unwrap()), Some(PeerId(2)));
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            vec![
                (net("0.0.0.0/0"), PeerId(1)),
                (net("10.0.0.7/32"), PeerId(3)),
                (net("::/0"), PeerId(2))
            ]
        );
    }

    #[test]
    fn host_bits_are_cleared_and_prefix_moves_between_peers() {
        let mut t = AllowedIps::default();
        assert_eq!(t.insert(net("192.168.1.77/24"), PeerId(1)), None);
        assert_eq!(t.prefixes_of(PeerId(1)), vec![net("192.168.1.0/24")]);
        assert_eq!(t.insert(net("192.168.1.0/24"), PeerId(2)), Some(PeerId(1)));
        assert!(t.prefixes_of(PeerId(1)).is_empty());
        // Removing the peer that lost the prefix leaves the new owner's in place.
        t.remove_peer(PeerId(1));
        assert_eq!(t.lookup("192.168.1.1".parse().unwrap()), Some(PeerId(2)));
        t.remove_peer(PeerId(2));
        assert_eq!(t.lookup("192.168.1.1".parse().unwrap()), None);
    }

    /// The table after inserting `entries` and removing `removed` peers, next to a model that
    /// replays the same steps on a plain map.
    fn check_against_naive(
        entries: Vec<(IpAddr, u8, u32)>,
        removed: Vec<u32>,
        probes: Vec<IpAddr>,
    ) -> Result<(), TestCaseError> {
        let mut t = AllowedIps::default();
        let mut owners: std::collections::BTreeMap<IpNet, PeerId> = Default::default();
        for (a, l, p) in &entries {
            let n = IpNet::new(*a, *l).unwrap();
            t.insert(n, PeerId(*p));
            owners.insert(n.trunc(), PeerId(*p));
        }
        for p in removed {
            t.remove_peer(PeerId(p));
            owners.retain(|_, o| *o != PeerId(p));
        }
        let inside = entries.iter().map(|(a, _, _)| *a);
        for addr in probes.into_iter().chain(inside) {
            let want = owners
                .iter()
                .filter(|(n, _)| n.contains(&addr))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, p)| *p);
            prop_assert_eq!(t.lookup(addr), want);
        }
        for (p, _) in t.owned.iter() {
            let mine: Vec<IpNet> = owners
                .iter()
                .filter(|(_, o)| *o == p)
                .map(|(n, _)| *n)
                .collect();
            prop_assert_eq!(t.prefixes_of(*p), mine);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_a_naive_model_v4(
            entries in proptest::collection::vec((any::<u32>(), 0u8..=32, 0u32..8), 0..40),
            removed in proptest::collection::vec(0u32..8, 0..3),
            probes in proptest::collection::vec(any::<u32>(), 0..40),
        ) {
            let entries = entries.iter().map(|(a, l, p)| (IpAddr::from(a.to_be_bytes()), *l, *p));
            let probes = probes.iter().map(|a| IpAddr::from(a.to_be_bytes()));
            check_against_naive(entries.collect(), removed, probes.collect())?;
        }

        #[test]
        fn matches_a_naive_model_v6(
            entries in proptest::collection::vec((any::<u128>(), 0u8..=128, 0u32..8), 0..40),
            removed in proptest::collection::vec(0u32..8, 0..3),
            probes in proptest::collection::vec(any::<u128>(), 0..40),
        ) {
            let entries = entries.iter().map(|(a, l, p)| (IpAddr::from(a.to_be_bytes()), *l, *p));
            let probes = probes.iter().map(|a| IpAddr::from(a.to_be_bytes()));
            check_against_naive(entries.collect(), removed, probes.collect())?;
        }
    }
}
