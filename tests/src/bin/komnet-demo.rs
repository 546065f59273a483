//! `komnet-demo`: the district of St. Wendel in miniature, end to end, on one machine.
//!
//! Builds the data centre (hub, enrollment service, file servers, DMS), two communes (spoke
//! appliances with staff and guest LANs) and a home-office worker on stock wireguard-go in
//! network namespaces; prints the reachability matrix the policy expects next to the one
//! observed with real TCP connections; revokes one commune's appliance and shows it cut off;
//! then removes everything. Needs root; `scripts/demo.sh` builds and runs it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use komnet_netns_tests::district::{render_matrix, District, Options, DESTINATIONS};
use komnet_netns_tests::require_root_and_tools;

fn main() -> ExitCode {
    // Ctrl-C or SIGTERM: no destructor runs, so remove the namespaces and files here.
    match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    eprintln!("komnet-demo: interrupted; cleaning up");
                    komnet_netns_tests::cleanup_after_interrupt();
                    std::process::exit(130);
                }
            });
        }
        Err(e) => eprintln!("komnet-demo: cannot catch Ctrl-C ({e}); an interrupted run may leave namespaces behind"),
    }
    match demo() {
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

fn demo() -> Result<bool> {
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
    step(t0, "enrolled from one-time tokens: hub1, nohfelden/rathaus, tholey/rathaus; home office anna (wg-quick + wireguard-go)");
    println!();
    println!("{}", district.hubs[0].status_text()?);
    step(
        t0,
        "reachability: expected by the policy / observed with real TCP connections",
    );
    let rows = district.matrix()?;
    println!();
    print!("{}", render_matrix(&rows));
    let mismatches = rows.iter().filter(|(_, _, e, o)| e != o).count();
    println!();
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
    step(t0, "cleaning up");
    drop(district);
    step(t0, "done");
    Ok(mismatches == 0 && after.iter().all(|ok| !ok) && still && took <= Duration::from_secs(2))
}
