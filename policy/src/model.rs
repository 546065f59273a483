//! The checked policy: every name resolved to an index, every prefix parsed, every finding of the
//! checker collected (all of them, not just the first). Built by [`Policy::load`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use toml::Spanned;

use crate::flow::{PortRange, Proto};
use crate::source::{Diagnostic, FileId, Loc, SourceMap};
use crate::syntax::{self, Name};

/// Policy files larger than this are refused before parsing: a policy is read by people.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// At most this many tenant fragments.
pub const MAX_FRAGMENTS: usize = 10_000;

macro_rules! id_type {
    ($name:ident) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u32);
        impl $name {
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }
    };
}
id_type!(TenantId);
id_type!(SiteId);
id_type!(SegmentId);
id_type!(ServiceId);
id_type!(RuleId);
id_type!(GuardrailId);

#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    pub description: Option<String>,
    pub datacenter: Vec<IpNet>,
    pub homeoffice_pool: Vec<IpNet>,
    pub sites: Vec<SiteId>,
    pub loc: Loc,
}

#[derive(Debug)]
pub struct Site {
    pub tenant: TenantId,
    pub name: String,
    pub description: Option<String>,
    pub prefixes: Vec<IpNet>,
    pub loc: Loc,
}

#[derive(Debug)]
pub struct Segment {
    pub tenant: TenantId,
    pub name: String,
    pub kind: String,
    /// `None` for the home-office segment, whose prefixes are the tenant's home-office pool.
    pub site: Option<SiteId>,
    pub prefixes: Vec<IpNet>,
    pub description: Option<String>,
    pub loc: Loc,
}

impl Segment {
    pub fn is_homeoffice(&self) -> bool {
        self.site.is_none()
    }
}

/// Which tenants may write rules towards a service besides its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    Nobody,
    All,
    Tenants(Vec<TenantId>),
}

#[derive(Debug)]
pub struct Service {
    /// Local name (`dms`, `fileserver`).
    pub name: String,
    /// `None`: declared in the operator file and owned by the operator.
    pub owner: Option<TenantId>,
    /// Declared in a tenant fragment (`true`) or in the operator file.
    pub tenant_declared: bool,
    pub addresses: Vec<IpNet>,
    pub ports: Vec<PortRange>,
    pub export: Export,
    pub description: Option<String>,
    pub loc: Loc,
}

#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub tenant: TenantId,
    /// Segments, groups expanded, in first-mention order without duplicates.
    pub from: Vec<SegmentId>,
    pub to: Vec<ServiceId>,
    /// When set, only these protocol/port ranges of the services.
    pub ports: Option<Vec<PortRange>>,
    pub description: Option<String>,
    pub loc: Loc,
}

impl Rule {
    /// The port ranges this rule allows towards `service`.
    pub fn allowed_ports(&self, service: &Service) -> Vec<PortRange> {
        match &self.ports {
            None => service.ports.clone(),
            Some(narrow) => service
                .ports
                .iter()
                .flat_map(|p| narrow.iter().filter_map(move |n| p.intersect(n)))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardTarget {
    Everything,
    Services(Vec<ServiceId>),
}

#[derive(Debug)]
pub struct Guardrail {
    pub name: String,
    pub kinds: Vec<String>,
    /// Empty: every tenant.
    pub tenants: Vec<TenantId>,
    pub to: GuardTarget,
    pub why: Option<String>,
    pub loc: Loc,
}

impl Guardrail {
    pub fn applies_to_segment(&self, segment: &Segment) -> bool {
        self.kinds.contains(&segment.kind)
            && (self.tenants.is_empty() || self.tenants.contains(&segment.tenant))
    }

    pub fn protects(&self, service: ServiceId) -> bool {
        match &self.to {
            GuardTarget::Everything => true,
            GuardTarget::Services(s) => s.contains(&service),
        }
    }
}

/// The source side of an inline test or of `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromSpec {
    Segment(SegmentId),
    Address(IpAddr),
}

/// The destination side of an inline test or of `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToSpec {
    Service {
        service: ServiceId,
        proto: Proto,
        port: u16,
    },
    Address {
        addr: IpAddr,
        proto: Proto,
        port: u16,
    },
}

#[derive(Debug)]
pub struct Expectation {
    pub from: FromSpec,
    pub to: ToSpec,
    pub allow: bool,
    /// The text as written, for reports.
    pub text: String,
    pub loc: Loc,
}

/// A loaded and checked policy.
#[derive(Debug)]
pub struct Policy {
    pub name: String,
    pub version: u64,
    pub kinds: Vec<String>,
    pub tenants: Vec<Tenant>,
    pub sites: Vec<Site>,
    pub segments: Vec<Segment>,
    pub services: Vec<Service>,
    pub rules: Vec<Rule>,
    pub guardrails: Vec<Guardrail>,
    pub expectations: Vec<Expectation>,
    /// Findings that do not stop the policy from being used.
    pub warnings: Vec<Diagnostic>,
    pub sources: SourceMap,
}

/// Why a policy could not be loaded: every error found, with the sources to show them.
#[derive(Debug)]
pub struct PolicyErrors {
    pub sources: SourceMap,
    /// Errors first, then warnings.
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyErrors {
    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    /// All diagnostics rendered with source lines and carets.
    pub fn render(&self) -> String {
        crate::source::Report {
            sources: &self.sources,
            diagnostics: &self.diagnostics,
        }
        .to_string()
    }
}

impl std::fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} error(s) in the policy", self.error_count())?;
        if let Some(first) = self.diagnostics.iter().find(|d| d.is_error()) {
            match &first.loc {
                Some(loc) => write!(
                    f,
                    "; first: {}: {}",
                    self.sources.position(loc),
                    first.message
                )?,
                None => write!(f, "; first: {}", first.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl Policy {
    /// Reads `dir/operator.toml` and `dir/tenants/*.toml`, resolves and checks them.
    pub fn load(dir: &Path) -> Result<Policy, PolicyErrors> {
        let mut sources = SourceMap::default();
        let mut diags = Vec::new();
        let files = read_policy_dir(dir, &mut sources, &mut diags);
        Self::from_sources(sources, files, diags)
    }

    /// Loads a policy from in-memory files: `operator` is the operator file's text, `tenants` are
    /// (file name, text) pairs of the fragments. Used by tests, fuzzing and tools that hold the
    /// files themselves.
    pub fn from_texts(operator: &str, tenants: &[(&str, &str)]) -> Result<Policy, PolicyErrors> {
        let mut sources = SourceMap::default();
        let op = sources.add(PathBuf::from("operator.toml"), operator.to_owned());
        let frags = tenants
            .iter()
            .map(|(name, text)| {
                sources.add(PathBuf::from("tenants").join(name), (*text).to_owned())
            })
            .collect();
        Self::from_sources(
            sources,
            PolicyFiles {
                operator: Some(op),
                fragments: frags,
            },
            Vec::new(),
        )
    }

    fn from_sources(
        sources: SourceMap,
        files: PolicyFiles,
        mut diags: Vec<Diagnostic>,
    ) -> Result<Policy, PolicyErrors> {
        let mut b = Builder::new(&sources);
        if let Some(op) = files.operator {
            b.load_operator(op);
        }
        for f in files.fragments {
            b.load_fragment(f);
        }
        b.finish_checks();
        diags.append(&mut b.diags);
        // A group named by several rules reports its unknown member once, not once per rule.
        let mut seen = std::collections::HashSet::new();
        diags.retain(|d| seen.insert((d.loc.clone(), d.message.clone())));
        diags.sort_by_key(|d| (d.severity, d.loc.as_ref().map(|l| (l.file, l.span.start))));
        if diags.iter().any(Diagnostic::is_error) || b.header.is_none() {
            if b.header.is_none() && !diags.iter().any(Diagnostic::is_error) {
                diags.insert(0, Diagnostic::global("the policy has no operator file"));
            }
            return Err(PolicyErrors {
                sources,
                diagnostics: diags,
            });
        }
        let (name, version, kinds) = b.header.take().unwrap_or_default();
        Ok(Policy {
            name,
            version,
            kinds,
            tenants: b.tenants,
            sites: b.sites,
            segments: b.segments,
            services: b.services,
            rules: b.rules,
            guardrails: b.guardrails,
            expectations: b.expectations,
            warnings: diags,
            sources,
        })
    }

    pub fn tenant_by_name(&self, name: &str) -> Option<TenantId> {
        tenant_index(&self.tenants, name)
    }

    pub fn site_by_name(&self, tenant: TenantId, name: &str) -> Option<SiteId> {
        self.tenants[tenant.index()]
            .sites
            .iter()
            .copied()
            .find(|s| self.sites[s.index()].name == name)
    }

    /// A site by `tenant/site`, or by its bare name when only one tenant has a site of that name.
    pub fn find_site(&self, name: &str) -> Result<SiteId, String> {
        if let Some((t, s)) = name.split_once('/') {
            let tenant = self
                .tenant_by_name(t)
                .ok_or_else(|| format!("no tenant named {t:?}"))?;
            return self
                .site_by_name(tenant, s)
                .ok_or_else(|| format!("tenant {t:?} has no site named {s:?}"));
        }
        let found: Vec<SiteId> = (0..self.sites.len())
            .map(|i| SiteId(i as u32))
            .filter(|s| self.sites[s.index()].name == name)
            .collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!("no site named {name:?}")),
            _ => Err(format!(
                "several tenants have a site named {name:?}: write TENANT/{name}"
            )),
        }
    }

    /// `tenant/segment` as admins write it.
    pub fn segment_name(&self, id: SegmentId) -> String {
        let s = &self.segments[id.index()];
        format!("{}/{}", self.tenants[s.tenant.index()].name, s.name)
    }

    /// `dms` for operator services, `tenant/service` for a tenant's own.
    pub fn service_name(&self, id: ServiceId) -> String {
        let s = &self.services[id.index()];
        match (s.tenant_declared, s.owner) {
            (true, Some(t)) => format!("{}/{}", self.tenants[t.index()].name, s.name),
            _ => s.name.clone(),
        }
    }

    /// A segment named `tenant/segment` (or bare, when `within` names the tenant).
    pub fn find_segment(&self, name: &str, within: Option<TenantId>) -> Option<SegmentId> {
        lookup_segment(&self.tenants, &self.segments, name, within)
    }

    /// A service by its display name (`dms`, `tenant/service`), or bare from inside `within`.
    pub fn find_service(&self, name: &str, within: Option<TenantId>) -> Option<ServiceId> {
        lookup_service(&self.tenants, &self.services, name, within)
    }

    /// The segment an address belongs to (segments never overlap, the checker sees to that).
    pub fn segment_of(&self, addr: IpAddr) -> Option<SegmentId> {
        self.segments
            .iter()
            .position(|s| s.prefixes.iter().any(|p| p.contains(&addr)))
            .map(|i| SegmentId(i as u32))
    }

    /// Resolves certificate identity fields to the policy's indices.
    pub fn peer_identity(
        &self,
        tenant: &str,
        site: Option<&str>,
        role: crate::Role,
    ) -> Option<crate::PeerIdentity> {
        let tenant = self.tenant_by_name(tenant)?;
        let site = match site {
            Some(s) => Some(self.site_by_name(tenant, s)?),
            None => None,
        };
        Some(crate::PeerIdentity { tenant, role, site })
    }

    /// `rule "files" (tenants/musterstadt.toml:30)` and the like, for verdict reports.
    pub fn describe(&self, by: crate::Decider) -> String {
        use crate::Decider;
        match by {
            Decider::Rule(r) => {
                let rule = &self.rules[r.index()];
                format!("rule \"{}\", {}", rule.name, self.sources.cite(&rule.loc))
            }
            Decider::Guardrail(g) => {
                let g = &self.guardrails[g.index()];
                format!("guardrail \"{}\", {}", g.name, self.sources.cite(&g.loc))
            }
            Decider::DefaultDeny => "default deny: no rule allows it".to_owned(),
            Decider::NoSegment => "default deny: the source is in no segment".to_owned(),
            Decider::ForeignSource => {
                "the source address is not one the sending peer may use".to_owned()
            }
            Decider::UnknownProtocol => {
                "the policy names only tcp, udp and icmp; other protocols are denied".to_owned()
            }
        }
    }
}

struct PolicyFiles {
    operator: Option<FileId>,
    fragments: Vec<FileId>,
}

fn read_policy_dir(
    dir: &Path,
    sources: &mut SourceMap,
    diags: &mut Vec<Diagnostic>,
) -> PolicyFiles {
    let mut files = PolicyFiles {
        operator: None,
        fragments: Vec::new(),
    };
    if !dir.is_dir() {
        diags.push(Diagnostic::global(format!(
            "{}: not a directory (a policy is a directory with operator.toml and tenants/*.toml)",
            dir.display()
        )));
        return files;
    }
    files.operator = read_one(&dir.join("operator.toml"), sources, diags);
    let tenants_dir = dir.join("tenants");
    if !tenants_dir.exists() {
        return files;
    }
    let entries = match fs::read_dir(&tenants_dir) {
        Ok(e) => e,
        Err(e) => {
            diags.push(Diagnostic::global(format!(
                "{}: cannot list: {e}",
                tenants_dir.display()
            )));
            return files;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    if paths.len() > MAX_FRAGMENTS {
        diags.push(Diagnostic::global(format!(
            "{}: {} fragments; at most {MAX_FRAGMENTS} are read",
            tenants_dir.display(),
            paths.len()
        )));
        paths.truncate(MAX_FRAGMENTS);
    }
    for p in paths {
        if let Some(id) = read_one(&p, sources, diags) {
            files.fragments.push(id);
        }
    }
    files
}

fn read_one(path: &Path, sources: &mut SourceMap, diags: &mut Vec<Diagnostic>) -> Option<FileId> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            diags.push(Diagnostic::global(format!(
                "{}: cannot read: {e}",
                path.display()
            )));
            return None;
        }
    };
    if bytes.len() > MAX_FILE_BYTES {
        diags.push(Diagnostic::global(format!(
            "{}: {} bytes; policy files are limited to {} bytes",
            path.display(),
            bytes.len(),
            MAX_FILE_BYTES
        )));
        return None;
    }
    match String::from_utf8(bytes) {
        Ok(text) => Some(sources.add(path.to_path_buf(), text)),
        Err(e) => {
            diags.push(Diagnostic::global(format!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            )));
            None
        }
    }
}

fn is_valid_name(s: &str) -> bool {
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
fn reading_order(loc: &Loc) -> (FileId, usize) {
    (loc.file, loc.span.start)
}

pub(crate) fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Where each checked prefix came from, to name both places when two overlap.
struct PrefixOwner {
    net: IpNet,
    what: String,
    loc: Loc,
}

/// A service address with its owner, to refuse one address claimed by two owners.
#[derive(Clone)]
struct ServiceClaim {
    net: IpNet,
    owner: Option<TenantId>,
    service: String,
    loc: Loc,
}

/// A tenant's groups: name → (where declared, members with their places).
type GroupTable = BTreeMap<String, (Loc, Vec<(String, Loc)>)>;

/// Finds a service by name and returns it with its ports.
type ServiceLookup<'a> = &'a dyn Fn(&str) -> Option<(ServiceId, Vec<PortRange>)>;

struct Builder<'s> {
    sources: &'s SourceMap,
    diags: Vec<Diagnostic>,
    header: Option<(String, u64, Vec<String>)>,
    kinds: BTreeMap<String, Loc>,
    tenants: Vec<Tenant>,
    sites: Vec<Site>,
    segments: Vec<Segment>,
    services: Vec<Service>,
    rules: Vec<Rule>,
    guardrails: Vec<Guardrail>,
    expectations: Vec<Expectation>,
    /// Site, data-centre and home-office prefixes of all tenants: none may overlap another.
    claimed: Vec<PrefixOwner>,
    service_claims: Vec<ServiceClaim>,
    fragment_of: HashMap<TenantId, Loc>,
    /// Operator-file items whose references are resolved after all fragments are in.
    pending_guardrails: Vec<(FileId, Spanned<syntax::GuardrailDecl>)>,
    pending_operator_expects: Vec<(FileId, Spanned<syntax::ExpectDecl>)>,
    pending_exports: Vec<(ServiceId, FileId, Vec<Name>)>,
    pending_rules: Vec<(TenantId, FileId, Spanned<syntax::RuleDecl>)>,
    pending_expects: Vec<(TenantId, FileId, Spanned<syntax::ExpectDecl>)>,
    groups: HashMap<TenantId, GroupTable>,
    /// Services and segments whose own declaration had errors: rules naming them are not
    /// checked for reach, so one typo does not cascade into more errors.
    broken_services: BTreeSet<ServiceId>,
    broken_segments: BTreeSet<SegmentId>,
}

impl<'s> Builder<'s> {
    fn new(sources: &'s SourceMap) -> Self {
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
        }
    }

    fn error_count(&self) -> usize {
        self.diags.iter().filter(|d| d.is_error()).count()
    }

    fn err(&mut self, file: FileId, span: std::ops::Range<usize>, msg: impl Into<String>) {
        self.diags
            .push(Diagnostic::error(Loc::new(file, span), msg));
    }

    fn toml_error(&mut self, file: FileId, e: toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim().replace('\n', "; ");
        self.err(file, span, format!("cannot read this file: {msg}"));
    }

    fn name_ok(&mut self, file: FileId, name: &Name, what: &str) -> bool {
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

    fn prefixes(&mut self, file: FileId, list: &[Spanned<String>], what: &str) -> Vec<IpNet> {
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
    fn claim(&mut self, net: IpNet, what: String, loc: Loc) {
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
            let d = Diagnostic::error(
                later.clone(),
                format!(
                    "{later_net} of {later_what} overlaps {earlier_net} of {earlier_what}: tenants' address ranges must not overlap"
                ),
            )
            .with_related(earlier.clone(), format!("{earlier_net} is declared here"));
            self.diags.push(d);
        }
        self.claimed.push(PrefixOwner { net, what, loc });
    }

    fn load_operator(&mut self, file: FileId) {
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

    fn tenant_id(&self, name: &str) -> Option<TenantId> {
        tenant_index(&self.tenants, name)
    }

    fn add_service(
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
        if !tenant_declared {
            self.check_operator_service_addresses(file, &sname, &decl, &addresses, owner);
        }
        self.check_service_claims(file, &sname, &decl, &addresses, owner);
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

    /// A service of the operator file opens firewalls in every site that may reach it, so it
    /// must be where the data centre is: inside its owner's data-centre ranges (the operator's
    /// own services: inside some tenant's data-centre ranges), never a default route, never
    /// inside a site or a home-office pool.
    fn check_operator_service_addresses(
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
    fn check_service_claims(
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

    fn load_fragment(&mut self, file: FileId) {
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
    fn finish_checks(&mut self) {
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

    fn add_guardrail(&mut self, file: FileId, g: Spanned<syntax::GuardrailDecl>) {
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
    fn service_by_ref(&self, name: &str, within: Option<TenantId>) -> Option<ServiceId> {
        lookup_service(&self.tenants, &self.services, name, within)
    }

    fn may_use(&self, tenant: TenantId, service: &Service) -> bool {
        service.owner == Some(tenant)
            || match &service.export {
                Export::All => true,
                Export::Tenants(l) => l.contains(&tenant),
                Export::Nobody => false,
            }
    }

    /// Expands a group member list; records unknown names and cycles.
    fn expand(
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

    fn add_rule(&mut self, tid: TenantId, file: FileId, r: Spanned<syntax::RuleDecl>) {
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
    fn check_rule_reach(&mut self, rule: &Rule) {
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

    fn add_expect(
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

    fn segment_by_ref(&self, name: &str, within: Option<TenantId>) -> Option<SegmentId> {
        lookup_segment(&self.tenants, &self.segments, name, within)
    }
}

fn tenant_index(tenants: &[Tenant], name: &str) -> Option<TenantId> {
    tenants
        .iter()
        .position(|t| t.name == name)
        .map(|i| TenantId(i as u32))
}

/// `tenant/segment`, or a bare segment name of tenant `within`.
fn lookup_segment(
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
fn lookup_service(
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
fn parse_port_part(p: &str, offered: &[PortRange]) -> Result<(Proto, u16), String> {
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
