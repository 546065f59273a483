//! `komnet-gateway`: the appliance daemon. See `komnet_gateway::daemon`.

use std::process::ExitCode;

use komnet_gateway::daemon::{self, Command};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match daemon::parse_args(&args) {
        Ok(Command::Version) => {
            println!("komnet-gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Help) => {
            println!("usage: komnet-gateway [-f|--foreground] INTERFACE-NAME\n\nCreates TUN interface INTERFACE-NAME and serves the WireGuard UAPI on\n/run/wireguard/INTERFACE-NAME.sock; configure it with wg(8) or wg-quick(8).\nWithout -f (or WG_PROCESS_FOREGROUND=1) it forks into the background.");
            ExitCode::SUCCESS
        }
        Ok(Command::Run(a)) => match daemon::run(a) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
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
