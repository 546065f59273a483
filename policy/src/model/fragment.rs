//! Checking a tenant's fragment (segments, exports, rules, expectations) and the checks that
//! need the whole policy.

use super::*;

impl<'s> Builder<'s> {
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
