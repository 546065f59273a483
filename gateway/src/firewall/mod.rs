//! The hub's stateful policy enforcement, sans-IO: every decrypted packet from a peer and every
//! packet the hub sends towards a peer passes here with the current compiled policy.
//!
//! As admins know it from firewalls: the first packet of a flow is decided by the policy (with
//! the sending peer's certificate identity when it comes from a peer); the flow is then
//! remembered, so its replies pass and later packets skip the policy. Each end of a flow is
//! bound to the side it was first seen on — one peer, or the data centre — and a packet from
//! any other side is refused.
//!
//! Under attack (issue 14):
//! - **The table is shared fairly.** Each flow is charged to the peer that started it (or to
//!   the data centre). When the table is full, a flow is evicted from the inserting owner if it
//!   holds its fair share (table size / owners with flows) or more, otherwise from the owner
//!   holding the most: a peer that opens thousands of flows loses its own oldest flows, never
//!   another peer's. "Oldest" is by age with a second chance for flows used since they were
//!   queued (the CLOCK approximation of least-recently-used, one flag write per packet).
//! - **ICMP errors** pass only about a remembered flow, from the side of the quoted packet's
//!   destination (the far end, or a router on the way to it) to the quoted packet's source
//!   (the near end), in the family of the flow and with a type that fits its protocol.
//! - **The data-centre side cannot use a tunnel peer's address**: a packet towards a peer whose
//!   source lies in any peer's allowed IPs is refused (peer-to-peer traffic never comes this
//!   way: the driver carries it from peer to peer itself).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use komnet_policy::{CompiledPolicy, Decider, Origin, PacketMeta, PeerIdentity};

use crate::core::PeerId;
use crate::packet::{proto, IpError, IpPacket};

mod parse;
mod table;

use parse::{error_fits, parse};

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

/// Which peer owns an address: the core's allowed-IPs table, where it would route a packet.
/// The firewall asks only on rare paths (a flow's start from the data centre, an end seen for
/// the first time, an ICMP error), never for a packet of an established flow.
pub trait PeerAddresses {
    fn peer_of(&self, addr: IpAddr) -> Option<PeerId>;
}

impl<F: Fn(IpAddr) -> Option<PeerId>> PeerAddresses for F {
    fn peer_of(&self, addr: IpAddr) -> Option<PeerId> {
        self(addr)
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
    /// An ICMP error about a remembered flow that does not fit it: from another side than the
    /// flow's far end, to another address than its near end, of another family, or of a type
    /// that does not belong to the flow's protocol (a covert channel or a forged error).
    ForgedIcmpError,
    /// A packet from the data-centre side with a source address that belongs to a tunnel peer.
    DataCentreSpoof,
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
            FirewallDrop::Policy(Decider::SegmentSpoof) => "segment_spoof",
            FirewallDrop::NoIdentity => "no_identity",
            FirewallDrop::Malformed => "malformed_inner_packet",
            FirewallDrop::Fragment => "fragment",
            FirewallDrop::UnrelatedIcmpError => "unrelated_icmp_error",
            FirewallDrop::ForgedIcmpError => "forged_icmp_error",
            FirewallDrop::DataCentreSpoof => "dc_spoofed_source",
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
    /// Flows of a peer that was removed, removed with it.
    pub cut_peer_removed: u64,
    /// Drops by [`FirewallDrop::as_str`].
    pub drops: HashMap<&'static str, u64>,
}

/// Who a flow is charged to: the side that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowOwner {
    DataCentre,
    Peer(PeerId),
}

/// One owner's part of the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerStats {
    /// Flows it holds now.
    pub flows: u64,
    /// Flows of its own it lost because the table was full.
    pub evicted: u64,
    /// Its packets the firewall refused (policy, foreign source, malformed).
    pub denied: u64,
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
    /// An ICMP error; the offending packet's header starts at offset `inner`.
    IcmpError {
        inner: usize,
        ty: u8,
        code: u8,
        /// The header's second word (the MTU of "packet too big").
        rest: u32,
    },
    Other,
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

    /// Which end (0: `lo`, 1: `hi`) `(addr, port)` is.
    fn side(&self, addr: IpAddr, port: u16) -> usize {
        usize::from((addr, port) != self.lo)
    }
}

/// Where one end of a flow sends from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Not seen sending yet (the answering end of a new flow).
    Unseen,
    /// The hub's own side: the data centre.
    DataCentre,
    /// This peer, with the identity it had under the policy in force.
    Peer {
        peer: PeerId,
        identity: PeerIdentity,
    },
}

/// Where a packet comes from.
#[derive(Debug, Clone, Copy)]
enum Sender {
    DataCentre,
    Peer {
        peer: PeerId,
        identity: PeerIdentity,
    },
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    expires: Instant,
    ends: [End; 2],
    /// Which end sent the first packet; a policy change re-judges the flow in that direction.
    initiator: u8,
    /// Used since it was last queued for eviction (the second chance).
    used: bool,
    /// Index of its owner in `Firewall::owners`.
    owner: u32,
    /// Matches the flow to its entry in the owner's queue (a key may be reused by a later flow).
    seq: u32,
}

/// One owner's flows in the order they were queued.
#[derive(Debug, Default)]
struct Owner {
    /// The peer this slot holds flows for (the slot is the peer's slot number + 1; 0 is the
    /// data centre).
    peer: Option<PeerId>,
    flows: u32,
    evicted: u64,
    denied: u64,
    queue: VecDeque<(FlowKey, u32)>,
}

/// Entries an eviction may give a second chance before it takes the next one anyway.
const SECOND_CHANCES: usize = 8;

/// The flow table and its counters.
#[derive(Debug)]
pub struct Firewall {
    config: FirewallConfig,
    flows: HashMap<FlowKey, Flow>,
    owners: Vec<Owner>,
    /// Owners holding at least one flow.
    active_owners: usize,
    /// The owner that held the most flows when last looked for.
    largest: usize,
    /// Whether owners' queues are kept: only from half the bound on, where an eviction comes
    /// near; below a quarter they are dropped again. A hub far from its bound pays no
    /// bookkeeping per new flow but two counters.
    queued: bool,
    next_seq: u32,
    counters: FirewallCounters,
}

impl Firewall {
    pub fn new(config: FirewallConfig) -> Self {
        Firewall {
            flows: HashMap::with_capacity(config.max_flows.min(4096)),
            owners: vec![Owner::default()],
            active_owners: 0,
            largest: 0,
            queued: false,
            next_seq: 0,
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

    /// The flows `owner` holds and the ones it lost to a full table.
    pub fn owner_stats(&self, owner: FlowOwner) -> OwnerStats {
        let o = match owner {
            FlowOwner::DataCentre => self.owners.first(),
            FlowOwner::Peer(id) => self
                .owners
                .get(id.slot() + 1)
                .filter(|o| o.peer == Some(id)),
        };
        o.map_or(OwnerStats::default(), |o| OwnerStats {
            flows: u64::from(o.flows),
            evicted: o.evicted,
            denied: o.denied,
        })
    }

    /// A decrypted packet from `peer` (whose allowed IPs the core has already checked its
    /// source against), on its way to the TUN device or to another peer.
    pub fn from_peer(
        &mut self,
        now: Instant,
        policy: &CompiledPolicy,
        peer: PeerId,
        identity: Option<PeerIdentity>,
        peers: &impl PeerAddresses,
        packet: &[u8],
    ) -> Result<(), FirewallDrop> {
        let result = match identity {
            Some(identity) => {
                self.check(now, policy, Sender::Peer { peer, identity }, peers, packet)
            }
            None => Err(self.count(FirewallDrop::NoIdentity)),
        };
        if result.is_err() {
            // Refusals per sender (the fleet shows them per site): an index and an add; the
            // slot exists already for any peer that ever opened a flow.
            let slot = self.owner_slot(FlowOwner::Peer(peer));
            self.owners[slot].denied += 1;
        }
        result
    }

    /// A packet from the hub's side (the data centre) on its way to a peer.
    pub fn to_peer(
        &mut self,
        now: Instant,
        policy: &CompiledPolicy,
        peers: &impl PeerAddresses,
        packet: &[u8],
    ) -> Result<(), FirewallDrop> {
        self.check(now, policy, Sender::DataCentre, peers, packet)
    }

    fn check(
        &mut self,
        now: Instant,
        policy: &CompiledPolicy,
        from: Sender,
        peers: &impl PeerAddresses,
        packet: &[u8],
    ) -> Result<(), FirewallDrop> {
        let t = parse(packet, false).map_err(|d| self.count(d))?;
        if let Kind::IcmpError {
            inner,
            ty,
            code,
            rest,
        } = t.kind
        {
            return self.icmp_error(now, from, peers, packet, &t, inner, (ty, code, rest));
        }
        let key = FlowKey::of(&t);
        let side = key.side(t.src, t.sport);
        let idle = self.idle(&t.kind);
        if let Some(flow) = self.flows.get_mut(&key) {
            if flow.expires > now {
                // The established path: one table probe, a comparison, two stores.
                let fits = match (flow.ends[side], from) {
                    (End::Peer { peer: bound, .. }, Sender::Peer { peer, .. }) => bound == peer,
                    (End::DataCentre, Sender::DataCentre) => true,
                    (End::Unseen, _) => {
                        // The answering end's first packet: bind it to the side it came from.
                        let owner = peers.peer_of(t.src);
                        let end = match from {
                            Sender::Peer { peer, identity } if owner == Some(peer) => {
                                End::Peer { peer, identity }
                            }
                            Sender::DataCentre if owner.is_none() => End::DataCentre,
                            _ => End::Unseen,
                        };
                        flow.ends[side] = end;
                        end != End::Unseen
                    }
                    _ => false,
                };
                if !fits {
                    let drop = match from {
                        Sender::DataCentre => FirewallDrop::DataCentreSpoof,
                        Sender::Peer { .. } => FirewallDrop::Policy(Decider::ForeignSource),
                    };
                    return Err(self.count(drop));
                }
                flow.expires = now + idle;
                flow.used = true;
                self.counters.established_packets += 1;
                return Ok(());
            }
            // Idle past its timeout: this packet is judged as a new flow.
            self.remove(&key);
            self.counters.expired += 1;
        }
        let origin = match from {
            Sender::Peer { identity, .. } => Origin::Peer(identity),
            Sender::DataCentre => {
                if peers.peer_of(t.src).is_some() {
                    return Err(self.count(FirewallDrop::DataCentreSpoof));
                }
                Origin::Address
            }
        };
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
        let (owner, end) = match from {
            Sender::Peer { peer, identity } => {
                (FlowOwner::Peer(peer), End::Peer { peer, identity })
            }
            Sender::DataCentre => (FlowOwner::DataCentre, End::DataCentre),
        };
        let mut ends = [End::Unseen; 2];
        ends[side] = end;
        self.insert(now, key, owner, ends, side as u8, now + idle);
        self.counters.new_flows += 1;
        Ok(())
    }

    /// An ICMP error: it must quote a packet of a remembered flow, in the same family, with a
    /// type that fits the flow's protocol; it must go to the quoted packet's source (the near
    /// end) and come from the side of the quoted packet's destination (the far end, or a
    /// router on the way there).
    #[allow(clippy::too_many_arguments)]
    fn icmp_error(
        &mut self,
        now: Instant,
        from: Sender,
        peers: &impl PeerAddresses,
        packet: &[u8],
        outer: &Transport,
        inner: usize,
        (ty, code, rest): (u8, u8, u32),
    ) -> Result<(), FirewallDrop> {
        let Some(q) = packet.get(inner..).and_then(|q| parse(q, true).ok()) else {
            return Err(self.count(FirewallDrop::UnrelatedIcmpError));
        };
        let key = FlowKey::of(&q);
        let Some(flow) = self.flows.get(&key).filter(|f| f.expires > now) else {
            return Err(self.count(FirewallDrop::UnrelatedIcmpError));
        };
        let v6 = outer.proto == proto::ICMPV6;
        let far = key.side(q.dst, q.dport);
        let fits = q.src.is_ipv6() == v6
            // No error about an error (RFC 1122, 3.2.2).
            && !matches!(q.kind, Kind::IcmpError { .. })
            && error_fits(v6, ty, code, rest, q.proto)
            && outer.dst == q.src
            && match (from, flow.ends[far]) {
                (Sender::Peer { peer, .. }, End::Peer { peer: bound, .. }) => peer == bound,
                (Sender::Peer { peer, .. }, End::Unseen) => peers.peer_of(q.dst) == Some(peer),
                (Sender::DataCentre, End::DataCentre) => peers.peer_of(outer.src).is_none(),
                (Sender::DataCentre, End::Unseen) => {
                    peers.peer_of(outer.src).is_none() && peers.peer_of(q.dst).is_none()
                }
                _ => false,
            };
        if !fits {
            return Err(self.count(FirewallDrop::ForgedIcmpError));
        }
        self.counters.related_icmp += 1;
        Ok(())
    }

    /// `peer` was removed from the hub: its flows go with it (those it started and those it
    /// answered), and its slot is free for the next peer.
    pub fn forget_peer(&mut self, peer: PeerId) {
        let before = self.flows.len();
        let (owners, active) = (&mut self.owners, &mut self.active_owners);
        self.flows.retain(|_, f| {
            let gone = f
                .ends
                .iter()
                .any(|e| matches!(e, End::Peer { peer: p, .. } if *p == peer));
            if gone {
                Self::book_off(owners, active, f.owner);
            }
            !gone
        });
        self.counters.cut_peer_removed += (before - self.flows.len()) as u64;
        if let Some(o) = self.owners.get_mut(peer.slot() + 1) {
            if o.peer == Some(peer) {
                *o = Owner::default();
            }
        }
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
        let (owners, active) = (&mut self.owners, &mut self.active_owners);
        self.flows.retain(|key, flow| {
            let keep = 'judge: {
                for end in flow.ends.iter_mut() {
                    if let End::Peer { identity, .. } = end {
                        match remap(*identity) {
                            Some(mapped) => *identity = mapped,
                            None => break 'judge false,
                        }
                    }
                }
                let (from, to) = if flow.initiator == 0 {
                    (key.lo, key.hi)
                } else {
                    (key.hi, key.lo)
                };
                let origin = match flow.ends[usize::from(flow.initiator)] {
                    End::Peer { identity, .. } => Origin::Peer(identity),
                    End::DataCentre | End::Unseen => Origin::Address,
                };
                let echo = matches!(key.proto, proto::ICMP | proto::ICMPV6);
                let meta = PacketMeta {
                    src: from.0,
                    dst: to.0,
                    ip_proto: key.proto,
                    dport: if echo { 0 } else { to.1 },
                };
                new.classify(origin, &meta).allow
            };
            if !keep {
                Self::book_off(owners, active, flow.owner);
            }
            keep
        });
        self.counters.cut_by_policy += (before - self.flows.len()) as u64;
    }

    /// Removes flows idle past their timeout; call from the timer tick.
    pub fn expire(&mut self, now: Instant) {
        let before = self.flows.len();
        let (owners, active) = (&mut self.owners, &mut self.active_owners);
        self.flows.retain(|_, f| {
            let live = f.expires > now;
            if !live {
                Self::book_off(owners, active, f.owner);
            }
            live
        });
        self.counters.expired += (before - self.flows.len()) as u64;
        if self.queued && self.flows.len() < self.config.max_flows / 4 {
            self.stop_queues();
        }
    }

    fn count(&mut self, drop: FirewallDrop) -> FirewallDrop {
        *self.counters.drops.entry(drop.as_str()).or_default() += 1;
        drop
    }
}
