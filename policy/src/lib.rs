//! komnet-policy: the segmentation policy network admins edit as files.
//!
//! It owns the policy language (a directory: `operator.toml` for the data-centre operator,
//! `tenants/<tenant>.toml` per commune, see `docs/policy.md`), the checker that reports every
//! error with file, line and column, the reference evaluator ([`decide`], the oracle), the
//! compiled [`Classifier`] for the userspace packet path, the nftables compiler for a site's
//! appliance, the admin queries (`test`, `explain`, `query`, `diff`) and the hot-reload handle.
//! It knows nothing of sockets or certificates beyond the identity fields (tenant, site, role).
#![forbid(unsafe_code)]

mod analysis;
pub mod bundle;
mod classifier;
mod flow;
pub mod format;
mod model;
pub mod nft;
mod oracle;
mod reload;
pub mod schema;
mod source;
mod syntax;
pub mod synthetic;

pub use analysis::{
    destination_hint, diff, explain, explain_at, query_segment, query_service, run_tests,
    version_finding, Arrival, Explanation, FlowChange, Reach, TestOutcome, TestReport,
};
pub use classifier::Classifier;
pub use flow::{Origin, PacketMeta, PeerIdentity, PortRange, Proto, Role};
pub use model::{
    Binding, Dhcp, DhcpHost, Expectation, Export, FromSpec, GuardTarget, Guardrail, GuardrailId,
    Policy, PolicyErrors, Rule, RuleId, Segment, SegmentId, Service, ServiceId, Site, SiteId,
    Tenant, TenantId, ToSpec, MAX_FILE_BYTES, MAX_FRAGMENTS,
};
pub use oracle::{decide, decide_arrival, Decider, Decision};
pub use reload::{CompiledPolicy, PolicyHandle, ReloadError};
pub use source::{Diagnostic, FileId, Loc, Severity, SourceMap};
