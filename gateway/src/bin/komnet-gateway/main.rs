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

/// `--help` and `--version` print to stdout and succeed. A bad command line is reported as
/// "komnet-gateway: " and clap's message naming the flag or argument, with wireguard-go's exit
/// code 1 (scripts written for it check that), or 2 for `run`, as before clap.
fn usage_error(e: &clap::Error, run: bool) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return match e.print() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let message = e.render().to_string();
    eprint!(
        "komnet-gateway: {}",
        message.strip_prefix("error: ").unwrap_or(&message)
    );
    ExitCode::from(if run { 2 } else { 1 })
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let action = match cli::Cli::try_parse_action(&args) {
        Ok(action) => action,
        Err(e) => return usage_error(&e, args.get(1).is_some_and(|a| a == "run")),
    };
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
