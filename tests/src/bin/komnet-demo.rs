//! `komnet-demo`: the district of St. Wendel in miniature, end to end, on one machine.
//!
//! Builds the data centre (hub, enrollment service, file servers, DMS), two communes (spoke
//! appliances with staff and guest LANs), two more whose town halls both use the LAN
//! 192.168.178.0/24 (their appliances translate it 1:1 to their unique prefixes) and a
//! home-office worker on stock wireguard-go in network namespaces; prints the reachability
//! matrix the policy expects next to the one observed with real TCP connections, with a guest
//! that gives itself a staff address among the sources; revokes one commune's appliance and
//! shows it cut off; then removes everything. Needs root; `scripts/demo.sh` builds and runs it.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use komnet_netns_tests::district::{
    render_matrix, ApplianceSpoke, Destination, District, Gateway, Options, Source, DESTINATIONS,
};
use komnet_netns_tests::{require_root_and_tools, SeenBySource};
use komnet_policy::{decide_arrival, explain_at, Arrival, Binding, Origin, PacketMeta};

/// The town halls that both use 192.168.178.0/24 (examples/policy/st-wendel): tenant, label,
/// the second octet of their unique prefix, their WAN host number.
const SAME_LAN: [(&str, &str, u8, u8); 2] = [
    ("marpingen", "Marpingen", 50, 45),
    ("namborn", "Namborn", 60, 46),
];
const SAME_LAN_PC: &str = "192.168.178.10";
/// The staff address a guest in Nohfelden's WLAN gives itself.
const SPOOFED: &str = "10.30.1.77";

/// The `segment_spoof` drops an appliance counted so far (`komnet status`).
fn spoof_drops(spoke: &Gateway) -> Result<u64> {
    Ok(spoke.status()?["drops"]["segment_spoof"]
        .as_u64()
        .unwrap_or(0))
}

/// A town hall whose LAN keeps its own numbering: its appliance (configured like the image),
/// its PC at [`SAME_LAN_PC`].
fn add_same_lan_town_hall(
    district: &mut District,
    tenant: &str,
    octet: u8,
    wan: u8,
) -> Result<ApplianceSpoke> {
    let appliance = district.add_appliance_spoke(tenant, octet, wan)?;
    let token = district.token(tenant, "rathaus", "spoke")?;
    appliance.deliver_bootstrap(&token)?;
    Ok(appliance)
}

/// Rows of the matrix for `source` arriving at `site`'s appliance on `binding`: expected as
/// that appliance decides (the LAN's own numbering, the segment check), observed with TCP.
fn rows_at(
    district: &District,
    source: Source,
    site: &str,
    binding: &Binding,
) -> Result<Vec<(Source, Destination, bool, bool)>> {
    let site = district
        .policy
        .find_site(site)
        .map_err(anyhow::Error::msg)?;
    let observed = district.probe(&source, &DESTINATIONS, Duration::from_millis(2000))?;
    Ok(DESTINATIONS
        .iter()
        .zip(observed)
        .map(|(d, o)| {
            let packet = PacketMeta {
                src: std::net::IpAddr::V4(source.addr),
                dst: std::net::IpAddr::V4(d.addr),
                ip_proto: 6,
                dport: d.port,
            };
            let e = decide_arrival(&district.policy, site, binding, &packet).allow;
            (source.clone(), *d, e, o)
        })
        .collect())
}

/// Set while the console runs (`--console`): Ctrl-C then ends the console and the district
/// in order instead of interrupting the demo.
static CONSOLE_RUNNING: AtomicBool = AtomicBool::new(false);
static CONSOLE_STOP: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let mut console = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--console" => console = true,
            other => {
                eprintln!("komnet-demo: unknown argument {other:?} (--console keeps the web console running on the district until Ctrl-C)");
                return ExitCode::from(2);
            }
        }
    }
    // Ctrl-C or SIGTERM: no destructor runs, so remove the namespaces and files here.
    match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                for _ in signals.forever() {
                    if CONSOLE_RUNNING.load(Ordering::SeqCst) {
                        CONSOLE_STOP.store(true, Ordering::SeqCst);
                        continue;
                    }
                    eprintln!("komnet-demo: interrupted; cleaning up");
                    komnet_netns_tests::cleanup_after_interrupt();
                    std::process::exit(130);
                }
            });
        }
        Err(e) => eprintln!("komnet-demo: cannot catch Ctrl-C ({e}); an interrupted run may leave namespaces behind"),
    }
    match demo(console) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("komnet-demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn step(t0: Instant, what: &str) {
    println!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
}

fn demo(console: bool) -> Result<bool> {
    require_root_and_tools();
    let t0 = Instant::now();
    step(t0, "building the district in network namespaces: data centre, Nohfelden, Tholey, a home office");
    let district = District::start(
        &komnet_netns_tests::netprobe_binary()?,
        Options {
            two_hubs: false,
            homeoffice: true,
            ..Options::default()
        },
    )?;
    let mut district = district;
    step(t0, "enrolled from one-time tokens: hub1, nohfelden/rathaus, tholey/rathaus; home office anna (wg-quick + wireguard-go)");
    step(t0, "Marpingen and Namborn: both town halls use 192.168.178.0/24; their appliances enrol and translate it to 10.50.1.0/24 and 10.60.1.0/24");
    let mut same_lan = Vec::new();
    for (tenant, label, octet, wan) in SAME_LAN {
        same_lan.push((
            tenant,
            label,
            add_same_lan_town_hall(&mut district, tenant, octet, wan)?,
        ));
    }
    for (_, _, appliance) in &mut same_lan {
        appliance.spoke.wait_running(1, Duration::from_secs(30))?;
        let host = &appliance.host;
        host.ip(&["addr", "flush", "dev", "eth0", "scope", "global"])?;
        host.ip(&["addr", "add", &format!("{SAME_LAN_PC}/24"), "dev", "eth0"])?;
        host.ip(&["route", "replace", "default", "via", "192.168.178.1"])?;
    }
    println!();
    println!("{}", district.hubs[0].status_text()?);
    step(
        t0,
        "reachability: expected by the policy / observed with real TCP connections",
    );
    // What the data centre receives from the two PCs that share 192.168.178.10.
    let seen = SeenBySource::install(
        &district.srv,
        "komnet_demo_seen",
        &["10.50.1.10", "10.60.1.10", "192.168.178.0/24"],
    )?;
    let mut rows = district.matrix()?;
    // A guest in Nohfelden's WLAN that gives itself a staff address: the appliance takes the
    // packet as the guest segment's, whose VLAN/port it came in on, and drops it.
    let noh = district.commune("nohfelden");
    let spoofs_before = spoof_drops(&noh.spoke)?;
    noh.guest
        .ip(&["addr", "add", &format!("{SPOOFED}/32"), "dev", "eth0"])?;
    let guest_port = district
        .policy
        .find_segment("nohfelden/gaeste", None)
        .and_then(|s| district.policy.segments[s.index()].binding.clone())
        .context("nohfelden/gaeste has no binding")?;
    rows.extend(rows_at(
        &district,
        Source {
            label: format!("Nohfelden Gäste-WLAN as {SPOOFED}"),
            netns: noh.guest.name().to_owned(),
            addr: SPOOFED.parse()?,
            origin: Origin::Address,
        },
        "nohfelden/rathaus",
        &guest_port,
    )?);
    for (tenant, label, appliance) in &same_lan {
        rows.extend(rows_at(
            &district,
            Source {
                label: format!("{label} Verwaltung ({SAME_LAN_PC})"),
                netns: appliance.host.name().to_owned(),
                addr: SAME_LAN_PC.parse()?,
                origin: Origin::Address,
            },
            &format!("{tenant}/rathaus"),
            &Binding::Lan,
        )?);
    }
    println!();
    print!("{}", render_matrix(&rows));
    let mismatches = rows.iter().filter(|(_, _, e, o)| e != o).count();
    println!();

    // Why, as `komnet policy explain` says it, and what the appliance and the DC observed.
    let policy_arg = "examples/policy/st-wendel";
    let guest_arrival = Arrival {
        site: Some("nohfelden/rathaus".into()),
        binding: Some(guest_port.clone()),
    };
    let arrival_arg = match &guest_port {
        Binding::Vlan(id) => format!("--vlan {id}"),
        Binding::Port(p) => format!("--port {p}"),
        Binding::Lan => String::new(),
    };
    let mut explained = vec![(
        format!("komnet policy explain {policy_arg} {arrival_arg} --site nohfelden/rathaus --from {SPOOFED} --to dms"),
        explain_at(&district.policy, SPOOFED, "dms", Some(&guest_arrival)).map_err(anyhow::Error::msg)?,
    )];
    for (tenant, _, _) in &same_lan {
        let site = format!("{tenant}/rathaus");
        let arrival = Arrival {
            site: Some(site.clone()),
            binding: None,
        };
        explained.push((
            format!(
                "komnet policy explain {policy_arg} --site {site} --from {SAME_LAN_PC} --to dms"
            ),
            explain_at(&district.policy, SAME_LAN_PC, "dms", Some(&arrival))
                .map_err(anyhow::Error::msg)?,
        ));
    }
    for (command, lines) in explained {
        println!("         $ {command}");
        for line in lines {
            println!("           {line}");
        }
    }
    // The guard reads the appliance's nftables counters every second.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut spoofs = spoof_drops(&noh.spoke)? - spoofs_before;
    while spoofs == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        spoofs = spoof_drops(&noh.spoke)? - spoofs_before;
    }
    println!(
        "         Nohfelden's appliance dropped {spoofs} packets from {SPOOFED} on the guest WLAN as segment_spoof (komnet status: drops)"
    );
    let counts = seen.packets()?;
    drop(seen);
    println!(
        "         the data centre received {} packets from 10.50.1.10 (Marpingen's PC), {} from 10.60.1.10 (Namborn's PC), {} from 192.168.178.0/24",
        counts[0], counts[1], counts[2]
    );
    let spoof_counted = spoofs > 0;
    if !spoof_counted {
        println!("         !! the spoofed packets were not counted as segment_spoof");
    }
    let told_apart = counts[0] > 0 && counts[1] > 0 && counts[2] == 0;
    if !told_apart {
        println!("         !! the data centre should see both PCs by their unique addresses only");
    }
    if mismatches == 0 {
        step(t0, &format!("all {} flows as the policy says", rows.len()));
    } else {
        step(
            t0,
            &format!(
                "{mismatches} of {} flows differ from the policy (marked !!)",
                rows.len()
            ),
        );
    }
    step(
        t0,
        "revoking tholey/rathaus (komnet revoke --tenant tholey --site rathaus)",
    );
    let took = district.revoke_and_time("tholey")?;
    step(
        t0,
        &format!(
            "tholey's staff cut off from its file server {:.2} s after the revocation",
            took.as_secs_f64()
        ),
    );
    let tholey_staff = district
        .sources()
        .into_iter()
        .find(|s| s.label.starts_with("Tholey Verwaltung"))
        .ok_or_else(|| anyhow!("no tholey source"))?;
    let after = district.probe(&tholey_staff, &DESTINATIONS, Duration::from_millis(1000))?;
    println!(
        "         Tholey Verwaltung now: {}",
        DESTINATIONS
            .iter()
            .zip(&after)
            .map(|(d, ok)| format!("{} {}", d.label, if *ok { "reached" } else { "blocked" }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let nohfelden = district
        .sources()
        .into_iter()
        .find(|s| s.label.starts_with("Nohfelden Verwaltung"))
        .ok_or_else(|| anyhow!("no nohfelden source"))?;
    let still = district.probe(&nohfelden, &DESTINATIONS[..1], Duration::from_millis(1500))?[0];
    println!(
        "         Nohfelden Verwaltung → DMS: {}",
        if still { "still reached" } else { "BLOCKED" }
    );
    if console {
        run_console(&district)?;
    }
    step(t0, "cleaning up");
    drop(district);
    step(t0, "done");
    Ok(mismatches == 0
        && spoof_counted
        && told_apart
        && after.iter().all(|ok| !ok)
        && still
        && took <= Duration::from_secs(2))
}

/// `--console`: the web console on the district (its enrollment service's admin socket) with
/// a local OpenID provider, until Ctrl-C.
fn run_console(district: &District) -> Result<()> {
    use komnet_netns_tests::console::{free_local_port, Console};
    let console_port = free_local_port("KOMNET_DEMO_CONSOLE_PORT", 8080)?;
    let idp_port = free_local_port("KOMNET_DEMO_IDP_PORT", 9000)?;
    let mut console = Console::start(district, console_port, idp_port)?;
    let console_url = console.url.clone();
    CONSOLE_RUNNING.store(true, Ordering::SeqCst);
    println!();
    println!(
        "The web console runs on the district: open {console_url} in a browser on this machine."
    );
    println!(
        "Sign in at the local OpenID provider (any password, the one-time code may stay empty) as"
    );
    println!("  anna  operator: every commune, tokens, revocations, the audit log, the policy");
    println!("  tom   commune admin of Tholey (Nohfelden's pages answer 404 to him)");
    println!("  nina  commune admin of Nohfelden");
    println!("  uwe   home office in Tholey: set up a device, get its wg-quick file and QR code");
    println!("Everything done there lands in the audit log under the person's name.");
    println!("Ctrl-C ends the console and removes the district.");
    while !CONSOLE_STOP.load(Ordering::SeqCst) {
        if let Some(status) = console.exited() {
            CONSOLE_RUNNING.store(false, Ordering::SeqCst);
            bail!("komnet-console ended ({status}):\n{}", console.log_text());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    CONSOLE_RUNNING.store(false, Ordering::SeqCst);
    println!();
    Ok(())
}
