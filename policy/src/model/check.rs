//! Checking the operator file into a [`Policy`]: names, prefixes (no overlaps), tenants, sites,
//! services and their addresses. The tenants' fragments are checked in `fragment.rs`, rules,
//! guardrails and expectations in `rules.rs`, all with this builder.

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

/// Where a definition stands in the order an admin reads the files: the operator file first,
/// then the fragments, each from top to bottom.
pub(super) fn reading_order(loc: &Loc) -> (FileId, usize) {
    (loc.file, loc.span.start)
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

/// A service address with its owner, to refuse one address claimed by two owners.
#[derive(Clone)]
pub(super) struct ServiceClaim {
    pub(super) net: IpNet,
    pub(super) owner: Option<TenantId>,
    pub(super) service: String,
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
    pub(super) service_claims: Vec<ServiceClaim>,
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
    /// The operator's `[dhcp]`: what segments get unless their tenant says otherwise.
    pub(super) operator_dhcp: super::dhcp::DhcpDefaults,
    /// Fragments that could not be read (syntax errors, a name that is not their tenant's):
    /// by file stem, the file and how many references from elsewhere went unchecked. Other
    /// files' references to `STEM/…` are not errors of their own: one broken file reports its
    /// errors in itself.
    pub(super) hidden: BTreeMap<String, (FileId, usize)>,
    /// Rules by (tenant, name), also those left inactive, to refuse a name used twice.
    pub(super) rule_names: HashMap<(TenantId, String), Loc>,
    pub(super) names: NameIndex,
    /// The operator file could not be read (missing, or not parseable): fragments are then
    /// checked for syntax only — every tenant would otherwise be "not declared", an error in
    /// every file for one mistake in operator.toml. Counts the fragments so checked.
    pub(super) operator_unreadable: Option<usize>,
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
            service_claims: Vec::new(),
            fragment_of: HashMap::new(),
            pending_guardrails: Vec::new(),
            pending_operator_expects: Vec::new(),
            pending_exports: Vec::new(),
            pending_rules: Vec::new(),
            pending_expects: Vec::new(),
            groups: HashMap::new(),
            broken_services: BTreeSet::new(),
            broken_segments: BTreeSet::new(),
            operator_dhcp: Default::default(),
            hidden: BTreeMap::new(),
            rule_names: HashMap::new(),
            names: NameIndex::default(),
            operator_unreadable: None,
        }
    }

    /// Records that fragment `file` (tenants/STEM.toml) could not be read.
    pub(super) fn hide_fragment(&mut self, stem: &str, file: FileId) {
        self.hidden.entry(stem.to_owned()).or_insert((file, 0));
    }

    /// Whether `name` (`TENANT/…`, or a test's `TENANT/…:PORT`) refers to a tenant whose
    /// fragment could not be read; counts it, so that file can say what its errors hide.
    pub(super) fn hides(&mut self, name: &str) -> bool {
        let Some((tenant, _)) = name.trim().trim_start_matches('[').split_once('/') else {
            return false;
        };
        match self.hidden.get_mut(tenant) {
            Some((_, n)) => {
                *n += 1;
                true
            }
            None => false,
        }
    }

    /// One note per unreadable fragment that other files refer to, and one when the operator
    /// file hid everything the fragments refer to.
    pub(super) fn note_hidden(&mut self, operator: Option<FileId>) {
        if let Some(n) = self.operator_unreadable.filter(|n| *n > 0) {
            let message = format!(
                "errors in operator.toml hide the tenants, sites and shared services: {n} fragment{} checked for syntax only",
                if n == 1 { " was" } else { "s were" }
            );
            self.diags.push(match operator {
                Some(file) => Diagnostic::note(Loc::new(file, 0..0), message),
                None => Diagnostic {
                    severity: crate::source::Severity::Note,
                    loc: None,
                    message,
                    related: None,
                },
            });
        }
        let notes: Vec<Diagnostic> = self
            .hidden
            .iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(stem, (file, n))| {
                Diagnostic::note(
                    Loc::new(*file, 0..0),
                    format!(
                        "errors in {} hide its definitions: {n} reference{} to {stem}/… in other files {} not checked",
                        self.sources.file(*file).path.display(),
                        if *n == 1 { "" } else { "s" },
                        if *n == 1 { "was" } else { "were" }
                    ),
                )
            })
            .collect();
        self.diags.extend(notes);
    }

    /// ` (did you mean "x"?)` for a misspelt tenant, or nothing.
    pub(super) fn tenant_hint(&self, name: &str) -> String {
        self.closest_tenant(name)
            .map(|t| format!(" (did you mean {t:?}?)"))
            .unwrap_or_default()
    }

    /// `; did you mean "x"?` for a misspelt segment kind, else the list of kinds.
    pub(super) fn kind_hint(&self, kind: &str) -> String {
        match closest(kind, self.kinds.keys().map(String::as_str)) {
            Some(k) => format!("; did you mean {k:?}?"),
            None => {
                let known: Vec<&str> = self.kinds.keys().map(String::as_str).collect();
                format!("; the operator's [policy] kinds are: {}", known.join(", "))
            }
        }
    }

    /// The declared tenant closest to a misspelt `name`.
    pub(super) fn closest_tenant(&self, name: &str) -> Option<String> {
        closest(name, self.tenants.iter().map(|t| t.name.as_str())).map(str::to_owned)
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

    /// A file that did not deserialise: every syntax error (the parser recovers and goes on),
    /// else every unknown key, wrong type and missing key the schema finds, else serde's one
    /// error. So an admin sees all mistakes of a file in one run, not one per run.
    pub(super) fn toml_error(&mut self, file: FileId, kind: FileKind, e: toml::de::Error) {
        let text = &self.sources.file(file).text;
        let (doc, syntax_errors) = toml::de::DeTable::parse_recoverable(text);
        let found: Vec<(std::ops::Range<usize>, String)> = if syntax_errors.is_empty() {
            crate::schema::structure(kind, &doc)
                .into_iter()
                .map(|f| (f.span, f.message))
                .collect()
        } else {
            syntax_errors
                .iter()
                .map(|e| {
                    (
                        e.span().unwrap_or(0..0),
                        format!(
                            "cannot read this file: {}",
                            e.message().trim().replace('\n', "; ")
                        ),
                    )
                })
                .collect()
        };
        if found.is_empty() {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().replace('\n', "; ");
            self.err(file, span, format!("cannot read this file: {msg}"));
        }
        for (span, msg) in found {
            self.err(file, span, msg);
        }
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

    /// A `ports` entry: `tcp/443`; `443/tcp` is taken with a warning that says how to write it.
    pub(super) fn port(&mut self, file: FileId, p: &Spanned<String>) -> Option<PortRange> {
        match PortRange::parse_lenient(p.get_ref()) {
            Ok((r, hint)) => {
                if let Some(hint) = hint {
                    self.diags
                        .push(Diagnostic::warning(Loc::new(file, p.span()), hint));
                }
                Some(r)
            }
            Err(msg) => {
                self.err(file, p.span(), msg);
                None
            }
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

    /// Records `net` as claimed; an overlap with an earlier claim is an error naming both,
    /// blamed on whichever of the two comes later in reading order (tables are visited in name
    /// order, not in the order the admin wrote them). Every overlap is reported, not only the
    /// first: the prefix is recorded even when it overlaps.
    pub(super) fn claim(&mut self, net: IpNet, what: String, loc: Loc) {
        let overlapping: Vec<usize> = (0..self.claimed.len())
            .filter(|&i| nets_overlap(&self.claimed[i].net, &net))
            .collect();
        for i in overlapping {
            let prev = &self.claimed[i];
            let (later, later_net, later_what, earlier, earlier_net, earlier_what) =
                if reading_order(&loc) >= reading_order(&prev.loc) {
                    (&loc, net, &what, &prev.loc, prev.net, &prev.what)
                } else {
                    (&prev.loc, prev.net, &prev.what, &loc, net, &what)
                };
            let pool_of = |w: &str| w.strip_suffix(" (home-office pool)").map(str::to_owned);
            let why = match (pool_of(later_what), pool_of(earlier_what)) {
                (Some(_), _) | (_, Some(_)) => {
                    // The usual mistake: a pool carved out of the town hall's range. Home-office
                    // devices are not at any site; they get tunnel addresses from the pool.
                    "a home-office pool is a range of its own: home-office devices get their tunnel addresses from it and are not at any site, so it lies outside every site and data-centre range; move the pool (homeoffice = [...] under [tenants.T] in operator.toml) to an unused range, like one /24 per tenant from 10.250.0.0/16".to_owned()
                }
                _ => "tenants' address ranges must not overlap".to_owned(),
            };
            let d = Diagnostic::error(
                later.clone(),
                format!(
                    "{later_net} of {later_what} overlaps {earlier_net} of {earlier_what}: {why}"
                ),
            )
            .with_related(earlier.clone(), format!("{earlier_net} is declared here"));
            self.diags.push(d);
        }
        self.claimed.push(PrefixOwner { net, what, loc });
    }

    pub(super) fn load_operator(&mut self, file: FileId) {
        let text = &self.sources.file(file).text;
        let doc: syntax::OperatorFile = match toml::from_str(text) {
            Ok(d) => d,
            Err(e) => {
                self.operator_unreadable = Some(0);
                return self.toml_error(file, FileKind::Operator, e);
            }
        };
        self.operator_dhcp = self.dhcp_defaults(file, doc.dhcp.as_ref());
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
        for (net, p) in self
            .prefixes(file, &h.tunnel, "tunnel pool")
            .into_iter()
            .zip(&h.tunnel)
        {
            self.claim(
                net,
                "the enrollment service's tunnel pool".to_owned(),
                Loc::new(file, p.span()),
            );
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
            self.names.add_tenant(tname.get_ref(), tid);
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
                                "owner {:?} is not a tenant declared in this file{}",
                                o.get_ref(),
                                self.tenant_hint(o.get_ref())
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
        self.names.tenant(name)
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
            if let Some(r) = self.port(file, p) {
                ports.push(r);
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
        if !tenant_declared {
            self.check_operator_service_addresses(file, &sname, &decl, &addresses, owner);
        }
        self.check_service_claims(file, &sname, &decl, &addresses, owner);
        let id = ServiceId(self.services.len() as u32);
        if self.error_count() > errors_before {
            self.broken_services.insert(id);
        }
        self.names.add_service(
            if tenant_declared { owner } else { None },
            sname.get_ref(),
            id,
        );
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

    /// A service of the operator file opens firewalls in every site that may reach it, so it
    /// must be where the data centre is: inside its owner's data-centre ranges (the operator's
    /// own services: inside some tenant's data-centre ranges), never a default route, never
    /// inside a site or a home-office pool.
    pub(super) fn check_operator_service_addresses(
        &mut self,
        file: FileId,
        sname: &Name,
        decl: &syntax::ServiceDecl,
        addresses: &[IpNet],
        owner: Option<TenantId>,
    ) {
        for (net, p) in addresses.iter().zip(&decl.addresses) {
            if net.prefix_len() == 0 {
                self.err(
                    file,
                    p.span(),
                    format!(
                        "service {:?}: {net} is a default route, not a service address: it would open every site to everything the service's rules allow; list the servers' addresses",
                        sname.get_ref()
                    ),
                );
                continue;
            }
            let (ranges, whose): (Vec<IpNet>, String) = match owner {
                Some(t) => (
                    self.tenants[t.index()].datacenter.clone(),
                    format!("its owner {:?}'s", self.tenants[t.index()].name),
                ),
                None => (
                    self.tenants
                        .iter()
                        .flat_map(|t| t.datacenter.iter().copied())
                        .collect(),
                    "any tenant's".to_owned(),
                ),
            };
            if !ranges.iter().any(|r| r.contains(net)) {
                let shown: Vec<String> = ranges.iter().map(ToString::to_string).collect();
                let shown = if shown.is_empty() {
                    "none declared".to_owned()
                } else {
                    shown.join(", ")
                };
                self.err(
                    file,
                    p.span(),
                    format!(
                        "service {:?}: {net} is outside {whose} data-centre ranges ({shown}): a shared service lies in the data centre",
                        sname.get_ref()
                    ),
                );
            }
            let inside_site = self.sites.iter().find_map(|s| {
                s.prefixes
                    .iter()
                    .find(|sp| nets_overlap(sp, net))
                    .map(|sp| (*sp, s.loc.clone(), s.tenant, s.name.clone()))
            });
            if let Some((sp, sloc, t, site)) = inside_site {
                let d = Diagnostic::error(
                    Loc::new(file, p.span()),
                    format!(
                        "service {:?}: {net} overlaps {sp} of site {}/{site}: a shared service inside a site would open that site's firewall to everyone it is exported to",
                        sname.get_ref(),
                        self.tenants[t.index()].name
                    ),
                )
                .with_related(sloc, "the site is declared here");
                self.diags.push(d);
            }
            let inside_pool = self.tenants.iter().find_map(|t| {
                t.homeoffice_pool
                    .iter()
                    .find(|hp| nets_overlap(hp, net))
                    .map(|hp| (*hp, t.loc.clone(), t.name.clone()))
            });
            if let Some((hp, tloc, tname)) = inside_pool {
                let d = Diagnostic::error(
                    Loc::new(file, p.span()),
                    format!(
                        "service {:?}: {net} overlaps {hp}, the home-office pool of tenant {tname:?}: home-office devices are not servers",
                        sname.get_ref()
                    ),
                )
                .with_related(tloc, "the tenant is declared here");
                self.diags.push(d);
            }
        }
    }

    /// One address, one owner: a service address that two owners claim would let each open the
    /// other's server to its own exports.
    pub(super) fn check_service_claims(
        &mut self,
        file: FileId,
        sname: &Name,
        decl: &syntax::ServiceDecl,
        addresses: &[IpNet],
        owner: Option<TenantId>,
    ) {
        let owner_name = |b: &Self, o: Option<TenantId>| match o {
            Some(t) => format!("tenant {:?}", b.tenants[t.index()].name),
            None => "the operator".to_owned(),
        };
        for (net, p) in addresses.iter().zip(&decl.addresses) {
            let loc = Loc::new(file, p.span());
            let clashes: Vec<ServiceClaim> = self
                .service_claims
                .iter()
                .filter(|c| c.owner != owner && nets_overlap(&c.net, net))
                .cloned()
                .collect();
            for prev in clashes {
                let this = (loc.clone(), *net, sname.get_ref().clone(), owner);
                let other = (prev.loc.clone(), prev.net, prev.service.clone(), prev.owner);
                let (later, earlier) = if reading_order(&loc) >= reading_order(&prev.loc) {
                    (this, other)
                } else {
                    (other, this)
                };
                let d = Diagnostic::error(
                    later.0,
                    format!(
                        "{} of service {:?} ({}) overlaps {} of service {:?} ({}): a service address has one owner",
                        later.1,
                        later.2,
                        owner_name(self, later.3),
                        earlier.1,
                        earlier.2,
                        owner_name(self, earlier.3)
                    ),
                )
                .with_related(earlier.0, "the other service's address");
                self.diags.push(d);
            }
            self.service_claims.push(ServiceClaim {
                net: *net,
                owner,
                service: sname.get_ref().clone(),
                loc,
            });
        }
    }
}
