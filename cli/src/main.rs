//! `komnet`: the command line of network admins and data-centre operators.

use std::io::Write as _;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod policy_cmd;
mod policy_lan;
mod policy_report;
mod status_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "komnet",
    version,
    about = "komnet: zero-trust network for municipalities — admin command line",
    long_about = "komnet's admin command line. `komnet policy …` checks, tests, explains and \
                  compiles the segmentation policy (a directory with operator.toml and \
                  tenants/*.toml, see docs/policy.md) offline, before it reaches any appliance. \
                  `komnet token create`, `komnet revoke`, `komnet homeoffice issue`, \
                  `komnet audit` administer the enrollment service over its admin socket."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check, test, explain, query, diff and compile segmentation policies.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Enrollment administration (talks to komnet-enroll over its admin socket).
    #[command(flatten)]
    Enroll(komnet_enroll_admin::AdminCommand),
    /// Show a gateway's state: its identity, certificate, policy and peers (tenant, site, role,
    /// endpoint, last handshake, traffic, certificate expiry).
    Status {
        /// The gateway's metrics_listen address (gateway.toml).
        #[arg(long, default_value = "127.0.0.1:9120")]
        gateway: std::net::SocketAddr,
        /// Print the report as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to write the script for.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (komnet.1 and one per subcommand) into DIR; used to build the
    /// Debian package.
    #[command(hide = true)]
    Manpages { dir: std::path::PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Enroll(cmd) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| Ok(rt.block_on(komnet_enroll_admin::run(cmd))?)),
        Command::Status { gateway, json } => status_cmd::fetch(gateway).and_then(|r| {
            let text = if json {
                serde_json::to_string_pretty(&r)? + "\n"
            } else {
                status_cmd::render(&r)
            };
            emit(&text)?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "komnet", &mut script);
            emit(&String::from_utf8_lossy(&script))
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into)
        }
        Command::Manpages { dir } => write_manpages(&dir).map(|n| {
            println!("{n} manual pages in {}", dir.display());
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "komnet: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Writes `komnet.1`, `komnet-policy.1`, `komnet-policy-check.1`, … (the git style: one page
/// per subcommand, named by its path) into `dir`; returns how many.
fn write_manpages(dir: &std::path::Path) -> anyhow::Result<usize> {
    use anyhow::Context as _;
    // The synopsis shows the real invocation ("komnet policy check", the bin name clap's build
    // gave each subcommand); the page name joins the path with dashes (the display name).
    fn write(cmd: clap::Command, dir: &std::path::Path) -> anyhow::Result<usize> {
        let name = cmd
            .get_display_name()
            .unwrap_or_else(|| cmd.get_name())
            .to_owned();
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .source(format!("komnet {}", env!("CARGO_PKG_VERSION")))
            .manual("komnet")
            .render(&mut page)
            .with_context(|| format!("rendering {name}.1"))?;
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        let mut written = 1;
        // clap's generated `help` subcommands are not worth a page each.
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            let sub_name = format!("{name}-{}", sub.get_name());
            written += write(sub.clone().display_name(sub_name), dir)?;
        }
        Ok(written)
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write(cmd, dir)
}

/// Writes a command's output to stdout; a reader that went away (`| head`) is not an error.
pub(crate) fn emit(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag and argument of every command says what it is for (`--help`, man pages).
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "komnet", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
