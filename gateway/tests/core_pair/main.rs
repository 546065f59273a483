//! Two `Core`s wired back to back in memory: no sockets, no TUN device, no root, no sleeping.
//! A `Pair` owns both cores, a simulated clock and the "wire" between them (datagrams in
//! flight), so each test reads as a scenario: send a packet, deliver, advance time, look at
//! what came out. Minutes of WireGuard timers (rekey, expiry, retries) run in milliseconds
//! because the core takes `now` as an argument.

use std::collections::{HashSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use boringtun::x25519::{PublicKey, StaticSecret};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ipnet::IpNet;
use komnet_gateway::cookie::HandshakeLimits;
use komnet_gateway::core::{Action, Core, DropReason, PeerId, STALE_INITIATION, TIMER_INTERVAL};
use komnet_gateway::packet::{
    COOKIE_REPLY_LEN, DATA_OVERHEAD, HANDSHAKE_INIT_LEN, HANDSHAKE_RESP_LEN, MSG_COOKIE_REPLY,
    MSG_DATA, MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP,
};
use komnet_gateway::uapi;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

// WireGuard's timer constants (paper, section 6.1); boringtun keeps its copies crate-private.
const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

const KEY_A: [u8; 32] = [0xa1; 32];
const KEY_B: [u8; 32] = [0xb2; 32];
/// A third party: an extra peer of A in some tests, an attacker unknown to A in others.
const KEY_C: [u8; 32] = [0xc3; 32];

const A_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const C_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// Large enough for any datagram or packet the tests produce.
const BUF_LEN: usize = 2048;

fn a_addr() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 51820))
}

fn b_addr() -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 2], 51820))
}

fn stranger_addr() -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 66], 6666))
}

/// A fixed "current Unix time" for `Core::peers`, so expected values are exact.
fn wall_clock() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn public_key(private: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(private)).to_bytes()
}

fn net(prefix: &str) -> IpNet {
    prefix.parse().expect("valid prefix literal")
}

// ---- hand-built inner packets ------------------------------------------------------------

fn udp_header(payload_len: usize) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload_len).expect("test payloads are small");
    let mut header = Vec::with_capacity(8);
    header.extend_from_slice(&40000u16.to_be_bytes());
    header.extend_from_slice(&7u16.to_be_bytes());
    header.extend_from_slice(&udp_len.to_be_bytes());
    // Checksum 0: "none" for IPv4; the core never looks at it for either family.
    header.extend_from_slice(&[0, 0]);
    header
}

/// A minimal IPv4/UDP packet with a correct total length and header checksum.
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total_len = u16::try_from(20 + 8 + payload.len()).expect("test payloads are small");
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total_len.to_be_bytes());
    // Identification 0, Don't Fragment, TTL 64, protocol UDP, checksum filled in below.
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let sum = packet
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !u16::try_from((folded & 0xffff) + (folded >> 16)).expect("folded twice");
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(&udp_header(payload.len()));
    packet.extend_from_slice(payload);
    packet
}

/// A minimal IPv6/UDP packet with a correct payload length.
fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let payload_len = u16::try_from(8 + payload.len()).expect("test payloads are small");
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&payload_len.to_be_bytes());
    // Next header UDP, hop limit 64.
    packet.extend_from_slice(&[17, 64]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(&udp_header(payload.len()));
    packet.extend_from_slice(payload);
    packet
}

// ---- WireGuard MACs and cookies, computed independently of the core ----------------------

fn blake2s_mac16(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut mac =
        <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("blake2s takes 16/32-byte keys");
    Mac::update(&mut mac, data);
    mac.finalize().into_bytes().into()
}

fn blake2s_labelled(label: &[u8], public_key: &[u8; 32]) -> [u8; 32] {
    let mut hash = Blake2s256::new();
    Digest::update(&mut hash, label);
    Digest::update(&mut hash, public_key);
    hash.finalize().into()
}

/// Fills in a handshake message's MAC1 for `responder_public`, as any sender who knows the
/// responder's public key (but not necessarily anything else) can.
fn sign_mac1(message: &mut [u8], responder_public: &[u8; 32]) {
    let mac1_at = message.len() - 32;
    let key = blake2s_labelled(b"mac1----", responder_public);
    let mac1 = blake2s_mac16(&key, &message[..mac1_at]);
    message[mac1_at..mac1_at + 16].copy_from_slice(&mac1);
}

/// Decrypts the cookie in a cookie reply (paper, section 5.4.7) the way the initiator must.
fn open_cookie_reply(reply: &[u8], responder_public: &[u8; 32], mac1_sent: &[u8]) -> [u8; 16] {
    let key = blake2s_labelled(b"cookie--", responder_public);
    let cipher = <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&key.into());
    let cookie = cipher
        .decrypt(
            XNonce::from_slice(&reply[8..32]),
            Payload {
                msg: &reply[32..64],
                aad: mac1_sent,
            },
        )
        .expect("the cookie reply authenticates against the MAC1 it answers");
    cookie.try_into().expect("a cookie is 16 bytes")
}

fn mac1_of(handshake: &[u8]) -> &[u8] {
    let at = handshake.len() - 32;
    &handshake[at..at + 16]
}

fn mac2_of(handshake: &[u8]) -> &[u8] {
    &handshake[handshake.len() - 16..]
}

fn receiver_index(data: &[u8]) -> u32 {
    u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"))
}

// ---- configuration -------------------------------------------------------------------------

/// One side's view of the other: its key, where to reach it, what it may send.
struct PeerConfig {
    public_key: [u8; 32],
    endpoint: SocketAddr,
    allowed_ips: Vec<IpNet>,
}

fn configure_with_methods(
    core: &mut Core,
    now: Instant,
    private_key: [u8; 32],
    peer: &PeerConfig,
) -> PeerId {
    core.set_private_key(now, Some(private_key));
    let id = core
        .upsert_peer(now, peer.public_key)
        .expect("an empty core has room for a peer");
    core.set_endpoint(id, peer.endpoint);
    for prefix in &peer.allowed_ips {
        core.add_allowed_ip(id, *prefix);
    }
    id
}

fn configure_with_uapi(
    core: &mut Core,
    now: Instant,
    private_key: [u8; 32],
    listen_port: u16,
    peer: &PeerConfig,
) -> PeerId {
    let mut request = format!(
        "private_key={}\nlisten_port={listen_port}\nreplace_peers=true\npublic_key={}\n\
         endpoint={}\nreplace_allowed_ips=true\n",
        hex::encode(private_key),
        hex::encode(peer.public_key),
        peer.endpoint,
    );
    for prefix in &peer.allowed_ips {
        request.push_str(&format!("allowed_ip={prefix}\n"));
    }
    let set = uapi::parse_set(request.lines()).expect("a well-formed set=1 request");
    uapi::apply_set(core, now, &set);
    assert_eq!(core.public_key(), Some(public_key(private_key)));
    assert_eq!(core.listen_port(), listen_port);
    core.peer_id(&peer.public_key)
        .expect("apply_set created the peer")
}

// ---- the pair --------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Datagram {
    src: SocketAddr,
    dst: SocketAddr,
    bytes: Vec<u8>,
}

impl Datagram {
    fn message_type(&self) -> u8 {
        self.bytes[0]
    }
}

/// A datagram as one side put it on the wire, and when.
#[derive(Debug)]
struct Sent {
    from: Side,
    at: Duration,
    datagram: Datagram,
}

struct Node {
    core: Core,
    /// The address this node's datagrams come from and are delivered to; changing it
    /// simulates a NAT rebinding (roaming). It is also the address the "routing table" picks
    /// for datagrams the core sends without a source address.
    addr: SocketAddr,
    /// Further addresses of a multi-homed node (same port): datagrams to them are delivered
    /// too, and the core may ask to send from them.
    more_addrs: Vec<std::net::IpAddr>,
    /// How this node's core knows the other node.
    peer: PeerId,
    /// IP packets the core wrote to the TUN device.
    tun: Vec<Vec<u8>>,
    /// Reasons the core gave for datagrams delivered to it that it refused.
    drops: Vec<DropReason>,
}

impl Node {
    /// The source of a datagram the core wants sent from `src_ip`, as the driver and the
    /// kernel decide it: that address when the node has it; when it does not, the send fails
    /// (ENETUNREACH or EINVAL), the core forgets the address and the datagram goes from the routing table's
    /// choice, `default` (the node's primary address, or the one it is answering from).
    fn source(&mut self, default: SocketAddr, src_ip: Option<std::net::IpAddr>) -> SocketAddr {
        match src_ip {
            None => default,
            Some(ip) if ip == self.addr.ip() || self.more_addrs.contains(&ip) => {
                SocketAddr::new(ip, self.addr.port())
            }
            Some(gone) => {
                self.core.forget_source_ip(gone);
                default
            }
        }
    }

    /// Drops counted for the device and for this node's peer, in total.
    fn drops_counted(&self) -> u64 {
        let for_peer = self.core.peer_drops(self.peer).map_or(0, |d| d.total());
        self.core.device_drops().total() + for_peer
    }

    fn peer_drops(&self, reason: DropReason) -> u64 {
        self.core
            .peer_drops(self.peer)
            .expect("the peer is configured")
            .get(reason)
    }
}

/// Two cores, a simulated clock and the datagrams in flight between them.
struct Pair {
    start: Instant,
    now: Instant,
    a: Node,
    b: Node,
    in_flight: VecDeque<Datagram>,
    /// Every datagram either side sent, in order.
    sent: Vec<Sent>,
    /// Datagrams addressed to nobody (an old address, a stranger) or thrown away by a test.
    lost: Vec<Datagram>,
}

enum Configure {
    WithMethods,
    WithUapi,
}

impl Pair {
    /// A and B configured through the Core methods, each with the other as its only peer.
    fn new() -> Self {
        Self::build(Configure::WithMethods, HandshakeLimits::default())
    }

    /// The same pair configured through UAPI `set=1` requests.
    fn via_uapi() -> Self {
        Self::build(Configure::WithUapi, HandshakeLimits::default())
    }

    /// A pair whose A enforces `limits` on incoming handshakes.
    fn with_limits_on_a(limits: HandshakeLimits) -> Self {
        Self::build(Configure::WithMethods, limits)
    }

    fn build(how: Configure, a_limits: HandshakeLimits) -> Self {
        let start = Instant::now();
        let mut a_core = Core::with_limits(start, [1; 32], a_limits);
        let mut b_core = Core::new(start, [2; 32]);
        let b_seen_from_a = PeerConfig {
            public_key: public_key(KEY_B),
            endpoint: b_addr(),
            allowed_ips: vec![net("10.0.0.2/32"), net("fd00::2/128")],
        };
        let a_seen_from_b = PeerConfig {
            public_key: public_key(KEY_A),
            endpoint: a_addr(),
            allowed_ips: vec![net("10.0.0.1/32"), net("fd00::1/128")],
        };
        let (a_peer, b_peer) = match how {
            Configure::WithMethods => (
                configure_with_methods(&mut a_core, start, KEY_A, &b_seen_from_a),
                configure_with_methods(&mut b_core, start, KEY_B, &a_seen_from_b),
            ),
            Configure::WithUapi => (
                configure_with_uapi(&mut a_core, start, KEY_A, a_addr().port(), &b_seen_from_a),
                configure_with_uapi(&mut b_core, start, KEY_B, b_addr().port(), &a_seen_from_b),
            ),
        };
        let node = |core, addr, peer| Node {
            core,
            addr,
            more_addrs: Vec::new(),
            peer,
            tun: Vec::new(),
            drops: Vec::new(),
        };
        Self {
            start,
            now: start,
            a: node(a_core, a_addr(), a_peer),
            b: node(b_core, b_addr(), b_peer),
            in_flight: VecDeque::new(),
            sent: Vec::new(),
            lost: Vec::new(),
        }
    }

    fn node(&mut self, side: Side) -> &mut Node {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn transmit(&mut self, from: Side, datagram: Datagram) {
        self.sent.push(Sent {
            from,
            at: self.elapsed(),
            datagram: datagram.clone(),
        });
        self.in_flight.push_back(datagram);
    }

    /// `from` reads `packet` from its TUN device; a datagram it produces goes in flight.
    fn send(&mut self, from: Side, packet: &[u8]) -> Action {
        let now = self.now;
        let mut out = vec![0; BUF_LEN];
        let node = self.node(from);
        let src = node.addr;
        let action = node.core.handle_tun_packet(now, packet, &mut out);
        if let Action::ToNetwork {
            dst,
            src_ip,
            offset,
            len,
        } = action
        {
            let src = node.source(src, src_ip);
            let bytes = out[offset..offset + len].to_vec();
            self.transmit(from, Datagram { src, dst, bytes });
        }
        action
    }

    /// Hands one datagram to the node that currently owns its destination address; whatever
    /// that node answers goes in flight. `None` if nobody owns the address (it is lost).
    fn deliver(&mut self, datagram: Datagram) -> Option<Action> {
        let owns = |n: &Node| {
            datagram.dst == n.addr
                || (datagram.dst.port() == n.addr.port()
                    && n.more_addrs.contains(&datagram.dst.ip()))
        };
        let to = if owns(&self.a) {
            Side::A
        } else if owns(&self.b) {
            Side::B
        } else {
            self.lost.push(datagram);
            return None;
        };
        let now = self.now;
        let mut out = vec![0; BUF_LEN];
        let node = self.node(to);
        let local_ip = Some(datagram.dst.ip());
        let action =
            node.core
                .handle_datagram(now, datagram.src, local_ip, &datagram.bytes, &mut out);
        match action {
            Action::ToNetwork {
                dst,
                src_ip,
                offset,
                len,
            } => {
                let src = node.source(node.addr, src_ip);
                let bytes = out[offset..offset + len].to_vec();
                self.transmit(to, Datagram { src, dst, bytes });
            }
            Action::ToTun { peer, offset, len } => {
                assert_eq!(peer, node.peer, "a packet attributed to the wrong peer");
                node.tun.push(out[offset..offset + len].to_vec());
            }
            Action::Drop(reason) => node.drops.push(reason),
            Action::Unreachable { .. } => panic!("a datagram is never answered with ICMP"),
            Action::Nothing => {}
        }
        Some(action)
    }

    /// Moves what timers and finished handshakes queued in both cores onto the wire.
    fn collect_queued(&mut self) {
        for side in [Side::A, Side::B] {
            let node = self.node(side);
            let queued: Vec<_> = node.core.drain_pending().collect();
            for q in queued {
                let node = self.node(side);
                let src = node.source(node.addr, q.src_ip);
                self.transmit(
                    side,
                    Datagram {
                        src,
                        dst: q.dst,
                        bytes: q.bytes,
                    },
                );
            }
        }
    }

    /// Delivers everything in flight, and everything sent in answer, until the wire is quiet.
    fn run(&mut self) {
        for _ in 0..10_000 {
            self.collect_queued();
            let Some(datagram) = self.in_flight.pop_front() else {
                return;
            };
            self.deliver(datagram);
        }
        panic!("the cores are still talking after 10,000 datagrams");
    }

    /// Moves time forward and runs both cores' timers, without delivering anything: what the
    /// timers send stays in flight.
    fn tick(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        self.a.core.update_timers(now);
        self.b.core.update_timers(now);
        self.collect_queued();
    }

    /// Moves time forward by `by`, ticking both cores every `TIMER_INTERVAL` as the driver
    /// does and delivering after every tick.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while self.now < end {
            self.tick(TIMER_INTERVAL.min(end - self.now));
            self.run();
        }
    }

    /// Takes the first datagram in flight from `src` to `dst` off the wire, undelivered.
    fn take_in_flight(&mut self, src: SocketAddr, dst: SocketAddr) -> Datagram {
        let at = self
            .in_flight
            .iter()
            .position(|d| d.src == src && d.dst == dst)
            .unwrap_or_else(|| panic!("no datagram {src} -> {dst} in flight"));
        self.in_flight.remove(at).expect("position is in range")
    }

    fn lose_in_flight(&mut self) {
        self.lost.extend(self.in_flight.drain(..));
    }

    /// Sends `packet` from one side, delivers until quiet, and checks it came out of the
    /// other side's TUN device unchanged.
    fn transfer(&mut self, from: Side, packet: &[u8]) {
        let to = from.other();
        let before = self.node(to).tun.len();
        let action = self.send(from, packet);
        assert!(
            matches!(action, Action::ToNetwork { .. } | Action::Nothing),
            "{from:?} could not send: {action:?}"
        );
        self.run();
        let tun = &self.node(to).tun;
        assert_eq!(tun.len(), before + 1, "{from:?} -> {to:?} packet lost");
        assert_eq!(tun.last().map(Vec::as_slice), Some(packet));
    }

    /// A sends the first packet to B: handshake, then the queued packet arrives.
    fn handshake(&mut self) {
        let hello = ipv4_udp(A_V4, B_V4, b"hello");
        self.transfer(Side::A, &hello);
    }

    /// When `from` sent messages of `message_type`, relative to the start.
    fn times_sent(&self, from: Side, message_type: u8) -> Vec<Duration> {
        self.sent
            .iter()
            .filter(|s| s.from == from && s.datagram.message_type() == message_type)
            .map(|s| s.at)
            .collect()
    }

    fn peer_endpoint(&mut self, side: Side) -> Option<SocketAddr> {
        let now = self.now;
        let peers = self.node(side).core.peers(now, wall_clock());
        assert_eq!(peers.len(), 1);
        peers[0].endpoint
    }

    /// (received, sent) bytes as `wg show transfer` reports them on `side`.
    fn transfer_counters(&mut self, side: Side) -> (u64, u64) {
        let now = self.now;
        let peers = self.node(side).core.peers(now, wall_clock());
        assert_eq!(peers.len(), 1);
        (peers[0].rx_bytes, peers[0].tx_bytes)
    }
}

// ---- the tests, by subject -------------------------------------------------------------------

mod handshake_load;
mod kernel;
mod peers;
mod sessions;
