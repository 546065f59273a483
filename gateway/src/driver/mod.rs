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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::core::{Action, Core, Queued, TIMER_INTERVAL};
use crate::gate::Gate;
use crate::packet::IpHeader;
use crate::sys;

mod inbound;
mod outbound;
mod sockets;

use inbound::{inbound, Lane};
use outbound::outbound;
use outbound::{send_runs, Outgoing};
pub use sockets::Sockets;

/// Largest IP packet we read from or write to the TUN device: any MTU a TUN device accepts
/// (up to 65,535) works, as in the kernel and wireguard-go. The buffers are zeroed allocations,
/// so memory is spent only as far as packets reach into them.
const MAX_PACKET: usize = u16::MAX as usize;
/// Socket buffers: big enough for several GSO/GRO batches in flight.
const SOCKET_BUFFER: usize = 7 << 20;
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

/// Spawns the driver's threads (TUN to UDP, data datagrams, handshakes, timers). Each reports a reason to stop on `events`.
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
    fn received_datagrams_tell_how_long_they_waited_in_the_queue() {
        let sockets = Sockets::bind(0, 0).expect("bind");
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, sockets.port()));
        let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
        let mut init = [0u8; HANDSHAKE_INIT_LEN];
        init[0] = MSG_HANDSHAKE_INIT;
        sender.send_to(&init, to).expect("send");
        // Nobody reads meanwhile: the datagram waits at least this long.
        let pause = Duration::from_millis(30);
        std::thread::sleep(pause);
        let udp = sockets
            .hs_v4
            .as_ref()
            .or(sockets.v4.as_ref())
            .expect("a v4 socket");
        let mut buf = vec![0u8; RX_SLOT];
        let mut metas = [RecvMeta::default(); 1];
        let n = udp
            .state
            .load()
            .recv(
                (&udp.sock).into(),
                &mut [IoSliceMut::new(&mut buf)],
                &mut metas,
            )
            .expect("the datagram is queued");
        assert_eq!(n, 1);
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
        let waited = inbound::queue_wait(wall, metas[0].timestamp);
        assert!(
            metas[0].timestamp.is_some(),
            "no kernel receive timestamp: SO_TIMESTAMPNS is off"
        );
        assert!(waited >= pause, "waited {waited:?}, slept {pause:?}");
        // No stamp, or a wall clock that stepped back: nothing waited.
        assert_eq!(inbound::queue_wait(wall, None), Duration::ZERO);
        assert_eq!(
            inbound::queue_wait(wall, Some(wall + Duration::from_secs(9))),
            Duration::ZERO
        );
    }

    #[test]
    fn a_second_daemon_on_the_same_port_is_refused() {
        let first = Sockets::bind(0, 0).expect("bind");
        let err = Sockets::bind(first.port(), 0).expect_err("a second bind of the port");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    }
}
