//! The compiled nftables ruleset, installed with the real `nft` (through `komnet policy apply`)
//! on a router namespace between a town hall's switch and the tunnel side, passes and blocks
//! real TCP, UDP and ICMP flows (IPv4 and IPv6) exactly as the reference evaluator decides:
//! from each segment's VLAN to the data centre, between the town hall's segments, from the
//! data centre to the town hall, and from hosts that use an address of another segment than
//! the VLAN they are on (dropped and counted as `segment_spoof`).
//!
//! ```text
//!  hosts ── access ports [switch ns: VLAN bridge] trunk ══ lan0 [router ns: lan0.10 … lan0.100,
//!  (one per VLAN, a spoofer on VLAN 100)                  table inet komnet] wg0 ── eth0 [dc ns]
//! ```

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::io::{BufRead as _, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use komnet_netns_tests::{
    add_veth_pair, komnet_cli_binary, require_root_and_tools, run, Netns, Switch,
};
use komnet_policy::{decide, decide_arrival, Binding, Origin, PacketMeta, Policy, Proto};

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
    /// The host it starts from (`None`: the data centre).
    from: Option<usize>,
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

/// First host address of `net` (the router's address in a segment).
fn first_host(net: &ipnet::IpNet) -> IpAddr {
    host_of(net, 1)
}

/// A destination at the site: the host that holds it, the address, the ports tried.
type Target = (usize, IpAddr, Vec<(Proto, u16)>);

/// A host on one VLAN of the town hall's switch, with the addresses it sends from.
struct Host {
    ns: Netns,
    sources: Vec<IpAddr>,
}

#[test]
fn nftables_ruleset_enforces_what_the_oracle_decides() {
    require_root_and_tools();
    let komnet = komnet_cli_binary().unwrap();
    let policy = Policy::load(&example_dir()).unwrap_or_else(|e| panic!("{}", e.render()));
    let site = policy.find_site("musterstadt/rathaus").unwrap();

    let router = Netns::new("fw-router").unwrap();
    let dc = Netns::new("fw-dc").unwrap();
    let mut switch = Switch::new("fw-switch", &router, "lan0").unwrap();
    add_veth_pair(&router, "wg0", &dc, "eth0", 1500).unwrap();
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        // The spoofer's packets must reach the forward chain: it is nftables that drops them.
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        router
            .exec(&["sysctl", "-qw", &format!("{k}={v}")])
            .unwrap();
    }
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

    // One host per segment, on the segment's VLAN, one address per family (and the printer
    // and the time clock, services at the site, in theirs); the router's VLAN interfaces
    // with the segments' first addresses, as the spoke sets them up.
    let mut hosts: Vec<(komnet_policy::SegmentId, Host)> = Vec::new();
    for seg in policy.site_segments(site) {
        let segment = &policy.segments[seg.index()];
        let Some(Binding::Vlan(vid)) = segment.binding else {
            panic!("{} is not on a VLAN", segment.name);
        };
        let vif = komnet_policy::nft::vlan_interface("lan0", vid);
        let ns = Netns::new(&format!("fw-v{vid}")).unwrap();
        switch.access_port(&ns, Some(vid)).unwrap();
        if switch.tagged() {
            router
                .ip(&[
                    "link",
                    "add",
                    "link",
                    "lan0",
                    "name",
                    &vif,
                    "type",
                    "vlan",
                    "id",
                    &vid.to_string(),
                ])
                .unwrap();
            router.ip(&["link", "set", &vif, "up"]).unwrap();
        }
        let mut sources = Vec::new();
        for net in &segment.prefixes {
            router
                .add_address(&vif, first_host(net), net.prefix_len())
                .unwrap();
            let a = host_of(net, 10);
            ns.add_address("eth0", a, net.prefix_len()).unwrap();
            let family = if a.is_ipv4() { "-4" } else { "-6" };
            ns.ip(&[
                family,
                "route",
                "add",
                "default",
                "via",
                &first_host(net).to_string(),
            ])
            .unwrap();
            sources.push(a);
        }
        hosts.push((seg, Host { ns, sources }));
    }
    let host_of_segment = |name: &str| {
        hosts
            .iter()
            .position(|(s, _)| policy.segments[s.index()].name == name)
            .unwrap()
    };
    let staff = host_of_segment("verwaltung");
    let iot = host_of_segment("gebaeude");
    let guests = host_of_segment("gaeste");
    // The same staff address twice: on the staff VLAN (it works), and configured by a host on
    // the guest VLAN (dropped as segment_spoof) together with another commune's address and
    // an address of no segment.
    let staff_77: IpAddr = "10.20.1.77".parse().unwrap();
    let staff_77_v6: IpAddr = "fd00:20:0:1::77".parse().unwrap();
    hosts[staff].1.ns.add_address("eth0", staff_77, 24).unwrap();
    hosts[staff]
        .1
        .ns
        .add_address("eth0", staff_77_v6, 64)
        .unwrap();
    hosts[staff].1.sources.extend([staff_77, staff_77_v6]);
    let printer_v4: IpAddr = "10.20.1.50".parse().unwrap();
    let printer_v6: IpAddr = "fd00:20:0:1::50".parse().unwrap();
    hosts[staff]
        .1
        .ns
        .add_address("eth0", printer_v4, 24)
        .unwrap();
    hosts[staff]
        .1
        .ns
        .add_address("eth0", printer_v6, 64)
        .unwrap();
    let clock_v4: IpAddr = "10.20.4.20".parse().unwrap();
    let clock_v6: IpAddr = "fd00:20:0:4::20".parse().unwrap();
    hosts[iot].1.ns.add_address("eth0", clock_v4, 24).unwrap();
    hosts[iot].1.ns.add_address("eth0", clock_v6, 64).unwrap();
    let spoofer = Netns::new("fw-spoof").unwrap();
    switch.access_port(&spoofer, Some(100)).unwrap();
    let spoofed: Vec<IpAddr> = [
        "10.20.1.77",
        "fd00:20:0:1::77",
        "10.30.1.11",
        "10.20.200.10",
        "fd00:20:0:200::10",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    for a in &spoofed {
        spoofer
            .add_address("eth0", *a, if a.is_ipv4() { 32 } else { 128 })
            .unwrap();
    }
    spoofer
        .ip(&[
            "route",
            "add",
            "default",
            "via",
            "10.20.100.1",
            "dev",
            "eth0",
            "onlink",
        ])
        .unwrap();
    spoofer
        .ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:20:0:100::1",
            "dev",
            "eth0",
            "onlink",
        ])
        .unwrap();
    hosts.push((
        hosts[guests].0,
        Host {
            ns: spoofer,
            sources: spoofed.clone(),
        },
    ));
    let spoof_host = hosts.len() - 1;
    for (_, h) in &hosts {
        for k in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            h.ns.exec(&["sysctl", "-qw", &format!("{k}=0")]).unwrap();
        }
    }
    // Before any ruleset: every host says hello to its gateway from each address it has, as
    // a real one does when it comes up, until the router has answered. The probes below get
    // 1.5 s each and measure the ruleset; on this machine the router's first neighbour
    // solicitation for a new address is now and then lost and the second comes a second
    // later, which turned an allowed flow into "blocked" (policy_nft failed 1 run in 2).
    for (seg, host) in hosts.iter().take(spoof_host) {
        let prefixes = &policy.segments[seg.index()].prefixes;
        for cidr in host.ns.addresses_on("eth0").unwrap() {
            let Ok(net) = cidr.parse::<ipnet::IpNet>() else {
                continue;
            };
            let addr = net.addr();
            let Some(gateway) = prefixes.iter().find(|p| p.contains(&addr)).map(first_host) else {
                continue;
            };
            let (src, dst) = (addr.to_string(), gateway.to_string());
            let said_hello = (0..5).any(|_| {
                host.ns
                    .exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", "-I", &src, &dst])
                    .is_ok()
            });
            assert!(said_hello, "{src} cannot reach its gateway {dst}");
        }
    }

    // Outbound: every host's sources to every data-centre service, on each offered port and
    // on one port the service does not offer; decided as the appliance decides a packet that
    // arrived on the host's VLAN.
    let mut flows = Vec::new();
    let mut dc_listen = Vec::new();
    let mut dc_addrs: Vec<IpAddr> = Vec::new();
    let site_prefixes = &policy.sites[site.index()].prefixes;
    let arrival = |h: usize| {
        let seg = hosts[h].0;
        policy.segments[seg.index()].binding.clone().unwrap()
    };
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
                for (h, (_, host)) in hosts.iter().enumerate() {
                    for &src in host.sources.iter().filter(|s| s.is_ipv4() == dst.is_ipv4()) {
                        let d = decide_arrival(
                            &policy,
                            site,
                            &arrival(h),
                            &PacketMeta::new(src, dst, proto, port),
                        );
                        flows.push(Flow {
                            from: Some(h),
                            proto,
                            src,
                            dst,
                            port,
                            expect_pass: d.allow,
                            why: format!(
                                "{src} on {} -> {name} {dst} {proto}/{port}: {}",
                                arrival(h),
                                policy.describe(d.by)
                            ),
                        });
                    }
                }
            }
        }
    }
    dc_listen.sort();
    dc_listen.dedup();
    dc_addrs.sort();
    dc_addrs.dedup();

    // Between the town hall's segments: every host to the services at the site and to every
    // other segment's host, except inside its own segment (that never passes the router).
    let mut lan_listen: Vec<Vec<String>> = vec![Vec::new(); hosts.len()];
    let mut targets: Vec<Target> = vec![
        (
            staff,
            printer_v4,
            vec![(Proto::Tcp, 9100), (Proto::Icmp, 0)],
        ),
        (
            staff,
            printer_v6,
            vec![(Proto::Tcp, 9100), (Proto::Icmp, 0)],
        ),
        (iot, clock_v4, vec![(Proto::Tcp, 443), (Proto::Udp, 443)]),
        (iot, clock_v6, vec![(Proto::Tcp, 443)]),
    ];
    for (h, (_, host)) in hosts.iter().enumerate().take(spoof_host) {
        for a in &host.sources {
            targets.push((h, *a, vec![(Proto::Tcp, 22), (Proto::Icmp, 0)]));
        }
    }
    for (th, dst, ports) in &targets {
        for &(proto, port) in ports {
            if let Some(spec) = listen_spec(proto, *dst, port) {
                lan_listen[*th].push(spec);
            }
            for (h, (seg, host)) in hosts.iter().enumerate() {
                // Inside one segment, or to an address the host holds itself (the spoofer's
                // copy of the staff address): such packets never reach the router.
                if (*seg == hosts[*th].0 && h != spoof_host) || host.sources.contains(dst) {
                    continue;
                }
                for &src in host.sources.iter().filter(|s| s.is_ipv4() == dst.is_ipv4()) {
                    let d = decide_arrival(
                        &policy,
                        site,
                        &arrival(h),
                        &PacketMeta::new(src, *dst, proto, port),
                    );
                    flows.push(Flow {
                        from: Some(h),
                        proto,
                        src,
                        dst: *dst,
                        port,
                        expect_pass: d.allow,
                        why: format!(
                            "{src} on {} -> {dst} {proto}/{port} (within the site): {}",
                            arrival(h),
                            policy.describe(d.by)
                        ),
                    });
                }
            }
        }
    }

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
    let staff_pc: IpAddr = "10.20.1.10".parse().unwrap();
    for dst in [printer_v4, printer_v6, staff_pc] {
        for (proto, port) in [
            (Proto::Tcp, 9100),
            (Proto::Icmp, 0),
            (Proto::Tcp, 445),
            (Proto::Udp, 161),
        ] {
            if let Some(spec) = listen_spec(proto, dst, port) {
                lan_listen[staff].push(spec);
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
                    from: None,
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

    let _dc_listener = listen(&dc, &dc_listen).unwrap();
    let mut _lan_listeners = Vec::new();
    for (h, specs) in lan_listen.iter_mut().enumerate() {
        specs.sort();
        specs.dedup();
        if !specs.is_empty() {
            _lan_listeners.push(listen(&hosts[h].1.ns, specs).unwrap());
        }
    }

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

    let namespaces: Vec<&Netns> = hosts.iter().map(|(_, h)| &h.ns).collect();
    let outcomes = probe_all(&namespaces, &dc, &flows).unwrap();
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
    println!("{} flows: {passes} passed, {blocks} blocked", flows.len());
    // The matrix is not trivial: both verdicts occur, in both families, within the site too.
    assert!(
        passes >= 40 && blocks >= 100,
        "passes {passes}, blocks {blocks}"
    );
    assert!(flows.iter().any(|f| f.expect_pass && f.dst.is_ipv6()));
    assert!(flows.iter().any(|f| f.expect_pass && f.proto == Proto::Udp));
    assert!(flows
        .iter()
        .any(|f| f.expect_pass && f.proto == Proto::Icmp));
    assert!(flows
        .iter()
        .any(|f| f.expect_pass && f.dst == clock_v4 && f.from == Some(staff)));
    // The staff address passes from the staff VLAN and is dropped from the guest VLAN, and
    // the firewall counted the spoofer's packets.
    assert!(flows
        .iter()
        .any(|f| f.expect_pass && f.src == staff_77 && f.from == Some(staff)));
    let spoof_flows = flows.iter().filter(|f| f.from == Some(spoof_host)).count();
    assert!(spoof_flows > 20, "{spoof_flows}");
    let listing = router
        .exec(&["nft", "-j", "list", "table", "inet", "komnet"])
        .unwrap();
    let drops = komnet_policy::nft::drop_counters_from_json(&listing).unwrap();
    let counted = drops.get("segment_spoof").copied().unwrap_or(0);
    assert!(
        counted >= spoof_flows as u64,
        "{counted} packets counted as segment_spoof for {spoof_flows} spoofed flows: {drops:?}"
    );
}

/// Runs every flow from the namespace that holds its source (`from`: a host, `None`: the data
/// centre); returns pass/blocked per flow.
fn probe_all(hosts: &[&Netns], dc: &Netns, flows: &[Flow]) -> Result<Vec<bool>> {
    let mut result = vec![false; flows.len()];
    let mut groups: Vec<(&Netns, Vec<usize>)> = hosts
        .iter()
        .enumerate()
        .map(|(h, ns)| {
            let picked = (0..flows.len())
                .filter(|&i| flows[i].from == Some(h))
                .collect();
            (*ns, picked)
        })
        .collect();
    groups.push((
        dc,
        (0..flows.len())
            .filter(|&i| flows[i].from.is_none())
            .collect(),
    ));
    // All namespaces at once: each one's flows run in parallel anyway.
    let handles: Vec<_> = groups
        .into_iter()
        .filter(|(_, picked)| !picked.is_empty())
        .map(|(ns, picked)| {
            let mut cmd: Command = ns.command(env!("CARGO_BIN_EXE_netprobe"));
            cmd.args(["probe", "--timeout-ms", "1500"]);
            cmd.args(picked.iter().map(|&i| flows[i].spec()));
            let handle = std::thread::spawn(move || run(&mut cmd, Duration::from_secs(60)));
            (picked, handle)
        })
        .collect();
    for (picked, handle) in handles {
        let out = handle
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))??;
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
