//! Checking rules, guardrails and expectations (`from`/`to` references, ports, what a rule can
//! reach), with the builder of `check.rs`.

use super::*;

impl<'s> Builder<'s> {
    pub(super) fn add_guardrail(&mut self, file: FileId, g: Spanned<syntax::GuardrailDecl>) {
        let g = g.into_inner();
        let loc = Loc::new(file, g.name.span());
        if let Some(prev) = self.guardrails.iter().find(|x| x.name == *g.name.get_ref()) {
            let d = Diagnostic::error(
                loc,
                format!("guardrail {:?} is declared twice", g.name.get_ref()),
            )
            .with_related(prev.loc.clone(), "first declared here");
            self.diags.push(d);
            return;
        }
        for k in &g.from_kinds {
            if !self.kinds.contains_key(k.get_ref()) {
                self.err(
                    file,
                    k.span(),
                    format!(
                        "unknown segment kind {:?}{}",
                        k.get_ref(),
                        self.kind_hint(k.get_ref())
                    ),
                );
            }
        }
        if g.from_kinds.is_empty() {
            self.err(file, g.name.span(), "a guardrail needs from_kinds");
        }
        let mut tenants = Vec::new();
        for t in &g.from_tenants {
            match self.tenant_id(t.get_ref()) {
                Some(id) => tenants.push(id),
                None => {
                    let hint = self.tenant_hint(t.get_ref());
                    self.err(file, t.span(), format!("no tenant {:?}{hint}", t.get_ref()));
                }
            }
        }
        let to = if g.to.iter().any(|t| t.get_ref() == "*") {
            GuardTarget::Everything
        } else {
            let mut list = Vec::new();
            for t in &g.to {
                match self.service_by_ref(t.get_ref(), None) {
                    Some(s) => list.push(s),
                    None if self.hides(t.get_ref()) => {}
                    None => {
                        let msg = self.unknown_service(t.get_ref(), None);
                        self.err(
                            file,
                            t.span(),
                            format!(
                                "{msg} (write a shared service's name, TENANT/SERVICE, or \"*\" for everything)"
                            ),
                        );
                    }
                }
            }
            if g.to.is_empty() {
                self.err(
                    file,
                    g.name.span(),
                    "a guardrail needs `to` (services or \"*\")",
                );
            }
            GuardTarget::Services(list)
        };
        self.guardrails.push(Guardrail {
            name: g.name.into_inner(),
            kinds: g.from_kinds.into_iter().map(Spanned::into_inner).collect(),
            tenants,
            to,
            why: g.why,
            loc,
        });
    }

    /// `dms` (shared), own `fileserver` from inside tenant `within`, or `tenant/service`.
    pub(super) fn service_by_ref(&self, name: &str, within: Option<TenantId>) -> Option<ServiceId> {
        self.names.service(name, within)
    }

    pub(super) fn may_use(&self, tenant: TenantId, service: &Service) -> bool {
        service.owner == Some(tenant)
            || match &service.export {
                Export::All => true,
                Export::Tenants(l) => l.contains(&tenant),
                Export::Nobody => false,
            }
    }

    /// Expands a group member list; records unknown names and cycles.
    pub(super) fn expand(
        &mut self,
        tenant: TenantId,
        name: &str,
        loc: &Loc,
        stack: &mut Vec<String>,
        out: &mut Vec<SegmentId>,
    ) {
        if let Some(id) = self.names.segment_of(tenant, name) {
            if !out.contains(&id) {
                out.push(id);
            }
            return;
        }
        let group = self.groups.get(&tenant).and_then(|g| g.get(name)).cloned();
        let Some((_, members)) = group else {
            let msg = if name.contains('/') {
                format!("{name:?}: a tenant's rules may name only its own segments and groups")
            } else {
                let own: Vec<String> = self
                    .segments
                    .iter()
                    .filter(|s| s.tenant == tenant)
                    .map(|s| s.name.clone())
                    .chain(
                        self.groups
                            .get(&tenant)
                            .into_iter()
                            .flat_map(|g| g.keys().cloned()),
                    )
                    .collect();
                match closest(name, own.iter().map(String::as_str)) {
                    Some(near) => {
                        format!("unknown segment or group {name:?}; did you mean {near:?}?")
                    }
                    None => format!("unknown segment or group {name:?}"),
                }
            };
            self.diags.push(Diagnostic::error(loc.clone(), msg));
            return;
        };
        if let Some(pos) = stack.iter().position(|s| s == name) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(name.to_owned());
            self.diags.push(Diagnostic::error(
                loc.clone(),
                format!("groups form a cycle: {}", cycle.join(" -> ")),
            ));
            return;
        }
        stack.push(name.to_owned());
        for (m, mloc) in members {
            self.expand(tenant, &m, &mloc, stack, out);
        }
        stack.pop();
    }

    pub(super) fn add_rule(&mut self, tid: TenantId, file: FileId, r: Spanned<syntax::RuleDecl>) {
        let r = r.into_inner();
        let loc = Loc::new(file, r.name.span());
        let key = (tid, r.name.get_ref().clone());
        if let Some(prev) = self.rule_names.get(&key) {
            let d = Diagnostic::error(
                loc,
                format!("rule {:?} is declared twice", r.name.get_ref()),
            )
            .with_related(prev.clone(), "first declared here");
            self.diags.push(d);
            return;
        }
        self.rule_names.insert(key, loc.clone());
        let errors_before = self.diags.iter().filter(|d| d.is_error()).count();
        let mut from = Vec::new();
        for f in &r.from {
            let floc = Loc::new(file, f.span());
            self.expand(tid, f.get_ref(), &floc, &mut Vec::new(), &mut from);
        }
        if r.from.is_empty() {
            self.err(file, r.name.span(), "the rule has an empty `from`");
        }
        let tname = self.tenants[tid.index()].name.clone();
        let mut to = Vec::new();
        // Services the rule names that their owner does not export to this tenant (any more):
        // the rule does not reach them, and says so in a warning, so that an owner can
        // withdraw an export without editing every user's file in the same change.
        let mut unexported = Vec::new();
        for t in &r.to {
            match self.service_by_ref(t.get_ref(), Some(tid)) {
                Some(s) if self.may_use(tid, &self.services[s.index()]) => {
                    if !to.contains(&s) {
                        to.push(s);
                    }
                }
                Some(s) => unexported.push((s, Loc::new(file, t.span()))),
                None if self.hides(t.get_ref()) => {}
                None => {
                    let msg = self.unknown_service(t.get_ref(), Some(tid));
                    self.err(file, t.span(), msg);
                }
            }
        }
        if r.to.is_empty() {
            self.err(file, r.name.span(), "the rule has an empty `to`");
        }
        let inactive = to.is_empty() && !unexported.is_empty();
        for (s, at) in &unexported {
            let service = &self.services[s.index()];
            let owner = match (service.tenant_declared, service.owner) {
                (true, Some(o)) => format!("its owner, tenant {:?},", self.tenants[o.index()].name),
                (false, Some(o)) => format!(
                    "its owner, tenant {:?} (in operator.toml),",
                    self.tenants[o.index()].name
                ),
                (_, None) => "the operator".to_owned(),
            };
            let consequence = if inactive {
                "the rule is inactive (it allows nothing)"
            } else {
                "the rule still allows its other services"
            };
            let d = Diagnostic::warning(
                at.clone(),
                format!(
                    "rule {:?} in {} does not reach {}: {owner} does not export it to tenant {tname:?} ({}); {consequence}",
                    r.name.get_ref(),
                    self.sources.cite(&loc),
                    self.display_service(*s),
                    self.sources.cite(&service.loc),
                ),
            )
            .with_related(
                service.loc.clone(),
                format!("its `export` would have to list {tname:?}"),
            );
            self.diags.push(d);
        }
        let ports = if r.ports.is_empty() {
            None
        } else {
            // The rule's services including those not exported to it: a withdrawn export is
            // one warning, not one more for each of the rule's ports.
            let named: Vec<ServiceId> = to
                .iter()
                .copied()
                .chain(unexported.iter().map(|(s, _)| *s))
                .collect();
            let foreign = named
                .iter()
                .all(|s| self.services[s.index()].loc.file != file);
            let mut list = Vec::new();
            for p in &r.ports {
                if let Some(range) = self.port(file, p) {
                    let offered = named.iter().any(|s| {
                        self.services[s.index()]
                            .ports
                            .iter()
                            .any(|sp| sp.intersect(&range).is_some())
                    });
                    if !offered && !named.is_empty() {
                        let shown: Vec<String> = named
                            .iter()
                            .flat_map(|s| self.services[s.index()].ports.iter())
                            .map(ToString::to_string)
                            .collect();
                        let msg = format!(
                            "no packet can match {range}: none of the rule's services offers it (they offer {})",
                            shown.join(", ")
                        );
                        // Another owner's service changing its ports must not break this
                        // file: then it is a warning, and the port allows nothing.
                        self.diags.push(if foreign {
                            Diagnostic::warning(Loc::new(file, p.span()), msg)
                        } else {
                            Diagnostic::error(Loc::new(file, p.span()), msg)
                        });
                    }
                    list.push(range);
                }
            }
            Some(list)
        };
        if inactive {
            return;
        }
        let rule = Rule {
            name: r.name.into_inner(),
            tenant: tid,
            from,
            to,
            ports,
            description: r.description,
            loc: loc.clone(),
        };
        let errors_after = self.diags.iter().filter(|d| d.is_error()).count();
        let names_broken = rule.to.iter().any(|s| self.broken_services.contains(s))
            || rule.from.iter().any(|s| self.broken_segments.contains(s));
        if errors_after == errors_before && !names_broken && !rule.to.is_empty() {
            self.check_rule_reach(&rule);
        }
        self.rules.push(rule);
    }

    /// `dms`, `tenant/service`: how admins write a service outside its owner's file.
    pub(super) fn display_service(&self, id: ServiceId) -> String {
        let s = &self.services[id.index()];
        match (s.tenant_declared, s.owner) {
            (true, Some(t)) => format!("{}/{}", self.tenants[t.index()].name, s.name),
            _ => s.name.clone(),
        }
    }

    /// "unknown service" with a hint: another tenant's service named without `TENANT/`, or
    /// the closest name the writer may use.
    pub(super) fn unknown_service(&self, name: &str, within: Option<TenantId>) -> String {
        let may_use = |s: &Service| within.is_none_or(|t| self.may_use(t, s));
        let whom = within.map_or(String::new(), |t| {
            format!(" to tenant {:?}", self.tenants[t.index()].name)
        });
        // `fileserver` where only other tenants have one: say whose.
        if !name.contains('/') {
            let others: Vec<ServiceId> = (0..self.services.len())
                .map(|i| ServiceId(i as u32))
                .filter(|s| {
                    let svc = &self.services[s.index()];
                    svc.tenant_declared && svc.name == name && svc.owner != within
                })
                .collect();
            if !others.is_empty() {
                let shown: Vec<String> = others
                    .iter()
                    .map(|s| {
                        let svc = &self.services[s.index()];
                        if may_use(svc) {
                            self.display_service(*s)
                        } else {
                            format!("{} (not exported{whom})", self.display_service(*s))
                        }
                    })
                    .collect();
                return format!(
                    "unknown service {name:?}: another tenant's service is written TENANT/SERVICE; did you mean {}?",
                    shown.join(" or ")
                );
            }
        }
        // Own services by their bare name, shared ones by theirs, other tenants' as T/SERVICE.
        let candidates: Vec<String> = (0..self.services.len())
            .map(|i| ServiceId(i as u32))
            .map(|s| {
                let svc = &self.services[s.index()];
                if svc.tenant_declared && svc.owner == within && within.is_some() {
                    svc.name.clone()
                } else {
                    self.display_service(s)
                }
            })
            .collect();
        match closest(name, candidates.iter().map(String::as_str)) {
            Some(near) => {
                let note = self
                    .service_by_ref(near, within)
                    .filter(|s| !may_use(&self.services[s.index()]))
                    .map_or(String::new(), |_| format!("; it is not exported{whom}"));
                format!("unknown service {name:?}: did you mean {near:?}{note}?")
            }
            None => format!("unknown service {name:?}"),
        }
    }

    /// A rule that no packet can match (no shared address family, no port left) is an error
    /// when the rule's own file is the reason, a warning when another file is (a guardrail of
    /// the operator, another owner's service): then the rule is inactive, and the policy stays
    /// usable until its writer catches up.
    pub(super) fn check_rule_reach(&mut self, rule: &Rule) {
        let mut matchable = false;
        let mut open = false;
        let mut shadowing: BTreeSet<GuardrailId> = BTreeSet::new();
        let mut partly_shadowed = false;
        for &seg in &rule.from {
            let segment = &self.segments[seg.index()];
            for &svc in &rule.to {
                let service = &self.services[svc.index()];
                if !share_family(&segment.prefixes, &service.addresses)
                    || rule.allowed_ports(service).is_empty()
                {
                    continue;
                }
                matchable = true;
                let guard = self
                    .guardrails
                    .iter()
                    .position(|g| g.applies_to_segment(segment) && g.protects(svc));
                match guard {
                    Some(g) => {
                        shadowing.insert(GuardrailId(g as u32));
                        partly_shadowed = true;
                    }
                    None => open = true,
                }
            }
        }
        if !matchable {
            let foreign = rule
                .to
                .iter()
                .any(|s| self.services[s.index()].loc.file != rule.loc.file);
            let msg = format!(
                "rule {:?} can match no packet: its segments and services share no address family (IPv4/IPv6) or port",
                rule.name
            );
            self.diags.push(if foreign {
                Diagnostic::warning(rule.loc.clone(), format!("{msg}; the rule is inactive"))
            } else {
                Diagnostic::error(rule.loc.clone(), msg)
            });
            return;
        }
        let names: Vec<String> = shadowing
            .iter()
            .map(|g| {
                let g = &self.guardrails[g.index()];
                format!("\"{}\" in {}", g.name, self.sources.cite(&g.loc))
            })
            .collect();
        let first = shadowing
            .first()
            .map(|g| self.guardrails[g.index()].loc.clone());
        let plural = if names.len() == 1 {
            "guardrail"
        } else {
            "guardrails"
        };
        if !open {
            let mut d = Diagnostic::warning(
                rule.loc.clone(),
                format!(
                    "rule {:?} in {} is inactive: {plural} {} {} every flow it allows",
                    rule.name,
                    self.sources.cite(&rule.loc),
                    names.join(", "),
                    if names.len() == 1 { "denies" } else { "deny" }
                ),
            );
            if let Some(g) = first {
                d = d.with_related(g, "the operator's guardrail");
            }
            self.diags.push(d);
        } else if partly_shadowed {
            let mut d = Diagnostic::warning(
                rule.loc.clone(),
                format!(
                    "rule {:?} in {} is partly overridden by {plural} {}: some of its segments cannot reach some of its services",
                    rule.name,
                    self.sources.cite(&rule.loc),
                    names.join(", ")
                ),
            );
            if let Some(g) = first {
                d = d.with_related(g, "the operator's guardrail");
            }
            self.diags.push(d);
        }
    }

    pub(super) fn add_expect(
        &mut self,
        within: Option<TenantId>,
        file: FileId,
        e: Spanned<syntax::ExpectDecl>,
    ) {
        let e = e.into_inner();
        let loc = Loc::new(
            file,
            e.from.span().start..e.verdict.span().end.max(e.from.span().end),
        );
        let allow = match e.verdict.get_ref().as_str() {
            "allow" => Some(true),
            "deny" => Some(false),
            other => {
                self.err(
                    file,
                    e.verdict.span(),
                    format!("verdict {other:?}: write \"allow\" or \"deny\""),
                );
                None
            }
        };
        let from = match resolve_from(e.from.get_ref(), within, &|n, w| self.segment_by_ref(n, w)) {
            Ok(f) => Some(f),
            Err(_) if self.hides(e.from.get_ref()) => None,
            Err(msg) => {
                let msg = match self.closest_segment(e.from.get_ref(), within) {
                    Some(near) => format!("{msg}; did you mean {near:?}?"),
                    None => msg,
                };
                self.err(file, e.from.span(), msg);
                None
            }
        };
        let to = match resolve_to(e.to.get_ref(), &|n| {
            self.service_by_ref(n, within)
                .map(|s| (s, self.services[s.index()].ports.clone()))
        }) {
            Ok(t) => {
                if let Some(hint) = to_port_hint(e.to.get_ref()) {
                    self.diags
                        .push(Diagnostic::warning(Loc::new(file, e.to.span()), hint));
                }
                Some(t)
            }
            Err(_) if self.hides(e.to.get_ref()) => None,
            Err(msg) => {
                let msg = match to_target(e.to.get_ref()) {
                    Some(target)
                        if target.parse::<IpAddr>().is_err()
                            && self.service_by_ref(target, within).is_none() =>
                    {
                        self.unknown_service(target, within)
                    }
                    _ => msg,
                };
                self.err(file, e.to.span(), msg);
                None
            }
        };
        if let (Some(from), Some(to), Some(allow)) = (from, to, allow) {
            self.expectations.push(Expectation {
                from,
                to,
                allow,
                text: format!("{} -> {}", e.from.get_ref(), e.to.get_ref()),
                loc,
            });
        }
    }

    /// The segment name closest to a misspelt `name`: bare for `within`'s own, else
    /// TENANT/SEGMENT.
    pub(super) fn closest_segment(&self, name: &str, within: Option<TenantId>) -> Option<String> {
        let names: Vec<String> = self
            .segments
            .iter()
            .map(|s| {
                if Some(s.tenant) == within && !name.contains('/') {
                    s.name.clone()
                } else {
                    format!("{}/{}", self.tenants[s.tenant.index()].name, s.name)
                }
            })
            .collect();
        closest(name.trim(), names.iter().map(String::as_str)).map(str::to_owned)
    }

    pub(super) fn segment_by_ref(&self, name: &str, within: Option<TenantId>) -> Option<SegmentId> {
        self.names.segment(name, within)
    }
}

/// The policy's names, hashed: a 50,000-rule policy names its segments and services hundreds of
/// thousands of times, and a scan of 2,000 segments per name took seconds.
#[derive(Debug, Default)]
pub(crate) struct NameIndex {
    tenants: HashMap<String, TenantId>,
    segments: HashMap<(TenantId, String), SegmentId>,
    /// Keyed by the declaring tenant (`None`: the operator file's shared services).
    services: HashMap<(Option<TenantId>, String), ServiceId>,
}

impl NameIndex {
    /// Records a name; the first of two equal names keeps it (the second is an error anyway).
    pub(super) fn add_tenant(&mut self, name: &str, id: TenantId) {
        self.tenants.entry(name.to_owned()).or_insert(id);
    }

    pub(super) fn add_segment(&mut self, tenant: TenantId, name: &str, id: SegmentId) {
        self.segments.entry((tenant, name.to_owned())).or_insert(id);
    }

    pub(super) fn add_service(&mut self, declared_by: Option<TenantId>, name: &str, id: ServiceId) {
        self.services
            .entry((declared_by, name.to_owned()))
            .or_insert(id);
    }

    pub(super) fn tenant(&self, name: &str) -> Option<TenantId> {
        self.tenants.get(name).copied()
    }

    pub(super) fn segment_of(&self, tenant: TenantId, name: &str) -> Option<SegmentId> {
        self.segments.get(&(tenant, name.to_owned())).copied()
    }

    /// `tenant/segment`, or a bare segment name of tenant `within`.
    pub(super) fn segment(&self, name: &str, within: Option<TenantId>) -> Option<SegmentId> {
        match name.split_once('/') {
            Some((t, s)) => self.segment_of(self.tenant(t)?, s),
            None => self.segment_of(within?, name),
        }
    }

    /// `tenant/service`; a bare name is tenant `within`'s own service, else a shared one.
    pub(super) fn service(&self, name: &str, within: Option<TenantId>) -> Option<ServiceId> {
        let get = |t: Option<TenantId>, n: &str| self.services.get(&(t, n.to_owned())).copied();
        match name.split_once('/') {
            Some((t, s)) => get(Some(self.tenant(t)?), s),
            None => within
                .and_then(|t| get(Some(t), name))
                .or_else(|| get(None, name)),
        }
    }
}

/// Resolves the `from` of a test or of `explain`: an address or a segment name.
pub(crate) fn resolve_from(
    text: &str,
    within: Option<TenantId>,
    segment: &dyn Fn(&str, Option<TenantId>) -> Option<SegmentId>,
) -> Result<FromSpec, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(FromSpec::Address(addr));
    }
    segment(text, within).map(FromSpec::Segment).ok_or_else(|| {
        if within.is_none() && !text.contains('/') {
            format!("unknown segment {text:?}: outside a tenant's file write TENANT/SEGMENT or an address")
        } else {
            format!("unknown segment {text:?} (write a segment, TENANT/SEGMENT or an address)")
        }
    })
}

/// Splits a test's or `explain`'s destination into its target (service or address) and its
/// port part: `dms:tcp/443`, `10.0.1.10:tcp/443`, `[fd00::10]:tcp/443`, `dms`.
fn split_to(text: &str) -> Result<(&str, Option<&str>), String> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: missing ']' after the IPv6 address"))?;
        let port = after.strip_prefix(':');
        if !after.is_empty() && port.is_none() {
            return Err(format!("{text:?}: expected ':PROTO/PORT' after ']'"));
        }
        Ok((addr, port))
    } else if text.parse::<IpAddr>().is_ok() {
        Ok((text, None))
    } else {
        Ok(match text.split_once(':') {
            Some((t, p)) => (t, Some(p)),
            None => (text, None),
        })
    }
}

/// The target (service name or address) of a test's or `explain`'s destination.
pub(crate) fn to_target(text: &str) -> Option<&str> {
    split_to(text).ok().map(|(t, _)| t)
}

/// A hint when a destination writes its port the other way round (`dms:443/tcp`): it is taken,
/// and the hint says to write `dms:tcp/443`.
pub(crate) fn to_port_hint(text: &str) -> Option<String> {
    let (target, port) = split_to(text).ok()?;
    let fixed = crate::flow::swapped(port?)?;
    let written = text.trim();
    let target = if written.starts_with('[') {
        format!("[{target}]")
    } else {
        target.to_owned()
    };
    Some(crate::flow::swapped_hint(
        written,
        &format!("{target}:{fixed}"),
    ))
}

/// Resolves `SERVICE[:PROTO/PORT]`, `SERVICE:icmp`, `ADDR:PROTO/PORT` or `[V6]:PROTO/PORT`
/// (and the old order `PORT/PROTO`, see [`to_port_hint`]).
pub(crate) fn resolve_to(text: &str, service: ServiceLookup<'_>) -> Result<ToSpec, String> {
    let text = text.trim();
    let (target, port_part) = split_to(text)?;
    if let Ok(addr) = target.parse::<IpAddr>() {
        let Some(port_part) = port_part else {
            let shown = if addr.is_ipv6() {
                format!("[{target}]")
            } else {
                target.to_owned()
            };
            return Err(format!(
                "{text:?}: give the protocol and port, like {shown}:tcp/443 or {shown}:icmp"
            ));
        };
        let (proto, port) = parse_port_part(port_part, &[])?;
        return Ok(ToSpec::Address { addr, proto, port });
    }
    let (id, ports) = service(target).ok_or_else(|| {
        format!("unknown service {target:?} (write SERVICE[:PROTO/PORT] or ADDR:PROTO/PORT)")
    })?;
    let (proto, port) = match port_part {
        Some(p) => parse_port_part(p, &ports)?,
        None => {
            let first = ports
                .first()
                .ok_or_else(|| format!("service {target:?} offers no ports"))?;
            (
                first.proto,
                first.lo.max(u16::from(first.proto != crate::Proto::Icmp)),
            )
        }
    };
    Ok(ToSpec::Service {
        service: id,
        proto,
        port,
    })
}

/// `tcp/443`, `udp/53`, `icmp`, or a bare `445` whose protocol the service's ports decide; the
/// old order `443/tcp` is taken too.
pub(super) fn parse_port_part(p: &str, offered: &[PortRange]) -> Result<(Proto, u16), String> {
    if p == "icmp" {
        return Ok((Proto::Icmp, 0));
    }
    let parse_proto = |s: &str| match s {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        _ => None,
    };
    let (num, proto) = match p.split_once('/') {
        Some((a, b)) => match (parse_proto(a), parse_proto(b)) {
            (Some(proto), _) => (b, Some(proto)),
            (None, Some(proto)) => (a, Some(proto)),
            (None, None) => {
                return Err(format!(
                    "{p:?}: write PROTO/PORT, like tcp/443 or udp/53 (or icmp)"
                ))
            }
        },
        None => (p, None),
    };
    let port: u16 = match num.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => n as u16,
        _ if num.contains('-') || num == "*" => {
            return Err(format!(
                "{p:?}: a test decides one packet: name one port, like tcp/443"
            ))
        }
        _ => return Err(format!("{p:?}: the port must be a number from 1 to 65535")),
    };
    let proto = match proto {
        Some(proto) => proto,
        None => {
            let protos: BTreeSet<Proto> = offered
                .iter()
                .filter(|r| r.lo <= port && port <= r.hi && r.proto != Proto::Icmp)
                .map(|r| r.proto)
                .collect();
            match protos.len() {
                1 => protos.into_iter().next().unwrap_or(Proto::Tcp),
                _ => {
                    return Err(format!(
                        "{p:?}: say which protocol, like tcp/{port} or udp/{port}"
                    ))
                }
            }
        }
    };
    Ok((proto, port))
}
