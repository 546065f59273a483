//! DHCP on the town-hall LAN: which segment is served where, with which pool, router, DNS
//! servers and reservations, decided from the policy alone (no I/O) and written as the
//! configuration of dnsmasq, the DHCP server the appliance runs (`komnet-dhcp.service`).
//!
//! Why dnsmasq (Debian's `dnsmasq-base`) and not Kea: one small program (about 1 MB with its
//! libraries, against Kea's two daemons with Boost and log4cplus) serves DHCPv4 **and** the
//! IPv6 router advertisements (SLAAC, with RDNSS) the issue asks for, where Kea needs radvd
//! beside it; it keeps its leases in one plain file (on the appliance's data partition), takes
//! reservations and per-subnet options from one text file the gateway can write atomically, and
//! its DNS part switches off completely (`port=0`), so nothing listens but DHCP. Kea's strengths
//! (a database backend, a control API, high-availability pairs) serve a data centre's DHCP, not
//! one town hall's few hundred hosts. The gateway never runs it itself: it writes the file, and
//! systemd (a path unit) restarts dnsmasq under its own user when the file changes.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use komnet_policy::nft::{Interfaces, NftError};
use komnet_policy::{DhcpHost, Policy, SiteId};

use super::lan::first_host;

/// One segment as the DHCP server serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSegment {
    /// `tenant/segment`, for the comment above its lines.
    pub segment: String,
    /// The interface it arrives on (where its gateway address is).
    pub interface: String,
    /// `(prefix, first, last)`: the ranges leased, with the prefix each lies in.
    pub pools: Vec<(Ipv4Net, Ipv4Addr, Ipv4Addr)>,
    /// IPv4 prefixes with reservations but no free range: served to the reserved hosts only.
    pub static_only: Vec<Ipv4Net>,
    /// /64s announced in router advertisements (SLAAC).
    pub ra: Vec<Ipv6Net>,
    pub dns: Vec<IpAddr>,
    pub lease_secs: u32,
    pub hosts: Vec<DhcpHost>,
}

/// Every segment of a site the appliance serves, in the policy's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpPlan {
    pub segments: Vec<DhcpSegment>,
}

/// What the appliance of `site` serves: each segment with something to hand out (a pool, a
/// reservation or a /64), on the first interface it arrives on, where [`super::lan::plan`]
/// puts its gateway address.
pub fn plan(policy: &Policy, site: SiteId, interfaces: &Interfaces) -> Result<DhcpPlan, NftError> {
    let mut out = DhcpPlan::default();
    for (seg, ifaces) in interfaces.site_segments(policy, site)? {
        let segment = &policy.segments[seg.index()];
        let (Some(dhcp), Some(interface)) = (&segment.dhcp, ifaces.first()) else {
            continue;
        };
        let pools = segment.dhcp_pools();
        let static_only: Vec<Ipv4Net> = segment
            .prefixes
            .iter()
            .filter_map(|p| match p {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            .filter(|n| {
                !pools.iter().any(|(p, _, _)| p == n)
                    && dhcp.hosts.iter().any(|h| n.contains(&h.address))
            })
            .collect();
        let ra = segment.ra_prefixes();
        if pools.is_empty() && static_only.is_empty() && ra.is_empty() {
            continue;
        }
        out.segments.push(DhcpSegment {
            segment: policy.segment_name(seg),
            interface: interface.clone(),
            pools,
            static_only,
            ra,
            dns: dhcp.dns.clone(),
            lease_secs: dhcp.lease_secs,
            hosts: dhcp.hosts.clone(),
        });
    }
    Ok(out)
}

impl DhcpPlan {
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The dnsmasq configuration (`--conf-file`), the same bytes for the same plan. `about`
    /// (the site) goes into the opening comment; not the policy version, so that a new version
    /// that changes nothing here does not restart the server. dnsmasq's DNS part is off
    /// (`port=0`): the segments' DNS servers are the policy's. Each range gets its own tag, so
    /// its router option names the appliance's address in that prefix. A segment with an empty
    /// DNS list is sent none (an option without a value tells dnsmasq to leave it out).
    ///
    /// ```text
    /// interface=eth1.10
    /// dhcp-range=set:r1,10.30.1.50,10.30.1.254,255.255.255.0,43200
    /// dhcp-option=tag:r1,option:router,10.30.1.1
    /// ```
    pub fn dnsmasq_conf(&self, about: &str) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("# DHCP and router advertisements for {about}."));
        line("# Written by komnet-gateway from the policy (dhcp_config in gateway.toml); komnet-dhcp.service".into());
        line("# runs dnsmasq with it and restarts it when it changes. Do not edit: the next policy overwrites it.".into());
        line("port=0".into());
        line("no-resolv".into());
        line("no-hosts".into());
        // Interfaces (VLANs) may appear after dnsmasq started: it follows them.
        line("bind-dynamic".into());
        // The appliance is the only DHCP server on its segments: answer at once, also clients
        // that ask for a lease it does not know (it lost none: the leases are on disk).
        line("dhcp-authoritative".into());
        if self.segments.iter().any(|s| !s.ra.is_empty()) {
            line("enable-ra".into());
        }
        let mut tag = 0usize;
        for seg in &self.segments {
            line(String::new());
            line(format!("# {} on {}", seg.segment, seg.interface));
            line(format!("interface={}", seg.interface));
            let dns4: Vec<String> = seg
                .dns
                .iter()
                .filter(|a| a.is_ipv4())
                .map(ToString::to_string)
                .collect();
            let dns6: Vec<String> = seg
                .dns
                .iter()
                .filter(|a| a.is_ipv6())
                .map(|a| format!("[{a}]"))
                .collect();
            let v4 = seg
                .pools
                .iter()
                .map(|(n, a, b)| (*n, format!("{a},{b}")))
                .chain(
                    seg.static_only
                        .iter()
                        .map(|n| (*n, format!("{},static", n.network()))),
                );
            for (net, range) in v4 {
                tag += 1;
                line(format!(
                    "dhcp-range=set:r{tag},{range},{},{}",
                    net.netmask(),
                    seg.lease_secs
                ));
                if let Some(router) = first_host(&IpNet::V4(net)) {
                    line(format!(
                        "dhcp-option=tag:r{tag},option:router,{}",
                        router.addr()
                    ));
                }
                line(format!(
                    "dhcp-option=tag:r{tag},option:dns-server{}",
                    prefixed(&dns4)
                ));
            }
            for net in &seg.ra {
                tag += 1;
                line(format!(
                    "dhcp-range=set:r{tag},{},ra-only,{},{}",
                    net.network(),
                    net.prefix_len(),
                    seg.lease_secs
                ));
                line(format!(
                    "dhcp-option=tag:r{tag},option6:dns-server{}",
                    prefixed(&dns6)
                ));
            }
            for h in &seg.hosts {
                let name = h
                    .name
                    .as_deref()
                    .map(|n| format!(",{n}"))
                    .unwrap_or_default();
                line(format!(
                    "dhcp-host={},{}{name},{}",
                    h.mac_text(),
                    h.address,
                    seg.lease_secs
                ));
            }
        }
        out
    }

    /// One line per segment for the log and `komnet status`: `nohfelden/verwaltung on eth1:
    /// 10.30.1.2-10.30.1.254, RA fd00:30:0:1::/64`.
    pub fn summary(&self) -> Vec<String> {
        self.segments
            .iter()
            .map(|s| {
                let mut parts: Vec<String> =
                    s.pools.iter().map(|(_, a, b)| format!("{a}-{b}")).collect();
                parts.extend(
                    s.static_only
                        .iter()
                        .map(|n| format!("{n} reservations only")),
                );
                parts.extend(s.ra.iter().map(|n| format!("RA {n}")));
                let mut text = format!("{} on {}: {}", s.segment, s.interface, parts.join(", "));
                if !s.hosts.is_empty() {
                    let _ = write!(text, ", {} reserved by MAC", s.hosts.len());
                }
                text
            })
            .collect()
    }
}

/// Makes the file at `path` hold `wanted` (written atomically, mode 0644: the DHCP server's
/// own user reads it), or removes it for `None`; returns whether it changed (the DHCP server is
/// restarted only then). The same text already there is left alone, also after the gateway
/// restarted.
pub fn write_config(path: &std::path::Path, wanted: Option<&str>) -> Result<bool, String> {
    let on_disk = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("DHCP configuration {}: {e}", path.display())),
    };
    match wanted {
        Some(text) if on_disk.as_deref() == Some(text) => Ok(false),
        Some(text) => {
            // The directory is not made here: under systemd it is the unit's RuntimeDirectory
            // (/run/komnet, mode 0755 so that the DHCP server's user may read the file).
            komnet_proto::files::write_atomic(
                path,
                text.as_bytes(),
                komnet_proto::files::Visibility::Public,
            )
            .map_err(|e| format!("DHCP configuration: {e}"))?;
            Ok(true)
        }
        None if on_disk.is_none() => Ok(false),
        None => std::fs::remove_file(path)
            .map(|()| true)
            .map_err(|e| format!("DHCP configuration {}: {e}", path.display())),
    }
}

fn prefixed(values: &[String]) -> String {
    values.iter().map(|v| format!(",{v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPERATOR: &str = r#"
[policy]
name = "test"
version = 3
kinds = ["staff", "guest", "infra"]

[dhcp]
dns = ["10.1.10.53", "fd00:1:10::53"]

[tenants.nohfelden]
datacenter = ["10.1.10.0/24", "fd00:1:10::/48"]
[tenants.nohfelden.sites.rathaus]
prefixes = ["10.30.0.0/16", "fd00:30::/48"]
"#;

    const NOHFELDEN: &str = r#"
tenant = "nohfelden"

[segments.verwaltung]
kind = "staff"
site = "rathaus"
prefixes = ["10.30.1.0/24", "fd00:30:0:1::/64"]
vlan = 10
[segments.verwaltung.dhcp]
reserved = ["10.30.1.2-10.30.1.49", "10.30.1.100"]
hosts = [{ mac = "52:54:00:AA:00:01", address = "10.30.1.20", name = "drucker-eg" }]

[segments.gaeste]
kind = "guest"
site = "rathaus"
prefixes = ["10.30.100.0/24"]
vlan = 100
dhcp = { dns = [], lease = "1h" }

[segments.technik]
kind = "infra"
site = "rathaus"
prefixes = ["10.30.9.0/29"]
port = "eth2"
dhcp = { reserved = ["10.30.9.2-10.30.9.6"], hosts = [{ mac = "52:54:00:aa:00:09", address = "10.30.9.5" }] }

[segments.kamera]
kind = "infra"
site = "rathaus"
prefixes = ["10.30.8.0/24"]
port = "eth3"
dhcp = { enabled = false }
"#;

    #[test]
    fn the_configuration_serves_each_segment_on_its_interface() {
        let p = Policy::from_texts(OPERATOR, &[("nohfelden.toml", NOHFELDEN)])
            .unwrap_or_else(|e| panic!("{}", e.render()));
        let site = p.find_site("nohfelden/rathaus").unwrap();
        let interfaces = Interfaces {
            lan: vec!["eth1".into()],
            tunnel: "komnet0".into(),
        };
        let plan = plan(&p, site, &interfaces).unwrap();
        assert_eq!(
            plan.summary(),
            [
                "nohfelden/gaeste on eth1.100: 10.30.100.2-10.30.100.254",
                "nohfelden/technik on eth2: 10.30.9.0/29 reservations only, 1 reserved by MAC",
                "nohfelden/verwaltung on eth1.10: 10.30.1.50-10.30.1.99, 10.30.1.101-10.30.1.254, RA fd00:30:0:1::/64, 1 reserved by MAC",
            ]
        );
        let conf = plan.dnsmasq_conf("nohfelden/rathaus");
        let expected = "\
# DHCP and router advertisements for nohfelden/rathaus.
# Written by komnet-gateway from the policy (dhcp_config in gateway.toml); komnet-dhcp.service
# runs dnsmasq with it and restarts it when it changes. Do not edit: the next policy overwrites it.
port=0
no-resolv
no-hosts
bind-dynamic
dhcp-authoritative
enable-ra

# nohfelden/gaeste on eth1.100
interface=eth1.100
dhcp-range=set:r1,10.30.100.2,10.30.100.254,255.255.255.0,3600
dhcp-option=tag:r1,option:router,10.30.100.1
dhcp-option=tag:r1,option:dns-server

# nohfelden/technik on eth2
interface=eth2
dhcp-range=set:r2,10.30.9.0,static,255.255.255.248,43200
dhcp-option=tag:r2,option:router,10.30.9.1
dhcp-option=tag:r2,option:dns-server,10.1.10.53
dhcp-host=52:54:00:aa:00:09,10.30.9.5,43200

# nohfelden/verwaltung on eth1.10
interface=eth1.10
dhcp-range=set:r3,10.30.1.50,10.30.1.99,255.255.255.0,43200
dhcp-option=tag:r3,option:router,10.30.1.1
dhcp-option=tag:r3,option:dns-server,10.1.10.53
dhcp-range=set:r4,10.30.1.101,10.30.1.254,255.255.255.0,43200
dhcp-option=tag:r4,option:router,10.30.1.1
dhcp-option=tag:r4,option:dns-server,10.1.10.53
dhcp-range=set:r5,fd00:30:0:1::,ra-only,64,43200
dhcp-option=tag:r5,option6:dns-server,[fd00:1:10::53]
dhcp-host=52:54:00:aa:00:01,10.30.1.20,drucker-eg,43200
";
        assert_eq!(conf, expected);
        // The same plan, the same bytes (the file is rewritten, and dnsmasq restarted, only
        // when something changed).
        assert_eq!(plan.dnsmasq_conf("nohfelden/rathaus"), conf);
    }
}
