//! The host's network configuration around the tunnel: addresses, routes, forwarding. Done
//! with iproute2's `ip` (batched: one process for many routes), as an operator would type it.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run ip(8): {0} (is iproute2 installed?)")]
    Exec(std::io::Error),
    #[error("ip(8) refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error("cannot enable forwarding ({path}): {source} (komnet-gateway.service switches it on before the daemon starts; elsewhere run as root or set the sysctl)")]
    Forwarding {
        path: &'static str,
        source: std::io::Error,
    },
}

/// Runs `ip -batch -` with `lines`; `-force` makes ip go on after a failed line, and the
/// failures are reported together (a route that already went away is not one).
fn ip_batch(what: &str, lines: &[String], ignore: &[&str]) -> Result<(), NetError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetError::Exec)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(lines.join("\n").as_bytes())
            .map_err(NetError::Exec)?;
    }
    let out = child.wait_with_output().map_err(NetError::Exec)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let real: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !ignore.iter().any(|i| l.contains(i)))
        .filter(|l| !l.starts_with("Command failed"))
        .collect();
    if real.is_empty() {
        Ok(())
    } else {
        Err(NetError::Refused {
            what: what.to_owned(),
            message: real.join("; "),
        })
    }
}

/// Gives the tunnel interface its addresses and brings it up.
pub fn configure_interface(ifname: &str, addrs: &[IpNet], mtu: u16) -> Result<(), NetError> {
    let mut lines: Vec<String> = addrs
        .iter()
        .map(|a| format!("addr replace {a} dev {ifname}"))
        .collect();
    lines.push(format!("link set dev {ifname} mtu {mtu} up"));
    ip_batch(&format!("the addresses of {ifname}"), &lines, &[])
}

/// Routes `nets` into the tunnel (replacing a route another interface had).
pub fn replace_routes(ifname: &str, nets: &[IpNet]) -> Result<(), NetError> {
    let lines: Vec<String> = nets
        .iter()
        .map(|n| format!("route replace {} dev {ifname}", n.trunc()))
        .collect();
    ip_batch(&format!("routes via {ifname}"), &lines, &[])
}

/// Takes routes out of the tunnel; routes that are gone or point elsewhere are left alone.
pub fn delete_routes(ifname: &str, nets: &[IpNet]) -> Result<(), NetError> {
    let lines: Vec<String> = nets
        .iter()
        .map(|n| format!("route del {} dev {ifname}", n.trunc()))
        .collect();
    ip_batch(
        &format!("route removal on {ifname}"),
        &lines,
        &["No such process", "Cannot find device", "No such device"],
    )
}

/// Puts `add` on the LAN interface `ifname` (replacing what is there with the same address),
/// takes `remove` off it (already gone is fine), and brings the link up.
pub fn set_lan_addresses(ifname: &str, add: &[IpNet], remove: &[IpNet]) -> Result<(), NetError> {
    let lines: Vec<String> = remove
        .iter()
        .map(|a| format!("addr del {a} dev {ifname}"))
        .collect();
    ip_batch(
        &format!("address removal on {ifname}"),
        &lines,
        &["Cannot assign requested address"],
    )?;
    let mut lines: Vec<String> = add
        .iter()
        .map(|a| format!("addr replace {a} dev {ifname}"))
        .collect();
    lines.push(format!("link set dev {ifname} up"));
    ip_batch(&format!("the addresses of {ifname}"), &lines, &[])
}

/// The appliance routes between LAN (or data centre) and tunnel. Already on is left alone:
/// under systemd the unit switches it on before the daemon starts (`/proc/sys` is read-only to
/// the sandboxed daemon, `ProtectKernelTunables=`), and the daemon runs without the root that
/// writing these files needs.
pub fn enable_forwarding() -> Result<(), NetError> {
    for path in [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(path, "1").map_err(|source| NetError::Forwarding { path, source })?;
    }
    Ok(())
}
