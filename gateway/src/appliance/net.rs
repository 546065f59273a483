//! The host's network configuration around the tunnel: addresses, routes, forwarding, and a
//! spoke's forwarding fence. Done with iproute2's `ip` (batched: one process for many routes),
//! as an operator would type it.

use std::io::Write;
use std::process::{Command, Stdio};

use std::net::IpAddr;

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
    ip_batch_family(None, what, lines, ignore)
}

/// [`ip_batch`] for one address family (`-4`/`-6`), where the lines do not name one.
fn ip_batch_family(
    family: Option<&str>,
    what: &str,
    lines: &[String],
    ignore: &[&str],
) -> Result<(), NetError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(family)
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

// ---- the forwarding fence -------------------------------------------------------------------

/// First priority of the fence's policy-routing rules (before `main`, 32766).
pub const FENCE_FIRST: u32 = 20_000;
/// The fence's last rule: `prohibit`, for everything no earlier rule let through.
pub const FENCE_PROHIBIT: u32 = 20_999;

/// One policy-routing rule of the fence.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FenceRule {
    pub priority: u32,
    /// Packets that came in on this interface (`lo`: the appliance's own).
    pub iif: Option<String>,
    pub dst: Option<IpNet>,
    /// `prohibit` instead of `lookup main`.
    pub prohibit: bool,
}

impl FenceRule {
    fn command(&self, verb: &str) -> String {
        let mut c = format!("rule {verb} priority {}", self.priority);
        if let Some(iif) = &self.iif {
            c += &format!(" iif {iif}");
        }
        if let Some(dst) = &self.dst {
            c += &format!(" to {}", dst.trunc());
        }
        c += if self.prohibit {
            " prohibit"
        } else {
            " lookup main"
        };
        c
    }
}

/// The fence of a spoke for one address family (`v6`): what its kernel may forward even
/// when no nftables rule is loaded (`nft flush ruleset`, a restarted nftables.service).
/// Packets from the appliance itself and from the tunnel are routed as usual; packets from a
/// LAN interface only towards the tunnel's routes; everything else that is not for the
/// appliance itself (local delivery is decided before these rules) is prohibited — so the
/// LAN never reaches the WAN and the WAN never reaches the LAN, whatever nftables holds.
/// This mirrors the forward chain of the site's ruleset (LAN to tunnel, tunnel to LAN); the
/// ruleset then narrows it to what the policy allows.
pub fn fence_rules(tunnel: &str, lans: &[String], routes: &[IpNet], v6: bool) -> Vec<FenceRule> {
    let rule = |priority, iif: &str, dst| FenceRule {
        priority,
        iif: Some(iif.to_owned()),
        dst,
        prohibit: false,
    };
    let mut rules = vec![
        rule(FENCE_FIRST, "lo", None),
        rule(FENCE_FIRST + 1, tunnel, None),
    ];
    let mut routes: Vec<IpNet> = routes
        .iter()
        .filter(|r| r.addr().is_ipv6() == v6)
        .map(IpNet::trunc)
        .collect();
    routes.sort();
    routes.dedup();
    let mut next = FENCE_FIRST + 2;
    for lan in lans {
        for r in &routes {
            if next < FENCE_PROHIBIT {
                rules.push(rule(next, lan, Some(*r)));
                next += 1;
            }
        }
    }
    rules.push(FenceRule {
        priority: FENCE_PROHIBIT,
        iif: None,
        dst: None,
        prohibit: true,
    });
    rules
}

/// The fence's rules among those `ip -j rule show` printed.
pub fn parse_fence_rules(json: &str) -> Result<Vec<FenceRule>, NetError> {
    let refused = |message: String| NetError::Refused {
        what: "reading the policy-routing rules".into(),
        message,
    };
    let rules: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| refused(format!("not JSON: {e}")))?;
    let mut out = Vec::new();
    for r in rules {
        let Some(priority) = r["priority"].as_u64().and_then(|p| u32::try_from(p).ok()) else {
            continue;
        };
        if !(FENCE_FIRST..=FENCE_PROHIBIT).contains(&priority) {
            continue;
        }
        let dst = match (r["dst"].as_str(), r["dstlen"].as_u64()) {
            (Some(a), Some(len)) => Some(
                format!("{a}/{len}")
                    .parse::<IpNet>()
                    .map_err(|e| refused(format!("rule {priority}: {e}")))?,
            ),
            (Some(a), None) if a != "all" => Some(
                a.parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|e| refused(format!("rule {priority}: {e}")))?,
            ),
            _ => None,
        };
        out.push(FenceRule {
            priority,
            iif: r["iif"].as_str().map(str::to_owned),
            dst,
            prohibit: r["action"].as_str() == Some("prohibit"),
        });
    }
    out.sort();
    Ok(out)
}

/// The `ip rule` commands that turn `current` into `wanted`: none when they are equal; else
/// the prohibit rule first (so the change never opens a gap), then the old allow rules out and
/// the new ones in (meanwhile the fence is closed, never open).
pub fn fence_commands(current: &[FenceRule], wanted: &[FenceRule]) -> Vec<String> {
    let mut current = current.to_vec();
    current.sort();
    let mut wanted = wanted.to_vec();
    wanted.sort();
    if current == wanted {
        return Vec::new();
    }
    let mut cmds = Vec::new();
    for w in wanted.iter().filter(|w| w.prohibit) {
        if !current.contains(w) {
            cmds.push(w.command("add"));
        }
    }
    for c in &current {
        if !wanted.contains(c) {
            cmds.push(c.command("del"));
        }
    }
    for w in wanted.iter().filter(|w| !w.prohibit) {
        if !current.contains(w) {
            cmds.push(w.command("add"));
        }
    }
    cmds
}

/// Installs (or corrects) the spoke's fence for both families. Returns whether anything had to
/// change (nothing, when someone else left it alone).
pub fn install_fence(tunnel: &str, lans: &[String], routes: &[IpNet]) -> Result<bool, NetError> {
    let mut changed = false;
    for (flag, v6) in [("-4", false), ("-6", true)] {
        let out = Command::new("ip")
            .args([flag, "-j", "rule", "show"])
            .output()
            .map_err(NetError::Exec)?;
        if !out.status.success() {
            return Err(NetError::Refused {
                what: format!("`ip {flag} rule show`"),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let current = parse_fence_rules(&String::from_utf8_lossy(&out.stdout))?;
        let cmds = fence_commands(&current, &fence_rules(tunnel, lans, routes, v6));
        if !cmds.is_empty() {
            changed = true;
            ip_batch_family(
                Some(flag),
                "the forwarding fence (ip rule)",
                &cmds,
                &["File exists", "No such file or directory"],
            )?;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lans() -> Vec<String> {
        vec!["staff0".into(), "guest0".into()]
    }

    #[test]
    fn the_fence_lets_the_lan_reach_only_the_tunnel_routes() {
        let routes: Vec<IpNet> = ["10.0.0.0/16", "fd00::/48", "10.96.0.1/32"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let v4 = fence_rules("komnet0", &lans(), &routes, false);
        let text: Vec<String> = v4.iter().map(|r| r.command("add")).collect();
        assert_eq!(
            text,
            [
                "rule add priority 20000 iif lo lookup main",
                "rule add priority 20001 iif komnet0 lookup main",
                "rule add priority 20002 iif staff0 to 10.0.0.0/16 lookup main",
                "rule add priority 20003 iif staff0 to 10.96.0.1/32 lookup main",
                "rule add priority 20004 iif guest0 to 10.0.0.0/16 lookup main",
                "rule add priority 20005 iif guest0 to 10.96.0.1/32 lookup main",
                "rule add priority 20999 prohibit",
            ]
        );
        let v6 = fence_rules("komnet0", &lans(), &routes, true);
        assert_eq!(v6.len(), 2 + 2 + 1);
    }

    #[test]
    fn what_ip_prints_is_read_back_and_only_differences_are_changed() {
        let json = r#"[{"priority":0,"src":"all","table":"local"},
            {"priority":20000,"src":"all","iif":"lo","table":"main"},
            {"priority":20002,"src":"all","dst":"10.0.0.0","dstlen":16,"iif":"staff0","table":"main"},
            {"priority":20999,"src":"all","action":"prohibit"},
            {"priority":32766,"src":"all","table":"main"}]"#;
        let current = parse_fence_rules(json).unwrap();
        assert_eq!(current.len(), 3);
        let routes = vec!["10.0.0.0/16".parse().unwrap()];
        let wanted = fence_rules("komnet0", &["staff0".to_owned()], &routes, false);
        // Only the tunnel's rule is missing.
        assert_eq!(
            fence_commands(&current, &wanted),
            ["rule add priority 20001 iif komnet0 lookup main"]
        );
        // Flushed rules: the prohibit rule goes in before anything else.
        let cmds = fence_commands(&[], &wanted);
        assert_eq!(cmds[0], "rule add priority 20999 prohibit");
        assert_eq!(cmds.len(), wanted.len());
        // Nothing to do when all is in place.
        let mut all = current.clone();
        all.push(wanted[1].clone());
        assert!(fence_commands(&all, &wanted).is_empty());
    }
}
