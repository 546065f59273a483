//! Checking a tenant's fragment (segments, exports, rules, expectations) and the checks that
//! need the whole policy.

use super::*;

/// What a site segment declared about where it arrives.
enum Declared {
    Bound(SegmentId, (Binding, Loc)),
    /// Neither `vlan` nor `port`.
    Nothing(SegmentId),
    /// A `vlan` or `port` that had an error of its own.
    Broken(SegmentId),
}

impl<'s> Builder<'s> {
    pub(super) fn load_fragment(&mut self, file: FileId) {
        let stem = self
            .sources
            .file(file)
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned();
        let text = &self.sources.file(file).text;
        let doc: syntax::TenantFile = match toml::from_str(text) {
            Ok(d) => d,
            Err(e) => {
                self.hide_fragment(&stem, file);
                return self.toml_error(file, FileKind::Tenant, e);
            }
        };
        if let Some(n) = self.operator_unreadable.as_mut() {
            *n += 1;
            return;
        }
        // One fragment per tenant, named after it: a file whose name is not its tenant's is
        // refused as a whole (a stray copy never displaces the real tenants/T.toml).
        if stem != *doc.tenant.get_ref() {
            self.hide_fragment(&stem, file);
            let msg = if self.tenant_id(doc.tenant.get_ref()).is_some() {
                format!(
                    "this file is tenants/{stem}.toml but says tenant = {:?}: a tenant's fragment is tenants/{}.toml, so this file is not read; move what it holds into that file (one fragment per tenant)",
                    doc.tenant.get_ref(),
                    doc.tenant.get_ref()
                )
            } else {
                format!(
                    "this file is tenants/{stem}.toml but says tenant = {:?}, and operator.toml declares no such tenant: name the file after its tenant (tenants/TENANT.toml, TENANT as in [tenants.TENANT])",
                    doc.tenant.get_ref()
                )
            };
            return self.err(file, doc.tenant.span(), msg);
        }
        let Some(tid) = self.tenant_id(doc.tenant.get_ref()) else {
            self.hide_fragment(&stem, file);
            let hint = self
                .closest_tenant(doc.tenant.get_ref())
                .map(|t| format!(" (did you mean {t:?}?)"))
                .unwrap_or_default();
            return self.err(
                file,
                doc.tenant.span(),
                format!(
                    "tenant {:?} is not declared in operator.toml{hint}: only the operator adds tenants ([tenants.{}] in operator.toml)",
                    doc.tenant.get_ref(),
                    doc.tenant.get_ref()
                ),
            );
        };
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

        let operator_dhcp = self.operator_dhcp.clone();
        let tenant_dhcp = self
            .dhcp_defaults(file, doc.dhcp.as_ref())
            .over(&operator_dhcp);
        let mut has_homeoffice: Option<Loc> = None;
        let mut local_taken: Vec<super::local::LocalClaim> = Vec::new();
        let mut own_segments: Vec<(IpNet, String, Loc)> = Vec::new();
        // Site segments with the binding they declare (`vlan`/`port`), resolved below.
        let mut declared: Vec<Declared> = Vec::new();
        for (sname, decl) in doc.segments {
            if !self.name_ok(file, &sname, "segment") {
                continue;
            }
            if !self.kinds.contains_key(decl.kind.get_ref()) {
                let hint = self.kind_hint(decl.kind.get_ref());
                self.err(
                    file,
                    decl.kind.span(),
                    format!("unknown segment kind {:?}{hint}", decl.kind.get_ref()),
                );
            }
            let sloc = Loc::new(file, sname.span());
            let errors_before = self.error_count();
            let binding = self.declared_binding(file, &decl);
            let mut local = Vec::new();
            let (site, prefixes) = match &decl.site {
                None => {
                    if let Some((_, at)) = &binding {
                        self.diags.push(Diagnostic::error(
                            at.clone(),
                            "a segment without a site is the home-office segment: it arrives through the tunnel, not on a LAN port, so it takes no vlan or port",
                        ));
                    }
                    if !decl.prefixes.is_empty() {
                        self.err(
                            file,
                            decl.prefixes[0].span(),
                            "a segment without a site is the home-office segment: its addresses are the tenant's home-office pool, so it takes no prefixes",
                        );
                    }
                    if let Some(first) = decl.local.first() {
                        self.err(
                            file,
                            first.span(),
                            "a segment without a site is the home-office segment: it has no town-hall LAN, so it takes no local prefixes",
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
                                "segment {:?} has no site, which makes it the home-office segment, but tenant {tname:?} has no home-office pool: the operator adds one to [tenants.{tname}] in operator.toml (homeoffice = [\"10.250.N.0/24\"], a range outside every site), or give the segment the site = \"…\" of the town hall it is at",
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
                        let sites: Vec<&str> = self.tenants[tid.index()]
                            .sites
                            .iter()
                            .map(|s| self.sites[s.index()].name.as_str())
                            .collect();
                        let hint = match closest(site_name.get_ref(), sites.iter().copied()) {
                            Some(near) => format!("; did you mean {near:?}?"),
                            None if sites.is_empty() => {
                                "; it has none: the operator declares sites in operator.toml"
                                    .to_owned()
                            }
                            None => format!("; its sites: {}", sites.join(", ")),
                        };
                        self.err(
                            file,
                            site_name.span(),
                            format!(
                                "tenant {tname:?} has no site {:?}{hint}",
                                site_name.get_ref()
                            ),
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
                        for (prev_net, prev_name, prev_loc) in
                            own_segments.iter().filter(|(n, _, _)| nets_overlap(n, net))
                        {
                            let this = (&ploc, *net, sname.get_ref());
                            let prev = (prev_loc, *prev_net, prev_name);
                            let (later, earlier) =
                                if reading_order(&ploc) >= reading_order(prev_loc) {
                                    (this, prev)
                                } else {
                                    (prev, this)
                                };
                            let d = Diagnostic::error(
                                later.0.clone(),
                                format!(
                                    "{} of segment {:?} overlaps {} of segment {:?}: an address belongs to one segment",
                                    later.1, later.2, earlier.1, earlier.2
                                ),
                            )
                            .with_related(earlier.0.clone(), "declared here");
                            self.diags.push(d);
                        }
                        own_segments.push((*net, sname.get_ref().clone(), ploc));
                    }
                    local =
                        self.local_prefixes(file, site, sname.get_ref(), &decl, &mut local_taken);
                    (Some(site), prefixes)
                }
            };
            // DHCP hands out the addresses the LAN uses: the local ones where there are any.
            let lan: Vec<IpNet> = prefixes
                .iter()
                .map(|p| local.iter().find(|(u, _)| u == p).map_or(*p, |(_, l)| *l))
                .collect();
            let dhcp = self.segment_dhcp(
                file,
                sname.get_ref(),
                decl.dhcp.as_ref(),
                site.is_some().then_some(&lan[..]),
                &tenant_dhcp,
            );
            let id = SegmentId(self.segments.len() as u32);
            if self.error_count() > errors_before {
                self.broken_segments.insert(id);
            }
            if site.is_some() {
                let tried = decl.vlan.is_some() || decl.port.is_some();
                declared.push(match binding {
                    Some(b) => Declared::Bound(id, b),
                    // A wrong vlan or port has its own error: no second one for the same spot.
                    None if tried => Declared::Broken(id),
                    None => Declared::Nothing(id),
                });
            }
            self.names.add_segment(tid, sname.get_ref(), id);
            self.segments.push(Segment {
                tenant: tid,
                name: sname.into_inner(),
                kind: decl.kind.into_inner(),
                site,
                prefixes,
                binding: None,
                local,
                dhcp,
                description: decl.description,
                loc: sloc,
            });
        }
        self.resolve_bindings(declared);
        let tenant = &self.tenants[tid.index()];
        if has_homeoffice.is_none() && !tenant.homeoffice_pool.is_empty() {
            let pool: Vec<String> = tenant
                .homeoffice_pool
                .iter()
                .map(ToString::to_string)
                .collect();
            let d = Diagnostic::warning(
                self.fragment_of[&tid].clone(),
                format!(
                    "tenant {tname:?} has a home-office pool ({}) but no home-office segment: its home-office devices get addresses from the pool, yet no rule can name them, so they reach nothing; add [segments.homeoffice] with kind = \"homeoffice\" and no site (and rules from it), or ask the operator to remove the pool",
                    pool.join(", ")
                ),
            )
            .with_related(tenant.loc.clone(), "the tenant and its pool are declared here");
            self.diags.push(d);
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

    /// The `vlan` or `port` a segment declares, checked: a VLAN id in 1-4094, a valid interface
    /// name, not both.
    fn declared_binding(
        &mut self,
        file: FileId,
        decl: &syntax::SegmentDecl,
    ) -> Option<(Binding, Loc)> {
        let vlan = decl.vlan.as_ref().and_then(|v| {
            let at = Loc::new(file, v.span());
            match u16::try_from(*v.get_ref()) {
                Ok(id @ 1..=4094) => Some((Binding::Vlan(id), at)),
                _ => {
                    self.diags.push(Diagnostic::error(
                        at,
                        format!(
                            "VLAN id {} is outside 1-4094 (0 means untagged, 4095 is reserved): for an untagged segment write port = \"INTERFACE\" instead",
                            v.get_ref()
                        ),
                    ));
                    None
                }
            }
        });
        let port = decl.port.as_ref().and_then(|p| {
            let at = Loc::new(file, p.span());
            match komnet_proto::config::check_interface_name(p.get_ref()) {
                Ok(()) => Some((Binding::Port(p.get_ref().clone()), at)),
                Err(e) => {
                    self.diags.push(Diagnostic::error(
                        at,
                        format!("port: {e}: name the appliance's interface (like \"lan2\")"),
                    ));
                    None
                }
            }
        });
        match (vlan, port) {
            (Some((_, vloc)), Some((_, ploc))) => {
                let later = if reading_order(&ploc) >= reading_order(&vloc) {
                    ploc
                } else {
                    vloc
                };
                self.diags.push(Diagnostic::error(
                    later,
                    "a segment arrives either tagged on the LAN trunk (vlan) or untagged on a port (port), not both",
                ));
                None
            }
            (v, p) => v.or(p),
        }
    }

    /// Gives every site segment of a fragment its [`Binding`]: two segments of one site may not
    /// share a VLAN or port, and a site with several segments must say for each where it
    /// arrives (a site's only segment may say nothing: it is untagged on the LAN port).
    fn resolve_bindings(&mut self, declared: Vec<Declared>) {
        let mut per_site: BTreeMap<SiteId, usize> = BTreeMap::new();
        let mut ordered = Vec::new();
        for d in declared {
            let (id, binding) = match d {
                Declared::Bound(id, b) => (id, Some(b)),
                Declared::Nothing(id) => (id, None),
                Declared::Broken(id) => {
                    if let Some(site) = self.segments[id.index()].site {
                        *per_site.entry(site).or_default() += 1;
                    }
                    continue;
                }
            };
            if let Some(site) = self.segments[id.index()].site {
                *per_site.entry(site).or_default() += 1;
            }
            ordered.push((id, binding));
        }
        let mut taken: BTreeMap<(SiteId, Binding), (String, Loc)> = BTreeMap::new();
        // Duplicates are blamed on the later declaration in reading order.
        ordered.sort_by_key(|(id, b)| {
            b.as_ref()
                .map_or(reading_order(&self.segments[id.index()].loc), |(_, at)| {
                    reading_order(at)
                })
        });
        for (id, binding) in ordered {
            let Some(site) = self.segments[id.index()].site else {
                continue;
            };
            let name = self.segments[id.index()].name.clone();
            let count = per_site.get(&site).copied().unwrap_or(0);
            let binding = match binding {
                Some(b) => b,
                None if count == 1 => (Binding::Lan, self.segments[id.index()].loc.clone()),
                None => {
                    let site_name = self.sites[site.index()].name.clone();
                    let d = Diagnostic::error(
                        self.segments[id.index()].loc.clone(),
                        format!(
                            "segment {name:?} says neither vlan nor port: site {site_name:?} has {count} segments, so the appliance must know where each arrives; add vlan = ID (tagged on the LAN trunk) or port = \"INTERFACE\" (untagged)"
                        ),
                    );
                    self.diags.push(d);
                    self.broken_segments.insert(id);
                    continue;
                }
            };
            match taken.get(&(site, binding.0.clone())) {
                Some((other, other_loc)) => {
                    let d = Diagnostic::error(
                        binding.1.clone(),
                        format!(
                            "segment {name:?} arrives on {} like segment {other:?}: two segments of one site need two VLANs or ports (the appliance tells them apart by where they arrive)",
                            binding.0
                        ),
                    )
                    .with_related(other_loc.clone(), "the other segment's binding");
                    self.diags.push(d);
                    self.broken_segments.insert(id);
                }
                None => {
                    taken.insert((site, binding.0.clone()), (name, binding.1.clone()));
                    self.segments[id.index()].binding = Some(binding.0);
                }
            }
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
                        format!(
                            "export to {:?}: no such tenant{}",
                            e.get_ref(),
                            self.tenant_hint(e.get_ref())
                        ),
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
