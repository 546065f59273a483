//! From a policy to the ruleset of one site: which packets of which segment may go where.

use super::*;

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
    // Checks the interface names too.
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
    // The rules that let `segments` in towards services at the site, led by the guardrails of
    // the segments that some rule lets in (the rest hit the default drop anyway).
    let mut guarded_allows = |segments: &[SegmentId]| {
        let mut guards = Vec::new();
        let mut allows = Vec::new();
        for &seg in segments {
            let before = allows.len();
            allow_rules(
                policy,
                &mut namer,
                seg,
                &by_segment[seg.index()],
                &at_site,
                &mut allows,
            );
            if allows.len() > before {
                guard_rules(policy, &mut namer, seg, Some(&at_site), &mut guards);
            }
        }
        guards.append(&mut allows);
        guards
    };
    let inbound = guarded_allows(&remote);
    // Between the site's own segments: the same rules and guardrails.
    let intrasite = guarded_allows(&local);

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

pub(super) fn quote_list(names: &[String]) -> String {
    match names {
        [one] => format!("\"{one}\""),
        many => {
            let q: Vec<String> = many.iter().map(|n| format!("\"{n}\"")).collect();
            format!("{{ {} }}", q.join(", "))
        }
    }
}
