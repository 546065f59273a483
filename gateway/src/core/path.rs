//! The packet path: a packet from the TUN device routed to a peer and encrypted, a datagram
//! from the network dispatched (handshake, cookie, data) and decrypted, source-filtered and
//! handed to the TUN device; drops counted by reason, ICMP unreachable answers within their
//! budget.

use super::*;

impl Core {
    fn device_drop(&mut self, reason: DropReason) -> Action {
        self.device_drops.add(reason);
        Action::Drop(reason)
    }

    /// Counts `reason` and, within the rate limit, answers `packet` with an ICMP unreachable
    /// written into `out`, as the kernel's WireGuard does for packets it cannot send.
    fn unreachable(
        &mut self,
        id: Option<PeerId>,
        reason: DropReason,
        packet: &[u8],
        out: &mut [u8],
    ) -> Action {
        let dropped = match id {
            Some(id) => self.peer_drop(id, reason),
            None => self.device_drop(reason),
        };
        if !ICMP_BUDGET.has(&self.icmp, self.clock) {
            return dropped;
        }
        match crate::unreachable::answer(packet, out) {
            Some(len) => {
                ICMP_BUDGET.take(&mut self.icmp, self.clock);
                Action::Unreachable {
                    reason,
                    offset: 0,
                    len,
                }
            }
            None => dropped,
        }
    }

    fn peer_drop(&mut self, id: PeerId, reason: DropReason) -> Action {
        match self.peer_mut(id) {
            Some(p) => p.drops.add(reason),
            None => self.device_drops.add(reason),
        }
        Action::Drop(reason)
    }

    /// An IP packet read from the TUN device: route it by destination to a peer, pad it and
    /// encrypt it into `out`. `out` must hold `packet.len() + 48` and at least `MIN_OUT_BUF`
    /// bytes. The packet is copied for the padding; the driver's path is
    /// [`Core::handle_tun_buffer`], which pads in place.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8], out: &mut [u8]) -> Action {
        let mut scratch = std::mem::take(&mut self.scratch);
        let len = packet.len().min(scratch.len() - PADDING_MULTIPLE);
        scratch[..len].copy_from_slice(&packet[..len]);
        let action = if len == packet.len() {
            self.handle_tun_buffer(now, &mut scratch, len, out)
        } else {
            self.enter(now);
            self.device_drop(DropReason::InvalidInnerPacket)
        };
        self.scratch = scratch;
        action
    }

    /// [`Core::handle_tun_packet`] for a packet in `buf[..len]`; the zero padding is written
    /// into `buf` behind it when `buf` has the room (else the packet goes unpadded, as the
    /// kernel does when it cannot grow a buffer).
    #[inline]
    pub fn handle_tun_buffer(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        len: usize,
        out: &mut [u8],
    ) -> Action {
        self.enter(now);
        let Some(packet) = buf.get(..len) else {
            return self.device_drop(DropReason::BufferTooSmall);
        };
        let Some(header) = IpHeader::parse(packet) else {
            return self.device_drop(DropReason::InvalidInnerPacket);
        };
        // Route before encrypting: boringtun's `encapsulate` would start a handshake for any
        // packet, including link-local chatter meant for nobody.
        let total = header.total_len;
        let Some(id) = self.allowed_ips.lookup(header.dst) else {
            return self.unreachable(None, DropReason::NoRoute, &buf[..total], out);
        };
        let pad = padding_len(total, self.mtu);
        let padded = if buf.len() >= total + pad {
            buf[total..total + pad].fill(0);
            total + pad
        } else {
            total
        };
        if out.len() < (padded + DATA_OVERHEAD).max(MIN_OUT_BUF) {
            return self.peer_drop(id, DropReason::BufferTooSmall);
        }
        let clock = self.clock;
        let Some(peer) = peer_in(&mut self.slots, id) else {
            return self.device_drop(DropReason::NoRoute);
        };
        let Some(endpoint) = peer.endpoint else {
            return self.unreachable(Some(id), DropReason::NoEndpoint, &buf[..total], out);
        };
        // The destination address is the endpoint's already (that is how it was routed here).
        if header.dst == endpoint.ip() && is_own_datagram(&buf[..total], self.listen_port, endpoint)
        {
            return self.peer_drop(id, DropReason::RoutingLoop);
        }
        if self.timer_queue.wake(peer, clock, &mut self.pending) {
            self.handshakes_version += 1;
        }
        let tunn = match tunn_of(&self.key, peer, clock) {
            Ok(tunn) => tunn,
            Err(reason) => return self.peer_drop(id, reason),
        };
        let base = out.as_ptr() as usize;
        let result = tunn.encapsulate(&buf[..padded], out);
        self.timer_queue.touched(peer, clock);
        match result {
            TunnResult::WriteToNetwork(b) => {
                peer.timers.sent();
                let (offset, len) = (offset_in(base, b), b.len());
                // Anything but a data message means boringtun queued the packet and started
                // (or is waiting for) a handshake.
                if b.first() != Some(&4) {
                    peer.queued = true;
                    peer.init_unanswered |= b.first() == Some(&1);
                }
                peer.tx_bytes += len as u64;
                peer.last_sent = clock;
                Action::ToNetwork {
                    dst: endpoint,
                    src_ip: peer.local_ip,
                    offset,
                    len,
                }
            }
            TunnResult::Err(e) => self.peer_drop(id, drop_reason(&e)),
            _ => {
                peer.queued = true;
                Action::Nothing
            }
        }
    }

    /// A UDP datagram from `src` to our address `local_ip` (`None` where the driver cannot
    /// tell): handshake messages are checked (MAC1, cookie, per-source limit) and dispatched by
    /// the sender's static key, everything else by receiver index. Decrypted packets whose
    /// source is not in the sender's allowed IPs are dropped. An authenticated datagram teaches
    /// the peer's endpoint and our address it used (its sticky source). `out` must be at least
    /// as long as `datagram` (and `MIN_OUT_BUF`).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        src: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        self.handle_received(now, Duration::ZERO, src, local_ip, datagram, out)
    }

    /// [`Core::handle_datagram`] for a datagram that `waited` in the receive queue before it
    /// was read (the driver knows from the kernel's receive timestamp). A handshake initiation
    /// that waited longer than [`STALE_INITIATION`] is dropped unanswered: its sender has given
    /// up on it and sent a newer one, so the Diffie-Hellman an answer costs would be wasted,
    /// and under a burst of thousands of peers spending it on old initiations is what keeps a
    /// hub behind for good.
    pub fn handle_received(
        &mut self,
        now: Instant,
        waited: Duration,
        src: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        self.enter(now);
        let Some(msg) = WireMessage::parse(datagram) else {
            return self.device_drop(DropReason::Malformed);
        };
        if waited > STALE_INITIATION && matches!(msg, WireMessage::HandshakeInit { .. }) {
            return self.device_drop(DropReason::StaleHandshake);
        }
        if out.len() < datagram.len().max(MIN_OUT_BUF) {
            return self.device_drop(DropReason::BufferTooSmall);
        }
        let clock = self.clock;
        let Some(key) = self.key.as_mut() else {
            return self.device_drop(DropReason::NoPrivateKey);
        };
        let id = match msg {
            WireMessage::HandshakeInit { sender }
            | WireMessage::HandshakeResponse { sender, .. } => {
                match key
                    .guard
                    .admit(clock, src, datagram, sender, &mut self.rng, out)
                {
                    Admission::Accept => {}
                    Admission::BadMac1 => return self.device_drop(DropReason::InvalidMac),
                    Admission::RateLimited => return self.device_drop(DropReason::RateLimited),
                    Admission::SendCookie(len) => {
                        self.device_drops.add(DropReason::CookieRequired);
                        return Action::ToNetwork {
                            dst: src,
                            src_ip: local_ip,
                            offset: 0,
                            len,
                        };
                    }
                }
                match msg {
                    WireMessage::HandshakeResponse { receiver, .. } => self.id_by_index(receiver),
                    _ => {
                        let Ok(Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(datagram)
                        else {
                            return self.device_drop(DropReason::Malformed);
                        };
                        match parse_handshake_anon(&key.secret, &key.public, &init) {
                            Ok(half) => match self.by_key.get(&half.peer_static_public) {
                                Some(id) => Some(*id),
                                None => return self.device_drop(DropReason::UnknownPeer),
                            },
                            Err(_) => return self.device_drop(DropReason::HandshakeFailed),
                        }
                    }
                }
            }
            WireMessage::CookieReply { receiver } | WireMessage::Data { receiver } => {
                self.id_by_index(receiver)
            }
        };
        let Some(id) = id else {
            return self.device_drop(DropReason::UnknownIndex);
        };
        self.decapsulate(id, src, local_ip, datagram, out)
    }

    /// The peer whose allowed IPs contain `addr`: where a packet to it would be sent.
    #[inline]
    pub fn route(&self, addr: IpAddr) -> Option<PeerId> {
        self.allowed_ips.lookup(addr)
    }

    fn id_by_index(&self, receiver: u32) -> Option<PeerId> {
        let id = PeerId(receiver >> 8);
        self.peer(id).map(|p| p.id)
    }

    fn decapsulate(
        &mut self,
        id: PeerId,
        src: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Action {
        let clock = self.clock;
        let Some(peer) = peer_in(&mut self.slots, id) else {
            return self.device_drop(DropReason::UnknownIndex);
        };
        if self.timer_queue.wake(peer, clock, &mut self.pending) {
            self.handshakes_version += 1;
        }
        let is_data = datagram.first() == Some(&4);
        let is_response = datagram.first() == Some(&2);
        let is_initiation = datagram.first() == Some(&1);
        // Only an initiation may create the Noise state; anything else for a peer without one
        // refers to a session that does not exist.
        if is_initiation {
            if let Err(reason) = tunn_of(&self.key, peer, clock) {
                return self.peer_drop(id, reason);
            }
        }
        self.timer_queue.touched(peer, clock);
        let Some(tunn) = peer.tunn.as_deref_mut() else {
            return self.peer_drop(id, DropReason::NoSession);
        };
        let base = out.as_ptr() as usize;
        let result = tunn.decapsulate(Some(src.ip()), datagram, out);
        let (inner, reply) = match result {
            TunnResult::WriteToTunnelV4(p, a) => {
                (Some((offset_in(base, p), p.len(), IpAddr::V4(a))), None)
            }
            TunnResult::WriteToTunnelV6(p, a) => {
                (Some((offset_in(base, p), p.len(), IpAddr::V6(a))), None)
            }
            TunnResult::WriteToNetwork(b) => (None, Some((offset_in(base, b), b.len()))),
            TunnResult::Done => (None, None),
            TunnResult::Err(e) => return self.peer_drop(id, drop_reason(&e)),
        };
        // What boringtun stamped (see `timers`): every message it accepted is a packet
        // received; an initiation is answered (a packet sent) and, like a response, makes a
        // session. The keepalive that answers a response goes out unstamped.
        peer.timers.received();
        if is_initiation {
            peer.timers.sent();
        }
        if is_initiation || is_response {
            peer.timers.established();
        }
        // A new session is the current one at once for an initiator, for a responder with
        // its first data message: its time is read then, not on every housekeeping read.
        if peer.handshake_at != Some(peer.timers.established_at()) && note_handshake(peer, clock) {
            self.handshakes_version += 1;
        }
        // Authenticated: the peer may have roamed (WireGuard paper, section 2.1). A cookie
        // reply proves nothing about the sender's address, so it does not move the endpoint.
        // The endpoint is learnt before the inner source is checked, as the kernel does: the
        // datagram is the peer's even when the packet inside is one it may not send.
        // Our address it came to becomes the peer's source address (sticky source), learnt
        // from the same datagrams as the endpoint, as the kernel does.
        let roams = inner.is_some() || reply.is_some() || is_data;
        if let Some(peer) = self.peer_mut(id) {
            if roams {
                peer.endpoint = Some(src);
                peer.local_ip = local_ip;
            }
            if is_response {
                peer.init_unanswered = false;
            }
        }
        if let Some((_, _, inner_src)) = inner {
            if self.allowed_ips.lookup(inner_src) != Some(id) {
                return self.peer_drop(id, DropReason::SpoofedSource);
            }
        }
        let Some(peer) = self.peer_mut(id) else {
            return Action::Nothing;
        };
        if roams {
            peer.rx_bytes += datagram.len() as u64;
        }
        if is_data {
            peer.data_at = Some(clock);
        }
        // Queued packets can go once boringtun has a current session: as initiator after the
        // response, as responder after the first data packet (boringtun switches to a
        // responder's session only then; flushing earlier would start a second handshake).
        if peer.queued && (is_data || is_response) {
            peer.queued = false;
            self.flush_queued(id);
        }
        let Some(peer) = self.peer_mut(id) else {
            return Action::Nothing;
        };
        if let Some((offset, len, _)) = inner {
            return Action::ToTun {
                peer: id,
                offset,
                len,
            };
        }
        let Some((offset, len)) = reply else {
            return Action::Nothing;
        };
        peer.tx_bytes += len as u64;
        Action::ToNetwork {
            dst: src,
            src_ip: local_ip,
            offset,
            len,
        }
    }

    fn flush_queued(&mut self, id: PeerId) {
        let clock = self.clock;
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Some(peer) = peer_in(&mut self.slots, id) {
            if let (Some(tunn), Some(dst)) = (peer.tunn.as_deref_mut(), peer.endpoint) {
                while let TunnResult::WriteToNetwork(b) = tunn.decapsulate(None, &[], &mut scratch)
                {
                    peer.timers.sent();
                    peer.tx_bytes += b.len() as u64;
                    peer.last_sent = clock;
                    self.pending.push_back(Queued {
                        dst,
                        src_ip: peer.local_ip,
                        bytes: b.to_vec(),
                    });
                }
            }
        }
        self.scratch = scratch;
    }
}
