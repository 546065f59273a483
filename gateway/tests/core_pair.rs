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

// ---- tests -----------------------------------------------------------------------------------

#[test]
fn handshake_delivers_the_queued_packet_then_data_flows_both_ways() {
    let mut pair = Pair::via_uapi();
    let first = ipv4_udp(A_V4, B_V4, b"queued until the handshake is done");

    let action = pair.send(Side::A, &first);
    assert!(
        matches!(action, Action::ToNetwork { dst, len: HANDSHAKE_INIT_LEN, .. } if dst == b_addr()),
        "the first packet starts a handshake instead of going out: {action:?}"
    );
    assert_eq!(pair.in_flight[0].message_type(), MSG_HANDSHAKE_INIT);
    assert!(pair.b.tun.is_empty());

    pair.run();

    assert_eq!(
        pair.b.tun,
        vec![first.clone()],
        "identical bytes arrive at B"
    );
    let wire: Vec<(Side, u8, usize)> = pair
        .sent
        .iter()
        .map(|s| (s.from, s.datagram.message_type(), s.datagram.bytes.len()))
        .collect();
    assert_eq!(
        wire,
        [
            (Side::A, MSG_HANDSHAKE_INIT, HANDSHAKE_INIT_LEN),
            (Side::B, MSG_HANDSHAKE_RESP, HANDSHAKE_RESP_LEN),
            // The initiator confirms the session with a keepalive, then flushes its queue
            // (padded to a multiple of 16).
            (Side::A, MSG_DATA, DATA_OVERHEAD),
            (
                Side::A,
                MSG_DATA,
                first.len().next_multiple_of(16) + DATA_OVERHEAD
            ),
        ]
    );

    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"v4 back"));
    pair.transfer(Side::A, &ipv6_udp(A_V6, B_V6, b"v6 there"));
    pair.transfer(Side::B, &ipv6_udp(B_V6, A_V6, b"v6 back"));
    let big = ipv4_udp(A_V4, B_V4, &[0x5a; 1400]);
    pair.transfer(Side::A, &big);

    assert_eq!(pair.b.tun.len(), 3);
    assert_eq!(pair.a.tun.len(), 2);
    assert!(pair.a.drops.is_empty() && pair.b.drops.is_empty());
    assert_eq!(pair.a.drops_counted() + pair.b.drops_counted(), 0);
    assert_eq!(pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len(), 1);
    assert!(pair.times_sent(Side::B, MSG_HANDSHAKE_INIT).is_empty());

    let now = pair.now;
    let a_sees_b = &pair.a.core.peers(now, wall_clock())[0];
    assert_eq!(a_sees_b.public_key, public_key(KEY_B));
    assert!(a_sees_b.tx_bytes > 0 && a_sees_b.rx_bytes > 0);
}

/// One packet each way, every simulated second.
fn chat_for(pair: &mut Pair, until: Duration) {
    while pair.elapsed() < until {
        let second = u32::try_from(pair.elapsed().as_secs()).expect("short test");
        pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, &second.to_be_bytes()));
        pair.transfer(Side::B, &ipv6_udp(B_V6, A_V6, &second.to_be_bytes()));
        pair.advance(Duration::from_secs(1));
    }
}

#[test]
fn the_initiator_rekeys_every_two_minutes_and_traffic_never_stops() {
    let mut pair = Pair::new();
    pair.handshake();

    chat_for(&mut pair, REKEY_AFTER_TIME + Duration::from_secs(10));
    let inits = pair.times_sent(Side::A, MSG_HANDSHAKE_INIT);
    assert_eq!(inits.len(), 2, "one rekey in the first 130 s: {inits:?}");
    assert!(
        inits[1] >= REKEY_AFTER_TIME && inits[1] <= REKEY_AFTER_TIME + Duration::from_secs(2),
        "rekey at {:?}",
        inits[1]
    );

    let ten_minutes = Duration::from_secs(600);
    chat_for(&mut pair, ten_minutes);
    let inits = pair.times_sent(Side::A, MSG_HANDSHAKE_INIT);
    assert!(inits.len() >= 5, "handshakes in 10 minutes: {inits:?}");
    for gap in inits.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap >= REKEY_AFTER_TIME && gap <= REKEY_AFTER_TIME + Duration::from_secs(2),
            "sessions renew every REKEY_AFTER_TIME: {inits:?}"
        );
    }
    let last_init = *inits.last().expect("at least one");
    assert!(pair.elapsed() - last_init <= REKEY_AFTER_TIME + Duration::from_secs(2));

    // Only the initiator rekeys on time (paper, section 6.2); every init got a response.
    assert!(pair.times_sent(Side::B, MSG_HANDSHAKE_INIT).is_empty());
    assert_eq!(
        pair.times_sent(Side::B, MSG_HANDSHAKE_RESP).len(),
        inits.len()
    );

    // Each handshake really produced a session that carried data: A's data packets name one
    // receiver index per session.
    let sessions: HashSet<u32> = pair
        .sent
        .iter()
        .filter(|s| s.from == Side::A && s.datagram.message_type() == MSG_DATA)
        .map(|s| receiver_index(&s.datagram.bytes))
        .collect();
    assert_eq!(sessions.len(), inits.len());

    assert!(pair.lost.is_empty());
    assert!(pair.a.drops.is_empty(), "A dropped {:?}", pair.a.drops);
    assert!(pair.b.drops.is_empty(), "B dropped {:?}", pair.b.drops);
    assert_eq!(pair.a.tun.len(), pair.b.tun.len() - 1, "everything arrived");
}

#[test]
fn a_replayed_data_packet_is_dropped_and_counted() {
    let mut pair = Pair::new();
    pair.handshake();

    let first = ipv4_udp(B_V4, A_V4, b"first");
    let second = ipv4_udp(B_V4, A_V4, b"second");
    pair.send(Side::B, &first);
    let first_wire = pair.take_in_flight(b_addr(), a_addr());
    pair.send(Side::B, &second);
    let second_wire = pair.take_in_flight(b_addr(), a_addr());

    // Reordering within the window is fine...
    assert!(matches!(
        pair.deliver(second_wire.clone()),
        Some(Action::ToTun { .. })
    ));
    assert!(matches!(
        pair.deliver(first_wire.clone()),
        Some(Action::ToTun { .. })
    ));
    assert_eq!(pair.a.tun, vec![second, first]);

    // ...a second copy of either is not.
    assert_eq!(
        pair.deliver(first_wire),
        Some(Action::Drop(DropReason::Replay))
    );
    assert_eq!(
        pair.deliver(second_wire),
        Some(Action::Drop(DropReason::Replay))
    );
    assert_eq!(pair.a.tun.len(), 2, "no replay reached the TUN device");
    assert_eq!(pair.a.peer_drops(DropReason::Replay), 2);
    assert_eq!(pair.a.drops_counted(), 2);
    assert_eq!(pair.a.core.device_drops().total(), 0);
}

#[test]
fn a_packet_with_a_source_outside_the_senders_allowed_ips_is_dropped() {
    let mut pair = Pair::new();
    // A third peer on A owns 10.0.0.3: B must not be able to speak for it either.
    let now = pair.now;
    let c = pair
        .a
        .core
        .upsert_peer(now, public_key(KEY_C))
        .expect("room for a second peer");
    pair.a.core.add_allowed_ip(c, net("10.0.0.3/32"));
    pair.handshake();

    let spoofed = [
        ipv4_udp(Ipv4Addr::new(10, 0, 0, 99), A_V4, b"nobody's address"),
        ipv4_udp(C_V4, A_V4, b"another peer's address"),
        ipv4_udp(A_V4, A_V4, b"A's own address"),
        ipv6_udp(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99), A_V6, b"v6"),
    ];
    for packet in &spoofed {
        // B's core routes by destination only, so it encrypts and sends these.
        assert!(matches!(
            pair.send(Side::B, packet),
            Action::ToNetwork { .. }
        ));
        pair.run();
    }

    assert!(pair.a.tun.is_empty(), "no spoofed packet reached the TUN");
    assert_eq!(pair.a.drops, vec![DropReason::SpoofedSource; spoofed.len()]);
    assert_eq!(
        pair.a.peer_drops(DropReason::SpoofedSource),
        spoofed.len() as u64
    );
    let c_drops = pair.a.core.peer_drops(c).expect("C is configured");
    assert_eq!(c_drops.total(), 0, "the drop is B's, not C's");

    // The session is fine: B's own address still gets through.
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"legit"));
}

#[test]
fn a_roaming_peer_is_followed_only_after_it_authenticates() {
    let mut pair = Pair::new();
    pair.handshake();
    assert_eq!(pair.peer_endpoint(Side::A), Some(b_addr()));

    // Someone else replays B's session index with a tampered body: no authentication, no move.
    pair.send(Side::B, &ipv4_udp(B_V4, A_V4, b"captured"));
    let mut forged = pair.take_in_flight(b_addr(), a_addr());
    forged.src = stranger_addr();
    *forged.bytes.last_mut().expect("non-empty") ^= 1;
    assert_eq!(
        pair.deliver(forged),
        Some(Action::Drop(DropReason::DecryptFailed))
    );
    assert_eq!(pair.peer_endpoint(Side::A), Some(b_addr()));

    // B's NAT rebinds: its datagrams now come from elsewhere.
    let roamed = SocketAddr::from(([203, 0, 113, 9], 61000));
    pair.b.addr = roamed;
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"from my new address"));
    assert_eq!(pair.peer_endpoint(Side::A), Some(roamed));

    let answer = ipv6_udp(A_V6, B_V6, b"found you");
    let action = pair.send(Side::A, &answer);
    assert!(
        matches!(action, Action::ToNetwork { dst, .. } if dst == roamed),
        "A answers at the new address: {action:?}"
    );
    pair.run();
    assert_eq!(pair.b.tun.last(), Some(&answer));
    assert!(pair.lost.is_empty(), "nothing went to the old address");
}

#[test]
fn under_load_a_cookie_reply_is_sent_and_the_retry_with_mac2_is_accepted() {
    // A accepts one handshake per second in total and one per source.
    let strict = HandshakeLimits {
        global_per_second: 1,
        per_source_per_second: 1,
        per_source_burst: 1,
        // No allowance for quiet sources: here B is to need the cookie.
        quiet_burst: 0,
        ..HandshakeLimits::default()
    };
    let mut pair = Pair::with_limits_on_a(strict);
    let a_public = public_key(KEY_A);

    // An attacker that knows A's public key (so its MAC1 is valid) but is not A's peer.
    let now = pair.now;
    let mut attacker = Core::new(now, [3; 32]);
    configure_with_methods(
        &mut attacker,
        now,
        KEY_C,
        &PeerConfig {
            public_key: a_public,
            endpoint: a_addr(),
            allowed_ips: vec![net("10.0.0.1/32")],
        },
    );
    let mut out = vec![0; BUF_LEN];
    let Action::ToNetwork { offset, len, .. } =
        attacker.handle_tun_packet(now, &ipv4_udp(C_V4, A_V4, b"x"), &mut out)
    else {
        panic!("the attacker's core starts a handshake");
    };
    let flood = Datagram {
        src: stranger_addr(),
        dst: a_addr(),
        bytes: out[offset..offset + len].to_vec(),
    };

    // The flood uses up this second's budget.
    assert_eq!(
        pair.deliver(flood.clone()),
        Some(Action::Drop(DropReason::UnknownPeer))
    );
    assert!(matches!(
        pair.deliver(flood.clone()),
        Some(Action::ToNetwork { dst, len: COOKIE_REPLY_LEN, .. }) if dst == stranger_addr()
    ));

    // B, an honest peer, starts a handshake while A is under load: it gets a cookie reply.
    let packet = ipv4_udp(B_V4, A_V4, b"made it through the load");
    pair.send(Side::B, &packet);
    let first_init = pair.take_in_flight(b_addr(), a_addr());
    assert_eq!(first_init.message_type(), MSG_HANDSHAKE_INIT);
    assert_eq!(
        mac2_of(&first_init.bytes),
        [0; 16],
        "no cookie yet, no MAC2"
    );
    let cookies_before = pair.a.core.device_drops().get(DropReason::CookieRequired);
    let action = pair.deliver(first_init.clone());
    assert!(
        matches!(action, Some(Action::ToNetwork { dst, len: COOKIE_REPLY_LEN, .. }) if dst == b_addr()),
        "{action:?}"
    );
    assert_eq!(
        pair.a.core.device_drops().get(DropReason::CookieRequired),
        cookies_before + 1
    );
    let cookie_reply = pair.take_in_flight(a_addr(), b_addr());
    assert_eq!(cookie_reply.message_type(), MSG_COOKIE_REPLY);
    assert_eq!(cookie_reply.bytes.len(), COOKIE_REPLY_LEN);
    let cookie = open_cookie_reply(&cookie_reply.bytes, &a_public, mac1_of(&first_init.bytes));

    // B's core takes the cookie; a cookie reply is not a reason to move an endpoint.
    assert_eq!(pair.deliver(cookie_reply), Some(Action::Nothing));
    assert!(pair.b.drops.is_empty());
    assert_eq!(pair.peer_endpoint(Side::B), Some(a_addr()));
    pair.lose_in_flight(); // the cookie for the attacker

    // B retries after REKEY_TIMEOUT, from its timers.
    while pair.times_sent(Side::B, MSG_HANDSHAKE_INIT).len() < 2 {
        assert!(pair.elapsed() <= REKEY_TIMEOUT + Duration::from_secs(1));
        pair.tick(TIMER_INTERVAL);
    }
    assert!(pair.elapsed() >= REKEY_TIMEOUT);
    let retry = pair.take_in_flight(b_addr(), a_addr());
    assert_eq!(retry.message_type(), MSG_HANDSHAKE_INIT);
    let expected_mac2 = blake2s_mac16(&cookie, &retry.bytes[..HANDSHAKE_INIT_LEN - 16]);
    assert_eq!(
        mac2_of(&retry.bytes),
        expected_mac2,
        "the retry carries MAC2 = MAC(cookie, message up to MAC2)"
    );

    // Still under load when the retry arrives: the flood is back.
    assert_eq!(
        pair.deliver(flood.clone()),
        Some(Action::Drop(DropReason::UnknownPeer))
    );
    assert!(matches!(
        pair.deliver(flood),
        Some(Action::ToNetwork {
            len: COOKIE_REPLY_LEN,
            ..
        })
    ));
    let cookies_before = pair.a.core.device_drops().get(DropReason::CookieRequired);
    let action = pair.deliver(retry.clone());
    assert!(
        matches!(action, Some(Action::ToNetwork { dst, len: HANDSHAKE_RESP_LEN, .. }) if dst == b_addr()),
        "the retry with a valid MAC2 is accepted under load: {action:?}"
    );
    assert_eq!(
        pair.a.core.device_drops().get(DropReason::CookieRequired),
        cookies_before
    );

    pair.run();
    assert_eq!(pair.a.tun, vec![packet], "B's queued packet arrives");
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"and back"));

    // Without its MAC2 the same message would have been answered with a cookie again.
    let mut stripped = retry;
    let at = stripped.bytes.len() - 16;
    stripped.bytes[at..].fill(0);
    assert!(matches!(
        pair.deliver(stripped),
        Some(Action::ToNetwork {
            len: COOKIE_REPLY_LEN,
            ..
        })
    ));
}

#[test]
fn a_peer_completes_a_new_handshake_at_once_while_many_sources_flood() {
    // Default limits. Someone with a peer's configuration floods from 300 spoofed addresses of
    // one /24, twenty initiations from each, all at the same moment (issue 14).
    let mut pair = Pair::new();
    let a_public = public_key(KEY_A);
    let now = pair.now;
    let mut attacker = Core::new(now, [3; 32]);
    configure_with_methods(
        &mut attacker,
        now,
        KEY_C,
        &PeerConfig {
            public_key: a_public,
            endpoint: a_addr(),
            allowed_ips: vec![net("10.0.0.1/32")],
        },
    );
    let mut out = vec![0; BUF_LEN];
    let Action::ToNetwork { offset, len, .. } =
        attacker.handle_tun_packet(now, &ipv4_udp(C_V4, A_V4, b"x"), &mut out)
    else {
        panic!("the attacker's core starts a handshake");
    };
    let init = out[offset..offset + len].to_vec();
    for _ in 0..20 {
        for host in 0..300u16 {
            let src = SocketAddr::from(([100, 64, 7, (host % 250) as u8 + 1], 1000 + host));
            pair.deliver(Datagram {
                src,
                dst: a_addr(),
                bytes: init.clone(),
            });
        }
    }
    let cookies = pair.a.core.device_drops().get(DropReason::CookieRequired);
    let limited = pair.a.core.device_drops().get(DropReason::RateLimited);
    assert!(cookies <= 250 * 2, "{cookies} cookie replies");
    assert!(
        limited >= 4000,
        "only {limited} initiations dropped over budget"
    );
    pair.lose_in_flight();

    // B, an honest peer, needs a new handshake right now: it completes without the cookie
    // round trip (which would cost it REKEY_TIMEOUT) and its packet arrives.
    let packet = ipv4_udp(B_V4, A_V4, b"through the flood");
    pair.send(Side::B, &packet);
    pair.run();
    assert_eq!(
        pair.a.tun,
        vec![packet],
        "A dropped {:?}, B dropped {:?}",
        &pair.a.drops[pair.a.drops.len().saturating_sub(5)..],
        pair.b.drops
    );
    assert_eq!(pair.elapsed(), Duration::ZERO);
    assert_eq!(
        pair.a.core.device_drops().get(DropReason::CookieRequired),
        cookies,
        "B was sent no cookie"
    );
}

#[test]
fn keys_expire_after_silence_and_the_next_packet_starts_over() {
    let mut pair = Pair::new();
    pair.handshake();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"ack"));
    let handshake_at = pair.elapsed();

    // A packet of the current session, held back until its keys are gone.
    pair.send(Side::B, &ipv4_udp(B_V4, A_V4, b"late"));
    let stale = pair.take_in_flight(b_addr(), a_addr());

    // Silence: nobody sends, and whatever the timers send is lost.
    let keys_zeroed_after = REJECT_AFTER_TIME * 3;
    while pair.elapsed() < handshake_at + keys_zeroed_after + Duration::from_secs(10) {
        pair.tick(Duration::from_secs(1));
        pair.lose_in_flight();
    }

    let action = pair.deliver(stale);
    assert!(
        matches!(
            action,
            Some(Action::Drop(DropReason::NoSession | DropReason::Expired))
        ),
        "data from the expired session: {action:?}"
    );
    let counted = pair.a.peer_drops(DropReason::NoSession) + pair.a.peer_drops(DropReason::Expired);
    assert_eq!(counted, 1);
    assert_eq!(pair.a.tun.len(), 1, "only the first `ack` was delivered");
    assert_eq!(
        pair.a.core.peers_with_state(),
        0,
        "A freed the expired Noise state"
    );
    assert_eq!(
        pair.b.core.peers_with_state(),
        0,
        "B freed the expired Noise state"
    );
    // The expired session's state is gone, but `wg show` still tells when the last handshake
    // was (within boringtun's 250 ms timer granularity).
    let now = pair.now;
    let wall = wall_clock();
    let reported = pair.a.core.peers(now, wall)[0]
        .last_handshake
        .expect("a handshake happened");
    let ago = wall.duration_since(reported).expect("in the past");
    let expected = pair.elapsed() - handshake_at;
    assert!(
        ago <= expected + Duration::from_millis(300)
            && ago + Duration::from_millis(300) >= expected,
        "last handshake {ago:?} ago, expected about {expected:?}"
    );

    let inits_before = pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len();
    let again = ipv4_udp(A_V4, B_V4, b"hello again");
    let action = pair.send(Side::A, &again);
    assert!(
        matches!(
            action,
            Action::ToNetwork {
                len: HANDSHAKE_INIT_LEN,
                ..
            }
        ),
        "sending after expiry starts a fresh handshake: {action:?}"
    );
    assert_eq!(
        pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len(),
        inits_before + 1
    );
    pair.run();
    assert_eq!(pair.b.tun.last(), Some(&again));
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"welcome back"));
}

#[test]
fn bad_input_is_dropped_with_a_reason_and_counted_never_panicking() {
    let mut pair = Pair::new();
    pair.handshake();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"ack"));
    let real: Vec<Datagram> = pair.sent.iter().map(|s| s.datagram.clone()).collect();
    let live_index = real
        .iter()
        .rev()
        .find(|d| d.message_type() == MSG_DATA)
        .map(|d| receiver_index(&d.bytes))
        .expect("data was sent");

    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut garbage: Vec<Vec<u8>> = Vec::new();
    for len in 0..=300 {
        garbage.push(vec![0; len]);
        let mut random = vec![0; len];
        rng.fill_bytes(&mut random);
        garbage.push(random.clone());
        // The same random bytes behind each valid message header (type, zero reserved bytes
        // and, where there is one, a receiver index in use) so they get past the classifier.
        for message_type in [
            MSG_HANDSHAKE_INIT,
            MSG_HANDSHAKE_RESP,
            MSG_COOKIE_REPLY,
            MSG_DATA,
        ] {
            let mut headed = random.clone();
            if len >= 4 {
                headed[..4].copy_from_slice(&[message_type, 0, 0, 0]);
            }
            let index_at = if message_type == MSG_HANDSHAKE_RESP {
                8
            } else {
                4
            };
            if message_type != MSG_HANDSHAKE_INIT && len >= index_at + 4 {
                headed[index_at..index_at + 4].copy_from_slice(&live_index.to_le_bytes());
            }
            garbage.push(headed);
        }
    }
    // Every real message cut short, and one byte too long.
    for datagram in &real {
        for cut in 0..datagram.bytes.len() {
            garbage.push(datagram.bytes[..cut].to_vec());
        }
        let mut longer = datagram.bytes.clone();
        longer.push(0);
        garbage.push(longer);
    }
    let total_garbage = garbage.len();

    let deliver_garbage = |pair: &mut Pair, to: Side, bytes: Vec<u8>| {
        let before = pair.node(to).drops_counted();
        let dst = pair.node(to).addr;
        let len = bytes.len();
        let head: Vec<u8> = bytes.iter().copied().take(8).collect();
        let action = pair.deliver(Datagram {
            src: stranger_addr(),
            dst,
            bytes,
        });
        assert!(
            matches!(action, Some(Action::Drop(_))),
            "{len}-byte datagram starting {head:02x?} to {to:?}: {action:?}"
        );
        assert_eq!(
            pair.node(to).drops_counted(),
            before + 1,
            "{len}-byte datagram starting {head:02x?} to {to:?} not counted"
        );
    };
    for bytes in garbage {
        deliver_garbage(&mut pair, Side::A, bytes.clone());
        deliver_garbage(&mut pair, Side::B, bytes);
    }

    // Valid MAC1 (anyone with the public key can compute it) and garbage behind it: these
    // get past the DoS checks and into the Noise code. One per source, to stay under the
    // per-source handshake limit.
    for (i, (to, message_type, len)) in [
        (Side::A, MSG_HANDSHAKE_INIT, HANDSHAKE_INIT_LEN),
        (Side::B, MSG_HANDSHAKE_INIT, HANDSHAKE_INIT_LEN),
        (Side::A, MSG_HANDSHAKE_RESP, HANDSHAKE_RESP_LEN),
        (Side::B, MSG_HANDSHAKE_RESP, HANDSHAKE_RESP_LEN),
    ]
    .into_iter()
    .enumerate()
    {
        let mut message = vec![0; len];
        rng.fill_bytes(&mut message);
        message[..4].copy_from_slice(&[message_type, 0, 0, 0]);
        if message_type == MSG_HANDSHAKE_RESP {
            message[8..12].copy_from_slice(&live_index.to_le_bytes());
        }
        let responder = match to {
            Side::A => public_key(KEY_A),
            Side::B => public_key(KEY_B),
        };
        sign_mac1(&mut message, &responder);
        let before = pair.node(to).drops_counted();
        let dst = pair.node(to).addr;
        let last = u8::try_from(i).expect("few");
        let action = pair.deliver(Datagram {
            src: SocketAddr::from(([203, 0, 113, last], 1000)),
            dst,
            bytes: message,
        });
        assert!(
            matches!(action, Some(Action::Drop(reason)) if reason != DropReason::InvalidMac),
            "garbage with a valid MAC1 to {to:?}: {action:?}"
        );
        assert_eq!(pair.node(to).drops_counted(), before + 1);
    }

    assert!(pair.a.drops.len() > total_garbage && pair.b.drops.len() > total_garbage);
    for node in [&pair.a, &pair.b] {
        let reasons: HashSet<DropReason> = node.drops.iter().copied().collect();
        for expected in [
            DropReason::Malformed,
            DropReason::InvalidMac,
            DropReason::DecryptFailed,
        ] {
            assert!(reasons.contains(&expected), "{expected} never seen");
        }
    }
    // None of it was taken for the peer, or moved it.
    assert_eq!(pair.peer_endpoint(Side::A), Some(b_addr()));
    assert_eq!(pair.peer_endpoint(Side::B), Some(a_addr()));
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"still here"));
    pair.transfer(Side::B, &ipv6_udp(B_V6, A_V6, b"me too"));
}

#[test]
fn a_removed_peer_is_unknown_and_unroutable() {
    let mut pair = Pair::new();
    pair.handshake();
    pair.send(Side::B, &ipv4_udp(B_V4, A_V4, b"after removal"));
    let orphan = pair.take_in_flight(b_addr(), a_addr());

    let removed = pair.a.peer;
    pair.a.core.remove_peer(removed);
    assert_eq!(pair.a.core.peer_count(), 0);
    assert!(pair.a.core.peer_drops(removed).is_none());

    assert_eq!(
        pair.deliver(orphan.clone()),
        Some(Action::Drop(DropReason::UnknownIndex))
    );
    // Unroutable: refused and answered with an ICMP unreachable (see unreachable.rs).
    assert!(matches!(
        pair.send(Side::A, &ipv4_udp(A_V4, B_V4, b"v4")),
        Action::Unreachable {
            reason: DropReason::NoRoute,
            ..
        }
    ));
    assert!(matches!(
        pair.send(Side::A, &ipv6_udp(A_V6, B_V6, b"v6")),
        Action::Unreachable {
            reason: DropReason::NoRoute,
            ..
        }
    ));
    let device = pair.a.core.device_drops();
    assert_eq!(device.get(DropReason::UnknownIndex), 1);
    assert_eq!(device.get(DropReason::NoRoute), 2);
    assert!(
        pair.in_flight.is_empty(),
        "nothing was sent to the removed peer"
    );

    // A new peer may reuse the slot; the old index must still lead nowhere.
    let now = pair.now;
    let newcomer = pair
        .a
        .core
        .upsert_peer(now, public_key(KEY_C))
        .expect("room for a peer");
    assert_ne!(newcomer, removed);
    assert_eq!(
        pair.deliver(orphan),
        Some(Action::Drop(DropReason::UnknownIndex))
    );
    assert!(pair.a.tun.is_empty());
}

#[test]
fn last_handshake_is_reported_as_wall_clock_time() {
    let mut pair = Pair::new();
    // The driver ticks the timers from the start; let some idle time pass first.
    pair.advance(Duration::from_secs(30));
    let now = pair.now;
    let before = pair.a.core.peers(now, wall_clock());
    assert_eq!(before[0].last_handshake, None, "no handshake yet");

    pair.handshake();
    let handshake_at = pair.now;
    let since = Duration::from_secs(7);
    pair.advance(since);
    assert_eq!(pair.now - handshake_at, since);

    let wall = wall_clock();
    let expected = wall - since;
    for side in [Side::A, Side::B] {
        let now = pair.now;
        let info = pair.node(side).core.peers(now, wall);
        let reported = info[0]
            .last_handshake
            .unwrap_or_else(|| panic!("{side:?} reports no handshake"));
        // boringtun stamps a handshake with the time of the last timer tick.
        let error = reported
            .duration_since(expected)
            .unwrap_or_else(|e| e.duration());
        assert!(
            error <= TIMER_INTERVAL,
            "{side:?}: last handshake {reported:?}, expected {expected:?}"
        );
    }

    let now = pair.now;
    let get = uapi::format_get(&mut pair.a.core, now, wall);
    let expected_secs = expected
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    assert!(
        get.contains(&format!("last_handshake_time_sec={expected_secs}\n")),
        "{get}"
    );
}

/// Housekeeping reads `activity_into` several times a second instead of `peers`: it must say
/// the same of each peer, and `allowed_ips_version` must move exactly when addresses change.
#[test]
fn activity_and_allowed_ips_of_say_what_peers_says() {
    let mut pair = Pair::new();
    pair.advance(Duration::from_secs(2));
    pair.handshake();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"and back"));
    pair.advance(Duration::from_secs(1));
    for side in [Side::A, Side::B] {
        let now = pair.now;
        let core = &mut pair.node(side).core;
        let version = core.allowed_ips_version();
        let info = core.peers(now, wall_clock());
        let mut activity = vec![];
        core.activity_into(now, &mut activity);
        assert_eq!(activity.len(), 1);
        let (a, p) = (activity[0], &info[0]);
        let wall_form = a.handshake_at.map(|at| wall_clock() - (now - at));
        assert_eq!(
            (a.id, a.public_key, wall_form, a.last_data),
            (p.id, p.public_key, p.last_handshake, p.last_data),
            "{side:?}"
        );
        assert!(
            a.handshake_at.is_some() && a.last_data.is_some(),
            "{side:?}"
        );
        // Read again a tick later, without a new handshake: the same instant, so housekeeping
        // does not take it for a new handshake and claim the peer's routes again.
        core.activity_into(now + TIMER_INTERVAL, &mut activity);
        assert_eq!(activity[0].handshake_at, a.handshake_at, "{side:?}");
        assert_eq!(core.allowed_ips_of(a.id), p.allowed_ips, "{side:?}");
        // Traffic and handshakes leave the version alone; an address change moves it.
        assert_eq!(core.allowed_ips_version(), version);
        core.add_allowed_ip(a.id, net("10.9.0.0/16"));
        assert_ne!(core.allowed_ips_version(), version);
        assert!(core.allowed_ips_of(a.id).contains(&net("10.9.0.0/16")));
    }
    let id = pair.a.peer;
    pair.a.core.remove_peer(id);
    assert!(pair.a.core.allowed_ips_of(id).is_empty());
    let now = pair.now;
    let mut activity = vec![];
    pair.a.core.activity_into(now, &mut activity);
    assert!(activity.is_empty());
}

/// `last_data` says whether the peer uses this device as its gateway (a hub announces a
/// spoke's routes by it): data and keepalives count, handshakes do not, so a hub that only
/// gets its own handshakes answered (by a spoke for which it is the standby) does not count
/// the spoke as its own.
#[test]
fn last_data_moves_with_data_and_keepalives_not_with_handshakes() {
    let mut pair = Pair::new();
    pair.advance(Duration::from_secs(3));
    let last_data = |pair: &mut Pair, side: Side| {
        let now = pair.now;
        pair.node(side).core.peers(now, wall_clock())[0].last_data
    };
    assert_eq!(last_data(&mut pair, Side::A), None);
    // A initiates: B gets the initiation, A the response, then B A's keepalive and packet.
    pair.handshake();
    let handshake_at = pair.now;
    assert_eq!(last_data(&mut pair, Side::A), None, "a response is no data");
    assert_eq!(last_data(&mut pair, Side::B), Some(handshake_at));
    pair.advance(Duration::from_secs(2));
    assert_eq!(last_data(&mut pair, Side::A), None);
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"back"));
    assert_eq!(last_data(&mut pair, Side::A), Some(pair.now));
    // A packet with a source B may not use is refused and does not count.
    pair.advance(Duration::from_secs(2));
    let refused = pair.send(Side::B, &ipv4_udp(C_V4, A_V4, b"spoofed"));
    assert!(matches!(refused, Action::ToNetwork { .. }), "{refused:?}");
    let sent_back_at = pair.now - Duration::from_secs(2);
    pair.run();
    assert_eq!(last_data(&mut pair, Side::A), Some(sent_back_at));
}

#[test]
fn both_sides_sending_first_converge_on_sessions_and_deliver_both_packets() {
    // Both ends send before any handshake (a ping answered by a ping): each queues its
    // packet and starts a handshake. The responder's queued packet must go out once it has a
    // usable session, not start yet another handshake.
    let mut pair = Pair::new();
    let from_a = ipv4_udp(A_V4, B_V4, b"a speaks first");
    let from_b = ipv4_udp(B_V4, A_V4, b"b speaks first too");
    pair.send(Side::A, &from_a);
    pair.send(Side::B, &from_b);
    pair.run();
    assert_eq!(pair.b.tun, vec![from_a]);
    assert_eq!(pair.a.tun, vec![from_b]);
    assert!(
        pair.a.drops.is_empty() && pair.b.drops.is_empty(),
        "{:?} {:?}",
        pair.a.drops,
        pair.b.drops
    );
    // One initiation each (the crossing ones), and no third one from a premature flush.
    assert_eq!(pair.times_sent(Side::A, MSG_HANDSHAKE_INIT).len(), 1);
    assert_eq!(pair.times_sent(Side::B, MSG_HANDSHAKE_INIT).len(), 1);

    // Data keeps flowing both ways afterwards.
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"again"));
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"again back"));
    assert_eq!(pair.a.tun.len(), 2);
    assert_eq!(pair.b.tun.len(), 2);
}

// ---- conformance with the kernel (issue 20) -----------------------------------------------

#[test]
fn an_initiation_that_waited_longer_than_its_sender_waits_is_not_answered() {
    let mut pair = Pair::new();
    let hello = ipv4_udp(A_V4, B_V4, b"after a long queue");
    pair.send(Side::A, &hello);
    let init = pair.take_in_flight(a_addr(), b_addr());
    assert_eq!(init.message_type(), MSG_HANDSHAKE_INIT);
    // B reads it only now: it sat in B's receive queue past the bound. B spends nothing on it.
    let now = pair.now;
    let mut out = vec![0; BUF_LEN];
    let waited = STALE_INITIATION + Duration::from_millis(1);
    let action = pair.b.core.handle_received(
        now,
        waited,
        init.src,
        Some(init.dst.ip()),
        &init.bytes,
        &mut out,
    );
    assert_eq!(action, Action::Drop(DropReason::StaleHandshake));
    assert_eq!(
        pair.b.core.device_drops().get(DropReason::StaleHandshake),
        1
    );
    // The same initiation read within the bound is answered, and the queued packet follows.
    let action = pair.b.core.handle_received(
        now,
        STALE_INITIATION,
        init.src,
        Some(init.dst.ip()),
        &init.bytes,
        &mut out,
    );
    let Action::ToNetwork {
        dst, offset, len, ..
    } = action
    else {
        panic!("an initiation within the bound is answered: {action:?}");
    };
    assert_eq!(out[offset], MSG_HANDSHAKE_RESP);
    let response = Datagram {
        src: b_addr(),
        dst,
        bytes: out[offset..offset + len].to_vec(),
    };
    // Only initiations go stale: a response (and data) that waited as long is still taken.
    let now = pair.now;
    let mut out_a = vec![0; BUF_LEN];
    let action = pair.a.core.handle_received(
        now,
        Duration::from_secs(10),
        response.src,
        Some(response.dst.ip()),
        &response.bytes,
        &mut out_a,
    );
    match action {
        Action::ToNetwork {
            dst, offset, len, ..
        } => pair.transmit(
            Side::A,
            Datagram {
                src: a_addr(),
                dst,
                bytes: out_a[offset..offset + len].to_vec(),
            },
        ),
        Action::Nothing => {}
        other => panic!("a late response was refused: {other:?}"),
    }
    pair.run();
    assert_eq!(pair.b.tun.last().map(Vec::as_slice), Some(&hello[..]));
}

#[test]
fn the_private_key_is_stored_and_shown_clamped() {
    // Low three bits set, top bit set, second-highest clear: all three get clamped.
    let mut unclamped = [0x5a; 32];
    unclamped[0] = 0xff;
    unclamped[31] = 0x80;
    let mut clamped = unclamped;
    clamped[0] = 0xf8;
    clamped[31] = 0x40;
    let mut core = Core::new(Instant::now(), [7; 32]);
    let set = uapi::parse_set([format!("private_key={}", hex::encode(unclamped)).as_str()])
        .expect("a well-formed request");
    uapi::apply_set(&mut core, Instant::now(), &set);
    assert_eq!(core.private_key(), Some(clamped));
    assert_eq!(core.public_key(), Some(public_key(clamped)));
    let get = uapi::format_get(&mut core, Instant::now(), wall_clock());
    assert!(
        get.contains(&format!("private_key={}\n", hex::encode(clamped))),
        "{get}"
    );
    // Setting the clamped form of the same key changes nothing (no session restart).
    assert_eq!(komnet_gateway::core::clamp_private_key(unclamped), clamped);
}

/// The low-order points of Curve25519 the kernel selftest tries (as 32-byte keys).
fn low_order_points() -> Vec<[u8; 32]> {
    let mut points = vec![[0u8; 32]];
    let mut one = [0u8; 32];
    one[0] = 1;
    points.push(one);
    for hex_point in [
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ] {
        let mut p = [0u8; 32];
        hex::decode_to_slice(hex_point, &mut p).expect("literal");
        points.push(p);
    }
    points
}

#[test]
fn a_peer_with_a_low_order_public_key_gets_no_handshake_ever() {
    let start = Instant::now();
    let mut core = Core::new(start, [3; 32]);
    core.set_private_key(start, Some(KEY_A));
    let mut ids = Vec::new();
    for (i, point) in low_order_points().into_iter().enumerate() {
        let id = core.upsert_peer(start, point).expect("room");
        core.set_endpoint(id, SocketAddr::from(([127, 0, 0, 1], 1111)));
        core.add_allowed_ip(id, net(&format!("10.9.{i}.0/24")));
        // Turning keepalive on sends one at once to a normal peer.
        core.set_persistent_keepalive(start, id, Some(1));
        ids.push(id);
    }
    let mut out = vec![0u8; BUF_LEN];
    for (i, id) in ids.iter().enumerate() {
        let packet = ipv4_udp(A_V4, Ipv4Addr::new(10, 9, i as u8, 1), b"hello?");
        assert_eq!(
            core.handle_tun_packet(start, &packet, &mut out),
            Action::Drop(DropReason::LowOrderKey)
        );
        assert_eq!(
            core.peer_drops(*id)
                .expect("configured")
                .get(DropReason::LowOrderKey),
            1
        );
    }
    let mut now = start;
    for _ in 0..(30_000 / TIMER_INTERVAL.as_millis()) {
        now += TIMER_INTERVAL;
        core.update_timers(now);
    }
    assert_eq!(core.poll_transmit(&mut out), None, "nothing is ever sent");
    assert_eq!(core.peers_with_state(), 0);

    // A new private key is checked again: still refused, and a normal peer is unaffected.
    core.set_private_key(now, Some(KEY_C));
    let b = core.upsert_peer(now, public_key(KEY_B)).expect("room");
    core.set_endpoint(b, b_addr());
    core.add_allowed_ip(b, net("10.0.0.2/32"));
    assert_eq!(
        core.handle_tun_packet(
            now,
            &ipv4_udp(A_V4, Ipv4Addr::new(10, 9, 0, 1), b"x"),
            &mut out
        ),
        Action::Drop(DropReason::LowOrderKey)
    );
    assert!(matches!(
        core.handle_tun_packet(now, &ipv4_udp(A_V4, B_V4, b"x"), &mut out),
        Action::ToNetwork { .. }
    ));
}

#[test]
fn a_packet_from_a_disallowed_source_is_dropped_but_its_endpoint_is_learnt() {
    let mut pair = Pair::new();
    pair.handshake();
    let (rx_before, _) = pair.transfer_counters(Side::A);
    // B roams and its first packet from there carries a source it may not use.
    let roamed = SocketAddr::from(([203, 0, 113, 9], 61000));
    pair.b.addr = roamed;
    pair.send(
        Side::B,
        &ipv4_udp(Ipv4Addr::new(10, 0, 0, 99), A_V4, b"spoofed"),
    );
    pair.run();
    assert_eq!(pair.a.drops, vec![DropReason::SpoofedSource]);
    assert!(pair.a.tun.is_empty());
    assert_eq!(
        pair.peer_endpoint(Side::A),
        Some(roamed),
        "the kernel learns the endpoint from any authenticated packet"
    );
    let (rx_after, _) = pair.transfer_counters(Side::A);
    assert_eq!(
        rx_after, rx_before,
        "a dishonest packet is not counted as received"
    );
}

#[test]
fn data_packets_are_padded_to_sixteen_bytes_but_never_past_the_mtu() {
    use komnet_gateway::core::padding_len;
    assert_eq!(padding_len(84, 1420), 12);
    assert_eq!(padding_len(96, 1420), 0);
    assert_eq!(padding_len(1419, 1420), 1, "up to the MTU, not to 1424");
    assert_eq!(padding_len(1420, 1420), 0);
    assert_eq!(padding_len(0, 1420), 0, "keepalives stay empty");
    assert_eq!(
        padding_len(85, 0),
        11,
        "unknown MTU: the next multiple of 16"
    );

    let mut pair = Pair::new();
    pair.a.core.set_mtu(1420);
    pair.b.core.set_mtu(1420);
    pair.handshake();
    let (_, tx_before) = pair.transfer_counters(Side::A);
    let packet = ipv4_udp(A_V4, B_V4, &[7u8; 56]); // 84 bytes, as a ping
    let Action::ToNetwork { len, .. } = pair.send(Side::A, &packet) else {
        panic!("a session exists");
    };
    assert_eq!(len, 96 + DATA_OVERHEAD, "84 bytes padded to 96");
    pair.run();
    assert_eq!(
        pair.b.tun.last(),
        Some(&packet),
        "the padding is gone on arrival"
    );
    let (_, tx_after) = pair.transfer_counters(Side::A);
    assert_eq!(tx_after - tx_before, 128);
}

#[test]
fn a_packet_no_peer_can_take_is_answered_with_icmp_unreachable_within_a_rate_limit() {
    let mut pair = Pair::new();
    pair.handshake();
    let mut out = vec![0u8; BUF_LEN];
    let now = pair.now;
    let stray = ipv4_udp(A_V4, C_V4, b"for nobody");
    let Action::Unreachable {
        reason,
        offset,
        len,
    } = pair.a.core.handle_tun_packet(now, &stray, &mut out)
    else {
        panic!("no answer to an unroutable packet");
    };
    assert_eq!(reason, DropReason::NoRoute);
    let answer = &out[offset..offset + len];
    assert_eq!(
        komnet_gateway::unreachable::addresses(answer),
        Some((C_V4.into(), A_V4.into())),
        "from the unreachable address to the sender"
    );
    assert_eq!((answer[20], answer[21]), (3, 1), "ICMP host unreachable");
    assert_eq!(&answer[28..], &stray[..], "quotes the packet");
    // At most ICMP_PER_SECOND answers per second; then plain drops until the next second.
    let limit = komnet_gateway::core::ICMP_PER_SECOND;
    for _ in 1..limit {
        assert!(matches!(
            pair.a.core.handle_tun_packet(now, &stray, &mut out),
            Action::Unreachable { .. }
        ));
    }
    assert_eq!(
        pair.a.core.handle_tun_packet(now, &stray, &mut out),
        Action::Drop(DropReason::NoRoute)
    );
    let later = now + Duration::from_secs(1);
    assert!(matches!(
        pair.a.core.handle_tun_packet(later, &stray, &mut out),
        Action::Unreachable { .. }
    ));
    assert!(pair.in_flight.is_empty(), "nothing went to the network");
}

/// Issue 20, defect 8: B is multi-homed (198.51.100.2, its routing table's choice, and
/// 198.51.100.3) and A talks to the second address. Everything B sends A (the handshake
/// response, data, keepalives) leaves from the address A sent to, so A's endpoint, its NAT and
/// its firewalls keep seeing the address they talk to.
#[test]
fn a_multi_homed_peer_answers_from_the_address_it_was_sent_to() {
    let mut pair = Pair::new();
    let second = SocketAddr::from(([198, 51, 100, 3], b_addr().port()));
    pair.b.more_addrs.push(second.ip());
    let a_peer = pair.a.peer;
    pair.a.core.set_endpoint(a_peer, second);
    pair.handshake();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"answer"));
    let b_peer = pair.b.peer;
    let now = pair.now;
    pair.b.core.set_persistent_keepalive(now, b_peer, Some(1));
    pair.advance(Duration::from_secs(3));

    let from_b: Vec<SocketAddr> = pair
        .sent
        .iter()
        .filter(|s| s.from == Side::B)
        .map(|s| s.datagram.src)
        .collect();
    assert!(from_b.len() >= 4, "response, data, keepalives: {from_b:?}");
    assert!(
        from_b.iter().all(|src| *src == second),
        "B sent from other addresses than the one A talks to: {from_b:?}"
    );
    assert_eq!(pair.peer_endpoint(Side::A), Some(second));
    assert_eq!(pair.b.core.source_ip(b_peer), Some(second.ip()));
}

/// Defect 8, "not too sticky": when B loses the address A talked to, its next datagram cannot
/// leave from it (the driver's send fails): the core forgets it, the datagram goes
/// from the routing table's choice, A follows B there and traffic goes on.
#[test]
fn a_sticky_source_address_the_host_lost_is_forgotten() {
    let mut pair = Pair::new();
    let second = SocketAddr::from(([198, 51, 100, 3], b_addr().port()));
    pair.b.more_addrs.push(second.ip());
    let a_peer = pair.a.peer;
    pair.a.core.set_endpoint(a_peer, second);
    pair.handshake();
    let b_peer = pair.b.peer;
    assert_eq!(pair.b.core.source_ip(b_peer), Some(second.ip()));

    pair.b.more_addrs.clear();
    pair.transfer(Side::B, &ipv4_udp(B_V4, A_V4, b"after renumbering"));
    assert_eq!(pair.sent.last().map(|s| s.datagram.src), Some(b_addr()));
    assert_eq!(pair.b.core.source_ip(b_peer), None);
    assert_eq!(
        pair.peer_endpoint(Side::A),
        Some(b_addr()),
        "A roamed with B"
    );
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"and back"));
    assert_eq!(
        pair.b.core.source_ip(b_peer),
        Some(b_addr().ip()),
        "learnt again from A's packet to the remaining address"
    );
}

/// Defect 8, like the kernel: an endpoint set by configuration drops the learnt source
/// address, and so does a handshake initiation that went unanswered (its retransmission leaves
/// from the routing table's choice, in case the sticky address is what no longer works).
#[test]
fn a_sticky_source_is_dropped_by_a_configured_endpoint_and_by_an_unanswered_handshake() {
    let mut pair = Pair::new();
    let second = SocketAddr::from(([198, 51, 100, 3], b_addr().port()));
    pair.b.more_addrs.push(second.ip());
    let a_peer = pair.a.peer;
    pair.a.core.set_endpoint(a_peer, second);
    pair.handshake();
    let b_peer = pair.b.peer;
    assert_eq!(pair.b.core.source_ip(b_peer), Some(second.ip()));
    pair.b.core.set_endpoint(b_peer, a_addr());
    assert_eq!(pair.b.core.source_ip(b_peer), None);

    // Learnt again, then B starts a handshake that A never hears.
    pair.transfer(Side::A, &ipv4_udp(A_V4, B_V4, b"again"));
    assert_eq!(pair.b.core.source_ip(b_peer), Some(second.ip()));
    let now = pair.now;
    pair.b.core.force_handshake(now, b_peer);
    pair.collect_queued();
    let first = pair.take_in_flight(second, a_addr());
    assert_eq!(first.message_type(), MSG_HANDSHAKE_INIT);
    pair.lost.push(first);
    // REKEY_TIMEOUT plus boringtun's up to 1/3 s of jitter, without delivering.
    let mut retry = None;
    for _ in 0..40 {
        pair.tick(TIMER_INTERVAL);
        if let Some(at) = pair
            .in_flight
            .iter()
            .position(|d| d.message_type() == MSG_HANDSHAKE_INIT)
        {
            retry = pair.in_flight.remove(at);
            break;
        }
    }
    let retry = retry.expect("B retransmits its initiation within REKEY_TIMEOUT");
    assert!(pair.now - now >= REKEY_TIMEOUT);
    assert_eq!(
        retry.src,
        b_addr(),
        "the retry leaves from the routing table's choice"
    );
    assert_eq!(pair.b.core.source_ip(b_peer), None);
}

/// The selftest's routing loop: A's route to B's endpoint goes through the tunnel itself (B's
/// allowed IPs cover it), so the host hands A's own encrypted datagram back to it through the
/// TUN device. The core drops it as a routing loop, as the kernel does (ELOOP), instead of
/// encrypting it again for ever; other traffic to that address still goes.
#[test]
fn an_own_datagram_routed_back_into_the_tunnel_is_dropped_as_a_routing_loop() {
    let mut pair = Pair::new();
    pair.handshake();
    let b = pair.a.peer;
    pair.a.core.set_listen_port(a_addr().port());
    let std::net::IpAddr::V4(endpoint_ip) = b_addr().ip() else {
        panic!("B's test address is IPv4");
    };
    pair.a
        .core
        .add_allowed_ip(b, net(&format!("{endpoint_ip}/32")));
    let with_ports = |sport: u16, dport: u16| {
        let mut p = ipv4_udp(A_V4, endpoint_ip, b"looped");
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    };
    let own = with_ports(a_addr().port(), b_addr().port());
    assert_eq!(
        pair.send(Side::A, &own),
        Action::Drop(DropReason::RoutingLoop)
    );
    assert_eq!(pair.a.peer_drops(DropReason::RoutingLoop), 1);
    for other in [
        with_ports(a_addr().port() + 1, b_addr().port()),
        with_ports(a_addr().port(), b_addr().port() + 1),
    ] {
        assert!(matches!(
            pair.send(Side::A, &other),
            Action::ToNetwork { .. }
        ));
    }
}
