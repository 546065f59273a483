//! `komnet policy lan`: one site's LAN as its appliance sets it up, for the data centre to hand
//! to the field technician who connects the town hall's switch: per segment, where it arrives
//! (a VLAN tagged on the trunk, untagged on the trunk, a port of its own), the appliance's
//! address there (the segment's router) and what it serves (DHCP pools, reserved ranges and
//! reservations, DNS servers, lease time, IPv6 router advertisements); then what the switch
//! port to the trunk must carry. The same decisions as the gateway's (`Interfaces`, the
//! segments' LAN prefixes and DHCP pools from the policy crate), without the appliance.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use komnet_policy::nft::{Interfaces, NftError};
use komnet_policy::{Binding, Policy, SiteId};

/// The sheet for `site` of `policy` on an appliance whose LAN interfaces are `lan` (the first
/// is the trunk; the image has `eth1`).
pub(crate) fn lan_sheet(policy: &Policy, site: SiteId, lan: &[String]) -> Result<String, NftError> {
    let interfaces = Interfaces {
        lan: lan.to_vec(),
        // Not used for the LAN; the name the image gives it.
        tunnel: "komnet0".into(),
    };
    let trunk = lan.first().map_or("eth1", String::as_str);
    let mut bound = interfaces.site_segments(policy, site)?;
    // In the order a switch's menu lists them: VLANs by id, then the untagged segments.
    bound.sort_by_key(|(seg, _)| match &policy.segments[seg.index()].binding {
        Some(Binding::Vlan(id)) => (0, *id),
        _ => (1, 0),
    });
    let mut out = String::new();
    let s = &policy.sites[site.index()];
    let _ = writeln!(
        out,
        "{}/{}: the appliance's LAN port {trunk} goes to the town hall's switch",
        policy.tenants[s.tenant.index()].name,
        s.name
    );
    if bound.is_empty() {
        let _ = writeln!(out, "  no segment of this site arrives on the LAN");
    }
    let mut tagged: Vec<String> = Vec::new();
    let mut untagged: Vec<String> = Vec::new();
    let mut own_ports: Vec<String> = Vec::new();
    for (seg, ifaces) in &bound {
        let segment = &policy.segments[seg.index()];
        let arrives = match &segment.binding {
            Some(Binding::Vlan(id)) => {
                tagged.push(format!("VLAN {id} ({})", segment.name));
                format!(
                    "VLAN {id}, tagged on {trunk} (interface {})",
                    ifaces.first().map_or("?", String::as_str)
                )
            }
            Some(Binding::Port(p)) if p == trunk => {
                untagged.push(segment.name.clone());
                format!("untagged on {trunk}")
            }
            Some(Binding::Port(p)) => {
                own_ports.push(format!("{p} ({})", segment.name));
                format!("untagged on port {p}, a cable of its own")
            }
            Some(Binding::Lan) | None => {
                untagged.push(segment.name.clone());
                format!("untagged on {} (the site's only segment)", lan.join(", "))
            }
        };
        let _ = writeln!(out, "\n  {} ({}): {arrives}", segment.name, segment.kind);
        let mut routers = Vec::new();
        for (lan_prefix, unique) in segment.lan_prefixes().iter().zip(&segment.prefixes) {
            match first_host(lan_prefix) {
                Some(router) => routers.push(format!("{router}/{}", lan_prefix.prefix_len())),
                None => {
                    let _ = writeln!(
                        out,
                        "    {lan_prefix}: a single address, no router on the LAN for it"
                    );
                }
            }
            if lan_prefix != unique {
                let _ = writeln!(
                    out,
                    "    {lan_prefix}: the LAN's own numbering, translated 1:1 to {unique} at the tunnel"
                );
            }
        }
        if !routers.is_empty() {
            let _ = writeln!(out, "    router (the appliance): {}", routers.join(", "));
        }
        let Some(dhcp) = &segment.dhcp else {
            let _ = writeln!(
                out,
                "    DHCP: off (enabled = false): the network's own DHCP server must name the router above"
            );
            continue;
        };
        let pools: Vec<String> = segment
            .dhcp_pools()
            .iter()
            .map(|(_, a, b)| format!("{a}-{b}"))
            .collect();
        let dns = if dhcp.dns.is_empty() {
            "no DNS server".to_owned()
        } else {
            format!("DNS {}", join(&dhcp.dns))
        };
        let _ = writeln!(
            out,
            "    DHCP: {}, lease {}, {dns}",
            if pools.is_empty() {
                "no free range (reservations only)".to_owned()
            } else {
                pools.join(", ")
            },
            human_secs(dhcp.lease_secs)
        );
        for (a, b) in &dhcp.reserved {
            let _ = writeln!(out, "    not leased (static hosts): {a}-{b}");
        }
        for h in &dhcp.hosts {
            let _ = writeln!(
                out,
                "    reserved for {}: {}{}",
                h.mac_text(),
                h.address,
                h.name.as_ref().map_or(String::new(), |n| format!(" ({n})"))
            );
        }
        for ra in segment.ra_prefixes() {
            let _ = writeln!(out, "    IPv6: router advertisements for {ra} (SLAAC)");
        }
    }
    let _ = writeln!(out, "\nswitch port to {trunk} (trunk):");
    let _ = writeln!(
        out,
        "  tagged: {}",
        if tagged.is_empty() {
            "none".to_owned()
        } else {
            tagged.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "  untagged (native VLAN): {}",
        if untagged.is_empty() {
            "none".to_owned()
        } else {
            untagged.join(", ")
        }
    );
    for p in own_ports {
        let _ = writeln!(out, "  cable to port {p}");
    }
    Ok(out)
}

/// The first host address of `net` (the appliance's address on the segment); none for a host
/// prefix.
fn first_host(net: &IpNet) -> Option<IpAddr> {
    if net.prefix_len() == net.max_prefix_len() {
        return None;
    }
    Some(match net.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    })
}

fn join(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `43200` as `12h`, in the largest unit that divides it.
fn human_secs(secs: u32) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
