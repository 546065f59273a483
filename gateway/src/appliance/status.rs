//! What an appliance shows its operators: `/status` (JSON, read by `komnet status`) and
//! `/metrics` (Prometheus text format), served on the configured management address.

use std::collections::BTreeMap;
use std::fmt::Write as _;

pub use komnet_proto::status::{
    CertificateStatus, FlowShare, PeerStatus, PolicyStatus, StatusReport, PEER_UP_SECS,
};

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of a report at `now` (Unix seconds).
pub fn to_prometheus(report: &StatusReport, now: i64) -> String {
    let this = report;
    let mut out = String::new();

    let n = family(
        &mut out,
        "komnet_info",
        "gauge",
        "The appliance's role and identity.",
    );
    line(
        &mut out,
        format!(
            "{n}{{role=\"{}\",tenant=\"{}\",site=\"{}\",state=\"{}\"}} 1",
            label(&this.role),
            label(this.tenant.as_deref().unwrap_or("")),
            label(this.site.as_deref().unwrap_or("")),
            label(&this.state)
        ),
    );

    let mut by_tenant: BTreeMap<(String, String, &str), u64> = BTreeMap::new();
    for p in &this.peers {
        let up = p.last_handshake.is_some_and(|t| now - t < PEER_UP_SECS);
        *by_tenant
            .entry((
                p.tenant.clone().unwrap_or_default(),
                p.role.clone().unwrap_or_default(),
                if up { "up" } else { "down" },
            ))
            .or_default() += 1;
    }
    let n = family(
        &mut out,
        "komnet_peers",
        "gauge",
        "Peers by tenant, role and state (up: handshake within 180 s).",
    );
    for ((tenant, role, state), count) in &by_tenant {
        line(
            &mut out,
            format!(
                "{n}{{tenant=\"{}\",role=\"{}\",state=\"{state}\"}} {count}",
                label(tenant),
                label(role)
            ),
        );
    }

    let peer_labels = |p: &PeerStatus| {
        format!(
            "tenant=\"{}\",site=\"{}\",role=\"{}\"",
            label(p.tenant.as_deref().unwrap_or("")),
            label(p.site.as_deref().unwrap_or("")),
            label(p.role.as_deref().unwrap_or(""))
        )
    };
    let n = family(
        &mut out,
        "komnet_peer_last_handshake_seconds",
        "gauge",
        "Unix time of the peer's last completed handshake.",
    );
    for p in &this.peers {
        if let Some(t) = p.last_handshake {
            line(&mut out, format!("{n}{{{}}} {t}", peer_labels(p)));
        }
    }
    for (name, help, get) in [
        (
            "komnet_peer_rx_bytes_total",
            "Bytes received from the peer (encrypted).",
            (|p: &PeerStatus| p.rx_bytes) as fn(&PeerStatus) -> u64,
        ),
        (
            "komnet_peer_tx_bytes_total",
            "Bytes sent to the peer (encrypted).",
            |p: &PeerStatus| p.tx_bytes,
        ),
    ] {
        let n = family(&mut out, name, "counter", help);
        for p in &this.peers {
            line(&mut out, format!("{n}{{{}}} {}", peer_labels(p), get(p)));
        }
    }
    let n = family(
        &mut out,
        "komnet_peer_certificate_expiry_seconds",
        "gauge",
        "Unix time the peer's certificate expires.",
    );
    for p in &this.peers {
        if let Some(t) = p.cert_not_after {
            line(&mut out, format!("{n}{{{}}} {t}", peer_labels(p)));
        }
    }

    let n = family(
        &mut out,
        "komnet_drops_total",
        "counter",
        "Packets dropped, by reason (WireGuard layer and policy firewall).",
    );
    for (reason, count) in &this.drops {
        line(
            &mut out,
            format!("{n}{{reason=\"{}\"}} {count}", label(reason)),
        );
    }

    let n = family(
            &mut out,
            "komnet_events_total",
            "counter",
            "Control-plane and firewall events: registry changes, admissions, renewals, policy installs and refusals, failovers, new flows, evictions.",
        );
    for (event, count) in &this.counters {
        line(
            &mut out,
            format!("{n}{{event=\"{}\"}} {count}", label(event)),
        );
    }

    if let Some(flows) = this.flows {
        let n = family(
            &mut out,
            "komnet_flows",
            "gauge",
            "Flows the hub firewall remembers.",
        );
        line(&mut out, format!("{n} {flows}"));
    }
    // Per owner of flows: each peer (labelled with its key too, as several home offices of
    // one tenant share the other labels) and the data centre.
    let owners: Vec<(String, FlowShare)> = this
        .peers
        .iter()
        .filter_map(|p| {
            let share = p.flows?;
            Some((
                format!("{},key=\"{}\"", peer_labels(p), label(&p.public_key)),
                share,
            ))
        })
        .chain(this.datacentre_flows.map(|d| {
            (
                "tenant=\"\",site=\"\",role=\"datacentre\",key=\"\"".to_owned(),
                d,
            )
        }))
        .collect();
    if !owners.is_empty() {
        for (name, help, get) in [
            (
                "komnet_flow_owner_flows",
                "gauge",
                (|s: &FlowShare| s.flows) as fn(&FlowShare) -> u64,
            ),
            (
                "komnet_flow_owner_evicted_total",
                "counter",
                |s: &FlowShare| s.evicted,
            ),
        ] {
            let help_text = if help == "gauge" {
                "Hub: flows each peer (or the data centre) started that the firewall remembers."
            } else {
                "Hub: flows a peer (or the data centre) lost because the table was full; it loses its own oldest when it holds its share or more (an attacker's count grows, others' stay)."
            };
            let n = family(&mut out, name, help, help_text);
            for (labels, share) in &owners {
                line(&mut out, format!("{n}{{{labels}}} {}", get(share)));
            }
        }
    }
    let n = family(
        &mut out,
        "komnet_policy_version",
        "gauge",
        "Version of the policy in force (0: none yet, forwarding nothing).",
    );
    line(
        &mut out,
        format!("{n} {}", this.policy.as_ref().map_or(0, |p| p.version)),
    );
    if let Some(p) = &this.policy {
        let n = family(
            &mut out,
            "komnet_policy_age_seconds",
            "gauge",
            "Seconds since the policy in force was installed here.",
        );
        line(&mut out, format!("{n} {}", (now - p.installed_at).max(0)));
    }
    if let Some(c) = &this.certificate {
        let n = family(
            &mut out,
            "komnet_certificate_expiry_seconds",
            "gauge",
            "Unix time this appliance's own certificate expires.",
        );
        line(&mut out, format!("{n} {}", c.not_after));
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) -> String {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name.to_owned()
}

fn line(out: &mut String, text: String) {
    out.push_str(&text);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_well_formed() {
        let mut r = StatusReport {
            role: "hub".into(),
            state: "running".into(),
            ..Default::default()
        };
        r.peers.push(PeerStatus {
            public_key: "k".into(),
            tenant: Some("noh\"felden".into()),
            site: Some("rathaus".into()),
            role: Some("spoke".into()),
            endpoint: None,
            last_handshake: Some(990),
            rx_bytes: 5,
            tx_bytes: 6,
            cert_not_after: Some(5000),
            active: false,
            flows: Some(FlowShare {
                flows: 990,
                evicted: 9010,
            }),
        });
        r.datacentre_flows = Some(FlowShare {
            flows: 4,
            evicted: 0,
        });
        r.drops.insert("policy_default_deny".into(), 3);
        let text = to_prometheus(&r, 1000);
        assert!(
            text.contains("komnet_peers{tenant=\"noh\\\"felden\",role=\"spoke\",state=\"up\"} 1")
        );
        assert!(text.contains("komnet_drops_total{reason=\"policy_default_deny\"} 3"));
        assert!(text.contains("komnet_policy_version 0"));
        assert!(text.contains(
            "komnet_flow_owner_evicted_total{tenant=\"noh\\\"felden\",site=\"rathaus\",role=\"spoke\",key=\"k\"} 9010"
        ));
        assert!(text.contains(
            "komnet_flow_owner_flows{tenant=\"\",site=\"\",role=\"datacentre\",key=\"\"} 4"
        ));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
