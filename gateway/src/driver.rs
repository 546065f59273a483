//! The I/O driver: moves batches between the TUN device and the UDP sockets through the core.
//!
//! One thread per direction (plus one for timers), so encryption and decryption run on both
//! cores of a small appliance; received handshake messages have a queue and a thread of their
//! own (see [`Sockets`]). What makes a userspace path fast here is batching carried
//! through the whole pipeline (anchors.md, measured on these machines):
//! - TUN with offloads (tun-rs, `IFF_VNET_HDR` + `TUNSETOFFLOAD`): the kernel hands us TCP
//!   super-packets of up to 64 KiB that tun-rs splits into MTU-sized segments, and on the way
//!   back tun-rs coalesces decrypted segments (GRO) before writing them;
//! - UDP with GSO/GRO (quinn-udp): one `sendmsg` carries up to 64 encrypted datagrams written
//!   back to back into one buffer, one `recvmmsg` brings up to 32 coalesced datagram trains;
//! - the core is locked once per batch, not per packet, and no buffer is allocated per packet.

use std::io::{self, IoSliceMut, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use std::collections::HashMap;

use parking_lot::{Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::core::{Action, Core, Queued, TIMER_INTERVAL};
use crate::gate::Gate;
use crate::packet::IpHeader;
use crate::sys;

/// Largest IP packet we read from or write to the TUN device: any MTU a TUN device accepts
/// (up to 65,535) works, as in the kernel and wireguard-go. The buffers are zeroed allocations,
/// so memory is spent only as far as packets reach into them.
const MAX_PACKET: usize = u16::MAX as usize;
/// Socket buffers: big enough for several GSO/GRO batches in flight.
const SOCKET_BUFFER: i32 = 7 << 20;
/// Largest UDP payload one GSO send may carry.
const MAX_GSO_BYTES: usize = 65_507;
/// Receive slot: one GRO train of datagrams.
const RX_SLOT: usize = 65_536;
/// Decrypted packets written to the TUN device per `send_multiple` (GRO coalesces within it).
/// The core is unlocked between such chunks so the other direction (e.g. the ACKs of the
/// flow being received) does not wait behind a long receive batch.
const TUN_WRITE_BATCH: usize = 64;
/// How often the hub's flow table is swept for idle flows.
const FLOW_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a thread blocks before it looks at shutdown and socket changes.
const POLL_MS: i32 = 250;

/// Why the daemon should stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The TUN interface was deleted (its file descriptor says so; wherever the interface was
    /// moved, it is not looked up by name).
    InterfaceGone,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// A driver thread hit an error it cannot recover from.
    Fatal(String),
}

/// One bound UDP socket and quinn-udp's state for it. The state is replaced (not mutated)
/// when a send from a vanished source address made quinn-udp turn GSO off (see
/// [`Sockets::send`]).
#[derive(Debug)]
struct Udp {
    sock: UdpSocket,
    state: ArcSwap<UdpSocketState>,
}

/// The bound UDP sockets (IPv4 and, where the host has it, IPv6) on one port. Each family
/// has two receive queues: the data socket, which also sends everything, and a handshake
/// socket in the same `SO_REUSEPORT` group that the kernel hands every datagram but data
/// messages (see [`sys::steer_by_message_type`]); each has its own receive thread. A flood of
/// handshake initiations then fills the handshake socket's queue only: established sessions'
/// packets neither wait behind it nor are dropped by the kernel when it is full, however
/// little CPU the daemon gets meanwhile (issue 14, docs/architecture.md). Where the kernel
/// refuses the steering, the data socket receives everything, as one socket did before.
#[derive(Debug)]
pub struct Sockets {
    v4: Option<Udp>,
    v6: Option<Udp>,
    hs_v4: Option<Udp>,
    hs_v6: Option<Udp>,
    port: u16,
    /// Route MTUs by destination, looked up when a GSO send's segments are larger than any
    /// path is sure to carry (see `gso_fits`).
    route_mtus: Mutex<HashMap<SocketAddr, (usize, Instant)>>,
}

/// Segments up to this size fit every IPv6 path (1,280 minus 48 bytes of IPv6 and UDP
/// headers): GSO sends of them need no route lookup.
const ALWAYS_FITS: usize = 1280 - 48;
/// How long a looked-up route MTU is trusted.
const ROUTE_MTU_TTL: std::time::Duration = std::time::Duration::from_secs(5);

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    Ok(sock)
}

fn bind_one(addr: SocketAddr, fwmark: u32, reuse_port: bool) -> io::Result<Udp> {
    let sock = new_socket(addr)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if fwmark != 0 {
        sock.set_mark(fwmark)?;
    }
    sys::set_socket_buffers(&sock, SOCKET_BUFFER);
    sock.bind(&addr.into())?;
    let sock: UdpSocket = sock.into();
    let state = socket_state(&sock)?;
    Ok(Udp {
        sock,
        state: ArcSwap::from_pointee(state),
    })
}

/// quinn-udp's state for `sock`: enables GRO and IP_PKTINFO / IPV6_RECVPKTINFO (which give
/// each received datagram our address it was sent to), reads what GSO the kernel offers, makes
/// the socket non-blocking.
fn socket_state(sock: &UdpSocket) -> io::Result<UdpSocketState> {
    let state = UdpSocketState::new(sock.into())?;
    // After quinn-udp, which forbids fragmentation: a tunnel MTU above the path MTU must make
    // the kernel fragment the outer datagrams, as it does for its own WireGuard.
    let v6 = sock.local_addr()?.is_ipv6();
    sys::allow_fragmentation(sock, v6)?;
    Ok(state)
}

/// The data socket of one family at `addr` and, where the kernel allows, its handshake socket
/// (see [`Sockets`]).
fn bind_family(addr: SocketAddr, fwmark: u32) -> io::Result<(Udp, Option<Udp>)> {
    if addr.port() != 0 {
        // The port must be free, as for a socket without SO_REUSEPORT: a second daemon on the
        // same port is refused here instead of sharing the port's datagrams.
        new_socket(addr)?.bind(&addr.into())?;
    }
    let data = bind_one(addr, fwmark, true)?;
    let mut at = addr;
    at.set_port(data.sock.local_addr()?.port());
    let handshakes = bind_one(at, fwmark, true)
        .and_then(|hs| sys::steer_by_message_type(&data.sock).map(|()| hs));
    match handshakes {
        Ok(hs) => Ok((data, Some(hs))),
        Err(e) => {
            tracing::warn!(error = %e, %at, "no separate receive queue for handshakes");
            Ok((data, None))
        }
    }
}

impl Sockets {
    /// Binds port `port` (0: a free port, the same for both families) with `fwmark`.
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Self> {
        let mut last_err = None;
        // With port 0 the IPv6 bind can lose a race for the port the IPv4 bind picked: retry.
        for _ in 0..if port == 0 { 10 } else { 1 } {
            let (v4, hs_v4) = bind_family(
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into(),
                fwmark,
            )?;
            let bound = v4.sock.local_addr()?.port();
            match bind_family(
                SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, bound, 0, 0).into(),
                fwmark,
            ) {
                Ok((v6, hs_v6)) => {
                    return Ok(Self {
                        v4: Some(v4),
                        v6: Some(v6),
                        hs_v4,
                        hs_v6,
                        port: bound,
                        route_mtus: Mutex::default(),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    return Ok(Self {
                        v4: Some(v4),
                        v6: None,
                        hs_v4,
                        hs_v6: None,
                        port: bound,
                        route_mtus: Mutex::default(),
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        for u in [&self.v4, &self.v6, &self.hs_v4, &self.hs_v6]
            .into_iter()
            .flatten()
        {
            SockRef::from(&u.sock).set_mark(mark)?;
        }
        Ok(())
    }

    fn for_dst(&self, dst: &SocketAddr) -> Option<&Udp> {
        match dst {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }

    /// Sends one (possibly GSO-segmented) transmit, waiting while the socket buffer is full.
    ///
    /// A transmit with a source address (a peer's sticky source) that the host no longer has
    /// fails (Linux 6.x: ENETUNREACH for IPv4, EINVAL for IPv6 and for a loopback source
    /// toward another host; EADDRNOTAVAIL is taken too): it is sent again without one, from
    /// the address the routing table picks, and when that works `Ok(Some(address))` tells the
    /// caller to make the core forget the address (the kernel's WireGuard does the same).
    /// quinn-udp takes any EINVAL for a GSO failure and turns GSO off for good; when the retry
    /// shows it was the address, the socket's state is rebuilt so GSO comes back.
    fn send(&self, t: &Transmit<'_>) -> io::Result<Option<IpAddr>> {
        let Some(udp) = self.for_dst(&t.destination) else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no socket for this address family",
            ));
        };
        let gso_before = udp.state.load().max_gso_segments();
        match udp.send(t) {
            Err(e)
                if t.src_ip.is_some()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::ENETUNREACH | libc::EADDRNOTAVAIL)
                    ) =>
            {
                udp.send(&Transmit { src_ip: None, ..*t })?;
                if udp.state.load().max_gso_segments() < gso_before {
                    match socket_state(&udp.sock) {
                        Ok(state) => udp.state.store(Arc::new(state)),
                        Err(e) => tracing::warn!(error = %e, "cannot restore UDP GSO"),
                    }
                }
                Ok(t.src_ip)
            }
            other => other.map(|()| None),
        }
    }

    /// Whether segments of `seg` bytes to `dst` fit the route's MTU. The kernel refuses a GSO
    /// send whose segments do not (EINVAL), and quinn-udp then turns GSO off for good; such
    /// datagrams are sent one by one instead, and the kernel fragments them.
    fn gso_fits(&self, dst: SocketAddr, seg: usize) -> bool {
        if seg <= ALWAYS_FITS {
            return true;
        }
        let now = Instant::now();
        let mut cache = self.route_mtus.lock();
        let mtu = match cache.get(&dst) {
            Some(&(mtu, at)) if now - at < ROUTE_MTU_TTL => mtu,
            _ => {
                let mtu = sys::route_mtu(dst).map_or(ALWAYS_FITS + 48, |m| m as usize);
                if cache.len() >= 4096 {
                    cache.clear();
                }
                cache.insert(dst, (mtu, now));
                mtu
            }
        };
        let headers = if dst.is_ipv4() { 28 } else { 48 };
        seg + headers <= mtu
    }

    fn max_gso_segments(&self) -> usize {
        self.v4
            .as_ref()
            .or(self.v6.as_ref())
            .map_or(1, |u| u.state.load().max_gso_segments())
    }
}

impl Udp {
    fn send(&self, t: &Transmit<'_>) -> io::Result<()> {
        loop {
            match self.state.load().try_send((&self.sock).into(), t) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    sys::wait_ready(&[self.sock.as_raw_fd()], true, POLL_MS)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// What the driver threads share.
pub struct Shared {
    core: Mutex<Core>,
    /// A hub's policy enforcement; `None` on spokes (the kernel's nftables enforce there) and
    /// in the wireguard-go-compatible mode. Locked before the core, once per batch.
    gate: Option<Mutex<Gate>>,
    pub tun: SyncDevice,
    pub ifname: String,
    sockets: ArcSwap<Sockets>,
    /// Written to when the sockets change, so the receive thread, blocked in `poll` on the
    /// old ones, picks up the new ones at once (a `wg set listen-port` right before the first
    /// packet must not cost up to a poll timeout).
    /// One per receive thread ([`Lane`]).
    sockets_changed: [(std::io::PipeReader, std::io::PipeWriter); 2],
    shutdown: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ifname", &self.ifname)
            .field("sockets", &self.sockets)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn new(
        core: Core,
        gate: Option<Gate>,
        tun: SyncDevice,
        ifname: String,
        sockets: Sockets,
    ) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            core: Mutex::new(core),
            gate: gate.map(Mutex::new),
            tun,
            ifname,
            sockets: ArcSwap::from_pointee(sockets),
            sockets_changed: [std::io::pipe()?, std::io::pipe()?],
            shutdown: AtomicBool::new(false),
        }))
    }

    /// The core, locked once per batch. parking_lot's mutex spins briefly before it parks,
    /// which suits hold times of tens of microseconds (one batch of the other direction); it
    /// has no poisoning, and every core method finishes its bookkeeping before returning.
    pub fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock()
    }

    /// The gate (if this gateway enforces policy) and the core, locked in that order. Every
    /// path that needs both takes them through here, so the lock order is always the same.
    pub fn gate_and_core(&self) -> (Option<MutexGuard<'_, Gate>>, MutexGuard<'_, Core>) {
        let gate = self.gate.as_ref().map(|g| g.lock());
        (gate, self.core.lock())
    }

    /// Whether the packet path's locks can be taken within `timeout` each: a wedged driver
    /// (a lock never released) fails this, and the appliance stops its watchdog keep-alives.
    pub fn responsive(&self, timeout: std::time::Duration) -> bool {
        let gate = match &self.gate {
            Some(g) => match g.try_lock_for(timeout) {
                Some(guard) => Some(guard),
                None => return false,
            },
            None => None,
        };
        let core = self.core.try_lock_for(timeout).is_some();
        drop(gate);
        core
    }

    pub fn has_gate(&self) -> bool {
        self.gate.is_some()
    }

    pub fn sockets(&self) -> Arc<Sockets> {
        self.sockets.load_full()
    }

    pub fn replace_sockets(&self, sockets: Sockets) {
        self.sockets.store(Arc::new(sockets));
        // A full pipe already holds a wake-up; nothing is lost if this write fails.
        for (_, wake) in &self.sockets_changed {
            let _ = (&*wake).write(&[1]);
        }
    }

    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Sends datagrams the core queued (handshakes, keepalives) one by one.
    pub fn flush_pending(&self) {
        let queued: Vec<Queued> = self.core().drain_pending().collect();
        send_each(self, &self.sockets(), queued.into_iter());
    }
}

/// Sends control datagrams (handshakes, cookies, keepalives) one by one.
fn send_each(shared: &Shared, sockets: &Sockets, datagrams: impl Iterator<Item = Queued>) {
    for q in datagrams {
        let t = Transmit {
            destination: q.dst,
            ecn: None,
            contents: &q.bytes,
            segment_size: None,
            src_ip: q.src_ip,
        };
        send_logged(shared, sockets, &t);
    }
}

fn send_logged(shared: &Shared, sockets: &Sockets, t: &Transmit<'_>) {
    match sockets.send(t) {
        Ok(None) => {}
        Ok(Some(lost)) => {
            tracing::debug!(address = %lost, "source address gone; peers using it fall back to the routing table's choice");
            shared.core().forget_source_ip(lost);
        }
        Err(e) => tracing::debug!(dst = %t.destination, error = %e, "send failed"),
    }
}

/// One encrypted datagram in a batch buffer: `out[start..start + len]`, to `dst` from
/// `src_ip`.
#[derive(Debug, Clone, Copy)]
struct Outgoing {
    dst: SocketAddr,
    src_ip: Option<IpAddr>,
    start: usize,
    len: usize,
}

/// Spawns the three driver threads. Each reports a reason to stop on `events`.
pub fn spawn(shared: &Arc<Shared>, events: &Sender<Event>) -> io::Result<()> {
    let (s, e) = (shared.clone(), events.clone());
    std::thread::Builder::new()
        .name("tun-to-udp".into())
        .spawn(move || outbound(&s, &e))?;
    let (s, e) = (shared.clone(), events.clone());
    std::thread::Builder::new()
        .name("udp-to-tun".into())
        .spawn(move || inbound(&s, &e, Lane::Data))?;
    let (s, e) = (shared.clone(), events.clone());
    std::thread::Builder::new()
        .name("udp-handshakes".into())
        .spawn(move || inbound(&s, &e, Lane::Handshakes))?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("timers".into())
        .spawn(move || timers(&s))?;
    Ok(())
}

fn tun_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::EBADF)
    )
}

/// TUN → encrypt → UDP.
fn outbound(shared: &Shared, events: &Sender<Event>) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65_535];
    // Not `vec![vec![..]; n]`: cloning would write (and so map) every page of every buffer.
    let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; MAX_PACKET])
        .collect();
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    // Encrypted datagrams are written back to back, so a run of equal-sized ones to the same
    // peer is already the contiguous buffer a GSO send wants.
    let mut out = vec![0u8; IDEAL_BATCH_SIZE * (MAX_PACKET + crate::packet::DATA_OVERHEAD)];
    let mut sends: Vec<Outgoing> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    // ICMP unreachable answers for packets no peer can take, written back to the TUN device.
    let mut icmp_bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + crate::unreachable::MAX_V6))
        .collect();
    let mut icmp_gro = GROTable::default();
    // The TUN device is blocking: one syscall per super-packet, no poll in front of it. On
    // shutdown the process exits under this thread.
    while !shared.stopping() {
        let n = match shared
            .tun
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
        {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) if tun_gone(&e) => {
                let _ = events.send(Event::InterfaceGone);
                return;
            }
            Err(e) => {
                // A malformed offload packet from the kernel: skip it, keep going.
                tracing::debug!(error = %e, "TUN read");
                continue;
            }
        };
        let now = Instant::now();
        sends.clear();
        let mut cursor = 0;
        let mut icmp = 0;
        let has_pending = {
            let (mut gate, mut core) = shared.gate_and_core();
            for (buf, &size) in bufs.iter_mut().zip(&sizes).take(n) {
                if let Some(g) = gate.as_deref_mut() {
                    if !g.to_peer(now, &*core, &buf[..size]) {
                        continue;
                    }
                }
                let room = &mut out[cursor..];
                // The padding goes into `buf` behind the packet (it has MAX_PACKET bytes).
                match core.handle_tun_buffer(now, buf, size, room) {
                    Action::ToNetwork {
                        dst,
                        src_ip,
                        offset,
                        len,
                    } => {
                        // boringtun writes at the start of the buffer; moving in place would
                        // still cost a memmove of the whole datagram.
                        if offset != 0 {
                            room.copy_within(offset..offset + len, 0);
                        }
                        sends.push(Outgoing {
                            dst,
                            src_ip,
                            start: cursor,
                            len,
                        });
                        cursor += len;
                    }
                    Action::Unreachable { offset, len, .. } => {
                        let answer = &mut icmp_bufs[icmp];
                        answer.clear();
                        answer.resize(VIRTIO_NET_HDR_LEN, 0);
                        answer.extend_from_slice(&room[offset..offset + len]);
                        icmp += 1;
                    }
                    _ => {}
                }
            }
            core.has_pending()
        };
        send_runs(shared, &shared.sockets(), &out, &sends);
        if icmp > 0 {
            if let Err(e) =
                shared
                    .tun
                    .send_multiple(&mut icmp_gro, &mut icmp_bufs[..icmp], VIRTIO_NET_HDR_LEN)
            {
                tracing::debug!(error = %e, "TUN write of ICMP unreachable");
            }
        }
        if has_pending {
            shared.flush_pending();
        }
    }
}

/// Sends `sends` (datagrams within `out`), merging each run of datagrams to the same
/// destination from the same source with the same size (the last may be shorter) into one
/// GSO send.
fn send_runs(shared: &Shared, sockets: &Sockets, out: &[u8], sends: &[Outgoing]) {
    let max_segments = sockets.max_gso_segments().max(1);
    let mut i = 0;
    while i < sends.len() {
        let Outgoing {
            dst,
            src_ip,
            start,
            len: seg,
        } = sends[i];
        let mut end = start + seg;
        let mut j = i + 1;
        while j < sends.len() && j - i < max_segments {
            let next = sends[j];
            if next.dst != dst
                || next.src_ip != src_ip
                || next.start != end
                || next.len > seg
                || end + next.len - start > MAX_GSO_BYTES
            {
                break;
            }
            end += next.len;
            j += 1;
            if next.len < seg {
                break;
            }
        }
        if j - i > 1 && !sockets.gso_fits(dst, seg) {
            // Larger than the path: one datagram per send, fragmented by the kernel.
            for o in &sends[i..j] {
                send_logged(
                    shared,
                    sockets,
                    &Transmit {
                        destination: o.dst,
                        ecn: None,
                        contents: &out[o.start..o.start + o.len],
                        segment_size: None,
                        src_ip: o.src_ip,
                    },
                );
            }
            i = j;
            continue;
        }
        let segment_size = (j - i > 1).then_some(seg);
        send_logged(
            shared,
            sockets,
            &Transmit {
                destination: dst,
                ecn: None,
                contents: &out[start..end],
                segment_size,
                src_ip,
            },
        );
        i = j;
    }
}

/// Which of a family's two receive queues a receive thread serves (see [`Sockets`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Data messages (and everything, where there is no handshake socket).
    Data = 0,
    /// Handshake initiations and responses, cookie replies, and anything not a data message.
    Handshakes = 1,
}

/// UDP → decrypt → TUN, for the sockets of one [`Lane`]. Both lanes take the same path
/// through the core (which decides by message type anyway); they differ in the queue they
/// drain.
fn inbound(shared: &Shared, events: &Sender<Event>, lane: Lane) {
    let mut rx = vec![0u8; quinn_udp::BATCH_SIZE * RX_SLOT];
    let mut metas = [RecvMeta::default(); quinn_udp::BATCH_SIZE];
    // Capacity for a full 64 KiB coalesced packet: tun-rs appends GRO segments to the first
    // buffer of a flow and uses its capacity as the limit.
    let mut tun_bufs: Vec<Vec<u8>> = (0..TUN_WRITE_BATCH)
        .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65_535))
        .collect();
    let mut gro = GROTable::default();
    let mut replies: Vec<Queued> = Vec::new();
    let mut hairpin = Hairpin::new(shared.has_gate());
    while !shared.stopping() {
        let sockets = shared.sockets();
        let socks = match lane {
            Lane::Data => [sockets.v4.as_ref(), sockets.v6.as_ref()],
            Lane::Handshakes => [sockets.hs_v4.as_ref(), sockets.hs_v6.as_ref()],
        };
        let [v4, v6] = socks.map(|s| s.map_or(-1, |u| u.sock.as_raw_fd()));
        let changed = &shared.sockets_changed[lane as usize].0;
        let wake = changed.as_raw_fd();
        let ready = match sys::wait_ready(&[v4, v6, wake], false, POLL_MS) {
            Ok(r) => r,
            Err(e) => {
                let _ = events.send(Event::Fatal(format!("poll on UDP sockets: {e}")));
                return;
            }
        };
        if ready & 0b100 != 0 {
            // Drain the wake-up (poll said it is readable, so this does not block) and reload.
            let _ = (&*changed).read(&mut [0u8; 64]);
            continue;
        }
        for (i, udp) in socks
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, (*s)?)))
        {
            let state = udp.state.load();
            if ready & (1 << i) == 0 {
                continue;
            }
            loop {
                let n = {
                    let mut chunks = rx.chunks_mut(RX_SLOT);
                    let mut iovs: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
                        std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                    match state.recv((&udp.sock).into(), &mut iovs, &mut metas) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::debug!(error = %e, "UDP receive");
                            break;
                        }
                    }
                };
                let has_pending = decrypt_batch(
                    shared,
                    &rx,
                    &metas[..n],
                    &mut tun_bufs,
                    &mut gro,
                    &mut replies,
                    &mut hairpin,
                );
                send_each(shared, &sockets, replies.drain(..));
                hairpin.flush(shared, &sockets);
                if has_pending {
                    shared.flush_pending();
                }
                if n < quinn_udp::BATCH_SIZE {
                    // The socket is most likely drained: go back to poll rather than pay a
                    // recvmmsg that only says EAGAIN (a third of receive syscalls otherwise).
                    break;
                }
            }
        }
    }
}

/// Packets from one peer to another (a home office printing in its town hall): a hub sends
/// them on itself, encrypted for the destination peer, instead of through the TUN device and
/// back. So every packet the hub reads from its TUN device comes from the data-centre side,
/// and the firewall can refuse those with a tunnel peer's source address (issue 14).
struct Hairpin {
    out: Vec<u8>,
    sends: Vec<Outgoing>,
    cursor: usize,
}

/// Room for encrypted peer-to-peer packets per receive batch before they are sent.
const HAIRPIN_BYTES: usize = 1 << 20;

impl Hairpin {
    fn new(hub: bool) -> Self {
        Self {
            out: vec![0u8; if hub { HAIRPIN_BYTES } else { 0 }],
            sends: Vec::new(),
            cursor: 0,
        }
    }

    /// Whether a packet of `len` bytes still fits (always, where there is no hairpin: spokes
    /// and the wireguard-go-compatible mode).
    fn has_room(&self, len: usize) -> bool {
        self.out.is_empty()
            || self.out.len() - self.cursor
                >= (len + crate::core::PADDING_MULTIPLE + crate::packet::DATA_OVERHEAD)
                    .max(crate::core::MIN_OUT_BUF)
    }

    /// Encrypts `packet` for the peer that owns its destination.
    fn push(&mut self, core: &mut Core, now: Instant, packet: &[u8]) {
        let room = &mut self.out[self.cursor..];
        if let Action::ToNetwork {
            dst,
            src_ip,
            offset,
            len,
        } = core.handle_tun_packet(now, packet, room)
        {
            if offset != 0 {
                room.copy_within(offset..offset + len, 0);
            }
            self.sends.push(Outgoing {
                dst,
                src_ip,
                start: self.cursor,
                len,
            });
            self.cursor += len;
        }
    }

    fn flush(&mut self, shared: &Shared, sockets: &Sockets) {
        if !self.sends.is_empty() {
            send_runs(shared, sockets, &self.out, &self.sends);
        }
        self.sends.clear();
        self.cursor = 0;
    }
}

/// Decrypts one receive batch into `tun_bufs` and writes them to the TUN device (with GRO);
/// a hub's peer-to-peer packets go to `hairpin`. Returns whether the core queued datagrams (a
/// handshake completed).
fn decrypt_batch(
    shared: &Shared,
    rx: &[u8],
    metas: &[RecvMeta],
    tun_bufs: &mut [Vec<u8>],
    gro: &mut GROTable,
    replies: &mut Vec<Queued>,
    hairpin: &mut Hairpin,
) -> bool {
    let now = Instant::now();
    let mut k = 0;
    let (mut gate, mut core) = shared.gate_and_core();
    for (slot, meta) in metas.iter().enumerate() {
        let train = &rx[slot * RX_SLOT..slot * RX_SLOT + meta.len.min(RX_SLOT)];
        for datagram in train.chunks(meta.stride.max(1)) {
            if k == tun_bufs.len() || !hairpin.has_room(datagram.len()) {
                // Full: write what we have without holding the core meanwhile.
                drop(core);
                drop(gate);
                write_tun(shared, tun_bufs, k, gro);
                hairpin.flush(shared, &shared.sockets());
                k = 0;
                (gate, core) = shared.gate_and_core();
            }
            let buf = &mut tun_bufs[k];
            buf.resize(
                VIRTIO_NET_HDR_LEN + datagram.len().max(crate::core::MIN_OUT_BUF),
                0,
            );
            let out = &mut buf[VIRTIO_NET_HDR_LEN..];
            match core.handle_datagram(now, meta.addr, meta.dst_ip, datagram, out) {
                Action::ToTun { peer, offset, len } => {
                    if let Some(g) = gate.as_deref_mut() {
                        let start = VIRTIO_NET_HDR_LEN + offset;
                        let inner = &buf[start..start + len];
                        if !g.from_peer(now, peer, &*core, inner) {
                            continue;
                        }
                        let to_peer = IpHeader::parse(inner).and_then(|h| core.route(h.dst));
                        if to_peer.is_some() {
                            hairpin.push(&mut core, now, inner);
                            continue;
                        }
                    }
                    if offset != 0 {
                        buf.copy_within(
                            VIRTIO_NET_HDR_LEN + offset..VIRTIO_NET_HDR_LEN + offset + len,
                            VIRTIO_NET_HDR_LEN,
                        );
                    }
                    buf.truncate(VIRTIO_NET_HDR_LEN + len);
                    k += 1;
                }
                Action::ToNetwork {
                    dst,
                    src_ip,
                    offset,
                    len,
                } => {
                    let start = VIRTIO_NET_HDR_LEN + offset;
                    replies.push(Queued {
                        dst,
                        src_ip,
                        bytes: buf[start..start + len].to_vec(),
                    });
                }
                Action::Nothing | Action::Drop(_) | Action::Unreachable { .. } => {}
            }
        }
    }
    let has_pending = core.has_pending();
    drop(core);
    drop(gate);
    write_tun(shared, tun_bufs, k, gro);
    has_pending
}

fn write_tun(shared: &Shared, tun_bufs: &mut [Vec<u8>], k: usize, gro: &mut GROTable) {
    if k == 0 {
        return;
    }
    if let Err(e) = shared
        .tun
        .send_multiple(gro, &mut tun_bufs[..k], VIRTIO_NET_HDR_LEN)
    {
        tracing::debug!(error = %e, "TUN write");
    }
}

/// Runs the core's timers every `TIMER_INTERVAL`.
///
/// It does not look the interface up by name: an interface moved to another network namespace
/// (`ip link set IF netns NS`, what WireGuard's documentation recommends for namespace-based
/// routing) vanishes from ours but keeps working. That the interface was deleted is learnt from
/// the TUN file descriptor (`tun_gone` in `outbound`), as wireguard-go does.
fn timers(shared: &Shared) {
    let mut last_sweep = Instant::now();
    let mut mtu_reader = sys::TunMtuReader::default();
    let mut tick: u32 = 0;
    while !shared.stopping() {
        // The interface's MTU bounds the padding; it may change at any time (`ip link set
        // mtu`), also in the namespace the interface was moved to. Read every second.
        let mtu = tick
            .is_multiple_of(4)
            .then(|| mtu_reader.read(&shared.tun))
            .and_then(|r| {
                r.map_err(|e| tracing::debug!(error = %e, "cannot read the TUN MTU"))
                    .ok()
            });
        tick = tick.wrapping_add(1);
        if tick > 1 {
            std::thread::sleep(TIMER_INTERVAL);
        }
        let now = Instant::now();
        {
            let (gate, mut core) = shared.gate_and_core();
            if let Some(mtu) = mtu {
                core.set_mtu(mtu);
            }
            // The flow sweep walks the whole table: once a second is enough for timeouts of
            // ten seconds and more, and keeps the packet path's wait on the lock rare.
            if let Some(mut g) = gate.filter(|_| now - last_sweep >= FLOW_SWEEP_INTERVAL) {
                g.expire(now);
                last_sweep = now;
            }
            core.update_timers(now);
        }
        shared.flush_pending();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{HANDSHAKE_INIT_LEN, MSG_DATA, MSG_HANDSHAKE_INIT};

    /// Reads everything queued on `sock`; returns the first bytes of each datagram.
    fn drain(sock: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let mut types = Vec::new();
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n > 0 {
                types.push(buf[0]);
            }
        }
        types
    }

    #[test]
    fn a_full_handshake_queue_does_not_drop_data_messages() {
        let sockets = Sockets::bind(0, 0).expect("bind");
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, sockets.port()));
        let flood = UdpSocket::bind("127.0.0.1:0").expect("flood socket");
        let mut init = [0u8; HANDSHAKE_INIT_LEN];
        init[0] = MSG_HANDSHAKE_INIT;
        // Far more than a receive queue holds (14 MiB at most; each datagram takes about
        // 1 KiB of it), with nobody reading: the kernel drops the rest.
        const FLOOD: usize = 40_000;
        for _ in 0..FLOOD {
            let _ = flood.send_to(&init, to);
        }
        let mut data = [0u8; 64];
        data[0] = MSG_DATA;
        flood.send_to(&data, to).expect("send data");
        let data_lane = drain(&sockets.v4.as_ref().expect("v4").sock);
        let handshake_lane = sockets
            .hs_v4
            .as_ref()
            .map(|u| drain(&u.sock))
            .unwrap_or_default();
        let handshakes = data_lane
            .iter()
            .chain(&handshake_lane)
            .filter(|&&t| t == MSG_HANDSHAKE_INIT)
            .count();
        assert!(
            handshakes < FLOOD,
            "the receive queue held all {FLOOD} initiations: the test did not fill it"
        );
        assert_eq!(
            data_lane.iter().filter(|&&t| t == MSG_DATA).count(),
            1,
            "the data message was dropped behind {handshakes} queued initiations"
        );
        assert!(
            !data_lane.contains(&MSG_HANDSHAKE_INIT),
            "initiations reached the data socket's queue"
        );
    }

    #[test]
    fn a_second_daemon_on_the_same_port_is_refused() {
        let first = Sockets::bind(0, 0).expect("bind");
        let err = Sockets::bind(first.port(), 0).expect_err("a second bind of the port");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    }
}
