//! The nftables ruleset a site's appliance installs for its own forwarding (town-hall LAN ↔
//! tunnel): one `inet` table of ours, default drop, named sets for prefixes. Built as a small
//! intermediate form that renders both to nft's text syntax (for people) and to its JSON
//! (through the `nftables` crate, for `nft -j`), applied as one atomic batch after `nft -c`
//! accepted it, then read back and compared.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::{batch::Batch, expr, helper, schema, stmt, types};

use crate::flow::{PortRange, Proto};
use crate::model::{GuardTarget, Policy, SegmentId, ServiceId, SiteId};

/// The table every komnet appliance owns; nothing else of the host's firewall is touched.
pub const TABLE: &str = "komnet";

/// The interfaces a site appliance forwards between.
#[derive(Debug, Clone)]
pub struct Interfaces {
    pub lan: Vec<String>,
    pub tunnel: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("interface name {0:?} is not valid (1-15 of a-z, A-Z, 0-9, '-', '_', '.', '=', '+')")]
    BadInterface(String),
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleDef {
    matches: Vec<Match>,
    counter: bool,
    verdict: Verdict,
    comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainDef {
    name: &'static str,
    /// Base chains hook `forward` with policy drop; regular chains have none.
    base: bool,
    rules: Vec<RuleDef>,
}

/// The compiled firewall of one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    sets: Vec<SetDef>,
    chains: Vec<ChainDef>,
}

fn valid_ifname(name: &str) -> bool {
    komnet_proto::config::check_interface_name(name).is_ok()
}

struct SetNamer {
    sets: Vec<SetDef>,
    taken: BTreeSet<String>,
}

impl SetNamer {
    /// The set for `nets` of one family, created on first use; `None` when there are none.
    fn get(&mut self, base: &str, family: Family, nets: &[IpNet], comment: &str) -> Option<String> {
        let elements: Vec<IpNet> = nets
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
        sets: Vec::new(),
        chains: vec![ChainDef {
            name: "forward",
            base: true,
            rules: Vec::new(),
        }],
    }
}

/// Builds the ruleset for `site`: what its LAN segments may reach through the tunnel
/// (`outbound`), and which flows from elsewhere may start towards services at the site
/// (`inbound`). Replies of allowed flows pass by conntrack; everything else is dropped.
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
    let mut namer = SetNamer {
        sets: Vec::new(),
        taken: BTreeSet::new(),
    };
    let local: Vec<SegmentId> = (0..policy.segments.len())
        .map(|i| SegmentId(i as u32))
        .filter(|s| policy.segments[s.index()].site == Some(site))
        .collect();
    let site_prefixes = &policy.sites[site.index()].prefixes;
    let at_site = |svc: &ServiceId| {
        policy.services[svc.index()]
            .addresses
            .iter()
            .any(|a| site_prefixes.iter().any(|p| p.contains(a)))
    };

    let mut outbound = Vec::new();
    for &seg in &local {
        guard_rules(policy, &mut namer, seg, None, &mut outbound);
    }
    for &seg in &local {
        allow_rules(policy, &mut namer, seg, &|_| true, &mut outbound);
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
        allow_rules(policy, &mut namer, seg, &at_site, &mut inbound_allows);
        if inbound_allows.len() > before {
            guard_rules(policy, &mut namer, seg, Some(&at_site), &mut inbound_guards);
        }
    }
    let mut inbound = inbound_guards;
    inbound.append(&mut inbound_allows);

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
                Match::Iif(interfaces.lan.clone()),
                Match::Oif(vec![interfaces.tunnel.clone()]),
            ],
            counter: false,
            verdict: Verdict::Jump("outbound"),
            comment: "LAN to tunnel".into(),
        },
        RuleDef {
            matches: vec![
                Match::Iif(vec![interfaces.tunnel.clone()]),
                Match::Oif(interfaces.lan.clone()),
            ],
            counter: false,
            verdict: Verdict::Jump("inbound"),
            comment: "tunnel to LAN".into(),
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
    Ok(Ruleset {
        sets,
        chains: vec![
            ChainDef {
                name: "forward",
                base: true,
                rules: forward,
            },
            ChainDef {
                name: "outbound",
                base: false,
                rules: outbound,
            },
            ChainDef {
                name: "inbound",
                base: false,
                rules: inbound,
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

fn allow_rules(
    policy: &Policy,
    namer: &mut SetNamer,
    seg: SegmentId,
    wanted: &dyn Fn(&ServiceId) -> bool,
    out: &mut Vec<RuleDef>,
) {
    for rule in policy.rules.iter().filter(|r| r.from.contains(&seg)) {
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
            if c.base {
                writeln!(
                    f,
                    "\t\ttype filter hook forward priority filter; policy drop;"
                )?;
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
                };
                writeln!(f, "\t\t{line} comment \"{}\"", r.comment.replace('"', "'"))?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
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
                _type: c.base.then_some(types::NfChainType::Filter),
                hook: c.base.then_some(types::NfHook::Forward),
                prio: c.base.then_some(0),
                policy: c.base.then_some(types::NfChainPolicy::Drop),
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
    pub fn apply(&self) -> Result<(), NftError> {
        let payload = serde_json::to_string(&self.to_nftables())
            .map_err(|e| NftError::Exec(format!("cannot encode the ruleset: {e}")))?;
        run_nft(&payload, &["-c"], "the check (nft -c)")?;
        run_nft(&payload, &[], "the atomic apply")?;
        self.verify_installed()
    }

    /// Compares the installed table with this ruleset: the same sets with the same addresses,
    /// the same chains with the same rules in the same order.
    pub fn verify_installed(&self) -> Result<(), NftError> {
        let live = helper::get_current_ruleset_with_args(
            helper::DEFAULT_NFT,
            ["list", "table", "inet", TABLE],
        )
        .map_err(|e| NftError::ReadBack(describe_nft_error(&e)))?;
        let mut sets: Vec<(String, Vec<(IpAddr, IpAddr)>)> = Vec::new();
        let mut rules: Vec<(String, String)> = Vec::new();
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
                schema::NfListObject::Rule(r) => rules.push((
                    r.chain.to_string(),
                    r.comment.as_deref().unwrap_or("").to_owned(),
                )),
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
    serde_json::to_string_pretty(&ruleset.to_nftables())
}
