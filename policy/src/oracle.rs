//! The reference evaluator: decides a packet straight from the policy, one rule after another,
//! with no precomputation. It is slow on purpose and easy to read; the classifier and the
//! nftables compiler are tested against it.

use crate::flow::{Origin, PacketMeta, Proto, Role};
use crate::model::{Binding, GuardrailId, Policy, RuleId, SegmentId, ServiceId, SiteId};

/// What decided a packet's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decider {
    /// Allowed by this rule (the first one, in file order, that allows it).
    Rule(RuleId),
    /// Denied by an operator guardrail, whatever the rules say.
    Guardrail(GuardrailId),
    /// No rule allows it.
    DefaultDeny,
    /// The source address is in no segment.
    NoSegment,
    /// The source address belongs to a segment the sending peer may not use.
    ForeignSource,
    /// Not TCP, UDP or ICMP.
    UnknownProtocol,
    /// Arrived at a site's appliance where the segment of its source address does not arrive
    /// (a guest-VLAN host with a staff address, an address of no segment of the site).
    SegmentSpoof,
}

/// Allow or deny, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    pub allow: bool,
    pub by: Decider,
}

impl Decision {
    pub(crate) fn deny(by: Decider) -> Self {
        Decision { allow: false, by }
    }
}

/// May a peer with this identity send from this segment?
pub(crate) fn origin_may_use(policy: &Policy, origin: Origin, seg: SegmentId) -> bool {
    let segment = &policy.segments[seg.index()];
    match origin {
        Origin::Address => true,
        Origin::Peer(id) => {
            id.tenant == segment.tenant
                && match id.role {
                    Role::HomeOffice => segment.is_homeoffice(),
                    Role::Spoke => !segment.is_homeoffice() && segment.site == id.site,
                    Role::Hub => !segment.is_homeoffice(),
                }
        }
    }
}

/// Decides `packet` from `origin` by reading the policy rule by rule.
pub fn decide(policy: &Policy, origin: Origin, packet: &PacketMeta) -> Decision {
    let Some(proto) = Proto::from_ip_number(packet.ip_proto) else {
        return Decision::deny(Decider::UnknownProtocol);
    };
    let port = if proto == Proto::Icmp {
        0
    } else {
        packet.dport
    };
    let Some(seg) = policy.segment_of(packet.src) else {
        return Decision::deny(Decider::NoSegment);
    };
    if !origin_may_use(policy, origin, seg) {
        return Decision::deny(Decider::ForeignSource);
    }
    let segment = &policy.segments[seg.index()];
    let matched: Vec<ServiceId> = policy
        .services
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s.addresses.iter().any(|a| a.contains(&packet.dst))
                && s.ports.iter().any(|p| p.contains(proto, port))
        })
        .map(|(i, _)| ServiceId(i as u32))
        .collect();
    for (i, g) in policy.guardrails.iter().enumerate() {
        if !g.applies_to_segment(segment) {
            continue;
        }
        let hit = match &g.to {
            crate::GuardTarget::Everything => true,
            crate::GuardTarget::Services(list) => matched.iter().any(|s| list.contains(s)),
        };
        if hit {
            return Decision::deny(Decider::Guardrail(GuardrailId(i as u32)));
        }
    }
    for (i, rule) in policy.rules.iter().enumerate() {
        if !rule.from.contains(&seg) {
            continue;
        }
        let allows = matched.iter().any(|s| {
            rule.to.contains(s)
                && rule
                    .allowed_ports(&policy.services[s.index()])
                    .iter()
                    .any(|p| p.contains(proto, port))
        });
        if allows {
            return Decision {
                allow: true,
                by: Decider::Rule(RuleId(i as u32)),
            };
        }
    }
    Decision::deny(Decider::DefaultDeny)
}

/// Decides `packet` as the appliance of `site` does when it arrived from the LAN on
/// `arrived` (the VLAN or port it came in on), with the LAN's addresses (a segment's `local`
/// prefixes stand for its unique ones): it is the segment's only when its source lies in
/// a segment of this site that arrives there; anything else is [`Decider::SegmentSpoof`].
/// Then as [`decide`] for the site's spoke (flows towards the tunnel and between the site's
/// segments alike).
pub fn decide_arrival(
    policy: &Policy,
    site: SiteId,
    arrived: &Binding,
    packet: &PacketMeta,
) -> Decision {
    // The LAN's own numbering (`local` prefixes) is the district's unique one from here on.
    let packet = &PacketMeta {
        src: policy.unique_of(site, packet.src),
        dst: policy.unique_of(site, packet.dst),
        ..*packet
    };
    let own = policy.segment_of(packet.src).filter(|s| {
        let seg = &policy.segments[s.index()];
        seg.site == Some(site) && seg.binding.as_ref().is_some_and(|b| b.admits(arrived))
    });
    if own.is_none() {
        return Decision::deny(Decider::SegmentSpoof);
    }
    let spoke = crate::PeerIdentity {
        tenant: policy.sites[site.index()].tenant,
        role: Role::Spoke,
        site: Some(site),
    };
    decide(policy, Origin::Peer(spoke), packet)
}
