//! komnet-proto: the vocabulary every part of komnet speaks.
//!
//! It owns the validated names (tenant, site), the one [`identity::Role`] and the one
//! [`identity::Identity`] a certificate binds, the enrollment API's requests, answers, registry
//! events and typed errors ([`api`]), the bootstrap file ([`bootstrap`]), the status report an
//! appliance serves ([`status`]), durations and configuration errors ([`config`]), the one
//! way files are written ([`files`]), what a source is and the one token bucket for rate
//! limits ([`limit`]), and the one longest-prefix-match table ([`prefix_table`]); with the
//! feature `logging`, the programs' one logging setup, and with `service-manager` the daemons'
//! readiness and keep-alives for systemd ([`service_manager`]).
//! Beyond those files and that one datagram to systemd it does no I/O: no network sockets, no
//! TLS, no certificates; the enrollment service, its client, the gateway and the
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
pub mod prefix_table;
#[cfg(feature = "service-manager")]
pub mod service_manager;
pub mod status;
