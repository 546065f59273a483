//! The hub's decisions: the registry view (every valid identity the enrollment service lists),
//! which of them are admitted as peers under the policy in force (through
//! [`crate::admission::HubPeers`]), when certificates expire, and the state of the link to the
//! registry ([`RegistryLink`]). Each `handle_*` returns the peer-table changes the driver
//! (`super::super::hub`) applies to the packet path under the same lock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use komnet_policy::{CompiledPolicy, PeerIdentity, Role};
use komnet_proto::api::{RegistryChange, RegistryEvent, RegistrySnapshot};
use komnet_proto::identity::Identity;

use super::{ControlEvent, Counters};
use crate::admission::{HubPeers, PeerChange};

/// How often certificate expiry is checked.
pub const EXPIRY_CHECK: Duration = Duration::from_secs(1);
/// How long after losing the registry the hub connects again.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Where the hub's link to the registry stands.
///
/// Today the stream counts as alive until the connection fails or the service closes it;
/// detecting a silent stream (missed keep-alives) and backing off between attempts belong here
/// too (issue 15): [`RegistryLink::next_timeout`] is where a liveness deadline goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected; connect at `until`.
    Waiting { until: Instant },
    /// A snapshot is being fetched since `since`.
    Connecting { since: Instant },
    /// The snapshot of `version` is applied and the change stream is read; the last snapshot
    /// or event arrived at `last_heard`.
    Following { version: u64, last_heard: Instant },
}

/// The hub's link to the registry: connect, follow, lose, reconnect.
#[derive(Debug, Clone)]
pub struct RegistryLink {
    state: LinkState,
    reconnect_after: Duration,
}

impl RegistryLink {
    /// A link that connects at once.
    pub fn new(now: Instant) -> Self {
        RegistryLink {
            state: LinkState::Waiting { until: now },
            reconnect_after: RECONNECT_AFTER,
        }
    }

    pub fn state(&self) -> &LinkState {
        &self.state
    }

    /// The registry version the hub has applied, if it follows the registry now.
    pub fn version(&self) -> Option<u64> {
        match self.state {
            LinkState::Following { version, .. } => Some(version),
            _ => None,
        }
    }

    /// Whether to connect now; if so, the link counts as connecting from `now`.
    pub fn poll_connect(&mut self, now: Instant) -> bool {
        match self.state {
            LinkState::Waiting { until } if now >= until => {
                self.state = LinkState::Connecting { since: now };
                true
            }
            _ => false,
        }
    }

    /// When the link has something to decide next (`None`: only an event changes it).
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.state {
            LinkState::Waiting { until } => Some(until),
            LinkState::Connecting { .. } | LinkState::Following { .. } => None,
        }
    }

    fn heard(&mut self, now: Instant, version: u64) {
        self.state = LinkState::Following {
            version,
            last_heard: now,
        };
    }

    fn lost(&mut self, now: Instant) {
        self.state = LinkState::Waiting {
            until: now + self.reconnect_after,
        };
    }
}

/// The hub's state machine.
#[derive(Debug)]
pub struct HubCore {
    /// Every valid identity the registry lists, admitted or not, by WireGuard key.
    registry: BTreeMap<[u8; 32], Identity>,
    peers: HubPeers,
    /// The policy admissions are resolved against (the one the gate enforces).
    in_force: Option<Arc<CompiledPolicy>>,
    link: RegistryLink,
    last_expiry: Instant,
    counters: Counters,
}

impl HubCore {
    pub fn new(now: Instant) -> Self {
        HubCore {
            registry: BTreeMap::new(),
            peers: HubPeers::default(),
            in_force: None,
            link: RegistryLink::new(now),
            last_expiry: now,
            counters: Counters::default(),
        }
    }

    pub fn link(&self) -> &RegistryLink {
        &self.link
    }

    /// See [`RegistryLink::poll_connect`].
    pub fn poll_connect(&mut self, now: Instant) -> bool {
        self.link.poll_connect(now)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The registry's identity for a peer key (admitted or not).
    pub fn registered(&self, key: &[u8; 32]) -> Option<&Identity> {
        self.registry.get(key)
    }

    /// The firewall identity of an admitted peer.
    pub fn admitted(&self, key: &[u8; 32]) -> Option<PeerIdentity> {
        self.peers.identity(key)
    }

    pub fn admitted_count(&self) -> usize {
        self.peers.len()
    }

    /// A registry snapshot at `unix` (seconds): identities no longer listed are withdrawn,
    /// every listed one (other than hubs) admitted or refreshed.
    pub fn handle_snapshot(
        &mut self,
        now: Instant,
        unix: i64,
        snapshot: &RegistrySnapshot,
    ) -> Vec<PeerChange> {
        self.link.heard(now, snapshot.version);
        let listed: BTreeSet<[u8; 32]> = snapshot
            .peers
            .iter()
            .map(|i| *i.wg_public_key.as_bytes())
            .collect();
        let gone: Vec<[u8; 32]> = self
            .registry
            .keys()
            .filter(|k| !listed.contains(*k))
            .copied()
            .collect();
        let mut changes = Vec::new();
        for k in gone {
            changes.extend(self.withdraw(&k));
        }
        for identity in &snapshot.peers {
            if identity.role != Role::Hub {
                changes.extend(self.admit(unix, identity));
            }
        }
        changes
    }

    /// One change from the registry's stream.
    pub fn handle_registry_event(
        &mut self,
        now: Instant,
        unix: i64,
        event: &RegistryEvent,
    ) -> Vec<PeerChange> {
        self.link.heard(now, event.version);
        self.counters.count(ControlEvent::RegistryEvent);
        match &event.change {
            RegistryChange::Upsert(identity) if identity.role != Role::Hub => {
                self.admit(unix, identity)
            }
            RegistryChange::Upsert(_) => Vec::new(),
            RegistryChange::Remove {
                wg_public_key,
                tenant,
                site,
                reason,
                ..
            } => {
                tracing::info!(
                    tenant = tenant.as_str(),
                    site = site.as_str(),
                    reason = reason.as_str(),
                    "peer revoked"
                );
                self.withdraw(wg_public_key.as_bytes())
            }
        }
    }

    /// The link to the registry failed or the stream ended at `now`: admitted peers stay (the
    /// certificates they hold are still valid) until the link is back and says otherwise.
    pub fn handle_registry_lost(&mut self, now: Instant) {
        self.counters.count(ControlEvent::RegistryLost);
        self.link.lost(now);
    }

    /// A new policy is going in force: admissions are resolved against it (sites whose
    /// prefixes changed get new allowed IPs, identities it no longer knows are removed, and
    /// those the previous one did not know may be admitted now).
    pub fn handle_policy(&mut self, unix: i64, policy: Arc<CompiledPolicy>) -> Vec<PeerChange> {
        let mut changes = self.peers.on_policy_change(unix, &policy.policy);
        let pending: Vec<Identity> = self
            .registry
            .values()
            .filter(|a| self.peers.identity(a.wg_public_key.as_bytes()).is_none())
            .cloned()
            .collect();
        for a in pending {
            let (_, mut c) = self.peers.upsert(unix, &policy.policy, a);
            changes.append(&mut c);
        }
        self.in_force = Some(policy);
        changes
    }

    /// When [`Self::handle_timeout`] has something to do next.
    pub fn next_timeout(&self) -> Instant {
        let expiry = self.last_expiry + EXPIRY_CHECK;
        match self.link.next_timeout() {
            Some(t) => t.min(expiry),
            None => expiry,
        }
    }

    /// Takes out peers whose certificates expired by `unix` (checked every [`EXPIRY_CHECK`]).
    pub fn handle_timeout(&mut self, now: Instant, unix: i64) -> Vec<PeerChange> {
        if now.saturating_duration_since(self.last_expiry) < EXPIRY_CHECK {
            return Vec::new();
        }
        self.last_expiry = now;
        let expired = self.peers.expire(unix);
        for c in &expired {
            if let PeerChange::Remove { key } = c {
                self.registry.remove(key);
                self.counters.count(ControlEvent::PeerExpired);
            }
        }
        expired
    }

    fn admit(&mut self, unix: i64, identity: &Identity) -> Vec<PeerChange> {
        self.registry
            .insert(*identity.wg_public_key.as_bytes(), identity.clone());
        let Some(policy) = self.in_force.clone() else {
            // Kept in the registry view; admitted once a policy is in force.
            return Vec::new();
        };
        let (result, changes) = self.peers.upsert(unix, &policy.policy, identity.clone());
        match result {
            Ok(()) => self.counters.count(ControlEvent::PeerAdmitted),
            Err(e) => {
                self.counters.count(ControlEvent::PeerRefused);
                tracing::warn!(tenant = identity.tenant.as_str(), site = identity.site.as_str(), error = %e, "identity not admitted");
            }
        }
        changes
    }

    fn withdraw(&mut self, key: &[u8; 32]) -> Vec<PeerChange> {
        self.registry.remove(key);
        let change = self.peers.remove(key);
        if change.is_some() {
            self.counters.count(ControlEvent::PeerRemoved);
        }
        change.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use komnet_proto::api::RevocationReason;
    use komnet_proto::identity::{SiteId, TenantId, WgPublicKey};

    fn policy() -> Arc<CompiledPolicy> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
        Arc::new(CompiledPolicy::load(&dir).unwrap())
    }

    fn identity(site: &str, role: Role, key: u8, not_after: i64) -> Identity {
        Identity {
            tenant: TenantId::parse("musterstadt").unwrap(),
            site: SiteId::parse(site).unwrap(),
            role,
            wg_public_key: WgPublicKey::from_bytes([key; 32]).unwrap(),
            tunnel_addrs: vec![format!("10.96.0.{key}/32").parse().unwrap()],
            not_after,
            serial: format!("{key:02x}"),
        }
    }

    fn upserted(changes: &[PeerChange]) -> Vec<u8> {
        changes
            .iter()
            .filter_map(|c| match c {
                PeerChange::Upsert { key, .. } => Some(key[0]),
                PeerChange::Remove { .. } => None,
            })
            .collect()
    }

    fn removed(changes: &[PeerChange]) -> Vec<u8> {
        changes
            .iter()
            .filter_map(|c| match c {
                PeerChange::Remove { key } => Some(key[0]),
                PeerChange::Upsert { .. } => None,
            })
            .collect()
    }

    fn remove_event(version: u64, id: &Identity) -> RegistryEvent {
        RegistryEvent {
            version,
            change: RegistryChange::Remove {
                tenant: id.tenant.clone(),
                site: id.site.clone(),
                role: id.role,
                serial: id.serial.clone(),
                wg_public_key: id.wg_public_key,
                reason: RevocationReason::KeyCompromise,
            },
        }
    }

    #[test]
    fn identities_wait_for_a_policy_and_hubs_are_never_admitted() {
        let now = Instant::now();
        let mut hub = HubCore::new(now);
        assert!(hub.poll_connect(now), "a new hub connects at once");
        let snapshot = RegistrySnapshot {
            version: 7,
            peers: vec![
                identity("rathaus", Role::Spoke, 1, 5000),
                identity("hub2", Role::Hub, 2, 5000),
            ],
        };
        // No policy in force: nothing is admitted, but the identity is remembered.
        assert!(hub.handle_snapshot(now, 1000, &snapshot).is_empty());
        assert_eq!(hub.link().version(), Some(7));
        assert!(hub.registered(&[1; 32]).is_some());
        let changes = hub.handle_policy(1000, policy());
        assert_eq!(upserted(&changes), vec![1]);
        assert!(hub.admitted(&[1; 32]).is_some());
        assert!(hub.admitted(&[2; 32]).is_none());
        // A hub's upsert event changes nothing either.
        let ev = RegistryEvent {
            version: 8,
            change: RegistryChange::Upsert(identity("hub3", Role::Hub, 3, 5000)),
        };
        assert!(hub.handle_registry_event(now, 1000, &ev).is_empty());
        assert_eq!(hub.link().version(), Some(8));
    }

    #[test]
    fn a_revocation_removes_the_peer_and_a_snapshot_after_reconnecting_drops_the_missed_ones() {
        let t0 = Instant::now();
        let mut hub = HubCore::new(t0);
        hub.handle_policy(1000, policy());
        let a = identity("rathaus", Role::Spoke, 1, 5000);
        let b = identity("bauhof", Role::Spoke, 4, 5000);
        let snapshot = RegistrySnapshot {
            version: 1,
            peers: vec![a.clone(), b.clone()],
        };
        let changes = hub.handle_snapshot(t0, 1000, &snapshot);
        assert_eq!(
            upserted(&changes).len() + removed(&changes).len(),
            changes.len()
        );
        assert!(hub.admitted(&[1; 32]).is_some());

        let changes = hub.handle_registry_event(t0, 1000, &remove_event(2, &a));
        assert_eq!(removed(&changes), vec![1]);
        assert!(hub.registered(&[1; 32]).is_none());
        assert_eq!(hub.counters().get(ControlEvent::PeerRemoved), 1);
        // Revoking it again (a replayed event) changes nothing.
        assert!(hub
            .handle_registry_event(t0, 1000, &remove_event(3, &a))
            .is_empty());

        // The link drops; the peer stays admitted while the hub reconnects after 1 s.
        let lost_at = t0 + Duration::from_millis(500);
        hub.handle_registry_lost(lost_at);
        assert_eq!(hub.link().version(), None);
        assert!(!hub.poll_connect(lost_at + Duration::from_millis(999)));
        assert_eq!(hub.link().next_timeout(), Some(lost_at + RECONNECT_AFTER));
        assert!(hub.poll_connect(lost_at + RECONNECT_AFTER));
        assert!(
            !hub.poll_connect(lost_at + RECONNECT_AFTER),
            "once per loss"
        );
        // Meanwhile b was revoked: the new snapshot no longer lists it.
        let again = RegistrySnapshot {
            version: 9,
            peers: vec![],
        };
        let changes = hub.handle_snapshot(lost_at + RECONNECT_AFTER, 1000, &again);
        assert_eq!(removed(&changes), vec![4]);
        assert_eq!(hub.admitted_count(), 0);
        assert_eq!(hub.counters().get(ControlEvent::RegistryLost), 1);
    }

    #[test]
    fn certificates_expire_on_the_next_check_after_not_after() {
        let t0 = Instant::now();
        let mut hub = HubCore::new(t0);
        hub.handle_policy(1000, policy());
        let snapshot = RegistrySnapshot {
            version: 1,
            peers: vec![
                identity("rathaus", Role::Spoke, 1, 1003),
                identity("bauhof", Role::Spoke, 4, 9000),
            ],
        };
        hub.handle_snapshot(t0, 1000, &snapshot);
        let mut expired_at = None;
        for ms in (250..10_000).step_by(250) {
            let now = t0 + Duration::from_millis(ms);
            let unix = 1000 + (ms / 1000) as i64;
            if now < hub.next_timeout() {
                continue;
            }
            let changes = hub.handle_timeout(now, unix);
            if !changes.is_empty() {
                assert_eq!(removed(&changes), vec![1]);
                expired_at = Some(ms);
            }
        }
        assert_eq!(expired_at, Some(3000));
        assert_eq!(hub.counters().get(ControlEvent::PeerExpired), 1);
        assert!(hub.registered(&[1; 32]).is_none());
        assert!(hub.admitted(&[4; 32]).is_some());
    }
}
