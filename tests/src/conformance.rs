//! The topology of the kernel's WireGuard selftest (`tools/testing/selftests/wireguard/netns.sh`),
//! for userspace daemons: three namespaces; both WireGuard daemons start in `ns0`, where their
//! UDP sockets stay, and their interfaces are moved to `ns1` and `ns2` (the move
//! <https://www.wireguard.com/netns/> recommends). The two tunnel ends reach each other over
//! `ns0`'s loopback (127.0.0.1 or ::1), ports 1 and 2.
//!
//! ```text
//!  ns1: wgA 192.168.241.1/24 fd00::1/112  ──  ns0: lo, both daemons' sockets  ──  ns2: wgB 192.168.241.2/24 fd00::2/112
//! ```
//!
//! The scenarios themselves (tests/tests/conformance.rs) are written from what the selftest
//! checks, not copied from it.

use crate::command::{write_private_file, TempDir};
use crate::daemon::{Daemon, DaemonKind};
use crate::netns::Netns;
use crate::wg::KeyPair;
use crate::{next_id, require_root_and_tools};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;

/// Tunnel addresses of the two ends, as in the selftest.
pub const TUNNEL_V4: [&str; 2] = ["192.168.241.1", "192.168.241.2"];
pub const TUNNEL_V6: [&str; 2] = ["fd00::1", "fd00::2"];
/// Listen ports of the two ends.
pub const PORTS: [u16; 2] = [1, 2];

/// Three namespaces, two daemons born in `ns0` whose interfaces live in `ns1` and `ns2`.
/// On drop the daemons are stopped, then the namespaces deleted.
#[derive(Debug)]
pub struct Trio {
    // Field order is drop order.
    daemons: [Option<Daemon>; 2],
    /// `ns[0]` holds the daemons and the underlay; `ns[1]`, `ns[2]` the tunnel interfaces.
    pub ns: [Netns; 3],
    pub kind: DaemonKind,
    /// The interfaces of end 1 (in `ns[1]`) and end 2 (in `ns[2]`).
    pub ifname: [String; 2],
    /// Four key pairs: ends 1 and 2 use the first two; the others are for key changes.
    pub keys: [KeyPair; 4],
    /// Private key and preshared-key files (0600), for `wg set ... private-key FILE`.
    key_files: [PathBuf; 4],
    psk_file: PathBuf,
    pub psk: String,
    work: TempDir,
}

/// `wg show IF transfer` of a one-peer interface: (received, sent) bytes.
pub fn parse_transfer(text: &str) -> Result<(u64, u64)> {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("`wg show transfer` printed nothing"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [_, rx, tx] = fields[..] else {
        bail!("`wg show transfer` line {line:?} is not KEY RX TX");
    };
    Ok((
        rx.parse().with_context(|| format!("rx in {line:?}"))?,
        tx.parse().with_context(|| format!("tx in {line:?}"))?,
    ))
}

impl Trio {
    /// Builds the topology with `kind` daemons and configures both ends like the selftest's
    /// `configure_peers` (keys, a preshared key, allowed IPs, addresses, link up), without
    /// endpoints: a scenario sets those.
    pub fn new(kind: DaemonKind) -> Result<Trio> {
        require_root_and_tools();
        let id = next_id();
        let work = TempDir::new(&format!("trio{id}"))?;
        let ns = [
            Netns::new(&format!("c{id}n0"))?,
            Netns::new(&format!("c{id}n1"))?,
            Netns::new(&format!("c{id}n2"))?,
        ];
        let pid = std::process::id() % 100_000;
        let ifname = [format!("kc{pid}-{id}a"), format!("kc{pid}-{id}b")];
        let keys = [
            KeyPair::generate()?,
            KeyPair::generate()?,
            KeyPair::generate()?,
            KeyPair::generate()?,
        ];
        let key_files: [PathBuf; 4] = std::array::from_fn(|i| work.path().join(format!("k{i}")));
        for (file, key) in key_files.iter().zip(&keys) {
            write_private_file(file, &format!("{}\n", key.private))?;
        }
        let psk = crate::host("wg", &["genpsk"])?.trim().to_owned();
        let psk_file = work.path().join("psk");
        write_private_file(&psk_file, &format!("{psk}\n"))?;
        let mut trio = Trio {
            daemons: [None, None],
            ns,
            kind,
            ifname,
            keys,
            key_files,
            psk_file,
            psk,
            work,
        };
        for end in 0..2 {
            let daemon = Daemon::start(kind, &trio.ns[0], &trio.ifname[end], trio.work.path())?;
            trio.daemons[end] = Some(daemon);
            trio.ns[0].ip(&[
                "link",
                "set",
                "dev",
                &trio.ifname[end],
                "netns",
                trio.ns[end + 1].name(),
            ])?;
        }
        trio.configure_peers()?;
        Ok(trio)
    }

    /// The namespace of end `end` (0 or 1).
    pub fn end_ns(&self, end: usize) -> &Netns {
        &self.ns[end + 1]
    }

    pub fn key_file(&self, i: usize) -> String {
        self.key_files[i].to_string_lossy().into_owned()
    }

    pub fn psk_file(&self) -> String {
        self.psk_file.to_string_lossy().into_owned()
    }

    /// Addresses, keys, preshared key and allowed IPs on both ends, links up.
    pub fn configure_peers(&self) -> Result<()> {
        for end in 0..2 {
            let ns = self.end_ns(end);
            let dev = &self.ifname[end];
            ns.ip(&["addr", "add", &format!("{}/24", TUNNEL_V4[end]), "dev", dev])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/112", TUNNEL_V6[end]),
                "dev",
                dev,
                "nodad",
            ])?;
            let other = 1 - end;
            self.wg(
                end,
                &[
                    "set",
                    dev,
                    "private-key",
                    &self.key_file(end),
                    "listen-port",
                    &PORTS[end].to_string(),
                    "peer",
                    &self.keys[other].public,
                    "preshared-key",
                    &self.psk_file(),
                    "allowed-ips",
                    &format!("{}/32,{}/128", TUNNEL_V4[other], TUNNEL_V6[other]),
                ],
            )?;
        }
        for end in 0..2 {
            self.end_ns(end)
                .ip(&["link", "set", "up", "dev", &self.ifname[end]])?;
        }
        Ok(())
    }

    /// `wg ARGS` in the namespace of end `end`; stdout.
    pub fn wg(&self, end: usize, args: &[&str]) -> Result<String> {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        self.end_ns(end).exec(&full)
    }

    /// Points each end at the other over `ns0`'s loopback: 127.0.0.1 or [::1].
    pub fn set_loopback_endpoints(&self, v6: bool) -> Result<()> {
        for end in 0..2 {
            let other = 1 - end;
            let endpoint = if v6 {
                format!("[::1]:{}", PORTS[other])
            } else {
                format!("127.0.0.1:{}", PORTS[other])
            };
            self.wg(
                end,
                &[
                    "set",
                    &self.ifname[end],
                    "peer",
                    &self.keys[other].public,
                    "endpoint",
                    &endpoint,
                ],
            )?;
        }
        Ok(())
    }

    /// `wg show IF dump` of end `end`, parsed.
    pub fn dump(&self, end: usize) -> Result<crate::WgDump> {
        crate::parse_wg_dump(&self.wg(end, &["show", &self.ifname[end], "dump"])?)
    }

    /// Where end `end` sends to the peer with public key `key` (`None`: no endpoint).
    pub fn endpoint_of(&self, end: usize, key: &str) -> Result<Option<std::net::SocketAddr>> {
        let dump = self.dump(end)?;
        let peer = dump
            .peer(key)
            .ok_or_else(|| anyhow!("end {end} has no peer {key}: {dump:?}"))?;
        Ok(peer.endpoint)
    }

    /// `wg show IF transfer` of end `end`: (received, sent) bytes.
    pub fn transfer(&self, end: usize) -> Result<(u64, u64)> {
        parse_transfer(&self.wg(end, &["show", &self.ifname[end], "transfer"])?)
    }

    /// `ping ARGS TARGET` from end `end`'s namespace; error unless every ping is answered.
    pub fn ping(&self, end: usize, args: &[&str], target: &str) -> Result<()> {
        let mut full = vec!["ping"];
        full.extend_from_slice(args);
        full.push(target);
        let out = self
            .end_ns(end)
            .exec_output(&full, Duration::from_secs(30))?;
        if !out.succeeded() {
            bail!("{out}");
        }
        Ok(())
    }

    /// The daemon of end `end`, if it still runs under this guard.
    pub fn daemon_mut(&mut self, end: usize) -> Option<&mut Daemon> {
        self.daemons[end].as_mut()
    }

    /// Errors if either daemon has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for d in self.daemons.iter_mut().flatten() {
            d.ensure_running()?;
        }
        Ok(())
    }

    /// What a human needs after a failure: `wg show` and the daemons' logs.
    pub fn diagnostics(&self) -> String {
        let mut report = String::new();
        for end in 0..2 {
            let ns = self.end_ns(end);
            for args in [
                &["wg", "show", &self.ifname[end]][..],
                &["ip", "addr", "show"][..],
            ] {
                match ns.exec_output(args, Duration::from_secs(10)) {
                    Ok(out) => report.push_str(&format!("{out}\n")),
                    Err(e) => report.push_str(&format!("{e:#}\n")),
                }
            }
            if let Some(d) = &self.daemons[end] {
                report.push_str(&format!(
                    "--- log of {} on {}:\n{}\n",
                    d.kind(),
                    self.ifname[end],
                    d.log_tail(30)
                ));
            }
        }
        report
    }
}

impl Drop for Trio {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

/// Tunnel addresses of the pair of WireGuard interfaces inside the first ([`Trio::start_inner`]).
pub const INNER_V4: [&str; 2] = ["192.168.242.1", "192.168.242.2"];
/// Listen port of both inner daemons (each in its own namespace).
pub const INNER_PORT: u16 = 5;

/// A second WireGuard pair whose datagrams travel through the first (the selftest's
/// wg-in-wg): its daemons are started in `ns1` and `ns2`, so their sockets live where the
/// outer interfaces are, and each one's endpoint is the other end's outer tunnel address.
#[derive(Debug)]
pub struct Inner {
    pub daemons: [Daemon; 2],
    pub ifname: [String; 2],
}

impl Inner {
    /// CPU seconds (user + system) the inner daemon of end `end` has used so far.
    pub fn cpu_seconds(&self, end: usize) -> Result<f64> {
        cpu_seconds(self.daemons[end].pid())
    }
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) end at the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("no ')' in /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after "pid (comm)".
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat is short: {stat}"))?
            .parse::<f64>()
            .with_context(|| format!("field {i} of /proc/{pid}/stat"))
    };
    // USER_HZ is 100 on Linux for every architecture komnet runs on.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

impl Trio {
    /// Starts and configures the inner pair with `kind` daemons: interfaces with
    /// [`INNER_V4`]/24 and MTU 1340 (the outer 1420 minus WireGuard's 80 bytes), key pairs 3
    /// and 4 of the trio, endpoints `192.168.241.x:5`.
    pub fn start_inner(&self, kind: DaemonKind) -> Result<Inner> {
        let ifname = [
            format!("{}i", self.ifname[0]),
            format!("{}i", self.ifname[1]),
        ];
        let mut daemons = Vec::with_capacity(2);
        for (end, name) in ifname.iter().enumerate() {
            daemons.push(Daemon::start(
                kind,
                self.end_ns(end),
                name,
                self.work.path(),
            )?);
        }
        let daemons: [Daemon; 2] = daemons
            .try_into()
            .map_err(|_| anyhow!("two inner daemons"))?;
        for end in 0..2 {
            let other = 1 - end;
            let ns = self.end_ns(end);
            ns.exec(&[
                "wg",
                "set",
                &ifname[end],
                "private-key",
                &self.key_file(2 + end),
                "listen-port",
                &INNER_PORT.to_string(),
                "peer",
                &self.keys[2 + other].public,
                "allowed-ips",
                &format!("{}/32", INNER_V4[other]),
                "endpoint",
                &format!("{}:{INNER_PORT}", TUNNEL_V4[other]),
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", INNER_V4[end]),
                "dev",
                &ifname[end],
            ])?;
            ns.ip(&["link", "set", "dev", &ifname[end], "mtu", "1340", "up"])?;
        }
        Ok(Inner { daemons, ifname })
    }
}

/// A UDP listener on `addr:port` inside `ns` that waits up to `wait` for one datagram.
/// [`UdpCatcher::caught`] says whether one came and what it said (lossy UTF-8).
#[derive(Debug)]
pub struct UdpCatcher {
    child: std::process::Child,
}

impl UdpCatcher {
    /// Starts the listener and returns once it is bound.
    pub fn start(ns: &Netns, addr: &str, port: u16, wait: Duration) -> Result<UdpCatcher> {
        use std::io::BufRead;
        let ip: std::net::IpAddr = addr.parse().context("UDP listener address")?;
        let mut child = ns
            .command(crate::daemon::netprobe_binary()?)
            .args([
                "catch-udp",
                &std::net::SocketAddr::new(ip, port).to_string(),
                &wait.as_secs_f64().to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting netprobe catch-udp")?;
        let stdout = child
            .stdout
            .as_mut()
            .ok_or_else(|| anyhow!("listener without stdout"))?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("UDP listener on {addr}:{port} did not start: {line:?}");
        }
        Ok(UdpCatcher { child })
    }

    /// Waits for the listener to finish: `Some(text)` if a datagram came, `None` if not.
    pub fn caught(mut self) -> Result<Option<String>> {
        use std::io::Read;
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        let _ = self.child.wait();
        let last = out.lines().last().unwrap_or_default().trim().to_owned();
        let Some(hex) = last.strip_prefix("got ") else {
            return Ok(None);
        };
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }
}

impl Drop for UdpCatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one UDP datagram `text` from `ns` to `addr:port`.
pub fn send_udp(ns: &Netns, addr: &str, port: u16, text: &str) -> Result<()> {
    let ip: std::net::IpAddr = addr.parse().context("UDP destination")?;
    let netprobe = crate::daemon::netprobe_binary()?;
    let target = std::net::SocketAddr::new(ip, port).to_string();
    ns.exec(&[&netprobe.to_string_lossy(), "send-udp", &target, text])
        .map(drop)
}
