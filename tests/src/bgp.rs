//! Hubs on separate machines: each hub in a namespace of its own, where BIRD 2 announces the
//! hub's announcement table (`[bgp] table` in gateway.toml) by BGP to the data-centre router,
//! BIRD in the `dc` namespace, which installs the routes in its kernel. The configurations
//! are the ones docs/operations.md shows ("Hubs on separate machines"), with the timers
//! shortened as the guide suggests for fast failover.
//!
//! ```text
//!   wan 192.0.2.0/24:  dc .1 (router, enrollment)   hub1 .2   hub2 .3   spokes .11, .12
//!   dc ─ hubN:         10.254.N.1/30 (dc, "hubN") ─ 10.254.N.2/30 (hubN, "dc0")
//!   dc ─ srv:          the data centre's servers (DMS 10.0.1.10, ...)
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::command::{run, wait_until, BackgroundProcess};
use crate::netns::{add_veth_pair, Netns};
use crate::{find_on_path, COMMAND_TIMEOUT};

/// The announcement table the hubs keep (`[bgp] table`).
pub const TABLE: u32 = 200;
pub const ROUTER_AS: u32 = 65000;
pub const HUB_AS: u32 = 65001;

/// Hub `index`'s (0-based) address on the WAN, where spokes reach it.
pub fn hub_wan(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 2 + index as u8)
}

/// Hub `index`'s address on its link to the router (the next hop the router learns).
pub fn hub_dc(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 254, 1 + index as u8, 2)
}

/// The router's address on its link to hub `index`.
pub fn router_dc(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 254, 1 + index as u8, 1)
}

/// Fails with what to do when BIRD 2 is not installed: the BGP tests never skip.
pub fn require_bird() {
    let mut missing = Vec::new();
    for tool in ["bird", "birdc"] {
        if find_on_path(tool).is_none() {
            missing.push(tool);
        }
    }
    if !missing.is_empty() {
        panic!(
            "the BGP test needs BIRD 2 ({} not on PATH): run `sudo scripts/setup.sh test`, which \
             installs Debian's bird2",
            missing.join(", ")
        );
    }
    let version = Command::new("bird")
        .arg("--version")
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    if !version.contains("BIRD version 2.") {
        panic!("the BGP test needs BIRD 2 (Debian's bird2); `bird --version` says {version:?}");
    }
}

/// One BIRD daemon in a namespace, with its own control socket; ended on drop (and with its
/// namespace).
#[derive(Debug)]
pub struct Bird {
    pub name: String,
    socket: PathBuf,
    process: BackgroundProcess,
}

impl Bird {
    /// Writes `config` to `dir/NAME.conf` and starts `bird -f` with it in `ns`; returns once
    /// its control socket answers.
    pub fn start(ns: &Netns, dir: &Path, name: &str, config: &str) -> Result<Bird> {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let socket = dir.join(format!("{name}.ctl"));
        let mut cmd = ns.command("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(dir.join(format!("{name}.pid")));
        let process = BackgroundProcess::spawn(&mut cmd, &dir.join(format!("{name}.log")))?;
        let mut bird = Bird {
            name: name.to_owned(),
            socket,
            process,
        };
        wait_until(
            &format!("{name} to answer"),
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = bird.process.child.try_wait() {
                    bail!("{name} exited ({status}):\n{}", bird.process.log_text());
                }
                Ok(bird.birdc(&["show", "status"]).ok())
            },
        )?;
        Ok(bird)
    }

    /// Its control socket (a file: reachable from any namespace).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `birdc -s SOCKET args` (the socket is a file: no namespace needed).
    pub fn birdc(&mut self, args: &[&str]) -> Result<String> {
        let out = run(
            Command::new("birdc").arg("-s").arg(&self.socket).args(args),
            COMMAND_TIMEOUT,
        )?;
        if !out.succeeded() || out.stdout.contains("Unable to connect") {
            bail!("birdc {}: {out:?}", args.join(" "));
        }
        Ok(out.stdout)
    }

    /// Whether BGP protocol `protocol` is established.
    pub fn established(&mut self, protocol: &str) -> bool {
        self.birdc(&["show", "protocols", protocol])
            .is_ok_and(|s| s.contains("Established"))
    }

    pub fn log_tail(&self) -> String {
        self.process.log_text()
    }
}

/// The router's BIRD: one eBGP session per hub, what they announce goes into the kernel.
pub fn router_config(hubs: usize) -> String {
    let mut out = format!(
        "router id {};\nlog stderr all;\nprotocol device {{ }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; }}\n\
         template bgp komnet_hub {{\n  local as {ROUTER_AS};\n  hold time 3; keepalive time 1;\n  \
         connect delay time 1; connect retry time 1; error wait time 1, 5;\n  \
         ipv4 {{ import where net ~ [ 10.0.0.0/8{{8,32}} ]; export none; }};\n}}\n",
        router_dc(0)
    );
    for i in 0..hubs {
        out.push_str(&format!(
            "protocol bgp hub{} from komnet_hub {{ neighbor {} as {HUB_AS}; }}\n",
            i + 1,
            hub_dc(i)
        ));
    }
    out
}

/// A hub's BIRD: imports the announcement table, announces it to the router.
pub fn hub_config(index: usize) -> String {
    format!(
        "router id {me};\nlog stderr all;\nprotocol device {{ }}\n\
         protocol kernel komnet {{\n  kernel table {TABLE};\n  learn;\n  \
         ipv4 {{ import all; export none; }};\n}}\n\
         protocol bgp dc {{\n  local {me} as {HUB_AS};\n  neighbor {router} as {ROUTER_AS};\n  \
         hold time 3; keepalive time 1;\n  connect delay time 1; connect retry time 1; error wait time 1, 5;\n  \
         ipv4 {{ import none; export where proto = \"komnet\"; next hop self; }};\n}}\n",
        me = hub_dc(index),
        router = router_dc(index),
    )
}

/// The data centre of separate hub machines: their namespaces and the BIRDs. Dropping it
/// ends the BIRDs, then deletes the namespaces (and what still runs in them).
#[derive(Debug)]
pub struct BgpDc {
    /// The router's BIRD first, then one per hub.
    pub birds: Vec<Bird>,
    pub hub_ns: Vec<Netns>,
}

impl BgpDc {
    /// Makes `hubs` hub namespaces on the WAN (via `attach`, which plugs a namespace into the
    /// WAN bridge with an address), links each to the router `dc`, and starts every BIRD.
    pub fn build(
        dc: &Netns,
        hubs: usize,
        dir: &Path,
        mut attach: impl FnMut(&Netns, Ipv4Addr) -> Result<()>,
    ) -> Result<BgpDc> {
        dc.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let mut hub_ns = Vec::new();
        for i in 0..hubs {
            let ns = Netns::new(&format!("hub{}", i + 1))?;
            attach(&ns, hub_wan(i))?;
            add_veth_pair(dc, &format!("hub{}", i + 1), &ns, "dc0", 1500)?;
            dc.add_address(&format!("hub{}", i + 1), IpAddr::V4(router_dc(i)), 30)?;
            ns.add_address("dc0", IpAddr::V4(hub_dc(i)), 30)?;
            // The data centre's networks are behind the router.
            ns.ip(&[
                "route",
                "add",
                "10.0.0.0/8",
                "via",
                &router_dc(i).to_string(),
            ])?;
            hub_ns.push(ns);
        }
        let mut birds = vec![Bird::start(dc, dir, "bird-router", &router_config(hubs))?];
        for (i, ns) in hub_ns.iter().enumerate() {
            birds.push(Bird::start(
                ns,
                dir,
                &format!("bird-hub{}", i + 1),
                &hub_config(i),
            )?);
        }
        let mut dc_ = BgpDc { birds, hub_ns };
        dc_.wait_established(Duration::from_secs(20))?;
        Ok(dc_)
    }

    fn wait_established(&mut self, timeout: Duration) -> Result<()> {
        let hubs = self.hub_ns.len();
        let result = wait_until("the BGP sessions to the hubs", timeout, || {
            let router = &mut self.birds[0];
            Ok((0..hubs)
                .all(|i| router.established(&format!("hub{}", i + 1)))
                .then_some(()))
        });
        result.map_err(|e| anyhow!("{e:#}\nrouter's BIRD:\n{}", self.birds[0].log_tail()))
    }
}

/// The gateway the kernel of namespace `ns_name` routes `addr` through (`ip route get`;
/// `None`: unreachable, or not via a gateway).
pub fn route_via(ns_name: &str, addr: Ipv4Addr) -> Result<Option<Ipv4Addr>> {
    let out = run(
        Command::new("ip").args(["-n", ns_name, "route", "get", &addr.to_string()]),
        COMMAND_TIMEOUT,
    )?;
    if !out.succeeded() {
        if out.stderr.contains("unreachable") {
            return Ok(None);
        }
        bail!("ip route get {addr} in {ns_name}: {out:?}");
    }
    Ok(parse_via(&out.stdout))
}

fn parse_via(route: &str) -> Option<Ipv4Addr> {
    let mut words = route.split_whitespace();
    words.find(|w| *w == "via")?;
    words.next()?.parse().ok()
}

/// The prefixes a hub's announcement table holds (`ip route show table TABLE`).
pub fn announced(ns: &Netns) -> Result<Vec<String>> {
    let out = run(
        Command::new("ip").args([
            "-n",
            ns.name(),
            "route",
            "show",
            "table",
            &TABLE.to_string(),
        ]),
        COMMAND_TIMEOUT,
    )?;
    // The kernel has no table without routes.
    if !out.succeeded() {
        if out.stderr.contains("table does not exist") {
            return Ok(Vec::new());
        }
        bail!("ip route show table {TABLE} in {}: {out:?}", ns.name());
    }
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_of_a_route_is_read_from_ip() {
        assert_eq!(
            parse_via("10.30.1.10 via 10.254.2.2 dev hub2 src 10.254.2.1 uid 0 \n    cache \n"),
            Some(Ipv4Addr::new(10, 254, 2, 2))
        );
        assert_eq!(parse_via(""), None);
        assert_eq!(parse_via("10.30.1.0/24 dev komnet0 scope link"), None);
    }
}
