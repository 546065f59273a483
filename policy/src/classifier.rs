//! The compiled form of a policy for the userspace packet path: a few hash probes and a short
//! scan per packet, no allocation, the same decisions as [`crate::decide`].
//!
//! Compilation precomputes, for every (source segment, destination class) pair that any rule or
//! guardrail mentions, the decision for every protocol/port interval. A destination class is
//! the longest service prefix containing the destination address: every service whose
//! addresses contain the packet's destination has a prefix containing that class prefix, so the
//! class fixes the set of services a packet can be for.

use std::net::IpAddr;

use ipnet::IpNet;
use komnet_proto::prefix_table::{IntMap, PrefixTable};

use crate::flow::{Origin, PacketMeta, PortRange, Proto, Role};
use crate::model::{GuardTarget, GuardrailId, Policy, RuleId};
use crate::oracle::{Decider, Decision};

#[derive(Debug, Clone, Copy)]
struct SegmentInfo {
    tenant: u32,
    site: Option<u32>,
    homeoffice: bool,
    /// A guardrail that denies everything from this segment.
    everything: Option<GuardrailId>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    range: PortRange,
    decision: Decision,
}

/// A policy compiled for per-packet decisions.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Segment prefix → segment index.
    src: PrefixTable<u32>,
    /// Destination class prefix → class index.
    dst: PrefixTable<u32>,
    segments: Vec<SegmentInfo>,
    /// (segment << 32 | class) → range in `entries`.
    pairs: IntMap<u64, (u32, u32)>,
    entries: Vec<Entry>,
}

/// What one rule or guardrail contributes to a (segment, class) pair.
#[derive(Debug, Clone, Copy)]
enum Fragment {
    Allow(PortRange, RuleId),
    Guard(PortRange, GuardrailId),
}

impl Classifier {
    /// Compiles `policy`. Cost grows with the number of (segment, service) pairs its rules name.
    pub fn compile(policy: &Policy) -> Classifier {
        let mut src = PrefixTable::new();
        let mut segments = Vec::with_capacity(policy.segments.len());
        for (i, s) in policy.segments.iter().enumerate() {
            for p in &s.prefixes {
                // The first segment to name a prefix keeps it (the checker refuses overlaps).
                src.insert_vacant(*p, i as u32);
            }
            let everything = policy
                .guardrails
                .iter()
                .position(|g| g.to == GuardTarget::Everything && g.applies_to_segment(s));
            segments.push(SegmentInfo {
                tenant: s.tenant.0,
                site: s.site.map(|x| x.0),
                homeoffice: s.is_homeoffice(),
                everything: everything.map(|g| GuardrailId(g as u32)),
            });
        }

        // Destination classes: every distinct service prefix.
        let mut classes: Vec<IpNet> = policy
            .services
            .iter()
            .flat_map(|s| s.addresses.iter().copied())
            .collect();
        classes.sort();
        classes.dedup();
        let mut dst = PrefixTable::new();
        for (i, c) in classes.iter().enumerate() {
            dst.insert_vacant(*c, i as u32);
        }
        // For each service, the classes it covers (its own prefixes and every longer one inside).
        let service_classes: Vec<Vec<u32>> = policy
            .services
            .iter()
            .map(|s| {
                classes
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| s.addresses.iter().any(|a| a.contains(*c)))
                    .map(|(i, _)| i as u32)
                    .collect()
            })
            .collect();

        let mut fragments: IntMap<u64, Vec<Fragment>> = IntMap::default();
        let seg_has_family = |seg: usize, class: u32| {
            let v4 = classes[class as usize].addr().is_ipv4();
            policy.segments[seg]
                .prefixes
                .iter()
                .any(|p| p.addr().is_ipv4() == v4)
        };
        for (ri, rule) in policy.rules.iter().enumerate() {
            for svc in &rule.to {
                let ports = rule.allowed_ports(&policy.services[svc.index()]);
                for seg in &rule.from {
                    for &class in &service_classes[svc.index()] {
                        if !seg_has_family(seg.index(), class) {
                            continue;
                        }
                        let list = fragments.entry(pair_key(seg.0, class)).or_default();
                        list.extend(ports.iter().map(|p| Fragment::Allow(*p, RuleId(ri as u32))));
                    }
                }
            }
        }
        for (gi, g) in policy.guardrails.iter().enumerate() {
            let GuardTarget::Services(list) = &g.to else {
                continue;
            };
            for (si, seg) in policy.segments.iter().enumerate() {
                if !g.applies_to_segment(seg) {
                    continue;
                }
                for svc in list {
                    for &class in &service_classes[svc.index()] {
                        if !seg_has_family(si, class) {
                            continue;
                        }
                        let frags = fragments.entry(pair_key(si as u32, class)).or_default();
                        frags.extend(
                            policy.services[svc.index()]
                                .ports
                                .iter()
                                .map(|p| Fragment::Guard(*p, GuardrailId(gi as u32))),
                        );
                    }
                }
            }
        }

        let mut pairs = IntMap::default();
        let mut entries = Vec::new();
        for (key, frags) in fragments {
            let everything = segments[(key >> 32) as usize].everything;
            let start = entries.len();
            resolve_pair(&frags, everything, &mut entries);
            if entries.len() > start {
                pairs.insert(key, (start as u32, (entries.len() - start) as u32));
            }
        }
        Classifier {
            src,
            dst,
            segments,
            pairs,
            entries,
        }
    }

    /// The decision for one packet. No allocation; a handful of hash probes.
    #[inline]
    pub fn classify(&self, origin: Origin, packet: &PacketMeta) -> Decision {
        let Some(proto) = Proto::from_ip_number(packet.ip_proto) else {
            return Decision::deny(Decider::UnknownProtocol);
        };
        let port = if proto == Proto::Icmp {
            0
        } else {
            packet.dport
        };
        let (seg, class) = match (packet.src, packet.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (self.src.lookup_v4(s), self.dst.lookup_v4(d)),
            (IpAddr::V6(s), IpAddr::V6(d)) => (self.src.lookup_v6(s), self.dst.lookup_v6(d)),
            // A packet has one family; mixed input cannot come from a real header.
            _ => (None, None),
        };
        let Some(seg) = seg else {
            return Decision::deny(Decider::NoSegment);
        };
        let info = &self.segments[seg as usize];
        if let Origin::Peer(id) = origin {
            let ok = id.tenant.0 == info.tenant
                && match id.role {
                    Role::HomeOffice => info.homeoffice,
                    Role::Spoke => !info.homeoffice && info.site == id.site.map(|s| s.0),
                    Role::Hub => !info.homeoffice,
                };
            if !ok {
                return Decision::deny(Decider::ForeignSource);
            }
        }
        let fallback = match info.everything {
            Some(g) => Decision::deny(Decider::Guardrail(g)),
            None => Decision::deny(Decider::DefaultDeny),
        };
        let Some(class) = class else {
            return fallback;
        };
        let Some(&(start, len)) = self.pairs.get(&pair_key(seg, class)) else {
            return fallback;
        };
        let entries = &self.entries[start as usize..(start + len) as usize];
        entries
            .iter()
            .find(|e| e.range.contains(proto, port))
            .map_or(fallback, |e| e.decision)
    }

    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }
}

fn pair_key(seg: u32, class: u32) -> u64 {
    (u64::from(seg) << 32) | u64::from(class)
}

/// Cuts the port axis of each protocol at every fragment boundary and decides each piece:
/// a guardrail (the first one, as the oracle reads them) beats a rule, the first rule wins.
fn resolve_pair(frags: &[Fragment], everything: Option<GuardrailId>, out: &mut Vec<Entry>) {
    for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
        let mut cuts: Vec<u32> = Vec::new();
        for f in frags {
            let (Fragment::Allow(r, _) | Fragment::Guard(r, _)) = f;
            if r.proto == proto {
                cuts.push(u32::from(r.lo));
                cuts.push(u32::from(r.hi) + 1);
            }
        }
        if cuts.is_empty() {
            continue;
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut last: Option<Entry> = None;
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
            let mut guard = everything;
            let mut rule: Option<RuleId> = None;
            for f in frags {
                match *f {
                    Fragment::Guard(r, g) if r.proto == proto && r.lo <= lo && hi <= r.hi => {
                        guard = Some(guard.map_or(g, |x| x.min(g)));
                    }
                    Fragment::Allow(r, id) if r.proto == proto && r.lo <= lo && hi <= r.hi => {
                        rule = Some(rule.map_or(id, |x| x.min(id)));
                    }
                    _ => {}
                }
            }
            let decision = match (guard, rule) {
                (Some(g), _) => Decision::deny(Decider::Guardrail(g)),
                (None, Some(r)) => Decision {
                    allow: true,
                    by: Decider::Rule(r),
                },
                // Not covered by anything: the lookup falls back to the segment's default.
                (None, None) => {
                    if let Some(e) = last.take() {
                        out.push(e);
                    }
                    continue;
                }
            };
            match &mut last {
                Some(e) if e.decision == decision && u32::from(e.range.hi) + 1 == u32::from(lo) => {
                    e.range.hi = hi;
                }
                _ => {
                    if let Some(e) = last.take() {
                        out.push(e);
                    }
                    last = Some(Entry {
                        range: PortRange { proto, lo, hi },
                        decision,
                    });
                }
            }
        }
        if let Some(e) = last {
            out.push(e);
        }
    }
}
