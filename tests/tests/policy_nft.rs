//! The compiled nftables ruleset, installed with the real `nft` (through `komnet policy apply`)
//! on a router namespace between a town-hall LAN and the tunnel side, passes and blocks real
//! TCP, UDP and ICMP flows (IPv4 and IPv6) exactly as the reference evaluator decides.
//!
//! ```text
//!  [lan ns] eth0 ──veth── lan0 [router ns: table inet komnet] wg0 ──veth── eth0 [dc ns]
//!  segment addresses of musterstadt/rathaus          data-centre services, remote sources
//! ```

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::io::{BufRead as _, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use komnet_netns_tests::{add_veth_pair, komnet_cli_binary, require_root_and_tools, run, Netns};
use komnet_policy::{decide, Origin, PacketMeta, Policy, Proto, Role};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis")
}

/// A `netprobe serve` process, killed on drop.
struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listen(ns: &Netns, specs: &[String]) -> Result<Listener> {
    let mut child = ns
        .command(env!("CARGO_BIN_EXE_netprobe"))
        .arg("serve")
        .args(specs)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start netprobe serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let listener = Listener(child);
    if line.trim() != "ready" {
        bail!("netprobe serve did not come up: {line:?}");
    }
    Ok(listener)
}

/// One flow to try and the oracle's verdict for it.
struct Flow {
    proto: Proto,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    expect_pass: bool,
    why: String,
}

impl Flow {
    fn spec(&self) -> String {
        match self.proto {
            Proto::Icmp => format!("icmp,{},{}", self.src, self.dst),
            p => format!("{p},{},{},{}", self.src, self.dst, self.port),
        }
    }
}

fn listen_spec(proto: Proto, addr: IpAddr, port: u16) -> Option<String> {
    let sock = match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    match proto {
        Proto::Tcp => Some(format!("tcp:{sock}")),
        Proto::Udp => Some(format!("udp:{sock}")),
        Proto::Icmp => None,
    }
}

/// A host address inside a prefix: the address itself for host prefixes, else network + 10.
fn host_of(net: &ipnet::IpNet, offset: u8) -> IpAddr {
    if net.prefix_len() == net.max_prefix_len() {
        return net.addr();
    }
    match net.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + u32::from(offset)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + u128::from(offset)).into()),
    }
}

#[test]
fn nftables_ruleset_enforces_what_the_oracle_decides() {
    require_root_and_tools();
    let komnet = komnet_cli_binary().unwrap();
    let policy = Policy::load(&example_dir()).unwrap_or_else(|e| panic!("{}", e.render()));
    let tenant = policy.tenant_by_name("musterstadt").unwrap();
    let site = policy.site_by_name(tenant, "rathaus").unwrap();
    let spoke = Origin::Peer(
        policy
            .peer_identity("musterstadt", Some("rathaus"), Role::Spoke)
            .unwrap(),
    );

    let lan = Netns::new("fw-lan").unwrap();
    let router = Netns::new("fw-router").unwrap();
    let dc = Netns::new("fw-dc").unwrap();
    // Link-local addresses would be "tentative" for a second after the links come up, and
    // neighbour discovery (so the first flows) would fail meanwhile.
    for ns in [&lan, &router, &dc] {
        for k in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            ns.exec(&["sysctl", "-qw", &format!("{k}=0")]).unwrap();
        }
    }
    add_veth_pair(&lan, "eth0", &router, "lan0", 1500).unwrap();
    add_veth_pair(&router, "wg0", &dc, "eth0", 1500).unwrap();
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        router
            .exec(&["sysctl", "-qw", &format!("{k}={v}")])
            .unwrap();
    }
    router
        .add_address("lan0", "10.20.255.254".parse().unwrap(), 16)
        .unwrap();
    router
        .add_address("lan0", "fd00:20::ffff".parse().unwrap(), 48)
        .unwrap();
    router
        .add_address("wg0", "172.31.0.1".parse().unwrap(), 30)
        .unwrap();
    router
        .add_address("wg0", "fd99::1".parse().unwrap(), 64)
        .unwrap();
    router
        .ip(&["route", "add", "10.0.0.0/8", "via", "172.31.0.2"])
        .unwrap();
    router
        .ip(&["-6", "route", "add", "fd00::/8", "via", "fd99::2"])
        .unwrap();
    dc.add_address("eth0", "172.31.0.2".parse().unwrap(), 30)
        .unwrap();
    dc.add_address("eth0", "fd99::2".parse().unwrap(), 64)
        .unwrap();
    dc.ip(&["route", "add", "default", "via", "172.31.0.1"])
        .unwrap();
    dc.ip(&["-6", "route", "add", "default", "via", "fd99::1"])
        .unwrap();

    // LAN hosts: one address per family in every segment of the site, plus a foreign source
    // (another commune's address) and an address in no segment.
    let mut lan_sources: Vec<IpAddr> = Vec::new();
    for seg in policy.segments.iter().filter(|s| s.site == Some(site)) {
        for net in &seg.prefixes {
            lan_sources.push(host_of(net, 10));
        }
    }
    lan_sources.push("10.30.1.11".parse().unwrap());
    lan_sources.push("10.20.200.10".parse().unwrap());
    lan_sources.push("fd00:20:0:200::10".parse().unwrap());
    for a in &lan_sources {
        let len = match a {
            IpAddr::V4(_) if a.to_string().starts_with("10.20.") => 16,
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 48,
        };
        lan.add_address("eth0", *a, len).unwrap();
    }
    lan.ip(&["route", "add", "default", "via", "10.20.255.254"])
        .unwrap();
    lan.ip(&["-6", "route", "add", "default", "via", "fd00:20::ffff"])
        .unwrap();

    // Outbound: every LAN source to every data-centre service, on each offered port and on
    // one port the service does not offer.
    let mut flows = Vec::new();
    let mut dc_listen = Vec::new();
    let mut dc_addrs: Vec<IpAddr> = Vec::new();
    let site_prefixes = &policy.sites[site.index()].prefixes;
    for (i, svc) in policy.services.iter().enumerate() {
        let name = policy.service_name(komnet_policy::ServiceId(i as u32));
        for net in &svc.addresses {
            if site_prefixes.iter().any(|p| p.contains(net)) {
                continue;
            }
            let dst = host_of(net, 7);
            dc_addrs.push(dst);
            let mut ports: Vec<(Proto, u16)> = Vec::new();
            for r in &svc.ports {
                ports.push((r.proto, r.lo.max(1)));
                if r.hi != r.lo {
                    ports.push((r.proto, r.hi));
                }
            }
            ports.push((Proto::Tcp, 22));
            for &(proto, port) in &ports {
                if let Some(spec) = listen_spec(proto, dst, port) {
                    dc_listen.push(spec);
                }
                for &src in lan_sources.iter().filter(|s| s.is_ipv4() == dst.is_ipv4()) {
                    let d = decide(&policy, spoke, &PacketMeta::new(src, dst, proto, port));
                    flows.push(Flow {
                        proto,
                        src,
                        dst,
                        port,
                        expect_pass: d.allow,
                        why: format!(
                            "{src} -> {name} {dst} {proto}/{port}: {}",
                            policy.describe(d.by)
                        ),
                    });
                }
            }
        }
    }
    dc_listen.sort();
    dc_listen.dedup();
    dc_addrs.sort();
    dc_addrs.dedup();

    // Inbound: remote sources (data centre, home office, other communes) towards the site's
    // own service (the printer) and towards a staff PC that offers nothing.
    let remote_sources: Vec<IpAddr> = [
        "10.0.16.10",
        "fd00:0:1:16::10",
        "10.250.20.10",
        "fd00:250:20::10",
        "10.30.1.10",
        "fd00:30:0:1::10",
        "10.30.100.10",
        "10.10.1.10",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    for a in dc_addrs.iter().chain(&remote_sources) {
        dc.add_address("eth0", *a, if a.is_ipv4() { 32 } else { 128 })
            .unwrap();
    }
    let printer_v4: IpAddr = "10.20.1.50".parse().unwrap();
    let printer_v6: IpAddr = "fd00:20:0:1::50".parse().unwrap();
    lan.add_address("eth0", printer_v4, 16).unwrap();
    lan.add_address("eth0", printer_v6, 48).unwrap();
    let staff_pc: IpAddr = "10.20.1.10".parse().unwrap();
    let mut lan_listen = Vec::new();
    for dst in [printer_v4, printer_v6, staff_pc] {
        for (proto, port) in [
            (Proto::Tcp, 9100),
            (Proto::Icmp, 0),
            (Proto::Tcp, 445),
            (Proto::Udp, 161),
        ] {
            if let Some(spec) = listen_spec(proto, dst, port) {
                lan_listen.push(spec);
            }
            for &src in remote_sources
                .iter()
                .filter(|s| s.is_ipv4() == dst.is_ipv4())
            {
                let d = decide(
                    &policy,
                    Origin::Address,
                    &PacketMeta::new(src, dst, proto, port),
                );
                flows.push(Flow {
                    proto,
                    src,
                    dst,
                    port,
                    expect_pass: d.allow,
                    why: format!(
                        "{src} -> {dst} {proto}/{port} (inbound): {}",
                        policy.describe(d.by)
                    ),
                });
            }
        }
    }

    // Before the policy: the router forwards everything (no firewall yet) — proves the probes
    // can see a pass at all.
    let _dc_listener = listen(&dc, &dc_listen).unwrap();
    let _lan_listener = listen(&lan, &lan_listen).unwrap();

    // Install the site's ruleset with the real nft, through the CLI an operator would use.
    let applied = run(
        router
            .command(&komnet)
            .args(["policy", "apply"])
            .arg(example_dir())
            .args([
                "--site",
                "musterstadt/rathaus",
                "--lan",
                "lan0",
                "--tunnel",
                "wg0",
            ]),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(
        applied.succeeded(),
        "komnet policy apply failed: {applied:?}"
    );

    let outcomes = probe_all(&lan, &dc, &lan_sources, &flows).unwrap();
    let mut mismatches = Vec::new();
    let (mut passes, mut blocks) = (0, 0);
    for (flow, passed) in flows.iter().zip(&outcomes) {
        if *passed {
            passes += 1;
        } else {
            blocks += 1;
        }
        if *passed != flow.expect_pass {
            mismatches.push(format!(
                "{}: observed {}, oracle says {}",
                flow.why,
                if *passed { "pass" } else { "blocked" },
                if flow.expect_pass { "allow" } else { "deny" }
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} flows differ from the oracle:\n{}",
        mismatches.len(),
        flows.len(),
        mismatches.join("\n")
    );
    // The matrix is not trivial: both verdicts occur, in both families.
    assert!(
        passes >= 40 && blocks >= 100,
        "passes {passes}, blocks {blocks}"
    );
    assert!(flows.iter().any(|f| f.expect_pass && f.dst.is_ipv6()));
    assert!(flows.iter().any(|f| f.expect_pass && f.proto == Proto::Udp));
    assert!(flows
        .iter()
        .any(|f| f.expect_pass && f.proto == Proto::Icmp));
}

/// Runs every flow from the namespace that holds its source; returns pass/blocked per flow.
fn probe_all(lan: &Netns, dc: &Netns, lan_sources: &[IpAddr], flows: &[Flow]) -> Result<Vec<bool>> {
    let mut result = vec![false; flows.len()];
    for (ns, from_lan) in [(lan, true), (dc, false)] {
        let picked: Vec<usize> = (0..flows.len())
            .filter(|&i| lan_sources.contains(&flows[i].src) == from_lan)
            .collect();
        let mut cmd: Command = ns.command(env!("CARGO_BIN_EXE_netprobe"));
        cmd.args(["probe", "--timeout-ms", "1500"]);
        cmd.args(picked.iter().map(|&i| flows[i].spec()));
        let out = run(&mut cmd, Duration::from_secs(60))?;
        if !out.succeeded() {
            bail!("netprobe probe failed: {out:?}");
        }
        let lines: Vec<String> = out.into_stdout()?.lines().map(str::to_owned).collect();
        if lines.len() != picked.len() {
            bail!(
                "netprobe answered {} lines for {} flows",
                lines.len(),
                picked.len()
            );
        }
        for (i, line) in picked.iter().zip(lines) {
            result[*i] = line == "pass";
        }
    }
    Ok(result)
}

#[test]
fn a_ruleset_nft_rejects_leaves_the_previous_one_in_place() {
    require_root_and_tools();
    let komnet = komnet_cli_binary().unwrap();
    let router = Netns::new("fw-reject").unwrap();
    let apply = |lan: &str| {
        run(
            router
                .command(&komnet)
                .args(["policy", "apply"])
                .arg(example_dir())
                .args([
                    "--site",
                    "musterstadt/rathaus",
                    "--lan",
                    lan,
                    "--tunnel",
                    "wg0",
                ]),
            Duration::from_secs(30),
        )
        .unwrap()
    };
    let first = apply("lan0");
    assert!(first.succeeded(), "{first:?}");
    let before = router
        .exec(&["nft", "list", "table", "inet", "komnet"])
        .unwrap();
    // A name longer than IFNAMSIZ is refused by our own check before nft runs...
    let too_long = apply("a-very-long-name");
    assert!(!too_long.succeeded());
    assert!(
        format!("{too_long:?}").contains("is not valid"),
        "{too_long:?}"
    );
    // ...and a batch nft itself refuses (a set element of the wrong family) changes nothing:
    // the whole batch is one transaction, which is what `apply` relies on.
    let policy = Policy::load(&example_dir()).unwrap();
    let tenant = policy.tenant_by_name("musterstadt").unwrap();
    let site = policy.site_by_name(tenant, "rathaus").unwrap();
    let ruleset = komnet_policy::nft::ruleset_for_site(
        &policy,
        site,
        &komnet_policy::nft::Interfaces {
            lan: vec!["lan0".into()],
            tunnel: "wg0".into(),
        },
    )
    .unwrap();
    let json = komnet_policy::nft::to_json_pretty(&ruleset).unwrap();
    let broken = json.replacen("\"10.20.1.0\"", "\"fd00::1\"", 1);
    assert_ne!(broken, json);
    let mut child = router
        .command("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(broken.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "nft accepted a broken batch");
    assert!(!out.stderr.is_empty(), "nft gave no reason");
    let after = router
        .exec(&["nft", "list", "table", "inet", "komnet"])
        .unwrap();
    assert_eq!(
        before, after,
        "a refused batch changed the installed ruleset"
    );
}
