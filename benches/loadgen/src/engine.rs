//! The peers at work: handshakes (each peer initiates, retries after REKEY_TIMEOUT as WireGuard
//! does, completes with the hub's response and confirms the session with a keepalive) and
//! traffic (inner UDP packets encrypted by each peer's session, sent in `sendmmsg` bursts).
//! One thread per shard of peers; a thread owns its peers' tunnels and sockets, so nothing is
//! locked on the packet path.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use rand::Rng;
use socket2::Socket;

use crate::peers::{next_try, udp_packet};
use crate::sys;

const WG_RESPONSE: u8 = 2;
const WG_COOKIE: u8 = 3;

/// One played peer.
pub(crate) struct Peer {
    pub(crate) tunn: Tunn,
    pub(crate) sock: Socket,
    pub(crate) addr: Ipv4Addr,
    next_try: Option<Duration>,
    pub(crate) done: Option<Duration>,
}

impl Peer {
    pub(crate) fn new(tunn: Tunn, sock: Socket, addr: Ipv4Addr) -> Peer {
        Peer {
            tunn,
            sock,
            addr,
            next_try: None,
            done: None,
        }
    }
}

/// boringtun (built with `mock-instant` for the gateway's tests) reads a process-wide mock
/// clock; this thread advances it with real time, from one writer so it never runs backwards.
pub(crate) struct Clock {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Clock {
    pub(crate) fn start() -> Clock {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let t0 = Instant::now();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // Starts past zero: boringtun subtracts timeouts from "now".
                mock_instant::MockClock::set_time(Duration::from_secs(3600) + t0.elapsed());
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // The clock has been set once before any tunnel is made.
        std::thread::sleep(Duration::from_millis(5));
        Clock {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Clock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct HandshakeStats {
    /// When each peer completed, since the start.
    pub(crate) done_at: Vec<Duration>,
    pub(crate) initiations: u64,
    pub(crate) cookies: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

impl HandshakeStats {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    pub(crate) fn merge(&mut self, other: HandshakeStats) {
        self.done_at.extend(other.done_at);
        self.initiations += other.initiations;
        self.cookies += other.cookies;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Every peer of the shard handshakes with the hub: all initiate at once, each that got no
/// answer tries again after REKEY_TIMEOUT (+ jitter); a cookie reply is kept and used by the
/// next try. Ends when all are done or at `deadline` after `start`.
pub(crate) fn handshake(peers: &mut [Peer], start: Instant, deadline: Duration) -> HandshakeStats {
    let mut stats = HandshakeStats::default();
    let mut epoll = match sys::Epoll::new(1024) {
        Ok(e) => e,
        Err(e) => {
            stats.error(format!("epoll: {e}"));
            return stats;
        }
    };
    for (i, p) in peers.iter().enumerate() {
        if let Err(e) = epoll.add(p.sock.as_raw_fd(), i as u64) {
            stats.error(format!("epoll add: {e}"));
            return stats;
        }
    }
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let mut ready = Vec::new();
    let mut left = peers.iter().filter(|p| p.done.is_none()).count();
    while left > 0 {
        let now = start.elapsed();
        if now >= deadline {
            break;
        }
        for p in peers.iter_mut() {
            if p.done.is_some() || p.next_try.is_some_and(|t| t > now) {
                continue;
            }
            p.next_try = Some(next_try(now, rng.gen()));
            match p.tunn.format_handshake_initiation(&mut out, true) {
                TunnResult::WriteToNetwork(m) => match p.sock.send(m) {
                    Ok(_) => stats.initiations += 1,
                    Err(e) => stats.error(format!("sending an initiation: {e}")),
                },
                TunnResult::Err(e) => stats.error(format!("making an initiation: {e:?}")),
                _ => {}
            }
        }
        if let Err(e) = epoll.wait(5, &mut ready) {
            stats.error(format!("epoll wait: {e}"));
            break;
        }
        for &token in &ready {
            let p = &mut peers[token as usize];
            while let Ok(n) = p.sock.recv(unsafe_uninit(&mut buf)) {
                let kind = buf.first().copied().unwrap_or(0);
                if kind == WG_COOKIE {
                    stats.cookies += 1;
                }
                match p.tunn.decapsulate(None, &buf[..n], &mut out) {
                    TunnResult::WriteToNetwork(m) => {
                        // The keepalive that confirms the new session to the responder.
                        if let Err(e) = p.sock.send(m) {
                            stats.error(format!("sending the confirming keepalive: {e}"));
                        }
                        if kind == WG_RESPONSE && p.done.is_none() {
                            let at = start.elapsed();
                            p.done = Some(at);
                            stats.done_at.push(at);
                            left -= 1;
                        }
                    }
                    TunnResult::Err(e) => stats.error(format!("from the hub: {e:?}")),
                    _ => {}
                }
            }
        }
    }
    stats
}

/// `recv` into an initialised buffer (socket2 takes `MaybeUninit`).
fn unsafe_uninit(buf: &mut [u8]) -> &mut [std::mem::MaybeUninit<u8>] {
    // SAFETY: `u8` and `MaybeUninit<u8>` have the same layout, and recv only writes bytes.
    #[allow(unsafe_code)]
    unsafe {
        &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>])
    }
}

#[derive(Debug, Default)]
pub(crate) struct TrafficStats {
    pub(crate) packets: u64,
    /// Inner (IP) bytes of the packets sent.
    pub(crate) bytes: u64,
    /// Datagrams the local kernel refused (its queue full): encrypted, never sent.
    pub(crate) refused: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

impl TrafficStats {
    pub(crate) fn merge(&mut self, o: TrafficStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.refused += o.refused;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

/// Each peer (with a session) sends `size`-byte UDP packets to `to` through its tunnel,
/// `batch` per `sendmmsg`, round-robin over the shard's peers, until `duration` is over.
pub(crate) fn traffic(
    peers: &mut [Peer],
    to: SocketAddr,
    size: usize,
    batch: usize,
    duration: Duration,
) -> TrafficStats {
    let mut stats = TrafficStats::default();
    let SocketAddr::V4(to) = to else {
        stats.errors = 1;
        stats.first_error = Some("--to must be an IPv4 address".into());
        return stats;
    };
    let templates: Vec<Vec<u8>> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| udp_packet(p.addr, *to.ip(), 4000 + (i % 1000) as u16, to.port(), size))
        .collect();
    let stride = size.max(28) + 64;
    let mut buf = vec![0u8; stride * batch];
    let mut lens = vec![0usize; batch];
    let mut drain = vec![0u8; 2048];
    let start = Instant::now();
    'run: loop {
        for (p, packet) in peers.iter_mut().zip(&templates) {
            if start.elapsed() >= duration {
                break 'run;
            }
            if p.done.is_none() {
                continue;
            }
            let mut n = 0;
            for (b, len) in lens.iter_mut().enumerate() {
                match p
                    .tunn
                    .encapsulate(packet, &mut buf[b * stride..(b + 1) * stride])
                {
                    TunnResult::WriteToNetwork(m) => {
                        *len = m.len();
                        n += 1;
                    }
                    _ => break,
                }
            }
            match sys::send_batch(p.sock.as_raw_fd(), &buf, stride, &lens[..n]) {
                Ok(sent) => {
                    stats.packets += sent as u64;
                    stats.bytes += (sent * packet.len()) as u64;
                    stats.refused += (n - sent) as u64;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS)) => {
                    stats.refused += n as u64;
                    std::thread::yield_now();
                }
                Err(e) => {
                    stats.errors += 1;
                    if stats.first_error.is_none() {
                        stats.first_error = Some(format!("sending: {e}"));
                    }
                }
            }
            // What the hub sends back (keepalives) is read and dropped, so queues stay empty.
            while p.sock.recv(unsafe_uninit(&mut drain)).is_ok() {}
        }
    }
    stats
}
