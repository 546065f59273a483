//! Server-side sessions, logins under way and login throttling.
//!
//! Sessions live in the console's memory: the cookie carries only a random id, a session ends
//! at logout, after `session_idle` without a request, after `session_max`, or when the console
//! restarts (everyone signs in again: a few seconds with single sign-on, and no session
//! database to protect). Each session has its own CSRF token for its forms.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::Mutex;
use subtle::ConstantTimeEq as _;

use crate::oidc::{Pending, Person};

/// The session cookie: `__Host-` binds it to this origin, path / and Secure.
pub const SESSION_COOKIE: &str = "__Host-komnet-session";
/// Binds a login under way to the browser that started it (no login CSRF).
pub const LOGIN_COOKIE: &str = "__Host-komnet-login";
/// A login must come back from the identity provider within this.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(600);
/// At most this many logins under way (a flood of /auth/start cannot fill the memory).
const MAX_PENDING: usize = 10_000;

/// 32 random bytes, URL-safe.
pub fn random_id() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

#[derive(Debug, Clone)]
pub struct Session {
    pub person: Person,
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
}

#[derive(Debug)]
struct PendingLogin {
    browser: String,
    pending: Pending,
    at: Instant,
}

#[derive(Debug)]
pub struct Sessions {
    idle: Duration,
    max: Duration,
    sessions: Mutex<HashMap<String, Session>>,
    pending: Mutex<HashMap<String, PendingLogin>>,
}

impl Sessions {
    pub fn new(idle: Duration, max: Duration) -> Self {
        Sessions {
            idle,
            max,
            sessions: Mutex::default(),
            pending: Mutex::default(),
        }
    }

    /// A new session for the person; returns its id (the cookie's value).
    pub fn create(&self, person: Person, now: Instant) -> String {
        let id = random_id();
        let mut sessions = self.sessions.lock();
        sessions.retain(|_, s| self.alive(s, now));
        sessions.insert(
            id.clone(),
            Session {
                person,
                csrf: random_id(),
                created: now,
                last_seen: now,
            },
        );
        id
    }

    fn alive(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_seen) < self.idle && now.duration_since(s.created) < self.max
    }

    /// The live session with this id, marked as used now.
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let mut sessions = self.sessions.lock();
        let alive = sessions.get(id).map(|s| self.alive(s, now))?;
        if !alive {
            sessions.remove(id);
            return None;
        }
        let s = sessions.get_mut(id)?;
        s.last_seen = now;
        Some(s.clone())
    }

    /// Ends a session (logout).
    pub fn revoke(&self, id: &str) {
        self.sessions.lock().remove(id);
    }

    /// Remembers a login under way; false when too many are.
    pub fn start_login(&self, browser: String, pending: Pending, now: Instant) -> bool {
        let mut map = self.pending.lock();
        map.retain(|_, p| now.duration_since(p.at) < LOGIN_TIMEOUT);
        if map.len() >= MAX_PENDING {
            return false;
        }
        map.insert(
            pending.state.clone(),
            PendingLogin {
                browser,
                pending,
                at: now,
            },
        );
        true
    }

    /// The login `state` names, if this browser started it (taken: a state is used once).
    pub fn finish_login(&self, state: &str, browser: &str, now: Instant) -> Option<Pending> {
        let p = self.pending.lock().remove(state)?;
        let same_browser: bool = p.browser.as_bytes().ct_eq(browser.as_bytes()).into();
        (same_browser && now.duration_since(p.at) < LOGIN_TIMEOUT).then_some(p.pending)
    }
}

/// Is `given` the session's CSRF token?
pub fn csrf_ok(session: &Session, given: &str) -> bool {
    session.csrf.as_bytes().ct_eq(given.as_bytes()).into()
}

/// Logins per source address: a token bucket of `per_minute`, refilled continuously.
#[derive(Debug)]
pub struct Throttle {
    per_minute: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Throttle {
    pub fn new(per_minute: u32) -> Self {
        Throttle {
            per_minute: f64::from(per_minute),
            buckets: Mutex::default(),
        }
    }

    /// Takes one login attempt from the source's bucket; false when it is empty.
    pub fn allow(&self, source: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            let per_minute = self.per_minute;
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_minute / 60.0 < per_minute
            });
        }
        let (tokens, at) = buckets.entry(source).or_insert((self.per_minute, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_minute / 60.0)
            .min(self.per_minute);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::Role;

    fn person() -> Person {
        Person {
            subject: "s".into(),
            name: "n".into(),
            role: Role::Operator,
            acr: None,
            amr: vec![],
            mfa_at: None,
        }
    }

    #[test]
    fn sessions_end_when_idle_at_their_maximum_and_at_logout() {
        let t0 = Instant::now();
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(150));
        let id = s.create(person(), t0);
        assert!(s.get(&id, t0 + Duration::from_secs(50)).is_some());
        assert!(s.get(&id, t0 + Duration::from_secs(100)).is_some());
        // Used every 50 s, yet over the maximum.
        assert!(s.get(&id, t0 + Duration::from_secs(150)).is_none());
        let id = s.create(person(), t0);
        assert!(s.get(&id, t0 + Duration::from_secs(61)).is_none(), "idle");
        let id = s.create(person(), t0);
        s.revoke(&id);
        assert!(s.get(&id, t0).is_none(), "logged out");
    }

    #[test]
    fn throttle_refills() {
        let t0 = Instant::now();
        let th = Throttle::new(2);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        assert!(th.allow(ip, t0));
        assert!(th.allow(ip, t0));
        assert!(!th.allow(ip, t0));
        assert!(th.allow("192.0.2.2".parse().expect("ip"), t0), "per source");
        assert!(th.allow(ip, t0 + Duration::from_secs(30)));
    }
}
