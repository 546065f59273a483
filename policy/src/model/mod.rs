//! The checked policy: every name resolved to an index, every prefix parsed, every finding of the
//! checker collected (all of them, not just the first). Built by [`Policy::load`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use toml::Spanned;

use crate::flow::{PortRange, Proto};
use crate::schema::FileKind;
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
    /// Where the segment's traffic reaches its site's appliance; `None` for the home-office
    /// segment (it arrives through the tunnel).
    pub binding: Option<Binding>,
    /// `(unique, local)`: a prefix of `prefixes` and the prefix the town hall's LAN really uses
    /// for it (same family and length); the site's appliance translates between them 1:1 at
    /// the tunnel, so that the district only ever sees the unique one.
    pub local: Vec<(IpNet, IpNet)>,
    /// How the site's appliance serves the segment's hosts (DHCPv4, router advertisements);
    /// `None` for the home-office segment and where the fragment says `enabled = false`.
    pub dhcp: Option<Dhcp>,
    pub description: Option<String>,
    pub loc: Loc,
}

impl Segment {
    pub fn is_homeoffice(&self) -> bool {
        self.site.is_none()
    }

    /// The address ranges DHCP leases from (inclusive, with the prefix each lies in): each IPv4
    /// prefix of at most /30 without its network and broadcast address, without the
    /// appliance's own address (the prefix's first host) and without the `reserved` ranges.
    /// Empty when the segment is not served.
    ///
    /// ```toml
    /// [segments.verwaltung]
    /// prefixes = ["10.30.1.0/24"]
    /// dhcp = { reserved = ["10.30.1.2-10.30.1.49"] }   # pool: 10.30.1.50-10.30.1.254
    /// ```
    pub fn dhcp_pools(&self) -> Vec<(ipnet::Ipv4Net, Ipv4Addr, Ipv4Addr)> {
        let Some(dhcp) = &self.dhcp else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for prefix in &self.lan_prefixes() {
            let IpNet::V4(net) = prefix else { continue };
            let Some((first, last)) = leasable(net) else {
                continue;
            };
            let mut free = vec![(u32::from(first), u32::from(last))];
            for (a, b) in &dhcp.reserved {
                let (a, b) = (u32::from(*a), u32::from(*b));
                free = free
                    .into_iter()
                    .flat_map(|(x, y)| {
                        let mut keep = Vec::new();
                        if b < x || a > y {
                            keep.push((x, y));
                        } else {
                            if a > x {
                                keep.push((x, a - 1));
                            }
                            if b < y {
                                keep.push((b + 1, y));
                            }
                        }
                        keep
                    })
                    .collect();
            }
            out.extend(
                free.into_iter()
                    .map(|(x, y)| (*net, Ipv4Addr::from(x), Ipv4Addr::from(y))),
            );
        }
        out
    }

    /// The IPv6 prefixes the appliance announces in router advertisements for SLAAC: the
    /// segment's /64s (SLAAC needs exactly 64 bits of interface identifier). Empty when the
    /// segment is not served.
    pub fn ra_prefixes(&self) -> Vec<ipnet::Ipv6Net> {
        if self.dhcp.is_none() {
            return Vec::new();
        }
        self.lan_prefixes()
            .iter()
            .filter_map(|p| match p {
                IpNet::V6(n) if n.prefix_len() == 64 => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// The segment's prefixes as its town hall's LAN numbers them: each prefix that has a
    /// `local` one replaced by it (the appliance's gateway address, DHCP and the segment check
    /// on the LAN use these).
    ///
    /// ```toml
    /// prefixes = ["10.40.1.0/24"]
    /// local = ["192.168.178.0/24"]      # lan_prefixes: 192.168.178.0/24
    /// ```
    pub fn lan_prefixes(&self) -> Vec<IpNet> {
        self.prefixes
            .iter()
            .map(|p| {
                self.local
                    .iter()
                    .find(|(u, _)| u == p)
                    .map_or(*p, |(_, l)| *l)
            })
            .collect()
    }
}

/// [`Policy::lan_view`] with the site's translations given (`(segment, unique, local)`).
/// Without translations, `nets` as they are (in their order).
pub(crate) fn lan_view_with(pairs: &[(SegmentId, IpNet, IpNet)], nets: &[IpNet]) -> Vec<IpNet> {
    if pairs.is_empty() {
        return nets.to_vec();
    }
    let mut out: Vec<IpNet> = Vec::new();
    for net in nets {
        let mut moved = false;
        for (_, u, l) in pairs {
            if let Some(n) = translate(net, u, l) {
                out.push(n);
                moved = true;
            } else if net.contains(u) && net != u {
                out.push(*l);
            }
        }
        if !moved {
            out.push(*net);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `net` moved from inside `from` to the same place inside `to` (both of one family and
/// length); `None` when `net` is not inside `from`.
pub(crate) fn translate(net: &IpNet, from: &IpNet, to: &IpNet) -> Option<IpNet> {
    if !from.contains(net) || from.prefix_len() != to.prefix_len() {
        return None;
    }
    let addr = match (net.addr(), from.network(), to.network()) {
        (IpAddr::V4(a), IpAddr::V4(f), IpAddr::V4(t)) => {
            IpAddr::V4(Ipv4Addr::from(u32::from(a) - u32::from(f) + u32::from(t)))
        }
        (IpAddr::V6(a), IpAddr::V6(f), IpAddr::V6(t)) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(a) - u128::from(f) + u128::from(t),
        )),
        _ => return None,
    };
    IpNet::new(addr, net.prefix_len()).ok()
}

/// The addresses of `net` a DHCP server may hand out: from the second host (the first is the
/// appliance's) to the last before the broadcast address; `None` below /30.
pub(crate) fn leasable(net: &ipnet::Ipv4Net) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if net.prefix_len() > 30 {
        return None;
    }
    let network = u32::from(net.network());
    let broadcast = u32::from(net.broadcast());
    Some((Ipv4Addr::from(network + 2), Ipv4Addr::from(broadcast - 1)))
}

/// How the appliance serves a segment's hosts: DHCPv4 leases from [`Segment::dhcp_pools`] with
/// the appliance as router, router advertisements on [`Segment::ra_prefixes`]; written in the
/// tenant's fragment (`[segments.NAME.dhcp]`), DNS and lease time also as defaults in the
/// tenant's `[dhcp]` or the operator's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dhcp {
    /// DNS servers for the clients (DHCP option 6; RDNSS in router advertisements).
    pub dns: Vec<IpAddr>,
    /// Where the DNS list that applies was written (the segment's, the tenant's or the
    /// operator's), for warnings.
    pub dns_loc: Option<Loc>,
    /// How long a lease lasts, in seconds.
    pub lease_secs: u32,
    /// Inclusive ranges never leased (static hosts live there).
    pub reserved: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Fixed addresses by MAC, in the order written.
    pub hosts: Vec<DhcpHost>,
}

/// A reservation: the host with this MAC address always gets this address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    /// The host name handed to it (DHCP option 12), if any.
    pub name: Option<String>,
}

impl DhcpHost {
    /// `52:54:00:12:34:56`.
    pub fn mac_text(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// Where a segment of a site reaches the site's appliance: the appliance takes a packet as the
/// segment's only when it arrives there **and** its source lies in the segment's prefixes.
///
/// ```toml
/// [segments.gaeste]
/// kind = "guest"
/// site = "rathaus"
/// prefixes = ["10.20.100.0/24"]
/// vlan = 100            # tagged on the appliance's LAN trunk; or: port = "lan2" (untagged)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Binding {
    /// Tagged with this VLAN id (1-4094) on the appliance's LAN trunk (the first `lan`
    /// interface of its `gateway.toml`).
    Vlan(u16),
    /// Untagged on this interface of the appliance.
    Port(String),
    /// Untagged on the appliance's LAN interfaces: the only segment of its site, which names
    /// neither (policies written before segments were bound keep working).
    Lan,
}

impl Binding {
    /// Whether a segment bound here takes a packet that arrived on `arrived`: the same VLAN or
    /// port, or for a site's only, unbound segment ([`Binding::Lan`]) any untagged port.
    pub fn admits(&self, arrived: &Binding) -> bool {
        self == arrived || (*self == Binding::Lan && matches!(arrived, Binding::Port(_)))
    }
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Binding::Vlan(id) => write!(f, "VLAN {id}"),
            Binding::Port(p) => write!(f, "port {p}"),
            Binding::Lan => f.write_str("the LAN port (untagged)"),
        }
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
    /// Tenants, segments and services by name.
    names: NameIndex,
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
        match files.operator {
            Some(op) => b.load_operator(op),
            None => b.operator_unreadable = Some(0),
        }
        for f in files.fragments {
            b.load_fragment(f);
        }
        b.finish_checks();
        b.note_hidden(files.operator);
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
        let names = std::mem::take(&mut b.names);
        let mut policy = Policy {
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
            names,
        };
        let mut more = policy.dhcp_warnings();
        if !more.is_empty() {
            policy.warnings.append(&mut more);
            policy
                .warnings
                .sort_by_key(|d| (d.severity, d.loc.as_ref().map(|l| (l.file, l.span.start))));
        }
        Ok(policy)
    }

    pub fn tenant_by_name(&self, name: &str) -> Option<TenantId> {
        self.names.tenant(name)
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
            return self.site_by_name(tenant, s).ok_or_else(|| {
                let sites = self.tenants[tenant.index()]
                    .sites
                    .iter()
                    .map(|i| self.sites[i.index()].name.as_str());
                match closest(s, sites) {
                    Some(n) => {
                        format!("tenant {t:?} has no site named {s:?}; did you mean \"{t}/{n}\"?")
                    }
                    None => format!("tenant {t:?} has no site named {s:?}"),
                }
            });
        }
        let found: Vec<SiteId> = (0..self.sites.len())
            .map(|i| SiteId(i as u32))
            .filter(|s| self.sites[s.index()].name == name)
            .collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => {
                let all: Vec<String> = self
                    .sites
                    .iter()
                    .map(|s| format!("{}/{}", self.tenants[s.tenant.index()].name, s.name))
                    .collect();
                let near = closest(name, self.sites.iter().map(|s| s.name.as_str()))
                    .or_else(|| closest(name, all.iter().map(String::as_str)));
                Err(match near {
                    Some(n) => format!("no site named {name:?}; did you mean {n:?}?"),
                    None => format!("no site named {name:?} (write SITE or TENANT/SITE)"),
                })
            }
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
        self.names.segment(name, within)
    }

    /// A service by its display name (`dms`, `tenant/service`), or bare from inside `within`.
    pub fn find_service(&self, name: &str, within: Option<TenantId>) -> Option<ServiceId> {
        self.names.service(name, within)
    }

    /// The segments of `site`, in the policy's order.
    pub fn site_segments(&self, site: SiteId) -> impl Iterator<Item = SegmentId> + '_ {
        (0..self.segments.len())
            .map(|i| SegmentId(i as u32))
            .filter(move |s| self.segments[s.index()].site == Some(site))
    }

    /// The segment of `site` that takes what arrives on `binding`, if any.
    pub fn segment_on(&self, site: SiteId, binding: &Binding) -> Option<SegmentId> {
        self.site_segments(site).find(|s| {
            self.segments[s.index()]
                .binding
                .as_ref()
                .is_some_and(|b| b.admits(binding))
        })
    }

    /// The site `addr` belongs to (through its segment, or else the site's prefixes).
    pub fn site_of(&self, addr: IpAddr) -> Option<SiteId> {
        if let Some(seg) = self.segment_of(addr) {
            return self.segments[seg.index()].site;
        }
        self.sites
            .iter()
            .position(|s| s.prefixes.iter().any(|p| p.contains(&addr)))
            .map(|i| SiteId(i as u32))
    }

    /// The segment an address belongs to (segments never overlap, the checker sees to that).
    pub fn segment_of(&self, addr: IpAddr) -> Option<SegmentId> {
        self.segments
            .iter()
            .position(|s| s.prefixes.iter().any(|p| p.contains(&addr)))
            .map(|i| SegmentId(i as u32))
    }

    /// The translations of `site`: `(segment, unique, local)` for every segment prefix the
    /// town hall numbers differently (`local = [...]`).
    pub fn site_translations(&self, site: SiteId) -> Vec<(SegmentId, IpNet, IpNet)> {
        self.site_segments(site)
            .flat_map(|s| {
                self.segments[s.index()]
                    .local
                    .iter()
                    .map(move |(u, l)| (s, *u, *l))
            })
            .collect()
    }

    /// `nets` as the LAN of `site` sees them: what lies inside a translated unique prefix of
    /// the site moved to its local prefix (a prefix larger than a translated one keeps its
    /// unique addresses and gains the local prefix as well); everything else as it is. On the
    /// site's appliance every address of its own LAN is the local one.
    pub fn lan_view(&self, site: SiteId, nets: &[IpNet]) -> Vec<IpNet> {
        lan_view_with(&self.site_translations(site), nets)
    }

    /// The district-unique address of `addr` as the LAN of `site` numbers it: itself unless it
    /// lies in a local prefix of one of the site's segments.
    ///
    /// With `prefixes = ["10.40.1.0/24"]`, `local = ["192.168.178.0/24"]`: 192.168.178.77 is
    /// 10.40.1.77.
    pub fn unique_of(&self, site: SiteId, addr: IpAddr) -> IpAddr {
        self.site_translations(site)
            .iter()
            .find_map(|(_, u, l)| translate(&IpNet::from(addr), l, u))
            .map_or(addr, |n| n.addr())
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
            Decider::SegmentSpoof => {
                "dropped as segment_spoof: the source address does not belong to the segment that arrives there".to_owned()
            }
        }
    }
}

mod check;
mod dhcp;
mod fragment;
mod hint;
mod load;
mod local;
mod rules;

use check::*;
pub(crate) use hint::closest;
use load::*;
use rules::*;

pub(crate) use check::share_family;
pub(crate) use rules::{resolve_from, resolve_to, to_port_hint, to_target};
