//! The UDP sockets: one data and one handshake socket per family, GSO sends, the sticky
//! source addresses' fallback.

use super::*;

/// One bound UDP socket and quinn-udp's state for it. The state is replaced (not mutated)
/// when a send from a vanished source address made quinn-udp turn GSO off (see
/// [`Sockets::send`]).
#[derive(Debug)]
pub(super) struct Udp {
    pub(super) sock: UdpSocket,
    pub(super) state: ArcSwap<UdpSocketState>,
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
    pub(super) v4: Option<Udp>,
    pub(super) v6: Option<Udp>,
    pub(super) hs_v4: Option<Udp>,
    pub(super) hs_v6: Option<Udp>,
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
    pub(super) fn send(&self, t: &Transmit<'_>) -> io::Result<Option<IpAddr>> {
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
    pub(super) fn gso_fits(&self, dst: SocketAddr, seg: usize) -> bool {
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

    pub(super) fn max_gso_segments(&self) -> usize {
        self.v4
            .as_ref()
            .or(self.v6.as_ref())
            .map_or(1, |u| u.state.load().max_gso_segments())
    }
}

impl Udp {
    pub(super) fn send(&self, t: &Transmit<'_>) -> io::Result<()> {
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
