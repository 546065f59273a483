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
                    format!("unknown segment kind {:?}", k.get_ref()),
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
                None => self.err(file, t.span(), format!("no tenant {:?}", t.get_ref())),
            }
        }
        let to = if g.to.iter().any(|t| t.get_ref() == "*") {
            GuardTarget::Everything
        } else {
            let mut list = Vec::new();
            for t in &g.to {
                match self.service_by_ref(t.get_ref(), None) {
                    Some(s) => list.push(s),
                    None => self.err(
                        file,
                        t.span(),
                        format!(
                            "unknown service {:?} (write a shared service's name, TENANT/SERVICE, or \"*\" for everything)",
                            t.get_ref()
                        ),
                    ),
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
        lookup_service(&self.tenants, &self.services, name, within)
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
        if let Some(i) = self
            .segments
            .iter()
            .position(|s| s.tenant == tenant && s.name == name)
        {
            let id = SegmentId(i as u32);
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
                format!("unknown segment or group {name:?}")
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
        if let Some(prev) = self
            .rules
            .iter()
            .find(|x| x.tenant == tid && x.name == *r.name.get_ref())
        {
            let d = Diagnostic::error(
                loc,
                format!("rule {:?} is declared twice", r.name.get_ref()),
            )
            .with_related(prev.loc.clone(), "first declared here");
            self.diags.push(d);
            return;
        }
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
        for t in &r.to {
            match self.service_by_ref(t.get_ref(), Some(tid)) {
                Some(s) if self.may_use(tid, &self.services[s.index()]) => {
                    if !to.contains(&s) {
                        to.push(s);
                    }
                }
                Some(_) => self.err(
                    file,
                    t.span(),
                    format!(
                        "service {:?} is not exported to tenant {tname:?}: its owner must list {tname:?} in `export` first",
                        t.get_ref()
                    ),
                ),
                None => self.err(file, t.span(), format!("unknown service {:?}", t.get_ref())),
            }
        }
        if r.to.is_empty() {
            self.err(file, r.name.span(), "the rule has an empty `to`");
        }
        let ports = if r.ports.is_empty() {
            None
        } else {
            let mut list = Vec::new();
            for p in &r.ports {
                match PortRange::parse(p.get_ref()) {
                    Ok(range) => {
                        let offered = to.iter().any(|s| {
                            self.services[s.index()]
                                .ports
                                .iter()
                                .any(|sp| sp.intersect(&range).is_some())
                        });
                        if !offered && !to.is_empty() {
                            self.err(
                                file,
                                p.span(),
                                format!(
                                    "no packet can match {range}: none of the rule's services offers it"
                                ),
                            );
                        }
                        list.push(range);
                    }
                    Err(msg) => self.err(file, p.span(), msg),
                }
            }
            Some(list)
        };
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
        if errors_after == errors_before && !names_broken {
            self.check_rule_reach(&rule);
        }
        self.rules.push(rule);
    }

    /// A rule that no packet can match (no shared address family, no port left) or whose every
    /// flow a guardrail denies is an error: the admin meant something else.
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
            self.diags.push(Diagnostic::error(
                rule.loc.clone(),
                format!(
                    "rule {:?} can match no packet: its segments and services share no address family (IPv4/IPv6) or port",
                    rule.name
                ),
            ));
            return;
        }
        let names: Vec<String> = shadowing
            .iter()
            .map(|g| {
                let g = &self.guardrails[g.index()];
                format!("\"{}\" ({})", g.name, self.sources.cite(&g.loc))
            })
            .collect();
        if !open {
            self.diags.push(Diagnostic::error(
                rule.loc.clone(),
                format!(
                    "rule {:?} is shadowed by guardrail {}: every flow it allows is denied by the operator",
                    rule.name,
                    names.join(", ")
                ),
            ));
        } else if partly_shadowed {
            self.diags.push(Diagnostic::warning(
                rule.loc.clone(),
                format!(
                    "rule {:?} is partly overridden by guardrail {}: some of its segments cannot reach some of its services",
                    rule.name,
                    names.join(", ")
                ),
            ));
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
            Err(msg) => {
                self.err(file, e.from.span(), msg);
                None
            }
        };
        let to = match resolve_to(e.to.get_ref(), &|n| {
            self.service_by_ref(n, within)
                .map(|s| (s, self.services[s.index()].ports.clone()))
        }) {
            Ok(t) => Some(t),
            Err(msg) => {
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

    pub(super) fn segment_by_ref(&self, name: &str, within: Option<TenantId>) -> Option<SegmentId> {
        lookup_segment(&self.tenants, &self.segments, name, within)
    }
}

pub(super) fn tenant_index(tenants: &[Tenant], name: &str) -> Option<TenantId> {
    tenants
        .iter()
        .position(|t| t.name == name)
        .map(|i| TenantId(i as u32))
}

/// `tenant/segment`, or a bare segment name of tenant `within`.
pub(super) fn lookup_segment(
    tenants: &[Tenant],
    segments: &[Segment],
    name: &str,
    within: Option<TenantId>,
) -> Option<SegmentId> {
    let (tenant, seg) = match name.split_once('/') {
        Some((t, s)) => (tenant_index(tenants, t)?, s),
        None => (within?, name),
    };
    segments
        .iter()
        .position(|s| s.tenant == tenant && s.name == seg)
        .map(|i| SegmentId(i as u32))
}

/// `tenant/service`; a bare name is tenant `within`'s own service, else a shared one.
pub(super) fn lookup_service(
    tenants: &[Tenant],
    services: &[Service],
    name: &str,
    within: Option<TenantId>,
) -> Option<ServiceId> {
    let find = |pred: &dyn Fn(&Service) -> bool| {
        services.iter().position(pred).map(|i| ServiceId(i as u32))
    };
    let own =
        |t: TenantId, n: &str| find(&|x| x.tenant_declared && x.owner == Some(t) && x.name == n);
    match name.split_once('/') {
        Some((t, s)) => own(tenant_index(tenants, t)?, s),
        None => within
            .and_then(|t| own(t, name))
            .or_else(|| find(&|x| !x.tenant_declared && x.name == name)),
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

/// Resolves `SERVICE[:PORT[/PROTO]]`, `SERVICE:icmp`, `ADDR:PORT/PROTO` or `[V6]:PORT/PROTO`.
pub(crate) fn resolve_to(text: &str, service: ServiceLookup<'_>) -> Result<ToSpec, String> {
    let text = text.trim();
    let (target, port_part) = if let Some(rest) = text.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: missing ']' after the IPv6 address"))?;
        let port = after.strip_prefix(':');
        if !after.is_empty() && port.is_none() {
            return Err(format!("{text:?}: expected ':PORT/PROTO' after ']'"));
        }
        (addr, port)
    } else if text.parse::<IpAddr>().is_ok() {
        (text, None)
    } else {
        match text.split_once(':') {
            Some((t, p)) => (t, Some(p)),
            None => (text, None),
        }
    };
    if let Ok(addr) = target.parse::<IpAddr>() {
        let Some(port_part) = port_part else {
            return Err(format!(
                "{text:?}: give the port and protocol, like {target}:443/tcp (IPv6: [{target}]:443/tcp) or {target}:icmp"
            ));
        };
        let (proto, port) = parse_port_part(port_part, &[])?;
        return Ok(ToSpec::Address { addr, proto, port });
    }
    let (id, ports) = service(target).ok_or_else(|| {
        format!("unknown service {target:?} (write SERVICE[:PORT/PROTO] or ADDR:PORT/PROTO)")
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

/// `443/tcp`, `53/udp`, `icmp`, or a bare `445` whose protocol the service's ports decide.
pub(super) fn parse_port_part(p: &str, offered: &[PortRange]) -> Result<(Proto, u16), String> {
    if p == "icmp" {
        return Ok((Proto::Icmp, 0));
    }
    let (num, proto) = match p.split_once('/') {
        Some((n, pr)) => (n, Some(pr)),
        None => (p, None),
    };
    let port: u16 = match num.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => n as u16,
        _ => return Err(format!("{p:?}: the port must be a number from 1 to 65535")),
    };
    let proto = match proto {
        Some("tcp") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        Some(other) => return Err(format!("{p:?}: unknown protocol {other:?} (tcp or udp)")),
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
                        "{p:?}: say which protocol, like {port}/tcp or {port}/udp"
                    ))
                }
            }
        }
    };
    Ok((proto, port))
}
