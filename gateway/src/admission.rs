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
                let displaced: Vec<[u8; 32]> = self
                    .peers
                    .iter()
                    .filter(|(k, p)| {
                        **k != key
                            && p.allowed_ips
                                .iter()
                                .any(|a| allowed_ips.iter().any(|b| overlap(a, b)))
                    })
                    .map(|(k, _)| *k)
                    .collect();
                let mut changes: Vec<PeerChange> =
                    displaced.iter().filter_map(|k| self.remove(k)).collect();
                changes.push(PeerChange::Upsert {
                    key,
                    allowed_ips: allowed_ips.clone(),
                    identity,
                });
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
                let removed = self.peers.remove(&key).map(|_| PeerChange::Remove { key });
                (Err(e), removed.into_iter().collect())
            }
        }
    }

    /// A revocation or decommission from the registry.
    pub fn remove(&mut self, key: &[u8; 32]) -> Option<PeerChange> {
        self.peers
            .remove(key)
            .map(|_| PeerChange::Remove { key: *key })
    }

    /// Takes out every peer whose certificate expired (call from the timer tick).
    pub fn expire(&mut self, now_unix: i64) -> Vec<PeerChange> {
        let expired: Vec<[u8; 32]> = self
            .peers
            .iter()
            .filter(|(_, p)| p.admission.not_after <= now_unix)
            .map(|(k, _)| *k)
            .collect();
        expired
            .into_iter()
            .filter_map(|k| self.remove(&k))
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

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
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
