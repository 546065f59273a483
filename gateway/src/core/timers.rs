//! Time: handshakes on demand, keep-alives, boringtun's timers at every tick, and the queue of
//! datagrams the core wants sent (`poll_transmit`).

use super::*;

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
                let sent = match tunn_of(&self.key, peer) {
                    Ok(tunn) => match op(tunn, &mut scratch) {
                        TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
                        _ => None,
                    },
                    Err(_) => None,
                };
                if let Some(bytes) = sent {
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

    /// Runs every peer's timers (handshake retries, rekey, keepalives, session expiry and key
    /// zeroing) at `now`. What they want to send is queued for `poll_transmit`.
    pub fn update_timers(&mut self, now: Instant) {
        self.enter(now);
        let clock = self.clock;
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut keepalives = Vec::new();
        for slot in &mut self.slots {
            let Some(peer) = slot.peer.as_mut() else {
                continue;
            };
            let Some(tunn) = peer.tunn.as_deref_mut() else {
                continue;
            };
            match tunn.update_timers(&mut scratch) {
                TunnResult::WriteToNetwork(b) => {
                    if b.first() == Some(&1) {
                        // A second initiation without an answer to the first: the peer may not
                        // get what we send from its sticky source (routes changed), so the
                        // retry goes from the address the routing table picks, as the
                        // kernel's retransmission does.
                        if peer.init_unanswered {
                            peer.local_ip = None;
                        }
                        peer.init_unanswered = true;
                    }
                    if let Some(dst) = peer.endpoint {
                        peer.tx_bytes += b.len() as u64;
                        peer.last_sent = clock;
                        self.pending.push_back(Queued {
                            dst,
                            src_ip: peer.local_ip,
                            bytes: b.to_vec(),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    // Keys expired (REJECT_AFTER_TIME * 3 without a handshake) or handshake
                    // attempts gave up: free the whole Noise state, so the keys do not linger
                    // in memory and a silent peer costs what an idle one does. The next
                    // packet builds a fresh one.
                    peer.tunn = None;
                    peer.queued = false;
                    peer.init_unanswered = false;
                    continue;
                }
                _ => {}
            }
            note_handshake(peer, clock);
            if let Some(secs) = peer.persistent_keepalive {
                if clock.saturating_sub(peer.last_sent) >= Duration::from_secs(u64::from(secs)) {
                    keepalives.push(peer.id);
                }
            }
        }
        self.scratch = scratch;
        for id in keepalives {
            self.send_keepalive(id);
        }
        if let Some(k) = self.key.as_mut() {
            k.guard.expire_sources(clock);
        }
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
