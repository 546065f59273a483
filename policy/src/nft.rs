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

/// The ruleset an appliance installs before it has a policy: the `komnet` table whose forward
/// chain drops everything. It stays in the kernel when the daemon dies, so a crashed or killed
/// appliance forwards nothing between LAN and tunnel until a policy is applied again.
pub fn closed_ruleset() -> Ruleset {
    Ruleset {
        nat: Vec::new(),
        sets: Vec::new(),
        chains: vec![ChainDef {
            name: "forward",
            base: Some(Hook::Forward),
            rules: Vec::new(),
        }],
    }
}

/// Builds the ruleset for `site`. A packet from the LAN belongs to a segment only when it
/// arrives on that segment's interface (its VLAN or port) **and** its source lies in the
/// segment's prefixes; anything else is dropped and counted as [`SEGMENT_SPOOF`]
/// (`lan_source`). Then: what the site's segments may reach through the tunnel (`outbound`),
/// which flows from elsewhere may start towards services at the site (`inbound`), and what
/// one segment of the site may reach in another (`intrasite`). Replies of allowed flows pass
/// by conntrack; everything else is dropped.
pub fn ruleset_for_site(
    policy: &Policy,
    site: SiteId,
    interfaces: &Interfaces,
) -> Result<Ruleset, NftError> {
    for name in interfaces.lan.iter().chain(Some(&interfaces.tunnel)) {
        if !valid_ifname(name) {
            return Err(NftError::BadInterface(name.clone()));
        }
    }
    let bound = interfaces.site_segments(policy, site)?;
    // Every interface a LAN packet can arrive on: the configured ones, then the segments'.
    let mut lans: Vec<String> = Vec::new();
    for name in interfaces
        .lan
        .iter()
        .chain(bound.iter().flat_map(|(_, i)| i.iter()))
    {
        if !lans.contains(name) {
            lans.push(name.clone());
        }
    }
    let mut namer = SetNamer {
        sets: Vec::new(),
        taken: BTreeSet::new(),
        translations: policy.site_translations(site),
    };
    let local: Vec<SegmentId> = bound.iter().map(|(s, _)| *s).collect();
    let site_prefixes = &policy.sites[site.index()].prefixes;
    let at_site = |svc: &ServiceId| {
        policy.services[svc.index()]
            .addresses
            .iter()
            .any(|a| site_prefixes.iter().any(|p| p.contains(a)))
    };

    // Sources that are no segment's and never forwarded, but that a host on the LAN uses to
    // speak to the appliance itself: a DHCP client before it has an address, IPv6 link-local
    // (neighbour discovery, router solicitations, DHCPv6) and duplicate address detection,
    // IPv4 link-local (a PC that found no DHCP server).
    let net = |t: &str| t.parse::<IpNet>().expect("a literal prefix");
    let mut lan_source = vec![
        RuleDef {
            matches: vec![
                Match::SaddrIn(Family::V4, vec![net("0.0.0.0/32")]),
                Match::Udp("sport", 68),
                Match::Udp("dport", 67),
            ],
            counter: false,
            verdict: Verdict::Return,
            comment: "DHCP clients without an address".into(),
        },
        RuleDef {
            matches: vec![Match::SaddrIn(
                Family::V6,
                vec![net("::/128"), net("fe80::/10")],
            )],
            counter: false,
            verdict: Verdict::Return,
            comment: "IPv6 link-local and duplicate address detection".into(),
        },
        RuleDef {
            matches: vec![Match::SaddrIn(Family::V4, vec![net("169.254.0.0/16")])],
            counter: false,
            verdict: Verdict::Return,
            comment: "IPv4 link-local".into(),
        },
    ];
    for (seg, ifaces) in &bound {
        let binding = policy.segments[seg.index()]
            .binding
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        for family in [Family::V4, Family::V6] {
            if let Some(set) = segment_set(policy, &mut namer, *seg, family) {
                lan_source.push(RuleDef {
                    matches: vec![Match::Iif(ifaces.clone()), Match::Saddr(family, set)],
                    counter: false,
                    verdict: Verdict::Return,
                    comment: format!("segment {} on {binding}", policy.segment_name(*seg)),
                });
            }
        }
    }
    lan_source.push(RuleDef {
        matches: vec![],
        counter: true,
        verdict: Verdict::Drop,
        comment: format!(
            "{SEGMENT_SPOOF}: the source is not of a segment that arrives on this interface"
        ),
    });

    let by_segment = rules_by_segment(policy);
    let mut outbound = Vec::new();
    for &seg in &local {
        guard_rules(policy, &mut namer, seg, None, &mut outbound);
    }
    for &seg in &local {
        allow_rules(
            policy,
            &mut namer,
            seg,
            &by_segment[seg.index()],
            &|_| true,
            &mut outbound,
        );
    }

    let remote: Vec<SegmentId> = (0..policy.segments.len())
        .map(|i| SegmentId(i as u32))
        .filter(|s| policy.segments[s.index()].site != Some(site))
        .collect();
    // Only segments that some rule lets in need their guardrails here: the rest hit the
    // default drop anyway.
    let mut inbound_guards = Vec::new();
    let mut inbound_allows = Vec::new();
    for &seg in &remote {
        let before = inbound_allows.len();
        allow_rules(
            policy,
            &mut namer,
            seg,
            &by_segment[seg.index()],
            &at_site,
            &mut inbound_allows,
        );
        if inbound_allows.len() > before {
            guard_rules(policy, &mut namer, seg, Some(&at_site), &mut inbound_guards);
        }
    }
    let mut inbound = inbound_guards;
    inbound.append(&mut inbound_allows);

    // Between the site's own segments: the same rules and guardrails, towards services at
    // the site.
    let mut intra_guards = Vec::new();
    let mut intra_allows = Vec::new();
    for &seg in &local {
        let before = intra_allows.len();
        allow_rules(
            policy,
            &mut namer,
            seg,
            &by_segment[seg.index()],
            &at_site,
            &mut intra_allows,
        );
        if intra_allows.len() > before {
            guard_rules(policy, &mut namer, seg, Some(&at_site), &mut intra_guards);
        }
    }
    let mut intrasite = intra_guards;
    intrasite.append(&mut intra_allows);

    let prerouting = vec![RuleDef {
        matches: vec![Match::Iif(lans.clone())],
        counter: false,
        verdict: Verdict::Jump("lan_source"),
        comment: "LAN: a source only on its segment's interface".into(),
    }];
    let forward = vec![
        RuleDef {
            matches: vec![Match::CtState(&["established", "related"])],
            counter: false,
            verdict: Verdict::Accept,
            comment: "replies of allowed flows".into(),
        },
        RuleDef {
            matches: vec![Match::CtState(&["invalid"])],
            counter: true,
            verdict: Verdict::Drop,
            comment: "invalid state".into(),
        },
        RuleDef {
            matches: vec![
                Match::Iif(lans.clone()),
                Match::Oif(vec![interfaces.tunnel.clone()]),
            ],
            counter: false,
            verdict: Verdict::Jump("outbound"),
            comment: "LAN to tunnel".into(),
        },
        RuleDef {
            matches: vec![
                Match::Iif(vec![interfaces.tunnel.clone()]),
                Match::Oif(lans.clone()),
            ],
            counter: false,
            verdict: Verdict::Jump("inbound"),
            comment: "tunnel to LAN".into(),
        },
        RuleDef {
            matches: vec![Match::Iif(lans.clone()), Match::Oif(lans)],
            counter: false,
            verdict: Verdict::Jump("intrasite"),
            comment: "between the site's segments".into(),
        },
        RuleDef {
            matches: vec![],
            counter: true,
            verdict: Verdict::Drop,
            comment: "default deny".into(),
        },
    ];
    let mut sets = namer.sets;
    sets.sort_by(|a, b| {
        (a.comment.starts_with("service"), &a.name)
            .cmp(&(b.comment.starts_with("service"), &b.name))
    });
    let nat = policy
        .site_translations(site)
        .into_iter()
        .map(|(seg, unique, local)| NatDef {
            tunnel: interfaces.tunnel.clone(),
            family: Family::of(&unique),
            unique,
            local,
            comment: format!(
                "segment {}: {unique} in the district is {local} on the LAN",
                policy.segment_name(seg)
            ),
        })
        .collect();
    Ok(Ruleset {
        nat,
        sets,
        chains: vec![
            ChainDef {
                name: "prerouting",
                base: Some(Hook::Prerouting),
                rules: prerouting,
            },
            ChainDef {
                name: "forward",
                base: Some(Hook::Forward),
                rules: forward,
            },
            ChainDef {
                name: "lan_source",
                base: None,
                rules: lan_source,
            },
            ChainDef {
                name: "outbound",
                base: None,
                rules: outbound,
            },
            ChainDef {
                name: "inbound",
                base: None,
                rules: inbound,
            },
            ChainDef {
                name: "intrasite",
                base: None,
                rules: intrasite,
            },
        ],
    })
}

fn segment_set(
    policy: &Policy,
    namer: &mut SetNamer,
    seg: SegmentId,
    family: Family,
) -> Option<String> {
    let name = policy.segment_name(seg);
    namer.get(
        &format!("seg_{name}"),
        family,
        &policy.segments[seg.index()].prefixes,
        &format!("segment {name}"),
    )
}

fn service_set(
    policy: &Policy,
    namer: &mut SetNamer,
    svc: ServiceId,
    family: Family,
) -> Option<String> {
    let name = policy.service_name(svc);
    namer.get(
        &format!("svc_{name}"),
        family,
        &policy.services[svc.index()].addresses,
        &format!("service {name}"),
    )
}

/// Match lists for (segment → service, ports): one per family both have and protocol.
fn flow_matches(
    policy: &Policy,
    namer: &mut SetNamer,
    seg: SegmentId,
    svc: ServiceId,
    ports: &[PortRange],
) -> Vec<Vec<Match>> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let (Some(s), Some(d)) = (
            segment_set(policy, namer, seg, family),
            service_set(policy, namer, svc, family),
        ) else {
            continue;
        };
        for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
            let ranges: Vec<(u16, u16)> = crate::analysis::normalise(
                ports.iter().filter(|p| p.proto == proto).copied().collect(),
            )
            .iter()
            .map(|p| (p.lo, p.hi))
            .collect();
            if ranges.is_empty() {
                continue;
            }
            let all =
                proto == Proto::Icmp || ranges.iter().any(|&(lo, hi)| lo == 0 && hi == u16::MAX);
            out.push(vec![
                Match::Saddr(family, s.clone()),
                Match::Daddr(family, d.clone()),
                Match::L4 {
                    family,
                    proto,
                    ports: (!all).then_some(ranges),
                },
            ]);
        }
    }
    out
}

fn guard_rules(
    policy: &Policy,
    namer: &mut SetNamer,
    seg: SegmentId,
    only: Option<&dyn Fn(&ServiceId) -> bool>,
    out: &mut Vec<RuleDef>,
) {
    let segment = &policy.segments[seg.index()];
    for g in policy
        .guardrails
        .iter()
        .filter(|g| g.applies_to_segment(segment))
    {
        let comment = format!("guardrail {} ({})", g.name, policy.sources.cite(&g.loc));
        match &g.to {
            GuardTarget::Everything => {
                for family in [Family::V4, Family::V6] {
                    if let Some(s) = segment_set(policy, namer, seg, family) {
                        out.push(RuleDef {
                            matches: vec![Match::Saddr(family, s)],
                            counter: true,
                            verdict: Verdict::Drop,
                            comment: comment.clone(),
                        });
                    }
                }
            }
            GuardTarget::Services(list) => {
                for svc in list.iter().filter(|s| only.is_none_or(|f| f(s))) {
                    let ports = policy.services[svc.index()].ports.clone();
                    for matches in flow_matches(policy, namer, seg, *svc, &ports) {
                        out.push(RuleDef {
                            matches,
                            counter: true,
                            verdict: Verdict::Drop,
                            comment: comment.clone(),
                        });
                    }
                }
            }
        }
    }
}

/// The rules naming each segment (by index), in policy order: one pass over the rules, not one
/// per segment (50,000 rules × 2,000 segments took seconds).
fn rules_by_segment(policy: &Policy) -> Vec<Vec<usize>> {
    let mut by_segment = vec![Vec::new(); policy.segments.len()];
    for (i, rule) in policy.rules.iter().enumerate() {
        for seg in &rule.from {
            let list: &mut Vec<usize> = &mut by_segment[seg.index()];
            if list.last() != Some(&i) {
                list.push(i);
            }
        }
    }
    by_segment
}

fn allow_rules(
    policy: &Policy,
    namer: &mut SetNamer,
    seg: SegmentId,
    rules: &[usize],
    wanted: &dyn Fn(&ServiceId) -> bool,
    out: &mut Vec<RuleDef>,
) {
    for rule in rules.iter().map(|&i| &policy.rules[i]) {
        let comment = format!("rule {} ({})", rule.name, policy.sources.cite(&rule.loc));
        for svc in rule.to.iter().filter(|s| wanted(s)) {
            let ports = rule.allowed_ports(&policy.services[svc.index()]);
            for matches in flow_matches(policy, namer, seg, *svc, &ports) {
                out.push(RuleDef {
                    matches,
                    counter: false,
                    verdict: Verdict::Accept,
                    comment: comment.clone(),
                });
            }
        }
    }
}

fn quote_list(names: &[String]) -> String {
    match names {
        [one] => format!("\"{one}\""),
        many => {
            let q: Vec<String> = many.iter().map(|n| format!("\"{n}\"")).collect();
            format!("{{ {} }}", q.join(", "))
        }
    }
}

impl fmt::Display for Ruleset {
    /// nft's own text syntax: `nft -f` accepts it as is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {TABLE} {{")?;
        for s in &self.sets {
            let elems: Vec<String> = s.elements.iter().map(ToString::to_string).collect();
            writeln!(f, "\t# {}", s.comment)?;
            writeln!(f, "\tset {} {{", s.name)?;
            writeln!(
                f,
                "\t\ttype {}\n\t\tflags interval",
                match s.family {
                    Family::V4 => "ipv4_addr",
                    Family::V6 => "ipv6_addr",
                }
            )?;
            writeln!(f, "\t\telements = {{ {} }}\n\t}}", elems.join(", "))?;
        }
        for c in &self.chains {
            writeln!(f, "\tchain {} {{", c.name)?;
            match c.base {
                Some(Hook::Forward) => writeln!(
                    f,
                    "\t\ttype filter hook forward priority filter; policy drop;"
                )?,
                Some(Hook::Prerouting) => writeln!(
                    f,
                    "\t\ttype filter hook prerouting priority raw; policy accept;"
                )?,
                None => {}
            }
            for r in &c.rules {
                let mut line = String::new();
                for m in &r.matches {
                    let _ = match m {
                        Match::Iif(n) => write!(line, "iifname {} ", quote_list(n)),
                        Match::Oif(n) => write!(line, "oifname {} ", quote_list(n)),
                        Match::CtState(s) => write!(line, "ct state {} ", s.join(",")),
                        Match::Saddr(fam, set) => write!(line, "{} saddr @{set} ", fam.proto()),
                        Match::Daddr(fam, set) => write!(line, "{} daddr @{set} ", fam.proto()),
                        Match::SaddrIn(fam, nets) => {
                            let items: Vec<String> = nets.iter().map(ToString::to_string).collect();
                            write!(line, "{} saddr {{ {} }} ", fam.proto(), items.join(", "))
                        }
                        Match::Udp(field, port) => write!(line, "udp {field} {port} "),
                        Match::L4 {
                            family,
                            proto,
                            ports,
                        } => match (proto, ports) {
                            (Proto::Icmp, _) => write!(line, "meta l4proto {} ", family.icmp()),
                            (p, None) => write!(line, "meta l4proto {p} "),
                            (p, Some(r)) => {
                                let items: Vec<String> = r
                                    .iter()
                                    .map(|&(lo, hi)| {
                                        if lo == hi {
                                            lo.to_string()
                                        } else {
                                            format!("{lo}-{hi}")
                                        }
                                    })
                                    .collect();
                                write!(line, "{p} dport {{ {} }} ", items.join(", "))
                            }
                        },
                    };
                }
                if r.counter {
                    line.push_str("counter ");
                }
                let _ = match r.verdict {
                    Verdict::Accept => write!(line, "accept"),
                    Verdict::Drop => write!(line, "drop"),
                    Verdict::Jump(t) => write!(line, "jump {t}"),
                    Verdict::Return => write!(line, "return"),
                };
                writeln!(f, "\t\t{line} comment \"{}\"", r.comment.replace('"', "'"))?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")?;
        if self.nat.is_empty() {
            return Ok(());
        }
        writeln!(f, "table inet {NAT_TABLE} {{")?;
        for (chain, hook, priority) in [
            ("prerouting", "prerouting", "dstnat"),
            ("postrouting", "postrouting", "srcnat"),
        ] {
            writeln!(f, "\tchain {chain} {{")?;
            writeln!(
                f,
                "\t\ttype nat hook {hook} priority {priority}; policy accept;"
            )?;
            for n in &self.nat {
                let p = n.family.proto();
                let comment = n.comment.replace('"', "'");
                if chain == "prerouting" {
                    writeln!(
                        f,
                        "\t\tiifname \"{}\" {p} daddr {} dnat {p} prefix to {p} daddr map {{ {} : {} }} comment \"{comment}\"",
                        n.tunnel, n.unique, n.unique, n.local
                    )?;
                } else {
                    writeln!(
                        f,
                        "\t\toifname \"{}\" {p} saddr {} snat {p} prefix to {p} saddr map {{ {} : {} }} comment \"{comment}\"",
                        n.tunnel, n.local, n.local, n.unique
                    )?;
                }
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}

impl NatDef {
    /// The two rules of this translation as nft JSON: `(chain, rule)`. dnat for what arrives
    /// from the tunnel for the unique prefix, snat for what leaves into it from the local one.
    fn json_rules(&self) -> [(&'static str, serde_json::Value); 2] {
        use serde_json::json;
        let p = self.family.proto();
        let prefix =
            |n: &IpNet| json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}});
        let field = |f: &str| json!({"payload": {"protocol": p, "field": f}});
        let rule = |chain: &str,
                    dir: &str,
                    field_name: &str,
                    from: &IpNet,
                    to: &IpNet,
                    nat: &str| {
            json!({
                "family": "inet",
                "table": NAT_TABLE,
                "chain": chain,
                "comment": self.comment,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": dir}}, "right": self.tunnel}},
                    {"match": {"op": "==", "left": field(field_name), "right": prefix(from)}},
                    {nat: {
                        "family": p,
                        "addr": {"map": {"key": field(field_name), "data": {"set": [[prefix(from), prefix(to)]]}}},
                        "flags": "netmap"
                    }}
                ]
            })
        };
        [
            (
                "prerouting",
                rule(
                    "prerouting",
                    "iifname",
                    "daddr",
                    &self.unique,
                    &self.local,
                    "dnat",
                ),
            ),
            (
                "postrouting",
                rule(
                    "postrouting",
                    "oifname",
                    "saddr",
                    &self.local,
                    &self.unique,
                    "snat",
                ),
            ),
        ]
    }
}

fn payload<'a>(protocol: &'static str, field: &'static str) -> expr::Expression<'a> {
    expr::Expression::Named(expr::NamedExpression::Payload(expr::Payload::PayloadField(
        expr::PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn meta<'a>(key: expr::MetaKey) -> expr::Expression<'a> {
    expr::Expression::Named(expr::NamedExpression::Meta(expr::Meta { key }))
}

fn matcher<'a>(
    left: expr::Expression<'a>,
    right: expr::Expression<'a>,
    op: stmt::Operator,
) -> stmt::Statement<'a> {
    stmt::Statement::Match(stmt::Match { left, right, op })
}

fn name_expr<'a>(names: &[String]) -> expr::Expression<'a> {
    match names {
        [one] => expr::Expression::String(one.clone().into()),
        many => expr::Expression::Named(expr::NamedExpression::Set(
            many.iter()
                .map(|n| expr::SetItem::Element(expr::Expression::String(n.clone().into())))
                .collect(),
        )),
    }
}

fn net_expr<'a>(net: &IpNet) -> expr::Expression<'a> {
    expr::Expression::Named(expr::NamedExpression::Prefix(expr::Prefix {
        addr: Box::new(expr::Expression::String(net.network().to_string().into())),
        len: u32::from(net.prefix_len()),
    }))
}

impl Ruleset {
    /// The JSON batch: create-if-missing, delete and recreate our table, all in one transaction,
    /// so the kernel switches from the old ruleset to the new one atomically.
    pub fn to_nftables(&self) -> schema::Nftables<'static> {
        let family = types::NfFamily::INet;
        let table = schema::Table {
            family,
            name: TABLE.into(),
            handle: None,
        };
        let mut batch = Batch::new();
        batch.add(schema::NfListObject::Table(table.clone()));
        batch.delete(schema::NfListObject::Table(table.clone()));
        batch.add(schema::NfListObject::Table(table));
        for s in &self.sets {
            batch.add(schema::NfListObject::Set(Box::new(schema::Set {
                family,
                table: TABLE.into(),
                name: s.name.clone().into(),
                handle: None,
                set_type: schema::SetTypeValue::Single(match s.family {
                    Family::V4 => schema::SetType::Ipv4Addr,
                    Family::V6 => schema::SetType::Ipv6Addr,
                }),
                policy: None,
                flags: Some([schema::SetFlag::Interval].into_iter().collect()),
                elem: Some(s.elements.iter().map(net_expr).collect::<Vec<_>>().into()),
                timeout: None,
                gc_interval: None,
                size: None,
                comment: None,
            })));
        }
        for c in &self.chains {
            batch.add(schema::NfListObject::Chain(schema::Chain {
                family,
                table: TABLE.into(),
                name: c.name.into(),
                _type: c.base.map(|_| types::NfChainType::Filter),
                hook: c.base.map(|h| match h {
                    Hook::Forward => types::NfHook::Forward,
                    Hook::Prerouting => types::NfHook::Prerouting,
                }),
                prio: c.base.map(|h| match h {
                    Hook::Forward => 0,
                    Hook::Prerouting => -300,
                }),
                policy: c.base.map(|h| match h {
                    Hook::Forward => types::NfChainPolicy::Drop,
                    Hook::Prerouting => types::NfChainPolicy::Accept,
                }),
                ..Default::default()
            }));
        }
        for c in &self.chains {
            for r in &c.rules {
                let mut expr = Vec::new();
                for m in &r.matches {
                    use stmt::Operator::{EQ, IN};
                    expr.push(match m {
                        Match::Iif(n) => matcher(meta(expr::MetaKey::Iifname), name_expr(n), EQ),
                        Match::Oif(n) => matcher(meta(expr::MetaKey::Oifname), name_expr(n), EQ),
                        Match::CtState(s) => matcher(
                            expr::Expression::Named(expr::NamedExpression::CT(expr::CT {
                                key: "state".into(),
                                family: None,
                                dir: None,
                            })),
                            expr::Expression::List(
                                s.iter()
                                    .map(|x| expr::Expression::String((*x).into()))
                                    .collect(),
                            ),
                            IN,
                        ),
                        Match::Saddr(fam, set) => matcher(
                            payload(fam.proto(), "saddr"),
                            expr::Expression::String(format!("@{set}").into()),
                            EQ,
                        ),
                        Match::Daddr(fam, set) => matcher(
                            payload(fam.proto(), "daddr"),
                            expr::Expression::String(format!("@{set}").into()),
                            EQ,
                        ),
                        Match::SaddrIn(fam, nets) => matcher(
                            payload(fam.proto(), "saddr"),
                            expr::Expression::Named(expr::NamedExpression::Set(
                                nets.iter()
                                    .map(|n| expr::SetItem::Element(net_expr(n)))
                                    .collect(),
                            )),
                            EQ,
                        ),
                        Match::Udp(field, port) => matcher(
                            payload("udp", field),
                            expr::Expression::Number(u32::from(*port)),
                            EQ,
                        ),
                        Match::L4 {
                            family,
                            proto,
                            ports,
                        } => match (proto, ports) {
                            (Proto::Icmp, _) => matcher(
                                meta(expr::MetaKey::L4proto),
                                expr::Expression::String(family.icmp().into()),
                                EQ,
                            ),
                            (p, None) => matcher(
                                meta(expr::MetaKey::L4proto),
                                expr::Expression::String(p.name().into()),
                                EQ,
                            ),
                            (p, Some(ranges)) => matcher(
                                payload(p.name(), "dport"),
                                expr::Expression::Named(expr::NamedExpression::Set(
                                    ranges
                                        .iter()
                                        .map(|&(lo, hi)| {
                                            expr::SetItem::Element(if lo == hi {
                                                expr::Expression::Number(u32::from(lo))
                                            } else {
                                                expr::Expression::Range(Box::new(expr::Range {
                                                    range: [
                                                        expr::Expression::Number(u32::from(lo)),
                                                        expr::Expression::Number(u32::from(hi)),
                                                    ],
                                                }))
                                            })
                                        })
                                        .collect(),
                                )),
                                EQ,
                            ),
                        },
                    });
                }
                if r.counter {
                    expr.push(stmt::Statement::Counter(stmt::Counter::Anonymous(None)));
                }
                expr.push(match r.verdict {
                    Verdict::Accept => stmt::Statement::Accept(None),
                    Verdict::Drop => stmt::Statement::Drop(None),
                    Verdict::Jump(t) => {
                        stmt::Statement::Jump(stmt::JumpTarget { target: t.into() })
                    }
                    Verdict::Return => stmt::Statement::Return(None),
                });
                batch.add(schema::NfListObject::Rule(schema::Rule {
                    family,
                    table: TABLE.into(),
                    chain: c.name.into(),
                    expr: expr.into(),
                    handle: None,
                    index: None,
                    comment: Some(r.comment.clone().into()),
                }));
            }
        }
        batch.to_nftables()
    }

    /// Number of rules over all chains.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// Checks with `nft -c`, applies atomically, reads the table back and compares. When nft
    /// refuses, nothing changed and the error carries nft's own message.
    /// Everything `nft -j -f` is given, as one transaction: the `komnet` table and the
    /// translation table ([`NAT_TABLE`]), which is removed when the site has no translations.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let mut v = serde_json::to_value(self.to_nftables()).unwrap_or_default();
        let table = json!({"family": "inet", "name": NAT_TABLE});
        let mut more = vec![
            json!({"add": {"table": table}}),
            json!({"delete": {"table": table}}),
        ];
        if !self.nat.is_empty() {
            more.push(json!({"add": {"table": table}}));
            for (chain, hook, prio) in [
                ("prerouting", "prerouting", -100),
                ("postrouting", "postrouting", 100),
            ] {
                more.push(json!({"add": {"chain": {
                    "family": "inet", "table": NAT_TABLE, "name": chain,
                    "type": "nat", "hook": hook, "prio": prio, "policy": "accept"
                }}}));
            }
            for chain in ["prerouting", "postrouting"] {
                for n in &self.nat {
                    for (c, rule) in n.json_rules() {
                        if c == chain {
                            more.push(json!({"add": {"rule": rule}}));
                        }
                    }
                }
            }
        }
        if let Some(list) = v
            .get_mut("nftables")
            .and_then(serde_json::Value::as_array_mut)
        {
            list.extend(more);
        }
        v
    }

    pub fn apply(&self) -> Result<(), NftError> {
        let payload = serde_json::to_string(&self.to_json())
            .map_err(|e| NftError::Exec(format!("cannot encode the ruleset: {e}")))?;
        run_nft(&payload, &["-c"], "the check (nft -c)")?;
        run_nft(&payload, &[], "the atomic apply")?;
        self.verify_installed()
    }

    /// Compares the installed table with this ruleset: the same sets with the same addresses,
    /// the same chains with the same rules in the same order.
    pub fn verify_installed(&self) -> Result<(), NftError> {
        self.verify_installed_counting().map(drop)
    }

    /// [`Ruleset::verify_installed`], and what the installed table's counted drop rules dropped
    /// so far by reason (as [`drop_counters_from_json`]), from the same listing.
    pub fn verify_installed_counting(&self) -> Result<BTreeMap<&'static str, u64>, NftError> {
        let live = helper::get_current_ruleset_with_args(
            helper::DEFAULT_NFT,
            ["list", "table", "inet", TABLE],
        )
        .map_err(|e| NftError::ReadBack(describe_nft_error(&e)))?;
        let mut sets: Vec<(String, Vec<(IpAddr, IpAddr)>)> = Vec::new();
        let mut rules: Vec<(String, String)> = Vec::new();
        let mut drops: BTreeMap<&'static str, u64> = BTreeMap::new();
        for obj in live.objects.iter() {
            let schema::NfObject::ListObject(o) = obj else {
                continue;
            };
            match o {
                schema::NfListObject::Set(s) => {
                    let elems = s
                        .elem
                        .as_deref()
                        .unwrap_or(&[])
                        .iter()
                        .filter_map(interval_of)
                        .collect();
                    sets.push((s.name.to_string(), merge_intervals(elems)));
                }
                schema::NfListObject::Rule(r) => {
                    let comment = r.comment.as_deref().unwrap_or("");
                    if let Some(reason) = drop_reason(comment) {
                        let packets: u64 = r
                            .expr
                            .iter()
                            .filter_map(|e| match e {
                                stmt::Statement::Counter(stmt::Counter::Anonymous(Some(c))) => {
                                    c.packets.map(|p| p as u64)
                                }
                                _ => None,
                            })
                            .sum();
                        *drops.entry(reason).or_default() += packets;
                    }
                    rules.push((r.chain.to_string(), comment.to_owned()));
                }
                _ => {}
            }
        }
        for s in &self.sets {
            let want = merge_intervals(
                s.elements
                    .iter()
                    .map(|n| (n.network(), n.broadcast()))
                    .collect(),
            );
            match sets.iter().find(|(n, _)| *n == s.name) {
                None => return Err(NftError::ReadBack(format!("set {} is missing", s.name))),
                Some((_, got)) if *got != want => {
                    return Err(NftError::ReadBack(format!(
                        "set {} holds {got:?}, expected {want:?}",
                        s.name
                    )))
                }
                Some(_) => {}
            }
        }
        if sets.len() != self.sets.len() {
            return Err(NftError::ReadBack(format!(
                "{} sets installed, {} expected",
                sets.len(),
                self.sets.len()
            )));
        }
        let want: Vec<(String, String)> = self
            .chains
            .iter()
            .flat_map(|c| {
                c.rules
                    .iter()
                    .map(move |r| (c.name.to_owned(), r.comment.clone()))
            })
            .collect();
        let mut got = rules;
        let mut want_sorted = want;
        // nft lists rules chain by chain in its own chain order; compare per chain, in order.
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want_sorted.sort_by(|a, b| a.0.cmp(&b.0));
        if got != want_sorted {
            return Err(NftError::ReadBack(format!(
                "{} rules installed, {} expected, or in another order",
                got.len(),
                want_sorted.len()
            )));
        }
        self.verify_nat()?;
        Ok(drops)
    }

    /// The translation table holds this ruleset's translations, by comment, in order. Not
    /// listed when there are none (apply removes the table then; a leftover would translate
    /// only addresses no policy names any more).
    fn verify_nat(&self) -> Result<(), NftError> {
        if self.nat.is_empty() {
            return Ok(());
        }
        let text = helper::get_current_ruleset_raw(
            helper::DEFAULT_NFT,
            ["list", "table", "inet", NAT_TABLE],
        )
        .map_err(|e| {
            NftError::ReadBack(format!("table {NAT_TABLE}: {}", describe_nft_error(&e)))
        })?;
        let listed: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| NftError::ReadBack(format!("table {NAT_TABLE}: {e}")))?;
        let mut got: Vec<(String, String)> = listed["nftables"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.get("rule"))
                    .map(|r| {
                        (
                            r["chain"].as_str().unwrap_or_default().to_owned(),
                            r["comment"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut want: Vec<(String, String)> = ["prerouting", "postrouting"]
            .iter()
            .flat_map(|c| {
                self.nat
                    .iter()
                    .map(move |n| ((*c).to_owned(), n.comment.clone()))
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        if got != want {
            return Err(NftError::ReadBack(format!(
                "table {NAT_TABLE}: {} translation rules installed, {} expected, or others",
                got.len(),
                want.len()
            )));
        }
        Ok(())
    }
}

fn describe_nft_error(e: &helper::NftablesError) -> String {
    match e {
        helper::NftablesError::NftFailed { stderr, stdout, .. } => {
            let text = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            text.trim().to_owned()
        }
        other => other.to_string(),
    }
}

fn run_nft(payload: &str, args: &[&str], stage: &'static str) -> Result<(), NftError> {
    match helper::apply_ruleset_raw(payload, helper::DEFAULT_NFT, args) {
        Ok(_) => Ok(()),
        Err(e @ helper::NftablesError::NftFailed { .. }) => Err(NftError::Rejected {
            stage,
            message: describe_nft_error(&e),
        }),
        Err(e) => Err(NftError::Exec(e.to_string())),
    }
}

/// The address interval of a set element as nft lists it: a prefix, a range or one address.
fn interval_of(e: &expr::Expression<'_>) -> Option<(IpAddr, IpAddr)> {
    match e {
        expr::Expression::String(s) => {
            let a: IpAddr = s.parse().ok()?;
            Some((a, a))
        }
        expr::Expression::Named(expr::NamedExpression::Prefix(p)) => {
            let expr::Expression::String(a) = p.addr.as_ref() else {
                return None;
            };
            let net = IpNet::new(a.parse().ok()?, u8::try_from(p.len).ok()?).ok()?;
            Some((net.network(), net.broadcast()))
        }
        expr::Expression::Range(r) => match &r.range {
            [expr::Expression::String(a), expr::Expression::String(b)] => {
                Some((a.parse().ok()?, b.parse().ok()?))
            }
            _ => None,
        },
        expr::Expression::Named(expr::NamedExpression::Elem(el)) => interval_of(&el.val),
        _ => None,
    }
}

fn merge_intervals(mut v: Vec<(IpAddr, IpAddr)>) -> Vec<(IpAddr, IpAddr)> {
    v.sort();
    let mut out: Vec<(IpAddr, IpAddr)> = Vec::new();
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if next_addr(last.1).is_some_and(|n| n >= lo) || last.1 >= lo => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn next_addr(a: IpAddr) -> Option<IpAddr> {
    match a {
        IpAddr::V4(x) => u32::from(x).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(x) => u128::from(x).checked_add(1).map(|n| IpAddr::V6(n.into())),
    }
}

/// The JSON batch as `nft -j -f` reads it, indented for people.
pub fn to_json_pretty(ruleset: &Ruleset) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(&ruleset.to_json())
}

/// The drop reason a counted rule of the ruleset stands for, by its comment.
fn drop_reason(comment: &str) -> Option<&'static str> {
    if comment.starts_with(SEGMENT_SPOOF) {
        Some(SEGMENT_SPOOF)
    } else if comment.starts_with("guardrail ") {
        Some("policy_guardrail")
    } else if comment == "default deny" {
        Some("policy_default_deny")
    } else if comment == "invalid state" {
        Some("conntrack_invalid")
    } else {
        None
    }
}

/// The packets the counted drop rules of a listed `komnet` table (`nft -j list table inet
/// komnet`) dropped, summed by reason ([`SEGMENT_SPOOF`], `policy_guardrail`,
/// `policy_default_deny`, `conntrack_invalid`).
pub fn drop_counters_from_json(json: &str) -> Result<BTreeMap<&'static str, u64>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nft's listing is not JSON: {e}"))?;
    let mut out = BTreeMap::new();
    let objects = doc["nftables"].as_array().map_or(&[][..], Vec::as_slice);
    for rule in objects.iter().filter_map(|o| o.get("rule")) {
        let Some(reason) = rule["comment"].as_str().and_then(drop_reason) else {
            continue;
        };
        let exprs = rule["expr"].as_array().map_or(&[][..], Vec::as_slice);
        let packets: u64 = exprs
            .iter()
            .filter_map(|e| e.get("counter")?.get("packets")?.as_u64())
            .sum();
        *out.entry(reason).or_default() += packets;
    }
    Ok(out)
}

/// What the installed `komnet` table dropped so far, by reason (see
/// [`drop_counters_from_json`]); empty when there is no such table. The counts start again
/// from zero whenever the table is replaced: callers that report totals keep their own sums
/// (`komnet-gateway` does).
pub fn read_drop_counters() -> Result<BTreeMap<&'static str, u64>, NftError> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .output()
        .map_err(|e| NftError::Exec(e.to_string()))?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr);
        if message.contains("No such file or directory") {
            return Ok(BTreeMap::new());
        }
        return Err(NftError::ReadBack(message.trim().to_owned()));
    }
    drop_counters_from_json(&String::from_utf8_lossy(&out.stdout)).map_err(NftError::ReadBack)
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
