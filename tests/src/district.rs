//! The district of St. Wendel in miniature, in network namespaces: the demo's scenario and the
//! integration tests' fixture.
//!
//! ```text
//!                 wan (bridge 192.0.2.0/24)
//!      ┌──────────────┬───────────────┬──────────────┬─────────────┐
//!     dc .1        nohfelden-gw .11  tholey-gw .12   ho .21 (wireguard-go, wg-quick)
//!  hub(s), enroll    spoke            spoke
//!      │            eth1   guest0      eth1   guest0
//!     srv          10.30.1/24 10.30.100/24  10.40.1/24 10.40.100/24
//!  DMS 10.0.1.10, Dateiserver Nohfelden 10.1.10.5, Dateiserver Tholey 10.1.20.5
//! ```
//!
//! Everything is real: the enrollment service issues the identities from one-time tokens, the
//! policy (`examples/policy/st-wendel`) is signed and published through it, the gateways are
//! `komnet-gateway run` processes with their own TUN devices and nftables, the home office is
//! Debian's `wireguard-go` brought up by `wg-quick` with the config the service issued.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use komnet_policy::Policy;

use crate::command::{run_ok, wait_until, BackgroundProcess, TempDir};
use crate::daemon::{
    komnet_cli_binary, komnet_enroll_binary, komnet_gateway_binary, netprobe_binary,
};
use crate::netns::{add_veth_pair, Netns};
use crate::COMMAND_TIMEOUT;

mod appliance;
mod matrix;
pub use appliance::{ApplianceSpoke, TrunkAppliance};
pub use matrix::{destination, render_matrix, Destination, Source, DESTINATIONS, DMS};

pub const DC_WAN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ENROLL_PORT: u16 = 8443;
const HUB_PORT: u16 = 51820;

/// The policy the district runs, relative to the workspace root.
pub fn policy_dir() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests
        .parent()
        .unwrap_or(tests)
        .join("examples/policy/st-wendel")
}

/// A copy of the district's policy in `dir` (created), as version `version`: tests edit the
/// copy into the next version they publish.
pub fn copy_policy(dir: &Path, version: u64) -> Result<()> {
    let from = policy_dir();
    std::fs::create_dir_all(dir.join("tenants"))?;
    std::fs::copy(from.join("operator.toml"), dir.join("operator.toml"))
        .context("copying operator.toml")?;
    for entry in std::fs::read_dir(from.join("tenants"))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, dir.join("tenants").join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    let op = dir.join("operator.toml");
    let text = std::fs::read_to_string(&op)?;
    if !text.contains("version = 1\n") {
        bail!("the district's operator.toml no longer says version = 1");
    }
    std::fs::write(
        &op,
        text.replace("version = 1\n", &format!("version = {version}\n")),
    )?;
    Ok(())
}

/// Replaces `from` by `to` in `file`, which must contain it.
pub fn edit_file(file: &Path, from: &str, to: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    if !text.contains(from) {
        bail!("{} does not contain {from:?}", file.display());
    }
    std::fs::write(file, text.replacen(from, to, 1))?;
    Ok(())
}

/// A gateway process (`komnet-gateway run`) in a namespace.
#[derive(Debug)]
pub struct Gateway {
    pub name: String,
    pub netns: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub metrics: String,
    log_dir: PathBuf,
    starts: u32,
    process: Option<BackgroundProcess>,
}

impl Gateway {
    pub fn start(&mut self) -> Result<()> {
        self.starts += 1;
        let log = self
            .log_dir
            .join(format!("{}-{}.log", self.name, self.starts));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(komnet_gateway_binary()?)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info");
        self.process = Some(BackgroundProcess::spawn(&mut cmd, &log)?);
        Ok(())
    }

    /// The gateway's `/status` as JSON (via `komnet status --json` inside its namespace).
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.netns])
                .arg(komnet_cli_binary()?)
                .args(["status", "--json", "--gateway", &self.metrics]),
            COMMAND_TIMEOUT,
        )?;
        serde_json::from_str(&out).context("komnet status --json")
    }

    /// The gateway's `/metrics` text (fetched inside its namespace).
    pub fn metrics_text(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.metrics);
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.netns])
                .arg(netprobe_binary()?)
                .args(["get", &url]),
            COMMAND_TIMEOUT,
        )
    }

    /// `komnet status` as a person reads it.
    pub fn status_text(&self) -> Result<String> {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.netns])
                .arg(komnet_cli_binary()?)
                .args(["status", "--gateway", &self.metrics]),
            COMMAND_TIMEOUT,
        )
    }

    /// Waits until the gateway runs with policy `version` in force.
    pub fn wait_running(&mut self, version: u64, timeout: Duration) -> Result<()> {
        let name = self.name.clone();
        let result = wait_until(
            &format!("{name} to run policy version {version}"),
            timeout,
            || {
                if let Some(p) = self.process.as_mut() {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        bail!("{name} exited ({status}):\n{}", p.log_text());
                    }
                }
                let Ok(s) = self.status() else {
                    return Ok(None);
                };
                Ok((s["state"] == "running" && s["policy"]["version"] == version).then_some(()))
            },
        );
        result.map_err(|e| anyhow!("{e:#}\n{name}'s log:\n{}", self.log_tail()))
    }

    /// Waits until the gateway's `/status` satisfies `what` (described by `label`), e.g. a
    /// `state` that starts with `waiting for a bootstrap file`; returns that status.
    pub fn wait_status(
        &mut self,
        label: &str,
        timeout: Duration,
        what: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let name = self.name.clone();
        let result = wait_until(&format!("{name}: {label}"), timeout, || {
            if let Some(p) = self.process.as_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    bail!("{name} exited ({status}):\n{}", p.log_text());
                }
            }
            let Ok(s) = self.status() else {
                return Ok(None);
            };
            Ok(what(&s).then_some(s))
        });
        result.map_err(|e| anyhow!("{e:#}\n{name}'s log:\n{}", self.log_tail()))
    }

    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map_or_else(String::new, BackgroundProcess::log_text)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.child.id())
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            crate::command::send_signal(p.child.id(), "TERM");
            p.wait_timeout(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to end by itself (then kills it: an error), and
    /// returns how it ended. Its log stays readable ([`Self::log_tail`]) until the next start.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let name = self.name.clone();
        let process = self
            .process
            .as_mut()
            .ok_or_else(|| anyhow!("{name} is not running"))?;
        process.wait_timeout(timeout)
    }

    /// SIGKILL: no clean-up of any kind.
    pub fn kill_hard(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            crate::command::send_signal(p.child.id(), "KILL");
            p.wait_timeout(Duration::from_secs(5))?;
        }
        Ok(())
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }
}

/// A town hall: its spoke appliance and two LAN namespaces.
#[derive(Debug)]
pub struct Commune {
    pub name: &'static str,
    pub label: &'static str,
    /// Second octet of its LAN: 10.N.1.0/24 staff, 10.N.100.0/24 guest WLAN.
    pub lan: u8,
    pub spoke: Gateway,
    pub gw: Netns,
    pub staff: Netns,
    pub guest: Netns,
}

impl Commune {
    pub fn staff_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.lan, 1, 10)
    }
    pub fn guest_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.lan, 100, 10)
    }
}

/// The home-office worker: stock wireguard-go via wg-quick.
#[derive(Debug)]
pub struct HomeOffice {
    pub netns: Netns,
    pub addr: Ipv4Addr,
    pub config: PathBuf,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Two hubs (the second on port 51821 in the same data-centre namespace) for failover.
    pub two_hubs: bool,
    pub homeoffice: bool,
    /// The enrollment service's clock runs this far off (a libfaketime offset such as
    /// `-402960s`); `None`: on time.
    pub enroll_clock: Option<&'static str>,
    /// Hubs on separate machines (needs `two_hubs`): each hub in a namespace of its own with
    /// BIRD, announcing its peers' prefixes by BGP to the data-centre router (`dc`, BIRD too)
    /// instead of sharing the router's routing table ([`crate::bgp`]).
    pub bgp: bool,
    /// With `bgp`: the data-centre router's daemon (BIRD unless FRR is asked for).
    pub router: crate::bgp::RouterDaemon,
    /// MFA-gated home offices: (tenant, window) into enroll.toml's `[mfa_window]`.
    pub mfa_window: Option<(&'static str, &'static str)>,
    /// With `homeoffice`: the person whose device it is (default `anna`).
    pub homeoffice_user: Option<&'static str>,
}

/// The running district. Dropping it stops every process and deletes every namespace.
#[derive(Debug)]
pub struct District {
    // Processes first: they are dropped (killed) before the namespaces go.
    servers: Option<BackgroundProcess>,
    /// Test helpers in the data centre (the answer-losing proxy).
    helpers: Vec<BackgroundProcess>,
    enroll: Option<BackgroundProcess>,
    pub hubs: Vec<Gateway>,
    pub communes: Vec<Commune>,
    pub homeoffice: Option<HomeOffice>,
    /// With [`Options::bgp`]: the hubs' namespaces and every BIRD (after the hubs, which are
    /// ended first).
    pub bgp: Option<crate::bgp::BgpDc>,
    pub srv: Netns,
    pub dc: Netns,
    pub wan: Netns,
    pub policy: Policy,
    pub policy_version: u64,
    pub netprobe: PathBuf,
    pub dir: TempDir,
    wan_ports: u32,
    enroll_clock: Option<String>,
    mfa_window: Option<(&'static str, &'static str)>,
}

/// Runs `cmd` with its wall clock `offset` off (e.g. `-8d`): libfaketime's thread-safe
/// variant preloaded into the program itself (the `faketime` wrapper would stay between us and
/// its signals). Timers and timeouts run on the monotonic clock, which stays as it is.
fn fake_clock(cmd: &mut Command, offset: &str) -> Result<()> {
    cmd.env("LD_PRELOAD", faketime_library()?)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("FAKETIME_NO_CACHE", "1");
    Ok(())
}

/// libfaketime's multi-threaded library (Debian's `libfaketime`, which `faketime` pulls in).
fn faketime_library() -> Result<PathBuf> {
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ] {
        let lib = Path::new(dir).join("faketime/libfaketimeMT.so.1");
        if lib.exists() {
            return Ok(lib);
        }
    }
    bail!("libfaketimeMT.so.1 not found (package libfaketime; scripts/setup.sh test installs faketime)")
}

fn attach_to_wan(wan: &Netns, ns: &Netns, index: &mut u32, addr: Ipv4Addr) -> Result<()> {
    *index += 1;
    let port = format!("p{index}");
    add_veth_pair(ns, "wan0", wan, &port, 1500)?;
    wan.ip(&["link", "set", &port, "master", "br0"])?;
    ns.add_address("wan0", IpAddr::V4(addr), 24)
}

fn lan(gw: &Netns, dev: &str, host: &Netns, net: [u8; 3]) -> Result<()> {
    add_veth_pair(gw, dev, host, "eth0", 1500)?;
    let router = Ipv4Addr::new(net[0], net[1], net[2], 1);
    gw.add_address(dev, IpAddr::V4(router), 24)?;
    host.add_address(
        "eth0",
        IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], 10)),
        24,
    )?;
    host.ip(&["route", "add", "default", "via", &router.to_string()])
        .map(drop)
}

impl District {
    /// Builds the namespaces, starts the enrollment service, publishes the policy, enrols and
    /// starts the hub(s), the spokes and (optionally) the home office, and the servers.
    pub fn start(netprobe: &Path, options: Options) -> Result<District> {
        let dir = TempDir::new("district")?;
        let policy = Policy::load(&policy_dir())
            .map_err(|e| anyhow!("the demo policy does not load:\n{}", e.render()))?;
        let wan = Netns::new("wan")?;
        wan.ip(&["link", "add", "br0", "type", "bridge"])?;
        wan.ip(&["link", "set", "br0", "up"])?;
        let mut ports = 0;
        let dc = Netns::new("dc")?;
        attach_to_wan(&wan, &dc, &mut ports, DC_WAN)?;
        let srv = Netns::new("srv")?;
        add_veth_pair(&dc, "srv0", &srv, "eth0", 1500)?;
        dc.add_address("srv0", "10.255.0.1".parse()?, 30)?;
        srv.add_address("eth0", "10.255.0.2".parse()?, 30)?;
        srv.ip(&["route", "add", "default", "via", "10.255.0.1"])?;
        for d in DESTINATIONS {
            srv.add_address("eth0", IpAddr::V4(d.addr), 32)?;
            dc.ip(&[
                "route",
                "add",
                &format!("{}/32", d.addr),
                "via",
                "10.255.0.2",
            ])?;
        }
        if options.bgp && !options.two_hubs {
            bail!("Options::bgp needs two_hubs");
        }
        let bgp = if options.bgp {
            Some(crate::bgp::BgpDc::build(
                &dc,
                options.router,
                2,
                dir.path(),
                |ns, addr| attach_to_wan(&wan, ns, &mut ports, addr),
            )?)
        } else {
            None
        };
        let mut district = District {
            servers: None,
            helpers: Vec::new(),
            enroll: None,
            hubs: Vec::new(),
            communes: Vec::new(),
            homeoffice: None,
            bgp,
            srv,
            dc,
            wan,
            policy,
            policy_version: 1,
            netprobe: netprobe.to_owned(),
            dir,
            wan_ports: ports,
            enroll_clock: options.enroll_clock.map(str::to_owned),
            mfa_window: options.mfa_window,
        };
        district.start_servers()?;
        district.start_enroll(options.two_hubs)?;
        district.publish_policy(&policy_dir(), "policy-v1.bundle")?;
        for i in 0..if options.two_hubs { 2 } else { 1 } {
            district.add_hub(i)?;
        }
        for hub in &mut district.hubs {
            hub.wait_running(1, Duration::from_secs(30))?;
        }
        for (name, label, lan, wan_host) in [
            ("nohfelden", "Nohfelden", 30u8, 11u8),
            ("tholey", "Tholey", 40, 12),
        ] {
            district.add_commune(name, label, lan, wan_host)?;
        }
        for c in &mut district.communes {
            c.spoke.wait_running(1, Duration::from_secs(30))?;
        }
        if options.homeoffice {
            district.add_homeoffice("nohfelden", options.homeoffice_user.unwrap_or("anna"))?;
        }
        Ok(district)
    }

    /// A new namespace on the WAN with address 192.0.2.`host`, for extra appliances.
    pub fn wan_namespace(&mut self, label: &str, host: u8) -> Result<Netns> {
        let ns = Netns::new(label)?;
        attach_to_wan(
            &self.wan,
            &ns,
            &mut self.wan_ports,
            Ipv4Addr::new(192, 0, 2, host),
        )?;
        Ok(ns)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The enrollment service's admin socket (a file: reachable from the host).
    pub fn enroll_socket(&self) -> PathBuf {
        self.path("enroll").join("admin.sock")
    }

    /// `POST` of a JSON body to the enrollment service's admin socket (HTTP/1.1, as the web
    /// console sends it, for `person`): the status code and the body.
    pub fn admin_post(
        &self,
        path: &str,
        body: &serde_json::Value,
        person: &str,
    ) -> Result<(u16, String)> {
        self.admin_http("POST", path, Some(body), person)
    }

    /// `GET` on the enrollment service's admin socket, as the web console asks.
    pub fn admin_get(&self, path: &str, person: &str) -> Result<(u16, String)> {
        self.admin_http("GET", path, None, person)
    }

    fn admin_http(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        person: &str,
    ) -> Result<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let socket = self.enroll_socket();
        let mut stream = std::os::unix::net::UnixStream::connect(&socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nx-komnet-on-behalf-of: {person}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("not an HTTP answer: {answer:?}"))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// `komnet ARGS` in the host namespace (admin commands reach the service by its socket).
    pub fn komnet(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new(komnet_cli_binary()?).args(args),
            COMMAND_TIMEOUT,
        )
    }

    /// An admin command with the enrollment service's socket.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let socket = self.enroll_socket();
        let mut all: Vec<&str> = args.to_vec();
        let socket = socket.to_string_lossy().into_owned();
        all.extend(["--socket", &socket]);
        self.komnet(&all)
    }

    /// The enrollment host crashes and comes back (a new process on the same data directory);
    /// its log goes to `log_name`. As in a power cut, its kernel forgets the connections too:
    /// the process is killed and its sockets (still sending FIN, or waiting) are destroyed, so
    /// behind a blackhole nothing ever tells a client that its connection is gone.
    pub fn crash_and_restart_enroll(&mut self, log_name: &str) -> Result<()> {
        if let Some(mut p) = self.enroll.take() {
            crate::command::send_signal(p.child.id(), "KILL");
            p.wait_timeout(Duration::from_secs(5))?;
        }
        self.dc
            .exec(&["ss", "-K", "-tn", &format!("sport = :{ENROLL_PORT}")])?;
        let _ = std::fs::remove_file(self.enroll_socket());
        self.serve_enroll(log_name)
    }

    /// Stops the enrollment service (SIGTERM) and starts it again with its clock `offset`
    /// off (libfaketime, e.g. `-8d`), or on time (`None`).
    pub fn restart_enroll_with_clock(
        &mut self,
        offset: Option<&str>,
        log_name: &str,
    ) -> Result<()> {
        if let Some(mut p) = self.enroll.take() {
            crate::command::send_signal(p.child.id(), "TERM");
            p.wait_timeout(Duration::from_secs(10))?;
        }
        let _ = std::fs::remove_file(self.enroll_socket());
        self.enroll_clock = offset.map(str::to_owned);
        self.serve_enroll_at(log_name, offset)
    }

    /// A proxy in front of the enrollment service at `https://DC_WAN:port` that loses the
    /// service's answers on connections made while the returned flag file exists (`netprobe
    /// lose-answers`): the service commits, the client sees its connection close. Its log
    /// counts `lost answer N`.
    pub fn answer_losing_proxy(&mut self, port: u16) -> Result<(PathBuf, PathBuf)> {
        let flag = self.path(&format!("lose-answers-{port}"));
        std::fs::write(&flag, "")?;
        let log = self.path(&format!("lose-answers-{port}.log"));
        let mut cmd = self.dc.command(&self.netprobe);
        cmd.arg("lose-answers")
            .arg(format!("{DC_WAN}:{port}"))
            .arg(format!("{DC_WAN}:{ENROLL_PORT}"))
            .arg(&flag);
        self.helpers.push(BackgroundProcess::spawn(&mut cmd, &log)?);
        wait_until("the proxy to listen", Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&log)?
                .contains("ready")
                .then_some(()))
        })?;
        Ok((flag, log))
    }

    /// Drops (`true`) or lets through again (`false`) every packet to and from the enrollment
    /// service's port in the data-centre namespace, where the hubs and the service run: a
    /// blackholed path, no RST, no ICMP. Spokes lose the service too.
    pub fn blackhole_registry(&self, on: bool) -> Result<()> {
        if on {
            let rules = format!(
                "table inet komnet_test_blackhole {{\n\
                 chain out {{ type filter hook output priority -10; policy accept;\n\
                 tcp dport {ENROLL_PORT} drop\ntcp sport {ENROLL_PORT} drop\n}}\n\
                 chain inp {{ type filter hook input priority -10; policy accept;\n\
                 tcp dport {ENROLL_PORT} drop\ntcp sport {ENROLL_PORT} drop\n}}\n}}\n"
            );
            let file = self.path("blackhole.nft");
            std::fs::write(&file, rules)?;
            self.dc.exec(&["nft", "-f", &file.to_string_lossy()])?;
        } else {
            self.dc
                .exec(&["nft", "delete", "table", "inet", "komnet_test_blackhole"])?;
        }
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let log = self.path("servers.log");
        let mut cmd = self.srv.command(&self.netprobe);
        cmd.args(["serve", "tcp:0.0.0.0:445", "echo:0.0.0.0:443"]);
        self.servers = Some(BackgroundProcess::spawn(&mut cmd, &log)?);
        wait_until("the servers to listen", Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&log)?
                .contains("ready")
                .then_some(()))
        })
    }

    fn start_enroll(&mut self, two_hubs: bool) -> Result<()> {
        let data = self.path("enroll");
        let key = self.path("policy.key");
        self.komnet(&["policy", "keygen", "--out", &key.to_string_lossy()])?;
        let url = format!("https://{DC_WAN}:{ENROLL_PORT}");
        let mut args: Vec<String> = vec![
            "init".into(),
            "--data-dir".into(),
            data.to_string_lossy().into_owned(),
            "--server-name".into(),
            DC_WAN.to_string(),
            "--enroll-url".into(),
            url,
            "--hub-endpoint".into(),
            format!("hub1={}", self.hub_endpoint(0)),
            "--policy-public-key".into(),
            self.path("policy.pub").to_string_lossy().into_owned(),
        ];
        if two_hubs {
            args.push("--hub-endpoint".into());
            args.push(format!("hub2={}", self.hub_endpoint(1)));
        }
        // A service whose clock runs off made its CA at that time too.
        let mut init = Command::new(komnet_enroll_binary()?);
        init.args(&args);
        if let Some(offset) = &self.enroll_clock {
            fake_clock(&mut init, offset)?;
        }
        run_ok(&mut init, COMMAND_TIMEOUT)?;
        // The data centre's networks go through the tunnel: all of 10.0.0.0/8 in this district.
        let config_path = data.join("enroll.toml");
        let mut config: toml::Table = toml::from_str(&std::fs::read_to_string(&config_path)?)?;
        config.insert("listen".into(), format!("{DC_WAN}:{ENROLL_PORT}").into());
        config.insert(
            "allowed_ips".into(),
            toml::Value::Array(vec!["10.0.0.0/8".into()]),
        );
        // Hubs notice a dead registry stream after three missed keep-alives: 3 s here.
        config.insert("registry_keepalive".into(), "1s".into());
        if let Some((tenant, window)) = self.mfa_window {
            let mut table = toml::Table::new();
            table.insert(tenant.into(), window.into());
            config.insert("mfa_window".into(), table.into());
        }
        std::fs::write(&config_path, toml::to_string(&config)?)?;
        self.serve_enroll("enroll.log")
    }

    fn serve_enroll(&mut self, log_name: &str) -> Result<()> {
        let clock = self.enroll_clock.clone();
        self.serve_enroll_at(log_name, clock.as_deref())
    }

    /// Starts the enrollment service; `clock`: a libfaketime offset such as `-8d` for a
    /// service whose clock runs that far off (what it issues is dated accordingly).
    fn serve_enroll_at(&mut self, log_name: &str, clock: Option<&str>) -> Result<()> {
        let data = self.path("enroll");
        let log = self.path(log_name);
        let mut cmd = self.dc.command(komnet_enroll_binary()?);
        if let Some(offset) = clock {
            fake_clock(&mut cmd, offset)?;
        }
        cmd.args(["serve", "--data-dir"]).arg(&data);
        self.enroll = Some(BackgroundProcess::spawn(&mut cmd, &log)?);
        let socket = self.enroll_socket();
        wait_until(
            "the enrollment service's admin socket",
            Duration::from_secs(15),
            || Ok(socket.exists().then_some(())),
        )
        .map_err(|e| {
            anyhow!(
                "{e:#}\nenroll log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    }

    /// Signs `dir` into a bundle and publishes it through the enrollment service.
    pub fn publish_policy(&self, dir: &Path, file: &str) -> Result<String> {
        let bundle = self.path(file);
        self.komnet(&[
            "policy",
            "bundle",
            &dir.to_string_lossy(),
            "--key",
            &self.path("policy.key").to_string_lossy(),
            "--out",
            &bundle.to_string_lossy(),
        ])?;
        self.admin(&["policy-publish", &bundle.to_string_lossy()])
    }

    /// A fresh bootstrap file from `komnet token create` (each call a new token).
    pub fn token(&self, tenant: &str, site: &str, role: &str) -> Result<PathBuf> {
        let mut out = self.path(&format!("{tenant}-{site}.bootstrap.json"));
        for n in 2.. {
            if !out.exists() {
                break;
            }
            out = self.path(&format!("{tenant}-{site}-{n}.bootstrap.json"));
        }
        self.admin(&[
            "token",
            "create",
            "--tenant",
            tenant,
            "--site",
            site,
            "--role",
            role,
            "--out",
            &out.to_string_lossy(),
        ])?;
        Ok(out)
    }

    fn gateway_config(&self, name: &str, body: &str) -> Result<(PathBuf, PathBuf)> {
        self.gateway_config_with(name, true, body)
    }

    /// `pin_key = false`: no policy_public_key, as on the generic appliance image.
    fn gateway_config_with(
        &self,
        name: &str,
        pin_key: bool,
        body: &str,
    ) -> Result<(PathBuf, PathBuf)> {
        let data = self.path(name);
        let config = self.path(&format!("{name}.toml"));
        let key = if pin_key {
            format!(
                "policy_public_key = \"{}\"\n",
                self.path("policy.pub").display()
            )
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n{key}policy_poll = \"1s\"\n{body}",
                data.display()
            ),
        )?;
        Ok((config, data))
    }

    /// Where spokes reach hub `index`: both in the data-centre namespace (ports 51820 and
    /// 51821), or each on its own machine with [`Options::bgp`].
    fn hub_endpoint(&self, index: usize) -> String {
        match &self.bgp {
            Some(_) => format!("{}:{HUB_PORT}", crate::bgp::hub_wan(index)),
            None => format!("{DC_WAN}:{}", HUB_PORT + index as u16),
        }
    }

    fn add_hub(&mut self, index: usize) -> Result<()> {
        let name = format!("hub{}", index + 1);
        let bootstrap = self.token("kreis", &name, "hub")?;
        let metrics = format!("127.0.0.1:{}", 9120 + index);
        let (netns, port, bgp) = match &self.bgp {
            Some(b) => (
                b.hub_ns[index].name().to_owned(),
                HUB_PORT,
                format!(
                    "[bgp]\ntable = {}\nbird_socket = \"{}\"\n",
                    crate::bgp::TABLE,
                    // The hub machine's own BIRD.
                    b.hub_birds[index].socket().display()
                ),
            ),
            None => (
                self.dc.name().to_owned(),
                HUB_PORT + index as u16,
                String::new(),
            ),
        };
        let (config, data_dir) = self.gateway_config(
            &name,
            &format!(
                "role = \"hub\"\nbootstrap = \"{}\"\ninterface = \"komnet{index}\"\nlisten_port = {port}\nmetrics_listen = \"{metrics}\"\nregistry_outage_alarm = \"5s\"\n{bgp}",
                bootstrap.display(),
            ),
        )?;
        let mut hub = Gateway {
            name,
            netns,
            config,
            data_dir,
            metrics,
            log_dir: self.dir.path().to_owned(),
            starts: 0,
            process: None,
        };
        hub.start()?;
        self.hubs.push(hub);
        Ok(())
    }

    fn add_commune(
        &mut self,
        name: &'static str,
        label: &'static str,
        lan_octet: u8,
        wan_host: u8,
    ) -> Result<()> {
        let gw = Netns::new(&format!("{name}-gw"))?;
        attach_to_wan(
            &self.wan,
            &gw,
            &mut self.wan_ports,
            Ipv4Addr::new(192, 0, 2, wan_host),
        )?;
        let staff = Netns::new(&format!("{name}-staff"))?;
        let guest = Netns::new(&format!("{name}-guest"))?;
        // The interface names the policy binds the segments to (examples/policy/st-wendel).
        lan(&gw, "eth1", &staff, [10, lan_octet, 1])?;
        lan(&gw, "guest0", &guest, [10, lan_octet, 100])?;
        let bootstrap = self.token(name, "rathaus", "spoke")?;
        let gw_name = format!("{name}-spoke");
        let (config, data_dir) = self.gateway_config(
            &gw_name,
            &format!(
                "role = \"spoke\"\nbootstrap = \"{}\"\nlan = [\"eth1\", \"guest0\"]\n",
                bootstrap.display()
            ),
        )?;
        let mut spoke = Gateway {
            name: gw_name,
            netns: gw.name().to_owned(),
            config,
            data_dir,
            metrics: "127.0.0.1:9120".into(),
            log_dir: self.dir.path().to_owned(),
            starts: 0,
            process: None,
        };
        spoke.start()?;
        self.communes.push(Commune {
            name,
            label,
            lan: lan_octet,
            spoke,
            gw,
            staff,
            guest,
        });
        Ok(())
    }

    fn add_homeoffice(&mut self, tenant: &str, user: &str) -> Result<()> {
        let ns = Netns::new("ho")?;
        attach_to_wan(
            &self.wan,
            &ns,
            &mut self.wan_ports,
            Ipv4Addr::new(192, 0, 2, 21),
        )?;
        let out = self.path("homeoffice");
        std::fs::create_dir_all(&out)?;
        self.admin(&[
            "homeoffice",
            "issue",
            "--tenant",
            tenant,
            "--user",
            user,
            "--out-dir",
            &out.to_string_lossy(),
        ])?;
        let issued = std::fs::read_to_string(out.join(format!("{user}.conf")))
            .context("the issued wg-quick config")?;
        let addr: Ipv4Addr = issued
            .lines()
            .find_map(|l| l.trim().strip_prefix("Address"))
            .and_then(|rest| rest.trim_start_matches([' ', '=']).split(',').next())
            .and_then(|a| a.trim().split('/').next()?.parse().ok())
            .ok_or_else(|| anyhow!("no IPv4 Address in the issued config:\n{issued}"))?;
        // wg-quick names the interface after the file. wireguard-go's UAPI socket
        // (/var/run/wireguard/NAME.sock) is shared by every namespace, so districts running at
        // the same time need different names.
        static HOME_OFFICES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = HOME_OFFICES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = out.join(format!("ho{}n{n}.conf", std::process::id() % 100_000));
        crate::command::write_private_file(&config, &issued)?;
        run_ok(
            ns.command("wg-quick")
                .arg("up")
                .arg(&config)
                .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go"),
            COMMAND_TIMEOUT,
        )?;
        self.homeoffice = Some(HomeOffice {
            netns: ns,
            addr,
            config,
        });
        Ok(())
    }

    pub fn commune(&self, name: &str) -> &Commune {
        self.communes
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no commune {name}"))
    }

    pub fn commune_mut(&mut self, name: &str) -> &mut Commune {
        self.communes
            .iter_mut()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no commune {name}"))
    }
}
