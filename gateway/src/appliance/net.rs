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
    #[error("cannot switch on reverse-path filtering on {interface}: {source}")]
    ReversePath {
        interface: String,
        source: std::io::Error,
    },
}

/// Runs `ip -batch -` with `lines`; `-force` makes ip go on after a failed line, and the
/// failures are reported together (a route that already went away is not one).
pub(crate) fn ip_batch(what: &str, lines: &[String], ignore: &[&str]) -> Result<(), NetError> {
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
/// takes `remove` off it (already gone, or the interface gone, is fine), and with `up` brings
/// the link up.
pub fn set_lan_addresses(
    ifname: &str,
    add: &[IpNet],
    remove: &[IpNet],
    up: bool,
) -> Result<(), NetError> {
    let lines: Vec<String> = remove
        .iter()
        .map(|a| format!("addr del {a} dev {ifname}"))
        .collect();
    ip_batch(
        &format!("address removal on {ifname}"),
        &lines,
        &["Cannot assign requested address", "Cannot find device"],
    )?;
    let mut lines: Vec<String> = add
        .iter()
        .map(|a| format!("addr replace {a} dev {ifname}"))
        .collect();
    if up {
        lines.push(format!("link set dev {ifname} up"));
    }
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

// ---- reverse-path filtering ----------------------------------------------------------------

/// `rp_filter` of an interface (0 off, 1 strict, 2 loose) as set on it; the kernel applies the
/// larger of this and `all`'s. `None`: no IPv4 on that interface (or it is gone).
fn own_rp_filter(interface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `net.ipv4.conf.all.rp_filter` is 2 (loose): it then overrides every interface's
/// strict setting (the kernel takes the larger value), and only the administrator can change
/// it back (`/proc/sys` is read-only to the daemon).
pub fn reverse_path_all_loose() -> bool {
    own_rp_filter("all") == Some(2)
}

/// The interfaces through which the data-centre network (or anything else outside the
/// tunnels) reaches a hub: every interface but loopback and layer-3 tunnels (TUN, WireGuard:
/// `ARPHRD_NONE`), whose sources the tunnel's own cryptokey routing checks.
pub fn outside_interfaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(Result::ok)
        .filter(|e| {
            let kind = std::fs::read_to_string(e.path().join("type")).unwrap_or_default();
            !matches!(kind.trim(), "772" | "65534")
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// Strict reverse-path filtering (RFC 3704; `rp_filter = 1`) on `interfaces`, the ones the
/// kernel forwards from towards the tunnel: a packet that arrives on one of them is dropped
/// unless the route back to its source leaves through the same interface. A data-centre host
/// then cannot send with a town hall's or home office's address (their routes point into the
/// tunnel), and a LAN host not with another segment's. The kernel drops such packets before
/// they are forwarded or answered by the appliance itself, also while no nftables rule is
/// loaded; `nstat`'s `TcpExtIPReversePathFilter` counts them. IPv4 only: IPv6 has no such
/// setting; the hub's firewall (`dc_spoofed_source`) and the spoke's nftables source sets cover
/// both families. Set over rtnetlink (CAP_NET_ADMIN suffices). Returns the interfaces that had
/// to be switched; interfaces without IPv4 or that do not exist are left out.
pub fn strict_reverse_path(interfaces: &[String]) -> Result<Vec<String>, NetError> {
    let mut switched = Vec::new();
    for name in interfaces {
        // The interface's own value; `all` can only make it looser (2), which is reported once
        // at start ([`reverse_path_all_loose`]), not fought here.
        if name == "lo" || own_rp_filter(name).is_none_or(|v| v == 1) {
            continue;
        }
        let Some(index) = crate::sys::if_index(name) else {
            continue;
        };
        crate::sys::set_rp_filter(index, 1).map_err(|source| NetError::ReversePath {
            interface: name.clone(),
            source,
        })?;
        switched.push(name.clone());
    }
    Ok(switched)
}

// ---- VLAN interfaces on the LAN trunk ---------------------------------------------------------
//
// Made with `ip link add link TRUNK name NAME type vlan id ID`, like every other change of the
// host's network here: one tool for addresses, routes, rules and links, the commands an
// operator would type (and read in the log), no second netlink stack in the daemon (the
// `rtnetlink`/`neli` crates would bring their own async runtime or message layer for the
// handful of changes a policy update makes), and iproute2 is a dependency of the package
// anyway. The cost, a process per change, does not matter at the rate policies change.

/// The VLAN interfaces on `trunk` as `ip -j -d link show` lists them: name and VLAN id.
pub fn vlan_links_from_json(json: &str, trunk: &str) -> Result<Vec<(String, u16)>, NetError> {
    let links: Vec<serde_json::Value> = serde_json::from_str(json)
        .map_err(|e| refused("reading the interfaces", format!("not JSON: {e}")))?;
    let mut out = Vec::new();
    for l in &links {
        let info = &l["linkinfo"];
        if info["info_kind"].as_str() != Some("vlan") || l["link"].as_str() != Some(trunk) {
            continue;
        }
        let (Some(name), Some(id)) = (
            l["ifname"].as_str(),
            info["info_data"]["id"]
                .as_u64()
                .and_then(|i| u16::try_from(i).ok()),
        ) else {
            continue;
        };
        out.push((name.to_owned(), id));
    }
    out.sort();
    Ok(out)
}

/// The `ip` commands that turn the VLAN interfaces `current` on `trunk` into `wanted`: stale
/// ones (another id, or no longer wanted) deleted first, then the missing ones made and up.
pub fn vlan_commands(
    trunk: &str,
    current: &[(String, u16)],
    wanted: &[(String, u16)],
) -> Vec<String> {
    let mut cmds = Vec::new();
    for c in current.iter().filter(|c| !wanted.contains(c)) {
        cmds.push(format!("link del dev {}", c.0));
    }
    for (name, id) in wanted.iter().filter(|w| !current.contains(w)) {
        cmds.push(format!(
            "link add link {trunk} name {name} type vlan id {id}"
        ));
    }
    for (name, _) in wanted {
        cmds.push(format!("link set dev {name} up"));
    }
    cmds
}

/// Makes the VLAN interfaces on `trunk` exactly `wanted` (VLAN interfaces on other links are
/// left alone), the trunk up. Returns whether anything had to change.
pub fn sync_vlans(trunk: &str, wanted: &[(String, u16)]) -> Result<bool, NetError> {
    let current = vlan_links_from_json(&ip_json(&["-j", "-d", "link", "show"])?, trunk)?;
    let mut cmds = vlan_commands(trunk, &current, wanted);
    let changed = current.len() != wanted.len() || current.iter().any(|c| !wanted.contains(c));
    if wanted.is_empty() && current.is_empty() {
        return Ok(false);
    }
    cmds.insert(0, format!("link set dev {trunk} up"));
    ip_batch(
        &format!("the VLAN interfaces on {trunk}"),
        &cmds,
        &["Cannot find device", "File exists"],
    )?;
    Ok(changed)
}

// ---- the forwarding fence -------------------------------------------------------------------

/// First priority of the fence's policy-routing rules (before `main`, 32766).
pub const FENCE_FIRST: u32 = 20_000;
/// Priorities of the rules that route allowed flows between the site's segments on the LAN
/// (`iif SEGMENT to PREFIX lookup main`), up to [`FENCE_LANS`].
pub const FENCE_LOCAL_FIRST: u32 = 20_002;
/// Priorities of the rules that send the rest of the LAN's packets into the tunnel.
pub const FENCE_LANS: u32 = 20_500;
/// The fence's last rule: `prohibit`, for everything no earlier rule let through.
pub const FENCE_PROHIBIT: u32 = 20_999;
/// The routing table that holds what the LAN may reach: the tunnel's routes, nothing else.
pub const FENCE_TABLE: u32 = 20_000;

/// Where a fence rule sends the route lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FenceAction {
    /// The main table: routed as usual.
    Main,
    /// [`FENCE_TABLE`]: only into the tunnel (no match: on to the next rule).
    Tunnel,
    Prohibit,
}

/// One policy-routing rule of the fence.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FenceRule {
    pub priority: u32,
    /// Packets that came in on this interface (`lo`: the appliance's own).
    pub iif: Option<String>,
    /// Only packets to this prefix.
    pub to: Option<IpNet>,
    pub action: FenceAction,
}

impl FenceRule {
    fn command(&self, verb: &str) -> String {
        let mut c = format!("rule {verb} priority {}", self.priority);
        if let Some(iif) = &self.iif {
            c += &format!(" iif {iif}");
        }
        if let Some(to) = &self.to {
            c += &format!(" to {to}");
        }
        c += &match self.action {
            FenceAction::Main => " lookup main".to_owned(),
            FenceAction::Tunnel => format!(" lookup {FENCE_TABLE}"),
            FenceAction::Prohibit => " prohibit".to_owned(),
        };
        c
    }
}

/// The fence of a spoke (the same rules for both address families): what its kernel may
/// forward even when no nftables rule is loaded (`nft flush ruleset`, a restarted
/// nftables.service). Packets from the appliance itself and from the tunnel are routed as
/// usual; packets from a LAN interface are looked up in [`FENCE_TABLE`], which holds only the
/// tunnel's routes, so they go into the tunnel or nowhere — not to the WAN, and not to another
/// LAN segment (a guest on its way to a staff PC goes to the hub, which enforces the policy);
/// everything else that is not for the appliance itself (local delivery is decided before
/// these rules) is prohibited, so the WAN never reaches the LAN. This mirrors the forward chain
/// of the site's ruleset (LAN to tunnel, tunnel to LAN), which then narrows it to the policy.
///
/// `local` (`lan::LanPlan::local_routes`, of this family): flows between the site's segments
/// that a rule allows, and their replies, are routed on the LAN instead (`iif SEG to PREFIX
/// lookup main`, before the tunnel's lookup); the forward chain's `intrasite` decides each
/// packet. While no table is loaded these pairs are open at the routing layer, as the tunnel
/// is: only between segments some rule already lets talk.
pub fn fence_rules(tunnel: &str, lans: &[String], local: &[(String, IpNet)]) -> Vec<FenceRule> {
    let rule = |priority, iif: &str, to, action| FenceRule {
        priority,
        iif: Some(iif.to_owned()),
        to,
        action,
    };
    let mut rules = vec![
        rule(FENCE_FIRST, "lo", None, FenceAction::Main),
        rule(FENCE_FIRST + 1, tunnel, None, FenceAction::Main),
    ];
    let mut priority = FENCE_LOCAL_FIRST;
    for (iif, to) in local {
        if priority < FENCE_LANS && iif != "lo" && iif != tunnel {
            rules.push(rule(priority, iif, Some(to.trunc()), FenceAction::Main));
            priority += 1;
        }
    }
    for (i, lan) in lans.iter().enumerate() {
        let priority = FENCE_LANS + i as u32;
        if priority < FENCE_PROHIBIT && lan != "lo" {
            rules.push(rule(priority, lan, None, FenceAction::Tunnel));
        }
    }
    rules.push(FenceRule {
        priority: FENCE_PROHIBIT,
        iif: None,
        to: None,
        action: FenceAction::Prohibit,
    });
    rules
}

fn refused(what: &str, message: String) -> NetError {
    NetError::Refused {
        what: what.to_owned(),
        message,
    }
}

/// The fence's rules among those `ip -j rule show` printed.
pub fn parse_fence_rules(json: &str) -> Result<Vec<FenceRule>, NetError> {
    let what = "reading the policy-routing rules";
    let rules: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| refused(what, format!("not JSON: {e}")))?;
    let mut out = Vec::new();
    for r in rules {
        let Some(priority) = r["priority"].as_u64().and_then(|p| u32::try_from(p).ok()) else {
            continue;
        };
        if !(FENCE_FIRST..=FENCE_PROHIBIT).contains(&priority) {
            continue;
        }
        let fence_table = FENCE_TABLE.to_string();
        let action = match (r["action"].as_str(), r["table"].as_str()) {
            (Some("prohibit"), _) => FenceAction::Prohibit,
            (_, Some("main")) => FenceAction::Main,
            (_, Some(t)) if t == fence_table => FenceAction::Tunnel,
            // Something else at our priorities: never what the fence wants, so it goes.
            _ => FenceAction::Main,
        };
        // `to PREFIX`: `dst` and `dstlen` (no `dstlen` for a single address).
        let to = match r["dst"].as_str() {
            None => None,
            Some(dst) => dst.parse::<IpAddr>().ok().and_then(|a| {
                let full = if a.is_ipv4() { 32 } else { 128 };
                let len = r["dstlen"].as_u64().unwrap_or(full);
                IpNet::new(a, u8::try_from(len).ok()?).ok()
            }),
        };
        let other =
            (r.get("dst").is_some() && to.is_none()) || r.get("src").is_some_and(|s| s != "all");
        out.push(FenceRule {
            priority,
            iif: r["iif"].as_str().map(str::to_owned),
            to,
            action,
        });
        if other {
            // A selector the fence never sets: make it differ, so it is replaced.
            if let Some(last) = out.last_mut() {
                last.iif = Some(format!("{}+", last.iif.as_deref().unwrap_or("")));
            }
        }
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
    for w in wanted.iter().filter(|w| w.action == FenceAction::Prohibit) {
        if !current.contains(w) {
            cmds.push(w.command("add"));
        }
    }
    for c in &current {
        if !wanted.contains(c) {
            cmds.push(format!("rule del priority {}", c.priority));
        }
    }
    for w in wanted.iter().filter(|w| w.action != FenceAction::Prohibit) {
        if !current.contains(w) {
            cmds.push(w.command("add"));
        }
    }
    cmds
}

/// The `ip route` commands that make [`FENCE_TABLE`] hold exactly `routes` via `tunnel`, given
/// what `ip -j route show table FENCE_TABLE` printed.
pub fn fence_route_commands(
    current_json: &str,
    tunnel: &str,
    routes: &[IpNet],
) -> Result<Vec<String>, NetError> {
    let what = "reading the fence's routing table";
    let current: Vec<serde_json::Value> = if current_json.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(current_json).map_err(|e| refused(what, format!("not JSON: {e}")))?
    };
    let mut have = Vec::new();
    for r in &current {
        let dst = match r["dst"].as_str() {
            Some("default") => None,
            Some(d) if d.contains('/') => d.parse::<IpNet>().ok(),
            Some(d) => d.parse::<IpAddr>().ok().map(IpNet::from),
            None => None,
        };
        have.push((dst, r["dev"].as_str().unwrap_or("").to_owned(), r.clone()));
    }
    let mut wanted: Vec<IpNet> = routes.iter().map(IpNet::trunc).collect();
    wanted.sort();
    wanted.dedup();
    let mut cmds = Vec::new();
    for (dst, dev, raw) in &have {
        let keep = dev == tunnel && dst.is_some_and(|d| wanted.contains(&d));
        if !keep {
            let d = raw["dst"].as_str().unwrap_or("default");
            cmds.push(format!("route del {d} table {FENCE_TABLE}"));
        }
    }
    for w in &wanted {
        if !have
            .iter()
            .any(|(d, dev, _)| *d == Some(*w) && dev == tunnel)
        {
            cmds.push(format!(
                "route replace {w} dev {tunnel} table {FENCE_TABLE}"
            ));
        }
    }
    Ok(cmds)
}

/// Every address on every interface but loopback, with its prefix length, as `ip -j addr`
/// lists them; link-local ones left out.
pub fn interface_addresses() -> Result<Vec<(String, IpNet)>, NetError> {
    addresses_from_json(&ip_json(&["-j", "addr", "show"])?)
}

/// Parses `ip -j addr show`: `(interface, address/prefix)` of every global address.
pub fn addresses_from_json(json: &str) -> Result<Vec<(String, IpNet)>, NetError> {
    let links: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| refused("`ip -j addr show`", format!("unreadable JSON: {e}")))?;
    let mut out = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default();
        if name.is_empty() || name == "lo" {
            continue;
        }
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] == "link" || a["scope"] == "host" {
                continue;
            }
            let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
                continue;
            };
            let Ok(addr) = local.parse::<std::net::IpAddr>() else {
                continue;
            };
            if let Ok(net) = IpNet::new(addr, len as u8) {
                out.push((name.to_owned(), net));
            }
        }
    }
    Ok(out)
}

pub(crate) fn ip_json(args: &[&str]) -> Result<String, NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetError::Exec)?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        // A table without routes does not exist for the kernel: that is an empty listing.
        if message.contains("table does not exist") {
            return Ok(String::new());
        }
        return Err(NetError::Refused {
            what: format!("`ip {}`", args.join(" ")),
            message,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs (or corrects) the spoke's fence for both families: its rules, and its table with
/// `routes` into `tunnel` (while the tunnel does not exist yet, the table stays empty and the
/// LAN reaches nothing). Returns whether anything had to change.
pub fn install_fence(
    tunnel: &str,
    lans: &[String],
    routes: &[IpNet],
    local: &[(String, IpNet)],
) -> Result<bool, NetError> {
    let mut changed = false;
    let table = FENCE_TABLE.to_string();
    for (flag, v6) in [("-4", false), ("-6", true)] {
        let current = parse_fence_rules(&ip_json(&[flag, "-j", "rule", "show"])?)?;
        let local: Vec<(String, IpNet)> = local
            .iter()
            .filter(|(_, to)| to.addr().is_ipv6() == v6)
            .cloned()
            .collect();
        let cmds = fence_commands(&current, &fence_rules(tunnel, lans, &local));
        if !cmds.is_empty() {
            changed = true;
            ip_batch_family(
                Some(flag),
                "the forwarding fence (ip rule)",
                &cmds,
                &["File exists", "No such file or directory"],
            )?;
        }
        let family: Vec<IpNet> = routes
            .iter()
            .filter(|r| r.addr().is_ipv6() == v6)
            .copied()
            .collect();
        let listed = ip_json(&[flag, "-j", "route", "show", "table", &table])?;
        let cmds = fence_route_commands(&listed, tunnel, &family)?;
        if !cmds.is_empty() {
            changed = true;
            ip_batch_family(
                Some(flag),
                "the forwarding fence's routes",
                &cmds,
                &["Cannot find device", "No such process"],
            )?;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {

    #[test]
    fn global_addresses_are_read_from_ip_json_without_loopback_and_link_local() {
        let json = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
            {"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"192.168.178.20","prefixlen":24,"scope":"global"},
                {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]},
            {"ifindex":3,"ifname":"komnet0","addr_info":[{"family":"inet","local":"10.96.0.5","prefixlen":32,"scope":"global"}]}]"#;
        let got: Vec<String> = addresses_from_json(json)
            .unwrap()
            .iter()
            .map(|(i, a)| format!("{i} {a}"))
            .collect();
        assert_eq!(got, ["eth0 192.168.178.20/24", "komnet0 10.96.0.5/32"]);
        assert!(addresses_from_json("not json").is_err());
    }

    use super::*;

    #[test]
    fn the_fence_sends_the_lan_only_into_the_tunnel() {
        let lans = vec!["staff0".to_owned(), "guest0".to_owned()];
        let text: Vec<String> = fence_rules("komnet0", &lans, &[])
            .iter()
            .map(|r| r.command("add"))
            .collect();
        assert_eq!(
            text,
            [
                "rule add priority 20000 iif lo lookup main",
                "rule add priority 20001 iif komnet0 lookup main",
                "rule add priority 20500 iif staff0 lookup 20000",
                "rule add priority 20501 iif guest0 lookup 20000",
                "rule add priority 20999 prohibit",
            ]
        );
        // A rule lets staff reach a kiosk among the guests: that flow and its replies are
        // routed on the LAN, before the tunnel's lookup.
        let local = vec![
            ("staff0".to_owned(), "10.30.100.20/32".parse().unwrap()),
            ("guest0".to_owned(), "10.30.1.7/24".parse().unwrap()),
        ];
        let text: Vec<String> = fence_rules("komnet0", &lans, &local)
            .iter()
            .map(|r| r.command("add"))
            .collect();
        assert_eq!(
            text[2..4],
            [
                "rule add priority 20002 iif staff0 to 10.30.100.20/32 lookup main",
                "rule add priority 20003 iif guest0 to 10.30.1.0/24 lookup main",
            ]
        );
    }

    #[test]
    fn what_ip_prints_is_read_back_and_only_differences_are_changed() {
        let json = r#"[{"priority":0,"src":"all","table":"local"},
            {"priority":20000,"src":"all","iif":"lo","table":"main"},
            {"priority":20500,"src":"all","iif":"staff0","table":"20000"},
            {"priority":20999,"src":"all","action":"prohibit"},
            {"priority":32766,"src":"all","table":"main"}]"#;
        let current = parse_fence_rules(json).unwrap();
        assert_eq!(current.len(), 3);
        let wanted = fence_rules("komnet0", &["staff0".to_owned()], &[]);
        // Only the tunnel's rule is missing.
        assert_eq!(
            fence_commands(&current, &wanted),
            ["rule add priority 20001 iif komnet0 lookup main"]
        );
        // Flushed rules: the prohibit rule goes in before anything else.
        let cmds = fence_commands(&[], &wanted);
        assert_eq!(cmds[0], "rule add priority 20999 prohibit");
        assert_eq!(cmds.len(), wanted.len());
        // Nothing to do when all is in place; a foreign rule at our priorities is replaced.
        let mut all = current.clone();
        all.push(wanted[1].clone());
        assert!(fence_commands(&all, &wanted).is_empty());
        let odd = r#"[{"priority":20500,"src":"all","dst":"10.0.0.0","dstlen":8,"iif":"staff0","table":"20000"}]"#;
        let cmds = fence_commands(&parse_fence_rules(odd).unwrap(), &wanted);
        assert!(
            cmds.contains(&"rule del priority 20500".to_owned()),
            "{cmds:?}"
        );
        // The LAN-to-LAN rules read back as written (a single address without `dstlen`); one
        // the policy no longer allows goes.
        let local = vec![
            ("staff0".to_owned(), "10.30.100.20/32".parse().unwrap()),
            ("guest0".to_owned(), "10.30.1.0/24".parse().unwrap()),
        ];
        let lans = ["staff0".to_owned(), "guest0".to_owned()];
        let json = r#"[{"priority":20000,"src":"all","iif":"lo","table":"main"},
            {"priority":20001,"src":"all","iif":"komnet0","table":"main"},
            {"priority":20002,"src":"all","dst":"10.30.100.20","iif":"staff0","table":"main"},
            {"priority":20003,"src":"all","dst":"10.30.1.0","dstlen":24,"iif":"guest0","table":"main"},
            {"priority":20500,"src":"all","iif":"staff0","table":"20000"},
            {"priority":20501,"src":"all","iif":"guest0","table":"20000"},
            {"priority":20999,"src":"all","action":"prohibit"}]"#;
        let current = parse_fence_rules(json).unwrap();
        assert!(fence_commands(&current, &fence_rules("komnet0", &lans, &local)).is_empty());
        assert_eq!(
            fence_commands(&current, &fence_rules("komnet0", &lans, &[])),
            ["rule del priority 20002", "rule del priority 20003"]
        );
    }

    #[test]
    fn the_fence_table_holds_exactly_the_tunnel_routes() {
        let routes: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "10.96.0.1/32".parse().unwrap(),
        ];
        let listed = r#"[{"dst":"10.0.0.0/8","dev":"komnet0","scope":"link","flags":[]},
            {"dst":"192.0.2.0/24","dev":"wan0","scope":"link","flags":[]},
            {"dst":"default","gateway":"192.0.2.1","dev":"wan0","flags":[]}]"#;
        let cmds = fence_route_commands(listed, "komnet0", &routes).unwrap();
        assert_eq!(
            cmds,
            [
                "route del 192.0.2.0/24 table 20000",
                "route del default table 20000",
                "route replace 10.96.0.1/32 dev komnet0 table 20000",
            ]
        );
        assert!(fence_route_commands("", "komnet0", &[]).unwrap().is_empty());
    }

    #[test]
    fn vlan_interfaces_are_read_back_and_only_differences_are_changed() {
        let json = r#"[{"ifindex":1,"ifname":"lo","link_type":"loopback"},
            {"ifindex":2,"ifname":"eth1","link_type":"ether"},
            {"ifindex":3,"link":"eth1","ifname":"eth1.10","linkinfo":{"info_kind":"vlan","info_data":{"protocol":"802.1Q","id":10}}},
            {"ifindex":4,"link":"eth1","ifname":"eth1.30","linkinfo":{"info_kind":"vlan","info_data":{"protocol":"802.1Q","id":30}}},
            {"ifindex":5,"link":"eth2","ifname":"eth2.10","linkinfo":{"info_kind":"vlan","info_data":{"protocol":"802.1Q","id":10}}},
            {"ifindex":6,"ifname":"guest0","linkinfo":{"info_kind":"veth"}}]"#;
        let current = vlan_links_from_json(json, "eth1").unwrap();
        assert_eq!(
            current,
            [("eth1.10".to_owned(), 10), ("eth1.30".to_owned(), 30)]
        );
        // VLAN 30 moved to 20: its interface goes, the new one comes; 10 stays.
        let wanted = [("eth1.10".to_owned(), 10), ("eth1.20".to_owned(), 20)];
        assert_eq!(
            vlan_commands("eth1", &current, &wanted),
            [
                "link del dev eth1.30",
                "link add link eth1 name eth1.20 type vlan id 20",
                "link set dev eth1.10 up",
                "link set dev eth1.20 up",
            ]
        );
        assert!(vlan_links_from_json("nope", "eth1").is_err());
    }
}
