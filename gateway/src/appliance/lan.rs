//! `lan_addresses`: the spoke as the router of its site's segments. Which addresses it takes is
//! decided here from the policy alone (no I/O); the driver puts them on the LAN interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use komnet_policy::{Policy, SiteId, TenantId};

/// The addresses a spoke takes on its LAN, and the prefixes it could not take one in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LanPlan {
    /// In the policy's segment order (by name within a tenant), each once: the first host address of each prefix, with its length.
    pub addrs: Vec<IpNet>,
    /// `(segment, prefix)` of host routes (/32, /128): a single address has no room for a
    /// router beside the host it names.
    pub skipped: Vec<(String, IpNet)>,
}

/// For every segment of `tenant` at `site` (site ids are the policy's own, as
/// [`Policy::site_by_name`] returns them), the first host address of each of its prefixes:
/// `10.30.1.0/24` gives `10.30.1.1/24`, `fd00:30:1::/64` gives `fd00:30:1::1/64`. Host bits
/// written into a prefix are ignored (`10.30.1.7/24` gives `10.30.1.1/24` as well).
pub fn gateway_addresses(policy: &Policy, tenant: TenantId, site: SiteId) -> LanPlan {
    let mut plan = LanPlan::default();
    for segment in &policy.segments {
        if segment.tenant != tenant || segment.site != Some(site) {
            continue;
        }
        for prefix in &segment.prefixes {
            match first_host(prefix) {
                Some(addr) if !plan.addrs.contains(&addr) => plan.addrs.push(addr),
                Some(_) => {}
                None => plan.skipped.push((segment.name.clone(), *prefix)),
            }
        }
    }
    plan
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

    fn plan(policy: &Policy, tenant: &str, site: &str) -> (Vec<String>, Vec<String>) {
        let t = policy.tenant_by_name(tenant).unwrap();
        let s = policy.site_by_name(t, site).unwrap();
        let plan = gateway_addresses(policy, t, s);
        (
            plan.addrs.iter().map(ToString::to_string).collect(),
            plan.skipped
                .iter()
                .map(|(seg, p)| format!("{seg} {p}"))
                .collect(),
        )
    }

    #[test]
    fn the_spoke_takes_the_first_host_of_its_own_sites_segments() {
        let p = policy();
        let (addrs, skipped) = plan(&p, "nohfelden", "rathaus");
        // Segments in name order (drucker, gaeste, verwaltung), prefixes as written.
        assert_eq!(
            addrs,
            [
                "10.30.8.1/31",
                "10.30.100.1/24",
                "10.30.1.1/24",
                "fd00:30:0:1::1/64"
            ]
        );
        assert_eq!(
            skipped,
            ["drucker 10.30.9.7/32", "drucker fd00:30:0:9::7/128"]
        );
        // Another site of the same tenant, another tenant's site of the same name.
        assert_eq!(plan(&p, "nohfelden", "bauhof").0, ["10.31.1.1/24"]);
        assert_eq!(plan(&p, "tholey", "rathaus").0, ["10.40.1.1/24"]);
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
    fn the_example_district_gives_nohfelden_its_two_lan_gateways() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/st-wendel");
        let p = Policy::load(&dir).unwrap_or_else(|e| panic!("{}", e.render()));
        let (addrs, skipped) = plan(&p, "nohfelden", "rathaus");
        assert_eq!(addrs, ["10.30.100.1/24", "10.30.1.1/24"]);
        assert!(skipped.is_empty());
    }
}
