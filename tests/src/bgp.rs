//! Hubs on separate machines: each hub in a namespace of its own, where BIRD 2 announces the
//! hub's announcement table (`[bgp] table` in gateway.toml) by BGP to the data-centre router
//! in the `dc` namespace, which installs the routes in its kernel: BIRD, or FRR (zebra and
//! bgpd) with the configuration docs/operations.md shows, read from the guide itself. The
//! BIRD configurations are the guide's too ("Hubs on separate machines"), with the timers
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

use crate::command::{run, wait_until, BackgroundProcess, TempDir};
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

/// FRR's daemons, where Debian's `frr` package puts them.
const FRR_DAEMONS: &str = "/usr/lib/frr";

/// Fails with what to do when FRR is not installed: the BGP tests never skip.
pub fn require_frr() {
    let missing: Vec<String> = ["zebra", "bgpd"]
        .iter()
        .map(|d| format!("{FRR_DAEMONS}/{d}"))
        .filter(|p| !Path::new(p).exists())
        .chain(find_on_path("vtysh").is_none().then(|| "vtysh".to_owned()))
        .collect();
    if !missing.is_empty() {
        panic!(
            "the FRR router test needs FRR ({} missing): run `sudo scripts/setup.sh test`, which \
             installs Debian's frr",
            missing.join(", ")
        );
    }
}

/// The data-centre router's routing daemon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RouterDaemon {
    #[default]
    Bird,
    /// FRR's zebra and bgpd, configured with docs/operations.md's snippet.
    Frr,
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

/// FRR's zebra (which installs bgpd's routes in the kernel) and bgpd in a namespace, with
/// their sockets and files in a directory of their own (the daemons run as Debian's `frr`
/// user); ended on drop.
#[derive(Debug)]
pub struct Frr {
    // The daemons end before their directory goes.
    bgpd: BackgroundProcess,
    zebra: BackgroundProcess,
    dir: TempDir,
}

impl Frr {
    /// Starts zebra, then bgpd with `bgpd_config`, in `ns`; their output goes to
    /// `logs/frr-{zebra,bgpd}.log`. Returns once bgpd answers `vtysh`.
    pub fn start(ns: &Netns, logs: &Path, bgpd_config: &str) -> Result<Frr> {
        let dir = TempDir::new("frr")?;
        let path = dir.path();
        std::fs::write(path.join("zebra.conf"), "hostname router\n")?;
        std::fs::write(path.join("bgpd.conf"), bgpd_config)?;
        run(
            Command::new("chown").arg("-R").arg("frr:frr").arg(path),
            COMMAND_TIMEOUT,
        )?
        .into_stdout()
        .context("handing the FRR directory to the frr user")?;
        let daemon = |name: &str, zserv: &Path| -> Result<BackgroundProcess> {
            let mut cmd = ns.command(format!("{FRR_DAEMONS}/{name}"));
            // No vty on TCP, every socket and file in our directory.
            cmd.arg("-P")
                .arg("0")
                .arg("-z")
                .arg(zserv)
                .arg("--vty_socket")
                .arg(path)
                .arg("-i")
                .arg(path.join(format!("{name}.pid")))
                .arg("-f")
                .arg(path.join(format!("{name}.conf")))
                .arg("--log")
                .arg("stdout");
            BackgroundProcess::spawn(&mut cmd, &logs.join(format!("frr-{name}.log")))
        };
        let zserv = path.join("zserv.api");
        let mut zebra = daemon("zebra", &zserv)?;
        wait_until("zebra to listen", Duration::from_secs(10), || {
            if let Ok(Some(status)) = zebra.child.try_wait() {
                bail!("zebra exited ({status}):\n{}", zebra.log_text());
            }
            Ok(zserv.exists().then_some(()))
        })?;
        let bgpd = daemon("bgpd", &zserv)?;
        let mut frr = Frr { bgpd, zebra, dir };
        wait_until("bgpd to answer", Duration::from_secs(10), || {
            if let Ok(Some(status)) = frr.bgpd.child.try_wait() {
                bail!("bgpd exited ({status}):\n{}", frr.bgpd.log_text());
            }
            Ok(frr.vtysh("show bgp summary json").ok().map(drop))
        })?;
        Ok(frr)
    }

    /// `vtysh -c COMMAND` against these daemons.
    pub fn vtysh(&self, command: &str) -> Result<String> {
        let out = run(
            Command::new("vtysh")
                .arg("--vty_socket")
                .arg(self.dir.path())
                .arg("-c")
                .arg(command),
            COMMAND_TIMEOUT,
        )?;
        if !out.succeeded() {
            bail!("vtysh -c {command:?}: {out:?}");
        }
        Ok(out.stdout)
    }

    /// Whether the BGP session with `neighbor` is established.
    pub fn established(&self, neighbor: Ipv4Addr) -> bool {
        self.vtysh("show bgp summary json")
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|v| {
                v["ipv4Unicast"]["peers"][neighbor.to_string()]["state"] == "Established"
            })
    }

    pub fn log_tail(&self) -> String {
        format!(
            "zebra:\n{}\nbgpd:\n{}",
            self.zebra.log_text(),
            self.bgpd.log_text()
        )
    }
}

/// The FRR configuration docs/operations.md gives for the data-centre router (its block under
/// "The data-centre router, FRR"), so the test runs what the guide tells operators to run.
pub fn frr_router_config() -> Result<String> {
    let guide = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let text =
        std::fs::read_to_string(&guide).with_context(|| format!("reading {}", guide.display()))?;
    let heading = "**The data-centre router, FRR**";
    let after = text
        .split_once(heading)
        .with_context(|| format!("{} has no {heading:?}", guide.display()))?
        .1;
    let block = after
        .split_once("```\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .with_context(|| format!("no configuration block after {heading:?}"))?
        .0;
    Ok(block.to_owned())
}

/// The data-centre router: BIRD or FRR.
#[derive(Debug)]
pub enum Router {
    Bird(Bird),
    Frr(Frr),
}

impl Router {
    /// Whether its session with hub `index` (0-based) is established.
    pub fn established(&mut self, index: usize) -> bool {
        match self {
            Router::Bird(bird) => bird.established(&format!("hub{}", index + 1)),
            Router::Frr(frr) => frr.established(hub_dc(index)),
        }
    }

    /// The router's BIRD (for `birdc`); `None` with FRR.
    pub fn bird(&mut self) -> Option<&mut Bird> {
        match self {
            Router::Bird(bird) => Some(bird),
            Router::Frr(_) => None,
        }
    }

    pub fn log_tail(&self) -> String {
        match self {
            Router::Bird(bird) => bird.log_tail(),
            Router::Frr(frr) => frr.log_tail(),
        }
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

/// The data centre of separate hub machines: their namespaces, the router's daemon and the
/// hubs' BIRDs. Dropping it ends the daemons, then deletes the namespaces (and what still
/// runs in them).
#[derive(Debug)]
pub struct BgpDc {
    pub router: Router,
    /// One per hub.
    pub hub_birds: Vec<Bird>,
    pub hub_ns: Vec<Netns>,
}

impl BgpDc {
    /// Makes `hubs` hub namespaces on the WAN (via `attach`, which plugs a namespace into the
    /// WAN bridge with an address), links each to the router `dc`, and starts the router's
    /// daemon and every hub's BIRD.
    pub fn build(
        dc: &Netns,
        daemon: RouterDaemon,
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
        let router = match daemon {
            RouterDaemon::Bird => {
                Router::Bird(Bird::start(dc, dir, "bird-router", &router_config(hubs))?)
            }
            RouterDaemon::Frr => {
                if hubs != 2 {
                    bail!("the guide's FRR configuration names two hubs, not {hubs}");
                }
                Router::Frr(Frr::start(dc, dir, &frr_router_config()?)?)
            }
        };
        let mut hub_birds = Vec::new();
        for (i, ns) in hub_ns.iter().enumerate() {
            hub_birds.push(Bird::start(
                ns,
                dir,
                &format!("bird-hub{}", i + 1),
                &hub_config(i),
            )?);
        }
        let mut dc_ = BgpDc {
            router,
            hub_birds,
            hub_ns,
        };
        dc_.wait_established(Duration::from_secs(20))?;
        Ok(dc_)
    }

    fn wait_established(&mut self, timeout: Duration) -> Result<()> {
        let hubs = self.hub_ns.len();
        let result = wait_until("the BGP sessions to the hubs", timeout, || {
            Ok((0..hubs).all(|i| self.router.established(i)).then_some(()))
        });
        result.map_err(|e| anyhow!("{e:#}\nthe router's daemon:\n{}", self.router.log_tail()))
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
