//! Which prefixes this hub asks the data centre's router to send to it ([`Announcer`]): those
//! of the peers that use this hub now. The driver (`super::super::hub`) keeps them as routes
//! in a kernel routing table of their own (`[bgp] table`), which the host's routing daemon
//! (BIRD, FRR) imports and announces by BGP; it samples the peers, feeds them in with the
//! time, applies the [`RouteDiff`]s and reports what happened.
//!
//! A peer uses this hub when it sent transport data here (its own data or keepalives) within
//! its hold time: [`AnnounceSettings::spoke_hold`] for spokes, which send a keepalive to their
//! active hub every second, and [`AnnounceSettings::other_hold`] for home offices, whose
//! clients send one every 25 s or less. A completed handshake alone does not count: a hub
//! that a spoke left (it failed over while this hub was cut off) keeps sending keepalives to
//! it and renews the handshake now and then, which the spoke answers without making this hub
//! its gateway again. Announcing on handshakes would pull the spoke's routes back here for a
//! while at each renewal; announcing on data makes a hub announce exactly the sessions it
//! carries, so a restarted hub announces nothing until a spoke actually moves to it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use komnet_policy::Role;

use super::{ControlEvent, Counters};

/// A spoke silent for this long (three of its one-second keepalives, and what a spoke waits
/// before it gives up its hub: `failover_after`) no longer has its routes announced here.
pub const DEFAULT_SPOKE_HOLD: Duration = Duration::from_secs(3);
/// A home office's hold: WireGuard's session lifetime (REJECT_AFTER_TIME), beyond which no
/// data can come without a new handshake. Home-office configs send a keepalive every 25 s;
/// a laptop that sleeps longer is withdrawn and announced again when it wakes.
pub const DEFAULT_OTHER_HOLD: Duration = Duration::from_secs(180);
/// After the table could not be changed, the next attempt waits this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often the table is read back and repaired (someone flushed or edited it).
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceSettings {
    pub spoke_hold: Duration,
    pub other_hold: Duration,
}

impl Default for AnnounceSettings {
    fn default() -> Self {
        AnnounceSettings {
            spoke_hold: DEFAULT_SPOKE_HOLD,
            other_hold: DEFAULT_OTHER_HOLD,
        }
    }
}

/// One admitted peer as sampled by the driver.
#[derive(Debug, Clone, Copy)]
pub struct PeerSample<'a> {
    pub role: Role,
    /// When its last transport data arrived (`crate::core::PeerInfo::last_data`).
    pub last_data: Option<Instant>,
    /// Its addresses: tunnel address and site prefixes (its allowed IPs).
    pub prefixes: &'a [IpNet],
}

/// Routes to put into (`announce`) and take out of (`withdraw`) the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteDiff {
    pub announce: Vec<IpNet>,
    pub withdraw: Vec<IpNet>,
}

impl RouteDiff {
    pub fn is_empty(&self) -> bool {
        self.announce.is_empty() && self.withdraw.is_empty()
    }
}

/// The announcement state machine: `handle_peers` with each sample, `poll_diff` for what to
/// change, `handle_applied` with the result; `poll_check` says when to read the table back
/// (`handle_table`).
#[derive(Debug)]
pub struct Announcer {
    settings: AnnounceSettings,
    /// Each prefix a live peer holds, and until when it counts as live.
    live: BTreeMap<IpNet, Instant>,
    /// What the table holds, as far as this process knows.
    installed: BTreeSet<IpNet>,
    /// No change is tried before this (after a failure).
    retry_at: Option<Instant>,
    /// When the table was last read back.
    checked: Option<Instant>,
    counters: Counters,
}

impl Announcer {
    /// An announcer whose table is empty (the driver flushes it at start) and is read back
    /// at the first [`Self::poll_check`].
    pub fn new(settings: AnnounceSettings) -> Self {
        Announcer {
            settings,
            live: BTreeMap::new(),
            installed: BTreeSet::new(),
            retry_at: None,
            checked: None,
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The prefixes the table holds (announced, as far as the daemon follows the table).
    pub fn announced(&self) -> impl Iterator<Item = &IpNet> + '_ {
        self.installed.iter()
    }

    /// How long a peer of `role` stays announced after its last transport data.
    pub fn hold(&self, role: Role) -> Duration {
        match role {
            Role::Spoke => self.settings.spoke_hold,
            Role::HomeOffice | Role::Hub => self.settings.other_hold,
        }
    }

    /// Every admitted peer as sampled at `now` (a peer left out is no longer admitted: its
    /// prefixes go at once).
    pub fn handle_peers<'a>(
        &mut self,
        now: Instant,
        peers: impl IntoIterator<Item = PeerSample<'a>>,
    ) {
        self.live.clear();
        for peer in peers {
            // Hubs never route through one another.
            if peer.role == Role::Hub {
                continue;
            }
            let Some(heard) = peer.last_data else {
                continue;
            };
            let until = heard + self.hold(peer.role);
            if until <= now {
                continue;
            }
            for net in peer.prefixes {
                let entry = self.live.entry(net.trunc()).or_insert(until);
                *entry = (*entry).max(until);
            }
        }
    }

    /// The prefixes that should be announced at `now`.
    pub fn wanted(&self, now: Instant) -> BTreeSet<IpNet> {
        self.live
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(net, _)| *net)
            .collect()
    }

    /// What to change in the table at `now`, if anything (nothing while a failed attempt
    /// waits for its retry).
    pub fn poll_diff(&mut self, now: Instant) -> Option<RouteDiff> {
        if self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        let wanted = self.wanted(now);
        let diff = RouteDiff {
            announce: wanted.difference(&self.installed).copied().collect(),
            withdraw: self.installed.difference(&wanted).copied().collect(),
        };
        (!diff.is_empty()).then_some(diff)
    }

    /// The driver applied `diff` (`ok`) or could not (then the table is read back before the
    /// next attempt, [`RETRY_AFTER`] later).
    pub fn handle_applied(&mut self, now: Instant, diff: &RouteDiff, ok: bool) {
        if ok {
            self.retry_at = None;
            for net in &diff.withdraw {
                if self.installed.remove(net) {
                    self.counters.count(ControlEvent::RouteWithdrawn);
                }
            }
            for net in &diff.announce {
                if self.installed.insert(*net) {
                    self.counters.count(ControlEvent::RouteAnnounced);
                }
            }
        } else {
            self.counters.count(ControlEvent::RouteTableFailed);
            self.retry_at = Some(now + RETRY_AFTER);
            self.checked = None;
        }
    }

    /// Whether the driver should read the table back now (then [`Self::handle_table`]).
    pub fn poll_check(&mut self, now: Instant) -> bool {
        let due = self
            .checked
            .is_none_or(|at| now.saturating_duration_since(at) >= CHECK_EVERY);
        if due {
            self.checked = Some(now);
        }
        due
    }

    /// What the table holds, read back: the next diff starts from it.
    pub fn handle_table(&mut self, held: BTreeSet<IpNet>) {
        if held != self.installed {
            tracing::warn!(
                expected = self.installed.len(),
                found = held.len(),
                "the announcement table was changed by someone else; repairing it"
            );
        }
        self.installed = held;
    }

    /// When the next live prefix runs out of its hold (or a retry is due): the driver samples
    /// the peers more often than that anyway.
    pub fn next_timeout(&self) -> Option<Instant> {
        let expiry = self.live.values().copied().min();
        match (expiry, self.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// A spoke that sends a keepalive every second while `alive(ms)`.
    struct Spoke {
        prefixes: Vec<IpNet>,
        last_data: Option<Instant>,
    }

    /// Drives the announcer as the driver does: every 250 ms sample, diff, apply. Returns
    /// the times (ms) at which each prefix was announced (+) and withdrawn (-).
    fn run(
        a: &mut Announcer,
        t0: Instant,
        from_ms: u64,
        to_ms: u64,
        spokes: &mut [Spoke],
        sends: impl Fn(usize, u64) -> bool,
    ) -> Vec<(u64, char, IpNet)> {
        let mut log = Vec::new();
        for ms in (from_ms..to_ms).step_by(250) {
            let now = t0 + Duration::from_millis(ms);
            for (i, s) in spokes.iter_mut().enumerate() {
                if ms % 1000 == 0 && sends(i, ms) {
                    s.last_data = Some(now);
                }
            }
            a.handle_peers(
                now,
                spokes.iter().map(|s| PeerSample {
                    role: Role::Spoke,
                    last_data: s.last_data,
                    prefixes: &s.prefixes,
                }),
            );
            if let Some(diff) = a.poll_diff(now) {
                log.extend(diff.announce.iter().map(|n| (ms, '+', *n)));
                log.extend(diff.withdraw.iter().map(|n| (ms, '-', *n)));
                a.handle_applied(now, &diff, true);
            }
        }
        log
    }

    #[test]
    fn a_spoke_is_announced_at_its_first_keepalive_and_withdrawn_three_seconds_after_its_last() {
        let t0 = Instant::now();
        let mut a = Announcer::new(AnnounceSettings::default());
        let mut spokes = vec![Spoke {
            prefixes: nets(&["10.96.0.11/32", "10.30.1.0/24"]),
            last_data: None,
        }];
        // Talks to this hub from 2 s to 10 s (its last keepalive at 10 s), then moves away.
        let log = run(&mut a, t0, 0, 20_000, &mut spokes, |_, ms| {
            (2_000..=10_000).contains(&ms)
        });
        let at = |sign: char| -> Vec<u64> {
            log.iter()
                .filter(|(_, s, _)| *s == sign)
                .map(|(ms, ..)| *ms)
                .collect()
        };
        assert_eq!(at('+'), vec![2_000, 2_000]);
        assert_eq!(at('-'), vec![13_000, 13_000]);
        assert_eq!(a.announced().count(), 0);
        assert_eq!(a.counters().get(ControlEvent::RouteAnnounced), 2);
        assert_eq!(a.counters().get(ControlEvent::RouteWithdrawn), 2);
    }

    #[test]
    fn keepalives_that_come_late_within_the_hold_do_not_flap_the_route() {
        let t0 = Instant::now();
        let mut a = Announcer::new(AnnounceSettings::default());
        let mut spokes = vec![Spoke {
            prefixes: nets(&["10.30.1.0/24"]),
            last_data: None,
        }];
        // Every second keepalive is lost for a minute: two seconds of silence at a time.
        let log = run(&mut a, t0, 0, 60_000, &mut spokes, |_, ms| ms % 2000 == 0);
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!(log[0], (0, '+', nets(&["10.30.1.0/24"])[0]));
    }

    /// A hub restarted while its spoke moved to the other hub learns of the spoke only through
    /// handshakes it starts itself (which leave `last_data` empty): it announces nothing.
    /// Once the spoke sends here again (it failed back), its routes come here at once.
    #[test]
    fn a_peer_without_data_is_never_announced_and_one_that_sends_again_is_at_once() {
        let t0 = Instant::now();
        let mut a = Announcer::new(AnnounceSettings::default());
        let mut spokes = vec![
            Spoke {
                prefixes: nets(&["10.30.1.0/24"]),
                last_data: None,
            },
            Spoke {
                prefixes: nets(&["10.40.1.0/24"]),
                last_data: None,
            },
        ];
        let log = run(&mut a, t0, 0, 30_000, &mut spokes, |i, ms| {
            i == 1 && ms >= 17_000
        });
        assert_eq!(log, vec![(17_000, '+', nets(&["10.40.1.0/24"])[0])]);
    }

    #[test]
    fn home_offices_keep_their_route_between_keepalives_and_a_removed_peer_goes_at_once() {
        let t0 = Instant::now();
        let mut a = Announcer::new(AnnounceSettings::default());
        let ho = nets(&["10.30.200.7/32"]);
        let spoke = nets(&["10.30.1.0/24"]);
        let at = |s| t0 + Duration::from_secs(s);
        let sample = |a: &mut Announcer, now: Instant, with_spoke: bool, ho_data: Instant| {
            let mut peers = vec![PeerSample {
                role: Role::HomeOffice,
                last_data: Some(ho_data),
                prefixes: &ho,
            }];
            if with_spoke {
                peers.push(PeerSample {
                    role: Role::Spoke,
                    last_data: Some(now),
                    prefixes: &spoke,
                });
            }
            a.handle_peers(now, peers);
            let diff = a.poll_diff(now).unwrap_or_default();
            a.handle_applied(now, &diff, true);
            diff
        };
        let d = sample(&mut a, at(0), true, at(0));
        assert_eq!(d.announce, nets(&["10.30.1.0/24", "10.30.200.7/32"]));
        // 25 s between a home office's keepalives: still announced at 24 s.
        assert!(sample(&mut a, at(24), true, at(0)).is_empty());
        // The spoke was revoked: no longer sampled, withdrawn at the next sample.
        let d = sample(&mut a, at(25), false, at(25));
        assert_eq!(d.withdraw, spoke);
        // The laptop sleeps from 25 s: withdrawn when its session could carry nothing more.
        assert!(sample(&mut a, at(204), false, at(25)).is_empty());
        assert_eq!(sample(&mut a, at(205), false, at(25)).withdraw, ho);
        assert_eq!(a.next_timeout(), None);
    }

    #[test]
    fn a_failed_change_is_retried_after_a_second_from_what_the_table_holds() {
        let t0 = Instant::now();
        let mut a = Announcer::new(AnnounceSettings::default());
        let prefixes = nets(&["10.30.1.0/24", "fd00:30::/64"]);
        let sample = |a: &mut Announcer, now: Instant| {
            a.handle_peers(
                now,
                [PeerSample {
                    role: Role::Spoke,
                    last_data: Some(now),
                    prefixes: &prefixes,
                }],
            );
        };
        assert!(a.poll_check(t0), "the table is read back first");
        a.handle_table(BTreeSet::new());
        sample(&mut a, t0);
        let diff = a.poll_diff(t0).expect("a diff");
        a.handle_applied(t0, &diff, false);
        assert_eq!(a.counters().get(ControlEvent::RouteTableFailed), 1);
        // Nothing until the retry; the table is read back before it.
        let t1 = t0 + Duration::from_millis(500);
        sample(&mut a, t1);
        assert_eq!(a.poll_diff(t1), None);
        assert!(a.poll_check(t1));
        // Half of it went in after all.
        a.handle_table(nets(&["10.30.1.0/24"]).into_iter().collect());
        let t2 = t0 + RETRY_AFTER;
        sample(&mut a, t2);
        let diff = a.poll_diff(t2).expect("the rest");
        assert_eq!(diff.announce, nets(&["fd00:30::/64"]));
        a.handle_applied(t2, &diff, true);
        assert_eq!(a.announced().count(), 2);
        // Read back every CHECK_EVERY; a flushed table is filled again.
        assert!(!a.poll_check(t2));
        let t3 = t1 + CHECK_EVERY;
        assert!(a.poll_check(t3));
        a.handle_table(BTreeSet::new());
        sample(&mut a, t3);
        assert_eq!(a.poll_diff(t3).expect("refill").announce.len(), 2);
    }

    #[test]
    fn hubs_are_never_announced_and_host_bits_are_cleared() {
        let now = Instant::now();
        let mut a = Announcer::new(AnnounceSettings::default());
        let hub = nets(&["10.96.0.2/32"]);
        let sloppy = nets(&["10.30.1.7/24"]);
        a.handle_peers(
            now,
            [
                PeerSample {
                    role: Role::Hub,
                    last_data: Some(now),
                    prefixes: &hub,
                },
                PeerSample {
                    role: Role::Spoke,
                    last_data: Some(now),
                    prefixes: &sloppy,
                },
            ],
        );
        assert_eq!(
            a.wanted(now).into_iter().collect::<Vec<_>>(),
            nets(&["10.30.1.0/24"])
        );
    }
}
