//! The syscalls std and socket2 do not cover, through `nix` where it has a safe wrapper. The
//! only module of the crate with `unsafe` (what nix lacks or does not fit: the path-MTU socket
//! options, the TUN ioctls, poll on the packet path, fork and a pre-exec hook); every block
//! says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{self as nixsock, sockopt};

/// A nix error as the `io::Error` the rest of the crate speaks.
fn os(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// An int-valued socket option nix has no wrapper for (the path-MTU discovery modes).
fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `fd` is a live socket borrowed for the call; we pass a pointer to a local i32
    // and its exact size, which is what these options read.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: &impl AsRawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket borrowed for the call; we pass a pointer to a local i32
    // and its exact size, which is what these options write.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets SO_RCVBUF/SO_SNDBUF to `bytes`, past `net.core.{r,w}mem_max` when we have
/// CAP_NET_ADMIN (the FORCE variants), else as far as the sysctl allows. Large buffers keep a
/// burst of GSO/GRO batches from overflowing the socket (measured: 100 k+ retransmits without).
pub(crate) fn set_socket_buffers(fd: &impl AsFd, bytes: usize) {
    if nixsock::setsockopt(fd, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = nixsock::setsockopt(fd, sockopt::RcvBuf, &bytes);
    }
    if nixsock::setsockopt(fd, sockopt::SndBufForce, &bytes).is_err() {
        let _ = nixsock::setsockopt(fd, sockopt::SndBuf, &bytes);
    }
}

/// What `fork` returned to us.
#[derive(Debug)]
pub(crate) enum Forked {
    Parent,
    Child,
}

/// Forks the process. Only call while the process has a single thread: the child gets a copy
/// of the calling thread only.
pub(crate) fn fork() -> io::Result<Forked> {
    // SAFETY: called before any thread is spawned (the daemon forks right after creating the
    // TUN device and UAPI socket), so the child inherits no lock held by another thread.
    match unsafe { nix::unistd::fork() }.map_err(os)? {
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
        nix::unistd::ForkResult::Parent { .. } => Ok(Forked::Parent),
    }
}

/// Starts a new session so the daemon leaves its caller's terminal and process group.
pub(crate) fn setsid() -> io::Result<()> {
    nix::unistd::setsid().map(drop).map_err(os)
}

/// Sets the file-mode creation mask; returns the previous one.
pub(crate) fn umask(mask: u32) -> u32 {
    let mode = nix::sys::stat::Mode::from_bits_truncate(mask as libc::mode_t);
    nix::sys::stat::umask(mode).bits()
}

/// The index of interface `name` in our network namespace, `None` when it does not exist.
pub(crate) fn if_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// Redirects stdin to /dev/null so a daemon holds no terminal input.
pub(crate) fn stdin_to_devnull() -> io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&null).map_err(os)
}

/// Waits up to `timeout_ms` for any of `fds` (at most 4; -1 for an absent one) to become
/// readable (`write` false) or writable (`write` true). Returns a bit per fd that is ready; 0 on
/// timeout or EINTR. Raw poll(2) rather than nix's: its `PollFd` cannot stand for an absent
/// socket, which the receive loops' fixed bit positions need, and this runs once per batch on
/// the packet path, so it builds nothing on the heap.
pub(crate) fn wait_ready(fds: &[i32], write: bool, timeout_ms: i32) -> io::Result<u32> {
    let events = if write { libc::POLLOUT } else { libc::POLLIN };
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let n = fds.len().min(pfds.len());
    for (p, fd) in pfds.iter_mut().zip(fds) {
        p.fd = *fd;
        p.events = events;
    }
    // SAFETY: `pfds` is a local array of `n` initialised pollfd structs that outlives the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    let mut ready = 0;
    for (i, p) in pfds[..n].iter().enumerate() {
        if p.revents != 0 {
            ready |= 1 << i;
        }
    }
    Ok(ready)
}

/// Steers the datagrams a `SO_REUSEPORT` group of UDP sockets receives by WireGuard message
/// type: data messages (type 4) to the group's first socket, everything else (handshake
/// initiations and responses, cookie replies, junk) to its second. So a handshake flood fills
/// the second socket's receive queue, never the first's, and established sessions' packets are
/// not dropped by the kernel behind it (issue 14). A classic BPF program: for a reuseport
/// group the kernel runs it with the packet's data at the UDP payload, and its return value is
/// the index of the socket (in the order they joined the group).
pub(crate) fn steer_by_message_type(fd: &impl AsFd) -> io::Result<()> {
    const BPF_LD_B_ABS: u16 = 0x30; // A = payload[k] (a too-short payload ends the program: 0)
    const BPF_JEQ_K: u16 = 0x15; // A == k ? skip jt : skip jf
    const BPF_RET_K: u16 = 0x06; // return k
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut program = [
        insn(BPF_LD_B_ABS, 0, 0, 0),
        insn(BPF_JEQ_K, 0, 1, u32::from(crate::packet::MSG_DATA)),
        insn(BPF_RET_K, 0, 0, 0),
        insn(BPF_RET_K, 0, 0, 1),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `program` outlives it.
    nixsock::setsockopt(fd, sockopt::AttachReusePortCbpf, &fprog).map_err(os)
}

/// Sets `IFLA_GSO_MAX_SIZE` of interface `ifindex` over rtnetlink: the largest TSO
/// super-packet the kernel hands us on that TUN device.
pub(crate) fn set_gso_max_size(ifindex: u32, size: u32) -> io::Result<()> {
    let mut attrs = Vec::with_capacity(8);
    push_rtattr(&mut attrs, libc::IFLA_GSO_MAX_SIZE, &size.to_ne_bytes());
    rtnl_setlink(ifindex, &attrs)
}

/// `IPV4_DEVCONF_RP_FILTER` in `<linux/ip.h>`: the index of `rp_filter` among an interface's
/// IPv4 settings (`IFLA_INET_CONF` attributes are numbered by it).
const IPV4_DEVCONF_RP_FILTER: u16 = 8;
/// `IFLA_INET_CONF` in `<linux/if_link.h>`: the nested IPv4 settings inside `AF_INET`.
const IFLA_INET_CONF: u16 = 1;

/// Sets `rp_filter` of interface `ifindex` (0 off, 1 strict, 2 loose) over rtnetlink, the way
/// `/proc/sys/net/ipv4/conf/IFNAME/rp_filter` would, but with CAP_NET_ADMIN alone: the
/// sandboxed daemon sees `/proc/sys` read-only (`ProtectKernelTunables=`).
pub(crate) fn set_rp_filter(ifindex: u32, value: u32) -> io::Result<()> {
    // IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { RP_FILTER: u32 } } }
    let mut conf = Vec::with_capacity(8);
    push_rtattr(&mut conf, IPV4_DEVCONF_RP_FILTER, &value.to_ne_bytes());
    let mut inet_conf = Vec::with_capacity(12);
    push_rtattr(&mut inet_conf, IFLA_INET_CONF, &conf);
    let mut inet = Vec::with_capacity(16);
    push_rtattr(&mut inet, libc::AF_INET as u16, &inet_conf);
    let mut attrs = Vec::with_capacity(20);
    push_rtattr(&mut attrs, libc::IFLA_AF_SPEC, &inet);
    rtnl_setlink(ifindex, &attrs)
}

/// Appends one rtattr (length, type, payload padded to 4 bytes) in native byte order.
fn push_rtattr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (4 - len % 4) % 4, 0);
}

/// Sends one `RTM_NEWLINK` for interface `ifindex` carrying `attrs` (rtattrs, already padded)
/// and waits for the kernel's acknowledgement.
fn rtnl_setlink(ifindex: u32, attrs: &[u8]) -> io::Result<()> {
    // nlmsghdr (16) + ifinfomsg (16) + the attributes, native byte order as rtnetlink expects.
    let len = 32 + attrs.len();
    let mut req = vec![0u8; len];
    req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
                                                     // ifinfomsg: family AF_UNSPEC, type 0, index, flags 0, change 0.
    req[20..24].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    req[32..].copy_from_slice(attrs);

    let fd = nixsock::socket(
        nixsock::AddressFamily::Netlink,
        nixsock::SockType::Raw,
        nixsock::SockFlag::SOCK_CLOEXEC,
        nixsock::SockProtocol::NetlinkRoute,
    )
    .map_err(os)?;
    let kernel = nixsock::NetlinkAddr::new(0, 0);
    nixsock::sendto(fd.as_raw_fd(), &req, &kernel, nixsock::MsgFlags::empty()).map_err(os)?;
    let mut ack = [0u8; 512];
    let got = nixsock::recv(fd.as_raw_fd(), &mut ack, nixsock::MsgFlags::empty()).map_err(os)?;
    // The answer is an NLMSG_ERROR whose first field is 0 (success) or a negative errno.
    let msg_type = u16::from_ne_bytes([ack[4], ack[5]]);
    let code = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
    if got >= 20 && msg_type == libc::NLMSG_ERROR as u16 && code == 0 {
        Ok(())
    } else if code < 0 {
        Err(io::Error::from_raw_os_error(-code))
    } else {
        Err(io::Error::other("unexpected rtnetlink answer"))
    }
}

/// Lets the kernel fragment our outer datagrams as the kernel's WireGuard does (it sends with
/// DF clear): IPv4 `IP_PMTUDISC_DONT`, IPv6 `IPV6_PMTUDISC_DONT` and `IPV6_DONTFRAG` off.
/// quinn-udp sets the opposite (a QUIC stack does its own path MTU discovery); called after it.
pub(crate) fn allow_fragmentation(fd: &(impl AsRawFd + AsFd), v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        )?;
        nixsock::setsockopt(fd, sockopt::Ipv6DontFrag, &false).map_err(os)
    } else {
        setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )
    }
}

/// The MTU of the route to `dst` (`IP_MTU`/`IPV6_MTU` of a UDP socket connected to it; no
/// datagram is sent).
pub(crate) fn route_mtu(dst: std::net::SocketAddr) -> io::Result<u32> {
    let domain = if dst.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    sock.connect(&dst.into())?;
    // nix has IP_MTU but no IPV6_MTU: one helper reads both the same way.
    let value = if dst.is_ipv4() {
        getsockopt_int(&sock, libc::IPPROTO_IP, libc::IP_MTU)?
    } else {
        getsockopt_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_MTU)?
    };
    u32::try_from(value).map_err(|_| io::Error::other("negative MTU"))
}

/// An `ifreq` with only the name and one int-sized field, as TUNGETIFF and SIOCGIFMTU use it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    value: i32,
    _pad: [u8; 20],
}

/// Reads the MTU of the TUN interface behind a file descriptor wherever the interface lives:
/// it may have been moved to another network namespace (the kernel selftest does), where our
/// sockets cannot see it by name. `TUNGETDEVNETNS` gives that namespace; a socket opened in it
/// (by a short-lived thread that enters it) is kept until the interface moves again.
#[derive(Debug, Default)]
pub(crate) struct TunMtuReader {
    /// (device, inode) of the namespace `sock` lives in.
    netns: Option<(u64, u64)>,
    sock: Option<OwnedFd>,
}

impl TunMtuReader {
    pub(crate) fn read(&mut self, tun: &impl AsRawFd) -> io::Result<u32> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            value: 0,
            _pad: [0; 20],
        };
        // SAFETY: TUNGETIFF writes an ifreq (name and flags) into `req`, which is large enough.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNGETIFF, &mut req) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNGETDEVNETNS takes no argument and returns a new descriptor (or -1).
        let raw = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNGETDEVNETNS) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let ns = unsafe { OwnedFd::from_raw_fd(raw) };
        let meta = std::fs::File::from(ns);
        let id = {
            use std::os::unix::fs::MetadataExt;
            let m = meta.metadata()?;
            (m.dev(), m.ino())
        };
        if self.netns != Some(id) || self.sock.is_none() {
            self.sock = Some(socket_in_netns(meta)?);
            self.netns = Some(id);
        }
        let sock = self
            .sock
            .as_ref()
            .ok_or_else(|| io::Error::other("no socket"))?;
        req.value = 0;
        // SAFETY: SIOCGIFMTU reads the name from `req` and writes the MTU into its int field.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } != 0 {
            return Err(io::Error::last_os_error());
        }
        u32::try_from(req.value).map_err(|_| io::Error::other("negative MTU"))
    }
}

/// A datagram socket in the network namespace `ns` refers to. Entering a namespace changes only
/// the calling thread, so a throwaway thread does it; the socket stays in that namespace.
fn socket_in_netns(ns: std::fs::File) -> io::Result<OwnedFd> {
    std::thread::spawn(move || {
        // Affects only this thread, which ends right after creating the socket.
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(os)?;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        Ok(OwnedFd::from(sock))
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// Makes the child `cmd` starts get SIGKILL when the thread that started it ends (with the
/// daemon): a helper like `nft monitor` must not outlive the gateway.
pub(crate) fn end_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(os)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_mtu_reads_the_loopback_mtu_for_both_families() {
        // Both families go through the same getsockopt helper and must agree with what the
        // interface says, within each family's largest path MTU (IP_MAX_MTU 65535, IP6_MAX_MTU
        // 65535 + the 40-byte header): loopback's 65536 reads as 65535 for IPv4.
        let lo: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .expect("no /sys/class/net/lo/mtu")
            .trim()
            .parse()
            .expect("lo's MTU is a number");
        assert_eq!(
            route_mtu("127.0.0.1:9".parse().unwrap()).unwrap(),
            lo.min(65_535)
        );
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            assert_eq!(
                route_mtu("[::1]:9".parse().unwrap()).unwrap(),
                lo.min(65_575)
            );
        }
    }
}
