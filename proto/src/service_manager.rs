//! Telling the service manager how the program is (`sd_notify(3)`, feature `service-manager`):
//! `READY=1` once it does what it is for, `WATCHDOG=1` keep-alives, `EXTEND_TIMEOUT_USEC` while a
//! slow start is under way for a good reason, `STOPPING=1`, and a `STATUS=` line for
//! `systemctl status`. The protocol is the `sd-notify` crate's; this adds what both daemons need
//! on top: the watchdog interval as half the timeout, status lines that cannot inject another
//! assignment, and a value that says once whether notifications are wanted at all. Everything
//! is a no-op when `NOTIFY_SOCKET` is unset (run by hand, in tests, under another supervisor).

use std::ffi::OsStr;
use std::io;
use std::time::Duration;

use sd_notify::NotifyState;

/// What is wrong with the service manager's environment; the program goes on without
/// notifications and says so, since a watchdog it cannot feed would restart it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    /// sd-notify reaches only a socket path; systemd passes one, other managers may not.
    #[error("NOTIFY_SOCKET={0:?} is not a socket path (only /path sockets are supported)")]
    UnsupportedSocket(String),
    #[error("WATCHDOG_USEC={0:?} is not a number of microseconds")]
    WatchdogUsec(String),
    #[error("WATCHDOG_PID={0:?} is not a process id")]
    WatchdogPid(String),
}

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
    /// `WATCHDOG_PID`): disabled when it asks for nothing, an error when it asks for something
    /// this cannot do.
    pub fn from_env() -> Result<Self, EnvError> {
        let usec = std::env::var_os("WATCHDOG_USEC");
        let pid = std::env::var_os("WATCHDOG_PID");
        Self::from_vars(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        )
    }

    fn from_vars(
        socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        own_pid: u32,
    ) -> Result<Self, EnvError> {
        let lossy = |v: &OsStr| v.to_string_lossy().into_owned();
        let enabled = match socket {
            None => false,
            Some(s) if s.is_empty() => false,
            Some(s) if s.as_encoded_bytes().starts_with(b"/") => true,
            Some(s) => return Err(EnvError::UnsupportedSocket(lossy(s))),
        };
        let for_us = match watchdog_pid {
            None => true,
            Some(p) => {
                let pid = p.to_str().and_then(|p| p.parse::<u32>().ok());
                pid.ok_or_else(|| EnvError::WatchdogPid(lossy(p)))? == own_pid
            }
        };
        let watchdog = match watchdog_usec {
            None => None,
            Some(u) => {
                let usec = u.to_str().and_then(|u| u.parse::<u64>().ok());
                Some(Duration::from_micros(
                    usec.ok_or_else(|| EnvError::WatchdogUsec(lossy(u)))?,
                ))
            }
        };
        Ok(Notifier {
            enabled,
            watchdog: watchdog.filter(|d| for_us && !d.is_zero()),
        })
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

    fn vars(
        socket: Option<&str>,
        usec: Option<&str>,
        pid: Option<&str>,
    ) -> Result<Notifier, EnvError> {
        Notifier::from_vars(
            socket.map(OsStr::new),
            usec.map(OsStr::new),
            pid.map(OsStr::new),
            42,
        )
    }

    #[test]
    fn the_environment_systemd_passes_enables_notifications_and_the_watchdog() {
        let n = vars(Some("/run/systemd/notify"), Some("20000000"), Some("42")).unwrap();
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(10)));
        let n = vars(Some("/run/systemd/notify"), Some("20000000"), None).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(10)));
    }

    #[test]
    fn no_socket_or_a_watchdog_for_another_process_asks_for_nothing() {
        let n = vars(None, None, None).unwrap();
        assert!(!n.is_enabled());
        let n = vars(Some(""), Some("20000000"), None).unwrap();
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        let n = vars(Some("/run/systemd/notify"), Some("20000000"), Some("7")).unwrap();
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        let n = vars(Some("/run/systemd/notify"), Some("0"), None).unwrap();
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn what_the_crate_cannot_do_is_an_error_naming_the_variable() {
        for socket in ["@systemd/notify", "vsock:2:1234", "run/notify"] {
            let err = vars(Some(socket), None, None).unwrap_err();
            assert_eq!(err, EnvError::UnsupportedSocket(socket.into()));
            assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
        }
        let err = vars(Some("/run/n"), Some("10s"), None).unwrap_err();
        assert_eq!(err, EnvError::WatchdogUsec("10s".into()));
        assert!(err.to_string().contains("WATCHDOG_USEC=\"10s\""), "{err}");
        let err = vars(Some("/run/n"), Some("1000"), Some("x")).unwrap_err();
        assert_eq!(err, EnvError::WatchdogPid("x".into()));
    }
}
