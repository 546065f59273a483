//! The report an appliance serves on `/status` (JSON) and `komnet status` renders.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The appliance's state as `komnet status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub role: String,
    /// `enrolling`, `waiting for policy`, `running`, or what stopped it.
    pub state: String,
    pub interface: String,
    pub listen_port: u16,
    pub tenant: Option<String>,
    pub site: Option<String>,
    pub tunnel_addrs: Vec<String>,
    /// Spoke with `lan_addresses`: the addresses it put on its LAN interface (its site's
    /// segments' gateways). Absent in reports of older gateways.
    #[serde(default)]
    pub lan_addresses: Vec<String>,
    /// Spoke: why the LAN is not as the policy wants it (a port the policy names that this
    /// appliance lacks, a VLAN the trunk refuses); retried. Empty when it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lan_errors: Vec<String>,
    /// Spoke with `dhcp_config`: the segments its DHCP server serves, one line each
    /// (`nohfelden/verwaltung on eth1: 10.30.1.2-10.30.1.254`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dhcp: Vec<String>,
    pub certificate: Option<CertificateStatus>,
    pub policy: Option<PolicyStatus>,
    /// Why the last offered policy bundle was refused, if it was.
    pub policy_error: Option<String>,
    pub peers: Vec<PeerStatus>,
    /// Hub: flows the firewall remembers.
    pub flows: Option<usize>,
    /// Hub: the flows the data-centre side started, and those it lost to a full table.
    #[serde(default)]
    pub datacentre_flows: Option<FlowShare>,
    /// Packets dropped, by reason (WireGuard layer and firewall).
    pub drops: BTreeMap<String, u64>,
    /// Control-plane events (registry, renewals, policy, failovers), by name.
    pub counters: BTreeMap<String, u64>,
    /// Hub: the link to the enrollment service's registry. Absent in spokes' reports and in
    /// those of older gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryStatus>,
    /// Hub with `[bgp]`: its announcement table and the prefixes in it (those of the peers
    /// that send to this hub now), for the routing daemon to announce. Absent without `[bgp]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced: Option<Announced>,
}

/// What a hub with `[bgp]` announces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announced {
    /// The kernel routing table (`[bgp] table`).
    pub table: u32,
    pub prefixes: Vec<String>,
    /// With `[bgp] bird_socket`: the BGP sessions of the hub machine's BIRD, as last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<BgpSessions>,
}

/// The hub machine's BGP sessions (`[bgp] bird_socket`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSessions {
    /// Unix seconds of the last read (successful or not).
    pub checked: i64,
    /// Why the last read failed (BIRD not running, no access to its socket, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sessions: Vec<BgpSessionStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSessionStatus {
    /// The protocol's name in bird.conf.
    pub name: String,
    pub established: bool,
    /// BIRD's state and info, e.g. `start Active Socket: Connection refused`.
    pub state: String,
    /// Unix seconds since the session is in this state (as far as the hub saw).
    pub since: i64,
}

/// A hub's link to the registry (where revocations come from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryStatus {
    /// `connected`, `connecting` or `unreachable`.
    pub state: String,
    /// Unix seconds: connected since (when connected), else unreachable since.
    pub since: i64,
    /// The registry version applied (when connected).
    pub version: Option<u64>,
    /// Unix seconds of the last registry event received (any connection).
    pub last_event: Option<i64>,
    /// The outage lasted beyond `alarm_after_secs`: revocations made meanwhile are not heard.
    pub alarm: bool,
    pub alarm_after_secs: u64,
    /// What the hub does during such an outage: `keep-peers` or `remove-peers`.
    pub on_outage: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub serial: String,
    pub not_after: i64,
    pub renew_after: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub version: u64,
    pub name: String,
    /// Unix seconds when this version was put in force here.
    pub installed_at: i64,
    /// The bundle's validity window as signed (`komnet policy bundle --valid-for`), if any.
    #[serde(default)]
    pub not_before: Option<i64>,
    #[serde(default)]
    pub expires: Option<i64>,
}

impl PolicyStatus {
    /// Less than a third of the bundle's validity is left at `now` (the operator has to sign
    /// and publish a new one before it runs out).
    pub fn expiring(&self, now: i64) -> bool {
        match (self.expires, self.not_before.unwrap_or(self.installed_at)) {
            (Some(end), start) => less_than_a_third_left(start, end, now),
            (None, _) => false,
        }
    }
}

impl CertificateStatus {
    /// Less than a third of the certificate's lifetime is left at `now` and it is not renewed
    /// yet (renewal opens two thirds in: a renewal that keeps failing).
    pub fn expiring(&self, now: i64) -> bool {
        now >= self.renew_after
    }
}

/// Whether less than a third of `[start, end)` is left at `now`.
pub fn less_than_a_third_left(start: i64, end: i64, now: i64) -> bool {
    (end - now) * 3 < end - start
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: String,
    pub tenant: Option<String>,
    pub site: Option<String>,
    pub role: Option<String>,
    pub endpoint: Option<String>,
    /// Unix seconds.
    pub last_handshake: Option<i64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub cert_not_after: Option<i64>,
    /// Spoke: the hub its traffic goes to now.
    pub active: bool,
    /// Hub: flows this peer started that the firewall remembers, and those it lost because
    /// the table was full (a peer opening flows without end loses its own; issue 14).
    #[serde(default)]
    pub flows: Option<FlowShare>,
    /// Its packets the tunnel refused (spoofed source, replay, failed authentication, ...).
    #[serde(default)]
    pub drops: u64,
}

/// One owner's part of a hub's flow table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowShare {
    pub flows: u64,
    pub evicted: u64,
    /// The owner's packets the firewall refused (policy, a source not its own).
    #[serde(default)]
    pub denied: u64,
}

/// A peer counts as up when its last handshake is younger than this (WireGuard rekeys every
/// two minutes while traffic flows; keepalives keep spokes' sessions warm).
pub const PEER_UP_SECS: i64 = 180;

/// What a hub tells the enrollment service every [`HUB_REPORT_SECS`] (`POST /v1/hub/report`):
/// its admitted peers as it sees them, for the web console's fleet page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubReport {
    pub peers: Vec<HubPeerReport>,
}

/// How often hubs report.
pub const HUB_REPORT_SECS: u64 = 15;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubPeerReport {
    /// Standard base64, as `wg` shows it.
    pub public_key: String,
    pub tenant: String,
    pub site: String,
    pub role: String,
    /// Unix seconds.
    pub last_handshake: Option<i64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Its packets the tunnel refused ([`PeerStatus::drops`]).
    pub drops: u64,
    /// Its packets the firewall refused ([`FlowShare::denied`]).
    pub denied: u64,
}

impl HubReport {
    /// The admitted peers of a hub's status that have something to say: a handshake or a
    /// refused packet (an admitted peer that never connected is left out: the fleet shows it
    /// as "no handshake" anyway, and a county hub's report stays small while most are idle).
    pub fn of(status: &StatusReport) -> HubReport {
        HubReport {
            peers: status
                .peers
                .iter()
                .filter(|p| {
                    p.last_handshake.is_some()
                        || p.drops > 0
                        || p.flows.is_some_and(|f| f.denied > 0)
                })
                .filter_map(|p| {
                    Some(HubPeerReport {
                        public_key: p.public_key.clone(),
                        tenant: p.tenant.clone()?,
                        site: p.site.clone()?,
                        role: p.role.clone()?,
                        last_handshake: p.last_handshake,
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        drops: p.drops,
                        denied: p.flows.map_or(0, |f| f.denied),
                    })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(key: &str, tenant: Option<&str>, denied: u64) -> PeerStatus {
        PeerStatus {
            public_key: key.into(),
            tenant: tenant.map(Into::into),
            site: Some("rathaus".into()),
            role: Some("spoke".into()),
            endpoint: None,
            last_handshake: Some(1_000),
            rx_bytes: 10,
            tx_bytes: 20,
            cert_not_after: None,
            active: false,
            flows: Some(FlowShare {
                flows: 1,
                evicted: 0,
                denied,
            }),
            drops: 3,
        }
    }

    #[test]
    fn a_hub_reports_its_admitted_peers_with_their_refusals() {
        let mut never = peer("c", Some("tholey"), 0);
        never.last_handshake = None;
        never.drops = 0;
        let status = StatusReport {
            peers: vec![peer("a", Some("tholey"), 5), peer("b", None, 0), never],
            ..Default::default()
        };
        let report = HubReport::of(&status);
        assert_eq!(
            report.peers,
            [HubPeerReport {
                public_key: "a".into(),
                tenant: "tholey".into(),
                site: "rathaus".into(),
                role: "spoke".into(),
                last_handshake: Some(1_000),
                rx_bytes: 10,
                tx_bytes: 20,
                drops: 3,
                denied: 5,
            }],
            "a peer the registry does not know, or one with nothing to report, is left out"
        );
    }
}
