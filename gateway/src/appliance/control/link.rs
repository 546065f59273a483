//! The hub's link to the registry (the enrollment service's list of valid identities): when
//! to connect, when a silent or stalled link counts as lost, how long to wait before trying
//! again, and what the operator chose to do while it stays lost.

use std::time::{Duration, Instant};

use komnet_proto::api::{REGISTRY_DEFAULT_KEEPALIVE_SECS, REGISTRY_MISSED_KEEPALIVES};

/// The first wait before connecting again after the link was lost; it doubles with every
/// failure in a row up to [`BACKOFF_MAX`] (each wait varied by up to a fifth, so hubs that lost
/// the registry together do not come back in step).
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between attempts: a registry that comes back is followed again within
/// seconds, and a few hubs trying every 15 s are no load.
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A snapshot and the opening of the change stream must be done within this; on a blackholed
/// path the attempt is given up rather than waited on.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the hub's link to the registry stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected; connect at `until`.
    Waiting { until: Instant },
    /// A snapshot is being fetched, then the change stream opened, since `since`.
    Connecting { since: Instant },
    /// The snapshot of `version` is applied and the change stream is read since `since`; the
    /// last snapshot, event or keep-alive arrived at `last_heard`.
    Following {
        version: u64,
        since: Instant,
        last_heard: Instant,
    },
}

/// Why the link was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLoss {
    /// The connection failed, the service closed the stream or answered with an error.
    Failed,
    /// Nothing (no event, no keep-alive) for [`REGISTRY_MISSED_KEEPALIVES`] keep-alive
    /// intervals: a half-open connection.
    Silent,
    /// The snapshot and the stream did not come within [`CONNECT_TIMEOUT`].
    ConnectTimeout,
}

impl std::fmt::Display for LinkLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkLoss::Failed => "the connection failed or the stream ended",
            LinkLoss::Silent => "the stream missed three keep-alives (a half-open connection)",
            LinkLoss::ConnectTimeout => "no snapshot and stream within the connect timeout",
        })
    }
}

/// The hub's link to the registry: connect, follow, notice a dead stream, back off, reconnect.
#[derive(Debug, Clone)]
pub struct RegistryLink {
    state: LinkState,
    /// The keep-alive interval the service announced for the stream being followed.
    keepalive: Duration,
    /// Attempts that failed in a row (reset once a stream proved alive).
    failures: u32,
    /// Since when the hub has not been following the registry (`None` while it does).
    pub(super) down_since: Option<Instant>,
    /// When the last registry event arrived (kept across reconnects).
    last_event: Option<Instant>,
    /// xorshift state for the backoff's variation.
    jitter: u64,
}

impl RegistryLink {
    /// A link that connects at once; `seed` varies its backoff from other hubs'.
    pub fn new(now: Instant, seed: u64) -> Self {
        RegistryLink {
            state: LinkState::Waiting { until: now },
            keepalive: Duration::from_secs(REGISTRY_DEFAULT_KEEPALIVE_SECS),
            failures: 0,
            down_since: Some(now),
            last_event: None,
            jitter: seed | 1,
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

    /// How long the hub has not been following the registry (`None`: it follows it now).
    pub fn outage(&self, now: Instant) -> Option<Duration> {
        self.down_since.map(|d| now.saturating_duration_since(d))
    }

    pub fn down_since(&self) -> Option<Instant> {
        self.down_since
    }

    pub fn last_event(&self) -> Option<Instant> {
        self.last_event
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

    /// When the attempt or the stream in progress counts as dead if nothing arrives before.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            LinkState::Waiting { .. } => None,
            LinkState::Connecting { since } => Some(since + CONNECT_TIMEOUT),
            LinkState::Following { last_heard, .. } => {
                Some(last_heard + self.keepalive * REGISTRY_MISSED_KEEPALIVES)
            }
        }
    }

    /// Whether the attempt or stream in progress is dead at `now`, and why. The driver gives
    /// it up and reports [`HubCore::handle_registry_lost`].
    pub fn expired(&self, now: Instant) -> Option<LinkLoss> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        Some(match self.state {
            LinkState::Connecting { .. } => LinkLoss::ConnectTimeout,
            _ => LinkLoss::Silent,
        })
    }

    /// When the link has something to decide next.
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.state {
            LinkState::Waiting { until } => Some(until),
            _ => self.deadline(),
        }
    }

    pub(super) fn snapshot(&mut self, now: Instant, version: u64) {
        self.state = LinkState::Following {
            version,
            since: now,
            last_heard: now,
        };
        self.down_since = None;
    }

    /// The stream is open; the service promised a keep-alive every `keepalive`.
    pub(super) fn stream_open(&mut self, now: Instant, keepalive: Duration) {
        self.keepalive = keepalive;
        self.heard(now, None);
    }

    /// An event (`Some(version)`) or a keep-alive arrived: the stream is alive.
    pub(super) fn heard(&mut self, now: Instant, event: Option<u64>) {
        if let LinkState::Following {
            version,
            last_heard,
            ..
        } = &mut self.state
        {
            *last_heard = now;
            if let Some(v) = event {
                *version = v;
                self.last_event = Some(now);
            }
            self.failures = 0;
        }
    }

    /// Gives the link up at `now`; returns false when it was not up or being set up (a loss
    /// reported twice).
    pub(super) fn lost(&mut self, now: Instant) -> bool {
        if matches!(self.state, LinkState::Waiting { .. }) {
            return false;
        }
        self.failures = self.failures.saturating_add(1);
        let doubling = self.failures.saturating_sub(1).min(16);
        let wait = BACKOFF_FIRST
            .saturating_mul(1u32 << doubling)
            .min(BACKOFF_MAX);
        // xorshift64: a different fifth up or down for each attempt.
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        let fifth = wait / 5;
        let vary = fifth.mul_f64((self.jitter % 2001) as f64 / 1000.0);
        let wait = (wait - fifth + vary).min(BACKOFF_MAX);
        self.state = LinkState::Waiting { until: now + wait };
        self.down_since.get_or_insert(now);
        true
    }
}

/// What a hub does while the registry is unreachable for longer than its alarm bound
/// (`registry_outage` in gateway.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutagePolicy {
    /// Keep the peers it knows admitted (their certificates are still valid; revocations made
    /// meanwhile are not heard until the registry is back). The district keeps working.
    #[default]
    KeepPeers,
    /// Remove every peer until the registry is back: no revocation can be missed, and no
    /// commune is connected meanwhile.
    RemovePeers,
}

impl OutagePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OutagePolicy::KeepPeers => "keep-peers",
            OutagePolicy::RemovePeers => "remove-peers",
        }
    }
}

/// The operator's choices about registry outages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutageSettings {
    /// An outage this long raises the alarm (and applies `policy`).
    pub alarm_after: Duration,
    pub policy: OutagePolicy,
}

impl Default for OutageSettings {
    fn default() -> Self {
        OutageSettings {
            alarm_after: Duration::from_secs(300),
            policy: OutagePolicy::KeepPeers,
        }
    }
}
