//! The one longest-prefix-match table of komnet, generic over what a prefix maps to: the
//! gateway's allowed IPs (prefix → peer) and the policy classifier's source segments and
//! destination classes (prefix → index) are this table.
//!
//! Per address family it keeps one hash map per prefix length in use, probed longest first, so
//! a lookup costs a multiply and a compare per distinct length — typically one to three (/32
//! hosts, a /24 site, a /0 default) — instead of a tree walk: the tree bitmap of
//! `ip_network_table` took 27 % of the core's encapsulate + decapsulate pair at 64 B
//! (docs/benchmarks.md §1). The maps hash with [`IntHasher`], which the classifier's other
//! integer-keyed tables use too.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A multiplicative hasher for integer keys (masked addresses, packed index pairs). SipHash,
/// std's default, costs more than a whole lookup here, and the keys are not an attacker's to
/// choose in a way that matters: prefixes come from the admin's configuration and the policy,
/// and a probe for an unknown key costs one miss.
#[derive(Default, Clone, Copy, Debug)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // A multiply moves entropy only upwards (product bit k depends on key bits 0..=k), and
        // masked prefixes end in zero bits (a /24 in eight, a /48 in eighty) while packed pairs
        // differ in their upper half. The table takes its bucket from the low bits and a tag
        // from the top ones, so fold the high half down, multiply once more and fold again: every
        // key bit reaches both (the fold after the multiply is what carries an IPv6 /48's
        // subnet bits, high in the folded key, into the bucket index). Without it every town hall's /24 landed in the same few buckets
        // (firewall bench: 361 -> 814 ns per flow) and (segment, class) pairs differing only in
        // the segment did too (classifier: 6.3 M lookups/s instead of 24 M, §6).
        let x = (self.0 ^ (self.0 >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        x ^ (x >> 29)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    #[inline]
    fn write_u128(&mut self, n: u128) {
        // One multiply for an IPv6 address: site prefixes differ in the upper words, hosts in
        // the lower, and the fold keeps both.
        let (lo, hi) = (n as u64, (n >> 64) as u64);
        self.write_u64(lo ^ hi.rotate_left(32));
    }
}

/// A hash map keyed by integers, hashed with [`IntHasher`].
pub type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// An address as the integer it is (IPv4 `u32`, IPv6 `u128`).
trait Bits: Copy + Eq + Ord + std::hash::Hash + std::ops::BitAnd<Output = Self> {
    fn mask(len: u8) -> Self;
}

impl Bits for u32 {
    #[inline]
    fn mask(len: u8) -> Self {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }
}

impl Bits for u128 {
    #[inline]
    fn mask(len: u8) -> Self {
        u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }
}

/// One address family: for every prefix length in use, a map from masked address to value,
/// longest length first.
#[derive(Debug, Clone)]
struct Family<K, V> {
    levels: Vec<Level<K, V>>,
}

#[derive(Debug, Clone)]
struct Level<K, V> {
    len: u8,
    mask: K,
    map: IntMap<K, V>,
}

impl<K, V> Default for Family<K, V> {
    fn default() -> Self {
        Self { levels: Vec::new() }
    }
}

impl<K: Bits, V: Copy> Family<K, V> {
    fn level_mut(&mut self, len: u8) -> &mut Level<K, V> {
        let pos = match self.levels.binary_search_by(|l| len.cmp(&l.len)) {
            Ok(i) => i,
            Err(i) => {
                let level = Level {
                    len,
                    mask: K::mask(len),
                    map: IntMap::default(),
                };
                self.levels.insert(i, level);
                i
            }
        };
        &mut self.levels[pos]
    }

    fn level(&self, len: u8) -> Option<(usize, &Level<K, V>)> {
        let pos = self.levels.binary_search_by(|l| len.cmp(&l.len)).ok()?;
        Some((pos, &self.levels[pos]))
    }

    fn insert(&mut self, addr: K, len: u8, value: V) -> Option<V> {
        let level = self.level_mut(len);
        level.map.insert(addr & level.mask, value)
    }

    fn insert_vacant(&mut self, addr: K, len: u8, value: V) -> bool {
        let level = self.level_mut(len);
        let mut inserted = false;
        level.map.entry(addr & level.mask).or_insert_with(|| {
            inserted = true;
            value
        });
        inserted
    }

    fn get(&self, addr: K, len: u8) -> Option<V> {
        let (_, level) = self.level(len)?;
        level.map.get(&(addr & level.mask)).copied()
    }

    fn remove(&mut self, addr: K, len: u8) -> Option<V> {
        let (pos, _) = self.level(len)?;
        let level = &mut self.levels[pos];
        let old = level.map.remove(&(addr & level.mask));
        if level.map.is_empty() {
            self.levels.remove(pos);
        }
        old
    }

    #[inline]
    fn lookup(&self, addr: K) -> Option<V> {
        self.levels
            .iter()
            .find_map(|l| l.map.get(&(addr & l.mask)).copied())
    }

    /// (address, length, value), sorted by address, then length.
    fn entries(&self) -> Vec<(K, u8, V)> {
        let mut v: Vec<_> = self
            .levels
            .iter()
            .flat_map(|l| l.map.iter().map(|(a, value)| (*a, l.len, *value)))
            .collect();
        v.sort_by_key(|(a, len, _)| (*a, *len));
        v
    }

    fn len(&self) -> usize {
        self.levels.iter().map(|l| l.map.len()).sum()
    }
}

/// Prefix → value, looked up by the longest prefix containing an address. Prefixes are kept
/// with their host bits cleared (`10.1.2.3/24` is `10.1.2.0/24`).
#[derive(Debug, Clone)]
pub struct PrefixTable<V> {
    v4: Family<u32, V>,
    v6: Family<u128, V>,
}

impl<V> Default for PrefixTable<V> {
    fn default() -> Self {
        Self {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

impl<V: Copy> PrefixTable<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `net` to `value`; returns what it mapped to before.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        match net {
            IpNet::V4(n) => self.v4.insert(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// Maps `net` to `value` unless it is mapped already (the first value wins); says whether
    /// it inserted.
    pub fn insert_vacant(&mut self, net: IpNet, value: V) -> bool {
        match net {
            IpNet::V4(n) => self
                .v4
                .insert_vacant(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self
                .v6
                .insert_vacant(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// What exactly `net` maps to (no longest-prefix search).
    pub fn get(&self, net: &IpNet) -> Option<V> {
        match net {
            IpNet::V4(n) => self.v4.get(u32::from(n.addr()), n.prefix_len()),
            IpNet::V6(n) => self.v6.get(u128::from(n.addr()), n.prefix_len()),
        }
    }

    /// Removes `net`; returns what it mapped to.
    pub fn remove(&mut self, net: &IpNet) -> Option<V> {
        match net {
            IpNet::V4(n) => self.v4.remove(u32::from(n.addr()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.addr()), n.prefix_len()),
        }
    }

    /// The value of the longest prefix that contains `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<V> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    #[inline]
    pub fn lookup_v4(&self, addr: Ipv4Addr) -> Option<V> {
        self.v4.lookup(u32::from(addr))
    }

    #[inline]
    pub fn lookup_v6(&self, addr: Ipv6Addr) -> Option<V> {
        self.v6.lookup(u128::from(addr))
    }

    /// Every (prefix, value): IPv4 first, each family sorted by address, then length.
    pub fn entries(&self) -> Vec<(IpNet, V)> {
        let v4 = self.v4.entries().into_iter().filter_map(|(a, l, value)| {
            Some((IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).ok()?), value))
        });
        let v6 = self.v6.entries().into_iter().filter_map(|(a, l, value)| {
            Some((IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).ok()?), value))
        });
        v4.chain(v6).collect()
    }

    /// How many prefixes of each family: (IPv4, IPv6).
    pub fn len_by_family(&self) -> (usize, usize) {
        (self.v4.len(), self.v6.len())
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Bucket indices come from the low bits: masked prefixes (zero low bits) and pairs that
    /// differ only in their upper half must still spread.
    #[test]
    fn masked_prefixes_and_packed_pairs_spread_over_buckets() {
        let h = BuildHasherDefault::<IntHasher>::default();
        let low_bits = |x: u64| x & 0x3ff;
        let v4: HashSet<u64> = (0..400u32)
            .map(|i| low_bits(h.hash_one(0x0a00_0000u32 | (i << 8))))
            .collect();
        assert!(v4.len() > 250, "v4 /24s in {} of 1024 buckets", v4.len());
        let v6: HashSet<u64> = (0..400u16)
            .map(|i| {
                let a: u128 = (0xfd00u128 << 112) | (u128::from(i) << 80);
                low_bits(h.hash_one(a))
            })
            .collect();
        assert!(v6.len() > 250, "v6 /48s in {} of 1024 buckets", v6.len());
        let pairs: HashSet<u64> = (0..400u64)
            .map(|seg| low_bits(h.hash_one((seg << 32) | 7)))
            .collect();
        assert!(
            pairs.len() > 250,
            "pairs in {} of 1024 buckets",
            pairs.len()
        );
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let mut t = PrefixTable::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.3/32"), 3);
        t.insert(net("fd00::/8"), 4);
        t.insert(net("fd00:1::/32"), 5);
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(3));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()), Some(2));
        assert_eq!(t.lookup("10.2.0.1".parse().unwrap()), Some(1));
        assert_eq!(t.lookup("11.0.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("fd00:1::9".parse().unwrap()), Some(5));
        assert_eq!(t.lookup("fd00:2::9".parse().unwrap()), Some(4));
        assert_eq!(t.lookup("fe80::1".parse().unwrap()), None);
        assert_eq!(t.len_by_family(), (3, 2));
    }

    #[test]
    fn default_routes_match_their_family_only() {
        let mut t = PrefixTable::new();
        t.insert(net("0.0.0.0/0"), 'a');
        assert_eq!(t.lookup("203.0.113.1".parse().unwrap()), Some('a'));
        assert_eq!(t.lookup("2001:db8::1".parse().unwrap()), None);
        t.insert(net("::/0"), 'b');
        assert_eq!(t.lookup("2001:db8::1".parse().unwrap()), Some('b'));
    }

    #[test]
    fn host_bits_are_cleared_and_the_first_or_last_value_wins_as_asked() {
        let mut t = PrefixTable::new();
        assert_eq!(t.insert(net("10.1.2.3/24"), 1), None);
        assert_eq!(t.get(&net("10.1.2.0/24")), Some(1));
        assert_eq!(t.insert(net("10.1.2.0/24"), 2), Some(1));
        assert!(!t.insert_vacant(net("10.1.2.9/24"), 3));
        assert_eq!(t.get(&net("10.1.2.0/24")), Some(2));
        assert!(t.insert_vacant(net("10.1.3.0/24"), 3));
        assert_eq!(
            t.entries(),
            vec![(net("10.1.2.0/24"), 2), (net("10.1.3.0/24"), 3)]
        );
        assert_eq!(t.remove(&net("10.1.2.0/24")), Some(2));
        assert_eq!(t.remove(&net("10.1.2.0/24")), None);
        assert_eq!(t.remove(&net("10.1.3.0/25")), None);
        assert_eq!(t.len(), 1);
    }

    fn naive(entries: &[(IpNet, u8)], addr: IpAddr) -> Option<u8> {
        // The last insert of a prefix wins, as in the table; then the longest prefix.
        let mut best: Option<(u8, u8)> = None;
        let mut seen = HashSet::new();
        for (n, v) in entries.iter().rev() {
            let n = n.trunc();
            if !seen.insert(n) || !n.contains(&addr) {
                continue;
            }
            if best.is_none_or(|(len, _)| n.prefix_len() > len) {
                best = Some((n.prefix_len(), *v));
            }
        }
        best.map(|(_, v)| v)
    }

    fn check(entries: &[(IpNet, u8)], removed: &[usize], probes: &[IpAddr]) {
        let mut t = PrefixTable::new();
        for (n, v) in entries {
            t.insert(*n, *v);
        }
        let mut model: Vec<(IpNet, u8)> = entries.to_vec();
        for &i in removed {
            if let Some((n, _)) = entries.get(i) {
                t.remove(n);
                let n = n.trunc();
                model.retain(|(m, _)| m.trunc() != n);
            }
        }
        for addr in probes {
            assert_eq!(t.lookup(*addr), naive(&model, *addr), "{addr}");
        }
    }

    proptest! {
        #[test]
        fn matches_a_naive_model_v4(
            entries in prop::collection::vec((any::<u32>(), 0u8..=32, any::<u8>()), 0..40),
            removed in prop::collection::vec(0usize..40, 0..8),
            probes in prop::collection::vec(any::<u32>(), 1..40),
        ) {
            // Addresses near each other so prefixes overlap.
            let entries: Vec<(IpNet, u8)> = entries
                .into_iter()
                .map(|(a, l, v)| (IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a & 0xff0f_0f0f), l).unwrap()), v))
                .collect();
            let probes: Vec<IpAddr> = probes.into_iter().map(|a| IpAddr::V4(Ipv4Addr::from(a & 0xff0f_0f0f))).collect();
            check(&entries, &removed, &probes);
        }

        #[test]
        fn matches_a_naive_model_v6(
            entries in prop::collection::vec((any::<u128>(), 0u8..=128, any::<u8>()), 0..40),
            removed in prop::collection::vec(0usize..40, 0..8),
            probes in prop::collection::vec(any::<u128>(), 1..40),
        ) {
            let squash = |a: u128| a & (0xff0f_u128 << 112 | 0x0f0f);
            let entries: Vec<(IpNet, u8)> = entries
                .into_iter()
                .map(|(a, l, v)| (IpNet::V6(Ipv6Net::new(Ipv6Addr::from(squash(a)), l).unwrap()), v))
                .collect();
            let probes: Vec<IpAddr> = probes.into_iter().map(|a| IpAddr::V6(Ipv6Addr::from(squash(a)))).collect();
            check(&entries, &removed, &probes);
        }
    }
}
