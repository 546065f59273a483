//! `komnet-gateway [-f|--foreground] IFNAME`: the daemon, command-line compatible with
//! wireguard-go so `wg`, `wg-quick` (`WG_QUICK_USERSPACE_IMPLEMENTATION=komnet-gateway`) and
//! scripts written for wireguard-go drive it unchanged.
//!
//! Start-up order matters: the TUN device and the UAPI socket are created while the process
//! is still single-threaded, so errors reach the caller's terminal and the exit code, and only
//! then does the process fork into the background (unless `-f` or `WG_PROCESS_FOREGROUND=1`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use komnet_proto::logging;
use rand::RngCore;

use crate::core::Core;
use crate::driver::{self, Event, Shared, Sockets};
use crate::sys;
use crate::uapi::{self, Operation, UapiError, ERRNO_IO, ERRNO_PORT_IN_USE, ERRNO_PROTOCOL};

const SOCKET_DIR: &str = "/run/wireguard";
/// Default tunnel MTU, as wireguard-go: 1500 minus the largest (IPv6) WireGuard overhead.
const DEFAULT_MTU: u16 = 1420;
/// Longest UAPI line we accept; the longest legitimate one (an IPv6 endpoint) is < 100 bytes.
const MAX_UAPI_LINE: u64 = 4096;
/// Most lines in one `set=1` request (1,000 peers with a few allowed IPs each need ~10,000).
const MAX_UAPI_LINES: usize = 1_000_000;

/// The daemon's command line (the binary parses it: `[-f|--foreground] IFNAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Stay in the foreground instead of forking once the interface and socket exist.
    pub foreground: bool,
    /// The TUN interface to create, already checked against the kernel's naming rules.
    pub ifname: String,
}

/// The programs' one logging setup; wireguard-go's `LOG_LEVEL` (verbose, error, silent) is
/// honoured, `RUST_LOG` overrides it.
pub(crate) fn init_logging(format: logging::Format) {
    let level = std::env::var("LOG_LEVEL").ok();
    logging::init(format, logging::wireguard_go_level(level.as_deref()));
}

fn socket_path(ifname: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// Binds the UAPI socket with mode 0600 (root only: it hands out the private key).
fn bind_uapi(path: &Path) -> Result<UnixListener> {
    std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{} is served by another running daemon", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let old = sys::umask(0o077);
    let listener = UnixListener::bind(path);
    sys::umask(old);
    let listener = listener.with_context(|| format!("binding UAPI socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(listener)
}

/// Largest TSO super-packet we let the kernel build on our TUN device. Its segments, each
/// grown by 32 bytes of WireGuard overhead, must fit one UDP GSO send (65,507 bytes): at the
/// usual MTU of 1420 the default 64 KiB super-packet is 47 segments and needs a second
/// `sendmsg` for the last two; 60,000 bytes is at most 44 (measured: ~3 % more throughput).
const TUN_GSO_MAX_SIZE: u32 = 60_000;

pub(crate) fn create_tun(ifname: &str) -> Result<tun_rs::SyncDevice> {
    let with_offload = tun_rs::DeviceBuilder::new()
        .name(ifname)
        .mtu(DEFAULT_MTU)
        .offload(true)
        .build_sync();
    match with_offload {
        Ok(dev) => Ok(dev),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(anyhow::anyhow!(
            "interface {ifname} already exists and is in use (another daemon running for it?)"
        )),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(anyhow::anyhow!(
            "creating TUN interface {ifname}: permission denied (needs root or CAP_NET_ADMIN)"
        )),
        Err(e) => {
            // Kernels without TUN offloads still work, one packet per read.
            tracing::warn!(error = %e, "TUN offloads unavailable; continuing without them");
            tun_rs::DeviceBuilder::new()
                .name(ifname)
                .mtu(DEFAULT_MTU)
                .build_sync()
                .with_context(|| {
                    format!(
                        "creating TUN interface {ifname} (is /dev/net/tun there, and are we root?)"
                    )
                })
        }
    }
}

/// Runs the daemon; returns the process exit code.
pub fn run(args: Args) -> Result<i32> {
    let foreground =
        args.foreground || std::env::var("WG_PROCESS_FOREGROUND").as_deref() == Ok("1");
    komnet_proto::config::check_interface_name(&args.ifname).map_err(anyhow::Error::msg)?;
    init_logging(logging::Format::Text);
    let tun = create_tun(&args.ifname)?;
    if let Some(index) = sys::if_index(&args.ifname) {
        if let Err(e) = sys::set_gso_max_size(index, TUN_GSO_MAX_SIZE) {
            tracing::debug!(error = %e, "cannot set gso_max_size; large sends take two syscalls");
        }
    }
    let path = socket_path(&args.ifname);
    let listener = bind_uapi(&path)?;
    let sockets = match Sockets::bind(0, 0) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e).context("binding UDP sockets");
        }
    };

    if !foreground {
        match sys::fork().context("fork")? {
            sys::Forked::Parent => return Ok(0),
            sys::Forked::Child => {
                sys::setsid().context("setsid")?;
                sys::stdin_to_devnull().context("stdin")?;
            }
        }
    }

    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let mut core = Core::new(Instant::now(), seed);
    core.set_listen_port(sockets.port());
    let shared = Shared::new(core, None, tun, args.ifname.clone(), sockets)
        .context("creating the wake-up pipe")?;
    let (events_tx, events) = channel();
    driver::spawn(&shared, &events_tx).context("starting driver threads")?;
    spawn_uapi(listener, shared.clone()).context("starting UAPI thread")?;
    spawn_signals(events_tx.clone()).context("installing signal handlers")?;
    tracing::info!(interface = %args.ifname, socket = %path.display(), "komnet-gateway running");

    let reason = events
        .recv()
        .unwrap_or(Event::Fatal("all event senders gone".into()));
    shared.stop();
    let _ = std::fs::remove_file(&path);
    match reason {
        Event::InterfaceGone => {
            tracing::info!(interface = %args.ifname, "interface deleted; shutting down");
            Ok(0)
        }
        Event::Signal(sig) => {
            tracing::info!(signal = sig, "shutting down");
            Ok(0)
        }
        Event::Fatal(msg) => {
            tracing::error!(error = %msg, "shutting down");
            Ok(1)
        }
    }
}

pub(crate) fn spawn_signals(events: Sender<Event>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = events.send(Event::Signal(sig));
            }
        })?;
    Ok(())
}

fn spawn_uapi(listener: UnixListener, shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("uapi".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("uapi-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_uapi(conn, &shared) {
                                tracing::debug!(error = %e, "UAPI connection");
                            }
                        });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot serve UAPI connection");
                }
            }
        })?;
    Ok(())
}

/// Reads one line without its newline, refusing over-long lines. `None` at end of stream.
fn read_line(r: &mut impl BufRead, line: &mut String) -> std::io::Result<Option<()>> {
    line.clear();
    let n = r.by_ref().take(MAX_UAPI_LINE).read_line(line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "UAPI line too long or unterminated",
        ));
    }
    line.pop();
    Ok(Some(()))
}

/// Serves requests on one UAPI connection until the client closes it.
fn serve_uapi(conn: UnixStream, shared: &Shared) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        let first = match read_line(&mut reader, &mut line) {
            Ok(Some(())) => line.clone(),
            Ok(None) => return Ok(()),
            Err(e) => {
                let err = UapiError::new(ERRNO_PROTOCOL, 0, e.to_string());
                writer.write_all(uapi::format_errno(Err(&err)).as_bytes())?;
                return Ok(());
            }
        };
        let op = match uapi::parse_operation(&first) {
            Ok(op) => op,
            Err(err) => {
                tracing::warn!(%err, "UAPI request refused");
                writer.write_all(uapi::format_errno(Err(&err)).as_bytes())?;
                return Ok(());
            }
        };
        let mut body = Vec::new();
        let mut read_error = None;
        loop {
            match read_line(&mut reader, &mut line) {
                Ok(Some(())) if line.is_empty() => break,
                Ok(Some(())) if body.len() >= MAX_UAPI_LINES => {
                    read_error = Some(UapiError::new(
                        ERRNO_PROTOCOL,
                        body.len() + 2,
                        "request has too many lines",
                    ));
                    break;
                }
                Ok(Some(())) => body.push(line.clone()),
                Ok(None) => {
                    read_error = Some(UapiError::new(
                        ERRNO_PROTOCOL,
                        body.len() + 2,
                        "request ended without an empty line",
                    ));
                    break;
                }
                Err(e) => {
                    read_error = Some(UapiError::new(ERRNO_IO, body.len() + 2, e.to_string()));
                    break;
                }
            }
        }
        if let Some(err) = read_error {
            tracing::warn!(%err, "UAPI request refused");
            writer.write_all(uapi::format_errno(Err(&err)).as_bytes())?;
            return Ok(());
        }
        let answer = match op {
            Operation::Get if !body.is_empty() => {
                let err = UapiError::new(ERRNO_PROTOCOL, 2, "get=1 takes no arguments");
                uapi::format_errno(Err(&err))
            }
            Operation::Get => {
                let mut core = shared.core();
                uapi::format_get(&mut core, Instant::now(), SystemTime::now())
            }
            Operation::Set => {
                let result = uapi::parse_set(body.iter().map(String::as_str))
                    .and_then(|set| apply(shared, &set));
                if let Err(err) = &result {
                    tracing::warn!(%err, "UAPI set refused; configuration unchanged");
                }
                uapi::format_errno(result.as_ref().map(|_| ()))
            }
        };
        writer.write_all(answer.as_bytes())?;
    }
}

/// Applies a validated `set`: sockets first (the only step that can fail), then the core.
fn apply(shared: &Shared, set: &uapi::DeviceSet) -> Result<(), UapiError> {
    let current = shared.sockets();
    let fwmark = set.fwmark.unwrap_or_else(|| shared.core().fwmark());
    let new_sockets = match set.listen_port {
        Some(port) if port != current.port() => Some(Sockets::bind(port, fwmark).map_err(|e| {
            let errno = if e.kind() == std::io::ErrorKind::AddrInUse {
                ERRNO_PORT_IN_USE
            } else {
                ERRNO_IO
            };
            UapiError::new(errno, 0, format!("cannot listen on UDP port {port}: {e}"))
        })?),
        _ => {
            if set.fwmark.is_some() {
                current.set_fwmark(fwmark).map_err(|e| {
                    UapiError::new(ERRNO_IO, 0, format!("cannot set fwmark {fwmark}: {e}"))
                })?;
            }
            None
        }
    };
    {
        let mut core = shared.core();
        uapi::apply_set(&mut core, Instant::now(), set);
        core.set_listen_port(new_sockets.as_ref().map_or(current.port(), Sockets::port));
    }
    if let Some(s) = new_sockets {
        shared.replace_sockets(s);
    }
    shared.flush_pending();
    Ok(())
}
