//! The service manager's notification protocol (`sd_notify(3)`): readiness, watchdog keep-alives,
//! stopping and status lines, sent as one Unix datagram to `$NOTIFY_SOCKET`.
//!
//! systemd starts a `Type=notify` unit's dependants only once the daemon says `READY=1`, kills
//! it when `WATCHDOG=1` stops arriving within `WatchdogSec=`, and shows `STATUS=` in
//! `systemctl status`. The protocol is a few text lines in a datagram, so this is std only
//! rather than a binding to libsystemd. Everything is a no-op when the variables are unset (run
//! by hand, in tests, under another supervisor).

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

/// One assignment of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Start-up is finished: the service does what it is for.
    Ready,
    /// Shutdown has begun (so a slow stop is not mistaken for a hang).
    Stopping,
    /// The keep-alive `WatchdogSec=` waits for.
    Watchdog,
    /// Free text for `systemctl status`.
    Status(&'a str),
    /// The current start-up (or shutdown) needs this much longer; sent while a start is slow for
    /// a good reason (an enrollment service that is not reachable yet), so the start timeout
    /// only fires when the daemon has stopped saying so.
    ExtendTimeout(Duration),
}

/// The datagram for `messages`: one `KEY=VALUE` line each.
pub fn format(messages: &[Message<'_>]) -> String {
    let mut out = String::new();
    for m in messages {
        match m {
            Message::Ready => out.push_str("READY=1\n"),
            Message::Stopping => out.push_str("STOPPING=1\n"),
            Message::Watchdog => out.push_str("WATCHDOG=1\n"),
            Message::Status(text) => {
                // A newline would end the assignment and start another: an error message in a
                // status must not be able to say READY=1.
                out.push_str("STATUS=");
                out.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
                out.push('\n');
            }
            Message::ExtendTimeout(d) => {
                out.push_str(&format!("EXTEND_TIMEOUT_USEC={}\n", d.as_micros()));
            }
        }
    }
    out
}

/// Where the service manager listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A socket file (`/run/systemd/notify`).
    Path(PathBuf),
    /// Linux's abstract namespace (`@name` in the variable; the name without the `@`).
    Abstract(Vec<u8>),
}

/// What the environment asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// `None`: not run by a service manager that wants notifications.
    pub address: Option<Address>,
    /// The watchdog timeout (`WatchdogSec=`), when it applies to this process.
    pub watchdog: Option<Duration>,
}

/// The environment names a notification target this client cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvError {
    /// `NOTIFY_SOCKET` is neither an absolute path nor `@abstract` (e.g. `vsock:`).
    UnsupportedSocket(String),
    /// `WATCHDOG_USEC` is not a positive number of microseconds.
    WatchdogUsec(String),
    /// `WATCHDOG_PID` is not a process id.
    WatchdogPid(String),
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvError::UnsupportedSocket(s) => write!(
                f,
                "NOTIFY_SOCKET={s:?}: only socket paths and @abstract names are supported"
            ),
            EnvError::WatchdogUsec(s) => write!(
                f,
                "WATCHDOG_USEC={s:?}: expected a positive number of microseconds"
            ),
            EnvError::WatchdogPid(s) => write!(f, "WATCHDOG_PID={s:?}: expected a process id"),
        }
    }
}

impl std::error::Error for EnvError {}

impl Settings {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::parse(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            std::env::var_os("WATCHDOG_USEC").as_deref(),
            std::env::var_os("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// The settings these variable values mean for the process `own_pid`.
    pub fn parse(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        own_pid: u32,
    ) -> Result<Self, EnvError> {
        let address = match notify_socket.map(OsStr::as_bytes) {
            None | Some([]) => None,
            Some([b'@', name @ ..]) => Some(Address::Abstract(name.to_vec())),
            Some(path @ [b'/', ..]) => Some(Address::Path(PathBuf::from(OsStr::from_bytes(path)))),
            Some(other) => {
                return Err(EnvError::UnsupportedSocket(
                    String::from_utf8_lossy(other).into_owned(),
                ))
            }
        };
        let lossy = |v: &OsStr| v.to_string_lossy().into_owned();
        let usec = match watchdog_usec {
            None => None,
            Some(v) => match v.to_str().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) if n > 0 => Some(n),
                _ => return Err(EnvError::WatchdogUsec(lossy(v))),
            },
        };
        // systemd sets WATCHDOG_PID so that a child that inherited the environment (a shell
        // script, a helper) does not take the watchdog for itself.
        let for_us = match watchdog_pid {
            None => true,
            Some(v) => match v.to_str().and_then(|s| s.trim().parse::<u32>().ok()) {
                Some(pid) => pid == own_pid,
                None => return Err(EnvError::WatchdogPid(lossy(v))),
            },
        };
        let watchdog = usec
            .filter(|_| for_us && address.is_some())
            .map(Duration::from_micros);
        Ok(Settings { address, watchdog })
    }
}

/// Sends notifications; cheap to share between threads.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A notifier for what the environment asks for (disabled when it asks for nothing).
    pub fn from_env() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self::new(&Settings::from_env()?)?)
    }

    pub fn new(settings: &Settings) -> io::Result<Self> {
        let Some(address) = &settings.address else {
            return Ok(Self::disabled());
        };
        let addr = match address {
            Address::Path(p) => SocketAddr::from_pathname(p)?,
            Address::Abstract(name) => abstract_address(name)?,
        };
        Ok(Notifier {
            target: Some((UnixDatagram::unbound()?, addr)),
            watchdog: settings.watchdog,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the timeout, as sd_watchdog_enabled(3) advises, so
    /// one late ping does not cost a restart.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends `messages` in one datagram; nothing when disabled.
    pub fn send(&self, messages: &[Message<'_>]) -> io::Result<()> {
        let Some((socket, addr)) = &self.target else {
            return Ok(());
        };
        socket.send_to_addr(format(messages).as_bytes(), addr)?;
        Ok(())
    }

    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&[Message::Ready, Message::Status(status)])
    }

    pub fn stopping(&self, status: &str) -> io::Result<()> {
        self.send(&[Message::Stopping, Message::Status(status)])
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&[Message::Status(status)])
    }

    pub fn watchdog(&self) -> io::Result<()> {
        self.send(&[Message::Watchdog])
    }

    pub fn extend_timeout(&self, by: Duration) -> io::Result<()> {
        self.send(&[Message::ExtendTimeout(by)])
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt as _;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt as _;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract Unix socket addresses exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn messages_are_one_assignment_per_line() {
        assert_eq!(
            format(&[Message::Ready, Message::Status("running, policy 8")]),
            "READY=1\nSTATUS=running, policy 8\n"
        );
        assert_eq!(format(&[Message::Watchdog]), "WATCHDOG=1\n");
        assert_eq!(
            format(&[Message::Stopping, Message::Status("signal 15")]),
            "STOPPING=1\nSTATUS=signal 15\n"
        );
        assert_eq!(
            format(&[Message::ExtendTimeout(Duration::from_secs(30))]),
            "EXTEND_TIMEOUT_USEC=30000000\n"
        );
        assert_eq!(format(&[]), "");
    }

    #[test]
    fn a_status_cannot_inject_assignments() {
        assert_eq!(
            format(&[Message::Status("bad\nREADY=1\r\tx")]),
            "STATUS=bad READY=1  x\n"
        );
    }

    #[test]
    fn unset_variables_mean_no_notifications() {
        let s = Settings::parse(None, None, None, 42).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(
            Settings::parse(os(""), None, None, 42).unwrap().address,
            None
        );
        let n = Notifier::new(&s).unwrap();
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("ready").unwrap();
    }

    #[test]
    fn socket_paths_and_abstract_names() {
        let s = Settings::parse(os("/run/systemd/notify"), None, None, 1).unwrap();
        assert_eq!(
            s.address,
            Some(Address::Path(PathBuf::from("/run/systemd/notify")))
        );
        let s = Settings::parse(os("@/org/freedesktop/systemd1/notify/42"), None, None, 1).unwrap();
        assert_eq!(
            s.address,
            Some(Address::Abstract(
                b"/org/freedesktop/systemd1/notify/42".to_vec()
            ))
        );
        let e = Settings::parse(os("vsock:2:1234"), None, None, 1).unwrap_err();
        assert_eq!(e, EnvError::UnsupportedSocket("vsock:2:1234".into()));
        assert!(
            e.to_string().contains("NOTIFY_SOCKET=\"vsock:2:1234\""),
            "{e}"
        );
        let e = Settings::parse(os("relative/path"), None, None, 1).unwrap_err();
        assert!(matches!(e, EnvError::UnsupportedSocket(_)));
    }

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout_and_only_by_its_process() {
        let sock = os("/run/systemd/notify");
        let s = Settings::parse(sock, os("30000000"), os("77"), 77).unwrap();
        assert_eq!(s.watchdog, Some(Duration::from_secs(30)));
        let n = Notifier::new(&s).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        // Without WATCHDOG_PID the watchdog is ours.
        let s = Settings::parse(sock, os("1000000"), None, 77).unwrap();
        assert_eq!(s.watchdog, Some(Duration::from_secs(1)));
        // Inherited by a child: not ours.
        let s = Settings::parse(sock, os("1000000"), os("76"), 77).unwrap();
        assert_eq!(s.watchdog, None);
        // Nowhere to send keep-alives to.
        let s = Settings::parse(None, os("1000000"), None, 77).unwrap();
        assert_eq!(s.watchdog, None);
    }

    #[test]
    fn malformed_watchdog_variables_are_named() {
        let sock = os("/run/systemd/notify");
        for bad in ["0", "-5", "soon", ""] {
            let e = Settings::parse(sock, os(bad), None, 1).unwrap_err();
            assert_eq!(e, EnvError::WatchdogUsec(bad.into()));
        }
        let e = Settings::parse(sock, os("10"), os("init"), 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "WATCHDOG_PID=\"init\": expected a process id"
        );
    }

    #[test]
    fn ready_arrives_on_a_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let settings = Settings::parse(
            Some(path.as_os_str()),
            os("4000000"),
            None,
            std::process::id(),
        )
        .unwrap();
        let n = Notifier::new(&settings).unwrap();
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
        let mut buf = [0u8; 256];
        n.ready("tunnel up").unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=tunnel up\n");
        n.watchdog().unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
        n.stopping("signal 15").unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=signal 15\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn ready_arrives_on_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!(
            "komnet-sdnotify-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let var = format!("@{name}");
        let settings = Settings::parse(os(&var), None, None, 1).unwrap();
        let n = Notifier::new(&settings).unwrap();
        n.ready("listening").unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=listening\n");
    }

    #[test]
    fn a_vanished_manager_is_an_error_the_caller_sees() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            address: Some(Address::Path(dir.path().join("gone"))),
            watchdog: None,
        };
        let n = Notifier::new(&settings).unwrap();
        assert!(n.watchdog().is_err());
    }
}
