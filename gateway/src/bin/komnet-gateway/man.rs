//! The manual page komnet-gateway(8), generated from the command line's definition so it cannot
//! drift from the binary: NAME, SYNOPSIS, DESCRIPTION and the options come from clap
//! ([`super::cli::Cli`]); what a command line cannot say (gateway.toml's keys, the systemd unit,
//! files, exit codes) is the roff text below. `packaging/man/komnet-gateway.8`, which the Debian
//! package installs, is this page; a test fails when the two differ and rewrites the file when
//! run with `KOMNET_WRITE_MANPAGE=1`.

use std::io;

use clap::CommandFactory;

use super::cli::Cli;

/// The sections after the options, in roff.
const MORE: &str = r#"
.SH CONFIGURATION
.I gateway.toml
keys:
.BR role " (" hub " or " spoke "), "
.BR data_dir " (default " /var/lib/komnet "), "
.BR bootstrap ", " enroll_urls ", " interface " (default " komnet0 "), "
.BR listen_port ", " policy_public_key ", " policy_poll ", " lan " (spoke), "
.BR wait_for_bootstrap ", " lan_addresses ", " dhcp_config " (spoke), "
.BR metrics_listen " (default " 127.0.0.1:9120 "), "
.BR log_json ", " failover_after ", " keepalive ", " max_flows ,
.BR registry_outage_alarm " and " registry_outage " (hub)."
A hub on a machine of its own has a
.B [bgp]
section:
.B table
(the kernel routing table that holds the prefixes of the peers sending to this hub, for a
routing daemon such as BIRD or FRR to announce by BGP; the hub empties it at start) and
.B hold
(default
.BR 3s :
how long a spoke may be silent before its prefixes are withdrawn), and optionally
.B bird_socket
(the hub machine's BIRD control socket: the hub reads its BGP sessions there every 5 s and
reports one that is not Established).
The packaged file lists each with its default.
Without
.BR policy_public_key ,
the key the bootstrap file carries is pinned at enrollment and kept as
.IR DATA_DIR/policy.pub .
.PP
.BR policy_public_key " and " bootstrap
may name a systemd credential instead of a file:
.B credential:NAME
is
.IR $CREDENTIALS_DIRECTORY/NAME ,
which
.B komnet-gateway.service
fills from
.I /etc/komnet/policy.pub
and
.IR /var/lib/komnet/bootstrap.json .
.SH SYSTEMD
.B komnet-gateway.service
runs the appliance as the user
.B komnet
with
.B CAP_NET_ADMIN
as its only capability, in a sandbox where only the data directory is writable. It is a
.B Type=notify
unit: the daemon reports ready once the tunnel is up (or once it waits for a bootstrap file,
with
.BR wait_for_bootstrap ),
keeps a watchdog (WatchdogSec=30s) fed
while its control plane and packet path answer, and shows its state in
.BR "systemctl status" .
IP forwarding is switched on by the unit
.RI ( /usr/lib/sysctl.d/60-komnet-gateway.conf )
before the daemon starts.
The package does not enable the unit; after editing gateway.toml:
.PP
.RS
systemctl enable \-\-now komnet-gateway
.RE
.SH FILES
.TP
.I /etc/komnet/gateway.toml
The configuration.
.TP
.I /etc/komnet/policy.pub
The pinned policy signing key (from
.BR "komnet policy keygen" ).
.TP
.I /var/lib/komnet/bootstrap.json
The bootstrap file from
.BR "komnet token create" ;
read on first start only.
.TP
.I /var/lib/komnet/
WireGuard key, enrollment and certificate, last-known-good policy.
.SH EXIT STATUS
0 on SIGTERM, SIGINT or when the tunnel interface is deleted; 78 when the configuration is
invalid (the unit does not restart then); 1 on any other error, which is printed.
.SH SEE ALSO
.BR komnet (1),
.BR komnet-status (1),
.BR komnet-enroll (8),
.BR nft (8),
.BR ip (8),
.BR wg (8)
"#;

/// Renders the whole page.
pub(crate) fn render() -> io::Result<String> {
    let mut cmd = Cli::command();
    cmd.build();
    let man = |cmd: clap::Command| {
        clap_mangen::Man::new(cmd)
            .section("8")
            .source(format!("komnet {}", env!("CARGO_PKG_VERSION")))
            .manual("komnet")
    };
    let top = man(cmd.clone()).title("KOMNET-GATEWAY");
    let mut page = section(|w| top.render_title(w), true)?;
    page += &section(|w| top.render_name_section(w), false)?;
    // The forms do not combine: the program's synopsis without clap's "[command]", then one
    // line per subcommand.
    let synopsis = section(|w| top.render_synopsis_section(w), false)?;
    page += &synopsis.replace(" [\\fIcommand\\fR]", "");
    let subcommands: Vec<_> = cmd.get_subcommands().cloned().collect();
    for sub in &subcommands {
        page += ".br\n";
        page += &body(&section(
            |w| man(sub.clone()).render_synopsis_section(w),
            false,
        )?);
    }
    page += &section(|w| top.render_description_section(w), false)?;
    page += &section(|w| top.render_options_section(w), false)?;
    for sub in subcommands {
        // A subcommand's own options.
        let name = sub.get_name().to_uppercase();
        page += &format!(".SH \"OPTIONS OF {name}\"\n");
        page += &body(&section(|w| man(sub).render_options_section(w), false)?);
    }
    page += MORE.trim_start();
    Ok(page)
}

/// Lines clap_mangen opens every separately rendered piece with (a string for the
/// apostrophe); the page needs them once, at the top.
const PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// One piece clap_mangen renders, with its preamble only if `keep_preamble`.
fn section(
    render: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
    keep_preamble: bool,
) -> io::Result<String> {
    let mut out = Vec::new();
    render(&mut out)?;
    let text = String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(match text.strip_prefix(PREAMBLE) {
        Some(rest) if !keep_preamble => rest.to_owned(),
        _ => text,
    })
}

/// A section without its `.SH` heading line.
fn body(section: &str) -> String {
    match section.strip_prefix(".SH ") {
        Some(rest) => rest
            .split_once('\n')
            .map_or("", |(_, body)| body)
            .to_owned(),
        None => section.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// packaging/man/komnet-gateway.8 is the page the binary's command line generates.
    #[test]
    fn packaged_man_page_is_generated_from_the_command_line() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/man/komnet-gateway.8");
        let page = render().expect("rendering the page");
        if std::env::var_os("KOMNET_WRITE_MANPAGE").is_some() {
            std::fs::write(&path, &page).expect("writing the page");
        }
        let packaged = std::fs::read_to_string(&path).expect("reading the packaged page");
        assert!(
            packaged == page,
            "{} differs from the page komnet-gateway's command line generates; rewrite it with \
             KOMNET_WRITE_MANPAGE=1 cargo test -p komnet-gateway --bin komnet-gateway man",
            path.display()
        );
    }

    #[test]
    fn page_has_every_flag_and_section() {
        let page = render().expect("rendering the page");
        for needle in [
            ".TH KOMNET-GATEWAY 8",
            ".SH NAME",
            ".SH SYNOPSIS",
            "komnet\\-gateway run",
            "\\-\\-foreground",
            "\\-\\-version",
            "\\-\\-config",
            "/etc/komnet/gateway.toml",
            ".SH \"OPTIONS OF RUN\"",
            "Aq \\(aq",
            ".SH CONFIGURATION",
            ".SH EXIT STATUS",
            ".SH SEE ALSO",
        ] {
            assert!(page.contains(needle), "{needle:?} missing from\n{page}");
        }
        assert_eq!(page.matches(PREAMBLE).count(), 1, "{page}");
        assert_eq!(page.matches(".SH SYNOPSIS").count(), 1, "{page}");
        assert!(!page.contains("[\\fIcommand\\fR]"), "{page}");
    }
}
