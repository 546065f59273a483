//! The two-namespace tunnel fixture.

use crate::command::{wait_until, write_private_file, TempDir};
use crate::daemon::{uapi_socket_path, Daemon, DaemonKind};
use crate::netns::{add_veth_pair, LinkStats, Netns};
use crate::ping::{ping, ping_until_reply, PingSummary};
use crate::transfer::{start_transfer, RunningTransfer, TransferReport};
use crate::wg::{parse_wg_dump, KeyPair, WgDump, WgPeer};
use crate::{next_id, require_root_and_tools, COMMAND_TIMEOUT, TUNNEL_MTU, UNDERLAY_MTU};
use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::thread;
use std::time::Duration;

/// One of the two sides of a [`Tunnel`]. The left side is the one that speaks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Left,
    Right,
}

impl End {
    pub fn other(self) -> End {
        match self {
            End::Left => End::Right,
            End::Right => End::Left,
        }
    }

    /// 1 for the left side, 2 for the right: the host part of its addresses.
    fn host_number(self) -> u8 {
        match self {
            End::Left => 1,
            End::Right => 2,
        }
    }

    fn letter(self) -> char {
        match self {
            End::Left => 'l',
            End::Right => 'r',
        }
    }
}

/// Address family of the underlay the WireGuard endpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderlayFamily {
    V4,
    V6,
}

/// What [`Tunnel::new`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelConfig {
    pub left: DaemonKind,
    pub right: DaemonKind,
    pub underlay: UnderlayFamily,
}

impl TunnelConfig {
    /// `left` and `right` daemons over an IPv4 underlay.
    pub fn new(left: DaemonKind, right: DaemonKind) -> TunnelConfig {
        TunnelConfig {
            left,
            right,
            underlay: UnderlayFamily::V4,
        }
    }

    pub fn with_ipv6_underlay(self) -> TunnelConfig {
        TunnelConfig {
            underlay: UnderlayFamily::V6,
            ..self
        }
    }
}

/// One side of a [`Tunnel`]: a namespace, its veth end, its WireGuard interface and daemon.
#[derive(Debug)]
pub struct Side {
    // Field order is drop order: the daemon is stopped before its namespace goes.
    daemon: Option<Daemon>,
    pub netns: Netns,
    pub kind: DaemonKind,
    /// The WireGuard (TUN) interface; unique machine-wide because of the UAPI socket path.
    pub ifname: String,
    /// This side's veth end (the underlay).
    pub veth: String,
    pub keys: KeyPair,
    /// The private key in a 0600 file, for `wg set private-key`.
    pub private_key_file: PathBuf,
    pub listen_port: u16,
    /// Current underlay addresses (they change when the side roams).
    pub underlay_v4: Ipv4Addr,
    pub underlay_v6: Ipv6Addr,
    /// Prefix lengths of the underlay addresses (change on IPv4 roaming).
    pub underlay_v4_prefix: u8,
    pub tunnel_v4: Ipv4Addr,
    pub tunnel_v6: Ipv6Addr,
}

impl Side {
    pub fn daemon(&self) -> Option<&Daemon> {
        self.daemon.as_ref()
    }

    /// `wg ARGS...` inside this side's namespace; stdout.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        self.netns.exec(&full)
    }

    /// `wg show IFNAME dump`, parsed.
    pub fn dump(&self) -> Result<WgDump> {
        let text = self.wg(&["show", &self.ifname, "dump"])?;
        parse_wg_dump(&text).with_context(|| format!("parsing `wg show {} dump`", self.ifname))
    }

    /// Counters of the WireGuard interface as the kernel sees them (RX = written by the daemon).
    pub fn tunnel_link_stats(&self) -> Result<LinkStats> {
        self.netns.link_stats(&self.ifname)
    }
}

/// Two namespaces joined by a veth pair (IPv4 /30 and IPv6 /64 underlay), one WireGuard daemon
/// in each, each configured with `wg set` to reach the other (IPv4 and IPv6 inside, MTU 1420).
///
/// Addresses, for fixture number `n` (unique in the process; `n % 256` in the IPv4 octet):
/// underlay 10.201.n.{1,2}/30 and fd00:n::{1,2}/64; tunnel 10.203.n.{1,2}/24 and
/// fd01:n::{1,2}/64; IPv4 roaming moves a side to 10.202.n.{1,2}. Left listens on 51820,
/// right on 51821. On drop (after a panic) it prints diagnostics, then stops the daemons and
/// deletes both namespaces.
#[derive(Debug)]
pub struct Tunnel {
    pub left: Side,
    pub right: Side,
    pub underlay: UnderlayFamily,
    id: u32,
    // Last: daemon logs and key files stay until the daemons are gone.
    work_dir: TempDir,
}

const LEFT_PORT: u16 = 51820;
const RIGHT_PORT: u16 = 51821;

impl Tunnel {
    /// Builds the namespaces and veth, starts and configures both daemons, and brings the
    /// tunnel interfaces up. No packet has been exchanged yet when it returns.
    pub fn new(config: TunnelConfig) -> Result<Tunnel> {
        require_root_and_tools();
        let id = next_id();
        let work_dir = TempDir::new(&format!("tunnel{id}"))?;
        let left = Self::new_side(id, End::Left, config.left, &work_dir)?;
        let right = Self::new_side(id, End::Right, config.right, &work_dir)?;
        add_veth_pair(
            &left.netns,
            &left.veth,
            &right.netns,
            &right.veth,
            UNDERLAY_MTU,
        )?;
        let mut tunnel = Tunnel {
            left,
            right,
            underlay: config.underlay,
            id,
            work_dir,
        };
        for end in [End::Left, End::Right] {
            let side = tunnel.side(end);
            side.netns
                .add_address(&side.veth, side.underlay_v4.into(), side.underlay_v4_prefix)?;
            side.netns
                .add_address(&side.veth, side.underlay_v6.into(), 64)?;
        }
        for end in [End::Left, End::Right] {
            tunnel.start_daemon(end)?;
        }
        Ok(tunnel)
    }

    fn new_side(id: u32, end: End, kind: DaemonKind, work_dir: &TempDir) -> Result<Side> {
        let netns = Netns::new(&format!("t{id}{}", end.letter()))?;
        let keys = KeyPair::generate()?;
        let private_key_file = work_dir.path().join(format!("{}.key", end.letter()));
        write_private_file(&private_key_file, &format!("{}\n", keys.private))?;
        let octet = (id % 256) as u8;
        let host = end.host_number();
        Ok(Side {
            daemon: None,
            netns,
            kind,
            // "kn" + pid (<= 7 digits) + "-" + id + side letter: at most 15 characters for
            // realistic ids, the Linux limit.
            ifname: format!("kn{}-{id}{}", std::process::id(), end.letter()),
            veth: format!("veth-{}", end.letter()),
            keys,
            private_key_file,
            listen_port: match end {
                End::Left => LEFT_PORT,
                End::Right => RIGHT_PORT,
            },
            underlay_v4: Ipv4Addr::new(10, 201, octet, host),
            underlay_v6: Ipv6Addr::new(0xfd00, id as u16, 0, 0, 0, 0, 0, u16::from(host)),
            underlay_v4_prefix: 30,
            tunnel_v4: Ipv4Addr::new(10, 203, octet, host),
            tunnel_v6: Ipv6Addr::new(0xfd01, id as u16, 0, 0, 0, 0, 0, u16::from(host)),
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn work_dir(&self) -> &Path {
        self.work_dir.path()
    }

    pub fn side(&self, end: End) -> &Side {
        match end {
            End::Left => &self.left,
            End::Right => &self.right,
        }
    }

    fn side_mut(&mut self, end: End) -> &mut Side {
        match end {
            End::Left => &mut self.left,
            End::Right => &mut self.right,
        }
    }

    /// Where the other side sends to reach `end`: its current underlay address and port.
    pub fn endpoint_of(&self, end: End) -> SocketAddr {
        let side = self.side(end);
        match self.underlay {
            UnderlayFamily::V4 => SocketAddr::new(side.underlay_v4.into(), side.listen_port),
            UnderlayFamily::V6 => SocketAddr::new(side.underlay_v6.into(), side.listen_port),
        }
    }

    /// The tunnel addresses of `end`, as allowed-ips the other side routes to it.
    pub fn allowed_ips_of(&self, end: End) -> String {
        let side = self.side(end);
        format!("{}/32,{}/128", side.tunnel_v4, side.tunnel_v6)
    }

    /// Starts `end`'s daemon and configures it (keys, peer, interface addresses, MTU, up).
    pub fn start_daemon(&mut self, end: End) -> Result<()> {
        let log_dir = self.work_dir.path().to_owned();
        let side = self.side_mut(end);
        if side.daemon.is_some() {
            bail!("the {end:?} daemon is already running");
        }
        side.daemon = Some(Daemon::start(
            side.kind,
            &side.netns,
            &side.ifname,
            &log_dir,
        )?);
        self.configure_wireguard(end)?;
        self.configure_interface(end)
    }

    /// Stops `end`'s daemon and waits until its TUN interface is gone.
    pub fn stop_daemon(&mut self, end: End) -> Result<Option<ExitStatus>> {
        let side = self.side_mut(end);
        let daemon = side
            .daemon
            .take()
            .ok_or_else(|| anyhow!("the {end:?} daemon is not running"))?;
        let status = daemon.stop();
        self.wait_for_interface_gone(end)?;
        Ok(status)
    }

    /// Kills `end`'s daemon with SIGKILL (a crash: its stale UAPI socket stays) and waits until
    /// the kernel has removed its TUN interface.
    pub fn crash_daemon(&mut self, end: End) -> Result<Option<ExitStatus>> {
        let side = self.side_mut(end);
        let daemon = side
            .daemon
            .take()
            .ok_or_else(|| anyhow!("the {end:?} daemon is not running"))?;
        let status = daemon.kill_hard();
        self.wait_for_interface_gone(end)?;
        Ok(status)
    }

    fn wait_for_interface_gone(&self, end: End) -> Result<()> {
        let side = self.side(end);
        wait_until(
            &format!("{} to disappear after its daemon ended", side.ifname),
            Duration::from_secs(5),
            || Ok((!side.netns.link_exists(&side.ifname)).then_some(())),
        )
    }

    /// `wg set IF listen-port P private-key FILE peer OTHER endpoint E allowed-ips ...`.
    pub fn configure_wireguard(&self, end: End) -> Result<()> {
        let side = self.side(end);
        let other = self.side(end.other());
        let port = side.listen_port.to_string();
        let endpoint = self.endpoint_of(end.other()).to_string();
        let allowed_ips = self.allowed_ips_of(end.other());
        let key_file = side.private_key_file.to_string_lossy().into_owned();
        side.wg(&[
            "set",
            &side.ifname,
            "listen-port",
            &port,
            "private-key",
            &key_file,
            "peer",
            &other.keys.public,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed_ips,
        ])
        .map(drop)
    }

    /// Tunnel addresses (IPv4 /24, IPv6 /64), MTU 1420, link up.
    pub fn configure_interface(&self, end: End) -> Result<()> {
        let side = self.side(end);
        side.netns
            .add_address(&side.ifname, side.tunnel_v4.into(), 24)?;
        side.netns
            .add_address(&side.ifname, side.tunnel_v6.into(), 64)?;
        side.netns.set_link_up(&side.ifname, TUNNEL_MTU)
    }

    /// Errors if a daemon has exited on its own.
    pub fn ensure_daemons_running(&mut self) -> Result<()> {
        for end in [End::Left, End::Right] {
            if let Some(daemon) = self.side_mut(end).daemon.as_mut() {
                daemon.ensure_running()?;
            }
        }
        Ok(())
    }

    /// Pings `to` from `from`'s namespace: exactly `count` requests; see [`ping`].
    pub fn ping(&self, from: End, to: IpAddr, count: u32) -> Result<PingSummary> {
        ping(&self.side(from).netns, None, to, count)
    }

    /// Pings until the first reply (a fresh tunnel needs a handshake first); errors if none
    /// comes within `deadline_s` seconds.
    pub fn ping_until_reply(&self, from: End, to: IpAddr, deadline_s: u32) -> Result<PingSummary> {
        let summary = ping_until_reply(&self.side(from).netns, to, deadline_s)?;
        if summary.received == 0 {
            bail!(
                "no ping reply from {to} to {from:?} ({}) within {deadline_s} s: {summary:?}",
                self.side(from).netns.name()
            );
        }
        Ok(summary)
    }

    /// `wg show` dump of `end`.
    pub fn dump(&self, end: End) -> Result<WgDump> {
        self.side(end).dump()
    }

    /// `end`'s view of its one peer, the other side.
    pub fn peer_view(&self, end: End) -> Result<WgPeer> {
        let dump = self.dump(end)?;
        dump.peer(&self.side(end.other()).keys.public)
            .cloned()
            .ok_or_else(|| anyhow!("{end:?} has no peer entry for the other side: {dump:?}"))
    }

    /// Transfers a random file of `bytes` bytes over TCP from `from` to the other side's
    /// tunnel address of the given family, paced to `rate` bytes/s if given.
    pub fn start_transfer(
        &self,
        from: End,
        inner_v6: bool,
        bytes: u64,
        rate: Option<u64>,
    ) -> Result<RunningTransfer> {
        let to = self.side(from.other());
        let destination: IpAddr = if inner_v6 {
            to.tunnel_v6.into()
        } else {
            to.tunnel_v4.into()
        };
        start_transfer(
            &self.side(from).netns,
            &to.netns,
            destination,
            bytes,
            rate,
            self.work_dir.path(),
        )
    }

    /// A complete unpaced transfer over inner IPv4; see [`Tunnel::start_transfer`].
    pub fn transfer(&self, from: End, bytes: u64, timeout: Duration) -> Result<TransferReport> {
        self.start_transfer(from, false, bytes, None)?
            .finish(timeout)
    }

    /// Moves `end` to a new underlay address: the new one is added, the old one removed, so
    /// the daemon's socket (bound to the wildcard address) keeps working but its packets now
    /// leave from the new address. The other side only learns the new endpoint from the next
    /// authenticated packet `end` sends. Returns the new endpoint.
    ///
    /// IPv4: the new address is in another /30 (10.202.n.0/30); both sides get an on-link /32
    /// route so the underlay stays reachable, as a router would provide. The route to the
    /// other side is added before the old address goes, so there is no moment without one.
    /// IPv6: the new address is the next one in the same /64.
    pub fn roam(&mut self, end: End) -> Result<SocketAddr> {
        let octet = (self.id % 256) as u8;
        let side = self.side(end);
        let other = self.side(end.other());
        match self.underlay {
            UnderlayFamily::V4 => {
                let old = side.underlay_v4;
                let old_prefix = side.underlay_v4_prefix;
                let new = Ipv4Addr::new(10, 202, octet, end.host_number());
                if new == old {
                    bail!("{end:?} has already roamed to {new}");
                }
                other.netns.add_route(new.into(), 32, &other.veth, None)?;
                side.netns.add_address(&side.veth, new.into(), 30)?;
                side.netns
                    .add_route(other.underlay_v4.into(), 32, &side.veth, Some(new.into()))?;
                side.netns
                    .delete_address(&side.veth, old.into(), old_prefix)?;
                let side = self.side_mut(end);
                side.underlay_v4 = new;
                side.underlay_v4_prefix = 30;
            }
            UnderlayFamily::V6 => {
                let old = side.underlay_v6;
                let segments = old.segments();
                let mut new_segments = segments;
                // ::1 -> ::3, ::2 -> ::4: stays clear of the other side's address.
                new_segments[7] = segments[7] + 2;
                let new = Ipv6Addr::from(new_segments);
                side.netns.add_address(&side.veth, new.into(), 64)?;
                side.netns.delete_address(&side.veth, old.into(), 64)?;
                self.side_mut(end).underlay_v6 = new;
            }
        }
        Ok(self.endpoint_of(end))
    }

    /// A wg-quick configuration for `end` equivalent to what [`Tunnel::start_daemon`] sets up.
    pub fn wg_quick_config(&self, end: End) -> String {
        let side = self.side(end);
        let other = self.side(end.other());
        format!(
            "[Interface]\n\
             PrivateKey = {private_key}\n\
             ListenPort = {port}\n\
             Address = {v4}/24, {v6}/64\n\
             MTU = {mtu}\n\
             \n\
             [Peer]\n\
             PublicKey = {peer_key}\n\
             Endpoint = {endpoint}\n\
             AllowedIPs = {peer_v4}/32, {peer_v6}/128\n",
            private_key = side.keys.private,
            port = side.listen_port,
            v4 = side.tunnel_v4,
            v6 = side.tunnel_v6,
            mtu = TUNNEL_MTU,
            peer_key = other.keys.public,
            endpoint = self.endpoint_of(end.other()),
            peer_v4 = other.tunnel_v4,
            peer_v6 = other.tunnel_v6,
        )
    }

    /// Writes [`Tunnel::wg_quick_config`] to `WORKDIR/IFNAME.conf` (mode 0600; wg-quick takes
    /// the interface name from the file stem).
    pub fn write_wg_quick_config(&self, end: End) -> Result<PathBuf> {
        let path = self
            .work_dir
            .path()
            .join(format!("{}.conf", self.side(end).ifname));
        write_private_file(&path, &self.wg_quick_config(end))?;
        Ok(path)
    }

    /// What a human needs after a failure: daemons, `wg show`, addresses, routes, logs.
    pub fn diagnostics(&mut self) -> String {
        let mut report = format!("=== diagnostics of tunnel {} ===\n", self.id);
        for end in [End::Left, End::Right] {
            let side = self.side_mut(end);
            let daemon_state = match side.daemon.as_mut() {
                None => "not running (stopped by the test, or managed by wg-quick)".to_owned(),
                Some(daemon) => match daemon.poll_exit() {
                    None => format!("pid {} running", daemon.pid()),
                    Some(status) => format!("pid {} EXITED with {status}", daemon.pid()),
                },
            };
            let side = self.side(end);
            report.push_str(&format!(
                "--- {end:?}: {} in {} on {} ({daemon_state})\n",
                side.kind,
                side.netns.name(),
                side.ifname
            ));
            let commands: [&[&str]; 5] = [
                &["wg", "show", &side.ifname],
                &["wg", "show", &side.ifname, "dump"],
                &["ip", "-s", "link", "show"],
                &["ip", "address", "show"],
                &["ip", "route", "show", "table", "all"],
            ];
            for args in commands {
                let text = match side.netns.exec_output(args, COMMAND_TIMEOUT) {
                    Ok(output) => redact_private_key(&format!("{output}"), &side.keys.private),
                    Err(err) => format!("{err:#}"),
                };
                report.push_str(&text);
                report.push('\n');
            }
            if let Some(daemon) = side.daemon() {
                report.push_str(&format!(
                    "daemon log ({}):\n{}\n",
                    daemon.log_path().display(),
                    daemon.log_tail(40)
                ));
            }
        }
        report
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        // A daemon started by wg-quick has no guard; the namespace guard ends the process, and
        // its socket (whose name is ours alone) is removed here.
        for end in [End::Left, End::Right] {
            let side = self.side(end);
            if side.daemon.is_none() {
                let _ = fs::remove_file(uapi_socket_path(&side.ifname));
            }
        }
    }
}

fn redact_private_key(text: &str, private_key: &str) -> String {
    text.replace(private_key, "<private key>")
}
