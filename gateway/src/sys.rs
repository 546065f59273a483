//! The few syscalls no safe wrapper covers. The only module of the crate with `unsafe`; every
//! block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `fd` is a live socket borrowed for the call; we pass a pointer to a local i32
    // and its exact size, which is what these SOL_SOCKET options read.
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

/// Sets SO_RCVBUF/SO_SNDBUF to `bytes`, past `net.core.{r,w}mem_max` when we have
/// CAP_NET_ADMIN (the FORCE variants), else as far as the sysctl allows. Large buffers keep a
/// burst of GSO/GRO batches from overflowing the socket (measured: 100 k+ retransmits without).
pub(crate) fn set_socket_buffers(fd: &impl AsRawFd, bytes: i32) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, bytes).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, bytes);
        }
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
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        _ => Ok(Forked::Parent),
    }
}

/// Starts a new session so the daemon leaves its caller's terminal and process group.
pub(crate) fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments and only changes this process's session.
    if unsafe { libc::setsid() } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the file-mode creation mask; returns the previous one.
pub(crate) fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail and touches only the process's mask.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// The index of interface `name` in our network namespace, `None` when it does not exist.
pub(crate) fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Redirects stdin to /dev/null so a daemon holds no terminal input.
pub(crate) fn stdin_to_devnull() -> io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: both descriptors are valid; dup2 atomically replaces fd 0.
    if unsafe { libc::dup2(null.as_raw_fd(), 0) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout_ms` for any of `fds` (at most 4) to become readable (`write` false)
/// or writable (`write` true). Returns a bit per fd that is ready; 0 on timeout or EINTR.
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
