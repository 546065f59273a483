//! Telling the service manager how the program is (`sd_notify(3)`, feature `service-manager`):
//! `READY=1` once it does what it is for, `WATCHDOG=1` keep-alives, `EXTEND_TIMEOUT_USEC` while a
//! slow start is under way for a good reason, `STOPPING=1`, and a `STATUS=` line for
//! `systemctl status`. The protocol is the `sd-notify` crate's; this adds what both daemons need
//! on top: the watchdog interval as half the timeout, status lines that cannot inject another
//! assignment, and a value that says once whether notifications are wanted at all. Everything
//! is a no-op when `NOTIFY_SOCKET` is unset (run by hand, in tests, under another supervisor).

use std::io;
use std::time::Duration;

use sd_notify::NotifyState;

/// What the environment asked for; cheap to share between threads.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A notifier for what the environment asks for (`NOTIFY_SOCKET`, `WATCHDOG_USEC` and
    /// `WATCHDOG_PID`): disabled when it asks for nothing.
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// How often to send `WATCHDOG=1`: half the timeout, as sd_watchdog_enabled(3) advises, so
    /// one late keep-alive does not cost a restart.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled).map(|d| d / 2)
    }

    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        sd_notify::notify(states)
    }

    pub fn ready(&self, status: &str) -> io::Result<()> {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)])
    }

    pub fn stopping(&self, status: &str) -> io::Result<()> {
        let status = one_line(status);
        self.send(&[NotifyState::Stopping, NotifyState::Status(&status)])
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        let status = one_line(status);
        self.send(&[NotifyState::Status(&status)])
    }

    pub fn watchdog(&self) -> io::Result<()> {
        self.send(&[NotifyState::Watchdog])
    }

    /// Asks for `by` more before the start (or stop) times out.
    pub fn extend_timeout(&self, by: Duration) -> io::Result<()> {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)])
    }
}

/// `text` with control characters as spaces: a newline would end the `STATUS=` assignment and
/// start another, so an error message in a status line could otherwise say `READY=1`.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_line_cannot_carry_another_assignment() {
        assert_eq!(
            one_line("policy refused\nREADY=1\r\tx"),
            "policy refused READY=1  x"
        );
    }

    #[test]
    fn disabled_sends_nothing_and_has_no_watchdog() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("up").unwrap();
        n.watchdog().unwrap();
    }
}
