//! komnet-policy: the segmentation policy network admins edit as files.
//!
//! It will own the policy language (tenants, segments, services, rules, guardrails, inline
//! tests), its checker and the compiler to a packet-path classifier and to nftables rules. It
//! knows nothing of sockets or certificates beyond the identity fields. Its issue fills this
//! crate; until then it is intentionally empty.
#![forbid(unsafe_code)]
