//! The handshake flood of issue 14 in namespaces: a hub (the daemon under test), a peer with a
//! session from before the flood, a peer that needs a new handshake during it (Debian's stock
//! wireguard-go), and an attacker holding a compromised peer's key that floods the hub with
//! real initiations (`komnet-flood`, from one address or spread over one /24). The same
//! scenario as `benches/flood.sh`, which measures it; this fixture lets a test assert it.
//!
//! Underlay: the hub has one veth per other namespace (10.240.N.0/24); the attacker's
//! 10.99.0.0/24 is local to its namespace and routed there from the hub. Tunnel: 10.241.0.0/24
//! (hub .1, new peer .2, established peer .3, attacker .4).

use crate::command::{wait_until, write_private_file, TempDir};
use crate::daemon::{workspace_binary, Daemon, DaemonKind};
use crate::netns::{add_veth_pair, Netns};
use crate::wg::KeyPair;
use crate::{next_id, require_root_and_tools, COMMAND_TIMEOUT, TUNNEL_MTU, UNDERLAY_MTU};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The release build of the flood generator (`$KOMNET_FLOOD_BIN` overrides).
pub fn komnet_flood_binary() -> Result<PathBuf> {
    workspace_binary("komnet-flood", "KOMNET_FLOOD_BIN", "komnet-flood")
}

/// What one flood run showed.
#[derive(Debug, Clone)]
pub struct FloodReport {
    /// From the new peer's first packet to its first reply through the tunnel (`None`: none
    /// within the deadline).
    pub first_reply: Option<Duration>,
    /// The generator's own summary (JSON: sent, seconds, rate, ...).
    pub generator: String,
    /// Initiations per second the generator reached.
    pub rate: f64,
    /// Datagrams the hub sent back towards the attacker's namespace during the flood.
    pub to_attacker: u64,
    /// The established peer's pings that went unanswered during the flood, of those sent.
    pub established_lost: (u32, u32),
}

/// How the attacker floods.
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    /// 1: one address; more: spread over addresses and ports of 10.99.0.0/24.
    pub sources: usize,
    pub seconds: u32,
    /// Initiations per second; 0: as fast as the generator goes.
    pub rate: u64,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the scenario once against `hub` and reports.
pub fn run_flood(hub: DaemonKind, flood: Flood) -> Result<FloodReport> {
    require_root_and_tools();
    let generator = komnet_flood_binary()?;
    let id = next_id();
    let dir = TempDir::new(&format!("flood{id}"))?;
    let hub_ns = Netns::new("fh")?;
    let new_ns = Netns::new("fn")?;
    let old_ns = Netns::new("fo")?;
    let atk_ns = Netns::new("fa")?;
    for (n, ns) in [(1, &new_ns), (2, &old_ns), (3, &atk_ns)] {
        let dev = format!("h{n}");
        add_veth_pair(&hub_ns, &dev, ns, "eth0", UNDERLAY_MTU)?;
        hub_ns.ip(&["addr", "add", &format!("10.240.{n}.1/24"), "dev", &dev])?;
        ns.ip(&["addr", "add", &format!("10.240.{n}.2/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", &format!("10.240.{n}.1")])?;
    }
    atk_ns.ip(&["route", "add", "local", "10.99.0.0/24", "dev", "lo"])?;
    hub_ns.ip(&["route", "add", "10.99.0.0/24", "via", "10.240.3.2"])?;

    let pid = std::process::id();
    let (hub_if, new_if, old_if) = (
        format!("kf{pid}-{id}h"),
        format!("kf{pid}-{id}n"),
        format!("kf{pid}-{id}o"),
    );
    let keys = [
        KeyPair::generate()?,
        KeyPair::generate()?,
        KeyPair::generate()?,
        KeyPair::generate()?,
    ];
    let [hub_key, new_key, old_key, atk_key] = &keys;
    let key_file = |name: &str, k: &KeyPair| -> Result<String> {
        let path = dir.path().join(format!("{name}.key"));
        write_private_file(&path, &format!("{}\n", k.private))?;
        Ok(path.to_string_lossy().into_owned())
    };
    let _hub = Daemon::start(hub, &hub_ns, &hub_if, dir.path())?;
    hub_ns.exec(&[
        "wg",
        "set",
        &hub_if,
        "private-key",
        &key_file("hub", hub_key)?,
        "listen-port",
        "51820",
        "peer",
        &new_key.public,
        "allowed-ips",
        "10.241.0.2/32",
        "peer",
        &old_key.public,
        "allowed-ips",
        "10.241.0.3/32",
        "peer",
        &atk_key.public,
        "allowed-ips",
        "10.241.0.4/32",
    ])?;
    hub_ns.ip(&["addr", "add", "10.241.0.1/24", "dev", &hub_if])?;
    hub_ns.set_link_up(&hub_if, TUNNEL_MTU)?;
    let mut peers = Vec::new();
    for (n, ns, ifname, key, addr) in [
        (1, &new_ns, &new_if, new_key, "10.241.0.2/24"),
        (2, &old_ns, &old_if, old_key, "10.241.0.3/24"),
    ] {
        peers.push(Daemon::start(
            DaemonKind::WireguardGo,
            ns,
            ifname,
            dir.path(),
        )?);
        ns.exec(&[
            "wg",
            "set",
            ifname,
            "private-key",
            &key_file(ifname, key)?,
            "peer",
            &hub_key.public,
            "endpoint",
            &format!("10.240.{n}.1:51820"),
            "allowed-ips",
            "10.241.0.1/32",
        ])?;
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.set_link_up(ifname, TUNNEL_MTU)?;
    }
    // The established session, before the flood.
    wait_until("the established peer's session", COMMAND_TIMEOUT, || {
        let out = old_ns.exec_output(
            &["ping", "-n", "-c", "1", "-W", "1", "10.241.0.1"],
            Duration::from_secs(5),
        )?;
        Ok(out.succeeded().then_some(()))
    })?;

    let to_attacker_before = hub_ns.link_stats("h3")?.tx_packets;
    let mut cmd = atk_ns.command(&generator);
    cmd.args(["--target", "10.240.3.1:51820", "--hub-key", &hub_key.public])
        .args(["--peer-key", &atk_key.private])
        .args(["--duration", &flood.seconds.to_string()])
        .args(["--rate", &flood.rate.to_string()])
        .args(["--source", "10.99.0.1", "--port", "40000"])
        .args(["--sources", &flood.sources.to_string()])
        .args(["--precompute", "4096"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut attacker = Killed(cmd.spawn().context("starting komnet-flood")?);
    let ping_seconds = flood.seconds.to_string();
    let mut established = Killed(
        old_ns
            .command("ping")
            .args([
                "-n",
                "-q",
                "-i",
                "0.1",
                "-W",
                "1",
                "-w",
                &ping_seconds,
                "10.241.0.1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the established peer's ping")?,
    );
    std::thread::sleep(Duration::from_secs(2));
    // The new peer's first packet starts its first handshake.
    let t0 = Instant::now();
    let first = new_ns.exec_output(
        &[
            "ping",
            "-n",
            "-c",
            "1",
            "-i",
            "0.05",
            "-w",
            "5",
            "10.241.0.1",
        ],
        Duration::from_secs(15),
    )?;
    let first_reply = first.succeeded().then(|| t0.elapsed());

    let deadline = started + Duration::from_secs(u64::from(flood.seconds) + 20);
    let status = loop {
        if let Some(s) = attacker.0.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            bail!("komnet-flood did not stop after its {} s", flood.seconds);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut summary = String::new();
    if let Some(mut out) = attacker.0.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut summary)?;
    }
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = attacker.0.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err)?;
        }
        bail!("komnet-flood failed ({status}): {err}");
    }
    let to_attacker = hub_ns.link_stats("h3")?.tx_packets - to_attacker_before;
    let rate = summary
        .split("\"rate\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|r| r.parse::<f64>().ok())
        .with_context(|| format!("no rate in the generator's summary {summary:?}"))?;
    let _ = established.0.wait();
    let mut ping_out = String::new();
    if let Some(mut out) = established.0.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut ping_out)?;
    }
    let summary_line = crate::ping::parse_ping_summary(&ping_out)?;
    drop(peers);
    Ok(FloodReport {
        first_reply,
        generator: summary.trim().to_owned(),
        rate,
        to_attacker,
        established_lost: (
            summary_line
                .transmitted
                .saturating_sub(summary_line.received),
            summary_line.transmitted,
        ),
    })
}
