//! The flow table: idle timeouts, owner slots, inserting a flow, and when the table is full,
//! evicting by fair share with a second chance (CLOCK) for flows used since they were queued.

use super::*;

impl Firewall {
    pub(super) fn idle(&self, kind: &Kind) -> Duration {
        match kind {
            Kind::Tcp { closing: true } => self.config.tcp_closing,
            Kind::Tcp { closing: false } => self.config.tcp_idle,
            Kind::Udp | Kind::Other => self.config.udp_idle,
            Kind::IcmpEcho { .. } | Kind::IcmpError { .. } => self.config.icmp_idle,
        }
    }

    /// The owner slot of `owner`, made ready for a new flow.
    pub(super) fn owner_slot(&mut self, owner: FlowOwner) -> usize {
        let (index, peer) = match owner {
            FlowOwner::DataCentre => (0, None),
            FlowOwner::Peer(id) => (id.slot() + 1, Some(id)),
        };
        if self.owners.len() <= index {
            self.owners.resize_with(index + 1, Owner::default);
        }
        if self.owners[index].peer != peer {
            // The slot's earlier peer is gone (normally `forget_peer` already cleared it).
            if self.owners[index].flows > 0 {
                if let Some(old) = self.owners[index].peer {
                    self.forget_peer(old);
                }
            }
            self.owners[index] = Owner {
                peer,
                ..Owner::default()
            };
        }
        index
    }

    pub(super) fn insert(
        &mut self,
        now: Instant,
        key: FlowKey,
        owner: FlowOwner,
        ends: [End; 2],
        initiator: u8,
        expires: Instant,
    ) {
        let o = self.owner_slot(owner);
        if !self.queued && self.flows.len() >= self.config.max_flows / 2 {
            self.start_queues();
        }
        if self.flows.len() >= self.config.max_flows {
            self.make_room(now, o);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.flows.insert(
            key,
            Flow {
                expires,
                ends,
                initiator,
                used: false,
                owner: o as u32,
                seq,
            },
        );
        let owner = &mut self.owners[o];
        if owner.flows == 0 {
            self.active_owners += 1;
        }
        owner.flows += 1;
        if self.queued {
            owner.queue.push_back((key, seq));
        }
        if owner.queue.len() > 2 * owner.flows as usize + 32 {
            // Entries of flows that expired or were cut: drop them, amortised over the pushes
            // that made them pile up.
            let flows = &self.flows;
            owner.queue.retain(|(k, s)| {
                flows
                    .get(k)
                    .is_some_and(|f| f.seq == *s && f.owner == o as u32)
            });
        }
        let flows = owner.flows;
        if flows > self.owners[self.largest].flows {
            self.largest = o;
        }
    }

    /// The table reached half its bound: queue every owner's flows, oldest first (by the
    /// sequence number each got when it started; once, then kept up per flow).
    fn start_queues(&mut self) {
        let mut all: Vec<(u32, FlowKey, u32)> = self
            .flows
            .iter()
            .map(|(k, f)| (f.seq, *k, f.owner))
            .collect();
        all.sort_unstable_by_key(|(seq, _, _)| *seq);
        for (seq, key, owner) in all {
            if let Some(o) = self.owners.get_mut(owner as usize) {
                o.queue.push_back((key, seq));
            }
        }
        self.queued = true;
    }

    /// The table is down to a quarter of its bound: the queues go until it fills again.
    pub(super) fn stop_queues(&mut self) {
        for o in &mut self.owners {
            o.queue = VecDeque::new();
        }
        self.queued = false;
    }

    /// The table is full and owner `o` wants a new flow: take one from `o` if it holds its fair
    /// share or more, else from the owner that holds the most.
    fn make_room(&mut self, now: Instant, o: usize) {
        let active = self.active_owners + usize::from(self.owners[o].flows == 0);
        let max = self.config.max_flows;
        let at_share = |flows: u32| flows as usize * active >= max;
        let victim = if at_share(self.owners[o].flows) {
            o
        } else {
            if !at_share(self.owners[self.largest].flows) {
                // Rare: the remembered largest owner shrank. Someone holds more than its share
                // (the table is full and `o` holds less), so the scan finds an owner.
                self.largest = (0..self.owners.len())
                    .max_by_key(|&i| self.owners[i].flows)
                    .unwrap_or(0);
            }
            self.largest
        };
        if !self.evict_from(now, victim) {
            // Cannot happen while the books are right; keep the bound regardless.
            if let Some(k) = self.flows.keys().next().copied() {
                self.remove(&k);
                self.counters.evicted += 1;
            }
        }
    }

    /// Evicts `o`'s oldest flow (an expired one counts as expired), giving recently used ones a
    /// second chance. Returns whether a flow was removed.
    fn evict_from(&mut self, now: Instant, o: usize) -> bool {
        let mut chances = 0;
        while let Some((key, seq)) = self.owners[o].queue.pop_front() {
            let Some(flow) = self.flows.get_mut(&key) else {
                continue;
            };
            if flow.seq != seq || flow.owner != o as u32 {
                continue;
            }
            if flow.expires > now && flow.used && chances < SECOND_CHANCES {
                flow.used = false;
                chances += 1;
                self.owners[o].queue.push_back((key, seq));
                continue;
            }
            let expired = flow.expires <= now;
            self.remove(&key);
            if expired {
                self.counters.expired += 1;
            } else {
                self.counters.evicted += 1;
                self.owners[o].evicted += 1;
            }
            return true;
        }
        false
    }

    /// Removes one flow and books it off its owner (its queue entry goes stale).
    pub(super) fn remove(&mut self, key: &FlowKey) {
        if let Some(f) = self.flows.remove(key) {
            Self::book_off(&mut self.owners, &mut self.active_owners, f.owner);
        }
    }

    pub(super) fn book_off(owners: &mut [Owner], active: &mut usize, owner: u32) {
        if let Some(o) = owners.get_mut(owner as usize) {
            o.flows = o.flows.saturating_sub(1);
            if o.flows == 0 {
                *active = active.saturating_sub(1);
                o.queue.clear();
            }
        }
    }
}
