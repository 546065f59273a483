//! The allowed-IPs table: longest-prefix match over IPv4 and IPv6 prefixes, each owned by one
//! peer. One table serves both directions of the cryptokey routing of the WireGuard paper
//! (section 2): it routes an outgoing packet to the peer owning its destination, and it filters
//! an incoming one, whose inner source must be owned by the peer that sent it.

use std::collections::HashMap;
#[cfg(test)]
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::core::PeerId;

/// A multiplicative hash for the fixed-width integers (masked addresses) we key on. SipHash
/// (std's default) costs more than the whole lookup here, and the keys are not chosen by an
/// attacker in a way that matters: a peer's allowed IPs come from the admin's configuration.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        // The multiply moves entropy only upwards (product bit k depends on key bits 0..=k),
        // and masked prefixes end in zero bits (a /24 in eight, a /48 in eighty). The table
        // takes its bucket index from the low bits, so swap the halves: the index comes from
        // product bits 32..63, which depend on every key bit. Unswapped, every town hall's /24
        // landed in the same few buckets and a hub with a few hundred spokes probed through
        // all of them (the firewall bench's data-centre spoof check: 361 -> 814 ns per flow).
        self.0.rotate_left(32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_u128(&mut self, n: u128) {
        // Every 32-bit word of the address reaches the low half, which decides the bucket
        // (see `finish`): site prefixes differ in the upper words, hosts in the lower.
        let (lo, hi) = (n as u64, (n >> 64) as u64);
        let folded = lo ^ hi ^ ((lo ^ hi) >> 32);
        self.0 = folded.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type AddrMap<K> = HashMap<K, PeerId, BuildHasherDefault<AddrHasher>>;

/// One address family: for every prefix length in use, a map from masked address to owner,
/// longest length first. A lookup probes one map per distinct length in use — typically one
/// to three (/32 hosts, a /24 site, a /0 default) — so it costs a few multiplications and
/// compares instead of a tree walk. Measured: the tree-bitmap table of `ip_network_table` took
/// 27 % of an encapsulate + decapsulate pair at 64 B (`docs/benchmarks.md`).
#[derive(Debug)]
struct Family<K> {
    levels: Vec<Level<K>>,
}

#[derive(Debug)]
struct Level<K> {
    len: u8,
    mask: K,
    map: AddrMap<K>,
}

impl<K> Default for Family<K> {
    fn default() -> Self {
        Self { levels: Vec::new() }
    }
}

trait Key: Copy + Eq + std::hash::Hash + Ord + std::ops::BitAnd<Output = Self> {
    fn mask(len: u8) -> Self;
}

impl Key for u32 {
    fn mask(len: u8) -> Self {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }
}

impl Key for u128 {
    fn mask(len: u8) -> Self {
        u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }
}

impl<K: Key> Family<K> {
    fn insert(&mut self, addr: K, len: u8, peer: PeerId) -> Option<PeerId> {
        let pos = match self.levels.binary_search_by(|l| len.cmp(&l.len)) {
            Ok(i) => i,
            Err(i) => {
                let level = Level {
                    len,
                    mask: K::mask(len),
                    map: AddrMap::default(),
                };
                self.levels.insert(i, level);
                i
            }
        };
        let level = &mut self.levels[pos];
        level.map.insert(addr & level.mask, peer)
    }

    #[inline]
    fn lookup(&self, addr: K) -> Option<PeerId> {
        self.levels
            .iter()
            .find_map(|l| l.map.get(&(addr & l.mask)).copied())
    }

    /// Removes `addr/len` if `peer` owns it.
    fn remove_owned(&mut self, addr: K, len: u8, peer: PeerId) {
        let Ok(pos) = self.levels.binary_search_by(|l| len.cmp(&l.len)) else {
            return;
        };
        let level = &mut self.levels[pos];
        let key = addr & level.mask;
        if level.map.get(&key) == Some(&peer) {
            level.map.remove(&key);
        }
        if level.map.is_empty() {
            self.levels.remove(pos);
        }
    }

    /// (address, length, owner), sorted by address then length.
    fn entries(&self) -> Vec<(K, u8, PeerId)> {
        let mut v: Vec<_> = self
            .levels
            .iter()
            .flat_map(|l| l.map.iter().map(|(a, p)| (*a, l.len, *p)))
            .collect();
        v.sort();
        v
    }

    fn len(&self) -> usize {
        self.levels.iter().map(|l| l.map.len()).sum()
    }
}

/// Prefix → peer table. Inserting a prefix another peer owns moves it (as `wg` does).
#[derive(Default)]
pub struct AllowedIps {
    v4: Family<u32>,
    v6: Family<u128>,
    /// Each peer's prefixes (host bits cleared), so that taking a peer's prefixes out touches
    /// only those: a walk over the whole table per removal made a hub's registry snapshot of
    /// 10,000 peers cost 10,000² (every admission clears the peer's prefixes first).
    owned: HashMap<PeerId, Vec<IpNet>>,
}

impl std::fmt::Debug for AllowedIps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowedIps")
            .field("v4", &self.v4.len())
            .field("v6", &self.v6.len())
            .finish()
    }
}

impl AllowedIps {
    /// Gives `net` (host bits cleared) to `peer`; returns the previous owner if it moved.
    pub fn insert(&mut self, net: IpNet, peer: PeerId) -> Option<PeerId> {
        let old = match net {
            IpNet::V4(n) => self.v4.insert(u32::from(n.addr()), n.prefix_len(), peer),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), peer),
        };
        let net = net.trunc();
        let old = old.filter(|o| *o != peer);
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
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// Removes every prefix of `peer`.
    pub fn remove_peer(&mut self, peer: PeerId) {
        for net in self.owned.remove(&peer).unwrap_or_default() {
            match net {
                IpNet::V4(n) => self
                    .v4
                    .remove_owned(u32::from(n.addr()), n.prefix_len(), peer),
                IpNet::V6(n) => self
                    .v6
                    .remove_owned(u128::from(n.addr()), n.prefix_len(), peer),
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
        let v4 =
            self.v4.entries().into_iter().filter_map(|(a, l, p)| {
                Some((IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).ok()?), p))
            });
        let v6 =
            self.v6.entries().into_iter().filter_map(|(a, l, p)| {
                Some((IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).ok()?), p))
            });
        v4.chain(v6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::hash::BuildHasher;

    #[test]
    fn masked_prefixes_spread_over_buckets() {
        // 400 town halls' /24s and /48s: their bucket index (the hash's low 10 bits for a table
        // of 1,024 buckets) must take many values, not one.
        let h = BuildHasherDefault::<AddrHasher>::default();
        let v4: HashSet<u64> = (0..400u32)
            .map(|i| {
                h.hash_one(u32::from(Ipv4Addr::new(
                    10,
                    16 + (i / 256) as u8,
                    i as u8,
                    0,
                ))) & 1023
            })
            .collect();
        let v6: HashSet<u64> = (0..400u16)
            .map(|i| h.hash_one(u128::from(Ipv6Addr::new(0xfd00, i, 0, 0, 0, 0, 0, 0))) & 1023)
            .collect();
        assert!(v4.len() > 300, "IPv4 /24s land in {} buckets", v4.len());
        assert!(v6.len() > 300, "IPv6 /48s land in {} buckets", v6.len());
    }

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

    /// Inserts `entries` and compares lookups of `probes` and of every inserted prefix's own
    /// address with the naive model.
    fn check_against_naive(
        entries: Vec<(IpAddr, u8, u32)>,
        probes: Vec<IpAddr>,
    ) -> Result<(), TestCaseError> {
        let entries: Vec<(IpNet, PeerId)> = entries
            .into_iter()
            .map(|(a, l, p)| (IpNet::new(a, l).unwrap(), PeerId(p)))
            .collect();
        let mut t = AllowedIps::default();
        for (n, p) in &entries {
            t.insert(*n, *p);
        }
        let inside = entries.iter().map(|(n, _)| n.addr());
        for addr in probes.into_iter().chain(inside) {
            prop_assert_eq!(t.lookup(addr), naive(&entries, addr));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_a_naive_model_v4(
            entries in proptest::collection::vec((any::<u32>(), 0u8..=32, 0u32..8), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 0..40),
        ) {
            let entries = entries.iter().map(|(a, l, p)| (IpAddr::from(a.to_be_bytes()), *l, *p));
            let probes = probes.iter().map(|a| IpAddr::from(a.to_be_bytes()));
            check_against_naive(entries.collect(), probes.collect())?;
        }

        #[test]
        fn matches_a_naive_model_v6(
            entries in proptest::collection::vec((any::<u128>(), 0u8..=128, 0u32..8), 0..40),
            probes in proptest::collection::vec(any::<u128>(), 0..40),
        ) {
            let entries = entries.iter().map(|(a, l, p)| (IpAddr::from(a.to_be_bytes()), *l, *p));
            let probes = probes.iter().map(|a| IpAddr::from(a.to_be_bytes()));
            check_against_naive(entries.collect(), probes.collect())?;
        }
    }
}
