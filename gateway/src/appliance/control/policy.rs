//! The policy in force and the steps a new version goes through: the driver verifies and
//! compiles an offered bundle (prepare), the slot says install it in the packet path (nftables
//! on a spoke, the gate on a hub), then commit it as last-known-good; a failure at any step
//! leaves the previous version in force and is reported once per distinct reason.

use super::{ControlEvent, Counters};

/// The next step for a prepared policy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyAction {
    /// Put `version` in force in the packet path.
    Install { version: u64 },
    /// Record `version` as last-known-good on disk (it is in force now).
    Commit { version: u64 },
}

/// The version in force and since when (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InForce {
    pub version: u64,
    pub installed_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Installing(u64),
    Committing(u64),
}

/// The appliance's policy slot.
#[derive(Debug, Clone)]
pub struct PolicySlot {
    in_force: Option<InForce>,
    phase: Phase,
    error: Option<String>,
    counters: Counters,
}

impl Default for PolicySlot {
    fn default() -> Self {
        PolicySlot {
            in_force: None,
            phase: Phase::Idle,
            error: None,
            counters: Counters::default(),
        }
    }
}

impl PolicySlot {
    pub fn in_force(&self) -> Option<InForce> {
        self.in_force
    }

    /// The version to tell the service we have (`GET /v1/policy?have=`).
    pub fn have(&self) -> Option<u64> {
        self.in_force.map(|p| p.version)
    }

    /// Why the last offered version was refused, if it was.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// `version` was verified and compiled: install it.
    pub fn handle_prepared(&mut self, version: u64) -> PolicyAction {
        self.phase = Phase::Installing(version);
        PolicyAction::Install { version }
    }

    /// `version` is in force in the packet path: commit it. `None` when that version was not
    /// being installed (a step out of order is a bug in the driver, and nothing is committed).
    pub fn handle_installed(&mut self, version: u64) -> Option<PolicyAction> {
        if self.phase != Phase::Installing(version) {
            return None;
        }
        self.phase = Phase::Committing(version);
        Some(PolicyAction::Commit { version })
    }

    /// `version` is committed at `unix`: it is the one in force.
    pub fn handle_committed(&mut self, version: u64, unix: i64) -> bool {
        if self.phase != Phase::Committing(version) {
            return false;
        }
        self.phase = Phase::Idle;
        self.in_force = Some(InForce {
            version,
            installed_at: unix,
        });
        self.error = None;
        self.counters.count(ControlEvent::PolicyInstalled);
        true
    }

    /// Preparing, installing or committing `version` failed with `reason`; the version in
    /// force stays. Returns whether the reason is new (the driver logs it only then).
    pub fn handle_refused(&mut self, version: u64, reason: &str) -> bool {
        self.phase = Phase::Idle;
        self.counters.count(ControlEvent::PolicyRefused);
        let message = format!("policy version {version} refused: {reason}");
        let new = self.error.as_deref() != Some(message.as_str());
        self.error = Some(message);
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_in_force_only_after_install_and_commit() {
        let mut slot = PolicySlot::default();
        assert_eq!(slot.have(), None);
        assert_eq!(
            slot.handle_prepared(3),
            PolicyAction::Install { version: 3 }
        );
        assert_eq!(slot.in_force(), None, "not before it is installed");
        assert_eq!(
            slot.handle_installed(3),
            Some(PolicyAction::Commit { version: 3 })
        );
        assert_eq!(slot.have(), None, "not before it is committed");
        assert!(slot.handle_committed(3, 1000));
        assert_eq!(
            slot.in_force(),
            Some(InForce {
                version: 3,
                installed_at: 1000
            })
        );
        assert_eq!(slot.counters().get(ControlEvent::PolicyInstalled), 1);
    }

    #[test]
    fn a_refused_version_keeps_the_previous_one_and_is_reported_once() {
        let mut slot = PolicySlot::default();
        slot.handle_prepared(3);
        slot.handle_installed(3);
        slot.handle_committed(3, 1000);
        // Version 4 fails to install (say nft refused it): 3 stays.
        slot.handle_prepared(4);
        assert!(slot.handle_refused(4, "nft: syntax error"));
        assert_eq!(slot.have(), Some(3));
        assert_eq!(
            slot.error(),
            Some("policy version 4 refused: nft: syntax error")
        );
        // Offered again with the same reason: counted, not reported again.
        slot.handle_prepared(4);
        assert!(!slot.handle_refused(4, "nft: syntax error"));
        assert_eq!(slot.counters().get(ControlEvent::PolicyRefused), 2);
        // A refused version cannot be committed by a late step.
        assert_eq!(slot.handle_installed(4), None);
        assert!(!slot.handle_committed(4, 2000));
        assert_eq!(slot.have(), Some(3));
        // Version 5 works and clears the error.
        slot.handle_prepared(5);
        slot.handle_installed(5);
        assert!(slot.handle_committed(5, 3000));
        assert_eq!(slot.error(), None);
        assert_eq!(slot.have(), Some(5));
    }
}
