//! The command line: wireguard-go's (`[-f|--foreground] INTERFACE`, so `wg-quick` and scripts
//! written for wireguard-go drive it unchanged) plus `run [--config FILE]` for the appliance.

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand};
use komnet_gateway::appliance::config::DEFAULT_CONFIG;
use komnet_gateway::daemon;

#[derive(Debug, Parser)]
#[command(
    name = "komnet-gateway",
    version,
    about = "komnet hub or town-hall appliance; userspace WireGuard daemon",
    long_about = "komnet-gateway run runs the appliance that gateway.toml describes: a \
                  data-centre hub that admits certified peers and enforces the segmentation \
                  policy per packet, or a town-hall spoke that tunnels its LAN segments to the \
                  hubs and enforces the policy for its site with nftables. On first start it \
                  enrols with the one-time token in the bootstrap file, stores its WireGuard key \
                  and certificate in the data directory (mode 0600), brings up the tunnel \
                  interface, and follows the policy the enrollment service publishes. It renews \
                  its certificate by itself.\n\
                  \n\
                  A spoke installs a drop-everything nftables table (inet komnet) before \
                  anything else; the table stays when the daemon stops, so a spoke without its \
                  daemon forwards nothing.\n\
                  \n\
                  The form with an INTERFACE behaves like wireguard-go(8): it creates the TUN \
                  interface INTERFACE and serves the WireGuard UAPI on \
                  /run/wireguard/INTERFACE.sock, to be configured with wg(8) or wg-quick(8). \
                  Without -f (or WG_PROCESS_FOREGROUND=1) it forks into the background once the \
                  interface and the socket exist. LOG_LEVEL (verbose, error, silent) or RUST_LOG \
                  set how much it logs.",
    // wireguard-go's `-v`, not clap's `-V`.
    disable_version_flag = true,
    // `komnet-gateway INTERFACE` or `komnet-gateway run …`, never both.
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    // No `help` subcommand: `komnet-gateway help` would take an interface name away.
    disable_help_subcommand = true,
    subcommand_value_name = "COMMAND",
    // clap's would be "[OPTIONS] [INTERFACE] <COMMAND>", as if they combined.
    override_usage = "komnet-gateway [-f|--foreground] <INTERFACE>\n       \
                      komnet-gateway run [-c|--config FILE]"
)]
pub(crate) struct Cli {
    /// Stay in the foreground instead of forking into the background once the interface is
    /// up (WG_PROCESS_FOREGROUND=1 does the same).
    #[arg(short, long)]
    foreground: bool,

    /// Print the version.
    #[arg(short = 'v', long, action = ArgAction::Version)]
    version: Option<bool>,

    /// The TUN interface to create and serve on /run/wireguard/INTERFACE.sock (1 to 15 bytes;
    /// no '/', ':' or whitespace).
    #[arg(value_name = "INTERFACE", required = true, value_parser = interface_name)]
    interface: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a komnet hub or spoke as gateway.toml describes (role, data_dir, bootstrap,
    /// interface, listen_port, policy_public_key, lan, metrics_listen).
    Run {
        /// The appliance's configuration file.
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// What the command line asks the binary to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// `run`: the hub or spoke appliance.
    Appliance { config: PathBuf },
    /// `[-f] INTERFACE`: the wireguard-go-compatible daemon.
    Daemon(daemon::Args),
}

impl Cli {
    /// Parses a command line (the program's name first). Errors name the flag or argument.
    pub(crate) fn try_parse_action<I, T>(args: I) -> Result<Action, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        // A second word after INTERFACE: clap would call it a subcommand that cannot be used
        // with INTERFACE; a hidden catch-all (only here, not in --help or the man page) lets
        // the message say what it is.
        let mut cmd = Cli::command().arg(
            clap::Arg::new(UNEXPECTED)
                .hide(true)
                .num_args(1..)
                .value_parser(clap::value_parser!(String)),
        );
        let matches = cmd.try_get_matches_from_mut(args)?;
        if let Some(word) = matches
            .get_many::<String>(UNEXPECTED)
            .and_then(|mut words| words.next())
        {
            return Err(cmd.error(
                ErrorKind::UnknownArgument,
                format!("unexpected argument '{word}' found (the daemon takes one INTERFACE)"),
            ));
        }
        Ok(Cli::from_arg_matches(&matches)?.into_action())
    }

    fn into_action(self) -> Action {
        match (self.command, self.interface) {
            (Some(Command::Run { config }), _) => Action::Appliance { config },
            // clap requires INTERFACE when there is no subcommand, so it is there.
            (None, interface) => Action::Daemon(daemon::Args {
                foreground: self.foreground,
                ifname: interface.unwrap_or_default(),
            }),
        }
    }
}

const UNEXPECTED: &str = "unexpected";

/// clap's value parser for INTERFACE: the kernel's rules, checked before anything is created.
fn interface_name(name: &str) -> Result<String, String> {
    komnet_proto::config::check_interface_name(name).map(|()| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Action, clap::Error> {
        Cli::try_parse_action(std::iter::once("komnet-gateway").chain(args.iter().copied()))
    }

    fn error(args: &[&str]) -> (ErrorKind, String) {
        let e = parse(args).expect_err("the command line is refused");
        (e.kind(), e.to_string())
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn command_line_is_wireguard_gos() {
        let daemon = |foreground, ifname: &str| {
            Action::Daemon(daemon::Args {
                foreground,
                ifname: ifname.into(),
            })
        };
        assert_eq!(parse(&["-f", "wg0"]).ok(), Some(daemon(true, "wg0")));
        assert_eq!(
            parse(&["--foreground", "wg0"]).ok(),
            Some(daemon(true, "wg0"))
        );
        assert_eq!(parse(&["wg0"]).ok(), Some(daemon(false, "wg0")));
        assert_eq!(parse(&["wg0", "-f"]).ok(), Some(daemon(true, "wg0")));
        assert_eq!(error(&["-v"]).0, ErrorKind::DisplayVersion);
        assert_eq!(error(&["--version"]).0, ErrorKind::DisplayVersion);
        assert_eq!(error(&["-h"]).0, ErrorKind::DisplayHelp);
    }

    #[test]
    fn run_takes_a_config_file() {
        assert_eq!(
            parse(&["run"]).ok(),
            Some(Action::Appliance {
                config: DEFAULT_CONFIG.into()
            })
        );
        for flag in ["--config", "-c"] {
            assert_eq!(
                parse(&["run", flag, "/tmp/g.toml"]).ok(),
                Some(Action::Appliance {
                    config: "/tmp/g.toml".into()
                })
            );
        }
        assert_eq!(
            parse(&["run", "--config=/tmp/g.toml"]).ok(),
            Some(Action::Appliance {
                config: "/tmp/g.toml".into()
            })
        );
    }

    #[test]
    fn bad_command_lines_name_what_is_wrong() {
        let (kind, msg) = error(&[]);
        assert_eq!(kind, ErrorKind::MissingRequiredArgument);
        assert!(msg.contains("<INTERFACE>"), "{msg}");

        let (kind, msg) = error(&["-x", "wg0"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(msg.contains("'-x'"), "{msg}");

        let (kind, msg) = error(&["wg0", "wg1"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(msg.contains("'wg1'"), "{msg}");

        let (kind, msg) = error(&["a-very-long-interface-name"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        assert!(
            msg.contains("<INTERFACE>") && msg.contains("1 to 15"),
            "{msg}"
        );

        let (kind, msg) = error(&["wg/0"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        assert!(msg.contains("does not allow"), "{msg}");

        let (kind, msg) = error(&["run", "--config"]);
        assert_eq!(kind, ErrorKind::InvalidValue);
        assert!(msg.contains("--config <FILE>"), "{msg}");

        let (kind, msg) = error(&["run", "--confg", "x"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(
            msg.contains("'--confg'") && msg.contains("--config"),
            "{msg}"
        );

        let (kind, msg) = error(&["run", "wg0"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(msg.contains("'wg0'"), "{msg}");

        let (kind, msg) = error(&["run", "-f"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(msg.contains("'-f'"), "{msg}");

        // The two forms do not mix: after an INTERFACE, `run` is a second interface name.
        let (kind, msg) = error(&["wg0", "run"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(msg.contains("'run'"), "{msg}");
    }

    /// As wireguard-go's: a word after the flags is the interface, even one named `run`
    /// when a flag comes first (`komnet-gateway run` alone is the appliance).
    #[test]
    fn an_interface_may_be_called_run_after_a_flag() {
        assert_eq!(
            parse(&["-f", "run"]).ok(),
            Some(Action::Daemon(daemon::Args {
                foreground: true,
                ifname: "run".into()
            }))
        );
    }
}
