//! When the appliance renews its certificate: from `renew_after` (2/3 of the lifetime, set by
//! the service) on, and a minute after each failed attempt. Time is Unix seconds (certificate
//! times are wall-clock times).

use super::{ControlEvent, Counters};

/// How long after a failed renewal the next attempt is made.
pub const RETRY_AFTER_SECS: i64 = 60;
/// The driver never sleeps longer than this at once, so a wall clock that jumps is noticed.
pub const MAX_SLEEP_SECS: i64 = 3600;

/// How a renewal came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    /// The new certificate's renewal lies ahead.
    OnSchedule,
    /// The new certificate is due for renewal already: the service's clock is far behind this
    /// one (or its lifetimes are very short). The next attempt waits [`RETRY_AFTER_SECS`]
    /// instead of following at once, again and again.
    DueAlready,
}

/// What to do about the certificate now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalStep {
    /// Renew now, then report with [`RenewalSchedule::handle_renewed`] or
    /// [`RenewalSchedule::handle_failed`].
    Renew,
    /// Sleep this many seconds, then ask again.
    Sleep(i64),
}

/// How a failed renewal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalFailure {
    /// The certificate is still valid; the next attempt is in [`RETRY_AFTER_SECS`].
    WillRetry,
    /// The certificate has expired: only a new bootstrap token helps (attempts go on, in case
    /// the service's clock was the wrong one).
    Expired,
}

/// The renewal schedule of one certificate.
#[derive(Debug, Clone)]
pub struct RenewalSchedule {
    renew_after: i64,
    not_after: i64,
    retry_at: Option<i64>,
    counters: Counters,
}

impl RenewalSchedule {
    pub fn new(renew_after: i64, not_after: i64) -> Self {
        RenewalSchedule {
            renew_after,
            not_after,
            retry_at: None,
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// What to do at `unix`.
    pub fn poll(&self, unix: i64) -> RenewalStep {
        let due = self
            .retry_at
            .map_or(self.renew_after, |r| r.max(self.renew_after));
        if unix >= due {
            RenewalStep::Renew
        } else {
            RenewalStep::Sleep((due - unix).min(MAX_SLEEP_SECS))
        }
    }

    /// A new certificate with its own schedule, received at `unix`.
    pub fn handle_renewed(&mut self, renew_after: i64, not_after: i64, unix: i64) -> Renewed {
        self.renew_after = renew_after;
        self.not_after = not_after;
        self.counters.count(ControlEvent::Renewed);
        if renew_after <= unix {
            self.retry_at = Some(unix + RETRY_AFTER_SECS);
            Renewed::DueAlready
        } else {
            self.retry_at = None;
            Renewed::OnSchedule
        }
    }

    /// The attempt at `unix` failed.
    pub fn handle_failed(&mut self, unix: i64) -> RenewalFailure {
        self.counters.count(ControlEvent::RenewFailed);
        self.retry_at = Some(unix + RETRY_AFTER_SECS);
        if self.not_after <= unix {
            RenewalFailure::Expired
        } else {
            RenewalFailure::WillRetry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the driver's loop over simulated Unix time; `service_up(t)` says whether a
    /// renewal at `t` works (giving a 7-day certificate). Returns the attempt times.
    fn simulate(
        schedule: &mut RenewalSchedule,
        from: i64,
        until: i64,
        service_up: impl Fn(i64) -> bool,
    ) -> Vec<(i64, bool)> {
        let mut t = from;
        let mut attempts = Vec::new();
        while t < until {
            match schedule.poll(t) {
                RenewalStep::Sleep(s) => {
                    assert!(s > 0 && s <= MAX_SLEEP_SECS, "{s}");
                    t += s;
                }
                RenewalStep::Renew => {
                    let ok = service_up(t);
                    attempts.push((t, ok));
                    if ok {
                        let lifetime = 7 * 86_400;
                        schedule.handle_renewed(t + lifetime * 2 / 3, t + lifetime, t);
                    } else {
                        schedule.handle_failed(t);
                    }
                }
            }
        }
        attempts
    }

    #[test]
    fn renews_at_two_thirds_of_the_lifetime_and_not_before() {
        let lifetime = 7 * 86_400;
        let mut s = RenewalSchedule::new(lifetime * 2 / 3, lifetime);
        let attempts = simulate(&mut s, 0, 3 * lifetime, |_| true);
        let expected: Vec<(i64, bool)> = (1..=4).map(|n| (n * lifetime * 2 / 3, true)).collect();
        assert_eq!(attempts, expected);
        assert_eq!(s.counters().get(ControlEvent::Renewed), 4);
    }

    #[test]
    fn a_failed_renewal_is_retried_every_minute_until_the_service_is_back() {
        let lifetime = 7 * 86_400;
        let due = lifetime * 2 / 3;
        let mut s = RenewalSchedule::new(due, lifetime);
        // The service is down for ten minutes from the due time.
        let attempts = simulate(&mut s, 0, due + 3600, |t| t >= due + 600);
        let failed: Vec<i64> = attempts.iter().filter(|a| !a.1).map(|a| a.0).collect();
        assert_eq!(failed, (0..10).map(|n| due + n * 60).collect::<Vec<_>>());
        assert_eq!(attempts.last(), Some(&(due + 600, true)));
        assert_eq!(s.counters().get(ControlEvent::RenewFailed), 10);
    }

    #[test]
    fn an_expired_certificate_is_reported_as_such() {
        let mut s = RenewalSchedule::new(100, 150);
        assert_eq!(s.poll(0), RenewalStep::Sleep(100));
        assert_eq!(s.handle_failed(120), RenewalFailure::WillRetry);
        assert_eq!(s.poll(150), RenewalStep::Sleep(30));
        assert_eq!(s.handle_failed(180), RenewalFailure::Expired);
        // A wall clock far behind: the driver wakes up at least every hour.
        let s = RenewalSchedule::new(1_000_000, 2_000_000);
        assert_eq!(s.poll(0), RenewalStep::Sleep(MAX_SLEEP_SECS));
    }

    #[test]
    fn a_certificate_due_already_is_not_renewed_again_at_once() {
        // A service whose clock is six days behind issues 7-day certificates that are due for
        // renewal when they arrive (and expire a day later): one renewal a minute, not a loop.
        let (lifetime, behind) = (7 * 86_400, 6 * 86_400);
        let issue = |t: i64| ((t - behind) + lifetime * 2 / 3, (t - behind) + lifetime);
        let (due, end) = issue(0);
        let mut s = RenewalSchedule::new(due, end);
        let mut attempts = Vec::new();
        let mut t = 0;
        while t < 600 {
            match s.poll(t) {
                RenewalStep::Sleep(n) => t += n,
                RenewalStep::Renew => {
                    attempts.push(t);
                    let (due, end) = issue(t);
                    assert_eq!(s.handle_renewed(due, end, t), Renewed::DueAlready);
                }
            }
        }
        assert_eq!(attempts, (0..10).map(|n| n * 60).collect::<Vec<_>>());
        // On time again: the normal schedule.
        assert_eq!(
            s.handle_renewed(600 + lifetime * 2 / 3, 600 + lifetime, 600),
            Renewed::OnSchedule
        );
        assert_eq!(s.poll(600), RenewalStep::Sleep(MAX_SLEEP_SECS));
    }
}
