//! The hub's stateful policy enforcement, sans-IO: every decrypted packet from a peer and every
//! packet the hub sends towards a peer passes here with the current compiled policy.
//!
//! As admins know it from firewalls: the first packet of a flow is decided by the policy (with
//! the sending peer's certificate identity when it comes from a peer); the flow is then
//! remembered, so its replies pass and later packets skip the policy. ICMP errors (destination
//! unreachable, packet too big, time exceeded) pass when they belong to a remembered flow, so
//! path-MTU discovery keeps working. The table is bounded: expired flows are swept, and when it
//! is full the flow that would expire first among a small sample is evicted and counted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use komnet_policy::{CompiledPolicy, Decider, Origin, PacketMeta, PeerIdentity};

/// Limits and idle timeouts of the flow table.
#[derive(Debug, Clone)]
pub struct FirewallConfig {
    pub max_flows: usize,
    pub tcp_idle: Duration,
    /// After a FIN or RST was seen.
    pub tcp_closing: Duration,
    pub udp_idle: Duration,
    pub icmp_idle: Duration,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        // nf_conntrack's defaults, shortened where a municipal WAN does not need days.
        FirewallConfig {
            max_flows: 262_144,
            tcp_idle: Duration::from_secs(3600),
            tcp_closing: Duration::from_secs(10),
            udp_idle: Duration::from_secs(120),
            icmp_idle: Duration::from_secs(30),
        }
    }
}

/// Why the firewall refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirewallDrop {
    /// The policy denies a new flow; the decider says which rule, guardrail or default.
    Policy(Decider),
    /// The peer has no certificate identity: a hub forwards nothing for it.
    NoIdentity,
    /// Not a well-formed IPv4/IPv6 packet with a readable transport header.
    Malformed,
    /// A non-first IP fragment: without reassembly its flow cannot be known.
    Fragment,
    /// An ICMP error that belongs to no remembered flow.
    UnrelatedIcmpError,
}

impl FirewallDrop {
    pub fn as_str(self) -> &'static str {
        match self {
            FirewallDrop::Policy(Decider::Rule(_)) => "policy_rule",
            FirewallDrop::Policy(Decider::Guardrail(_)) => "policy_guardrail",
            FirewallDrop::Policy(Decider::DefaultDeny) => "policy_default_deny",
            FirewallDrop::Policy(Decider::NoSegment) => "policy_no_segment",
            FirewallDrop::Policy(Decider::ForeignSource) => "policy_foreign_source",
            FirewallDrop::Policy(Decider::UnknownProtocol) => "policy_unknown_protocol",
            FirewallDrop::NoIdentity => "no_identity",
            FirewallDrop::Malformed => "malformed_inner_packet",
            FirewallDrop::Fragment => "fragment",
            FirewallDrop::UnrelatedIcmpError => "unrelated_icmp_error",
        }
    }
}

/// What the firewall counted since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallCounters {
    pub new_flows: u64,
    pub established_packets: u64,
    pub related_icmp: u64,
    pub expired: u64,
    pub evicted: u64,
    /// Flows a policy change no longer allows, removed at once.
    pub cut_by_policy: u64,
    /// Drops by [`FirewallDrop::as_str`].
    pub drops: HashMap<&'static str, u64>,
}

/// The transport fields of a packet, as far as flows are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Transport {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp {
        closing: bool,
    },
    Udp,
    /// Echo request or reply: the identifier stands in for the ports.
    IcmpEcho {
        request: bool,
    },
    /// An ICMP error; the offending packet's header starts at this offset.
    IcmpError {
        inner: usize,
    },
    Other,
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses IP and transport headers. `truncated_ok`: the packet quoted in an ICMP error may be
/// cut after the transport ports, and its length fields then describe the original.
fn parse(packet: &[u8], truncated_ok: bool) -> Result<Transport, FirewallDrop> {
    let version = packet.first().ok_or(FirewallDrop::Malformed)? >> 4;
    let (src, dst, mut proto, mut off) = match version {
        4 => {
            let h = packet.get(..20).ok_or(FirewallDrop::Malformed)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            if ihl < 20 || (!truncated_ok && (total < ihl || total > packet.len())) {
                return Err(FirewallDrop::Malformed);
            }
            let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            if frag_offset != 0 {
                return Err(FirewallDrop::Fragment);
            }
            (
                IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
                IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
                h[9],
                ihl,
            )
        }
        6 => {
            let h = packet.get(..40).ok_or(FirewallDrop::Malformed)?;
            let total = 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
            if !truncated_ok && total > packet.len() {
                return Err(FirewallDrop::Malformed);
            }
            let s: [u8; 16] = h[8..24].try_into().map_err(|_| FirewallDrop::Malformed)?;
            let d: [u8; 16] = h[24..40].try_into().map_err(|_| FirewallDrop::Malformed)?;
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                h[6],
                40,
            )
        }
        _ => return Err(FirewallDrop::Malformed),
    };
    // IPv6 extension headers before the transport header (a few, never a loop).
    if version == 6 {
        for _ in 0..8 {
            match proto {
                0 | 43 | 60 => {
                    let next = *packet.get(off).ok_or(FirewallDrop::Malformed)?;
                    let len =
                        (usize::from(*packet.get(off + 1).ok_or(FirewallDrop::Malformed)?) + 1) * 8;
                    proto = next;
                    off += len;
                }
                44 => {
                    let next = *packet.get(off).ok_or(FirewallDrop::Malformed)?;
                    let frag = be16(packet, off + 2).ok_or(FirewallDrop::Malformed)? >> 3;
                    if frag != 0 {
                        return Err(FirewallDrop::Fragment);
                    }
                    proto = next;
                    off += 8;
                }
                _ => break,
            }
        }
    }
    let l4 = packet.get(off..).ok_or(FirewallDrop::Malformed)?;
    let t = |sport, dport, kind| Transport {
        src,
        dst,
        proto,
        sport,
        dport,
        kind,
    };
    match proto {
        IPPROTO_TCP => {
            let sport = be16(l4, 0).ok_or(FirewallDrop::Malformed)?;
            let dport = be16(l4, 2).ok_or(FirewallDrop::Malformed)?;
            // Flags are beyond the 8 bytes an ICMP error must quote; treat them as unknown there.
            let flags = l4.get(13).copied().unwrap_or(0);
            Ok(t(
                sport,
                dport,
                Kind::Tcp {
                    closing: flags & 0x05 != 0,
                },
            ))
        }
        IPPROTO_UDP => Ok(t(
            be16(l4, 0).ok_or(FirewallDrop::Malformed)?,
            be16(l4, 2).ok_or(FirewallDrop::Malformed)?,
            Kind::Udp,
        )),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let ty = *l4.first().ok_or(FirewallDrop::Malformed)?;
            let v6 = proto == IPPROTO_ICMPV6;
            let echo = if v6 {
                matches!(ty, 128 | 129)
            } else {
                matches!(ty, 0 | 8)
            };
            let error = if v6 {
                matches!(ty, 1..=4)
            } else {
                matches!(ty, 3 | 11 | 12)
            };
            if echo {
                let id = be16(l4, 4).ok_or(FirewallDrop::Malformed)?;
                let request = if v6 { ty == 128 } else { ty == 8 };
                Ok(t(id, id, Kind::IcmpEcho { request }))
            } else if error && !truncated_ok {
                Ok(t(0, 0, Kind::IcmpError { inner: off + 8 }))
            } else {
                Ok(t(0, 0, Kind::Other))
            }
        }
        _ => Ok(t(0, 0, Kind::Other)),
    }
}

/// A flow, endpoints ordered so both directions find the same entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    lo: (IpAddr, u16),
    hi: (IpAddr, u16),
}

impl FlowKey {
    fn of(t: &Transport) -> FlowKey {
        let a = (t.src, t.sport);
        let b = (t.dst, t.dport);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        FlowKey {
            proto: t.proto,
            lo,
            hi,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    expires: Instant,
    /// Which endpoint (0: `lo`, 1: `hi`) sent the first packet; a policy change re-judges the
    /// flow in that direction.
    initiator: u8,
    /// Which peer sends from each endpoint (`lo`, `hi` of the key), bound on its first packet:
    /// another peer cannot ride on a flow by copying its addresses and ports.
    senders: [Option<PeerIdentity>; 2],
}

/// The flow table and its counters.
#[derive(Debug)]
pub struct Firewall {
    config: FirewallConfig,
    flows: HashMap<FlowKey, Flow>,
    counters: FirewallCounters,
}

impl Firewall {
    pub fn new(config: FirewallConfig) -> Self {
        Firewall {
            flows: HashMap::with_capacity(config.max_flows.min(4096)),
            config,
            counters: FirewallCounters::default(),
        }
    }

    pub fn counters(&self) -> &FirewallCounters {
        &self.counters
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// A decrypted packet from a peer, on its way to the TUN device.
    pub fn from_peer(
        &mut self,
        now: Instant,
        policy: &CompiledPolicy,
        identity: Option<PeerIdentity>,
        packet: &[u8],
    ) -> Result<(), FirewallDrop> {
        let Some(identity) = identity else {
            return Err(self.count(FirewallDrop::NoIdentity));
        };
        self.check(now, policy, Origin::Peer(identity), packet)
    }

    /// A packet from the hub's side (the data centre) on its way to a peer.
    pub fn to_peer(
        &mut self,
        now: Instant,
        policy: &CompiledPolicy,
        packet: &[u8],
    ) -> Result<(), FirewallDrop> {
        self.check(now, policy, Origin::Address, packet)
    }

    fn check(
        &mut self,
        now: Instant,
        policy: &CompiledPolicy,
        origin: Origin,
        packet: &[u8],
    ) -> Result<(), FirewallDrop> {
        let t = parse(packet, false).map_err(|d| self.count(d))?;
        if let Kind::IcmpError { inner } = t.kind {
            // The quoted packet went the other way: its flow, if remembered, makes this related.
            let quoted = packet
                .get(inner..)
                .and_then(|q| parse(q, true).ok())
                .map(|q| FlowKey::of(&q));
            return match quoted.and_then(|k| self.flows.get(&k)) {
                Some(f) if f.expires > now => {
                    self.counters.related_icmp += 1;
                    Ok(())
                }
                _ => Err(self.count(FirewallDrop::UnrelatedIcmpError)),
            };
        }
        let key = FlowKey::of(&t);
        let idle = self.idle(&t.kind);
        let side = usize::from((t.src, t.sport) != key.lo);
        let sender = match origin {
            Origin::Peer(id) => Some(id),
            Origin::Address => None,
        };
        if let Some(flow) = self.flows.get_mut(&key) {
            if flow.expires > now {
                if let Some(id) = sender {
                    match flow.senders[side] {
                        None => flow.senders[side] = Some(id),
                        Some(bound) if bound != id => {
                            return Err(self.count(FirewallDrop::Policy(Decider::ForeignSource)))
                        }
                        Some(_) => {}
                    }
                }
                flow.expires = now + idle;
                self.counters.established_packets += 1;
                return Ok(());
            }
            // Idle past its timeout: this packet is judged as a new flow.
            self.flows.remove(&key);
            self.counters.expired += 1;
        }
        let meta = PacketMeta {
            src: t.src,
            dst: t.dst,
            ip_proto: t.proto,
            dport: if matches!(t.kind, Kind::IcmpEcho { .. }) {
                0
            } else {
                t.dport
            },
        };
        let decision = policy.classify(origin, &meta);
        if !decision.allow {
            return Err(self.count(FirewallDrop::Policy(decision.by)));
        }
        // Only a request starts an echo flow; an unsolicited reply is not a flow start.
        if t.kind == (Kind::IcmpEcho { request: false }) {
            return Err(self.count(FirewallDrop::Policy(Decider::DefaultDeny)));
        }
        let mut senders = [None; 2];
        senders[side] = sender;
        self.insert(
            now,
            key,
            Flow {
                expires: now + idle,
                initiator: side as u8,
                senders,
            },
        );
        self.counters.new_flows += 1;
        Ok(())
    }

    fn idle(&self, kind: &Kind) -> Duration {
        match kind {
            Kind::Tcp { closing: true } => self.config.tcp_closing,
            Kind::Tcp { closing: false } => self.config.tcp_idle,
            Kind::Udp | Kind::Other => self.config.udp_idle,
            Kind::IcmpEcho { .. } | Kind::IcmpError { .. } => self.config.icmp_idle,
        }
    }

    fn insert(&mut self, now: Instant, key: FlowKey, flow: Flow) {
        if self.flows.len() >= self.config.max_flows && !self.flows.contains_key(&key) {
            // Among a small sample, drop the flow that would expire first (an expired one if
            // there is one): bounded work per insert, close to least-recently-used.
            let victim = self
                .flows
                .iter()
                .take(16)
                .min_by_key(|(_, f)| f.expires)
                .map(|(k, f)| (*k, f.expires <= now));
            if let Some((k, expired)) = victim {
                self.flows.remove(&k);
                if expired {
                    self.counters.expired += 1;
                } else {
                    self.counters.evicted += 1;
                }
            }
        }
        self.flows.insert(key, flow);
    }

    /// A new policy is in force: sender identities are carried over by name (the new policy's
    /// indices may differ), and each remembered flow is judged again in the direction it was
    /// started. Flows the new policy still allows keep going; the others are removed, so a
    /// tightened policy cuts existing connections as well as new ones.
    pub fn on_policy_change(&mut self, old: &CompiledPolicy, new: &CompiledPolicy) {
        let remap = |id: PeerIdentity| -> Option<PeerIdentity> {
            let tenant = &old.policy.tenants.get(id.tenant.index())?.name;
            let site = match id.site {
                Some(s) => Some(old.policy.sites.get(s.index())?.name.as_str()),
                None => None,
            };
            new.policy.peer_identity(tenant, site, id.role)
        };
        let before = self.flows.len();
        self.flows.retain(|key, flow| {
            for sender in flow.senders.iter_mut() {
                if let Some(id) = *sender {
                    match remap(id) {
                        Some(mapped) => *sender = Some(mapped),
                        None => return false,
                    }
                }
            }
            let (from, to) = if flow.initiator == 0 {
                (key.lo, key.hi)
            } else {
                (key.hi, key.lo)
            };
            let origin = match flow.senders[usize::from(flow.initiator)] {
                Some(id) => Origin::Peer(id),
                None => Origin::Address,
            };
            let echo = matches!(key.proto, IPPROTO_ICMP | IPPROTO_ICMPV6);
            let meta = PacketMeta {
                src: from.0,
                dst: to.0,
                ip_proto: key.proto,
                dport: if echo { 0 } else { to.1 },
            };
            new.classify(origin, &meta).allow
        });
        self.counters.cut_by_policy += (before - self.flows.len()) as u64;
    }

    /// Removes flows idle past their timeout; call from the timer tick.
    pub fn expire(&mut self, now: Instant) {
        let before = self.flows.len();
        self.flows.retain(|_, f| f.expires > now);
        self.counters.expired += (before - self.flows.len()) as u64;
    }

    fn count(&mut self, drop: FirewallDrop) -> FirewallDrop {
        *self.counters.drops.entry(drop.as_str()).or_default() += 1;
        drop
    }
}
