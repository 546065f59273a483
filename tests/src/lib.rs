//! Test support for komnet's end-to-end tests in network namespaces.
//!
//! Everything here drives real processes: `ip netns`, veth pairs, TUN devices created by
//! userspace WireGuard daemons (`komnet-gateway` or Debian's stock `wireguard-go`), configured
//! with the stock `wg` tool over the UAPI socket `/run/wireguard/IFNAME.sock`.
//!
//! Ground rules the helpers enforce:
//! - All traffic stays inside namespaces created here, joined only by veth pairs.
//! - Every resource is an RAII guard ([`Netns`], [`Daemon`], [`TempDir`], [`Tunnel`]) that is
//!   released on drop, also while a failing test unwinds; processes are ended by PID only.
//! - Nothing is skipped: [`require_root_and_tools`] panics and names what is missing.
//! - Every external command runs with a timeout, so a wedged tunnel fails a test instead of
//!   hanging it, and errors quote the command with its output.
//! - Names (namespaces, interfaces, subnets) are unique per process and per fixture, so tests
//!   run in parallel. Interface names must be unique machine-wide: the UAPI socket directory
//!   `/run/wireguard` is shared by all namespaces.

pub mod bgp;
mod command;
pub mod conformance;
pub mod console;
mod daemon;
pub mod dhcp;
pub mod district;
pub mod flood;
mod netns;
mod ping;
mod seen;
mod switch;
mod transfer;
mod tunnel;
mod wg;

pub use command::{
    describe, host, run, run_ok, run_with_input, wait_until, write_private_file, BackgroundProcess,
    CommandOutput, TempDir,
};
pub use daemon::{
    is_socket_path, komnet_cli_binary, komnet_console_binary, komnet_enroll_binary,
    komnet_gateway_binary, netprobe_binary, process_executable, same_executable, uapi_socket_path,
    wireguard_go_2023_binary, Daemon, DaemonKind,
};
pub use netns::{add_veth_pair, parse_link_stats, LinkStats, Netns};
pub use ping::{parse_ping_summary, ping, ping_until_reply, PingSummary};
pub use seen::SeenBySource;
pub use switch::Switch;
pub use transfer::{start_transfer, write_random_file, RunningTransfer, TransferReport};
pub use tunnel::{End, Side, Tunnel, TunnelConfig, UnderlayFamily};
pub use wg::{parse_wg_dump, unix_now, wg_quick, KeyPair, WgDump, WgPeer};

use anyhow::{anyhow, Context, Result};
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Timeout for ordinary short commands (`ip`, `wg`, `sha256sum`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets to create its UAPI socket after being started.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon gets to exit after SIGTERM before it is killed.
pub const DAEMON_STOP_GRACE: Duration = Duration::from_secs(2);
/// Tunnel MTU: 1500 (veth) minus the 80 bytes of IPv6 + UDP + WireGuard overhead.
pub const TUNNEL_MTU: u32 = 1420;
/// Underlay MTU of the veth pair.
pub const UNDERLAY_MTU: u32 = 1500;
/// Where wireguard-go compatible daemons put their UAPI sockets.
pub const UAPI_SOCKET_DIR: &str = "/run/wireguard";

/// Process-wide counter behind every unique name and subnet.
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

pub(crate) fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Tools the tests call; each must be on `PATH`.
const REQUIRED_TOOLS: &[&str] = &[
    "ip",
    "bridge",
    "nft",
    "wg",
    "wg-quick",
    "wireguard-go",
    "iperf3",
    "ping",
    "sha256sum",
    "kill",
    // An enrollment service whose clock runs behind (certificates that have expired by now).
    "faketime",
    // DHCP on a spoke's LAN: the appliance's server (Debian's dnsmasq-base), a client
    // (busybox's udhcpc), and setpriv to run the server with only its unit's capabilities.
    "dnsmasq",
    "udhcpc",
    "setpriv",
];

/// Panics with a message naming everything that is missing for the namespace tests: root,
/// `/dev/net/tun`, the ability to create a network namespace, and the tools they run.
/// The tests are never skipped silently; `scripts/setup.sh` installs the tools.
/// The check runs once per test process; later calls repeat its verdict.
pub fn require_root_and_tools() {
    static VERDICT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(problems) = VERDICT.get_or_init(check_machine) {
        panic!("{problems}");
    }
}

fn check_machine() -> Result<(), String> {
    let mut problems = Vec::new();
    let is_root = match effective_uid() {
        Ok(0) => true,
        Ok(uid) => {
            problems.push(format!(
                "not running as root (effective uid {uid}): network namespaces, veth pairs and \
                 TUN devices need root; run `sudo scripts/test.sh`"
            ));
            false
        }
        Err(err) => {
            problems.push(format!("cannot tell whether we run as root: {err:#}"));
            false
        }
    };
    match fs::metadata("/dev/net/tun") {
        Ok(meta) if meta.file_type().is_char_device() => {}
        Ok(_) => problems.push("/dev/net/tun exists but is not a character device".to_owned()),
        Err(err) => problems.push(format!(
            "/dev/net/tun is missing ({err}): the daemons cannot create TUN interfaces \
             (in a container, pass the device through)"
        )),
    }
    for tool in REQUIRED_TOOLS {
        if find_on_path(tool).is_none() {
            problems.push(format!(
                "`{tool}` is not on PATH (scripts/setup.sh installs the system packages)"
            ));
        }
    }
    if is_root && find_on_path("ip").is_some() {
        for leftover in remove_leftovers_of_dead_runs() {
            eprintln!("removed a leftover of an interrupted test run: {leftover}");
        }
        // Creating (and dropping) one namespace proves the kernel and the mount of /run/netns
        // cooperate; it also gets iproute2's one-time /run/netns setup done before tests race.
        if let Err(err) = Netns::new("check") {
            problems.push(format!("cannot create a network namespace: {err:#}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the network-namespace tests cannot run on this machine:\n  - {}",
            problems.join("\n  - ")
        ))
    }
}

/// The effective uid, from `/proc/self/status` (no unsafe `geteuid` call needed).
fn effective_uid() -> Result<u32> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let uid_line = status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .ok_or_else(|| anyhow!("/proc/self/status has no Uid: line"))?;
    // Fields: real, effective, saved set, filesystem.
    let effective = uid_line
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| anyhow!("malformed Uid: line {uid_line:?}"))?;
    effective
        .parse()
        .with_context(|| format!("malformed Uid: line {uid_line:?}"))
}

/// The first executable file called `name` in the directories of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Removes what test processes that died without unwinding (killed, Ctrl-C) left behind:
/// namespaces `knt-PID-...` (with the processes in them), UAPI sockets `knPID-...sock` and
/// temp dirs `komnet-netns-PID-...` whose PID no longer exists. Only names this library makes
/// are touched. Returns what it removed.
fn remove_leftovers_of_dead_runs() -> Vec<String> {
    let dead = |pid: &str| -> bool {
        !pid.is_empty()
            && pid.bytes().all(|byte| byte.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
    };
    let mut removed = Vec::new();
    if let Ok(list) = host("ip", &["netns", "list"]) {
        for name in list
            .lines()
            .filter_map(|line| line.split_whitespace().next())
        {
            let pid = name
                .strip_prefix("knt-")
                .and_then(|rest| rest.split('-').next());
            if pid.is_some_and(dead) {
                netns::end_processes_and_delete(name);
                removed.push(format!("namespace {name}"));
            }
        }
    }
    if let Ok(entries) = fs::read_dir(UAPI_SOCKET_DIR) {
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let pid = file_name
                .strip_prefix("kn")
                .filter(|_| file_name.ends_with(".sock"))
                .and_then(|rest| rest.split('-').next());
            if pid.is_some_and(dead) && fs::remove_file(entry.path()).is_ok() {
                removed.push(format!("socket {file_name}"));
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let pid = file_name
                .strip_prefix("komnet-netns-")
                .and_then(|rest| rest.split('-').next());
            if pid.is_some_and(dead) && fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(format!("temp dir {file_name}"));
            }
        }
    }
    removed
}

/// Removes what this process created when it is interrupted (Ctrl-C) and destructors will not
/// run: every namespace named `knt-PID-…` (ending the processes inside) and every temporary
/// directory `komnet-netns-PID-…`.
pub fn cleanup_after_interrupt() {
    let prefix = format!("knt-{}-", std::process::id());
    if let Ok(list) = command::host("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(&prefix) {
                netns::end_processes_and_delete(name);
            }
        }
    }
    let dir_prefix = format!("komnet-netns-{}-", std::process::id());
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&dir_prefix) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}
