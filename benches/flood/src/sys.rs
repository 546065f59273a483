//! The system calls: sockets bound to (possibly non-local) source addresses, and the
//! `sendmmsg` loop. The only module with `unsafe`.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::INIT_LEN;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

/// A UDP socket bound to `src` (IP_FREEBIND: the address need not be configured, only routed
/// back here), with a big send buffer and, for `gso`, UDP segmentation of `INIT_LEN`.
pub(crate) fn udp_socket(src: SocketAddr, gso: bool) -> io::Result<Socket> {
    let domain = if src.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if src.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_freebind_v6(true)?;
    }
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&src.into())?;
    if gso {
        let seg = INIT_LEN as libc::c_int;
        // SAFETY: `seg` outlives the call and its size is passed; the fd is open.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                SOL_UDP,
                UDP_SEGMENT,
                (&seg as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(s)
}

/// When a sender stops.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub(crate) start: Instant,
    pub(crate) duration: Duration,
    pub(crate) count: u64,
    /// Datagrams per second for this thread; 0: as fast as possible.
    pub(crate) rate: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Sent {
    pub(crate) sent: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

/// Sends the initiations `init` (cycled) to `target` over `sockets` in turn, `batch` messages
/// of `gso` datagrams per `sendmmsg`, until the bounds say stop.
pub(crate) fn flood(
    sockets: &[Socket],
    target: SocketAddr,
    init: &[[u8; INIT_LEN]],
    batch: usize,
    gso: usize,
    bounds: Bounds,
) -> Sent {
    let mut result = Sent::default();
    for s in sockets {
        if let Err(e) = s.connect(&target.into()) {
            result.errors += 1;
            result.first_error = Some(format!("connect: {e}"));
            return result;
        }
    }
    // All initiations back to back, plus `gso - 1` of them again at the end, so that every
    // starting index has `gso` contiguous datagrams after it.
    let n = init.len();
    let mut data: Vec<u8> = Vec::with_capacity((n + gso) * INIT_LEN);
    for i in 0..n + gso {
        data.extend_from_slice(&init[i % n]);
    }
    let msg_len = gso * INIT_LEN;
    let mut iovs: Vec<libc::iovec> = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: msg_len,
        };
        batch
    ];
    // SAFETY: mmsghdr is plain data; all-zero is a valid value (no name, no control).
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; batch];
    let mut next = 0usize;
    let per_call = (batch * gso) as u64;
    'run: loop {
        for s in sockets {
            let elapsed = bounds.start.elapsed();
            if elapsed >= bounds.duration || result.sent >= bounds.count {
                break 'run;
            }
            if bounds.rate > 0 {
                let allowed = (bounds.rate as f64 * elapsed.as_secs_f64()) as u64 + per_call;
                if result.sent >= allowed {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
            }
            for (iov, msg) in iovs.iter_mut().zip(msgs.iter_mut()) {
                iov.iov_base = data[next * INIT_LEN..].as_ptr() as *mut libc::c_void;
                next = (next + gso) % n;
                msg.msg_hdr.msg_iov = iov;
                msg.msg_hdr.msg_iovlen = 1;
                msg.msg_len = 0;
            }
            // SAFETY: `msgs` holds `batch` headers, each pointing at one iovec in `iovs` that
            // points into `data`, all alive across the call; the socket is connected, so no
            // names are needed.
            let r = unsafe {
                libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), batch as libc::c_uint, 0)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                result.errors += 1;
                if result.first_error.is_none() {
                    result.first_error = Some(e.to_string());
                }
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    std::thread::yield_now();
                }
                continue;
            }
            result.sent += r as u64 * gso as u64;
        }
    }
    result
}
