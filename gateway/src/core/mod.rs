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

use std::collections::{BTreeSet, HashMap, VecDeque};
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

mod config;
mod drops;
mod path;
mod timers;

pub use drops::{DropCounters, DropReason};

/// How long a handshake initiation may wait in the receive queue and still be answered: half
/// of REKEY_TIMEOUT (5 s), after which its sender retries with a new one. Half, because the
/// answer must also travel back and the sender's timer started before the datagram left.
pub const STALE_INITIATION: Duration = Duration::from_millis(2500);
/// How often `update_timers` wants to run: boringtun's timers are designed for a ~250 ms tick.
/// Only sessions with something going on run at every tick; idle ones sleep until their next
/// deadline (see `timers`).
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
    /// When the last authenticated transport-data message (data or a keepalive) came from the
    /// peer. Handshake messages do not count: a peer that only answers our handshakes does not
    /// use this device as its gateway (a spoke's standby hub), one that sends keepalives does.
    pub last_data: Option<Instant>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub allowed_ips: Vec<IpNet>,
}

/// What an appliance's housekeeping reads of every peer several times a second (routes that
/// follow handshakes, BGP announcements): [`PeerInfo`] without what costs per peer to gather
/// (allowed IPs, ordering), so a hub with 10,000 idle peers stays idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerActivity {
    pub id: PeerId,
    pub public_key: [u8; 32],
    /// When the current session was established, in the core's time: stable from one read to
    /// the next (a wall-clock form, as [`PeerInfo::last_handshake`] is, would differ by the
    /// nanoseconds between reading the two clocks and look like a new handshake every time).
    pub handshake_at: Option<Instant>,
    /// As [`PeerInfo::last_data`].
    pub last_data: Option<Instant>,
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
    /// Core time of the last authenticated transport-data message received ([`PeerInfo::last_data`]).
    data_at: Option<Duration>,
    /// boringtun may hold packets queued while a handshake runs; they go out once a session
    /// is usable (see `decapsulate`).
    queued: bool,
    /// The peer's public key is a low-order point (the static-static Diffie-Hellman with our
    /// key is all zeros): like the kernel and wireguard-go we never handshake with it, since
    /// the handshake would prove nothing and each initiation would show our identity.
    low_order: bool,
    /// When boringtun's timers of this session ran and must run next.
    timers: timers::SessionTimers,
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
    /// Moves on every change of any peer's allowed IPs: housekeeping that follows them asks
    /// for a peer's prefixes only when it moved.
    allowed_ips_version: u64,
    /// Moves whenever a peer's session time changes (a completed handshake): housekeeping
    /// that follows handshakes looks at the peers only when it moved.
    handshakes_version: u64,
    /// Datagrams produced outside a direct answer (timers, packets queued during a
    /// handshake); drained with `poll_transmit`.
    pending: VecDeque<Queued>,
    /// Sessions by the time their timers must next run.
    timer_queue: timers::TimerQueue,
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
/// keepalive due) at core time `clock`. A `Tunn` is ~11 KiB (eight inline session slots); an
/// idle configured peer without one costs a few hundred bytes, which keeps 1,000 idle peers
/// within 5 MiB.
fn tunn_of<'a>(
    key: &Option<DeviceKey>,
    peer: &'a mut Peer,
    clock: Duration,
) -> Result<&'a mut Tunn, DropReason> {
    if peer.low_order {
        return Err(DropReason::LowOrderKey);
    }
    if peer.tunn.is_none() {
        let k = key.as_ref().ok_or(DropReason::NoPrivateKey)?;
        peer.timers.started(clock);
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
/// ago", and forgets once the session is gone); true when that is a new time.
fn note_handshake(peer: &mut Peer, clock: Duration) -> bool {
    let Some(since) = peer
        .tunn
        .as_ref()
        .and_then(|t| t.time_since_last_handshake())
    else {
        return false;
    };
    let at = Some(clock.saturating_sub(since));
    let new = peer.handshake_at != at;
    peer.handshake_at = at;
    new
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
            allowed_ips_version: 0,
            handshakes_version: 0,
            pending: VecDeque::new(),
            timer_queue: timers::TimerQueue::default(),
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
