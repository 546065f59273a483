//! The allowed-IPs table: longest-prefix match over IPv4 and IPv6 prefixes, each owned by one
//! peer. One table serves both directions of the cryptokey routing of the WireGuard paper
//! (section 2): it routes an outgoing packet to the peer owning its destination, and it filters
//! an incoming one, whose inner source must be owned by the peer that sent it.

use std::net::IpAddr;

use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;

use crate::core::PeerId;

/// Prefix → peer table. Inserting a prefix another peer owns moves it (as `wg` does).
pub struct AllowedIps {
    table: IpNetworkTable<PeerId>,
}

impl std::fmt::Debug for AllowedIps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v4, v6) = self.table.len();
        f.debug_struct("AllowedIps")
            .field("v4", &v4)
            .field("v6", &v6)
            .finish()
    }
}

impl Default for AllowedIps {
    fn default() -> Self {
        Self {
            table: IpNetworkTable::new(),
        }
    }
}

fn to_network(net: IpNet) -> IpNetwork {
    let net = net.trunc();
    // A truncated IpNet always has a valid prefix length and no host bits, the two things
    // IpNetwork::new checks, so this cannot fail.
    match IpNetwork::new(net.addr(), net.prefix_len()) {
        Ok(n) => n,
        Err(_) => unreachable!("truncated prefix {net} rejected"),
    }
}

fn from_network(net: IpNetwork) -> IpNet {
    match IpNet::new(net.network_address(), net.netmask()) {
        Ok(n) => n,
        Err(_) => unreachable!("IpNetwork with an invalid prefix length"),
    }
}

impl AllowedIps {
    /// Gives `net` (host bits cleared) to `peer`; returns the previous owner if it moved.
    pub fn insert(&mut self, net: IpNet, peer: PeerId) -> Option<PeerId> {
        self.table
            .insert(to_network(net), peer)
            .filter(|old| *old != peer)
    }

    /// The peer owning the longest prefix that contains `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<PeerId> {
        match addr {
            IpAddr::V4(a) => self.table.longest_match_ipv4(a).map(|(_, p)| *p),
            IpAddr::V6(a) => self.table.longest_match_ipv6(a).map(|(_, p)| *p),
        }
    }

    /// Removes every prefix of `peer`.
    pub fn remove_peer(&mut self, peer: PeerId) {
        self.table.retain(|_, p| *p != peer);
    }

    /// The prefixes of `peer`, IPv4 first, each family in table order.
    pub fn prefixes_of(&self, peer: PeerId) -> Vec<IpNet> {
        self.table
            .iter()
            .filter(|(_, p)| **p == peer)
            .map(|(n, _)| from_network(n))
            .collect()
    }

    /// Every (prefix, peer) pair.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, PeerId)> + '_ {
        self.table.iter().map(|(n, p)| (from_network(n), *p))
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
    fn host_bits_are_cleared_and_prefix_moves_between_peers() {
        let mut t = AllowedIps::default();
        assert_eq!(t.insert(net("192.168.1.77/24"), PeerId(1)), None);
        assert_eq!(t.prefixes_of(PeerId(1)), vec![net("192.168.1.0/24")]);
        assert_eq!(t.insert(net("192.168.1.0/24"), PeerId(2)), Some(PeerId(1)));
        assert!(t.prefixes_of(PeerId(1)).is_empty());
        t.remove_peer(PeerId(2));
        assert_eq!(t.lookup("192.168.1.1".parse().unwrap()), None);
    }

    fn naive(entries: &[(IpNet, PeerId)], addr: IpAddr) -> Option<PeerId> {
        // Later inserts of the same prefix replace earlier ones, as in the table.
        let mut best: Option<(u8, PeerId)> = None;
        let mut owners: std::collections::BTreeMap<IpNet, PeerId> = Default::default();
        for (n, p) in entries {
            owners.insert(n.trunc(), *p);
        }
        for (n, p) in owners {
            if n.contains(&addr) && best.is_none_or(|(l, _)| n.prefix_len() > l) {
                best = Some((n.prefix_len(), p));
            }
        }
        best.map(|(_, p)| p)
    }

    proptest! {
        #[test]
        fn matches_a_naive_model(
            v4 in proptest::collection::vec((any::<u32>(), 0u8..=32, 0u32..8), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 0..40),
        ) {
            let entries: Vec<(IpNet, PeerId)> = v4
                .iter()
                .map(|(a, l, p)| (IpNet::new(IpAddr::from(a.to_be_bytes()), *l).unwrap(), PeerId(*p)))
                .collect();
            let mut t = AllowedIps::default();
            for (n, p) in &entries {
                t.insert(*n, *p);
            }
            // Probe addresses inside the inserted prefixes as well as random ones.
            let inside = entries.iter().map(|(n, _)| n.addr());
            for addr in probes.iter().map(|a| IpAddr::from(a.to_be_bytes())).chain(inside) {
                prop_assert_eq!(t.lookup(addr), naive(&entries, addr));
            }
        }
    }
}
