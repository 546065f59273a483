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

pub use super::link::{
    LinkLoss, LinkState, OutagePolicy, OutageSettings, RegistryLink, BACKOFF_FIRST, BACKOFF_MAX,
    CONNECT_TIMEOUT,
};
use super::{ControlEvent, Counters};
use crate::admission::{HubPeers, PeerChange};

/// How often certificate expiry is checked.
pub const EXPIRY_CHECK: Duration = Duration::from_secs(1);
/// While the registry is unreachable beyond the alarm bound, the alarm is logged again this
/// often.
pub const ALARM_REPEAT: Duration = Duration::from_secs(300);

/// The hub's state machine.
#[derive(Debug)]
pub struct HubCore {
    /// Every valid identity the registry lists, admitted or not, by WireGuard key.
    registry: BTreeMap<[u8; 32], Identity>,
    peers: HubPeers,
    /// The policy admissions are resolved against (the one the gate enforces).
    in_force: Option<Arc<CompiledPolicy>>,
    link: RegistryLink,
    outage: OutageSettings,
    /// When the outage alarm was raised (and last repeated), while it is.
    alarm: Option<(Instant, Instant)>,
    last_expiry: Instant,
    counters: Counters,
}

impl HubCore {
    /// `seed` varies the reconnect backoff from other hubs'.
    pub fn new(now: Instant, outage: OutageSettings, seed: u64) -> Self {
        HubCore {
            registry: BTreeMap::new(),
            peers: HubPeers::default(),
            in_force: None,
            link: RegistryLink::new(now, seed),
            outage,
            alarm: None,
            last_expiry: now,
            counters: Counters::default(),
        }
    }

    pub fn outage_settings(&self) -> OutageSettings {
        self.outage
    }

    /// Whether the registry outage alarm is raised now.
    pub fn alarmed(&self) -> bool {
        self.alarm.is_some()
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
        if let Some(outage) = self.link.outage(now) {
            if self.alarm.take().is_some() {
                tracing::warn!(
                    outage_secs = outage.as_secs(),
                    version = snapshot.version,
                    "the registry is reachable again; its snapshot is applied"
                );
            }
        }
        self.link.snapshot(now, snapshot.version);
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
        self.link.heard(now, Some(event.version));
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

    /// The change stream is open; the service sends a keep-alive every `keepalive`.
    pub fn handle_stream_open(&mut self, now: Instant, keepalive: Duration) {
        self.link.stream_open(now, keepalive);
    }

    /// A keep-alive arrived on the stream.
    pub fn handle_keepalive(&mut self, now: Instant) {
        self.link.heard(now, None);
    }

    /// The link to the registry failed, the stream ended or went silent at `now`: admitted
    /// peers stay (the certificates they hold are still valid) until the link is back and says
    /// otherwise, or until the outage alarm applies [`OutagePolicy::RemovePeers`].
    pub fn handle_registry_lost(&mut self, now: Instant, why: LinkLoss) {
        if self.link.lost(now) {
            self.counters.count(ControlEvent::RegistryLost);
            if why == LinkLoss::Silent {
                self.counters.count(ControlEvent::RegistrySilent);
            }
        }
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

    /// When [`Self::handle_timeout`] has something to do next (the link's own deadlines are
    /// the driver's: [`RegistryLink::next_timeout`]).
    pub fn next_timeout(&self) -> Instant {
        let mut next = self.last_expiry + EXPIRY_CHECK;
        if let Some(down) = self.link.down_since() {
            let alarm = match self.alarm {
                None => down + self.outage.alarm_after,
                Some((_, repeated)) => repeated + ALARM_REPEAT,
            };
            next = next.min(alarm);
        }
        next
    }

    /// Takes out peers whose certificates expired by `unix` (checked every [`EXPIRY_CHECK`]),
    /// and raises (and repeats) the alarm of a registry outage beyond its bound.
    pub fn handle_timeout(&mut self, now: Instant, unix: i64) -> Vec<PeerChange> {
        let mut changes = self.check_outage(now);
        if now.saturating_duration_since(self.last_expiry) < EXPIRY_CHECK {
            return changes;
        }
        self.last_expiry = now;
        changes.extend(self.expire(unix));
        changes
    }

    fn check_outage(&mut self, now: Instant) -> Vec<PeerChange> {
        let Some(outage) = self.link.outage(now) else {
            return Vec::new();
        };
        if outage < self.outage.alarm_after {
            return Vec::new();
        }
        match &mut self.alarm {
            Some((_, repeated)) => {
                if now.saturating_duration_since(*repeated) >= ALARM_REPEAT {
                    *repeated = now;
                    tracing::error!(
                        outage_secs = outage.as_secs(),
                        on_outage = self.outage.policy.as_str(),
                        "the registry is still unreachable: revocations are not heard"
                    );
                }
                Vec::new()
            }
            None => {
                self.alarm = Some((now, now));
                self.counters.count(ControlEvent::RegistryOutageAlarm);
                tracing::error!(
                    outage_secs = outage.as_secs(),
                    on_outage = self.outage.policy.as_str(),
                    admitted = self.peers.len(),
                    "the registry is unreachable: revocations made meanwhile are not heard"
                );
                match self.outage.policy {
                    OutagePolicy::KeepPeers => Vec::new(),
                    OutagePolicy::RemovePeers => {
                        let keys: Vec<[u8; 32]> = self.registry.keys().copied().collect();
                        keys.iter().flat_map(|k| self.withdraw(k)).collect()
                    }
                }
            }
        }
    }

    fn expire(&mut self, unix: i64) -> Vec<PeerChange> {
        let expired = self.peers.expire(unix);
        let mut changes = Vec::with_capacity(expired.len());
        for (c, window) in expired {
            if let PeerChange::Remove { key } = &c {
                if let Some(id) = self.registry.remove(key) {
                    if window {
                        tracing::info!(
                            tenant = id.tenant.as_str(),
                            site = id.site.as_str(),
                            "MFA window closed: the home office is let in again after its person's next sign-in"
                        );
                    }
                }
                self.counters.count(if window {
                    ControlEvent::MfaWindowClosed
                } else {
                    ControlEvent::PeerExpired
                });
            }
            changes.push(c);
        }
        changes
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
            admitted_until: None,
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
        let mut hub = HubCore::new(now, OutageSettings::default(), 1);
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
        let mut hub = HubCore::new(t0, OutageSettings::default(), 1);
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

        // The link drops; the peer stays admitted while the hub reconnects after about 1 s.
        let lost_at = t0 + Duration::from_millis(500);
        hub.handle_registry_lost(lost_at, LinkLoss::Failed);
        assert_eq!(hub.link().version(), None);
        let again_at = hub.link().next_timeout().expect("a reconnect time");
        let wait = again_at - lost_at;
        assert!(
            wait >= BACKOFF_FIRST * 4 / 5 && wait <= BACKOFF_FIRST * 6 / 5,
            "{wait:?}"
        );
        assert!(!hub.poll_connect(again_at - Duration::from_millis(1)));
        assert!(hub.poll_connect(again_at));
        assert!(!hub.poll_connect(again_at), "once per loss");
        let reconnected = again_at;
        // Meanwhile b was revoked: the new snapshot no longer lists it.
        let again = RegistrySnapshot {
            version: 9,
            peers: vec![],
        };
        let changes = hub.handle_snapshot(reconnected, 1000, &again);
        assert_eq!(removed(&changes), vec![4]);
        assert_eq!(hub.admitted_count(), 0);
        assert_eq!(hub.counters().get(ControlEvent::RegistryLost), 1);
    }

    #[test]
    fn certificates_expire_on_the_next_check_after_not_after() {
        let t0 = Instant::now();
        let mut hub = HubCore::new(t0, OutageSettings::default(), 1);
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
    /// Drives the link the way the driver does, in 50 ms steps from `sim.1` to `until_ms`:
    /// connect when due, get a snapshot and a stream, hear a keep-alive every second, give the
    /// link up when `expired` says so. `alive` says whether the service answers at `ms`.
    fn run_link(
        sim: &mut (Instant, u64),
        hub: &mut HubCore,
        until_ms: u64,
        alive: impl Fn(u64) -> bool,
    ) {
        let t0 = sim.0;
        let from = sim.1;
        sim.1 = until_ms;
        for ms in (from..until_ms).step_by(50) {
            let now = t0 + Duration::from_millis(ms);
            if hub.poll_connect(now) {
                if alive(ms) {
                    let snapshot = RegistrySnapshot {
                        version: 1,
                        peers: vec![identity("rathaus", Role::Spoke, 1, 1_000_000)],
                    };
                    hub.handle_snapshot(now, 1000, &snapshot);
                    hub.handle_stream_open(now, Duration::from_secs(1));
                } else {
                    // On a blackholed path the attempt hangs until its timeout.
                    continue;
                }
            }
            if let Some(why) = hub.link().expired(now) {
                hub.handle_registry_lost(now, why);
            }
            if matches!(hub.link().state(), LinkState::Following { .. })
                && alive(ms)
                && ms % 1000 == 0
            {
                hub.handle_keepalive(now);
            }
            if now >= hub.next_timeout() {
                hub.handle_timeout(now, 1000 + (ms / 1000) as i64);
            }
        }
    }

    #[test]
    fn a_silent_stream_is_given_up_after_three_missed_keepalives_and_followed_again_after_it() {
        let t0 = Instant::now();
        let mut hub = HubCore::new(t0, OutageSettings::default(), 7);
        let mut sim = (t0, 0);
        hub.handle_policy(1000, policy());
        // Keep-alives every second until 10 s, then a blackhole until 60 s.
        let alive = |ms: u64| !(10_000..60_000).contains(&ms);
        run_link(&mut sim, &mut hub, 10_000, alive);
        assert!(matches!(hub.link().state(), LinkState::Following { .. }));
        assert_eq!(hub.counters().get(ControlEvent::RegistryLost), 0);
        // The last keep-alive came at 9 s: the stream is dead at 12 s, not before.
        run_link(&mut sim, &mut hub, 11_950, alive);
        assert!(matches!(hub.link().state(), LinkState::Following { .. }));
        run_link(&mut sim, &mut hub, 12_050, alive);
        assert_eq!(hub.counters().get(ControlEvent::RegistrySilent), 1);
        assert_eq!(hub.link().version(), None);
        assert!(hub.link().outage(t0 + Duration::from_secs(12)).is_some());
        // The peers stay admitted (keep-peers); attempts back off while the path is dead: the
        // hub tries again but each attempt hangs until its 30 s timeout.
        run_link(&mut sim, &mut hub, 60_000, alive);
        assert!(hub.admitted(&[1; 32]).is_some());
        assert!(hub.counters().get(ControlEvent::RegistryLost) >= 2);
        // After the path is back, the next attempt follows again within the longest backoff.
        let mut back_at = None;
        for end in (60_050..120_000).step_by(50) {
            run_link(&mut sim, &mut hub, end, alive);
            if matches!(hub.link().state(), LinkState::Following { .. }) {
                back_at = Some(end);
                break;
            }
        }
        let back_at = back_at.expect("the hub follows the registry again");
        assert!(
            back_at <= 60_000 + (CONNECT_TIMEOUT + BACKOFF_MAX).as_millis() as u64,
            "{back_at}"
        );
        assert_eq!(hub.link().outage(t0 + Duration::from_millis(back_at)), None);
    }

    #[test]
    fn backoff_doubles_to_its_bound_and_varies_between_hubs() {
        let t0 = Instant::now();
        let waits = |seed: u64| -> Vec<Duration> {
            let mut link = RegistryLink::new(t0, seed);
            let mut now = t0;
            let mut waits = Vec::new();
            for _ in 0..8 {
                assert!(link.poll_connect(now));
                assert!(link.lost(now));
                let at = link.next_timeout().expect("a reconnect time");
                waits.push(at - now);
                now = at;
            }
            waits
        };
        let a = waits(1);
        let b = waits(2);
        for (i, w) in a.iter().enumerate() {
            let nominal = (BACKOFF_FIRST * (1u32 << i)).min(BACKOFF_MAX);
            assert!(*w >= nominal * 4 / 5, "attempt {i}: {w:?}");
            assert!(
                *w <= (nominal * 6 / 5).min(BACKOFF_MAX),
                "attempt {i}: {w:?}"
            );
        }
        assert!(a[7] > BACKOFF_MAX * 3 / 4);
        assert_ne!(a, b, "two hubs back off in step");
    }

    #[test]
    fn an_outage_beyond_its_bound_raises_the_alarm_and_remove_peers_withdraws_everyone() {
        for policy_choice in [OutagePolicy::KeepPeers, OutagePolicy::RemovePeers] {
            let t0 = Instant::now();
            let settings = OutageSettings {
                alarm_after: Duration::from_secs(20),
                policy: policy_choice,
            };
            let mut hub = HubCore::new(t0, settings, 3);
            let mut sim = (t0, 0);
            hub.handle_policy(1000, policy());
            // Registry reachable until 5 s, then gone.
            let alive = |ms: u64| ms < 5_000;
            run_link(&mut sim, &mut hub, 5_000, alive);
            assert!(hub.admitted(&[1; 32]).is_some());
            run_link(&mut sim, &mut hub, 24_000, alive);
            assert!(!hub.alarmed(), "{policy_choice:?}: alarm before the bound");
            // Silent since the keep-alive at 4 s, lost at 7 s: the alarm is due at 27 s.
            run_link(&mut sim, &mut hub, 28_000, alive);
            assert!(hub.alarmed(), "{policy_choice:?}");
            assert_eq!(hub.counters().get(ControlEvent::RegistryOutageAlarm), 1);
            let admitted = hub.admitted(&[1; 32]).is_some();
            assert_eq!(
                admitted,
                policy_choice == OutagePolicy::KeepPeers,
                "{policy_choice:?}"
            );
            // A policy change meanwhile does not bring a withdrawn peer back.
            hub.handle_policy(1000, policy());
            assert_eq!(hub.admitted(&[1; 32]).is_some(), admitted);
            // The registry comes back: its snapshot admits the peer again, the alarm ends.
            let t = t0 + Duration::from_secs(40);
            hub.poll_connect(t);
            let snapshot = RegistrySnapshot {
                version: 2,
                peers: vec![identity("rathaus", Role::Spoke, 1, 1_000_000)],
            };
            hub.handle_snapshot(t, 1000, &snapshot);
            assert!(!hub.alarmed());
            assert!(hub.admitted(&[1; 32]).is_some());
        }
    }
}
