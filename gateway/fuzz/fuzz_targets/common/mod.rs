//! What the `firewall` and `gate` targets share: the worked example policy (and a tightened
//! version of it), a district of peers with their allowed IPs, a decoder that turns fuzz bytes
//! into a sequence of packets from peers and from the data-centre side, and a reference model
//! that checks the invariant **nothing a policy denies ever passes**:
//!
//! 1. a packet from the data-centre side with a tunnel peer's source never passes;
//! 2. any other packet that passes either starts a flow the policy in force allows for its
//!    sender (an echo reply starts none), or belongs to a flow that started so earlier and that
//!    no later policy cut, and never comes from another side than its end's owner;
//! 3. an ICMP error that passes quotes a packet of such a flow, in its own family, goes to the
//!    quoted source and comes from the side that owns the quoted destination.
//!
//! The model remembers flows without timeouts or a bound: the firewall may forget more (and
//! then judge a packet as a new flow), never remember what the model does not.

#![allow(dead_code)] // each target uses its part

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

use ipnet::IpNet;
use komnet_gateway::core::PeerId;
use komnet_gateway::firewall::PeerAddresses;
use komnet_gateway::packet::{proto, IpPacket};
use komnet_policy::{CompiledPolicy, Origin, PacketMeta, PeerIdentity, Policy, Role};

fn example(tightened: bool) -> CompiledPolicy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policy/landkreis");
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).expect("example policy file");
    let mut operator = read("operator.toml");
    let mut musterstadt = read("tenants/musterstadt.toml");
    if tightened {
        // Version 8 takes the file server away from the town hall's staff.
        operator = operator.replacen("version = 7", "version = 8", 1);
        musterstadt = musterstadt.replace(
            "name = \"staff-files\"\nfrom = [\"mitarbeiter\"]",
            "name = \"staff-files\"\nfrom = [\"bauhof-buero\", \"homeoffice\"]",
        );
    }
    let others: Vec<(String, String)> = ["beispieldorf", "kreis", "rz"]
        .iter()
        .map(|t| (format!("{t}.toml"), read(&format!("tenants/{t}.toml"))))
        .collect();
    let mut tenants: Vec<(&str, &str)> = vec![("musterstadt.toml", musterstadt.as_str())];
    tenants.extend(others.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    let policy = Policy::from_texts(&operator, &tenants).expect("example policy parses");
    CompiledPolicy::from_policy(policy).expect("example policy compiles")
}

/// The example policy (`false`) and its tightened version 8 (`true`).
pub fn policies() -> &'static [std::sync::Arc<CompiledPolicy>; 2] {
    static P: OnceLock<[std::sync::Arc<CompiledPolicy>; 2]> = OnceLock::new();
    P.get_or_init(|| {
        [
            std::sync::Arc::new(example(false)),
            std::sync::Arc::new(example(true)),
        ]
    })
}

/// A peer of the hub: its handle, certificate identity (by name) and allowed IPs.
pub struct DistrictPeer {
    pub id: PeerId,
    pub tenant: &'static str,
    pub site: Option<&'static str>,
    pub role: Role,
    pub nets: Vec<IpNet>,
}

impl DistrictPeer {
    pub fn identity(&self, policy: &CompiledPolicy) -> Option<PeerIdentity> {
        policy
            .policy
            .peer_identity(self.tenant, self.site, self.role)
    }
}

pub fn district() -> &'static [DistrictPeer] {
    static D: OnceLock<Vec<DistrictPeer>> = OnceLock::new();
    D.get_or_init(|| {
        let p = |id: u32, tenant, site, role, nets: &[&str]| DistrictPeer {
            id: PeerId(id),
            tenant,
            site,
            role,
            nets: nets.iter().map(|n| n.parse().expect("net")).collect(),
        };
        vec![
            p(
                1,
                "musterstadt",
                Some("rathaus"),
                Role::Spoke,
                &["10.20.0.0/16", "fd00:20::/48"],
            ),
            p(
                2,
                "musterstadt",
                Some("bauhof"),
                Role::Spoke,
                &["10.21.0.0/16", "fd00:21::/48"],
            ),
            p(
                3,
                "beispieldorf",
                Some("rathaus"),
                Role::Spoke,
                &["10.30.0.0/16", "fd00:30::/48"],
            ),
            p(
                4,
                "kreis",
                Some("kreishaus"),
                Role::Spoke,
                &["10.10.0.0/16", "fd00:10::/48"],
            ),
            p(
                5,
                "musterstadt",
                None,
                Role::HomeOffice,
                &["10.250.20.9/32", "fd00:250:20::9/128"],
            ),
            // A second home office of the same tenant: same identity, other addresses.
            p(
                6,
                "musterstadt",
                None,
                Role::HomeOffice,
                &["10.250.20.10/32", "fd00:250:20::a/128"],
            ),
            p(
                7,
                "kreis",
                None,
                Role::HomeOffice,
                &["10.250.1.9/32", "fd00:250:1::9/128"],
            ),
        ]
    })
}

/// The allowed-IPs view the firewall gets (the core's, on a hub).
pub struct Owners;

impl PeerAddresses for Owners {
    fn peer_of(&self, addr: IpAddr) -> Option<PeerId> {
        owner(addr)
    }
}

pub fn owner(addr: IpAddr) -> Option<PeerId> {
    district()
        .iter()
        .flat_map(|p| p.nets.iter().map(move |n| (n, p.id)))
        .filter(|(n, _)| n.contains(&addr))
        .max_by_key(|(n, _)| n.prefix_len())
        .map(|(_, id)| id)
}

pub fn peer(id: PeerId) -> Option<&'static DistrictPeer> {
    district().iter().find(|p| p.id == id)
}

/// Addresses the decoder picks from: hosts behind each peer, data-centre hosts and services,
/// routers, and a few that nothing owns.
const ADDRS: &[&str] = &[
    "10.20.1.7",
    "10.20.1.50",
    "10.20.100.5",
    "10.20.3.7",
    "10.20.1.1",
    "10.21.1.9",
    "10.30.1.9",
    "10.10.1.5",
    "10.250.20.9",
    "10.250.20.10",
    "10.250.1.9",
    "10.1.0.10",
    "10.1.20.5",
    "10.0.1.53",
    "10.0.1.20",
    "10.0.2.10",
    "10.0.16.10",
    "10.0.0.1",
    "10.1.0.40",
    "192.0.2.1",
    "fd00:20:0:1::7",
    "fd00:20:0:1::50",
    "fd00:20:0:1::1",
    "fd00:30:0:1::9",
    "fd00:250:20::9",
    "fd00:1::10",
    "fd00:1:20::5",
    "fd00:0:0:1::53",
    "fd00:0:1:16::10",
    "fd99::1",
];
const PORTS: &[u16] = &[
    443, 445, 53, 9100, 993, 5060, 40000, 40001, 50000, 33000, 8443, 22,
];

/// Where a packet comes from, as the harness feeds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    DataCentre,
    Peer(PeerId),
}

/// One step of a fuzzed sequence.
#[derive(Debug)]
pub enum Step {
    /// A packet; from a peer only when its source is that peer's (the core drops the rest).
    Packet(Side, Vec<u8>),
    /// Time moves on this many seconds.
    Wait(u64),
    /// The timer tick's sweep.
    Expire,
    /// Gate only: the other policy version is put in force.
    SwitchPolicy,
    /// Gate only: this peer is removed (and comes back with its identity on the next switch).
    Forget(PeerId),
}

/// Reads fuzz bytes as steps.
pub struct Decoder<'a> {
    data: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*b)
    }

    fn addr(&mut self) -> Option<IpAddr> {
        ADDRS[usize::from(self.byte()?) % ADDRS.len()].parse().ok()
    }

    fn port(&mut self) -> Option<u16> {
        let b = self.byte()?;
        Some(if b >= 0xf0 {
            u16::from(b) * 77
        } else {
            PORTS[usize::from(b) % PORTS.len()]
        })
    }

    /// A transport packet between two addresses of one family.
    fn transport(&mut self) -> Option<Vec<u8>> {
        let src = self.addr()?;
        let mut dst = self.addr()?;
        if src.is_ipv4() != dst.is_ipv4() {
            dst = if src.is_ipv4() {
                "10.1.0.10".parse().ok()?
            } else {
                "fd00:1::10".parse().ok()?
            };
        }
        let sel = self.byte()?;
        let v6 = src.is_ipv6();
        let (p, l4) = match sel % 4 {
            0 => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&self.port()?.to_be_bytes());
                t[2..4].copy_from_slice(&self.port()?.to_be_bytes());
                t[12] = 0x50;
                t[13] = self.byte()?;
                (proto::TCP, t)
            }
            1 => {
                let mut t = vec![0u8; 8];
                t[0..2].copy_from_slice(&self.port()?.to_be_bytes());
                t[2..4].copy_from_slice(&self.port()?.to_be_bytes());
                (proto::UDP, t)
            }
            2 => {
                // Echo request or reply.
                let request = sel & 0x10 == 0;
                let ty = match (v6, request) {
                    (false, true) => 8,
                    (false, false) => 0,
                    (true, true) => 128,
                    (true, false) => 129,
                };
                let id = self.port()?;
                let mut t = vec![ty, 0, 0, 0, 0, 0, 0, 1];
                t[4..6].copy_from_slice(&id.to_be_bytes());
                (if v6 { proto::ICMPV6 } else { proto::ICMP }, t)
            }
            _ => {
                // An ICMP error quoting another packet (of either family: the firewall must
                // refuse a mismatch), with fuzzed type, code and MTU.
                let quoted = self.transport()?;
                let ty = self.byte()?;
                let code = self.byte()? % 16;
                let mtu = u32::from(self.byte()?) * 16;
                let ty = match (v6, ty % 4) {
                    (false, 0) => 3,
                    (false, 1) => 11,
                    (false, 2) => 12,
                    (true, n) => n + 1,
                    (false, _) => ty,
                };
                let mut t = vec![ty, code, 0, 0];
                t.extend(mtu.to_be_bytes());
                let cut = 28 + usize::from(sel >> 4);
                t.extend(&quoted[..quoted.len().min(cut.max(28))]);
                (if v6 { proto::ICMPV6 } else { proto::ICMP }, t)
            }
        };
        Some(ip(src, dst, p, &l4))
    }

    pub fn step(&mut self, gate: bool) -> Option<Step> {
        let op = self.byte()?;
        Some(match op % 16 {
            0..=8 => {
                let packet = self.transport()?;
                Step::Packet(sender_of(&packet, op & 0x80 != 0), packet)
            }
            9 => {
                // Raw bytes: a length, then that many bytes.
                let n = usize::from(self.byte()?) % 96;
                let raw = self.data.get(..n)?.to_vec();
                self.data = &self.data[n..];
                Step::Packet(sender_of(&raw, op & 0x80 != 0), raw)
            }
            10 | 11 => Step::Wait(u64::from(self.byte()?)),
            12 => Step::Expire,
            13 if gate => Step::SwitchPolicy,
            14 if gate => {
                let d = district();
                Step::Forget(d[usize::from(self.byte()?) % d.len()].id)
            }
            _ => Step::Wait(0),
        })
    }
}

/// The side a packet is fed from: the peer owning its source (as the core's source filter
/// would have it), or the data centre; `from_dc` sends it from the data centre regardless
/// (a spoofing data-centre host).
fn sender_of(packet: &[u8], from_dc: bool) -> Side {
    let src = komnet_gateway::packet::IpHeader::parse(packet).map(|h| h.src);
    match src.and_then(owner) {
        Some(id) if !from_dc => Side::Peer(id),
        _ => Side::DataCentre,
    }
}

pub fn ip(src: IpAddr, dst: IpAddr, p: u8, payload: &[u8]) -> Vec<u8> {
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
                p,
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
            let mut h = vec![0x60, 0, 0, 0, (len >> 8) as u8, len as u8, p, 64];
            h.extend(s.octets());
            h.extend(d.octets());
            h.extend(payload);
            h
        }
        _ => unreachable!("one family"),
    }
}

/// A packet's flow-relevant fields, read independently of the firewall's own parse (only the
/// IP layer is shared, which its own unit tests and the `datagram` target cover).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Fields {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    /// Echo: request or reply; ICMP error: the offset of the quoted packet.
    echo_request: Option<bool>,
    error_at: Option<usize>,
}

fn fields(packet: &[u8], quoted: bool) -> Option<Fields> {
    let ip = IpPacket::parse(packet, quoted).ok()?;
    let l4 = ip.transport(packet);
    let be = |at: usize| Some(u16::from_be_bytes([*l4.get(at)?, *l4.get(at + 1)?]));
    let mut f = Fields {
        src: ip.header.src,
        dst: ip.header.dst,
        proto: ip.proto,
        sport: 0,
        dport: 0,
        echo_request: None,
        error_at: None,
    };
    match ip.proto {
        proto::TCP | proto::UDP => {
            f.sport = be(0)?;
            f.dport = be(2)?;
        }
        proto::ICMP | proto::ICMPV6 => {
            let ty = *l4.first()?;
            let v6 = ip.proto == proto::ICMPV6;
            match (v6, ty) {
                (false, 8) | (true, 128) | (false, 0) | (true, 129) => {
                    f.sport = be(4)?;
                    f.dport = f.sport;
                    f.echo_request = Some(ty == 8 || ty == 128);
                }
                (false, 3 | 11 | 12) | (true, 1..=4) => f.error_at = Some(ip.l4 + 8),
                _ => {}
            }
        }
        _ => {}
    }
    Some(f)
}

type Key = (u8, (IpAddr, u16), (IpAddr, u16));

fn key(f: &Fields) -> Key {
    let a = (f.src, f.sport);
    let b = (f.dst, f.dport);
    if a <= b {
        (f.proto, a, b)
    } else {
        (f.proto, b, a)
    }
}

/// The side that owns an address: its peer, or the data centre.
fn side_of(addr: IpAddr) -> Side {
    owner(addr).map_or(Side::DataCentre, Side::Peer)
}

/// The reference model: for each flow key, the starts the policy allowed when they passed
/// (a key can be started again from the other end after the firewall forgot it).
#[derive(Default)]
pub struct Model {
    flows: HashMap<Key, Vec<(Side, Fields)>>,
    /// Peers that are removed (gate target): their packets pass nothing.
    removed: HashSet<PeerId>,
}

impl Model {
    fn origin(side: Side, policy: &CompiledPolicy) -> Option<Origin> {
        match side {
            Side::DataCentre => Some(Origin::Address),
            Side::Peer(id) => peer(id)?.identity(policy).map(Origin::Peer),
        }
    }

    fn allows(policy: &CompiledPolicy, side: Side, f: &Fields) -> bool {
        if f.echo_request == Some(false) {
            return false;
        }
        let Some(origin) = Self::origin(side, policy) else {
            return false;
        };
        let dport = if f.echo_request.is_some() { 0 } else { f.dport };
        let meta = PacketMeta {
            src: f.src,
            dst: f.dst,
            ip_proto: f.proto,
            dport,
        };
        policy.classify(origin, &meta).allow
    }

    /// Checks the invariant for a packet the firewall let through from `side`; panics with
    /// the reason when it does not hold, and learns the flow when it does.
    pub fn passed(&mut self, policy: &CompiledPolicy, side: Side, packet: &[u8]) {
        if let Side::Peer(id) = side {
            assert!(
                !self.removed.contains(&id),
                "a removed peer's packet passed"
            );
        }
        let f = fields(packet, false).expect("a packet that passed parses");
        if side == Side::DataCentre {
            assert!(
                owner(f.src).is_none(),
                "a data-centre packet with a tunnel peer's source {} passed",
                f.src
            );
        }
        if let Some(at) = f.error_at {
            let q = packet
                .get(at..)
                .and_then(|q| fields(q, true))
                .expect("a passing ICMP error quotes a readable packet");
            assert!(
                self.flows.contains_key(&key(&q)),
                "an ICMP error about no allowed flow passed: {q:?}"
            );
            assert_eq!(
                f.dst, q.src,
                "an ICMP error not to the quoted source passed"
            );
            assert_eq!(
                f.src.is_ipv6(),
                q.src.is_ipv6(),
                "ICMP error of the other family"
            );
            assert!(
                q.error_at.is_none(),
                "an ICMP error about an ICMP error passed"
            );
            assert_eq!(
                side,
                side_of(q.dst),
                "an ICMP error passed from another side than the quoted destination's"
            );
            return;
        }
        assert_eq!(
            side,
            side_of(f.src),
            "a packet passed from another side than its source's"
        );
        let k = key(&f);
        let allowed = Self::allows(policy, side, &f);
        let known = self.flows.contains_key(&k);
        assert!(
            known || allowed,
            "a flow the policy denies passed: {f:?} from {side:?}"
        );
        if allowed {
            self.flows.entry(k).or_default().push((side, f));
        }
    }

    /// A new policy is in force: flows it no longer allows (judged as they started) are cut.
    pub fn policy_changed(&mut self, policy: &CompiledPolicy) {
        self.flows.retain(|_, starts| {
            starts.retain(|(side, f)| Self::allows(policy, *side, f));
            !starts.is_empty()
        });
    }

    /// A peer is removed: its packets must not pass (the flows it started may be forgotten;
    /// the model keeps them, being allowed to know more than the firewall).
    pub fn forget(&mut self, id: PeerId) {
        self.removed.insert(id);
    }

    /// Every removed peer is admitted again.
    pub fn readmit_all(&mut self) {
        self.removed.clear();
    }
}
