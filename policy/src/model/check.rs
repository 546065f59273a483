//! Checking the operator file and the tenants' fragments into a [`Policy`]: names, prefixes
//! (no overlaps), sites, segments, services and exports. Rules, guardrails and expectations
//! are checked in `rules.rs` with the same builder.

use super::*;

pub(super) fn is_valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.len() <= 63
}

/// Parses `10.0.0.0/8`, `fd00::/48` or a plain address (a host prefix); rejects host bits.
pub(crate) fn parse_prefix(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = s.parse().map_err(|_| {
        format!("{s:?} is not an IP address or prefix (like 10.1.2.0/24 or fd00:1::/64)")
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Whether the two lists have a prefix of the same address family (IPv4 or IPv6).
pub(crate) fn share_family(a: &[IpNet], b: &[IpNet]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| x.addr().is_ipv4() == y.addr().is_ipv4()))
}

pub(crate) fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Where each checked prefix came from, to name both places when two overlap.
pub(super) struct PrefixOwner {
    pub(super) net: IpNet,
    pub(super) what: String,
    pub(super) loc: Loc,
}

/// A tenant's groups: name → (where declared, members with their places).
pub(super) type GroupTable = BTreeMap<String, (Loc, Vec<(String, Loc)>)>;

/// Finds a service by name and returns it with its ports.
pub(super) type ServiceLookup<'a> = &'a dyn Fn(&str) -> Option<(ServiceId, Vec<PortRange>)>;

pub(super) struct Builder<'s> {
    pub(super) sources: &'s SourceMap,
    pub(super) diags: Vec<Diagnostic>,
    pub(super) header: Option<(String, u64, Vec<String>)>,
    pub(super) kinds: BTreeMap<String, Loc>,
    pub(super) tenants: Vec<Tenant>,
    pub(super) sites: Vec<Site>,
    pub(super) segments: Vec<Segment>,
    pub(super) services: Vec<Service>,
    pub(super) rules: Vec<Rule>,
    pub(super) guardrails: Vec<Guardrail>,
    pub(super) expectations: Vec<Expectation>,
    /// Site, data-centre and home-office prefixes of all tenants: none may overlap another.
    pub(super) claimed: Vec<PrefixOwner>,
    pub(super) fragment_of: HashMap<TenantId, Loc>,
    /// Operator-file items whose references are resolved after all fragments are in.
    pub(super) pending_guardrails: Vec<(FileId, Spanned<syntax::GuardrailDecl>)>,
    pub(super) pending_operator_expects: Vec<(FileId, Spanned<syntax::ExpectDecl>)>,
    pub(super) pending_exports: Vec<(ServiceId, FileId, Vec<Name>)>,
    pub(super) pending_rules: Vec<(TenantId, FileId, Spanned<syntax::RuleDecl>)>,
    pub(super) pending_expects: Vec<(TenantId, FileId, Spanned<syntax::ExpectDecl>)>,
    pub(super) groups: HashMap<TenantId, GroupTable>,
    /// Services and segments whose own declaration had errors: rules naming them are not
    /// checked for reach, so one typo does not cascade into more errors.
    pub(super) broken_services: BTreeSet<ServiceId>,
    pub(super) broken_segments: BTreeSet<SegmentId>,
}

impl<'s> Builder<'s> {
    pub(super) fn new(sources: &'s SourceMap) -> Self {
        Builder {
            sources,
            diags: Vec::new(),
            header: None,
            kinds: BTreeMap::new(),
            tenants: Vec::new(),
            sites: Vec::new(),
            segments: Vec::new(),
            services: Vec::new(),
            rules: Vec::new(),
            guardrails: Vec::new(),
            expectations: Vec::new(),
            claimed: Vec::new(),
            fragment_of: HashMap::new(),
            pending_guardrails: Vec::new(),
            pending_operator_expects: Vec::new(),
            pending_exports: Vec::new(),
            pending_rules: Vec::new(),
            pending_expects: Vec::new(),
            groups: HashMap::new(),
            broken_services: BTreeSet::new(),
            broken_segments: BTreeSet::new(),
        }
    }

    pub(super) fn error_count(&self) -> usize {
        self.diags.iter().filter(|d| d.is_error()).count()
    }

    pub(super) fn err(
        &mut self,
        file: FileId,
        span: std::ops::Range<usize>,
        msg: impl Into<String>,
    ) {
        self.diags
            .push(Diagnostic::error(Loc::new(file, span), msg));
    }

    pub(super) fn toml_error(&mut self, file: FileId, e: toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim().replace('\n', "; ");
        self.err(file, span, format!("cannot read this file: {msg}"));
    }

    pub(super) fn name_ok(&mut self, file: FileId, name: &Name, what: &str) -> bool {
        if is_valid_name(name.get_ref()) {
            true
        } else {
            self.err(
                file,
                name.span(),
                format!(
                    "{what} name {:?} is not valid: use letters, digits, '-', '_' or '.', starting with a letter or digit, at most 63 characters",
                    name.get_ref()
                ),
            );
            false
        }
    }

    pub(super) fn prefixes(
        &mut self,
        file: FileId,
        list: &[Spanned<String>],
        what: &str,
    ) -> Vec<IpNet> {
        let mut out = Vec::new();
        for p in list {
            match parse_prefix(p.get_ref()) {
                Ok(net) => out.push(net),
                Err(msg) => self.err(file, p.span(), format!("{what}: {msg}")),
            }
        }
        out
    }

    /// Records `net` as claimed; an overlap with an earlier claim is an error naming both.
    pub(super) fn claim(&mut self, net: IpNet, what: String, loc: Loc) {
        if let Some(prev) = self.claimed.iter().find(|c| nets_overlap(&c.net, &net)) {
            let d = Diagnostic::error(
                loc.clone(),
                format!(
                    "{net} of {what} overlaps {} of {}: tenants' address ranges must not overlap",
                    prev.net, prev.what
                ),
            )
            .with_related(prev.loc.clone(), format!("{} is declared here", prev.net));
            self.diags.push(d);
            return;
        }
        self.claimed.push(PrefixOwner { net, what, loc });
    }

    pub(super) fn load_operator(&mut self, file: FileId) {
        let text = &self.sources.file(file).text;
        let doc: syntax::OperatorFile = match toml::from_str(text) {
            Ok(d) => d,
            Err(e) => return self.toml_error(file, e),
        };
        let h = doc.policy;
        let version = match u64::try_from(*h.version.get_ref()) {
            Ok(v) => v,
            Err(_) => {
                self.err(
                    file,
                    h.version.span(),
                    "the policy version must be 0 or more",
                );
                0
            }
        };
        for k in &h.kinds {
            if !self.name_ok(file, k, "segment kind") {
                continue;
            }
            if let Some(prev) = self.kinds.get(k.get_ref()).cloned() {
                let d = Diagnostic::error(
                    Loc::new(file, k.span()),
                    format!("segment kind {:?} is listed twice", k.get_ref()),
                )
                .with_related(prev, "first listed here");
                self.diags.push(d);
            } else {
                self.kinds
                    .insert(k.get_ref().clone(), Loc::new(file, k.span()));
            }
        }
        self.header = Some((
            h.name.into_inner(),
            version,
            h.kinds.iter().map(|k| k.get_ref().clone()).collect(),
        ));

        for (tname, decl) in doc.tenants {
            if !self.name_ok(file, &tname, "tenant") {
                continue;
            }
            let tid = TenantId(self.tenants.len() as u32);
            let tloc = Loc::new(file, tname.span());
            let datacenter = self.prefixes(file, &decl.datacenter, "datacenter range");
            let homeoffice_pool = self.prefixes(file, &decl.homeoffice, "home-office pool");
            for (net, p) in datacenter.iter().zip(&decl.datacenter) {
                self.claim(
                    *net,
                    format!("tenant {:?} (data centre)", tname.get_ref()),
                    Loc::new(file, p.span()),
                );
            }
            for (net, p) in homeoffice_pool.iter().zip(&decl.homeoffice) {
                self.claim(
                    *net,
                    format!("tenant {:?} (home-office pool)", tname.get_ref()),
                    Loc::new(file, p.span()),
                );
            }
            let mut site_ids = Vec::new();
            for (sname, sdecl) in decl.sites {
                if !self.name_ok(file, &sname, "site") {
                    continue;
                }
                let prefixes = self.prefixes(file, &sdecl.prefixes, "site prefix");
                if sdecl.prefixes.is_empty() {
                    self.err(
                        file,
                        sname.span(),
                        format!("site {:?} has no prefixes", sname.get_ref()),
                    );
                }
                for (net, p) in prefixes.iter().zip(&sdecl.prefixes) {
                    self.claim(
                        *net,
                        format!("site {}/{}", tname.get_ref(), sname.get_ref()),
                        Loc::new(file, p.span()),
                    );
                }
                let sid = SiteId(self.sites.len() as u32);
                self.sites.push(Site {
                    tenant: tid,
                    name: sname.get_ref().clone(),
                    description: sdecl.description,
                    prefixes,
                    loc: Loc::new(file, sname.span()),
                });
                site_ids.push(sid);
            }
            self.tenants.push(Tenant {
                name: tname.into_inner(),
                description: decl.description,
                datacenter,
                homeoffice_pool,
                sites: site_ids,
                loc: tloc,
            });
        }

        for (sname, decl) in doc.services {
            if !self.name_ok(file, &sname, "service") {
                continue;
            }
            let owner = match &decl.owner {
                None => None,
                Some(o) if o.get_ref() == "operator" => None,
                Some(o) => match self.tenant_id(o.get_ref()) {
                    Some(t) => Some(t),
                    None => {
                        self.err(
                            file,
                            o.span(),
                            format!(
                                "owner {:?} is not a tenant declared in this file",
                                o.get_ref()
                            ),
                        );
                        None
                    }
                },
            };
            self.add_service(file, sname, decl, owner, false);
        }
        for g in doc.guardrail {
            self.pending_guardrails.push((file, g));
        }
        for e in doc.expect {
            self.pending_operator_expects.push((file, e));
        }
    }

    pub(super) fn tenant_id(&self, name: &str) -> Option<TenantId> {
        tenant_index(&self.tenants, name)
    }

    pub(super) fn add_service(
        &mut self,
        file: FileId,
        sname: Name,
        decl: syntax::ServiceDecl,
        owner: Option<TenantId>,
        tenant_declared: bool,
    ) {
        let errors_before = self.error_count();
        let addresses = self.prefixes(file, &decl.addresses, "service address");
        if decl.addresses.is_empty() {
            self.err(
                file,
                sname.span(),
                format!("service {:?} has no addresses", sname.get_ref()),
            );
        }
        let mut ports = Vec::new();
        for p in &decl.ports {
            match PortRange::parse(p.get_ref()) {
                Ok(r) => ports.push(r),
                Err(msg) => self.err(file, p.span(), msg),
            }
        }
        if decl.ports.is_empty() {
            self.err(
                file,
                sname.span(),
                format!(
                    "service {:?} has no ports: list them like [\"tcp/443\", \"udp/53\", \"icmp\"]",
                    sname.get_ref()
                ),
            );
        }
        if tenant_declared {
            if let Some(t) = owner {
                let tenant = &self.tenants[t.index()];
                let tname = tenant.name.clone();
                let mut allowed: Vec<IpNet> = tenant.datacenter.clone();
                for s in &tenant.sites {
                    allowed.extend(self.sites[s.index()].prefixes.iter().copied());
                }
                for (net, p) in addresses.iter().zip(&decl.addresses) {
                    if !allowed.iter().any(|a| a.contains(net)) {
                        self.err(
                            file,
                            p.span(),
                            format!(
                                "{net} is outside tenant {tname:?}'s data-centre ranges and sites: a tenant may declare services only in its own address space"
                            ),
                        );
                    }
                }
            }
        }
        let id = ServiceId(self.services.len() as u32);
        if self.error_count() > errors_before {
            self.broken_services.insert(id);
        }
        self.services.push(Service {
            name: sname.get_ref().clone(),
            owner,
            tenant_declared,
            addresses,
            ports,
            export: Export::Nobody,
            description: decl.description,
            loc: Loc::new(file, sname.span()),
        });
        self.pending_exports.push((id, file, decl.export));
    }

    pub(super) fn load_fragment(&mut self, file: FileId) {
        let text = &self.sources.file(file).text;
        let doc: syntax::TenantFile = match toml::from_str(text) {
            Ok(d) => d,
            Err(e) => return self.toml_error(file, e),
        };
        let Some(tid) = self.tenant_id(doc.tenant.get_ref()) else {
            return self.err(
                file,
                doc.tenant.span(),
                format!(
                    "tenant {:?} is not declared in operator.toml: only the operator adds tenants",
                    doc.tenant.get_ref()
                ),
            );
        };
        let stem = self
            .sources
            .file(file)
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned();
        if stem != *doc.tenant.get_ref() {
            self.err(
                file,
                doc.tenant.span(),
                format!(
                    "this file is tenants/{stem}.toml but says tenant = {:?}: name the file after its tenant",
                    doc.tenant.get_ref()
                ),
            );
        }
        let here = Loc::new(file, doc.tenant.span());
        if let Some(prev) = self.fragment_of.get(&tid).cloned() {
            let d = Diagnostic::error(
                here,
                format!("tenant {:?} already has a fragment", doc.tenant.get_ref()),
            )
            .with_related(prev, "the other fragment");
            self.diags.push(d);
            return;
        }
        self.fragment_of.insert(tid, here);
        let tname = doc.tenant.get_ref().clone();

        let mut has_homeoffice: Option<Loc> = None;
        let mut own_segments: Vec<(IpNet, String, Loc)> = Vec::new();
        for (sname, decl) in doc.segments {
            if !self.name_ok(file, &sname, "segment") {
                continue;
            }
            if !self.kinds.contains_key(decl.kind.get_ref()) {
                let known: Vec<&str> = self.kinds.keys().map(String::as_str).collect();
                self.err(
                    file,
                    decl.kind.span(),
                    format!(
                        "unknown segment kind {:?}; the operator allows: {}",
                        decl.kind.get_ref(),
                        known.join(", ")
                    ),
                );
            }
            let sloc = Loc::new(file, sname.span());
            let errors_before = self.error_count();
            let (site, prefixes) = match &decl.site {
                None => {
                    if !decl.prefixes.is_empty() {
                        self.err(
                            file,
                            decl.prefixes[0].span(),
                            "a segment without a site is the home-office segment: its addresses are the tenant's home-office pool, so it takes no prefixes",
                        );
                    }
                    if let Some(prev) = has_homeoffice.clone() {
                        let d = Diagnostic::error(
                            sloc.clone(),
                            "a tenant has at most one home-office segment (a segment without a site)",
                        )
                        .with_related(prev, "the other one");
                        self.diags.push(d);
                    }
                    has_homeoffice = Some(sloc.clone());
                    let pool = self.tenants[tid.index()].homeoffice_pool.clone();
                    if pool.is_empty() {
                        self.err(
                            file,
                            sname.span(),
                            format!(
                                "segment {:?} has no site, which makes it the home-office segment, but tenant {tname:?} has no home-office pool in operator.toml",
                                sname.get_ref()
                            ),
                        );
                    }
                    (None, pool)
                }
                Some(site_name) => {
                    let site = self.tenants[tid.index()]
                        .sites
                        .iter()
                        .copied()
                        .find(|s| self.sites[s.index()].name == *site_name.get_ref());
                    let Some(site) = site else {
                        self.err(
                            file,
                            site_name.span(),
                            format!("tenant {tname:?} has no site {:?}", site_name.get_ref()),
                        );
                        continue;
                    };
                    let prefixes = self.prefixes(file, &decl.prefixes, "segment prefix");
                    if decl.prefixes.is_empty() {
                        self.err(
                            file,
                            sname.span(),
                            format!("segment {:?} has no prefixes", sname.get_ref()),
                        );
                    }
                    for (net, p) in prefixes.iter().zip(&decl.prefixes) {
                        let site_prefixes = &self.sites[site.index()].prefixes;
                        if !site_prefixes.iter().any(|sp| sp.contains(net)) {
                            let shown: Vec<String> =
                                site_prefixes.iter().map(ToString::to_string).collect();
                            self.err(
                                file,
                                p.span(),
                                format!(
                                    "{net} is outside site {:?} ({})",
                                    site_name.get_ref(),
                                    shown.join(", ")
                                ),
                            );
                        }
                        let ploc = Loc::new(file, p.span());
                        if let Some((prev_net, prev_name, prev_loc)) =
                            own_segments.iter().find(|(n, _, _)| nets_overlap(n, net))
                        {
                            let d = Diagnostic::error(
                                ploc.clone(),
                                format!(
                                    "{net} of segment {:?} overlaps {prev_net} of segment {prev_name:?}: an address belongs to one segment",
                                    sname.get_ref()
                                ),
                            )
                            .with_related(prev_loc.clone(), "declared here");
                            self.diags.push(d);
                        } else {
                            own_segments.push((*net, sname.get_ref().clone(), ploc));
                        }
                    }
                    (Some(site), prefixes)
                }
            };
            if self.error_count() > errors_before {
                self.broken_segments
                    .insert(SegmentId(self.segments.len() as u32));
            }
            self.segments.push(Segment {
                tenant: tid,
                name: sname.into_inner(),
                kind: decl.kind.into_inner(),
                site,
                prefixes,
                description: decl.description,
                loc: sloc,
            });
        }

        let mut groups = BTreeMap::new();
        for (gname, members) in doc.groups {
            if !self.name_ok(file, &gname, "group") {
                continue;
            }
            if self
                .segments
                .iter()
                .any(|s| s.tenant == tid && s.name == *gname.get_ref())
            {
                self.err(
                    file,
                    gname.span(),
                    format!("group {:?} has the name of a segment", gname.get_ref()),
                );
            }
            let members = members
                .into_iter()
                .map(|m| (m.get_ref().clone(), Loc::new(file, m.span())))
                .collect();
            groups.insert(
                gname.get_ref().clone(),
                (Loc::new(file, gname.span()), members),
            );
        }
        self.groups.insert(tid, groups);

        for (sname, decl) in doc.services {
            if !self.name_ok(file, &sname, "service") {
                continue;
            }
            if let Some(o) = &decl.owner {
                self.err(
                    file,
                    o.span(),
                    "a tenant's services belong to that tenant: `owner` is only for shared services in operator.toml",
                );
            }
            if let Some(op) = self
                .services
                .iter()
                .find(|s| !s.tenant_declared && s.name == *sname.get_ref())
            {
                let d = Diagnostic::error(
                    Loc::new(file, sname.span()),
                    format!(
                        "service {:?} has the name of a shared service of the operator: pick another name",
                        sname.get_ref()
                    ),
                )
                .with_related(op.loc.clone(), "the shared service");
                self.diags.push(d);
            }
            self.add_service(file, sname, decl, Some(tid), true);
        }
        for r in doc.rule {
            self.pending_rules.push((tid, file, r));
        }
        for e in doc.expect {
            self.pending_expects.push((tid, file, e));
        }
    }

    /// Everything that needs all files: exports, groups, rules, guardrails, tests, and the
    /// cross-checks (rules no packet can match, rules shadowed by guardrails).
    pub(super) fn finish_checks(&mut self) {
        for (sid, file, export) in std::mem::take(&mut self.pending_exports) {
            let mut list = Vec::new();
            let mut all = false;
            for e in export {
                if e.get_ref() == "*" {
                    all = true;
                } else if let Some(t) = self.tenant_id(e.get_ref()) {
                    list.push(t);
                } else {
                    self.err(
                        file,
                        e.span(),
                        format!("export to {:?}: no such tenant", e.get_ref()),
                    );
                }
            }
            self.services[sid.index()].export = if all {
                Export::All
            } else if list.is_empty() {
                Export::Nobody
            } else {
                Export::Tenants(list)
            };
        }

        for (file, g) in std::mem::take(&mut self.pending_guardrails) {
            self.add_guardrail(file, g);
        }
        for (tid, file, r) in std::mem::take(&mut self.pending_rules) {
            self.add_rule(tid, file, r);
        }
        for (file, e) in std::mem::take(&mut self.pending_operator_expects) {
            self.add_expect(None, file, e);
        }
        for (tid, file, e) in std::mem::take(&mut self.pending_expects) {
            self.add_expect(Some(tid), file, e);
        }
    }
}
