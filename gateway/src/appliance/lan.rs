//! The spoke as the router of its site's segments: which VLAN interfaces it makes on its LAN
//! trunk, on which interface each segment arrives, and which gateway address it takes there.
//! Decided here from the policy and the configured interfaces alone (no I/O); the spoke driver
//! carries it out with `ip`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use komnet_policy::nft::{Interfaces, NftError};
use komnet_policy::{Binding, Policy, SegmentId, SiteId};

/// What a spoke sets up on its LAN for a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LanPlan {
    /// The VLAN interfaces on the trunk (the first `lan` interface): name and VLAN id.
    pub vlans: Vec<(String, u16)>,
    /// Every interface a segment of the site arrives on (VLAN interfaces, ports, or the LAN
    /// interfaces of a site's only, unbound segment): the fence and reverse-path filtering
    /// cover them.
    pub interfaces: Vec<String>,
    /// In the policy's segment order, each once: the first host address of each prefix of a
    /// segment, with its length, on the segment's interface (a site's only, unbound segment:
    /// on the first LAN interface).
    pub addrs: Vec<(String, IpNet)>,
    /// `(segment, prefix)` of host routes (/32, /128): a single address has no room for a
    /// router beside the host it names.
    pub skipped: Vec<(String, IpNet)>,
    /// `(interface, destination)`: LAN packets that arrive on the interface and go to the
    /// destination are routed on the LAN (the fence's `lookup main`), not into the tunnel. For
    /// every rule that lets a segment of the site reach a service in another of its segments:
    /// the source's interfaces to the service's addresses (clipped to the segment's prefixes),
    /// and, for the replies, the service segment's interfaces to the source's prefixes. Routing
    /// alone, not permission: nftables still decides each packet (chain `intrasite`).
    pub local_routes: Vec<(String, IpNet)>,
}

impl LanPlan {
    /// The addresses alone, for the status report.
    pub fn addresses(&self) -> Vec<IpNet> {
        self.addrs.iter().map(|(_, a)| *a).collect()
    }
}

/// The LAN of `site` (a site id of `policy`, as [`Policy::find_site`] returns it) behind
/// `interfaces`: `vlan = 10` on trunk `eth1` gives the VLAN interface `eth1.10`, and a segment
/// `10.30.1.0/24` on it the address `10.30.1.1/24` there. Two segments that would arrive on one
/// interface are an error ([`Interfaces::site_segments`]).
pub fn plan(policy: &Policy, site: SiteId, interfaces: &Interfaces) -> Result<LanPlan, NftError> {
    let mut plan = LanPlan::default();
    let bound = interfaces.site_segments(policy, site)?;
    plan.local_routes = local_routes(policy, site, &bound);
    for (seg, ifaces) in bound {
        let segment = &policy.segments[seg.index()];
        if let (Some(Binding::Vlan(id)), Some(name)) = (&segment.binding, ifaces.first()) {
            plan.vlans.push((name.clone(), *id));
        }
        for name in &ifaces {
            if !plan.interfaces.contains(name) {
                plan.interfaces.push(name.clone());
            }
        }
        let Some(on) = ifaces.first() else {
            continue;
        };
        // The LAN's own numbering: a segment's local prefix where it has one.
        for prefix in &segment.lan_prefixes() {
            match first_host(prefix) {
                Some(addr) if !plan.addrs.iter().any(|(_, a)| *a == addr) => {
                    plan.addrs.push((on.clone(), addr))
                }
                Some(_) => {}
                None => plan.skipped.push((segment.name.clone(), *prefix)),
            }
        }
    }
    Ok(plan)
}

/// The fence's LAN-to-LAN routes of a site whose segments arrive on `bound` (see
/// [`LanPlan::local_routes`]). A service address that lies in no segment of the site (or a
/// segment's own traffic on its only interface) needs none: it stays in the tunnel's lookup.
/// In the LAN's numbering: traffic between the site's segments is not translated.
fn local_routes(
    policy: &Policy,
    site: SiteId,
    bound: &[(SegmentId, Vec<String>)],
) -> Vec<(String, IpNet)> {
    let mut out: Vec<(String, IpNet)> = Vec::new();
    let mut add = |iif: &String, to: IpNet| {
        let entry = (iif.clone(), to.trunc());
        if !out.contains(&entry) {
            out.push(entry);
        }
    };
    for (from, from_ifaces) in bound {
        for rule in policy.rules.iter().filter(|r| r.from.contains(from)) {
            let addresses: Vec<IpNet> = rule
                .to
                .iter()
                .flat_map(|svc| policy.lan_view(site, &policy.services[svc.index()].addresses))
                .collect();
            for addr in &addresses {
                for (to, to_ifaces) in bound {
                    if from == to && from_ifaces.len() < 2 {
                        continue;
                    }
                    for prefix in &policy.segments[to.index()].lan_prefixes() {
                        let dst = if prefix.contains(addr) {
                            *addr
                        } else if addr.contains(prefix) {
                            *prefix
                        } else {
                            continue;
                        };
                        for iif in from_ifaces {
                            add(iif, dst);
                        }
                        let back = policy.segments[from.index()].lan_prefixes();
                        let back = back
                            .iter()
                            .filter(|p| p.addr().is_ipv4() == dst.addr().is_ipv4());
                        for source in back {
                            for iif in to_ifaces {
                                add(iif, *source);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Why a policy's `local` prefixes cannot work on this appliance: each translation of `site`
/// whose local prefix overlaps one of `addresses` (`(interface, address with its prefix)` of
/// every interface but loopback and the LAN's: the WAN, the tunnel). A LAN numbered like the
/// WAN the town hall's router hands the appliance cannot be routed.
pub fn local_prefix_clashes(
    policy: &Policy,
    site: SiteId,
    addresses: &[(String, IpNet)],
) -> Vec<String> {
    let mut out = Vec::new();
    for (seg, _, local) in policy.site_translations(site) {
        for (iface, addr) in addresses {
            let net = addr.trunc();
            if net.contains(&local.network()) || local.contains(&net.network()) {
                out.push(format!(
                    "segment {}'s local prefix {local} overlaps {addr} on {iface} (not a LAN interface: the WAN or the tunnel)",
                    policy.segment_name(seg)
                ));
            }
        }
    }
    out
}

/// The first host address of `prefix` with the prefix's length; `None` for /32 and /128.
///
/// ```
/// # use komnet_gateway::appliance::lan::first_host;
/// assert_eq!(first_host(&"10.30.1.0/24".parse().unwrap()).unwrap().to_string(), "10.30.1.1/24");
/// assert_eq!(first_host(&"10.30.1.9/32".parse().unwrap()), None);
/// ```
pub fn first_host(prefix: &IpNet) -> Option<IpNet> {
    let len = prefix.prefix_len();
    if len == prefix.max_prefix_len() {
        return None;
    }
    // The network address has every host bit clear, so adding one cannot carry out of it.
    let addr = match prefix.network() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + 1)),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) + 1)),
    };
    IpNet::new(addr, len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPERATOR: &str = r#"
[policy]
name = "test"
version = 3
kinds = ["staff", "guest", "homeoffice", "infra"]

[tenants.nohfelden]
datacenter = ["10.1.10.0/24"]
homeoffice = ["10.250.10.0/24"]
[tenants.nohfelden.sites.rathaus]
prefixes = ["10.30.0.0/16", "fd00:30::/48"]
[tenants.nohfelden.sites.bauhof]
prefixes = ["10.31.0.0/16"]

[tenants.tholey]
datacenter = ["10.1.20.0/24"]
[tenants.tholey.sites.rathaus]
prefixes = ["10.40.0.0/16"]
"#;

    const NOHFELDEN: &str = r#"
tenant = "nohfelden"

[segments.verwaltung]
kind = "staff"
site = "rathaus"
prefixes = ["10.30.1.0/24", "fd00:30:0:1::/64"]
vlan = 10

[segments.gaeste]
kind = "guest"
site = "rathaus"
prefixes = ["10.30.100.0/24"]
vlan = 100

[segments.drucker]
kind = "infra"
site = "rathaus"
prefixes = ["10.30.9.7/32", "fd00:30:0:9::7/128", "10.30.8.0/31"]
port = "eth2"

[services.kiosk]
description = "Bürgerterminal im Gäste-WLAN, von der Verwaltung ferngewartet"
addresses = ["10.30.100.20"]
ports = ["tcp/5900"]

[[rule]]
name = "kiosk-support"
from = ["verwaltung"]
to = ["kiosk"]

[segments.bauhof]
kind = "staff"
site = "bauhof"
prefixes = ["10.31.1.0/24"]

[segments.homeoffice]
kind = "homeoffice"
"#;

    const THOLEY: &str = r#"
tenant = "tholey"

[segments.verwaltung]
kind = "staff"
site = "rathaus"
prefixes = ["10.40.1.0/24"]
"#;

    fn policy() -> Policy {
        Policy::from_texts(
            OPERATOR,
            &[("nohfelden.toml", NOHFELDEN), ("tholey.toml", THOLEY)],
        )
        .unwrap_or_else(|e| panic!("{}", e.render()))
    }

    fn lan(policy: &Policy, tenant: &str, site: &str) -> (Vec<String>, Vec<String>) {
        let site = policy.find_site(&format!("{tenant}/{site}")).unwrap();
        let interfaces = Interfaces {
            lan: vec!["eth1".into()],
            tunnel: "komnet0".into(),
        };
        let plan = plan(policy, site, &interfaces).unwrap();
        (
            plan.addrs
                .iter()
                .map(|(i, a)| format!("{a} on {i}"))
                .collect(),
            plan.skipped
                .iter()
                .map(|(seg, p)| format!("{seg} {p}"))
                .collect(),
        )
    }

    #[test]
    fn the_spoke_takes_the_first_host_of_its_own_sites_segments_where_they_arrive() {
        let p = policy();
        let (addrs, skipped) = lan(&p, "nohfelden", "rathaus");
        // Segments in name order (drucker, gaeste, verwaltung), prefixes as written.
        assert_eq!(
            addrs,
            [
                "10.30.8.1/31 on eth2",
                "10.30.100.1/24 on eth1.100",
                "10.30.1.1/24 on eth1.10",
                "fd00:30:0:1::1/64 on eth1.10"
            ]
        );
        assert_eq!(
            skipped,
            ["drucker 10.30.9.7/32", "drucker fd00:30:0:9::7/128"]
        );
        let site = p.find_site("nohfelden/rathaus").unwrap();
        let full = plan(
            &p,
            site,
            &Interfaces {
                lan: vec!["eth1".into()],
                tunnel: "komnet0".into(),
            },
        )
        .unwrap();
        assert_eq!(
            full.vlans,
            [("eth1.100".to_owned(), 100), ("eth1.10".to_owned(), 10)]
        );
        assert_eq!(full.interfaces, ["eth2", "eth1.100", "eth1.10"]);
        // Staff may reach the kiosk in the guest WLAN: routed between the two VLANs (the
        // kiosk's address from the staff VLAN, the staff's IPv4 prefix back from the guests'),
        // nothing else; the DMS and Tholey's file server stay in the tunnel's lookup.
        let local: Vec<String> = full
            .local_routes
            .iter()
            .map(|(i, d)| format!("{i} to {d}"))
            .collect();
        assert_eq!(
            local,
            ["eth1.10 to 10.30.100.20/32", "eth1.100 to 10.30.1.0/24"]
        );
        // Another site of the same tenant (one unbound segment: on the LAN port), another
        // tenant's site of the same name.
        assert_eq!(lan(&p, "nohfelden", "bauhof").0, ["10.31.1.1/24 on eth1"]);
        assert_eq!(lan(&p, "tholey", "rathaus").0, ["10.40.1.1/24 on eth1"]);
    }

    #[test]
    fn first_host_of_each_family_ignores_host_bits_and_skips_host_routes() {
        let f = |s: &str| first_host(&s.parse().unwrap()).map(|n| n.to_string());
        assert_eq!(f("10.30.1.0/24").as_deref(), Some("10.30.1.1/24"));
        assert_eq!(f("10.30.1.77/24").as_deref(), Some("10.30.1.1/24"));
        assert_eq!(f("10.0.0.0/8").as_deref(), Some("10.0.0.1/8"));
        assert_eq!(f("10.30.8.0/31").as_deref(), Some("10.30.8.1/31"));
        assert_eq!(f("10.30.9.7/32"), None);
        assert_eq!(f("fd00:30:1::/64").as_deref(), Some("fd00:30:1::1/64"));
        assert_eq!(f("fd00:30:1::abcd/64").as_deref(), Some("fd00:30:1::1/64"));
        assert_eq!(f("fd00:30:1::/127").as_deref(), Some("fd00:30:1::1/127"));
        assert_eq!(f("fd00:30:9::7/128"), None);
    }

    #[test]
    fn a_lan_with_its_own_numbering_gets_its_local_gateway_and_must_not_be_the_wan() {
        let tholey = THOLEY.replace(
            "prefixes = [\"10.40.1.0/24\"]",
            "prefixes = [\"10.40.1.0/24\"]\nlocal = [\"192.168.178.0/24\"]",
        );
        let p = Policy::from_texts(
            OPERATOR,
            &[("nohfelden.toml", NOHFELDEN), ("tholey.toml", &tholey)],
        )
        .unwrap_or_else(|e| panic!("{}", e.render()));
        assert_eq!(lan(&p, "tholey", "rathaus").0, ["192.168.178.1/24 on eth1"]);
        let site = p.find_site("tholey/rathaus").unwrap();
        let at = |iface: &str, a: &str| (iface.to_owned(), a.parse::<IpNet>().unwrap());
        // A WAN from another range and the tunnel: fine.
        assert!(local_prefix_clashes(
            &p,
            site,
            &[at("eth0", "192.0.2.11/24"), at("komnet0", "10.96.0.5/32")]
        )
        .is_empty());
        // The town hall's router hands the WAN port an address of the same range.
        assert_eq!(
            local_prefix_clashes(&p, site, &[at("eth0", "192.168.178.20/24")]),
            ["segment tholey/verwaltung's local prefix 192.168.178.0/24 overlaps 192.168.178.20/24 on eth0 (not a LAN interface: the WAN or the tunnel)"]
        );
        // Nohfelden's site has no translations: nothing to clash.
        let noh = p.find_site("nohfelden/rathaus").unwrap();
        assert!(local_prefix_clashes(&p, noh, &[at("eth0", "192.168.178.20/24")]).is_empty());
    }

    #[test]
    fn the_example_district_gives_nohfelden_its_two_lan_gateways() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/st-wendel");
        let p = Policy::load(&dir).unwrap_or_else(|e| panic!("{}", e.render()));
        let (addrs, skipped) = lan(&p, "nohfelden", "rathaus");
        assert_eq!(addrs, ["10.30.100.1/24 on guest0", "10.30.1.1/24 on eth1"]);
        assert!(skipped.is_empty());
        // No rule between its segments: nothing routed on the LAN.
        let site = p.find_site("nohfelden/rathaus").unwrap();
        let interfaces = Interfaces {
            lan: vec!["eth1".into()],
            tunnel: "komnet0".into(),
        };
        assert!(plan(&p, site, &interfaces).unwrap().local_routes.is_empty());
    }
}
