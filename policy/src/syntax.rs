//! The policy files as written: TOML documents deserialised with their spans, before any name is
//! resolved. `model` turns them into a checked [`crate::Policy`].

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub(crate) type Name = Spanned<String>;

/// `operator.toml`: what only the data-centre operator decides.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OperatorFile {
    pub(crate) policy: PolicyHeader,
    #[serde(default)]
    pub(crate) tenants: BTreeMap<Name, TenantDecl>,
    #[serde(default)]
    pub(crate) services: BTreeMap<Name, ServiceDecl>,
    #[serde(default)]
    pub(crate) guardrail: Vec<Spanned<GuardrailDecl>>,
    #[serde(default)]
    pub(crate) expect: Vec<Spanned<ExpectDecl>>,
    /// What every town-hall segment's DHCP clients get unless a tenant says otherwise.
    #[serde(default)]
    pub(crate) dhcp: Option<DhcpDefaults>,
}

/// `[dhcp]` in operator.toml (the district's default) or in a tenant's file (that tenant's).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DhcpDefaults {
    /// DNS servers handed to DHCP clients (and in router advertisements).
    #[serde(default)]
    pub(crate) dns: Option<Vec<Spanned<String>>>,
    /// How long a lease lasts (`12h`, `1d`).
    #[serde(default)]
    pub(crate) lease: Option<Spanned<String>>,
}

/// `[segments.NAME.dhcp]`: how the appliance serves one segment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SegmentDhcpDecl {
    /// `false`: the appliance hands out nothing here (another DHCP server serves it).
    #[serde(default)]
    pub(crate) enabled: Option<Spanned<bool>>,
    #[serde(default)]
    pub(crate) dns: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) lease: Option<Spanned<String>>,
    /// Addresses or ranges (`10.30.1.2-10.30.1.49`) never leased: static hosts live there.
    #[serde(default)]
    pub(crate) reserved: Vec<Spanned<String>>,
    /// Fixed addresses by MAC.
    #[serde(default)]
    pub(crate) hosts: Vec<Spanned<DhcpHostDecl>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DhcpHostDecl {
    pub(crate) mac: Spanned<String>,
    pub(crate) address: Spanned<String>,
    #[serde(default)]
    pub(crate) name: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyHeader {
    pub(crate) name: Spanned<String>,
    /// Monotonic version of the policy; bundles refuse to go backwards.
    pub(crate) version: Spanned<i64>,
    /// The segment kinds tenants may use; guardrails refer to them.
    pub(crate) kinds: Vec<Name>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantDecl {
    #[serde(default)]
    pub(crate) description: Option<String>,
    /// Where this tenant's servers live in the data centre: its services must lie inside.
    #[serde(default)]
    pub(crate) datacenter: Vec<Spanned<String>>,
    /// The pool home-office identities get their tunnel addresses from.
    #[serde(default)]
    pub(crate) homeoffice: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) sites: BTreeMap<Name, SiteDecl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SiteDecl {
    #[serde(default)]
    pub(crate) description: Option<String>,
    pub(crate) prefixes: Vec<Spanned<String>>,
}

/// A tenant's own file under `tenants/`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantFile {
    pub(crate) tenant: Name,
    #[serde(default)]
    pub(crate) segments: BTreeMap<Name, SegmentDecl>,
    #[serde(default)]
    pub(crate) groups: BTreeMap<Name, Vec<Name>>,
    #[serde(default)]
    pub(crate) services: BTreeMap<Name, ServiceDecl>,
    #[serde(default)]
    pub(crate) rule: Vec<Spanned<RuleDecl>>,
    #[serde(default)]
    pub(crate) expect: Vec<Spanned<ExpectDecl>>,
    /// This tenant's DHCP defaults (over the operator's).
    #[serde(default)]
    pub(crate) dhcp: Option<DhcpDefaults>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SegmentDecl {
    pub(crate) kind: Name,
    /// The site the segment is at; absent for the home-office segment.
    #[serde(default)]
    pub(crate) site: Option<Name>,
    #[serde(default)]
    pub(crate) prefixes: Vec<Spanned<String>>,
    /// Arrives tagged with this VLAN id on the appliance's LAN trunk.
    #[serde(default)]
    pub(crate) vlan: Option<Spanned<i64>>,
    /// Arrives untagged on this interface of the appliance.
    #[serde(default)]
    pub(crate) port: Option<Spanned<String>>,
    /// DHCP and router advertisements on this segment (served by default).
    #[serde(default)]
    pub(crate) dhcp: Option<Spanned<SegmentDhcpDecl>>,
    #[serde(default)]
    pub(crate) description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceDecl {
    /// Operator file only: the tenant that owns a shared service (`operator` when nobody does).
    #[serde(default)]
    pub(crate) owner: Option<Name>,
    #[serde(default)]
    pub(crate) description: Option<String>,
    pub(crate) addresses: Vec<Spanned<String>>,
    pub(crate) ports: Vec<Spanned<String>>,
    /// Tenants allowed to write rules towards this service; `"*"` for all.
    #[serde(default)]
    pub(crate) export: Vec<Name>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleDecl {
    pub(crate) name: Name,
    pub(crate) from: Vec<Name>,
    pub(crate) to: Vec<Name>,
    /// Narrows the services' ports; every entry must be a port the service offers.
    #[serde(default)]
    pub(crate) ports: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GuardrailDecl {
    pub(crate) name: Name,
    /// Segment kinds the guardrail applies to.
    pub(crate) from_kinds: Vec<Name>,
    /// Optionally only these tenants' segments.
    #[serde(default)]
    pub(crate) from_tenants: Vec<Name>,
    /// Services it protects, or `"*"`: every destination.
    pub(crate) to: Vec<Name>,
    #[serde(default)]
    pub(crate) why: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExpectDecl {
    /// A segment (`staff`, `musterstadt/staff`) or an address.
    pub(crate) from: Spanned<String>,
    /// `SERVICE[:PORT[/PROTO]]` or `ADDR[:PORT/PROTO]` (IPv6 in brackets).
    pub(crate) to: Spanned<String>,
    /// `allow` or `deny`.
    pub(crate) verdict: Spanned<String>,
}
