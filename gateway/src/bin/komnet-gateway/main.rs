//! `komnet-gateway`: the appliance daemon's binary. It owns the command line (clap, in
//! [`cli`]) and the manual page generated from it (`man`, in its tests); everything it runs is in the
//! library: `run --config FILE` runs a hub or spoke (`komnet_gateway::appliance`), `[-f] IFNAME`
//! is the wireguard-go-compatible daemon (`komnet_gateway::daemon`).

use std::process::ExitCode;

use komnet_gateway::appliance;
use komnet_gateway::appliance::config::ConfigError;
use komnet_gateway::daemon;

mod cli;
#[cfg(test)]
mod man;

/// sysexits.h's "configuration error".
const EX_CONFIG: u8 = 78;

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    // Bad flags and arguments end here with clap's message naming them and exit code 2.
    let action = cli::Cli::try_parse_action(std::env::args_os()).unwrap_or_else(|e| e.exit());
    match action {
        cli::Action::Appliance { config } => match appliance::run(&config) {
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
        },
        cli::Action::Daemon(args) => match daemon::run(args) {
            Ok(code) => exit(code),
            Err(e) => {
                eprintln!("komnet-gateway: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
