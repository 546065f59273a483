//! Which peers a hub admits, sans-IO: the enrollment registry says which certificate identities
//! are valid, the policy says which addresses each may use. This module turns both into peer
//! table changes (key, allowed IPs, identity for the firewall) and takes peers out again when
//! their certificate is revoked or expires, or when the policy no longer knows their tenant.
//!
//! A spoke's allowed IPs are its tunnel addresses and its site's prefixes (the town-hall LAN it
//! forwards); a home office gets only its tunnel addresses, which the policy's home-office pool
//! must contain. Nothing else can be routed to or accepted from a peer.

use std::collections::BTreeMap;

use ipnet::IpNet;
use komnet_policy::{PeerIdentity, Policy, Role};
use komnet_proto::identity::Identity;

/// A change the driver applies to the WireGuard peer table and the firewall's identity map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    Upsert {
        key: [u8; 32],
        allowed_ips: Vec<IpNet>,
        identity: PeerIdentity,
    },
    Remove {
        key: [u8; 32],
    },
}

/// Why an identity from the registry was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("certificate {serial} expired at {not_after}")]
    Expired { serial: String, not_after: i64 },
    #[error("the MFA window of {serial} closed at {until}: admitted again after its person's next sign-in with a second factor")]
    WindowClosed { serial: String, until: i64 },
    #[error("tenant {tenant:?} / site {site:?} is not in policy version {version}: not admitted")]
    UnknownToPolicy {
        tenant: String,
        site: String,
        version: u64,
    },
    #[error(
        "tunnel address {addr} of {tenant}/{site} lies outside what the policy gives that identity"
    )]
    AddressOutsidePolicy {
        addr: IpNet,
        tenant: String,
        site: String,
    },
    #[error("hubs are not admitted as peers of another hub")]
    HubRole,
}

#[derive(Debug, Clone)]
struct Admitted {
    admission: Identity,
    identity: PeerIdentity,
    allowed_ips: Vec<IpNet>,
}

/// The admitted peers of a hub, by WireGuard key.
#[derive(Debug, Default)]
pub struct HubPeers {
    peers: BTreeMap<[u8; 32], Admitted>,
    /// Every admitted peer's allowed IPs (host bits cleared) and whose they are: finding the
    /// peers an admission overlaps is a range query and one lookup per shorter prefix length,
    /// not a walk over every peer (a snapshot of 10,000 would otherwise cost 10,000²).
    by_net: BTreeMap<IpNet, [u8; 32]>,
}

impl HubPeers {
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The identity the firewall uses for a peer key.
    pub fn identity(&self, key: &[u8; 32]) -> Option<PeerIdentity> {
        self.peers.get(key).map(|p| p.identity)
    }

    /// Admits (or updates) an identity from the registry. On error the previous admission of
    /// that key, if any, is withdrawn: an identity that is no longer acceptable loses access.
    pub fn upsert(
        &mut self,
        now_unix: i64,
        policy: &Policy,
        admission: Identity,
    ) -> (Result<(), AdmissionError>, Vec<PeerChange>) {
        let key = *admission.wg_public_key.as_bytes();
        match resolve(now_unix, policy, &admission) {
            Ok((identity, allowed_ips)) => {
                // Two keys never claim one site's (or one device's) addresses: the registry
                // announces identities in the order they were issued, so the one arriving now
                // replaces the one it overlaps (a replaced appliance, a re-issued phone).
                let mut displaced: Vec<[u8; 32]> = allowed_ips
                    .iter()
                    .flat_map(|net| self.overlapping(net))
                    .filter(|k| *k != key)
                    .collect();
                displaced.sort_unstable();
                displaced.dedup();
                let mut changes: Vec<PeerChange> =
                    displaced.iter().filter_map(|k| self.remove(k)).collect();
                changes.push(PeerChange::Upsert {
                    key,
                    allowed_ips: allowed_ips.clone(),
                    identity,
                });
                self.take(&key);
                for net in &allowed_ips {
                    self.by_net.insert(net.trunc(), key);
                }
                self.peers.insert(
                    key,
                    Admitted {
                        admission,
                        identity,
                        allowed_ips,
                    },
                );
                (Ok(()), changes)
            }
            Err(e) => {
                let removed = self.take(&key).map(|_| PeerChange::Remove { key });
                (Err(e), removed.into_iter().collect())
            }
        }
    }

    /// The keys of admitted peers with an allowed IP that overlaps `net`: those whose network
    /// lies inside `net` (one range of the index), and those with a shorter prefix containing it.
    fn overlapping(&self, net: &IpNet) -> Vec<[u8; 32]> {
        let net = net.trunc();
        let (first, last) = match net {
            IpNet::V4(n) => (
                IpNet::V4(ipnet::Ipv4Net::new_assert(n.network(), 0)),
                IpNet::V4(ipnet::Ipv4Net::new_assert(n.broadcast(), 32)),
            ),
            IpNet::V6(n) => (
                IpNet::V6(ipnet::Ipv6Net::new_assert(n.network(), 0)),
                IpNet::V6(ipnet::Ipv6Net::new_assert(n.broadcast(), 128)),
            ),
        };
        let mut out: Vec<[u8; 32]> = self.by_net.range(first..=last).map(|(_, k)| *k).collect();
        for len in 0..net.prefix_len() {
            let shorter = match net {
                IpNet::V4(n) => IpNet::V4(ipnet::Ipv4Net::new_assert(n.network(), len).trunc()),
                IpNet::V6(n) => IpNet::V6(ipnet::Ipv6Net::new_assert(n.network(), len).trunc()),
            };
            if let Some(k) = self.by_net.get(&shorter) {
                out.push(*k);
            }
        }
        out
    }

    /// Takes a peer out of both maps.
    fn take(&mut self, key: &[u8; 32]) -> Option<Admitted> {
        let gone = self.peers.remove(key)?;
        for net in &gone.allowed_ips {
            let net = net.trunc();
            if self.by_net.get(&net) == Some(key) {
                self.by_net.remove(&net);
            }
        }
        Some(gone)
    }

    /// A revocation or decommission from the registry.
    pub fn remove(&mut self, key: &[u8; 32]) -> Option<PeerChange> {
        self.take(key).map(|_| PeerChange::Remove { key: *key })
    }

    /// Takes out every peer whose certificate expired or whose MFA window closed (call from
    /// the timer tick); each change comes with whether it was the window.
    pub fn expire(&mut self, now_unix: i64) -> Vec<(PeerChange, bool)> {
        let expired: Vec<([u8; 32], bool)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.admission.admitted_until() <= now_unix)
            .map(|(k, p)| (*k, p.admission.not_after > now_unix))
            .collect();
        expired
            .into_iter()
            .filter_map(|(k, window)| Some((self.remove(&k)?, window)))
            .collect()
    }

    /// Re-resolves every admitted identity against a new policy version: sites whose prefixes
    /// changed get new allowed IPs, identities the policy no longer knows are removed.
    pub fn on_policy_change(&mut self, now_unix: i64, policy: &Policy) -> Vec<PeerChange> {
        let keys: Vec<[u8; 32]> = self.peers.keys().copied().collect();
        let mut changes = Vec::new();
        for key in keys {
            let Some(current) = self.peers.get(&key).cloned() else {
                continue;
            };
            let (result, mut c) = self.upsert(now_unix, policy, current.admission.clone());
            // An unchanged admission needs no change applied.
            if result.is_ok()
                && c == [PeerChange::Upsert {
                    key,
                    allowed_ips: current.allowed_ips.clone(),
                    identity: current.identity,
                }]
            {
                continue;
            }
            changes.append(&mut c);
        }
        changes
    }
}

fn resolve(
    now_unix: i64,
    policy: &Policy,
    a: &Identity,
) -> Result<(PeerIdentity, Vec<IpNet>), AdmissionError> {
    if a.not_after <= now_unix {
        return Err(AdmissionError::Expired {
            serial: a.serial.clone(),
            not_after: a.not_after,
        });
    }
    if let Some(until) = a.admitted_until.filter(|u| *u <= now_unix) {
        return Err(AdmissionError::WindowClosed {
            serial: a.serial.clone(),
            until,
        });
    }
    let unknown = || AdmissionError::UnknownToPolicy {
        tenant: a.tenant.to_string(),
        site: a.site.to_string(),
        version: policy.version,
    };
    let tenant = policy
        .tenant_by_name(a.tenant.as_str())
        .ok_or_else(unknown)?;
    let (identity, own_space): (PeerIdentity, Vec<IpNet>) = match a.role {
        Role::Hub => return Err(AdmissionError::HubRole),
        Role::Spoke => {
            let site = policy
                .site_by_name(tenant, a.site.as_str())
                .ok_or_else(unknown)?;
            (
                PeerIdentity {
                    tenant,
                    role: Role::Spoke,
                    site: Some(site),
                },
                policy.sites[site.index()].prefixes.clone(),
            )
        }
        Role::HomeOffice => (
            PeerIdentity {
                tenant,
                role: Role::HomeOffice,
                site: None,
            },
            policy.tenants[tenant.index()].homeoffice_pool.clone(),
        ),
    };
    let mut allowed = a.tunnel_addrs.clone();
    if a.role == Role::HomeOffice {
        for addr in &a.tunnel_addrs {
            if !own_space.iter().any(|p| p.contains(addr)) {
                return Err(AdmissionError::AddressOutsidePolicy {
                    addr: *addr,
                    tenant: a.tenant.to_string(),
                    site: a.site.to_string(),
                });
            }
        }
    } else {
        allowed.extend(own_space);
    }
    allowed.sort();
    allowed.dedup();
    Ok((identity, allowed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use komnet_proto::identity::{SiteId, TenantId, WgPublicKey};

    fn policy() -> Policy {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
        Policy::load(&dir).unwrap()
    }

    fn id(site: &str, role: Role, key: u8, addr: &str) -> Identity {
        Identity {
            tenant: TenantId::parse("musterstadt").unwrap(),
            site: SiteId::parse(site).unwrap(),
            role,
            wg_public_key: WgPublicKey::from_bytes([key; 32]).unwrap(),
            tunnel_addrs: vec![addr.parse().unwrap()],
            not_after: 5000,
            serial: format!("{key:02x}"),
            admitted_until: None,
        }
    }

    fn removed(changes: &[PeerChange]) -> Vec<u8> {
        changes
            .iter()
            .filter_map(|c| match c {
                PeerChange::Remove { key } => Some(key[0]),
                PeerChange::Upsert { .. } => None,
            })
            .collect()
    }

    #[test]
    fn an_admission_displaces_exactly_the_peers_whose_addresses_it_overlaps() {
        let p = policy();
        let mut peers = HubPeers::default();
        // Two home-office devices and two town-hall appliances live side by side.
        for (i, who) in [
            id("anna", Role::HomeOffice, 1, "10.250.20.5/32"),
            id("bernd", Role::HomeOffice, 2, "10.250.20.6/32"),
            id("rathaus", Role::Spoke, 3, "10.96.0.3/32"),
            id("bauhof", Role::Spoke, 4, "10.96.0.4/32"),
        ]
        .into_iter()
        .enumerate()
        {
            let (r, c) = peers.upsert(1000, &p, who);
            assert!(r.is_ok(), "{i}: {r:?}");
            assert!(removed(&c).is_empty(), "{i}: {c:?}");
        }
        assert_eq!(peers.len(), 4);
        // Anna's re-issued phone takes her address: the old key goes, nobody else.
        let (_, c) = peers.upsert(1000, &p, id("anna", Role::HomeOffice, 5, "10.250.20.5/32"));
        assert_eq!(removed(&c), vec![1]);
        // A replaced town-hall appliance (same site prefixes, new tunnel address).
        let (_, c) = peers.upsert(1000, &p, id("rathaus", Role::Spoke, 6, "10.96.0.9/32"));
        assert_eq!(removed(&c), vec![3]);
        // A new tunnel address inside nobody's prefixes displaces nobody; updating a peer with
        // its own addresses does not displace itself.
        let (_, c) = peers.upsert(1000, &p, id("bauhof", Role::Spoke, 4, "10.96.0.4/32"));
        assert!(removed(&c).is_empty(), "{c:?}");
        assert_eq!(peers.len(), 4);
        // After removals the index forgets them: their addresses are free again.
        assert!(peers.remove(&[2; 32]).is_some());
        let (_, c) = peers.upsert(1000, &p, id("carla", Role::HomeOffice, 7, "10.250.20.6/32"));
        assert!(removed(&c).is_empty(), "{c:?}");
        // A /15 holds both town halls' /16s; a /24 inside one of them only that one.
        let mut both = peers.overlapping(&"10.20.0.0/15".parse().unwrap());
        both.sort();
        assert_eq!(both, vec![[4; 32], [6; 32]]);
        assert_eq!(
            peers.overlapping(&"10.20.7.0/24".parse().unwrap()),
            vec![[6; 32]]
        );
        assert_eq!(
            peers.overlapping(&"10.21.3.0/24".parse().unwrap()),
            vec![[4; 32]]
        );
        assert!(peers
            .overlapping(&"10.22.0.0/16".parse().unwrap())
            .is_empty());
        // A refused update withdraws the key and its addresses.
        let mut gone = id("carla", Role::HomeOffice, 7, "10.99.0.1/32");
        gone.not_after = 10;
        let (r, c) = peers.upsert(1000, &p, gone);
        assert!(r.is_err());
        assert_eq!(removed(&c), vec![7]);
        assert!(peers
            .overlapping(&"10.250.20.6/32".parse().unwrap())
            .is_empty());
    }
}
