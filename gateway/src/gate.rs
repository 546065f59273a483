//! The hub's enforcement point in the packet path: the firewall, the policy in force and the
//! certificate identity of each peer, locked together once per batch by the driver.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use komnet_policy::{CompiledPolicy, PeerIdentity};

use crate::core::PeerId;
use crate::firewall::{
    Firewall, FirewallConfig, FirewallCounters, FlowOwner, OwnerStats, PeerAddresses,
};

/// Policy, identities and flow state of a hub.
#[derive(Debug)]
pub struct Gate {
    firewall: Firewall,
    policy: Option<Arc<CompiledPolicy>>,
    identities: HashMap<PeerId, PeerIdentity>,
    /// Packets dropped because no policy was loaded yet (fail closed).
    no_policy: u64,
}

impl Gate {
    pub fn new(config: FirewallConfig) -> Self {
        Gate {
            firewall: Firewall::new(config),
            policy: None,
            identities: HashMap::new(),
            no_policy: 0,
        }
    }

    /// A decrypted packet from `peer`: may it go to the TUN device (or on to another peer)?
    /// `peers` says which peer owns an address (the core's allowed IPs).
    #[inline]
    pub fn from_peer(
        &mut self,
        now: Instant,
        peer: PeerId,
        peers: &impl PeerAddresses,
        packet: &[u8],
    ) -> bool {
        let Some(policy) = self.policy.as_deref() else {
            self.no_policy += 1;
            return false;
        };
        let identity = self.identities.get(&peer).copied();
        self.firewall
            .from_peer(now, policy, peer, identity, peers, packet)
            .is_ok()
    }

    /// A packet from the data-centre side: may it be sent to a peer?
    #[inline]
    pub fn to_peer(&mut self, now: Instant, peers: &impl PeerAddresses, packet: &[u8]) -> bool {
        let Some(policy) = self.policy.as_deref() else {
            self.no_policy += 1;
            return false;
        };
        self.firewall.to_peer(now, policy, peers, packet).is_ok()
    }

    /// Puts `policy` in force; remembered flows are carried over and re-judged.
    pub fn set_policy(&mut self, policy: Arc<CompiledPolicy>) {
        if let Some(old) = &self.policy {
            self.firewall.on_policy_change(old, &policy);
        }
        self.policy = Some(policy);
    }

    pub fn policy(&self) -> Option<&Arc<CompiledPolicy>> {
        self.policy.as_ref()
    }

    pub fn set_identity(&mut self, peer: PeerId, identity: PeerIdentity) {
        self.identities.insert(peer, identity);
    }

    /// The peer was removed: its identity and its flows go.
    pub fn forget(&mut self, peer: PeerId) {
        self.identities.remove(&peer);
        self.firewall.forget_peer(peer);
    }

    pub fn expire(&mut self, now: Instant) {
        self.firewall.expire(now);
    }

    pub fn counters(&self) -> &FirewallCounters {
        self.firewall.counters()
    }

    /// The flows `owner` holds and the ones it lost to a full table.
    pub fn owner_stats(&self, owner: FlowOwner) -> OwnerStats {
        self.firewall.owner_stats(owner)
    }

    pub fn flow_count(&self) -> usize {
        self.firewall.flow_count()
    }

    pub fn no_policy_drops(&self) -> u64 {
        self.no_policy
    }
}
