//! The sans-IO WireGuard core: peers, cryptokey routing, handshake dispatch, timers, roaming
//! and drop accounting. Bytes and time go in, actions come out; there is no socket, no TUN
//! device, no clock and no thread in here, so two cores can be wired together in memory and a
//! test can fast-forward minutes of timers in microseconds.
//!
//! The Noise state machine is boringtun's `noise::Tunn`. boringtun reads its own clock
//! internally; we build it with `mock-instant`, which makes that clock a thread-local value, and
//! set it from the `now` passed to every entry point (`enter`). The core's clock only moves
//! forward, so boringtun never sees time run backwards even when two threads pass slightly
//! different `now`s.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use komnet_proto::limit::{Bucket, Budget};
use mock_instant::MockClock;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::allowed_ips::AllowedIps;
use crate::cookie::{Admission, CookieGuard, HandshakeLimits};
use crate::packet::{IpHeader, WireMessage, DATA_OVERHEAD, HANDSHAKE_INIT_LEN};

/// How often `update_timers` wants to run: boringtun's timers are designed for a ~250 ms tick.
pub const TIMER_INTERVAL: Duration = Duration::from_millis(250);
/// Peers a core can hold: slot numbers are 16 bits of boringtun's 24-bit peer index.
pub const MAX_PEERS: usize = 1 << 16;
/// boringtun's mock clock starts here rather than at zero, so that its `Instant - Duration`
/// arithmetic can never underflow.
const MOCK_CLOCK_ORIGIN: Duration = Duration::from_secs(24 * 3600);
/// The smallest output buffer `handle_tun_packet` and `update_timers` can always fill.
pub const MIN_OUT_BUF: usize = HANDSHAKE_INIT_LEN;
/// The largest datagram the core produces: a 65,535-byte IP packet (the largest a TUN device
/// takes) plus WireGuard's 32 bytes.
pub const MAX_DATAGRAM: usize = u16::MAX as usize + DATA_OVERHEAD;
/// Data packets are padded to a multiple of this (WireGuard paper, section 5.4.6).
pub const PADDING_MULTIPLE: usize = 16;
/// ICMP unreachable answers per second at most (the kernel's default `icmp_msgs_per_sec`).
pub const ICMP_PER_SECOND: u32 = 1000;
const ICMP_BUDGET: Budget = Budget::per_second(ICMP_PER_SECOND, ICMP_PER_SECOND);

/// Zero bytes to append to an inner packet of `len` bytes on an interface of MTU `mtu` (0:
/// unknown): up to the next multiple of 16, never past the MTU. The kernel's rule, so inner
/// lengths leak only to 16 bytes and `wg show transfer` matches every other implementation.
pub fn padding_len(len: usize, mtu: usize) -> usize {
    if mtu == 0 {
        return len.next_multiple_of(PADDING_MULTIPLE) - len;
    }
    let last = if len > mtu { len % mtu } else { len };
    last.next_multiple_of(PADDING_MULTIPLE)
        .min(mtu)
        .saturating_sub(last)
}

/// Whether `packet`, read from the TUN device and routed to a peer whose endpoint is
/// `endpoint`, is a UDP datagram from our listen port to exactly that endpoint: one of our own
/// encrypted datagrams, which the host routed into the tunnel because the endpoint lies in the
/// peer's own allowed IPs. Encrypting it again would send it round for ever, a little larger
/// each time and, once fragmented, in more and more pieces; the kernel's WireGuard refuses
/// such sends too ("Avoiding routing loop", ELOOP). A first IPv4/IPv6 fragment is recognised
/// as well; later fragments carry no ports, and die with the first. A few byte compares.
#[inline]
fn is_own_datagram(packet: &[u8], listen_port: u16, endpoint: SocketAddr) -> bool {
    let udp = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let first_fragment = packet
                .get(6..8)
                .is_some_and(|f| f[0] & 0x1f == 0 && f[1] == 0);
            if packet.get(9) != Some(&crate::packet::proto::UDP) || !first_fragment {
                return false;
            }
            ihl
        }
        Some(6) => match packet.get(6) {
            Some(&crate::packet::proto::UDP) => 40,
            // A fragment header: the first fragment (offset 0) of a UDP datagram.
            Some(44) => match packet.get(40..44) {
                Some(&[crate::packet::proto::UDP, _, hi, lo]) if hi == 0 && lo & 0xf8 == 0 => 48,
                _ => return false,
            },
            _ => return false,
        },
        _ => return false,
    };
    let Some(ports) = packet.get(udp..udp + 4) else {
        return false;
    };
    ports[..2] == listen_port.to_be_bytes() && ports[2..] == endpoint.port().to_be_bytes()
}

/// A peer's handle: a slot number and a generation, packed into the 24-bit index boringtun
/// puts in the top bits of every session index, so an incoming message's receiver index leads
/// straight to its peer (`index >> 8`) without hashing a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u32);

impl PeerId {
    fn new(slot: u16, generation: u8) -> Self {
        Self(u32::from(generation) << 16 | u32::from(slot))
    }
    pub(crate) fn slot(self) -> usize {
        (self.0 & 0xffff) as usize
    }
}

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal: $doc:literal,)*) => {
        /// Why the core refused a packet. Every refusal is counted per peer (or for the device
        /// when no peer could be attributed) under one of these names.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason { $(#[doc = $doc] $variant,)* }
        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            /// The stable, snake_case name used in logs and metrics.
            pub fn as_str(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

drop_reasons! {
    Malformed => "malformed": "Not a WireGuard message: wrong type, reserved bits or length.",
    NoPrivateKey => "no_private_key": "The device has no private key yet.",
    LowOrderKey => "low_order_key": "The peer's public key is a low-order point: no handshake is ever made with it.",
    InvalidMac => "invalid_mac": "Handshake MAC1 does not match our public key.",
    CookieRequired => "cookie_required": "Handshake without a valid cookie under load: a cookie reply was sent instead.",
    RateLimited => "rate_limited": "Handshake over its source's rate limit.",
    UnknownPeer => "unknown_peer": "Handshake from a static key that is not a configured peer.",
    UnknownIndex => "unknown_index": "Receiver index of no current peer.",
    HandshakeFailed => "handshake_failed": "Handshake that failed to authenticate or was replayed (stale timestamp).",
    NoSession => "no_session": "Data for a session we do not (or no longer) have.",
    Replay => "replay": "Data counter already seen or too old (replay window).",
    DecryptFailed => "decrypt_failed": "Data failed authentication (AEAD tag).",
    InvalidInnerPacket => "invalid_inner_packet": "Decrypted or outgoing payload is not a well-formed IP packet.",
    SpoofedSource => "spoofed_source": "Decrypted packet whose source is not in the sending peer's allowed IPs.",
    NoRoute => "no_route": "Outgoing packet whose destination is in no peer's allowed IPs.",
    NoEndpoint => "no_endpoint": "Outgoing packet for a peer without a known endpoint.",
    RoutingLoop => "routing_loop": "Outgoing packet that is one of our own datagrams to the peer's endpoint: the endpoint is routed through the tunnel itself.",
    BufferTooSmall => "buffer_too_small": "The output buffer cannot hold the result.",
    Expired => "expired": "The peer's keys expired after REJECT_AFTER_TIME * 3 without a new handshake.",
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A counter per drop reason.
#[derive(Debug, Clone, Default)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    fn add(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// What the driver must do with the bytes the core wrote into its output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send `out[offset..offset + len]` as one UDP datagram to `dst`, from `src_ip` when it is
    /// set (the peer's sticky source address, see [`Core::forget_source_ip`]).
    ToNetwork {
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
        offset: usize,
        len: usize,
    },
    /// Write the IP packet `out[offset..offset + len]` to the TUN device.
    ToTun {
        peer: PeerId,
        offset: usize,
        len: usize,
    },
    /// Refused for `reason` (and counted), and answered: write the ICMP/ICMPv6 "host
    /// unreachable" `out[offset..offset + len]` to the TUN device, toward the packet's sender.
    Unreachable {
        reason: DropReason,
        offset: usize,
        len: usize,
    },
    /// Handled; nothing to send (a keepalive, a cookie, a packet queued for a handshake).
    Nothing,
    /// Refused, and counted under this reason.
    Drop(DropReason),
}

/// A datagram the core queued outside a direct answer (timers, a finished handshake): see
/// [`Core::drain_pending`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub dst: SocketAddr,
    /// Our address to send from (the peer's sticky source), if known.
    pub src_ip: Option<IpAddr>,
    pub bytes: Vec<u8>,
}

/// A peer as `wg show` and the UAPI `get` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: PeerId,
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub allowed_ips: Vec<IpNet>,
}

struct DeviceKey {
    secret: StaticSecret,
    public: PublicKey,
    guard: CookieGuard,
    /// Shared by all `Tunn`s only because boringtun requires one; its limit is set so high it
    /// never engages: `CookieGuard` does the rate limiting, per source.
    tunn_limiter: Arc<RateLimiter>,
}

struct Peer {
    id: PeerId,
    public_key: [u8; 32],
    preshared_key: Option<[u8; 32]>,
    endpoint: Option<SocketAddr>,
    /// Our own address the peer's last authenticated datagram was sent to: replies and
    /// everything else for the peer go out from it ("sticky source", as the kernel's
    /// WireGuard does), so on a multi-homed host the peer, its NAT and its firewalls see
    /// answers from the address they talk to. `None` until learnt, after an endpoint is set
    /// by configuration, and after sending from it failed or went unanswered.
    local_ip: Option<IpAddr>,
    /// A handshake initiation went out and no response came back yet: a further initiation
    /// from the timers is a retransmission.
    init_unanswered: bool,
    persistent_keepalive: Option<u16>,
    /// None while the device has no private key.
    tunn: Option<Box<Tunn>>,
    rx_bytes: u64,
    tx_bytes: u64,
    /// Core time of the last datagram sent to this peer, for persistent keepalive.
    last_sent: Duration,
    /// Core time of the last completed handshake; kept when the session state is dropped.
    handshake_at: Option<Duration>,
    /// boringtun may hold packets queued while a handshake runs; they go out once a session
    /// is usable (see `decapsulate`).
    queued: bool,
    /// The peer's public key is a low-order point (the static-static Diffie-Hellman with our
    /// key is all zeros): like the kernel and wireguard-go we never handshake with it, since
    /// the handshake would prove nothing and each initiation would show our identity.
    low_order: bool,
    drops: DropCounters,
}

#[derive(Default)]
struct Slot {
    generation: u8,
    peer: Option<Peer>,
}

/// The device: private key, peers, allowed IPs, and the Noise state of every peer.
pub struct Core {
    epoch: Instant,
    last_now: Instant,
    clock: Duration,
    rng: StdRng,
    limits: HandshakeLimits,
    key: Option<DeviceKey>,
    listen_port: u16,
    fwmark: u32,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    by_key: HashMap<[u8; 32], PeerId>,
    allowed_ips: AllowedIps,
    /// Datagrams produced outside a direct answer (timers, packets queued during a
    /// handshake); drained with `poll_transmit`.
    pending: VecDeque<Queued>,
    scratch: Vec<u8>,
    /// The tunnel interface's MTU, for padding (0 until the driver learns it).
    mtu: usize,
    /// ICMP unreachable answers: at most `ICMP_PER_SECOND` a second (and as many at once), as
    /// the kernel's `icmp_msgs_per_sec`; in core time.
    icmp: Bucket,
    device_drops: DropCounters,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("peers", &self.by_key.len())
            .field("listen_port", &self.listen_port)
            .field("has_private_key", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

fn drop_reason(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replay,
        WireGuardError::InvalidAeadTag => DropReason::DecryptFailed,
        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => DropReason::NoSession,
        WireGuardError::InvalidMac => DropReason::InvalidMac,
        WireGuardError::UnderLoad => DropReason::RateLimited,
        WireGuardError::ConnectionExpired => DropReason::Expired,
        WireGuardError::DestinationBufferTooSmall => DropReason::BufferTooSmall,
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
            DropReason::InvalidInnerPacket
        }
        WireGuardError::WrongPacketType => DropReason::Malformed,
        WireGuardError::UnexpectedPacket
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::LockFailed => DropReason::HandshakeFailed,
    }
}

/// The peer's Noise state, created on first use (a packet to send, a handshake received, a
/// keepalive due). A `Tunn` is ~11 KiB (eight inline session slots); an idle configured peer
/// without one costs a few hundred bytes, which keeps 1,000 idle peers within 5 MiB.
fn tunn_of<'a>(key: &Option<DeviceKey>, peer: &'a mut Peer) -> Result<&'a mut Tunn, DropReason> {
    if peer.low_order {
        return Err(DropReason::LowOrderKey);
    }
    if peer.tunn.is_none() {
        let k = key.as_ref().ok_or(DropReason::NoPrivateKey)?;
        peer.tunn = Some(Box::new(Tunn::new(
            k.secret.clone(),
            PublicKey::from(peer.public_key),
            peer.preshared_key,
            // Persistent keepalive is ours (see `update_timers`), so it can change without
            // tearing down the session.
            None,
            peer.id.0,
            Some(k.tunn_limiter.clone()),
        )));
    }
    peer.tunn.as_deref_mut().ok_or(DropReason::NoPrivateKey)
}

/// Clamps a Curve25519 private key as RFC 7748 section 5 does before use. The kernel and
/// wireguard-go store and show the key clamped; so do we.
pub fn clamp_private_key(mut key: [u8; 32]) -> [u8; 32] {
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
    key
}

/// Whether the static-static Diffie-Hellman of `secret` with `peer_public` is all zeros (the
/// peer's key is a low-order point).
fn is_low_order(secret: &StaticSecret, peer_public: &[u8; 32]) -> bool {
    !secret
        .diffie_hellman(&PublicKey::from(*peer_public))
        .was_contributory()
}

/// Records when the peer's current session was established (boringtun only knows "how long
/// ago", and forgets once the session is gone).
fn note_handshake(peer: &mut Peer, clock: Duration) {
    if let Some(since) = peer
        .tunn
        .as_ref()
        .and_then(|t| t.time_since_last_handshake())
    {
        peer.handshake_at = Some(clock.saturating_sub(since));
    }
}

fn peer_in(slots: &mut [Slot], id: PeerId) -> Option<&mut Peer> {
    slots
        .get_mut(id.slot())?
        .peer
        .as_mut()
        .filter(|p| p.id == id)
}

fn offset_in(base: usize, part: &[u8]) -> usize {
    // `part` is a sub-slice boringtun returned from the output buffer starting at address
    // `base`; its distance from the start is the offset. Only addresses are compared.
    (part.as_ptr() as usize).saturating_sub(base)
}

impl Core {
    /// A core with no key and no peers. `now` anchors the core's clock; `seed` feeds the RNG
    /// used for cookie secrets and nonces (pass OS randomness outside tests).
    pub fn new(now: Instant, seed: [u8; 32]) -> Self {
        Self::with_limits(now, seed, HandshakeLimits::default())
    }

    pub fn with_limits(now: Instant, seed: [u8; 32], limits: HandshakeLimits) -> Self {
        Self {
            epoch: now,
            last_now: now,
            clock: Duration::ZERO,
            rng: StdRng::from_seed(seed),
            limits,
            key: None,
            listen_port: 0,
            fwmark: 0,
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_key: HashMap::new(),
            allowed_ips: AllowedIps::default(),
            pending: VecDeque::new(),
            // Zeroed pages are mapped lazily: only what large packets touch costs memory.
            scratch: vec![0; MAX_DATAGRAM],
            mtu: 0,
            icmp: ICMP_BUDGET.full(Duration::ZERO),
            device_drops: DropCounters::default(),
        }
    }

    /// Moves the core clock to `now` (never backwards) and hands it to boringtun.
    #[inline]
    fn enter(&mut self, now: Instant) {
        // A driver passes one `now` for a whole batch: skip the subtraction when it repeats.
        if now != self.last_now {
            self.last_now = now;
            let t = now.saturating_duration_since(self.epoch);
            if t > self.clock {
                self.clock = t;
            }
        }
        // Always: the clock is per thread, and another thread may have moved the core's.
        MockClock::set_time(MOCK_CLOCK_ORIGIN + self.clock);
    }

    fn peer(&self, id: PeerId) -> Option<&Peer> {
        self.slots
            .get(id.slot())?
            .peer
            .as_ref()
            .filter(|p| p.id == id)
    }

    fn peer_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        peer_in(&mut self.slots, id)
    }

    // ---- configuration -------------------------------------------------------------------

    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| k.public.to_bytes())
    }

    pub fn private_key(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| k.secret.to_bytes())
    }

    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    pub fn set_listen_port(&mut self, port: u16) {
        self.listen_port = port;
    }

    /// The tunnel interface's MTU, which bounds the padding of data packets.
    pub fn set_mtu(&mut self, mtu: u32) {
        self.mtu = mtu as usize;
    }

    pub fn mtu(&self) -> u32 {
        self.mtu as u32
    }

    pub fn fwmark(&self) -> u32 {
        self.fwmark
    }

    pub fn set_fwmark(&mut self, mark: u32) {
        self.fwmark = mark;
    }

    /// Sets (or with `None` removes) the device's private key, clamped. All sessions restart. A
    /// peer with our own public key is removed, as wireguard-go does.
    pub fn set_private_key(&mut self, now: Instant, key: Option<[u8; 32]>) {
        self.enter(now);
        let key = key.map(clamp_private_key);
        if key.is_some() && key == self.private_key() {
            return;
        }
        self.key = key.map(|k| {
            let secret = StaticSecret::from(k);
            let public = PublicKey::from(&secret);
            DeviceKey {
                guard: CookieGuard::new(public.as_bytes(), self.limits, &mut self.rng),
                tunn_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
                secret,
                public,
            }
        });
        if let Some(own) = self.public_key() {
            if let Some(id) = self.by_key.get(&own).copied() {
                self.remove_peer(id);
            }
        }
        let ids: Vec<PeerId> = self.by_key.values().copied().collect();
        for id in ids {
            self.rebuild_tunn(id);
        }
    }

    /// Forgets the peer's Noise state (keys or pre-shared key changed); `tunn_of` builds a
    /// fresh one on next use.
    fn rebuild_tunn(&mut self, id: PeerId) {
        let Some(peer) = peer_in(&mut self.slots, id) else {
            return;
        };
        peer.tunn = None;
        peer.queued = false;
        peer.init_unanswered = false;
        let low_order = self
            .key
            .as_ref()
            .is_some_and(|k| is_low_order(&k.secret, &peer.public_key));
        if low_order && !peer.low_order {
            tracing::warn!(
                peer = %base64::Engine::encode(&base64::engine::general_purpose::STANDARD, peer.public_key),
                "peer's public key is a low-order point; refusing to handshake with it"
            );
        }
        peer.low_order = low_order;
    }

    pub fn peer_id(&self, public_key: &[u8; 32]) -> Option<PeerId> {
        self.by_key.get(public_key).copied()
    }

    /// The peer with this public key, created if it does not exist yet. `None` when the core
    /// is full (`MAX_PEERS`).
    pub fn upsert_peer(&mut self, now: Instant, public_key: [u8; 32]) -> Option<PeerId> {
        self.enter(now);
        if let Some(id) = self.peer_id(&public_key) {
            return Some(id);
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.slots.len() < MAX_PEERS => {
                self.slots.push(Slot::default());
                u16::try_from(self.slots.len() - 1).ok()?
            }
            None => return None,
        };
        let s = &mut self.slots[usize::from(slot)];
        let id = PeerId::new(slot, s.generation);
        s.peer = Some(Peer {
            id,
            public_key,
            preshared_key: None,
            endpoint: None,
            local_ip: None,
            init_unanswered: false,
            persistent_keepalive: None,
            tunn: None,
            rx_bytes: 0,
            tx_bytes: 0,
            last_sent: self.clock,
            handshake_at: None,
            queued: false,
            low_order: false,
            drops: DropCounters::default(),
        });
        self.by_key.insert(public_key, id);
        self.rebuild_tunn(id);
        Some(id)
    }

    /// Removes a peer, its allowed IPs and its keys.
    pub fn remove_peer(&mut self, id: PeerId) {
        let Some(slot) = self.slots.get_mut(id.slot()) else {
            return;
        };
        let Some(peer) = slot.peer.take_if(|p| p.id == id) else {
            return;
        };
        slot.generation = slot.generation.wrapping_add(1);
        self.by_key.remove(&peer.public_key);
        self.allowed_ips.remove_peer(id);
        self.free_slots.push(id.slot() as u16);
        self.pending.retain(|q| Some(q.dst) != peer.endpoint);
    }

    pub fn remove_all_peers(&mut self) {
        let ids: Vec<PeerId> = self.by_key.values().copied().collect();
        for id in ids {
            self.remove_peer(id);
        }
    }

    /// Sets or clears the preshared key; a change restarts the peer's sessions.
    pub fn set_preshared_key(&mut self, id: PeerId, psk: Option<[u8; 32]>) {
        let psk = psk.filter(|k| k != &[0; 32]);
        let Some(peer) = self.peer_mut(id) else {
            return;
        };
        if peer.preshared_key != psk {
            peer.preshared_key = psk;
            self.rebuild_tunn(id);
        }
    }

    /// Sets the peer's endpoint. The sticky source address is forgotten, as the kernel does:
    /// the route to a configured endpoint picks the source until the peer speaks.
    pub fn set_endpoint(&mut self, id: PeerId, endpoint: SocketAddr) {
        if let Some(peer) = self.peer_mut(id) {
            peer.endpoint = Some(endpoint);
            peer.local_ip = None;
        }
    }

    /// The sticky source address of the peer: our address its last authenticated datagram
    /// was sent to, which the core asks the driver to send from.
    pub fn source_ip(&self, id: PeerId) -> Option<IpAddr> {
        self.peer(id)?.local_ip
    }

    /// Forgets `ip` as a sticky source address of every peer: the driver calls this when
    /// sending from it failed because the host no longer has that address (ENETUNREACH,
    /// EINVAL), and sends again without a source. The kernel does the same ("not too
    /// sticky"). Walks all peers, which is fine for an error that comes once per lost address.
    pub fn forget_source_ip(&mut self, ip: IpAddr) {
        for slot in &mut self.slots {
            if let Some(peer) = slot.peer.as_mut().filter(|p| p.local_ip == Some(ip)) {
                peer.local_ip = None;
            }
        }
        for q in &mut self.pending {
            if q.src_ip == Some(ip) {
                q.src_ip = None;
            }
        }
    }

    /// Sets the persistent keepalive interval (0 or `None`: off). Turning it on sends a
    /// keepalive at once, as wireguard-go does, so a peer behind NAT becomes reachable.
    pub fn set_persistent_keepalive(&mut self, now: Instant, id: PeerId, secs: Option<u16>) {
        self.enter(now);
        let secs = secs.filter(|s| *s > 0);
        let Some(peer) = self.peer_mut(id) else {
            return;
        };
        let was = peer.persistent_keepalive;
        peer.persistent_keepalive = secs;
        if secs.is_some() && secs != was {
            self.send_keepalive(id);
        }
    }

    pub fn clear_allowed_ips(&mut self, id: PeerId) {
        self.allowed_ips.remove_peer(id);
    }

    pub fn add_allowed_ip(&mut self, id: PeerId, net: IpNet) {
        if self.peer(id).is_some() {
            self.allowed_ips.insert(net, id);
        }
    }

    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    /// Peers that currently hold Noise state (a session or a handshake in progress); the rest
    /// are configured but idle, or their keys expired and were freed.
    pub fn peers_with_state(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.peer.as_ref().is_some_and(|p| p.tunn.is_some()))
            .count()
    }

    /// Every peer, ordered by public key so output is stable. `wall` is the current Unix time:
    /// boringtun only knows how long ago a handshake was, `wg` wants when.
    pub fn peers(&mut self, now: Instant, wall: SystemTime) -> Vec<PeerInfo> {
        self.enter(now);
        let mut ids: Vec<(&[u8; 32], &PeerId)> = self.by_key.iter().collect();
        ids.sort();
        let ids: Vec<PeerId> = ids.into_iter().map(|(_, id)| *id).collect();
        let clock = self.clock;
        // One pass over the table, not one per peer: `wg show` on a hub with a thousand peers
        // must not hold the core (and so the packet path) for long.
        let mut prefixes: HashMap<PeerId, Vec<IpNet>> = HashMap::new();
        for (net, owner) in self.allowed_ips.iter() {
            prefixes.entry(owner).or_default().push(net);
        }
        ids.into_iter()
            .filter_map(|id| {
                let allowed_ips = prefixes.remove(&id).unwrap_or_default();
                let peer = self.peer_mut(id)?;
                note_handshake(peer, clock);
                let last_handshake = peer
                    .handshake_at
                    .and_then(|at| wall.checked_sub(clock.saturating_sub(at)));
                Some(PeerInfo {
                    id,
                    public_key: peer.public_key,
                    preshared_key: peer.preshared_key,
                    endpoint: peer.endpoint,
                    persistent_keepalive: peer.persistent_keepalive,
                    last_handshake,
                    rx_bytes: peer.rx_bytes,
                    tx_bytes: peer.tx_bytes,
                    allowed_ips,
                })
            })
            .collect()
    }

    /// Drop counters of one peer.
    pub fn peer_drops(&self, id: PeerId) -> Option<&DropCounters> {
        self.peer(id).map(|p| &p.drops)
    }

    /// Drops no peer could be blamed for (malformed datagrams, unknown indices, no route).
    pub fn device_drops(&self) -> &DropCounters {
        &self.device_drops
    }

    // ---- packet path ---------------------------------------------------------------------

    fn device_drop(&mut self, reason: DropReason) -> Action {
        self.device_drops.add(reason);
        Action::Drop(reason)
    }

    /// Counts `reason` and, within the rate limit, answers `packet` with an ICMP unreachable
    /// written into `out`, as the kernel's WireGuard does for packets it cannot send.
    fn unreachable(
        &mut self,
        id: Option<PeerId>,
        reason: DropReason,
        packet: &[u8],
        out: &mut [u8],
    ) -> Action {
        let dropped = match id {
            Some(id) => self.peer_drop(id, reason),
            None => self.device_drop(reason),
        };
        if !ICMP_BUDGET.has(&self.icmp, self.clock) {
            return dropped;
        }
        match crate::unreachable::answer(packet, out) {
            Some(len) => {
                ICMP_BUDGET.take(&mut self.icmp, self.clock);
                Action::Unreachable {
                    reason,
                    offset: 0,
                    len,
                }
            }
            None => dropped,
        }
    }

    fn peer_drop(&mut self, id: PeerId, reason: DropReason) -> Action {
        match self.peer_mut(id) {
            Some(p) => p.drops.add(reason),
            None => self.device_drops.add(reason),
        }
        Action::Drop(reason)
    }

    /// An IP packet read from the TUN device: route it by destination to a peer, pad it and
    /// encrypt it into `out`. `out` must hold `packet.len() + 48` and at least `MIN_OUT_BUF`
    /// bytes. The packet is copied for the padding; the driver's path is
    /// [`Core::handle_tun_buffer`], which pads in place.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8], out: &mut [u8]) -> Action {
        let mut scratch = std::mem::take(&mut self.scratch);
        let len = packet.len().min(scratch.len() - PADDING_MULTIPLE);
        scratch[..len].copy_from_slice(&packet[..len]);
        let action = if len == packet.len() {
            self.handle_tun_buffer(now, &mut scratch, len, out)
        } else {
            self.enter(now);
            self.device_drop(DropReason::InvalidInnerPacket)
        };
        self.scratch = scratch;
        action
    }

    /// [`Core::handle_tun_packet`] for a packet in `buf[..len]`; the zero padding is written
    /// into `buf` behind it when `buf` has the room (else the packet goes unpadded, as the
    /// kernel does when it cannot grow a buffer).
    #[inline]
    pub fn handle_tun_buffer(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        len: usize,
        out: &mut [u8],
    ) -> Action {
        self.enter(now);
        let Some(packet) = buf.get(..len) else {
            return self.device_drop(DropReason::BufferTooSmall);
        };
        let Some(header) = IpHeader::parse(packet) else {
            return self.device_drop(DropReason::InvalidInnerPacket);
        };
        // Route before encrypting: boringtun's `encapsulate` would start a handshake for any
        // packet, including link-local chatter meant for nobody.
        let total = header.total_len;
        let Some(id) = self.allowed_ips.lookup(header.dst) else {
            return self.unreachable(None, DropReason::NoRoute, &buf[..total], out);
        };
        let pad = padding_len(total, self.mtu);
        let padded = if buf.len() >= total + pad {
            buf[total..total + pad].fill(0);
            total + pad
        } else {
            total
        };
        if out.len() < (padded + DATA_OVERHEAD).max(MIN_OUT_BUF) {
            return self.peer_drop(id, DropReason::BufferTooSmall);
        }
        let clock = self.clock;
        let Some(peer) = peer_in(&mut self.slots, id) else {
            return self.device_drop(DropReason::NoRoute);
        };
        let Some(endpoint) = peer.endpoint else {
            return self.unreachable(Some(id), DropReason::NoEndpoint, &buf[..total], out);
        };
        // The destination address is the endpoint's already (that is how it was routed here).
        if header.dst == endpoint.ip() && is_own_datagram(&buf[..total], self.listen_port, endpoint)
        {
            return self.peer_drop(id, DropReason::RoutingLoop);
        }
        let tunn = match tunn_of(&self.key, peer) {
            Ok(tunn) => tunn,
            Err(reason) => return self.peer_drop(id, reason),
        };
        let base = out.as_ptr() as usize;
        match tunn.encapsulate(&buf[..padded], out) {
            TunnResult::WriteToNetwork(b) => {
                let (offset, len) = (offset_in(base, b), b.len());
                // Anything but a data message means boringtun queued the packet and started
                // (or is waiting for) a handshake.
                if b.first() != Some(&4) {
                    peer.queued = true;
                    peer.init_unanswered |= b.first() == Some(&1);
                }
                peer.tx_bytes += len as u64;
                peer.last_sent = clock;
                Action::ToNetwork {
                    dst: endpoint,
                    src_ip: peer.local_ip,
                    offset,
                    len,
                }
            }
            TunnResult::Err(e) => self.peer_drop(id, drop_reason(&e)),
            _ => {
                peer.queued = true;
                Action::Nothing
            }
        }
    }

    /// A UDP datagram from `src` to our address `local_ip` (`None` where the driver cannot
    /// tell): handshake messages are checked (MAC1, cookie, per-source limit) and dispatched by
    /// the sender's static key, everything else by receiver index. Decrypted packets whose
    /// source is not in the sender's allowed IPs are dropped. An authenticated datagram teaches
    /// the peer's endpoint and our address it used (its sticky source). `out` must be at least
    /// as long as `datagram` (and `MIN_OUT_BUF`).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        src: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        self.enter(now);
        let Some(msg) = WireMessage::parse(datagram) else {
            return self.device_drop(DropReason::Malformed);
        };
        if out.len() < datagram.len().max(MIN_OUT_BUF) {
            return self.device_drop(DropReason::BufferTooSmall);
        }
        let clock = self.clock;
        let Some(key) = self.key.as_mut() else {
            return self.device_drop(DropReason::NoPrivateKey);
        };
        let id = match msg {
            WireMessage::HandshakeInit { sender }
            | WireMessage::HandshakeResponse { sender, .. } => {
                match key
                    .guard
                    .admit(clock, src, datagram, sender, &mut self.rng, out)
                {
                    Admission::Accept => {}
                    Admission::BadMac1 => return self.device_drop(DropReason::InvalidMac),
                    Admission::RateLimited => return self.device_drop(DropReason::RateLimited),
                    Admission::SendCookie(len) => {
                        self.device_drops.add(DropReason::CookieRequired);
                        return Action::ToNetwork {
                            dst: src,
                            src_ip: local_ip,
                            offset: 0,
                            len,
                        };
                    }
                }
                match msg {
                    WireMessage::HandshakeResponse { receiver, .. } => self.id_by_index(receiver),
                    _ => {
                        let Ok(Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(datagram)
                        else {
                            return self.device_drop(DropReason::Malformed);
                        };
                        match parse_handshake_anon(&key.secret, &key.public, &init) {
                            Ok(half) => match self.by_key.get(&half.peer_static_public) {
                                Some(id) => Some(*id),
                                None => return self.device_drop(DropReason::UnknownPeer),
                            },
                            Err(_) => return self.device_drop(DropReason::HandshakeFailed),
                        }
                    }
                }
            }
            WireMessage::CookieReply { receiver } | WireMessage::Data { receiver } => {
                self.id_by_index(receiver)
            }
        };
        let Some(id) = id else {
            return self.device_drop(DropReason::UnknownIndex);
        };
        self.decapsulate(id, src, local_ip, datagram, out)
    }

    /// The peer whose allowed IPs contain `addr`: where a packet to it would be sent.
    #[inline]
    pub fn route(&self, addr: IpAddr) -> Option<PeerId> {
        self.allowed_ips.lookup(addr)
    }

    fn id_by_index(&self, receiver: u32) -> Option<PeerId> {
        let id = PeerId(receiver >> 8);
        self.peer(id).map(|p| p.id)
    }

    fn decapsulate(
        &mut self,
        id: PeerId,
        src: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        let Some(peer) = peer_in(&mut self.slots, id) else {
            return self.device_drop(DropReason::UnknownIndex);
        };
        // Only an initiation may create the Noise state; anything else for a peer without one
        // refers to a session that does not exist.
        let tunn = if datagram.first() == Some(&1) {
            tunn_of(&self.key, peer)
        } else {
            peer.tunn.as_deref_mut().ok_or(DropReason::NoSession)
        };
        let tunn = match tunn {
            Ok(tunn) => tunn,
            Err(reason) => return self.peer_drop(id, reason),
        };
        let is_data = datagram.first() == Some(&4);
        let is_response = datagram.first() == Some(&2);
        let base = out.as_ptr() as usize;
        let result = tunn.decapsulate(Some(src.ip()), datagram, out);
        let (inner, reply) = match result {
            TunnResult::WriteToTunnelV4(p, a) => {
                (Some((offset_in(base, p), p.len(), IpAddr::V4(a))), None)
            }
            TunnResult::WriteToTunnelV6(p, a) => {
                (Some((offset_in(base, p), p.len(), IpAddr::V6(a))), None)
            }
            TunnResult::WriteToNetwork(b) => (None, Some((offset_in(base, b), b.len()))),
            TunnResult::Done => (None, None),
            TunnResult::Err(e) => return self.peer_drop(id, drop_reason(&e)),
        };
        // Authenticated: the peer may have roamed (WireGuard paper, section 2.1). A cookie
        // reply proves nothing about the sender's address, so it does not move the endpoint.
        // The endpoint is learnt before the inner source is checked, as the kernel does: the
        // datagram is the peer's even when the packet inside is one it may not send.
        // Our address it came to becomes the peer's source address (sticky source), learnt
        // from the same datagrams as the endpoint, as the kernel does.
        let roams = inner.is_some() || reply.is_some() || is_data;
        if let Some(peer) = self.peer_mut(id) {
            if roams {
                peer.endpoint = Some(src);
                peer.local_ip = local_ip;
            }
            if is_response {
                peer.init_unanswered = false;
            }
        }
        if let Some((_, _, inner_src)) = inner {
            if self.allowed_ips.lookup(inner_src) != Some(id) {
                return self.peer_drop(id, DropReason::SpoofedSource);
            }
        }
        let Some(peer) = self.peer_mut(id) else {
            return Action::Nothing;
        };
        if roams {
            peer.rx_bytes += datagram.len() as u64;
        }
        // Queued packets can go once boringtun has a current session: as initiator after the
        // response, as responder after the first data packet (boringtun switches to a
        // responder's session only then; flushing earlier would start a second handshake).
        if peer.queued && (is_data || is_response) {
            peer.queued = false;
            self.flush_queued(id);
        }
        let Some(peer) = self.peer_mut(id) else {
            return Action::Nothing;
        };
        if let Some((offset, len, _)) = inner {
            return Action::ToTun {
                peer: id,
                offset,
                len,
            };
        }
        let Some((offset, len)) = reply else {
            return Action::Nothing;
        };
        peer.tx_bytes += len as u64;
        Action::ToNetwork {
            dst: src,
            src_ip: local_ip,
            offset,
            len,
        }
    }

    fn flush_queued(&mut self, id: PeerId) {
        let clock = self.clock;
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Some(peer) = peer_in(&mut self.slots, id) {
            if let (Some(tunn), Some(dst)) = (peer.tunn.as_deref_mut(), peer.endpoint) {
                while let TunnResult::WriteToNetwork(b) = tunn.decapsulate(None, &[], &mut scratch)
                {
                    peer.tx_bytes += b.len() as u64;
                    peer.last_sent = clock;
                    self.pending.push_back(Queued {
                        dst,
                        src_ip: peer.local_ip,
                        bytes: b.to_vec(),
                    });
                }
            }
        }
        self.scratch = scratch;
    }

    /// Starts a new handshake with the peer now, whatever state its session is in: a spoke
    /// calls this when its hub fell silent (the hub may have restarted and forgotten the
    /// session, which WireGuard's own timers would notice only after 15 s or more).
    pub fn force_handshake(&mut self, now: Instant, id: PeerId) {
        self.enter(now);
        self.send_with(id, |tunn, buf| tunn.format_handshake_initiation(buf, true));
    }

    fn send_keepalive(&mut self, id: PeerId) {
        self.send_with(id, |tunn, buf| tunn.encapsulate(&[], buf));
    }

    /// Runs `op` on the peer's Noise state (created if needed) and queues the datagram it
    /// produces for `poll_transmit`.
    fn send_with(
        &mut self,
        id: PeerId,
        op: impl for<'b> FnOnce(&mut Tunn, &'b mut [u8]) -> TunnResult<'b>,
    ) {
        let clock = self.clock;
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Some(peer) = peer_in(&mut self.slots, id) {
            if let Some(dst) = peer.endpoint {
                let sent = match tunn_of(&self.key, peer) {
                    Ok(tunn) => match op(tunn, &mut scratch) {
                        TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
                        _ => None,
                    },
                    Err(_) => None,
                };
                if let Some(bytes) = sent {
                    peer.tx_bytes += bytes.len() as u64;
                    peer.last_sent = clock;
                    peer.init_unanswered |= bytes.first() == Some(&1);
                    self.pending.push_back(Queued {
                        dst,
                        src_ip: peer.local_ip,
                        bytes,
                    });
                }
            }
        }
        self.scratch = scratch;
    }

    /// Runs every peer's timers (handshake retries, rekey, keepalives, session expiry and key
    /// zeroing) at `now`. What they want to send is queued for `poll_transmit`.
    pub fn update_timers(&mut self, now: Instant) {
        self.enter(now);
        let clock = self.clock;
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut keepalives = Vec::new();
        for slot in &mut self.slots {
            let Some(peer) = slot.peer.as_mut() else {
                continue;
            };
            let Some(tunn) = peer.tunn.as_deref_mut() else {
                continue;
            };
            match tunn.update_timers(&mut scratch) {
                TunnResult::WriteToNetwork(b) => {
                    if b.first() == Some(&1) {
                        // A second initiation without an answer to the first: the peer may not
                        // get what we send from its sticky source (routes changed), so the
                        // retry goes from the address the routing table picks, as the
                        // kernel's retransmission does.
                        if peer.init_unanswered {
                            peer.local_ip = None;
                        }
                        peer.init_unanswered = true;
                    }
                    if let Some(dst) = peer.endpoint {
                        peer.tx_bytes += b.len() as u64;
                        peer.last_sent = clock;
                        self.pending.push_back(Queued {
                            dst,
                            src_ip: peer.local_ip,
                            bytes: b.to_vec(),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    // Keys expired (REJECT_AFTER_TIME * 3 without a handshake) or handshake
                    // attempts gave up: free the whole Noise state, so the keys do not linger
                    // in memory and a silent peer costs what an idle one does. The next
                    // packet builds a fresh one.
                    peer.tunn = None;
                    peer.queued = false;
                    peer.init_unanswered = false;
                    continue;
                }
                _ => {}
            }
            note_handshake(peer, clock);
            if let Some(secs) = peer.persistent_keepalive {
                if clock.saturating_sub(peer.last_sent) >= Duration::from_secs(u64::from(secs)) {
                    keepalives.push(peer.id);
                }
            }
        }
        self.scratch = scratch;
        for id in keepalives {
            self.send_keepalive(id);
        }
        if let Some(k) = self.key.as_mut() {
            k.guard.expire_sources(clock);
        }
    }

    /// Whether `poll_transmit` has something.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Every datagram queued by timers or a finished handshake, in order, without a copy.
    pub fn drain_pending(&mut self) -> std::collections::vec_deque::Drain<'_, Queued> {
        self.pending.drain(..)
    }

    /// The next datagram queued by timers or a finished handshake, written into `out`: its
    /// destination and length (its source address is in [`Core::drain_pending`]'s items).
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Option<(SocketAddr, usize)> {
        loop {
            let Queued { dst, bytes, .. } = self.pending.pop_front()?;
            if let Some(dst_buf) = out.get_mut(..bytes.len()) {
                dst_buf.copy_from_slice(&bytes);
                return Some((dst, bytes.len()));
            }
            self.device_drops.add(DropReason::BufferTooSmall);
        }
    }
}

impl crate::firewall::PeerAddresses for Core {
    fn peer_of(&self, addr: IpAddr) -> Option<PeerId> {
        self.route(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::is_own_datagram;
    use std::net::SocketAddr;

    fn v4_udp(sport: u16, dport: u16, frag: [u8; 2]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[6..8].copy_from_slice(&frag);
        p[9] = 17;
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn v6_udp(sport: u16, dport: u16, fragment: Option<u16>) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        match fragment {
            None => p[6] = 17,
            Some(offset) => {
                p[6] = 44;
                p.extend_from_slice(&[17, 0]);
                p.extend_from_slice(&(offset << 3 | 1).to_be_bytes());
                p.extend_from_slice(&[0; 4]);
            }
        }
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p
    }

    #[test]
    fn own_datagrams_are_recognised_by_ports_in_both_families_and_first_fragments() {
        let ep: SocketAddr = "192.0.2.2:51821".parse().expect("addr");
        assert!(is_own_datagram(&v4_udp(51820, 51821, [0x40, 0]), 51820, ep));
        assert!(is_own_datagram(&v4_udp(51820, 51821, [0x20, 0]), 51820, ep));
        assert!(!is_own_datagram(
            &v4_udp(51820, 51821, [0x20, 0xb9]),
            51820,
            ep
        ));
        assert!(!is_own_datagram(&v4_udp(51822, 51821, [0, 0]), 51820, ep));
        assert!(!is_own_datagram(&v4_udp(51820, 51822, [0, 0]), 51820, ep));
        let mut tcp = v4_udp(51820, 51821, [0, 0]);
        tcp[9] = 6;
        assert!(!is_own_datagram(&tcp, 51820, ep));
        assert!(!is_own_datagram(
            &v4_udp(51820, 51821, [0, 0])[..22],
            51820,
            ep
        ));
        assert!(is_own_datagram(&v6_udp(51820, 51821, None), 51820, ep));
        assert!(is_own_datagram(&v6_udp(51820, 51821, Some(0)), 51820, ep));
        assert!(!is_own_datagram(
            &v6_udp(51820, 51821, Some(185)),
            51820,
            ep
        ));
        assert!(!is_own_datagram(&v6_udp(1, 51821, None), 51820, ep));
        assert!(!is_own_datagram(&[], 51820, ep));
    }
}
