//! Network namespaces, veth pairs, addresses, routes and link counters.

use crate::command::{host, run, run_ok, send_signal, wait_until, CommandOutput};
use crate::{next_id, COMMAND_TIMEOUT, DAEMON_STOP_GRACE};
use anyhow::{anyhow, Context, Result};
use std::ffi::OsStr;
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

/// A network namespace (`ip netns add`) with a unique name. On drop, every process still in it
/// is ended (SIGTERM, SIGKILL after 2 s) and the namespace is deleted, which also destroys its
/// veth ends; deletion alone would leave processes (and their TUN devices) running.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `knt-PID-N-LABEL` with its loopback up.
    pub fn new(label: &str) -> Result<Netns> {
        let name = format!("knt-{}-{}-{label}", std::process::id(), next_id());
        host("ip", &["netns", "add", &name])
            .with_context(|| format!("cannot create network namespace {name}"))?;
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: add arguments, then [`run`] it or spawn it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args[0] args[1..]` inside the namespace; error on non-zero exit; stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("Netns::exec needs a program"))?;
        run_ok(self.command(program).args(rest), COMMAND_TIMEOUT)
    }

    /// Runs `args` inside the namespace with `timeout`; any exit status is returned.
    pub fn exec_output(&self, args: &[&str], timeout: Duration) -> Result<CommandOutput> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("Netns::exec_output needs a program"))?;
        run(self.command(program).args(rest), timeout)
    }

    /// Packets this namespace's kernel dropped by reverse-path filtering (`IPReversePathFilter`
    /// of `TcpExt` in `/proc/net/netstat`, which is per namespace).
    pub fn reverse_path_drops(&self) -> Result<u64> {
        parse_netstat(
            &self.exec(&["cat", "/proc/net/netstat"])?,
            "TcpExt",
            "IPReversePathFilter",
        )
    }

    /// `ip -n NAME args...`; error on non-zero exit; stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new("ip").args(["-n", &self.name]).args(args),
            COMMAND_TIMEOUT,
        )
    }

    /// The addresses on `dev` as `addr/len` (`ip -brief addr`), link-local ones left out.
    pub fn addresses_on(&self, dev: &str) -> Result<Vec<String>> {
        let out = self.ip(&["-brief", "addr", "show", "dev", dev])?;
        Ok(out
            .split_whitespace()
            .skip(2)
            .filter(|a| a.contains('/') && !a.starts_with("fe80:"))
            .map(str::to_owned)
            .collect())
    }

    /// Adds `address/prefix_len` to `dev`. IPv6 addresses skip duplicate address detection so
    /// they are usable at once instead of "tentative" for a second or two.
    pub fn add_address(&self, dev: &str, address: IpAddr, prefix_len: u8) -> Result<()> {
        let cidr = format!("{address}/{prefix_len}");
        let mut args = vec!["address", "add", cidr.as_str(), "dev", dev];
        if address.is_ipv6() {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    pub fn delete_address(&self, dev: &str, address: IpAddr, prefix_len: u8) -> Result<()> {
        let cidr = format!("{address}/{prefix_len}");
        self.ip(&["address", "del", &cidr, "dev", dev]).map(drop)
    }

    /// A route to `destination/prefix_len` straight out of `dev` (on-link), optionally with a
    /// preferred source address.
    pub fn add_route(
        &self,
        destination: IpAddr,
        prefix_len: u8,
        dev: &str,
        source: Option<IpAddr>,
    ) -> Result<()> {
        let cidr = format!("{destination}/{prefix_len}");
        let source = source.map(|source| source.to_string());
        let mut args = vec!["route", "add", cidr.as_str(), "dev", dev];
        if let Some(source) = &source {
            args.extend(["src", source.as_str()]);
        }
        self.ip(&args).map(drop)
    }

    pub fn set_link_up(&self, dev: &str, mtu: u32) -> Result<()> {
        self.ip(&["link", "set", "dev", dev, "mtu", &mtu.to_string(), "up"])
            .map(drop)
    }

    pub fn link_exists(&self, dev: &str) -> bool {
        run(
            Command::new("ip").args(["-n", &self.name, "link", "show", "dev", dev]),
            COMMAND_TIMEOUT,
        )
        .map(|output| output.succeeded())
        .unwrap_or(false)
    }

    /// Packet and byte counters of `dev`, from `ip -s link show`.
    pub fn link_stats(&self, dev: &str) -> Result<LinkStats> {
        let text = self.ip(&["-s", "link", "show", "dev", dev])?;
        parse_link_stats(&text).with_context(|| format!("parsing `ip -s link show {dev}`"))
    }

    /// PIDs of the processes living in this namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<u32>> {
        parse_pids(&host("ip", &["netns", "pids", &self.name])?)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes this test started can be in a namespace with our unique name.
        end_processes_and_delete(&self.name);
    }
}

/// Ends every process in namespace `name` (SIGTERM, SIGKILL after [`DAEMON_STOP_GRACE`]),
/// then deletes it. Failures are reported on stderr: this runs from destructors.
pub(crate) fn end_processes_and_delete(name: &str) {
    let pids_in = || -> Result<Vec<u32>> { parse_pids(&host("ip", &["netns", "pids", name])?) };
    if let Ok(pids) = pids_in() {
        if !pids.is_empty() {
            for pid in &pids {
                send_signal(*pid, "TERM");
            }
            let gone = wait_until(
                "processes to leave the namespace",
                DAEMON_STOP_GRACE,
                || Ok(pids_in()?.is_empty().then_some(())),
            );
            if gone.is_err() {
                for pid in pids_in().unwrap_or_default() {
                    send_signal(pid, "KILL");
                }
            }
        }
    }
    if let Err(err) = host("ip", &["netns", "del", name]) {
        eprintln!("warning: cannot delete network namespace {name}: {err:#}");
    }
}

fn parse_pids(text: &str) -> Result<Vec<u32>> {
    text.split_whitespace()
        .map(|pid| {
            pid.parse()
                .with_context(|| format!("bad pid {pid:?} from ip netns pids"))
        })
        .collect()
}

/// Creates a veth pair with one end in each namespace (created there directly, so the names
/// only need to be unique inside each namespace) and brings both ends up. No guard: the pair
/// vanishes when either namespace is deleted.
pub fn add_veth_pair(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    host(
        "ip",
        &[
            "link",
            "add",
            a_dev,
            "netns",
            a.name(),
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            b_dev,
            "netns",
            b.name(),
            "mtu",
            &mtu,
        ],
    )
    .with_context(|| {
        format!(
            "cannot create veth pair {}/{a_dev} <-> {}/{b_dev}",
            a.name(),
            b.name()
        )
    })?;
    a.ip(&["link", "set", "dev", a_dev, "up"])?;
    b.ip(&["link", "set", "dev", b_dev, "up"])?;
    Ok(())
}

/// Interface counters as `ip -s link` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Parses `ip -s link show` output: a header line `RX: bytes packets ...` (spacing varies
/// between iproute2 versions) followed by a line of numbers; the same for TX.
pub fn parse_link_stats(text: &str) -> Result<LinkStats> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let counters = |direction: &str| -> Result<(u64, u64)> {
        let header_index = lines
            .iter()
            .position(|line| line.starts_with(direction))
            .ok_or_else(|| anyhow!("no {direction} line in:\n{text}"))?;
        let header: Vec<&str> = lines[header_index]
            .trim_start_matches(direction)
            .split_whitespace()
            .collect();
        let values: Vec<&str> = lines
            .get(header_index + 1)
            .ok_or_else(|| anyhow!("no counters after {direction} in:\n{text}"))?
            .split_whitespace()
            .collect();
        let value = |name: &str| -> Result<u64> {
            let column = header
                .iter()
                .position(|column| *column == name)
                .ok_or_else(|| anyhow!("no {name} column after {direction} in:\n{text}"))?;
            let raw = values
                .get(column)
                .ok_or_else(|| anyhow!("no {name} value after {direction} in:\n{text}"))?;
            raw.parse()
                .with_context(|| format!("bad {direction} {name} value {raw:?}"))
        };
        Ok((value("bytes")?, value("packets")?))
    };
    let (rx_bytes, rx_packets) = counters("RX:")?;
    let (tx_bytes, tx_packets) = counters("TX:")?;
    Ok(LinkStats {
        rx_bytes,
        rx_packets,
        tx_bytes,
        tx_packets,
    })
}

/// One counter of `/proc/net/netstat` (or `/proc/net/snmp`): each group is a line of names
/// followed by a line of values, both starting with `GROUP:`.
pub(crate) fn parse_netstat(text: &str, group: &str, name: &str) -> Result<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines
        .next()
        .ok_or_else(|| anyhow!("no {group} in /proc/net/netstat"))?;
    let values = lines
        .next()
        .ok_or_else(|| anyhow!("no {group} values in /proc/net/netstat"))?;
    let at = names
        .split_whitespace()
        .position(|n| n == name)
        .ok_or_else(|| anyhow!("no {group} {name} in /proc/net/netstat"))?;
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("{group} {name} has no number in /proc/net/netstat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_link_stats_of_both_iproute2_layouts() {
        let new_layout = "5: kn1-2l: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 1420\n    link/none \n\
                          RX:  bytes packets errors dropped  missed   mcast\n       840      10      0       0       0       0\n\
                          TX:  bytes packets errors dropped carrier collsns\n       252       3      0       0       0       0\n";
        let stats = parse_link_stats(new_layout).expect("parses");
        assert_eq!(
            stats,
            LinkStats {
                rx_bytes: 840,
                rx_packets: 10,
                tx_bytes: 252,
                tx_packets: 3
            }
        );
        let old_layout = "    RX: bytes  packets  errors  dropped overrun mcast\n    100        2        0       0       0       0\n\
                          TX: bytes  packets  errors  dropped carrier collsns\n    300        4        0       0       0       0\n";
        let stats = parse_link_stats(old_layout).expect("parses");
        assert_eq!((stats.rx_packets, stats.tx_bytes), (2, 300));
    }

    #[test]
    fn reads_a_netstat_counter_by_name() {
        let text = "TcpExt: SyncookiesSent IPReversePathFilter TW\nTcpExt: 0 17 3\n\
                    IpExt: InNoRoutes\nIpExt: 5\n";
        assert_eq!(
            parse_netstat(text, "TcpExt", "IPReversePathFilter").expect("parses"),
            17
        );
        assert_eq!(
            parse_netstat(text, "IpExt", "InNoRoutes").expect("parses"),
            5
        );
        assert!(parse_netstat(text, "TcpExt", "Missing").is_err());
    }
}
