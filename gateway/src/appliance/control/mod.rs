//! The appliance's control plane as sans-IO state machines: fed with events and the time
//! (`handle_*`, with `now` passed in), they decide; the drivers around them (`super::hub`,
//! `super::spoke`, `super::identity`, `super::policy`) do the I/O and come back with the result.
//! Nothing here reads a clock, sleeps, opens a socket or touches a file, so failover, renewal,
//! registry loss, bootstrap waiting and policy prepare/commit are tested with simulated time in
//! milliseconds (the namespace tests in `tests/` remain the end-to-end layer).
//!
//! - [`spoke::SpokeCore`]: which hub carries the traffic, when to fail over, when to refresh the
//!   hub list, when to retry the LAN addresses.
//! - [`hub::HubCore`]: the registry view, which identities are admitted (through
//!   [`crate::admission`]), certificate expiry, and the [`hub::RegistryLink`] to the registry.
//! - [`renewal::RenewalSchedule`]: when to renew the certificate and when to retry.
//! - [`policy::PolicySlot`]: the policy in force, prepare → install → commit, refusals.
//! - [`bootstrap::BootstrapWatch`]: waiting for a usable bootstrap file on first start.
//!
//! Verbs follow `shared/style.md`: `handle_*` takes input, `poll_*` drains output,
//! `next_timeout` says when to call `handle_timeout` again.

pub mod bootstrap;
pub mod hub;
pub mod policy;
pub mod renewal;
pub mod spoke;

use std::collections::BTreeMap;

/// Control-plane events counted for `/status` and `/metrics` (`komnet_events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ControlEvent {
    BootstrapUnreadable,
    BootstrapWithoutPolicyKey,
    EnrollRefused,
    EnrollRetry,
    Enrolled,
    Failover,
    /// Spoke: the forwarding fence (ip rules) was set or restored.
    FenceSet,
    HubRehandshake,
    LanAddressesFailed,
    /// Spoke: the komnet nftables table was missing or changed and was reinstalled.
    NftReinstalled,
    PeerAdmitted,
    PeerExpired,
    PeerRefused,
    PeerRemoved,
    PolicyInstalled,
    PolicyRefused,
    RegistryEvent,
    RegistryLost,
    /// Hub: the registry outage lasted beyond its alarm bound.
    RegistryOutageAlarm,
    /// Hub: the registry stream missed three keep-alives and was given up.
    RegistrySilent,
    RenewFailed,
    Renewed,
    /// Reverse-path filtering was switched to strict on an interface (at start, or on one
    /// that appeared or was changed later).
    RpFilterSet,
}

impl ControlEvent {
    /// The name in `/status` (`counters`) and in the metric's `event` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlEvent::BootstrapUnreadable => "bootstrap_unreadable",
            ControlEvent::BootstrapWithoutPolicyKey => "bootstrap_without_policy_key",
            ControlEvent::EnrollRefused => "enroll_refused",
            ControlEvent::EnrollRetry => "enroll_retry",
            ControlEvent::Enrolled => "enrolled",
            ControlEvent::Failover => "failover",
            ControlEvent::FenceSet => "fence_set",
            ControlEvent::HubRehandshake => "hub_rehandshake",
            ControlEvent::LanAddressesFailed => "lan_addresses_failed",
            ControlEvent::NftReinstalled => "nft_reinstalled",
            ControlEvent::PeerAdmitted => "peer_admitted",
            ControlEvent::PeerExpired => "peer_expired",
            ControlEvent::PeerRefused => "peer_refused",
            ControlEvent::PeerRemoved => "peer_removed",
            ControlEvent::PolicyInstalled => "policy_installed",
            ControlEvent::PolicyRefused => "policy_refused",
            ControlEvent::RegistryEvent => "registry_event",
            ControlEvent::RegistryLost => "registry_lost",
            ControlEvent::RegistryOutageAlarm => "registry_outage_alarm",
            ControlEvent::RegistrySilent => "registry_silent",
            ControlEvent::RenewFailed => "renew_failed",
            ControlEvent::Renewed => "renewed",
            ControlEvent::RpFilterSet => "rp_filter_set",
        }
    }
}

/// Counts of [`ControlEvent`]s; they only ever go up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(BTreeMap<ControlEvent, u64>);

impl Counters {
    pub fn count(&mut self, event: ControlEvent) {
        *self.0.entry(event).or_default() += 1;
    }

    pub fn get(&self, event: ControlEvent) -> u64 {
        self.0.get(&event).copied().unwrap_or(0)
    }

    /// Adds another set of counts (a core's) to these.
    pub fn absorb(&mut self, other: &Counters) {
        for (k, v) in &other.0 {
            *self.0.entry(*k).or_default() += v;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (ControlEvent, u64)> + '_ {
        self.0.iter().map(|(k, v)| (*k, *v))
    }
}
