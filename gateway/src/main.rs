//! `komnet-gateway`: the appliance daemon. `run --config FILE` runs a hub or spoke
//! (`komnet_gateway::appliance`); `[-f] IFNAME` is the wireguard-go-compatible mode
//! (`komnet_gateway::daemon`).

use std::path::PathBuf;
use std::process::ExitCode;

use komnet_gateway::appliance;
use komnet_gateway::appliance::config::{ConfigError, DEFAULT_CONFIG};
use komnet_gateway::daemon::{self, Command};

const RUN_USAGE: &str =
    "usage: komnet-gateway run [--config FILE]   (default /etc/komnet/gateway.toml)";

/// sysexits.h's "configuration error".
const EX_CONFIG: u8 = 78;

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("run") {
        let mut config = PathBuf::from(DEFAULT_CONFIG);
        let mut rest = args[1..].iter();
        while let Some(a) = rest.next() {
            match a.as_str() {
                "--config" | "-c" => match rest.next() {
                    Some(p) => config = PathBuf::from(p),
                    None => {
                        eprintln!("komnet-gateway: --config needs a file\n{RUN_USAGE}");
                        return ExitCode::from(2);
                    }
                },
                "-h" | "--help" => {
                    println!("{RUN_USAGE}\n\nRuns a komnet hub or spoke as gateway.toml describes (role, data_dir,\nbootstrap, interface, listen_port, policy_public_key, lan, metrics_listen).");
                    return ExitCode::SUCCESS;
                }
                other => {
                    eprintln!("komnet-gateway: unexpected argument {other:?}\n{RUN_USAGE}");
                    return ExitCode::from(2);
                }
            }
        }
        return match appliance::run(&config) {
            Ok(code) => exit(code),
            Err(e) => {
                eprintln!("komnet-gateway: {e:#}");
                // A broken gateway.toml stays broken on restart: a distinct code lets the unit
                // stop there (RestartPreventExitStatus=) instead of looping.
                if e.downcast_ref::<ConfigError>().is_some() {
                    ExitCode::from(EX_CONFIG)
                } else {
                    ExitCode::FAILURE
                }
            }
        };
    }
    match daemon::parse_args(&args) {
        Ok(Command::Version) => {
            println!("komnet-gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Help) => {
            println!("usage: komnet-gateway [-f|--foreground] INTERFACE-NAME\n       {}\n\nThe first form creates TUN interface INTERFACE-NAME and serves the WireGuard\nUAPI on /run/wireguard/INTERFACE-NAME.sock; configure it with wg(8) or\nwg-quick(8). Without -f (or WG_PROCESS_FOREGROUND=1) it forks into the\nbackground. The second runs a komnet hub or spoke appliance.", RUN_USAGE.trim_start_matches("usage: "));
            ExitCode::SUCCESS
        }
        Ok(Command::Run(a)) => match daemon::run(a) {
            Ok(code) => exit(code),
            Err(e) => {
                eprintln!("komnet-gateway: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(msg) => {
            eprintln!("komnet-gateway: {msg}");
            ExitCode::from(1)
        }
    }
}
