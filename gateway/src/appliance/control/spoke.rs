//! The spoke's decisions: which hub carries the traffic, when it counts as silent and the
//! next one takes over, when the hub list is refreshed and when a failed LAN address change is
//! retried. The driver (`super::super::spoke`) samples the active hub's received bytes, feeds
//! them in with the time, and carries out the [`SpokeAction`]s.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{ControlEvent, Counters};

/// How often the hub list is fetched while there is none (a spoke that enrolled before any
/// hub existed), and while there is one.
pub const REFRESH_WITHOUT_HUBS: Duration = Duration::from_secs(2);
pub const REFRESH_WITH_HUBS: Duration = Duration::from_secs(60);
/// How often a failed LAN address change is tried again.
pub const LAN_RETRY: Duration = Duration::from_secs(10);

/// What the driver does for the spoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpokeAction {
    /// Make hub `hub` (index into the hub list) the one that carries the data centre's routes
    /// and keeps the session warm; the others keep only their tunnel addresses.
    Activate { hub: usize },
    /// Start a new handshake with hub `hub` now (after a failover, or with a single hub that
    /// fell silent: it may have restarted and lost the session).
    Handshake { hub: usize },
    /// Fetch the hub list from the enrollment service, then call [`SpokeCore::handle_hubs`].
    RefreshHubs,
    /// Put the LAN addresses the policy wants on the LAN interface again, then call
    /// [`SpokeCore::handle_lan_result`].
    RetryLan,
}

/// The spoke's state machine.
#[derive(Debug)]
pub struct SpokeCore {
    failover_after: Duration,
    hubs: usize,
    active: usize,
    /// The active hub's received-bytes counter when it last changed, and when that was.
    last_rx: Option<(usize, u64)>,
    heard: Instant,
    last_refresh: Instant,
    lan_retry: bool,
    last_lan_retry: Instant,
    actions: VecDeque<SpokeAction>,
    counters: Counters,
}

impl SpokeCore {
    /// A spoke with `hubs` hubs, the first one active, at `now`.
    pub fn new(now: Instant, failover_after: Duration, hubs: usize) -> Self {
        SpokeCore {
            failover_after,
            hubs,
            active: 0,
            last_rx: None,
            heard: now,
            last_refresh: now,
            lan_retry: false,
            last_lan_retry: now,
            actions: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// The hub that carries the traffic (index into the hub list).
    pub fn active_hub(&self) -> usize {
        self.active
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The active hub's received-bytes counter as sampled at `now`: any change means the hub
    /// is alive.
    pub fn handle_active_rx(&mut self, now: Instant, rx_bytes: u64) {
        if self.hubs == 0 {
            return;
        }
        if self.last_rx != Some((self.active, rx_bytes)) {
            self.last_rx = Some((self.active, rx_bytes));
            self.heard = now;
        }
    }

    /// A new hub list with `hubs` entries (fetched by [`SpokeAction::RefreshHubs`]); the
    /// active index stays where it was if it still exists.
    pub fn handle_hubs(&mut self, hubs: usize) {
        self.hubs = hubs;
        self.active = self.active.min(hubs.saturating_sub(1));
    }

    /// Whether the LAN addresses could be set; a failure is retried every [`LAN_RETRY`].
    pub fn handle_lan_result(&mut self, ok: bool) {
        if !ok {
            self.counters.count(ControlEvent::LanAddressesFailed);
        }
        self.lan_retry = !ok;
    }

    /// Whether a LAN address change failed and waits for its retry.
    pub fn lan_retry_pending(&self) -> bool {
        self.lan_retry
    }

    fn refresh_every(&self) -> Duration {
        if self.hubs == 0 {
            REFRESH_WITHOUT_HUBS
        } else {
            REFRESH_WITH_HUBS
        }
    }

    /// When [`Self::handle_timeout`] has something to decide next.
    pub fn next_timeout(&self) -> Instant {
        let mut next = self.last_refresh + self.refresh_every();
        if self.hubs > 0 {
            next = next.min(self.heard + self.failover_after);
        }
        if self.lan_retry {
            next = next.min(self.last_lan_retry + LAN_RETRY);
        }
        next
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.hubs > 0 && now.saturating_duration_since(self.heard) >= self.failover_after {
            let next = (self.active + 1) % self.hubs;
            if next != self.active {
                tracing::warn!(from = self.active, to = next, silent_for = ?now.saturating_duration_since(self.heard), "hub not answering; failing over");
                self.active = next;
                self.counters.count(ControlEvent::Failover);
                self.actions.push_back(SpokeAction::Activate { hub: next });
            } else {
                tracing::info!(silent_for = ?now.saturating_duration_since(self.heard), "hub silent; starting a new handshake");
                self.counters.count(ControlEvent::HubRehandshake);
            }
            self.actions.push_back(SpokeAction::Handshake { hub: next });
            self.heard = now;
        }
        if self.lan_retry && now.saturating_duration_since(self.last_lan_retry) >= LAN_RETRY {
            self.last_lan_retry = now;
            self.actions.push_back(SpokeAction::RetryLan);
        }
        if now.saturating_duration_since(self.last_refresh) >= self.refresh_every() {
            self.last_refresh = now;
            self.actions.push_back(SpokeAction::RefreshHubs);
        }
    }

    /// The next thing to do, in the order decided.
    pub fn poll_action(&mut self) -> Option<SpokeAction> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILOVER: Duration = Duration::from_secs(3);

    /// Drives the core like the driver does: every `step`, sample rx, run due timers.
    fn run(
        core: &mut SpokeCore,
        now: &mut Instant,
        until: Duration,
        step: Duration,
        mut rx: impl FnMut(usize, Instant) -> u64,
    ) -> Vec<(Duration, SpokeAction)> {
        let start = *now;
        let end = *now + until;
        let mut out = Vec::new();
        while *now < end {
            *now += step;
            let r = rx(core.active_hub(), *now);
            core.handle_active_rx(*now, r);
            if *now >= core.next_timeout() {
                core.handle_timeout(*now);
            }
            while let Some(a) = core.poll_action() {
                out.push((now.duration_since(start), a));
            }
        }
        out
    }

    #[test]
    fn failover_happens_within_failover_after_of_the_last_byte_and_wraps_around() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut core = SpokeCore::new(now, FAILOVER, 3);
        // Hub 0 sends a keepalive every second until 10 s; hubs 1 and 2 never answer.
        let acts = run(
            &mut core,
            &mut now,
            Duration::from_secs(30),
            Duration::from_millis(250),
            |hub, t| {
                let secs = t.duration_since(t0).as_secs();
                if hub == 0 {
                    secs.min(10)
                } else {
                    0
                }
            },
        );
        let activations: Vec<_> = acts
            .iter()
            .filter(|(_, a)| matches!(a, SpokeAction::Activate { .. }))
            .collect();
        // Last change of hub 0's counter at 10 s: failover to hub 1 at 13 s. The new hub's
        // first sample (a quarter second later) starts its clock, so hub 2 takes over at
        // 16.25 s (hub 1 stayed silent) and hub 0 again at 19.5 s.
        let ms = Duration::from_millis;
        assert_eq!(
            activations[0],
            &(ms(13_000), SpokeAction::Activate { hub: 1 })
        );
        assert_eq!(
            activations[1],
            &(ms(16_250), SpokeAction::Activate { hub: 2 })
        );
        assert_eq!(
            activations[2],
            &(ms(19_500), SpokeAction::Activate { hub: 0 })
        );
        // Each failover is followed at once by a handshake with the new hub.
        let i = acts.iter().position(|a| a == activations[0]).unwrap();
        assert_eq!(acts[i + 1].1, SpokeAction::Handshake { hub: 1 });
        assert_eq!(core.counters().get(ControlEvent::Failover), 6);
    }

    #[test]
    fn a_hub_that_answers_is_kept_and_a_single_silent_hub_gets_new_handshakes() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut core = SpokeCore::new(now, FAILOVER, 2);
        let acts = run(
            &mut core,
            &mut now,
            Duration::from_secs(30),
            Duration::from_millis(250),
            |_, t| t.duration_since(t0).as_millis() as u64 / 1000,
        );
        assert!(
            acts.iter().all(|(_, a)| !matches!(
                a,
                SpokeAction::Activate { .. } | SpokeAction::Handshake { .. }
            )),
            "{acts:?}"
        );
        assert_eq!(core.active_hub(), 0);

        let mut core = SpokeCore::new(now, FAILOVER, 1);
        let acts = run(
            &mut core,
            &mut now,
            Duration::from_secs(7),
            Duration::from_millis(250),
            |_, _| 5,
        );
        let handshakes: Vec<_> = acts
            .iter()
            .filter(|(_, a)| *a == SpokeAction::Handshake { hub: 0 })
            .map(|(t, _)| *t)
            .collect();
        // The first sample (at 0.25 s) starts the clock.
        assert_eq!(
            handshakes,
            vec![Duration::from_millis(3250), Duration::from_millis(6250)]
        );
        assert!(acts
            .iter()
            .all(|(_, a)| !matches!(a, SpokeAction::Activate { .. })));
        assert_eq!(core.counters().get(ControlEvent::HubRehandshake), 2);
    }

    #[test]
    fn the_hub_list_is_refreshed_every_2s_without_hubs_and_every_60s_with() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut core = SpokeCore::new(now, FAILOVER, 0);
        let acts = run(
            &mut core,
            &mut now,
            Duration::from_secs(7),
            Duration::from_millis(250),
            |_, _| 0,
        );
        let refreshes: Vec<_> = acts
            .iter()
            .filter(|(_, a)| *a == SpokeAction::RefreshHubs)
            .map(|(t, _)| t.as_secs())
            .collect();
        assert_eq!(refreshes, vec![2, 4, 6]);
        // No hubs: nothing to fail over.
        assert!(acts.iter().all(|(_, a)| *a == SpokeAction::RefreshHubs));
        core.handle_hubs(2);
        let acts = run(
            &mut core,
            &mut now,
            Duration::from_secs(130),
            Duration::from_millis(250),
            |_, t| t.duration_since(t0).as_secs(),
        );
        let refreshes: Vec<_> = acts
            .iter()
            .filter(|(_, a)| *a == SpokeAction::RefreshHubs)
            .map(|(t, _)| t.as_secs())
            .collect();
        assert_eq!(refreshes, vec![59, 119]);
    }

    #[test]
    fn a_shorter_hub_list_keeps_the_active_index_inside_it() {
        let mut core = SpokeCore::new(Instant::now(), FAILOVER, 3);
        let mut now = Instant::now();
        run(
            &mut core,
            &mut now,
            Duration::from_secs(7),
            Duration::from_millis(250),
            |_, _| 0,
        );
        assert_eq!(core.active_hub(), 2);
        core.handle_hubs(2);
        assert_eq!(core.active_hub(), 1);
        core.handle_hubs(0);
        assert_eq!(core.active_hub(), 0);
    }

    #[test]
    fn a_failed_lan_change_is_retried_every_10s_until_it_works() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut core = SpokeCore::new(now, FAILOVER, 1);
        core.handle_lan_result(false);
        assert!(core.lan_retry_pending());
        let mut retries = Vec::new();
        for _ in 0..(25 * 4) {
            now += Duration::from_millis(250);
            core.handle_active_rx(now, now.duration_since(t0).as_secs());
            if now >= core.next_timeout() {
                core.handle_timeout(now);
            }
            while let Some(a) = core.poll_action() {
                if a == SpokeAction::RetryLan {
                    retries.push(now.duration_since(t0).as_secs());
                    // The second retry works.
                    core.handle_lan_result(retries.len() >= 2);
                }
            }
        }
        assert_eq!(retries, vec![10, 20]);
        assert!(!core.lan_retry_pending());
        assert_eq!(core.counters().get(ControlEvent::LanAddressesFailed), 2);
    }
}
