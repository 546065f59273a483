//! Time: handshakes on demand, keep-alives, boringtun's timers, and the queue of datagrams the
//! core wants sent (`poll_transmit`).
//!
//! boringtun's timers want `Tunn::update_timers` every ~250 ms, and a hub with 10,000 idle
//! sessions would run it 40,000 times a second for nothing. So only sessions with something
//! going on (a packet in either direction since the last run, a handshake under way, packets
//! queued for one) run at every tick; an idle session sleeps in the core's timer queue until
//! the first moment one of boringtun's deadlines can fall due.
//!
//! That moment is exact because boringtun's clock moves only in `update_timers`: each event
//! (packet sent, packet received, session established) is stamped with the time of the last
//! run, which the core knows. So the core keeps a copy of the three stamps the deadlines count
//! from, and a session that has not run for a while is brought up to date (`wake`) before its
//! Noise state is touched again, so that new events get fresh stamps. The deadlines, from
//! boringtun's `timers.rs` (WireGuard paper, section 6):
//!
//! | from | after | what |
//! |---|---|---|
//! | last packet sent | 10 s (KEEPALIVE_TIMEOUT) | keepalive, if data came in since |
//! | last packet received | 15 s (KEEPALIVE + REKEY_TIMEOUT) | new handshake, if data went out since |
//! | session established | 120 s (REKEY_AFTER_TIME) | new handshake (initiator that sent data) |
//! | session established | 165 s (REJECT − KEEPALIVE − REKEY_TIMEOUT) | new handshake (initiator that received data) |
//! | session established | 180 s (REJECT_AFTER_TIME) | the session's keys are dropped |
//! | session established | 540 s (3 × REJECT_AFTER_TIME) | all keys zeroed; the Noise state is freed |
//! | our last datagram | persistent keepalive | keepalive (ours, not boringtun's) |
//!
//! Deadlines that change nothing on the wire (a cookie expiring, an older session's keys
//! dropped) wait for the next run; `wake` runs before any use, so no packet sees the difference.

use super::*;

const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A session whose timers last ran longer ago than this is brought up to date before use:
/// twice the tick, so sessions the timer thread runs at every tick never are.
const STALE_AFTER: Duration = Duration::from_millis(2 * TIMER_INTERVAL.as_millis() as u64);

/// One session's copy of boringtun's timer stamps, in core time, and its place in the queue.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SessionTimers {
    /// When `update_timers` last ran: boringtun's clock, and so the stamp of every event
    /// since.
    ran_at: Duration,
    /// boringtun's TimeLastPacketSent, TimeLastPacketReceived and TimeSessionEstablished.
    sent: Duration,
    received: Duration,
    established: Duration,
    /// The last packet in either direction (core time, not a stamp).
    active_at: Duration,
    /// The session's entry in the timer queue.
    due: Option<Duration>,
}

impl SessionTimers {
    /// A new `Tunn` at `clock`: boringtun's stamps all start at its creation.
    pub(super) fn started(&mut self, clock: Duration) {
        let due = self.due;
        *self = Self {
            ran_at: clock,
            sent: clock,
            received: clock,
            established: clock,
            active_at: clock,
            due,
        };
    }

    /// boringtun stamped a packet sent.
    pub(super) fn sent(&mut self) {
        self.sent = self.ran_at;
    }

    /// boringtun stamped an authenticated packet received.
    pub(super) fn received(&mut self) {
        self.received = self.ran_at;
    }

    /// boringtun stamped a new session.
    pub(super) fn established(&mut self) {
        self.established = self.ran_at;
    }

    /// When the newest session was established (what [`note_handshake`] reads once it is
    /// the current one).
    pub(super) fn established_at(&self) -> Duration {
        self.established
    }
}

/// Sessions ordered by when their timers must run next.
#[derive(Debug, Default)]
pub(super) struct TimerQueue {
    due: BTreeSet<(Duration, PeerId)>,
    /// `update_timers` calls on Noise states, for tests and the benchmark.
    runs: u64,
}

impl TimerQueue {
    fn set(&mut self, peer: &mut Peer, at: Option<Duration>) {
        if peer.timers.due == at {
            return;
        }
        if let Some(old) = peer.timers.due {
            self.due.remove(&(old, peer.id));
        }
        if let Some(at) = at {
            self.due.insert((at, peer.id));
        }
        peer.timers.due = at;
    }

    /// Takes the peer out of the queue (removed, or its Noise state dropped).
    pub(super) fn forget(&mut self, peer: &mut Peer) {
        self.set(peer, None);
    }

    fn pop_due(&mut self, clock: Duration) -> Option<PeerId> {
        let (at, id) = *self.due.first()?;
        if at > clock {
            return None;
        }
        self.due.pop_first();
        Some(id)
    }

    /// Before the peer's Noise state is used at `clock`: if its timers have not run for a
    /// while, they run now, so that what the use stamps carries the present time. True when
    /// that noted a new session time (as [`run_timers`]).
    #[must_use]
    pub(super) fn wake(
        &mut self,
        peer: &mut Peer,
        clock: Duration,
        pending: &mut VecDeque<Queued>,
    ) -> bool {
        if peer.tunn.is_none() || clock.saturating_sub(peer.timers.ran_at) <= STALE_AFTER {
            return false;
        }
        self.runs += 1;
        let noted = run_timers(peer, clock, pending);
        if peer.tunn.is_none() {
            self.forget(peer);
        }
        noted
    }

    /// The peer's session was used at `clock`: its timers run at the next tick.
    #[inline]
    pub(super) fn touched(&mut self, peer: &mut Peer, clock: Duration) {
        peer.timers.active_at = clock;
        if peer.tunn.is_some()
            && peer
                .timers
                .due
                .is_none_or(|due| due > clock + TIMER_INTERVAL)
        {
            self.set(peer, Some(clock + TIMER_INTERVAL / 2));
        }
    }
}

/// Runs boringtun's timers of one session at `clock` (and our persistent keepalive); what they
/// send is queued on `pending`. Frees the Noise state when its keys expired. True when the
/// session's time changed (timers complete no handshake, so this is a backstop: `decapsulate`
/// notes new sessions).
fn run_timers(peer: &mut Peer, clock: Duration, pending: &mut VecDeque<Queued>) -> bool {
    let Some(tunn) = peer.tunn.as_deref_mut() else {
        return false;
    };
    // An initiation is the largest message the timers send.
    let mut buf = [0u8; MIN_OUT_BUF];
    peer.timers.ran_at = clock;
    let sent = match tunn.update_timers(&mut buf) {
        TunnResult::WriteToNetwork(b) => {
            if b.first() == Some(&1) {
                // A second initiation without an answer to the first: the peer may not get
                // what we send from its sticky source (routes changed), so the retry goes
                // from the address the routing table picks, as the kernel's retransmission
                // does.
                if peer.init_unanswered {
                    peer.local_ip = None;
                }
                peer.init_unanswered = true;
            }
            Some(b.to_vec())
        }
        TunnResult::Err(WireGuardError::ConnectionExpired) => {
            // Keys expired (REJECT_AFTER_TIME * 3 without a handshake) or handshake attempts
            // gave up: free the whole Noise state, so the keys do not linger in memory and a
            // silent peer costs what an idle one does. The next packet builds a fresh one.
            peer.tunn = None;
            peer.queued = false;
            peer.init_unanswered = false;
            return false;
        }
        _ => None,
    };
    let keepalive_due = peer.endpoint.is_some()
        && peer.persistent_keepalive.is_some_and(|secs| {
            clock.saturating_sub(peer.last_sent) >= Duration::from_secs(u64::from(secs))
        });
    let keepalive = match (sent.is_none() && keepalive_due, peer.tunn.as_deref_mut()) {
        (true, Some(tunn)) => match tunn.encapsulate(&[], &mut buf) {
            TunnResult::WriteToNetwork(b) => {
                peer.init_unanswered |= b.first() == Some(&1);
                Some(b.to_vec())
            }
            _ => None,
        },
        _ => None,
    };
    for bytes in [sent, keepalive].into_iter().flatten() {
        peer.timers.sent();
        peer.timers.active_at = clock;
        if let Some(dst) = peer.endpoint {
            peer.tx_bytes += bytes.len() as u64;
            peer.last_sent = clock;
            pending.push_back(Queued {
                dst,
                src_ip: peer.local_ip,
                bytes,
            });
        }
    }
    note_handshake(peer, clock)
}

/// When the session's timers must run next, after a run at `clock` that followed one at
/// `previous`: at the next tick while something is going on, else at its first deadline.
fn next_run(peer: &Peer, clock: Duration, previous: Duration) -> Option<Duration> {
    peer.tunn.as_ref()?;
    let t = &peer.timers;
    if peer.init_unanswered || peer.queued || t.active_at >= previous {
        return Some(clock + TIMER_INTERVAL / 2);
    }
    let keepalive = peer
        .persistent_keepalive
        .map(|secs| peer.last_sent + Duration::from_secs(u64::from(secs)));
    [
        Some(t.sent + KEEPALIVE_TIMEOUT),
        Some(t.received + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT),
        Some(t.established + REKEY_AFTER_TIME),
        Some(t.established + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT),
        Some(t.established + REJECT_AFTER_TIME),
        Some(t.established + REJECT_AFTER_TIME * 3),
        keepalive,
    ]
    .into_iter()
    .flatten()
    .filter(|at| *at > clock)
    .min()
    // Past every deadline (cannot happen: the last one frees the state): the next tick.
    .or(Some(clock + TIMER_INTERVAL / 2))
}

impl Core {
    /// Starts a new handshake with the peer now, whatever state its session is in: a spoke
    /// calls this when its hub fell silent (the hub may have restarted and forgotten the
    /// session, which WireGuard's own timers would notice only after 15 s or more).
    pub fn force_handshake(&mut self, now: Instant, id: PeerId) {
        self.enter(now);
        self.send_with(id, |tunn, buf| tunn.format_handshake_initiation(buf, true));
    }

    pub(super) fn send_keepalive(&mut self, id: PeerId) {
        self.send_with(id, |tunn, buf| tunn.encapsulate(&[], buf));
    }

    /// Runs `op` on the peer's Noise state (created if needed) and queues the datagram it
    /// produces for `poll_transmit`.
    fn send_with(
        &mut self,
        id: PeerId,
        op: impl for<'b> FnOnce(&mut Tunn, &'b mut [u8]) -> TunnResult<'b>,
    ) {
        let clock = self.clock;
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Some(peer) = peer_in(&mut self.slots, id) {
            if let Some(dst) = peer.endpoint {
                if self.timer_queue.wake(peer, clock, &mut self.pending) {
                    self.handshakes_version += 1;
                }
                let sent = match tunn_of(&self.key, peer, clock) {
                    Ok(tunn) => match op(tunn, &mut scratch) {
                        TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
                        _ => None,
                    },
                    Err(_) => None,
                };
                self.timer_queue.touched(peer, clock);
                if let Some(bytes) = sent {
                    peer.timers.sent();
                    peer.tx_bytes += bytes.len() as u64;
                    peer.last_sent = clock;
                    peer.init_unanswered |= bytes.first() == Some(&1);
                    self.pending.push_back(Queued {
                        dst,
                        src_ip: peer.local_ip,
                        bytes,
                    });
                }
            }
        }
        self.scratch = scratch;
    }

    /// Runs the timers (handshake retries, rekey, keepalives, session expiry and key zeroing)
    /// of every session due at `now`. What they want to send is queued for `poll_transmit`.
    pub fn update_timers(&mut self, now: Instant) {
        self.enter(now);
        let clock = self.clock;
        while let Some(id) = self.timer_queue.pop_due(clock) {
            let Some(peer) = peer_in(&mut self.slots, id) else {
                continue;
            };
            peer.timers.due = None;
            let previous = peer.timers.ran_at;
            self.timer_queue.runs += 1;
            if run_timers(peer, clock, &mut self.pending) {
                self.handshakes_version += 1;
            }
            let next = next_run(peer, clock, previous);
            self.timer_queue.set(peer, next);
        }
        if let Some(k) = self.key.as_mut() {
            k.guard.expire_sources(clock);
        }
    }

    /// How many times boringtun's timers ran on some session: a hub whose sessions are idle
    /// runs them only at their deadlines.
    pub fn timer_runs(&self) -> u64 {
        self.timer_queue.runs
    }

    /// Whether `poll_transmit` has something.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Every datagram queued by timers or a finished handshake, in order, without a copy.
    pub fn drain_pending(&mut self) -> std::collections::vec_deque::Drain<'_, Queued> {
        self.pending.drain(..)
    }

    /// The next datagram queued by timers or a finished handshake, written into `out`: its
    /// destination and length (its source address is in [`Core::drain_pending`]'s items).
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Option<(SocketAddr, usize)> {
        loop {
            let Queued { dst, bytes, .. } = self.pending.pop_front()?;
            if let Some(dst_buf) = out.get_mut(..bytes.len()) {
                dst_buf.copy_from_slice(&bytes);
                return Some((dst, bytes.len()));
            }
            self.device_drops.add(DropReason::BufferTooSmall);
        }
    }
}
