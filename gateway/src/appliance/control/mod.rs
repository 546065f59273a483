//! The appliance's control plane as sans-IO state machines: fed with events and the time
//! (`handle_*`, with `now` passed in), they decide; the drivers around them (`super::hub`,
//! `super::spoke`, `super::identity`, `super::policy`) do the I/O and come back with the result.
//! Nothing here reads a clock, sleeps, opens a socket or touches a file, so failover, renewal,
//! registry loss, bootstrap waiting and policy prepare/commit are tested with simulated time in
//! milliseconds (the namespace tests in `tests/` remain the end-to-end layer).
//!
//! - [`spoke::SpokeCore`]: which hub carries the traffic, when to fail over, when to refresh the
//!   hub list, when to retry the LAN addresses.
//! - [`announce::Announcer`]: which peers' prefixes a hub announces by BGP (those sending to
//!   it now), and the changes to its announcement table; [`bird`]: its BGP sessions as the hub
//!   machine's BIRD reports them.
//! - [`hub::HubCore`]: the registry view, which identities are admitted (through
//!   [`crate::admission`]), certificate expiry, and the [`hub::RegistryLink`] to the registry.
//! - [`renewal::RenewalSchedule`]: when to renew the certificate and when to retry.
//! - [`policy::PolicySlot`]: the policy in force, prepare → install → commit, refusals.
//! - [`bootstrap::BootstrapWatch`]: waiting for a usable bootstrap file on first start.
//!
//! Verbs follow `shared/style.md`: `handle_*` takes input, `poll_*` drains output,
//! `next_timeout` says when to call `handle_timeout` again.

pub mod announce;
pub mod bird;
pub mod bootstrap;
pub mod hub;
pub mod link;
pub mod policy;
pub mod renewal;
pub mod spoke;

use std::collections::BTreeMap;

/// Control-plane events counted for `/status` and `/metrics` (`komnet_events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ControlEvent {
    /// Hub with `[bgp] bird_socket`: a BGP session stopped being Established (or was not at
    /// the hub's first look).
    BgpSessionDown,
    /// Hub with `[bgp] bird_socket`: a BGP session became Established again.
    BgpSessionUp,
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
    /// Hub: an MFA-gated home office's window ended (until its person signs in again).
    MfaWindowClosed,
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
    /// Hub with `[bgp]`: a peer's prefix was put into the announcement table.
    RouteAnnounced,
    /// Hub with `[bgp]`: a prefix was taken out of the announcement table.
    RouteWithdrawn,
    /// Hub with `[bgp]`: the announcement table could not be changed (retried).
    RouteTableFailed,
    /// Reverse-path filtering was switched to strict on an interface (at start, or on one
    /// that appeared or was changed later).
    RpFilterSet,
}

impl ControlEvent {
    /// The name in `/status` (`counters`) and in the metric's `event` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlEvent::BgpSessionDown => "bgp_session_down",
            ControlEvent::BgpSessionUp => "bgp_session_up",
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
            ControlEvent::MfaWindowClosed => "mfa_window_closed",
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
            ControlEvent::RouteAnnounced => "route_announced",
            ControlEvent::RouteWithdrawn => "route_withdrawn",
            ControlEvent::RouteTableFailed => "route_table_failed",
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

/// The spoke's nftables drop counts (`segment_spoof`, `policy_guardrail`, …) as totals that
/// never go down (`komnet_drops_total` is a counter), although the kernel's counters start
/// again from zero whenever the `komnet` table is replaced: by a new policy, or by the guard
/// after a flush. The driver reads the table's counters and feeds them in; packets counted
/// between a reading and an unannounced reset (a flush) are the only ones lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftDropTotals {
    /// The kernel's counts at the last reading.
    last: BTreeMap<String, u64>,
    /// What tables that are gone had counted.
    retired: BTreeMap<String, u64>,
}

impl NftDropTotals {
    /// The counts of the installed table now; a count lower than the last one means the table
    /// was replaced meanwhile (what it had counted is kept).
    pub fn handle_reading(&mut self, now: &BTreeMap<&str, u64>) {
        let mut reasons: Vec<String> = self.last.keys().cloned().collect();
        reasons.extend(now.keys().map(|k| (*k).to_owned()));
        for reason in reasons {
            let current = now.get(reason.as_str()).copied().unwrap_or(0);
            let last = self.last.entry(reason.clone()).or_default();
            if current < *last {
                *self.retired.entry(reason).or_default() += *last;
            }
            *last = current;
        }
    }

    /// The table with counts `before` (read just now) is being replaced: its counts are kept,
    /// and the new table starts from zero.
    pub fn handle_replaced(&mut self, before: &BTreeMap<&str, u64>) {
        self.handle_reading(before);
        for (reason, last) in std::mem::take(&mut self.last) {
            *self.retired.entry(reason).or_default() += last;
        }
    }

    /// Totals by reason, zeros left out.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        let mut out = self.retired.clone();
        for (reason, n) in &self.last {
            *out.entry(reason.clone()).or_default() += n;
        }
        out.retain(|_, n| *n > 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn nft_drop_totals_never_go_down_across_new_tables_and_flushes() {
        let mut t = NftDropTotals::default();
        t.handle_reading(&counts(&[("segment_spoof", 5)]));
        t.handle_reading(&counts(&[("segment_spoof", 9), ("policy_default_deny", 2)]));
        assert_eq!(t.totals()["segment_spoof"], 9);
        // A new policy: the old table's counts are kept, the new one starts at zero and
        // passes the old count before the next reading.
        t.handle_replaced(&counts(&[
            ("segment_spoof", 10),
            ("policy_default_deny", 2),
        ]));
        t.handle_reading(&counts(&[("segment_spoof", 12)]));
        assert_eq!(t.totals()["segment_spoof"], 22);
        assert_eq!(t.totals()["policy_default_deny"], 2);
        // A flush: no table (nothing read), then the reinstalled one counts again.
        t.handle_reading(&counts(&[]));
        assert_eq!(t.totals()["segment_spoof"], 22);
        t.handle_reading(&counts(&[("segment_spoof", 1)]));
        assert_eq!(t.totals()["segment_spoof"], 23);
        assert!(!t.totals().contains_key("conntrack_invalid"));
    }
}
