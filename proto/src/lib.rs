//! komnet-proto: the vocabulary every part of komnet speaks.
//!
//! It owns the validated names (tenant, site), the one [`identity::Role`] and the one
//! [`identity::Identity`] a certificate binds, the enrollment API's requests, answers, registry
//! events and typed errors ([`api`]), the bootstrap file ([`bootstrap`]), the status report an
//! appliance serves ([`status`]), durations and configuration errors ([`config`]), the one
//! way files are written ([`files`]), and what a source is and the one token bucket for rate
//! limits ([`limit`]); with the feature `logging`, the programs' one logging setup. It does no I/O beyond reading and writing those files: no
//! sockets, no TLS, no certificates; the enrollment service, its client, the gateway and the
//! command line all depend on it, and it depends on none of them.
#![forbid(unsafe_code)]

pub mod api;
pub mod bootstrap;
pub mod config;
pub mod files;
pub mod identity;
pub mod limit;
#[cfg(feature = "logging")]
pub mod logging;
pub mod status;
