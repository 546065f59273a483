//! The core's configuration, as UAPI `set` and the appliance change it: the device key, listen
//! port, MTU and fwmark, peers and their keys, endpoints, keep-alives and allowed IPs; and what
//! UAPI `get` and the status report read back.

use super::*;

impl Core {
    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| k.public.to_bytes())
    }

    pub fn private_key(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| k.secret.to_bytes())
    }

    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    pub fn set_listen_port(&mut self, port: u16) {
        self.listen_port = port;
    }

    /// The tunnel interface's MTU, which bounds the padding of data packets.
    pub fn set_mtu(&mut self, mtu: u32) {
        self.mtu = mtu as usize;
    }

    pub fn mtu(&self) -> u32 {
        self.mtu as u32
    }

    pub fn fwmark(&self) -> u32 {
        self.fwmark
    }

    pub fn set_fwmark(&mut self, mark: u32) {
        self.fwmark = mark;
    }

    /// Sets (or with `None` removes) the device's private key, clamped. All sessions restart. A
    /// peer with our own public key is removed, as wireguard-go does.
    pub fn set_private_key(&mut self, now: Instant, key: Option<[u8; 32]>) {
        self.enter(now);
        let key = key.map(clamp_private_key);
        if key.is_some() && key == self.private_key() {
            return;
        }
        self.key = key.map(|k| {
            let secret = StaticSecret::from(k);
            let public = PublicKey::from(&secret);
            DeviceKey {
                guard: CookieGuard::new(public.as_bytes(), self.limits, &mut self.rng),
                tunn_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
                secret,
                public,
            }
        });
        if let Some(own) = self.public_key() {
            if let Some(id) = self.by_key.get(&own).copied() {
                self.remove_peer(id);
            }
        }
        let ids: Vec<PeerId> = self.by_key.values().copied().collect();
        for id in ids {
            self.rebuild_tunn(id);
        }
    }

    /// Forgets the peer's Noise state (keys or pre-shared key changed); `tunn_of` builds a
    /// fresh one on next use.
    fn rebuild_tunn(&mut self, id: PeerId) {
        let Some(peer) = peer_in(&mut self.slots, id) else {
            return;
        };
        peer.tunn = None;
        peer.queued = false;
        peer.init_unanswered = false;
        self.timer_queue.forget(peer);
        let low_order = self
            .key
            .as_ref()
            .is_some_and(|k| is_low_order(&k.secret, &peer.public_key));
        if low_order && !peer.low_order {
            tracing::warn!(
                peer = %base64::Engine::encode(&base64::engine::general_purpose::STANDARD, peer.public_key),
                "peer's public key is a low-order point; refusing to handshake with it"
            );
        }
        peer.low_order = low_order;
    }

    pub fn peer_id(&self, public_key: &[u8; 32]) -> Option<PeerId> {
        self.by_key.get(public_key).copied()
    }

    /// The peer with this public key, created if it does not exist yet. `None` when the core
    /// is full (`MAX_PEERS`).
    pub fn upsert_peer(&mut self, now: Instant, public_key: [u8; 32]) -> Option<PeerId> {
        self.enter(now);
        if let Some(id) = self.peer_id(&public_key) {
            return Some(id);
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.slots.len() < MAX_PEERS => {
                self.slots.push(Slot::default());
                u16::try_from(self.slots.len() - 1).ok()?
            }
            None => return None,
        };
        let s = &mut self.slots[usize::from(slot)];
        let id = PeerId::new(slot, s.generation);
        s.peer = Some(Peer {
            id,
            public_key,
            preshared_key: None,
            endpoint: None,
            local_ip: None,
            init_unanswered: false,
            persistent_keepalive: None,
            tunn: None,
            rx_bytes: 0,
            tx_bytes: 0,
            last_sent: self.clock,
            handshake_at: None,
            data_at: None,
            queued: false,
            low_order: false,
            timers: Default::default(),
            drops: DropCounters::default(),
        });
        self.by_key.insert(public_key, id);
        self.rebuild_tunn(id);
        Some(id)
    }

    /// Removes a peer, its allowed IPs and its keys.
    pub fn remove_peer(&mut self, id: PeerId) {
        let Some(slot) = self.slots.get_mut(id.slot()) else {
            return;
        };
        let Some(mut peer) = slot.peer.take_if(|p| p.id == id) else {
            return;
        };
        self.timer_queue.forget(&mut peer);
        slot.generation = slot.generation.wrapping_add(1);
        self.by_key.remove(&peer.public_key);
        self.allowed_ips.remove_peer(id);
        self.allowed_ips_version += 1;
        self.free_slots.push(id.slot() as u16);
        self.pending.retain(|q| Some(q.dst) != peer.endpoint);
    }

    pub fn remove_all_peers(&mut self) {
        let ids: Vec<PeerId> = self.by_key.values().copied().collect();
        for id in ids {
            self.remove_peer(id);
        }
    }

    /// Sets or clears the preshared key; a change restarts the peer's sessions.
    pub fn set_preshared_key(&mut self, id: PeerId, psk: Option<[u8; 32]>) {
        let psk = psk.filter(|k| k != &[0; 32]);
        let Some(peer) = self.peer_mut(id) else {
            return;
        };
        if peer.preshared_key != psk {
            peer.preshared_key = psk;
            self.rebuild_tunn(id);
        }
    }

    /// Sets the peer's endpoint. The sticky source address is forgotten, as the kernel does:
    /// the route to a configured endpoint picks the source until the peer speaks.
    pub fn set_endpoint(&mut self, id: PeerId, endpoint: SocketAddr) {
        if let Some(peer) = self.peer_mut(id) {
            peer.endpoint = Some(endpoint);
            peer.local_ip = None;
        }
    }

    /// The sticky source address of the peer: our address its last authenticated datagram
    /// was sent to, which the core asks the driver to send from.
    pub fn source_ip(&self, id: PeerId) -> Option<IpAddr> {
        self.peer(id)?.local_ip
    }

    /// Forgets `ip` as a sticky source address of every peer: the driver calls this when
    /// sending from it failed because the host no longer has that address (ENETUNREACH,
    /// EINVAL), and sends again without a source. The kernel does the same ("not too
    /// sticky"). Walks all peers, which is fine for an error that comes once per lost address.
    pub fn forget_source_ip(&mut self, ip: IpAddr) {
        for slot in &mut self.slots {
            if let Some(peer) = slot.peer.as_mut().filter(|p| p.local_ip == Some(ip)) {
                peer.local_ip = None;
            }
        }
        for q in &mut self.pending {
            if q.src_ip == Some(ip) {
                q.src_ip = None;
            }
        }
    }

    /// Sets the persistent keepalive interval (0 or `None`: off). Turning it on sends a
    /// keepalive at once, as wireguard-go does, so a peer behind NAT becomes reachable.
    pub fn set_persistent_keepalive(&mut self, now: Instant, id: PeerId, secs: Option<u16>) {
        self.enter(now);
        let secs = secs.filter(|s| *s > 0);
        let Some(peer) = self.peer_mut(id) else {
            return;
        };
        let was = peer.persistent_keepalive;
        peer.persistent_keepalive = secs;
        if secs.is_some() && secs != was {
            // Also reschedules the timers for the new interval.
            self.send_keepalive(id);
        }
    }

    pub fn clear_allowed_ips(&mut self, id: PeerId) {
        self.allowed_ips.remove_peer(id);
        self.allowed_ips_version += 1;
    }

    pub fn add_allowed_ip(&mut self, id: PeerId, net: IpNet) {
        if self.peer(id).is_some() {
            self.allowed_ips.insert(net, id);
            self.allowed_ips_version += 1;
        }
    }

    /// A number that changes whenever any peer's allowed IPs change (not their order).
    pub fn allowed_ips_version(&self) -> u64 {
        self.allowed_ips_version
    }

    /// A number that changes whenever a peer completes a handshake (its
    /// [`PeerActivity::handshake_at`] moves): an idle hub's housekeeping skips the peers
    /// while it stays put.
    pub fn handshakes_version(&self) -> u64 {
        self.handshakes_version
    }

    /// The allowed IPs of one peer, as [`PeerInfo::allowed_ips`] lists them; a lookup of that
    /// peer's own prefixes, not a walk over the table.
    pub fn allowed_ips_of(&self, id: PeerId) -> Vec<IpNet> {
        if self.peer(id).is_none() {
            return Vec::new();
        }
        self.allowed_ips.prefixes_of(id)
    }

    /// Every peer's handshake and data times into `out` (emptied first, so one vector serves
    /// every tick), in slot order: one pass over the peers, nothing allocated per peer.
    pub fn activity_into(&mut self, now: Instant, out: &mut Vec<PeerActivity>) {
        self.enter(now);
        out.clear();
        let epoch = self.epoch;
        // Handshake times are noted when they happen (`decapsulate`, the timers): a read
        // costs a copy per peer.
        for peer in self.slots.iter().filter_map(|s| s.peer.as_ref()) {
            out.push(PeerActivity {
                id: peer.id,
                public_key: peer.public_key,
                handshake_at: peer.handshake_at.map(|at| epoch + at),
                last_data: peer.data_at.map(|at| epoch + at),
            });
        }
    }

    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    /// Peers that currently hold Noise state (a session or a handshake in progress); the rest
    /// are configured but idle, or their keys expired and were freed.
    pub fn peers_with_state(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.peer.as_ref().is_some_and(|p| p.tunn.is_some()))
            .count()
    }

    /// Every peer, ordered by public key so output is stable. `wall` is the current Unix time:
    /// boringtun only knows how long ago a handshake was, `wg` wants when.
    pub fn peers(&mut self, now: Instant, wall: SystemTime) -> Vec<PeerInfo> {
        self.enter(now);
        let mut ids: Vec<(&[u8; 32], &PeerId)> = self.by_key.iter().collect();
        ids.sort();
        let ids: Vec<PeerId> = ids.into_iter().map(|(_, id)| *id).collect();
        let clock = self.clock;
        let epoch = self.epoch;
        // One pass over the table, not one per peer: `wg show` on a hub with a thousand peers
        // must not hold the core (and so the packet path) for long.
        let mut prefixes: HashMap<PeerId, Vec<IpNet>> = HashMap::new();
        for (net, owner) in self.allowed_ips.iter() {
            prefixes.entry(owner).or_default().push(net);
        }
        ids.into_iter()
            .filter_map(|id| {
                let allowed_ips = prefixes.remove(&id).unwrap_or_default();
                let peer = self.peer_mut(id)?;
                let new = note_handshake(peer, clock);
                self.handshakes_version += u64::from(new);
                let peer = self.peer(id)?;
                let last_handshake = peer
                    .handshake_at
                    .and_then(|at| wall.checked_sub(clock.saturating_sub(at)));
                Some(PeerInfo {
                    id,
                    public_key: peer.public_key,
                    preshared_key: peer.preshared_key,
                    endpoint: peer.endpoint,
                    persistent_keepalive: peer.persistent_keepalive,
                    last_handshake,
                    last_data: peer.data_at.map(|at| epoch + at),
                    rx_bytes: peer.rx_bytes,
                    tx_bytes: peer.tx_bytes,
                    allowed_ips,
                })
            })
            .collect()
    }

    /// Drop counters of one peer.
    pub fn peer_drops(&self, id: PeerId) -> Option<&DropCounters> {
        self.peer(id).map(|p| &p.drops)
    }

    /// Drops no peer could be blamed for (malformed datagrams, unknown indices, no route).
    pub fn device_drops(&self) -> &DropCounters {
        &self.device_drops
    }
}
