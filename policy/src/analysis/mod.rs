//! What admins ask of a policy offline: do the inline tests pass, why is this flow allowed or
//! denied, who can reach this service, what can this segment reach, and what does a change
//! allow or deny that the old version did not.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::flow::{Origin, PacketMeta, PortRange, Proto};
use crate::model::{
    closest, resolve_from, resolve_to, share_family, to_port_hint, to_target, Binding, FromSpec,
    Policy, SegmentId, ServiceId, SiteId, ToSpec,
};
use crate::oracle::{decide, decide_arrival, Decider, Decision};

mod diff;

pub use diff::{diff, version_finding, FlowChange};

/// One concrete packet a test or an explanation was decided on — or, where the destination
/// has no address in the source's family, the deny that stands for "no such packet".
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The source address (a host of the segment, when a segment was named).
    pub src: IpAddr,
    /// The destination as shown: `10.1.0.10:tcp/443`, `[fd00:1::10]:tcp/443`, or the service
    /// with its port when it has no address in the source's family (`dms:tcp/443`).
    pub dst: String,
    /// The packet decided; `None` when the destination has no address in the source's family.
    pub packet: Option<PacketMeta>,
    pub decision: Decision,
    /// `rule "x", tenants/a.toml:12`, `default deny: …`, `the service has no IPv6 address`.
    pub reason: String,
    /// Where the flow runs when both ends are at one site: between two of its segments
    /// (the appliance enforces it) or inside one (it never passes the appliance).
    pub note: Option<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}: {} ({})",
            family(self.src),
            self.src,
            self.dst,
            if self.decision.allow { "allow" } else { "deny" },
            self.reason
        )?;
        match &self.note {
            Some(n) => write!(f, "; {n}"),
            None => Ok(()),
        }
    }
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// `tcp/443`, `icmp`: the port as the policy writes it.
fn port_text(proto: Proto, port: u16) -> String {
    match proto {
        Proto::Icmp => "icmp".to_owned(),
        p => format!("{p}/{port}"),
    }
}

/// `10.1.0.10:tcp/443`, `[fd00::10]:tcp/443`.
fn dst_text(dst: IpAddr, proto: Proto, port: u16) -> String {
    match dst {
        IpAddr::V4(a) => format!("{a}:{}", port_text(proto, port)),
        IpAddr::V6(a) => format!("[{a}]:{}", port_text(proto, port)),
    }
}

/// What stands for `from -> to` in one address family.
#[derive(Debug, Clone)]
enum Probe {
    Packet(PacketMeta),
    /// The destination has no address in the source's family: no such packet exists, so the
    /// flow is denied — said plainly, not as an error.
    NoAddress {
        src: IpAddr,
        dst: String,
        why: String,
    },
}

/// The probes for `from -> to`: one packet per address family both ends have. With
/// `every_source_family`, or when the two share no family at all, each family of the source
/// that the destination lacks gets a [`Probe::NoAddress`].
fn probes_for(
    policy: &Policy,
    from: &FromSpec,
    to: &ToSpec,
    every_source_family: bool,
) -> Vec<Probe> {
    let sources: Vec<IpAddr> = match from {
        FromSpec::Address(a) => vec![*a],
        FromSpec::Segment(s) => host_per_family(&policy.segments[s.index()].prefixes),
    };
    let (targets, proto, port, what) = match to {
        ToSpec::Address { addr, proto, port } => (vec![*addr], *proto, *port, None),
        ToSpec::Service {
            service,
            proto,
            port,
        } => (
            first_per_family(&policy.services[service.index()].addresses),
            *proto,
            *port,
            Some(policy.service_name(*service)),
        ),
    };
    let shared = sources
        .iter()
        .any(|s| targets.iter().any(|d| d.is_ipv4() == s.is_ipv4()));
    let mut probes = Vec::new();
    for s in &sources {
        match targets.iter().find(|d| d.is_ipv4() == s.is_ipv4()) {
            Some(d) => probes.push(Probe::Packet(PacketMeta::new(*s, *d, proto, port))),
            None if every_source_family || !shared => {
                let fam = family(*s);
                let (dst, why) = match &what {
                    Some(name) => (
                        format!("{name}:{}", port_text(proto, port)),
                        format!("the service has no {fam} address"),
                    ),
                    None => (
                        targets
                            .first()
                            .map_or_else(String::new, |d| dst_text(*d, proto, port)),
                        format!(
                            "the source is {fam} and the destination is not: no packet has both"
                        ),
                    ),
                };
                probes.push(Probe::NoAddress { src: *s, dst, why });
            }
            None => {}
        }
    }
    probes
}

/// One address per family that the prefixes have: the first address of the first prefix of
/// that family (a service's own address).
fn first_per_family(nets: &[IpNet]) -> Vec<IpAddr> {
    let v4 = nets.iter().find(|n| n.addr().is_ipv4());
    let v6 = nets.iter().find(|n| n.addr().is_ipv6());
    v4.into_iter().chain(v6).map(IpNet::network).collect()
}

/// A host of the segment per family: the first usable address of its first prefix of that
/// family (10.20.1.1 for 10.20.1.0/24, not the network address no host has).
fn host_per_family(nets: &[IpNet]) -> Vec<IpAddr> {
    let v4 = nets.iter().find(|n| n.addr().is_ipv4());
    let v6 = nets.iter().find(|n| n.addr().is_ipv6());
    v4.into_iter().chain(v6).map(first_host).collect()
}

fn first_host(net: &IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) if n.prefix_len() <= 30 => {
            IpAddr::V4(std::net::Ipv4Addr::from(u32::from(n.network()) + 1))
        }
        IpNet::V6(n) if n.prefix_len() <= 126 => {
            IpAddr::V6(std::net::Ipv6Addr::from(u128::from(n.network()) + 1))
        }
        other => other.network(),
    }
}

/// The result of one inline test in one address family.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub passed: bool,
    /// `tenants/x.toml:40: staff -> dms:443/tcp (IPv4): expected allow, got deny (…)`.
    pub line: String,
}

#[derive(Debug, Clone, Default)]
pub struct TestReport {
    pub outcomes: Vec<TestOutcome>,
    pub passed: usize,
    pub failed: usize,
}

/// Runs every `[[expect]]` of the policy against the reference evaluator. A test from a
/// segment to a service runs once per address family both have: the same intent must get the
/// same answer over IPv4 and IPv6.
pub fn run_tests(policy: &Policy) -> TestReport {
    let mut report = TestReport::default();
    for e in &policy.expectations {
        let at = policy.sources.cite(&e.loc);
        let want = if e.allow { "allow" } else { "deny" };
        for probe in probes_for(policy, &e.from, &e.to, false) {
            let (fam, allow, reason) = match &probe {
                Probe::Packet(p) => {
                    let d = decide(policy, Origin::Address, p);
                    (family(p.src), d.allow, policy.describe(d.by))
                }
                Probe::NoAddress { src, why, .. } => (family(*src), false, why.clone()),
            };
            let got = if allow { "allow" } else { "deny" };
            let passed = allow == e.allow;
            let line = if passed {
                format!("ok   {at}: {} ({fam}): {got} ({reason})", e.text)
            } else {
                format!(
                    "FAIL {at}: {} ({fam}): expected {want}, got {got} ({reason})",
                    e.text
                )
            };
            if passed {
                report.passed += 1;
            } else {
                report.failed += 1;
            }
            report.outcomes.push(TestOutcome { passed, line });
        }
    }
    report
}

/// `explain --from ADDR|SEGMENT --to ADDR|SERVICE[:PORT/PROTO]`: the decision per address family
/// and what made it.
pub fn explain(policy: &Policy, from: &str, to: &str) -> Result<Vec<Explanation>, String> {
    explain_at(policy, from, to, None)
}

/// Where a flow arrived at a site's appliance (`explain --vlan N` or `--port IF`, with
/// `--site TENANT/SITE`, else the site of the source address). `--site` alone names the town
/// hall whose LAN numbering the addresses are in (a segment's `local` prefixes): they are
/// translated to their unique addresses first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub site: Option<String>,
    pub binding: Option<Binding>,
}

/// [`explain`], and with `arrival` as the appliance of the site decides a packet that came in
/// on that VLAN or port: a source that does not belong to the segment arriving there is
/// dropped as `segment_spoof`, whatever the rules say.
pub fn explain_at(
    policy: &Policy,
    from: &str,
    to: &str,
    arrival: Option<&Arrival>,
) -> Result<Vec<Explanation>, String> {
    let mut from = resolve_from(from, None, &|n, _| find_segment_anywhere(policy, n))
        .map_err(|e| with_hint(e, from, segment_names(policy)))?;
    let mut to = resolve_to(to, &|n| {
        find_service_anywhere(policy, n).map(|s| (s, policy.services[s.index()].ports.clone()))
    })
    .map_err(|e| match to_target(to) {
        Some(t) if find_service_anywhere(policy, t).is_none() => {
            with_hint(e, t, service_names(policy))
        }
        _ => e,
    })?;
    let named_site = match arrival.and_then(|a| a.site.as_deref()) {
        Some(name) => Some(policy.find_site(name)?),
        None => None,
    };
    // Addresses in the town hall's own numbering become the district's unique ones.
    let mut translated: Vec<String> = Vec::new();
    if let Some(site) = named_site {
        let mut unique = |a: &mut IpAddr| {
            let u = policy.unique_of(site, *a);
            if u != *a {
                translated.push(format!(
                    "{a} at {} is {u} in the district",
                    site_name(policy, site)
                ));
                *a = u;
            }
        };
        if let FromSpec::Address(a) = &mut from {
            unique(a);
        }
        if let ToSpec::Address { addr, .. } = &mut to {
            unique(addr);
        }
    }
    let translated = (!translated.is_empty()).then(|| translated.join(", "));
    let with_translation = |note: Option<String>| match (&translated, note) {
        (Some(t), Some(n)) => Some(format!("{t}; {n}")),
        (Some(t), None) => Some(t.clone()),
        (None, n) => n,
    };
    let probes = probes_for(policy, &from, &to, true);
    let mut out = Vec::new();
    for probe in probes {
        let packet = match probe {
            Probe::Packet(p) => p,
            Probe::NoAddress { src, dst, why } => {
                out.push(Explanation {
                    src,
                    dst,
                    packet: None,
                    decision: Decision::deny(Decider::DefaultDeny),
                    reason: why,
                    note: None,
                });
                continue;
            }
        };
        let proto = Proto::from_ip_number(packet.ip_proto).unwrap_or(Proto::Tcp);
        let shown = dst_text(packet.dst, proto, packet.dport);
        let note = with_translation(flow_note(policy, &packet));
        let Some(binding) = arrival.and_then(|a| a.binding.as_ref()) else {
            let decision = decide(policy, Origin::Address, &packet);
            out.push(Explanation {
                src: packet.src,
                dst: shown,
                packet: Some(packet),
                decision,
                reason: policy.describe(decision.by),
                note,
            });
            continue;
        };
        let site = named_site.or_else(|| policy.site_of(packet.src)).ok_or_else(|| {
            format!(
                "{} lies at no site: name the site whose appliance it arrives at with --site TENANT/SITE",
                packet.src
            )
        })?;
        let decision = decide_arrival(policy, site, binding, &packet);
        let reason = if decision.by == Decider::SegmentSpoof {
            spoof_reason(policy, site, binding, &packet)
        } else {
            policy.describe(decision.by)
        };
        out.push(Explanation {
            src: packet.src,
            dst: shown,
            packet: Some(packet),
            decision,
            reason,
            note,
        });
    }
    Ok(out)
}

/// `MESSAGE; did you mean "NAME"?` when a name is close to what was written.
fn with_hint(message: String, written: &str, names: Vec<String>) -> String {
    match closest(written.trim(), names.iter().map(String::as_str)) {
        Some(near) => format!("{message}; did you mean {near:?}?"),
        None => message,
    }
}

fn segment_names(policy: &Policy) -> Vec<String> {
    (0..policy.segments.len())
        .map(|i| policy.segment_name(SegmentId(i as u32)))
        .collect()
}

fn service_names(policy: &Policy) -> Vec<String> {
    (0..policy.services.len())
        .map(|i| policy.service_name(ServiceId(i as u32)))
        .collect()
}

/// A hint for a destination written the other way round (`dms:443/tcp`): `explain` takes it
/// and says how to write it (`dms:tcp/443`).
pub fn destination_hint(to: &str) -> Option<String> {
    to_port_hint(to)
}

fn site_name(policy: &Policy, site: SiteId) -> String {
    let s = &policy.sites[site.index()];
    format!("{}/{}", policy.tenants[s.tenant.index()].name, s.name)
}

/// Why the appliance of `site` drops `packet` arriving on `arrived` as `segment_spoof`.
fn spoof_reason(policy: &Policy, site: SiteId, arrived: &Binding, packet: &PacketMeta) -> String {
    let there = match policy.segment_on(site, arrived) {
        Some(seg) => format!("the segment of {arrived} is {}", policy.segment_name(seg)),
        None => format!(
            "no segment of {} arrives on {arrived}",
            site_name(policy, site)
        ),
    };
    let own = match policy.segment_of(packet.src) {
        Some(seg) => {
            let segment = &policy.segments[seg.index()];
            match (&segment.binding, segment.site) {
                (Some(b), Some(s)) if s == site => {
                    format!(
                        "{} belongs to {} on {b}",
                        packet.src,
                        policy.segment_name(seg)
                    )
                }
                _ => format!(
                    "{} belongs to {}, which is not at {}",
                    packet.src,
                    policy.segment_name(seg),
                    site_name(policy, site)
                ),
            }
        }
        None => format!("{} is in no segment", packet.src),
    };
    format!(
        "dropped as segment_spoof at {}: {own}, but {there}",
        site_name(policy, site)
    )
}

/// For a flow whose ends are both at one site: between which of its segments it runs.
fn flow_note(policy: &Policy, packet: &PacketMeta) -> Option<String> {
    let src = policy.segment_of(packet.src)?;
    let site = policy.segments[src.index()].site?;
    let at_site = policy.sites[site.index()]
        .prefixes
        .iter()
        .any(|p| p.contains(&packet.dst));
    if !at_site {
        return None;
    }
    let binding = |seg: SegmentId| {
        policy.segments[seg.index()]
            .binding
            .as_ref()
            .map_or_else(String::new, ToString::to_string)
    };
    Some(match policy.segment_of(packet.dst) {
        Some(dst) if dst == src => format!(
            "inside segment {}: such traffic does not pass the appliance, so no verdict is enforced on it",
            policy.segment_name(src)
        ),
        Some(dst) => format!(
            "between two segments of {} ({} on {} -> {} on {}), enforced by its appliance",
            site_name(policy, site),
            policy.segment_name(src),
            binding(src),
            policy.segment_name(dst),
            binding(dst)
        ),
        None => format!(
            "within site {} (the destination is in none of its segments)",
            site_name(policy, site)
        ),
    })
}

/// A segment by `tenant/segment`, or by a bare name that only one tenant uses.
pub(crate) fn find_segment_anywhere(policy: &Policy, name: &str) -> Option<SegmentId> {
    if name.contains('/') {
        return policy.find_segment(name, None);
    }
    let mut hits = policy
        .segments
        .iter()
        .enumerate()
        .filter(|(_, s)| s.name == name);
    match (hits.next(), hits.next()) {
        (Some((i, _)), None) => Some(SegmentId(i as u32)),
        _ => None,
    }
}

/// A service by display name, or a tenant's service by a bare name only one tenant uses.
pub(crate) fn find_service_anywhere(policy: &Policy, name: &str) -> Option<ServiceId> {
    if let Some(s) = policy.find_service(name, None) {
        return Some(s);
    }
    let mut hits = policy
        .services
        .iter()
        .enumerate()
        .filter(|(_, s)| s.name == name);
    match (hits.next(), hits.next()) {
        (Some((i, _)), None) => Some(ServiceId(i as u32)),
        _ => None,
    }
}

/// One allowed (or guardrail-blocked) segment → service relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub segment: String,
    pub service: String,
    pub ports: Vec<PortRange>,
    /// The rules that allow it, or the guardrail that blocks it.
    pub by: String,
    pub blocked: bool,
    /// The service lies at the segment's own site: its appliance enforces this between two
    /// of the site's segments.
    pub within_site: bool,
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<String> = self.ports.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} -> {} {}{}{} ({})",
            self.segment,
            self.service,
            ports.join(","),
            if self.blocked { " BLOCKED" } else { "" },
            if self.within_site {
                " [within its site]"
            } else {
                ""
            },
            self.by
        )
    }
}

/// The ports each segment may reach each service on (normalised; what a guardrail blocks is
/// left out): what `diff` compares, without the rules' names and places that `query` shows.
fn flow_table(policy: &Policy) -> HashMap<(SegmentId, ServiceId), Vec<PortRange>> {
    let mut table: HashMap<(SegmentId, ServiceId), Vec<PortRange>> = HashMap::new();
    for rule in &policy.rules {
        for &svc in &rule.to {
            let service = &policy.services[svc.index()];
            let ports = rule.allowed_ports(service);
            for &seg in &rule.from {
                let segment = &policy.segments[seg.index()];
                if !share_family(&segment.prefixes, &service.addresses) {
                    continue;
                }
                table.entry((seg, svc)).or_default().extend(&ports);
            }
        }
    }
    table.retain(|(seg, svc), _| {
        let segment = &policy.segments[seg.index()];
        !policy
            .guardrails
            .iter()
            .any(|g| g.applies_to_segment(segment) && g.protects(*svc))
    });
    for ports in table.values_mut() {
        *ports = normalise(std::mem::take(ports));
    }
    table
}

/// Allowed ports per (segment, service), with the rules and guardrails that decide them.
fn reach_table(policy: &Policy) -> BTreeMap<(SegmentId, ServiceId), Reach> {
    let mut table: BTreeMap<(SegmentId, ServiceId), (Vec<PortRange>, Vec<String>)> =
        BTreeMap::new();
    for rule in &policy.rules {
        for &svc in &rule.to {
            let service = &policy.services[svc.index()];
            for &seg in &rule.from {
                let segment = &policy.segments[seg.index()];
                if !share_family(&segment.prefixes, &service.addresses) {
                    continue;
                }
                let e = table.entry((seg, svc)).or_default();
                e.0.extend(rule.allowed_ports(service));
                e.1.push(format!(
                    "rule \"{}\", {}",
                    rule.name,
                    policy.sources.cite(&rule.loc)
                ));
            }
        }
    }
    table
        .into_iter()
        .map(|((seg, svc), (ports, rules))| {
            let segment = &policy.segments[seg.index()];
            let guard = policy
                .guardrails
                .iter()
                .find(|g| g.applies_to_segment(segment) && g.protects(svc));
            let (blocked, by) = match guard {
                Some(g) => (
                    true,
                    format!("guardrail \"{}\", {}", g.name, policy.sources.cite(&g.loc)),
                ),
                None => (false, rules.join("; ")),
            };
            let within_site = segment.site.is_some_and(|site| {
                policy.services[svc.index()].addresses.iter().any(|a| {
                    policy.sites[site.index()]
                        .prefixes
                        .iter()
                        .any(|p| p.contains(a))
                })
            });
            (
                (seg, svc),
                Reach {
                    segment: policy.segment_name(seg),
                    service: policy.service_name(svc),
                    ports: normalise(ports),
                    by,
                    blocked,
                    within_site,
                },
            )
        })
        .collect()
}

/// Who can reach service `name` (and who a rule names but a guardrail blocks).
pub fn query_service(policy: &Policy, name: &str) -> Result<Vec<Reach>, String> {
    let svc = find_service_anywhere(policy, name).ok_or_else(|| {
        with_hint(
            format!("unknown service {name:?} (write SERVICE or TENANT/SERVICE)"),
            name,
            service_names(policy),
        )
    })?;
    Ok(reach_table(policy)
        .into_iter()
        .filter(|((_, s), _)| *s == svc)
        .map(|(_, r)| r)
        .collect())
}

/// What segment `name` can reach.
pub fn query_segment(policy: &Policy, name: &str) -> Result<Vec<Reach>, String> {
    let seg = find_segment_anywhere(policy, name).ok_or_else(|| {
        with_hint(
            format!("unknown segment {name:?} (write TENANT/SEGMENT)"),
            name,
            segment_names(policy),
        )
    })?;
    Ok(reach_table(policy)
        .into_iter()
        .filter(|((s, _), _)| *s == seg)
        .map(|(_, r)| r)
        .collect())
}

/// Sorted, merged, non-overlapping ranges.
pub(crate) fn normalise(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.proto == r.proto && u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                last.hi = last.hi.max(r.hi);
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::diff::subtract;
    use super::*;

    fn r(proto: Proto, lo: u16, hi: u16) -> PortRange {
        PortRange { proto, lo, hi }
    }

    #[test]
    fn port_set_difference() {
        let a = normalise(vec![r(Proto::Tcp, 1, 100), r(Proto::Udp, 53, 53)]);
        let b = normalise(vec![r(Proto::Tcp, 10, 20), r(Proto::Tcp, 90, 200)]);
        assert_eq!(
            subtract(&a, &b),
            vec![
                r(Proto::Tcp, 1, 9),
                r(Proto::Tcp, 21, 89),
                r(Proto::Udp, 53, 53)
            ]
        );
        assert!(subtract(&b, &b).is_empty());
        assert_eq!(
            normalise(vec![
                r(Proto::Tcp, 5, 9),
                r(Proto::Tcp, 1, 4),
                r(Proto::Tcp, 8, 12)
            ]),
            vec![r(Proto::Tcp, 1, 12)]
        );
    }
}
