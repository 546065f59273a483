//! The policy files as written: TOML documents deserialised with their spans, before any name is
//! resolved. `model` turns them into a checked [`crate::Policy`].
//!
//! These types are also the source of the files' JSON Schema (`crate::schema`): their doc
//! comments are what an editor shows for a key, so they are written for the admin.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use toml::Spanned;

use crate::schema::{
    Address, AddressRange, DurationText, Kind, LocalName, MacAddress, NameOrAll, PortText,
    Reference, ReferenceOrAll, TestFrom, TestTo, Verdict, VlanId,
};

pub(crate) type Name = Spanned<String>;

/// `operator.toml`: what only the data-centre operator decides — tenants, their address space,
/// shared services, guardrails no tenant rule can override, the operator's own tests.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "komnet policy: operator.toml")]
pub(crate) struct OperatorFile {
    /// The policy's name, version and segment kinds.
    pub(crate) policy: PolicyHeader,
    /// The tenants (communes, the county, the operator itself): `[tenants.NAME]`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<LocalName, TenantDecl>")]
    pub(crate) tenants: BTreeMap<Name, TenantDecl>,
    /// Shared services in the data centre: `[services.NAME]`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<LocalName, ServiceDecl>")]
    pub(crate) services: BTreeMap<Name, ServiceDecl>,
    /// Denies that beat every rule: `[[guardrail]]`.
    #[serde(default)]
    #[schemars(with = "Vec<GuardrailDecl>")]
    pub(crate) guardrail: Vec<Spanned<GuardrailDecl>>,
    /// Inline tests: `[[expect]]`.
    #[serde(default)]
    #[schemars(with = "Vec<ExpectDecl>")]
    pub(crate) expect: Vec<Spanned<ExpectDecl>>,
    /// What every town-hall segment's DHCP clients get unless their tenant or segment says
    /// otherwise: `[dhcp]`.
    #[serde(default)]
    pub(crate) dhcp: Option<DhcpDefaults>,
}

/// `[dhcp]` in operator.toml (the district's default) or in a tenant's file (that tenant's).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DhcpDefaults {
    /// DNS servers handed to DHCP clients (and announced in router advertisements); `[]`:
    /// none.
    #[serde(default)]
    #[schemars(with = "Option<Vec<Address>>")]
    pub(crate) dns: Option<Vec<Spanned<String>>>,
    /// How long a lease lasts (2m to 365d; default 12h).
    #[serde(default)]
    #[schemars(with = "Option<DurationText>")]
    pub(crate) lease: Option<Spanned<String>>,
}

/// `[segments.NAME.dhcp]`: how the appliance serves one segment (DHCPv4 from its IPv4 prefixes,
/// router advertisements on its IPv6 /64s). Every site segment is served unless it says
/// `enabled = false`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SegmentDhcpDecl {
    /// `false`: the appliance hands out nothing here (another DHCP server serves it).
    #[serde(default)]
    #[schemars(with = "Option<bool>")]
    pub(crate) enabled: Option<Spanned<bool>>,
    /// DNS servers for this segment, over the tenant's and the operator's; `[]`: none.
    #[serde(default)]
    #[schemars(with = "Option<Vec<Address>>")]
    pub(crate) dns: Option<Vec<Spanned<String>>>,
    /// Lease time for this segment (2m to 365d).
    #[serde(default)]
    #[schemars(with = "Option<DurationText>")]
    pub(crate) lease: Option<Spanned<String>>,
    /// Addresses or ranges never leased (`10.30.1.2-10.30.1.49`): static hosts live there.
    #[serde(default)]
    #[schemars(with = "Vec<AddressRange>")]
    pub(crate) reserved: Vec<Spanned<String>>,
    /// Fixed addresses by MAC: `{ mac = "52:54:00:12:34:56", address = "10.30.1.20", name = "drucker" }`.
    #[serde(default)]
    #[schemars(with = "Vec<DhcpHostDecl>")]
    pub(crate) hosts: Vec<Spanned<DhcpHostDecl>>,
}

/// A reservation: the host with this MAC address always gets this address.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DhcpHostDecl {
    /// The host's MAC address (`52:54:00:12:34:56`).
    #[schemars(with = "MacAddress")]
    pub(crate) mac: Spanned<String>,
    /// Its IPv4 address, in the segment.
    #[schemars(with = "Address")]
    pub(crate) address: Spanned<String>,
    /// The host name it is given (letters, digits, '-').
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub(crate) name: Option<Spanned<String>>,
}

/// `[policy]`: what the whole policy is.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyHeader {
    /// The policy's name, shown by `check` and in bundles.
    #[schemars(with = "String")]
    pub(crate) name: Spanned<String>,
    /// A number that only goes up: gateways refuse a bundle with a lower version.
    #[schemars(with = "u64")]
    pub(crate) version: Spanned<i64>,
    /// The segment kinds tenants may use (`staff`, `guest`, `iot`, …); guardrails refer to kinds.
    #[schemars(with = "Vec<LocalName>")]
    pub(crate) kinds: Vec<Name>,
    /// The enrollment service's tunnel pools (its `tunnel_pool_v4`/`_v6`): no site and no local
    /// prefix may overlap them.
    #[serde(default)]
    #[schemars(with = "Vec<Address>")]
    pub(crate) tunnel: Vec<Spanned<String>>,
}

/// `[tenants.NAME]`: a tenant and its address space.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantDecl {
    /// Free text for people.
    #[serde(default)]
    pub(crate) description: Option<String>,
    /// Where this tenant's servers live in the data centre (prefixes); its services lie inside
    /// these or inside its sites.
    #[serde(default)]
    #[schemars(with = "Vec<Address>")]
    pub(crate) datacenter: Vec<Spanned<String>>,
    /// The pool home-office devices get their tunnel addresses from: a range of its own, outside
    /// every site and data-centre range. In the tenant's fragment it is the home-office segment
    /// (a segment with no site).
    #[serde(default)]
    #[schemars(with = "Vec<Address>")]
    pub(crate) homeoffice: Vec<Spanned<String>>,
    /// The tenant's sites (town hall, depot): `[tenants.T.sites.NAME]`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<LocalName, SiteDecl>")]
    pub(crate) sites: BTreeMap<Name, SiteDecl>,
}

/// `[tenants.T.sites.NAME]`: a site of a tenant and its address ranges.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SiteDecl {
    /// Free text for people.
    #[serde(default)]
    pub(crate) description: Option<String>,
    /// The site's address ranges, IPv4 and IPv6; its segments lie inside.
    #[schemars(with = "Vec<Address>")]
    pub(crate) prefixes: Vec<Spanned<String>>,
}

/// `tenants/TENANT.toml`: one tenant's fragment — segments, groups, own services, rules, tests.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "komnet policy: tenants/TENANT.toml")]
pub(crate) struct TenantFile {
    /// Whose fragment this is; the file is tenants/TENANT.toml.
    #[schemars(with = "LocalName")]
    pub(crate) tenant: Name,
    /// The tenant's networks: `[segments.NAME]`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<LocalName, SegmentDecl>")]
    pub(crate) segments: BTreeMap<Name, SegmentDecl>,
    /// Names for sets of segments (and other groups): `NAME = ["segment", "group", …]`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<LocalName, Vec<LocalName>>")]
    pub(crate) groups: BTreeMap<Name, Vec<Name>>,
    /// The tenant's own services (its file server): `[services.NAME]`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<LocalName, TenantServiceDecl>")]
    pub(crate) services: BTreeMap<Name, ServiceDecl>,
    /// What the tenant's segments may reach: `[[rule]]`.
    #[serde(default)]
    #[schemars(with = "Vec<RuleDecl>")]
    pub(crate) rule: Vec<Spanned<RuleDecl>>,
    /// Inline tests: `[[expect]]`.
    #[serde(default)]
    #[schemars(with = "Vec<ExpectDecl>")]
    pub(crate) expect: Vec<Spanned<ExpectDecl>>,
    /// This tenant's DHCP defaults (DNS servers, lease time), over the operator's: `[dhcp]`.
    #[serde(default)]
    pub(crate) dhcp: Option<DhcpDefaults>,
}

/// `[segments.NAME]`: a network at one of the tenant's sites, or (without `site`) the tenant's
/// home-office segment.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SegmentDecl {
    /// The segment's kind, one of the operator's `kinds` (guardrails refer to kinds).
    #[schemars(with = "Kind")]
    pub(crate) kind: Name,
    /// The site the segment is at; absent for the home-office segment.
    #[serde(default)]
    #[schemars(with = "Option<LocalName>")]
    pub(crate) site: Option<Name>,
    /// The segment's address ranges, inside its site's; none for the home-office segment (its
    /// addresses are the tenant's home-office pool).
    #[serde(default)]
    #[schemars(with = "Vec<Address>")]
    pub(crate) prefixes: Vec<Spanned<String>>,
    /// Arrives tagged with this VLAN id (1-4094) on the appliance's LAN trunk.
    #[serde(default)]
    #[schemars(with = "Option<VlanId>")]
    pub(crate) vlan: Option<Spanned<i64>>,
    /// Arrives untagged on this interface of the appliance (like "lan2").
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub(crate) port: Option<Spanned<String>>,
    /// The prefixes as the town hall numbers this LAN, where that is not the district-unique
    /// `prefixes`: `local[i]` is `prefixes[i]` on the LAN (same family and length), and the
    /// appliance translates 1:1 at the tunnel.
    #[serde(default)]
    #[schemars(with = "Vec<Address>")]
    pub(crate) local: Vec<Spanned<String>>,
    /// DHCP and router advertisements on this segment (served unless `enabled = false`).
    #[serde(default)]
    #[schemars(with = "Option<SegmentDhcpDecl>")]
    pub(crate) dhcp: Option<Spanned<SegmentDhcpDecl>>,
    /// Free text for people.
    #[serde(default)]
    pub(crate) description: Option<String>,
}

/// `[services.NAME]` in operator.toml: a shared service in the data centre.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceDecl {
    /// Operator file only: the tenant that owns a shared service (the county owns the DMS), or
    /// "operator" (the same as leaving it out).
    #[serde(default)]
    #[schemars(with = "Option<LocalName>")]
    pub(crate) owner: Option<Name>,
    /// Free text for people.
    #[serde(default)]
    pub(crate) description: Option<String>,
    /// The servers' addresses (single addresses or prefixes), IPv4 and IPv6.
    #[schemars(with = "Vec<Address>")]
    pub(crate) addresses: Vec<Spanned<String>>,
    /// What the service offers: "tcp/443", "udp/5060-5061", "tcp/*", "icmp".
    #[schemars(with = "Vec<PortText>")]
    pub(crate) ports: Vec<Spanned<String>>,
    /// Tenants allowed to write rules towards this service; "*" for all.
    #[serde(default)]
    #[schemars(with = "Vec<NameOrAll>")]
    pub(crate) export: Vec<Name>,
}

/// `[services.NAME]` in a tenant's fragment: the tenant's own service. Like a shared service,
/// without `owner` (it is the tenant's).
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only its schema is used: the fragment's services parse as `ServiceDecl`
struct TenantServiceDecl {
    /// Free text for people.
    #[serde(default)]
    description: Option<String>,
    /// The servers' addresses, inside the tenant's data-centre ranges or its sites.
    addresses: Vec<Address>,
    /// What the service offers: "tcp/443", "udp/5060-5061", "tcp/*", "icmp".
    ports: Vec<PortText>,
    /// Other tenants allowed to write rules towards this service; "*" for all.
    #[serde(default)]
    export: Vec<NameOrAll>,
}

/// `[[rule]]`: allows segments to reach services.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleDecl {
    /// The rule's name, unique in the fragment; verdicts cite it.
    #[schemars(with = "LocalName")]
    pub(crate) name: Name,
    /// The tenant's own segments and groups.
    #[schemars(with = "Vec<LocalName>")]
    pub(crate) from: Vec<Name>,
    /// Services: own ("fileserver"), shared ("dms"), another tenant's exported to this one
    /// ("musterstadt/fileserver").
    #[schemars(with = "Vec<Reference>")]
    pub(crate) to: Vec<Name>,
    /// Narrows the services' ports; every entry must be a port a service offers.
    #[serde(default)]
    #[schemars(with = "Vec<PortText>")]
    pub(crate) ports: Vec<Spanned<String>>,
    /// Free text for people.
    #[serde(default)]
    pub(crate) description: Option<String>,
}

/// `[[guardrail]]`: a deny of the operator that beats every rule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GuardrailDecl {
    /// The guardrail's name; verdicts cite it.
    #[schemars(with = "LocalName")]
    pub(crate) name: Name,
    /// Segment kinds the guardrail applies to.
    #[schemars(with = "Vec<Kind>")]
    pub(crate) from_kinds: Vec<Name>,
    /// Optionally only these tenants' segments.
    #[serde(default)]
    #[schemars(with = "Vec<LocalName>")]
    pub(crate) from_tenants: Vec<Name>,
    /// Services it protects ("dms", "TENANT/SERVICE"), or "*": every destination.
    #[schemars(with = "Vec<ReferenceOrAll>")]
    pub(crate) to: Vec<Name>,
    /// Why, for people (shown with the guardrail).
    #[serde(default)]
    pub(crate) why: Option<String>,
}

/// `[[expect]]`: an inline test, run by `komnet policy test`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExpectDecl {
    /// A segment ("staff", "musterstadt/staff") or an address.
    #[schemars(with = "TestFrom")]
    pub(crate) from: Spanned<String>,
    /// SERVICE[:PROTO/PORT], SERVICE:icmp, ADDR:PROTO/PORT, [V6ADDR]:PROTO/PORT.
    #[schemars(with = "TestTo")]
    pub(crate) to: Spanned<String>,
    /// "allow" or "deny".
    #[schemars(with = "Verdict")]
    pub(crate) verdict: Spanned<String>,
}
