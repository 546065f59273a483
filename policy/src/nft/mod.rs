//! The nftables ruleset a site's appliance installs for its own forwarding (town-hall LAN ↔
//! tunnel): one `inet` table of ours, default drop, named sets for prefixes. Built as a small
//! intermediate form that renders both to nft's text syntax (for people) and to its JSON
//! (through the `nftables` crate, for `nft -j`), applied as one atomic batch after `nft -c`
//! accepted it, then read back and compared.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::{batch::Batch, expr, helper, schema, stmt, types};

use crate::flow::{PortRange, Proto};
use crate::model::{Binding, GuardTarget, Policy, SegmentId, ServiceId, SiteId};

mod build;
mod json;
mod kernel;
mod text;

pub use build::{closed_ruleset, ruleset_for_site};
pub use json::to_json_pretty;
pub use kernel::{drop_counters_from_json, read_drop_counters};

/// The table every komnet appliance owns; nothing else of the host's firewall is touched.
pub const TABLE: &str = "komnet";

/// The table of a site's 1:1 prefix translations (`local` prefixes), next to [`TABLE`]: nft's
/// NAT statements with prefix maps (`snat ip prefix to …`) are not in the `nftables` crate's
/// schema, so they live in a table of their own, written as JSON here and read back raw.
pub const NAT_TABLE: &str = "komnet_nat";

/// The drop reason (in `/metrics` and `komnet status`) of packets from the LAN whose source
/// does not belong to a segment that arrives on their interface.
pub const SEGMENT_SPOOF: &str = "segment_spoof";

/// The interfaces a site appliance forwards between.
#[derive(Debug, Clone)]
pub struct Interfaces {
    /// The appliance's LAN interfaces (its `gateway.toml`'s `lan`); the first is the trunk
    /// that carries the segments bound to a VLAN.
    pub lan: Vec<String>,
    pub tunnel: String,
}

/// The name of the VLAN interface for VLAN `id` on `trunk`: `trunk.id` as `ip` names it by
/// habit (`eth1.20`), or `vlanID` when that would exceed the kernel's 15 bytes.
///
/// ```
/// # use komnet_policy::nft::vlan_interface;
/// assert_eq!(vlan_interface("eth1", 20), "eth1.20");
/// assert_eq!(vlan_interface("enx00e04c680001", 20), "vlan20");
/// ```
pub fn vlan_interface(trunk: &str, id: u16) -> String {
    let name = format!("{trunk}.{id}");
    if name.len() <= 15 {
        name
    } else {
        format!("vlan{id}")
    }
}

impl Interfaces {
    /// The interfaces a segment bound to `binding` arrives on: its VLAN interface on the trunk,
    /// its port, or (a site's only, unbound segment) every LAN interface.
    pub fn of_binding(&self, binding: &Binding) -> Result<Vec<String>, NftError> {
        match binding {
            Binding::Vlan(id) => match self.lan.first() {
                Some(trunk) => Ok(vec![vlan_interface(trunk, *id)]),
                None => Err(NftError::NoTrunk(*id)),
            },
            Binding::Port(p) => Ok(vec![p.clone()]),
            Binding::Lan => Ok(self.lan.clone()),
        }
    }

    /// Every segment of `site` with the interfaces it arrives on (home-office segments have
    /// none). Two segments on one interface are an error (`port = "eth1.20"` next to
    /// `vlan = 20` on the trunk `eth1`).
    pub fn site_segments(
        &self,
        policy: &Policy,
        site: SiteId,
    ) -> Result<Vec<(SegmentId, Vec<String>)>, NftError> {
        // The names the caller gives first: the trunk's own name is not a segment's interface
        // when a segment arrives untagged on it, so the loop below would not see it.
        for name in self.lan.iter().chain(Some(&self.tunnel)) {
            if !valid_ifname(name) {
                return Err(NftError::BadInterface(name.clone()));
            }
        }
        let mut out: Vec<(SegmentId, Vec<String>)> = Vec::new();
        for seg in policy.site_segments(site) {
            let Some(binding) = &policy.segments[seg.index()].binding else {
                continue;
            };
            let ifaces = self.of_binding(binding)?;
            for name in &ifaces {
                if !valid_ifname(name) {
                    return Err(NftError::BadInterface(name.clone()));
                }
                if let Some((other, _)) = out.iter().find(|(_, i)| i.contains(name)) {
                    return Err(NftError::InterfaceClash {
                        interface: name.clone(),
                        first: policy.segment_name(*other),
                        second: policy.segment_name(seg),
                    });
                }
            }
            out.push((seg, ifaces));
        }
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("interface name {0:?} is not valid (1-15 of a-z, A-Z, 0-9, '-', '_', '.', '=', '+')")]
    BadInterface(String),
    #[error("segments {first} and {second} would both arrive on interface {interface}: give them different VLANs or ports")]
    InterfaceClash {
        interface: String,
        first: String,
        second: String,
    },
    #[error("a segment is on VLAN {0}, but the appliance has no LAN interface to carry it (lan = [\"TRUNK\", …])")]
    NoTrunk(u16),
    #[error("nft rejected the ruleset during {stage}; the previous ruleset is still in place. nft said: {message}")]
    Rejected {
        stage: &'static str,
        message: String,
    },
    #[error("cannot run nft: {0}")]
    Exec(String),
    #[error("the ruleset read back from the kernel differs from the one applied: {0}")]
    ReadBack(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(net: &IpNet) -> Family {
        if net.addr().is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    fn proto(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
    fn icmp(self) -> &'static str {
        match self {
            Family::V4 => "icmp",
            Family::V6 => "ipv6-icmp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SetDef {
    name: String,
    family: Family,
    elements: Vec<IpNet>,
    comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Match {
    Iif(Vec<String>),
    Oif(Vec<String>),
    CtState(&'static [&'static str]),
    Saddr(Family, String),
    Daddr(Family, String),
    /// The source lies in one of these prefixes (an anonymous set).
    SaddrIn(Family, Vec<IpNet>),
    /// A UDP header field (`sport`, `dport`) equals a port.
    Udp(&'static str, u16),
    /// Protocol and destination ports; `None` ports: all ports of the protocol (or ICMP).
    L4 {
        family: Family,
        proto: Proto,
        ports: Option<Vec<(u16, u16)>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Accept,
    Drop,
    Jump(&'static str),
    Return,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleDef {
    matches: Vec<Match>,
    counter: bool,
    verdict: Verdict,
    comment: String,
}

/// The base chains' hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// `forward`, priority filter, policy drop: what the appliance forwards.
    Forward,
    /// `prerouting`, priority raw (before conntrack and routing, so before the kernel's
    /// reverse-path filter), policy accept: the LAN's sources are checked here.
    Prerouting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainDef {
    name: &'static str,
    /// Where a base chain hooks in; regular chains have none.
    base: Option<Hook>,
    rules: Vec<RuleDef>,
}

/// The compiled firewall of one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    sets: Vec<SetDef>,
    chains: Vec<ChainDef>,
    /// The site's translations, installed as [`NAT_TABLE`] (none: that table is removed).
    nat: Vec<NatDef>,
}

/// One 1:1 prefix translation at the tunnel: what leaves into the tunnel from `local` gets
/// the same host part in `unique` (snat), what arrives from the tunnel for `unique` goes to
/// `local` (dnat); replies follow by conntrack.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NatDef {
    tunnel: String,
    family: Family,
    unique: IpNet,
    local: IpNet,
    comment: String,
}

fn valid_ifname(name: &str) -> bool {
    komnet_proto::config::check_interface_name(name).is_ok()
}

struct SetNamer {
    sets: Vec<SetDef>,
    taken: BTreeSet<String>,
    /// The site's `(segment, unique, local)` translations: on its appliance every address of
    /// its own LAN is matched as the LAN numbers it (the tunnel side is translated by NAT
    /// before the filter sees a packet, and after it for what leaves).
    translations: Vec<(SegmentId, IpNet, IpNet)>,
}

impl SetNamer {
    /// The set for `nets` of one family, created on first use; `None` when there are none.
    fn get(&mut self, base: &str, family: Family, nets: &[IpNet], comment: &str) -> Option<String> {
        let elements: Vec<IpNet> = crate::model::lan_view_with(&self.translations, nets)
            .iter()
            .filter(|n| Family::of(n) == family)
            .copied()
            .collect();
        if elements.is_empty() {
            return None;
        }
        let clean: String = base
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let wanted = format!("{clean}_{}", family.suffix());
        if let Some(s) = self
            .sets
            .iter()
            .find(|s| s.comment == comment && s.family == family)
        {
            return Some(s.name.clone());
        }
        let mut name = wanted.clone();
        let mut n = 2;
        while self.taken.contains(&name) {
            name = format!("{wanted}_{n}");
            n += 1;
        }
        self.taken.insert(name.clone());
        self.sets.push(SetDef {
            name: name.clone(),
            family,
            elements,
            comment: comment.to_owned(),
        });
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn landkreis() -> Policy {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
        Policy::load(&dir).unwrap_or_else(|e| panic!("{}", e.render()))
    }

    fn site(p: &Policy, name: &str) -> SiteId {
        p.find_site(name).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn vlan_interfaces_are_named_after_the_trunk_within_15_bytes() {
        assert_eq!(vlan_interface("eth1", 10), "eth1.10");
        assert_eq!(vlan_interface("enp3s0", 4094), "enp3s0.4094");
        assert_eq!(vlan_interface("enp0s31f6", 4094), "enp0s31f6.4094");
        assert_eq!(vlan_interface("enx00e04c6801", 100), "vlan100");
        for trunk in ["eth1", "enx00e04c680001"] {
            assert!(valid_ifname(&vlan_interface(trunk, 4094)));
        }
    }

    #[test]
    fn each_segment_arrives_on_its_own_interface() {
        let p = landkreis();
        let ifs = Interfaces {
            lan: vec!["eth1".into()],
            tunnel: "komnet0".into(),
        };
        let rathaus = site(&p, "musterstadt/rathaus");
        let got: Vec<(String, Vec<String>)> = ifs
            .site_segments(&p, rathaus)
            .unwrap()
            .into_iter()
            .map(|(s, i)| (p.segment_name(s), i))
            .collect();
        assert!(got.contains(&("musterstadt/verwaltung".into(), vec!["eth1.10".into()])));
        assert!(got.contains(&("musterstadt/gaeste".into(), vec!["eth1.100".into()])));
        assert_eq!(got.len(), 5);
        // A site's only, unbound segment arrives on every LAN interface.
        let ifs2 = Interfaces {
            lan: vec!["eth1".into(), "eth2".into()],
            tunnel: "komnet0".into(),
        };
        let bauhof = site(&p, "musterstadt/bauhof");
        let got = ifs2.site_segments(&p, bauhof).unwrap();
        assert_eq!(got[0].1, ["eth1", "eth2"]);
        // No trunk for the VLANs.
        let none = Interfaces {
            lan: vec![],
            tunnel: "komnet0".into(),
        };
        assert!(matches!(
            none.site_segments(&p, rathaus),
            Err(NftError::NoTrunk(_))
        ));
        // A trunk whose VLAN interface is another segment's port.
        let op = "[policy]\nname = \"x\"\nversion = 1\nkinds = [\"staff\"]\n[tenants.t]\ndatacenter = [\"10.1.0.0/24\"]\n[tenants.t.sites.s]\nprefixes = [\"10.2.0.0/16\"]\n";
        let frag = "tenant = \"t\"\n[segments.a]\nkind = \"staff\"\nsite = \"s\"\nprefixes = [\"10.2.1.0/24\"]\nvlan = 10\n[segments.b]\nkind = \"staff\"\nsite = \"s\"\nprefixes = [\"10.2.2.0/24\"]\nport = \"eth1.10\"\n";
        let q = Policy::from_texts(op, &[("t.toml", frag)])
            .unwrap_or_else(|e| panic!("{}", e.render()));
        let err = ifs
            .site_segments(&q, site(&q, "t/s"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("segments t/a and t/b would both arrive on interface eth1.10"),
            "{err}"
        );
        assert!(ruleset_for_site(&q, site(&q, "t/s"), &ifs).is_err());
    }

    #[test]
    fn the_site_ruleset_checks_the_arrival_first_and_counts_spoofs() {
        let p = landkreis();
        let ifs = Interfaces {
            lan: vec!["eth1".into()],
            tunnel: "komnet0".into(),
        };
        let text = ruleset_for_site(&p, site(&p, "musterstadt/rathaus"), &ifs)
            .unwrap()
            .to_string();
        let prerouting = text.split("chain prerouting {").nth(1).unwrap();
        assert!(
            prerouting.contains("type filter hook prerouting priority raw; policy accept;"),
            "the arrival check must come before conntrack and routing: {prerouting}"
        );
        let first_rule = prerouting.lines().nth(2).unwrap();
        assert!(
            first_rule.contains("jump lan_source") && first_rule.contains("\"eth1.100\""),
            "{first_rule}"
        );
        let forward = text.split("chain forward {").nth(1).unwrap();
        assert!(!forward
            .split("chain ")
            .next()
            .unwrap()
            .contains("lan_source"));
        assert!(text.contains(
            "iifname \"eth1.10\" ip saddr @seg_musterstadt_verwaltung_v4 return comment \"segment musterstadt/verwaltung on VLAN 10\""
        ), "{text}");
        assert!(
            text.contains("counter drop comment \"segment_spoof: "),
            "{text}"
        );
        let intrasite = text.split("chain intrasite {").nth(1).unwrap();
        assert!(
            intrasite.contains("@seg_musterstadt_verwaltung_v4 ip daddr @svc_musterstadt_zeiterfassung_v4 tcp dport { 443 } accept"),
            "{intrasite}"
        );
        assert!(!intrasite.contains("gaeste"), "{intrasite}");
    }

    #[test]
    fn drop_counters_are_read_by_reason_from_nfts_listing() {
        let json = r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"inet","name":"komnet","handle":1}},
            {"rule":{"family":"inet","table":"komnet","chain":"lan_source","handle":9,
              "comment":"segment_spoof: the source is not of a segment that arrives on this interface",
              "expr":[{"counter":{"packets":5000000000,"bytes":1}},{"drop":null}]}},
            {"rule":{"family":"inet","table":"komnet","chain":"outbound","handle":10,
              "comment":"guardrail a (operator.toml:3)","expr":[{"counter":{"packets":2,"bytes":1}},{"drop":null}]}},
            {"rule":{"family":"inet","table":"komnet","chain":"inbound","handle":11,
              "comment":"guardrail b (operator.toml:9)","expr":[{"counter":{"packets":3,"bytes":1}},{"drop":null}]}},
            {"rule":{"family":"inet","table":"komnet","chain":"forward","handle":12,
              "comment":"default deny","expr":[{"counter":{"packets":7,"bytes":1}},{"drop":null}]}},
            {"rule":{"family":"inet","table":"komnet","chain":"forward","handle":13,
              "comment":"replies of allowed flows","expr":[{"accept":null}]}}]}"#;
        let got = drop_counters_from_json(json).unwrap();
        assert_eq!(got.get(SEGMENT_SPOOF), Some(&5_000_000_000));
        assert_eq!(got.get("policy_guardrail"), Some(&5));
        assert_eq!(got.get("policy_default_deny"), Some(&7));
        assert_eq!(got.len(), 3);
        assert!(drop_counters_from_json("not json").is_err());
    }
}
