//! WireGuard daemons (komnet-gateway, wireguard-go) running in a namespace.

use crate::command::{describe, send_signal, tail, wait_until};
use crate::netns::Netns;
use crate::{find_on_path, DAEMON_START_TIMEOUT, DAEMON_STOP_GRACE, UAPI_SOCKET_DIR};
use anyhow::{anyhow, bail, Context, Result};
use std::fmt;
use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Which userspace WireGuard implementation a [`Daemon`] runs. Both follow wireguard-go's CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonKind {
    /// `komnet-gateway` from this workspace's `target/release`.
    Komnet,
    /// Debian's stock `wireguard-go` from `PATH`.
    WireguardGo,
    /// wireguard-go 0.0.20231211, the reference of the conformance tests and benchmarks,
    /// unpacked by `scripts/wireguard-go-2023.sh` (see [`wireguard_go_2023_binary`]).
    WireguardGo2023,
}

impl DaemonKind {
    pub fn label(self) -> &'static str {
        match self {
            DaemonKind::Komnet => "komnet",
            DaemonKind::WireguardGo => "wireguard-go",
            DaemonKind::WireguardGo2023 => "wireguard-go-2023",
        }
    }

    /// The executable to start.
    pub fn binary(self) -> Result<PathBuf> {
        match self {
            DaemonKind::Komnet => komnet_gateway_binary(),
            DaemonKind::WireguardGo => find_on_path("wireguard-go").ok_or_else(|| {
                anyhow!("wireguard-go is not on PATH (scripts/setup.sh installs it)")
            }),
            DaemonKind::WireguardGo2023 => wireguard_go_2023_binary(),
        }
    }
}

impl fmt::Display for DaemonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The release build of `komnet-gateway`: `$KOMNET_GATEWAY_BIN` if set, else
/// `$CARGO_TARGET_DIR/release/komnet-gateway`, else `target/release/komnet-gateway` in the
/// nearest directory above this crate that has one (the workspace root).
pub fn komnet_gateway_binary() -> Result<PathBuf> {
    workspace_binary("komnet-gateway", "KOMNET_GATEWAY_BIN", "komnet-gateway")
}

/// Where `scripts/wireguard-go-2023.sh` puts wireguard-go 0.0.20231211 by default.
const WIREGUARD_GO_2023_DEFAULT: &str =
    "/opt/komnet-peers/wireguard-go-0.0.20231211/usr/bin/wireguard-go";

/// wireguard-go 0.0.20231211: `$KOMNET_WIREGUARD_GO_2023` if set, else where
/// `scripts/wireguard-go-2023.sh` unpacks it (`scripts/test.sh` runs that script first).
pub fn wireguard_go_2023_binary() -> Result<PathBuf> {
    let path = std::env::var_os("KOMNET_WIREGUARD_GO_2023")
        .map_or_else(|| PathBuf::from(WIREGUARD_GO_2023_DEFAULT), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "wireguard-go 0.0.20231211 is not at {} : run `sudo scripts/wireguard-go-2023.sh` \
             (or point KOMNET_WIREGUARD_GO_2023 at it)",
            path.display()
        )
    }
}

/// The release build of the admins' `komnet` CLI, found like [`komnet_gateway_binary`]
/// (`$KOMNET_CLI_BIN` overrides).
pub fn komnet_cli_binary() -> Result<PathBuf> {
    workspace_binary("komnet", "KOMNET_CLI_BIN", "komnet-cli")
}

/// The release build of the enrollment service, found like [`komnet_gateway_binary`]
/// (`$KOMNET_ENROLL_BIN` overrides).
pub fn komnet_enroll_binary() -> Result<PathBuf> {
    workspace_binary("komnet-enroll", "KOMNET_ENROLL_BIN", "komnet-enroll")
}

/// The release build of the web console (`komnet-console`), found like [`komnet_enroll_binary`].
pub fn komnet_console_binary() -> Result<PathBuf> {
    workspace_binary("komnet-console", "KOMNET_CONSOLE_BIN", "komnet-console")
}

pub(crate) fn workspace_binary(name: &str, env_var: &str, package: &str) -> Result<PathBuf> {
    let build_hint = format!("build it with `cargo build --release -p {package}`");
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "{env_var}={} is not a file; {build_hint} or fix the variable",
            path.display()
        );
    }
    if let Some(target_dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let path = PathBuf::from(target_dir).join("release").join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .map(|dir| dir.join("target/release").join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "the {name} binary is missing (no target/release/{name} above {}, {env_var} \
                 unset): {build_hint}",
                manifest_dir.display()
            )
        })
}

/// This crate's `netprobe` (the tests' and demos' traffic tool): `$KOMNET_NETPROBE_BIN` if set,
/// else the one cargo built beside the running program (an integration test in
/// `target/PROFILE/deps/`, or `komnet-demo` in `target/PROFILE/`).
pub fn netprobe_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KOMNET_NETPROBE_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("KOMNET_NETPROBE_BIN={} is not a file", path.display());
    }
    let exe = std::env::current_exe().context("where this program is")?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("netprobe"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "netprobe is missing beside {}: build it with `cargo build -p komnet-netns-tests \
                 --bin netprobe` (cargo test -p komnet-netns-tests builds it) or set \
                 KOMNET_NETPROBE_BIN",
                exe.display()
            )
        })
}

/// The UAPI socket of interface `ifname`.
pub fn uapi_socket_path(ifname: &str) -> PathBuf {
    Path::new(UAPI_SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// A WireGuard daemon running in the foreground inside a namespace:
/// `ip netns exec NS env WG_PROCESS_FOREGROUND=1 BIN -f IFNAME`. Its output goes to a log file.
/// On drop it gets SIGTERM, SIGKILL after 2 s, and its UAPI socket is removed.
#[derive(Debug)]
pub struct Daemon {
    kind: DaemonKind,
    ifname: String,
    child: Child,
    log: PathBuf,
    /// Set once the process has been reaped.
    exit_status: Option<ExitStatus>,
    /// After [`Daemon::kill_hard`] the socket stays, as a crash would leave it.
    leave_socket: bool,
}

impl Daemon {
    /// Starts the daemon and waits until its UAPI socket accepts connections.
    pub fn start(kind: DaemonKind, netns: &Netns, ifname: &str, log_dir: &Path) -> Result<Daemon> {
        let binary = kind.binary()?;
        let log = log_dir.join(format!("{ifname}.{}.log", kind.label()));
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let log_file_for_stderr = log_file
            .try_clone()
            .context("cannot duplicate a log handle")?;
        let mut cmd = netns.command("env");
        // `ip netns exec` and `env` both exec, so the child's PID is the daemon's own PID.
        // LOG_LEVEL=verbose makes wireguard-go log handshakes and dropped packets.
        cmd.args(["WG_PROCESS_FOREGROUND=1", "LOG_LEVEL=verbose"])
            .arg(&binary)
            .args(["-f", ifname])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_file_for_stderr);
        let command = describe(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{command}`"))?;
        // From here on the guard owns the process: an early return kills it.
        let mut daemon = Daemon {
            kind,
            ifname: ifname.to_owned(),
            child,
            log,
            exit_status: None,
            leave_socket: false,
        };
        let socket = uapi_socket_path(ifname);
        let waited = wait_until(
            &format!("{} to create {}", kind.label(), socket.display()),
            DAEMON_START_TIMEOUT,
            || {
                if let Some(status) = daemon.poll_exit() {
                    bail!("`{command}` exited with {status} before creating its UAPI socket");
                }
                // Connectable, not merely present: a crashed predecessor may have left a
                // stale socket file with the same name.
                Ok(UnixStream::connect(&socket).is_ok().then_some(()))
            },
        );
        if let Err(err) = waited {
            return Err(err.context(format!(
                "{} did not come up on {ifname}; its log:\n{}",
                kind.label(),
                daemon.log_tail(40)
            )));
        }
        // Make sure the process is the binary under test (a symlink or a stale path could make
        // it something else, and a test passing against the wrong daemon is worthless).
        let running = process_executable(daemon.pid())?;
        if !same_executable(&running, &binary) {
            bail!(
                "pid {} runs {}, not {}",
                daemon.pid(),
                running.display(),
                binary.display()
            );
        }
        Ok(daemon)
    }

    pub fn kind(&self) -> DaemonKind {
        self.kind
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines the daemon logged.
    pub fn log_tail(&self, lines: usize) -> String {
        match fs::read_to_string(&self.log) {
            Ok(text) => tail(&text, lines),
            Err(err) => format!("[cannot read {}: {err}]", self.log.display()),
        }
    }

    /// `Some(status)` once the process has exited (it is reaped here).
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit_status = Some(status);
            }
        }
        self.exit_status
    }

    /// Errors if the daemon has exited on its own (a crash, as far as a test is concerned).
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.poll_exit() {
            None => Ok(()),
            Some(status) => bail!(
                "{} on {} (pid {}) exited unexpectedly with {status}; its log:\n{}",
                self.kind.label(),
                self.ifname,
                self.pid(),
                self.log_tail(40)
            ),
        }
    }

    /// SIGTERM, then SIGKILL if still alive after [`DAEMON_STOP_GRACE`]; removes the socket.
    /// Returns how the process ended.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.terminate();
        self.exit_status
    }

    /// SIGKILL, as a crash would end it: the daemon cleans nothing up, and its UAPI socket is
    /// left behind, stale, for the next daemon on this interface name to cope with.
    pub fn kill_hard(mut self) -> Option<ExitStatus> {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            self.exit_status = self.child.wait().ok();
        }
        self.leave_socket = true;
        self.exit_status
    }

    fn terminate(&mut self) {
        if self.poll_exit().is_none() {
            send_signal(self.pid(), "TERM");
            let deadline = Instant::now() + DAEMON_STOP_GRACE;
            while self.poll_exit().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if self.poll_exit().is_none() {
                let _ = self.child.kill();
                self.exit_status = self.child.wait().ok();
            }
        }
        let socket = uapi_socket_path(&self.ifname);
        if !self.leave_socket && socket.exists() {
            let _ = fs::remove_file(&socket);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The executable of process `pid` (`/proc/PID/exe`).
pub fn process_executable(pid: u32) -> Result<PathBuf> {
    let link = format!("/proc/{pid}/exe");
    fs::read_link(&link).with_context(|| format!("cannot read {link}"))
}

/// Whether `running` (from [`process_executable`]) is the file `binary`. A binary rebuilt while
/// the process runs shows up as "PATH (deleted)", which still counts.
pub fn same_executable(running: &Path, binary: &Path) -> bool {
    let running = running.to_string_lossy();
    let running = running.trim_end_matches(" (deleted)");
    match fs::canonicalize(binary) {
        Ok(binary) => Path::new(running) == binary,
        Err(_) => false,
    }
}

/// Whether `path` exists and is a UNIX socket.
pub fn is_socket_path(path: &Path) -> bool {
    fs::metadata(path)
        .map(|meta| meta.file_type().is_socket())
        .unwrap_or(false)
}
