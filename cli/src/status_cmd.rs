//! `komnet status`: what a gateway reports on its management address (`/status`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use komnet_proto::status::{Announced, BgpSessions, RegistryStatus, StatusReport};

/// Fetches `/status` with a plain HTTP/1.0 GET (the management address is loopback or a
/// management network; the gateway serves no TLS there).
pub(crate) fn fetch(addr: SocketAddr) -> Result<StatusReport> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("cannot reach the gateway at {addr} (is komnet-gateway running, and is this its metrics_listen?)"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    conn.take(16 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{addr}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.") || head.split(' ').nth(1).is_none_or(|c| c != "200") {
        bail!(
            "{addr}: {}",
            head.lines().next().unwrap_or("no status line")
        );
    }
    serde_json::from_str(body).with_context(|| format!("{addr}: /status is not a status report"))
}

fn ago(now: i64, t: Option<i64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let d = (now - t).max(0);
            match d {
                0..=119 => format!("{d}s ago"),
                120..=7199 => format!("{}m ago", d / 60),
                _ => format!("{}h ago", d / 3600),
            }
        }
    }
}

fn until(now: i64, t: Option<i64>) -> String {
    match t {
        None => "-".into(),
        Some(t) if t <= now => "EXPIRED".into(),
        Some(t) => {
            let d = t - now;
            if d >= 2 * 86_400 {
                format!("{}d", d / 86_400)
            } else {
                format!("{}h", d / 3600)
            }
        }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A hub with `[bgp] bird_socket`: its BGP sessions, a warning for each that is not
/// Established (the router does not route to the hub's peers then).
fn bgp_sessions_lines(now: i64, b: &BgpSessions) -> String {
    let mut out = String::new();
    if let Some(e) = &b.error {
        out.push_str(&format!(
            "bgp sessions: WARNING cannot read them from BIRD ({e}; last tried {})\n",
            ago(now, Some(b.checked))
        ));
    }
    if b.sessions.is_empty() && b.error.is_none() {
        out.push_str("bgp sessions: WARNING BIRD has no BGP protocol\n");
    }
    for s in &b.sessions {
        if s.established {
            out.push_str(&format!(
                "bgp session {}: established since {}\n",
                s.name,
                ago(now, Some(s.since))
            ));
        } else {
            out.push_str(&format!(
                "bgp session {}: WARNING not established ({}) since {}: the router does not \
                 route to this hub's peers\n",
                s.name,
                s.state,
                ago(now, Some(s.since))
            ));
        }
    }
    out
}

/// A hub with `[bgp]`: what its announcement table holds.
fn announced_line(a: &Announced) -> String {
    const SHOWN: usize = 8;
    let mut list = a
        .prefixes
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if a.prefixes.len() > SHOWN {
        list.push_str(&format!(", … ({} more)", a.prefixes.len() - SHOWN));
    }
    match a.prefixes.len() {
        0 => format!(
            "bgp: table {}, nothing announced (no peer sends to this hub)\n",
            a.table
        ),
        n => format!("bgp: table {}, {n} prefixes announced: {list}\n", a.table),
    }
}

/// A hub's registry link: connected since when, the last event; or how long it is gone and
/// what that means.
fn registry_line(now: i64, g: &RegistryStatus) -> String {
    let last = format!("last event {}", ago(now, g.last_event));
    match g.state.as_str() {
        "connected" => format!(
            "registry: connected since {} (version {}, {last})\n",
            ago(now, Some(g.since)),
            g.version.map_or("-".into(), |v| v.to_string()),
        ),
        state => {
            let mut line = format!(
                "registry: {} since {} ({state}; {last})",
                if g.alarm {
                    "UNREACHABLE"
                } else {
                    "unreachable"
                },
                ago(now, Some(g.since)),
            );
            if g.alarm {
                line.push_str(&format!(
                    " — revocations made meanwhile are not heard; {}",
                    match g.on_outage.as_str() {
                        "remove-peers" => "every peer is removed until it is back (registry_outage = remove-peers)",
                        _ => "known peers stay admitted (registry_outage = keep-peers)",
                    }
                ));
            }
            line.push('\n');
            line
        }
    }
}

/// The human form: the appliance, then one line per peer.
pub(crate) fn render(r: &StatusReport) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut out = String::new();
    let who = match (&r.tenant, &r.site) {
        (Some(t), Some(s)) => format!("{t}/{s}"),
        _ => "(not enrolled)".into(),
    };
    out.push_str(&format!(
        "{} {who}  state: {}  interface: {} (udp/{})  addresses: {}\n",
        r.role,
        r.state,
        r.interface,
        r.listen_port,
        if r.tunnel_addrs.is_empty() {
            "-".into()
        } else {
            r.tunnel_addrs.join(", ")
        }
    ));
    if !r.lan_addresses.is_empty() {
        out.push_str(&format!("lan addresses: {}\n", r.lan_addresses.join(", ")));
    }
    for e in &r.lan_errors {
        out.push_str(&format!("lan: WARNING {e} (retrying)\n"));
    }
    for d in &r.dhcp {
        out.push_str(&format!("dhcp: {d}\n"));
    }
    match &r.certificate {
        Some(c) => out.push_str(&format!(
            "certificate: serial {}  expires in {}  renews {}\n",
            c.serial,
            until(now, Some(c.not_after)),
            if c.renew_after <= now {
                "now".to_string()
            } else {
                format!("in {}", until(now, Some(c.renew_after)))
            }
        )),
        None => out.push_str("certificate: none yet\n"),
    }
    if r.certificate.as_ref().is_some_and(|c| c.expiring(now)) {
        out.push_str(
            "certificate: WARNING less than a third of its lifetime left and not renewed: \
             renewal keeps failing (is the enrollment service reachable? see the log)\n",
        );
    }
    match &r.policy {
        Some(p) => out.push_str(&format!(
            "policy: version {} ({}), in force since {}\n",
            p.version,
            p.name,
            ago(now, Some(p.installed_at))
        )),
        None => out.push_str("policy: NONE — forwarding nothing until a policy arrives\n"),
    }
    if let Some(p) = r.policy.as_ref().filter(|p| p.expiring(now)) {
        out.push_str(&format!(
            "policy: WARNING version {} is valid only for {} more: sign and publish a new bundle\n",
            p.version,
            until(now, p.expires)
        ));
    }
    if let Some(e) = &r.policy_error {
        out.push_str(&format!("policy refused: {e}\n"));
    }
    if let Some(g) = &r.registry {
        out.push_str(&registry_line(now, g));
    }
    if let Some(a) = &r.announced {
        out.push_str(&announced_line(a));
        if let Some(b) = &a.sessions {
            out.push_str(&bgp_sessions_lines(now, b));
        }
    }
    if let Some(f) = r.flows {
        out.push_str(&format!("firewall flows: {f}\n"));
    }
    out.push('\n');
    let header = [
        "TENANT",
        "SITE",
        "ROLE",
        "ENDPOINT",
        "HANDSHAKE",
        "RX",
        "TX",
        "CERT",
        "POLICY",
    ];
    let version = r
        .policy
        .as_ref()
        .map_or("-".into(), |p| p.version.to_string());
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for p in &r.peers {
        let mut site = p.site.clone().unwrap_or_else(|| "-".into());
        if p.active {
            site.push_str(" *");
        }
        rows.push(vec![
            p.tenant.clone().unwrap_or_else(|| "-".into()),
            site,
            p.role.clone().unwrap_or_else(|| "?".into()),
            p.endpoint.clone().unwrap_or_else(|| "-".into()),
            ago(now, p.last_handshake),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            until(now, p.cert_not_after),
            version.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if r.peers.is_empty() {
        out.push_str("(no peers)\n");
    } else if r.role == "spoke" {
        out.push_str("* = the hub carrying the traffic now\n");
    }
    if !r.drops.is_empty() {
        let drops: Vec<String> = r.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("\ndrops: {}\n", drops.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_addresses_are_shown_when_there_are_some() {
        let mut r = StatusReport {
            role: "spoke".into(),
            state: "running".into(),
            tenant: Some("nohfelden".into()),
            site: Some("rathaus".into()),
            ..StatusReport::default()
        };
        assert!(!render(&r).contains("lan addresses"));
        r.lan_addresses = vec!["10.30.1.1/24".into(), "10.30.100.1/24".into()];
        let text = render(&r);
        assert!(
            text.contains("\nlan addresses: 10.30.1.1/24, 10.30.100.1/24\n"),
            "{text}"
        );
        assert!(
            !text.contains("WARNING") && !text.contains("dhcp:"),
            "{text}"
        );
        r.dhcp = vec!["nohfelden/verwaltung on eth1: 10.30.1.2-10.30.1.254".into()];
        assert!(
            render(&r).contains("\ndhcp: nohfelden/verwaltung on eth1: 10.30.1.2-10.30.1.254\n"),
            "{}",
            render(&r)
        );
        r.lan_errors = vec!["ip(8) refused the addresses of guest0: Cannot find device".into()];
        assert!(
            render(&r).contains(
                "\nlan: WARNING ip(8) refused the addresses of guest0: Cannot find device (retrying)\n"
            ),
            "{}",
            render(&r)
        );
    }

    #[test]
    fn the_registry_line_says_connected_or_how_long_it_is_gone() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut r = StatusReport {
            role: "hub".into(),
            state: "running".into(),
            registry: Some(RegistryStatus {
                state: "connected".into(),
                since: now - 30,
                version: Some(17),
                last_event: Some(now - 5),
                alarm: false,
                alarm_after_secs: 300,
                on_outage: "keep-peers".into(),
            }),
            ..StatusReport::default()
        };
        let text = render(&r);
        assert!(
            text.contains("\nregistry: connected since 30s ago (version 17, last event 5s ago)\n"),
            "{text}"
        );
        if let Some(g) = r.registry.as_mut() {
            g.state = "unreachable".into();
            g.since = now - 400;
            g.version = None;
            g.alarm = true;
        }
        let text = render(&r);
        assert!(
            text.contains(
                "\nregistry: UNREACHABLE since 6m ago (unreachable; last event 5s ago) — \
                 revocations made meanwhile are not heard; known peers stay admitted \
                 (registry_outage = keep-peers)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_bgp_hub_says_what_it_announces() {
        let mut r = StatusReport {
            role: "hub".into(),
            state: "running".into(),
            announced: Some(Announced {
                table: 200,
                prefixes: Vec::new(),
                sessions: None,
            }),
            ..StatusReport::default()
        };
        let text = render(&r);
        assert!(
            text.contains("\nbgp: table 200, nothing announced (no peer sends to this hub)\n"),
            "{text}"
        );
        if let Some(a) = r.announced.as_mut() {
            a.prefixes = (1..=10).map(|i| format!("10.{i}.0.0/16")).collect();
        }
        let text = render(&r);
        assert!(
            text.contains("\nbgp: table 200, 10 prefixes announced: 10.1.0.0/16, 10.2.0.0/16, "),
            "{text}"
        );
        assert!(text.contains("10.8.0.0/16, … (2 more)\n"), "{text}");
        assert!(!text.contains("bgp session"), "not watched: {text}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(a) = r.announced.as_mut() {
            a.sessions = Some(BgpSessions {
                checked: now,
                error: None,
                sessions: vec![
                    komnet_proto::status::BgpSessionStatus {
                        name: "dc".into(),
                        established: true,
                        state: "up Established".into(),
                        since: now - 600,
                    },
                    komnet_proto::status::BgpSessionStatus {
                        name: "dc2".into(),
                        established: false,
                        state: "start Active".into(),
                        since: now - 30,
                    },
                ],
            });
        }
        let text = render(&r);
        assert!(
            text.contains("\nbgp session dc: established since 10m ago\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nbgp session dc2: WARNING not established (start Active) since 30s ago: the \
                 router does not route to this hub's peers\n"
            ),
            "{text}"
        );
        r.announced = None;
        assert!(!render(&r).contains("bgp:"));
    }

    #[test]
    fn what_runs_out_soon_is_shown_as_a_warning() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut r = StatusReport {
            role: "spoke".into(),
            state: "running".into(),
            certificate: Some(komnet_proto::status::CertificateStatus {
                serial: "AB".into(),
                not_after: now + 5 * 86_400,
                renew_after: now + 86_400,
            }),
            policy: Some(komnet_proto::status::PolicyStatus {
                version: 3,
                name: "Landkreis".into(),
                installed_at: now - 86_400,
                not_before: Some(now - 86_400),
                expires: Some(now + 29 * 86_400),
            }),
            ..StatusReport::default()
        };
        assert!(!render(&r).contains("WARNING"), "{}", render(&r));
        if let Some(c) = r.certificate.as_mut() {
            c.renew_after = now - 60;
            c.not_after = now + 2 * 86_400;
        }
        if let Some(p) = r.policy.as_mut() {
            p.not_before = Some(now - 29 * 86_400);
            p.expires = Some(now + 3 * 86_400);
        }
        let text = render(&r);
        assert!(
            text.contains("certificate: WARNING less than a third of its lifetime left"),
            "{text}"
        );
        assert!(
            text.contains("policy: WARNING version 3 is valid only for 3d more"),
            "{text}"
        );
    }

    #[test]
    fn reports_of_gateways_without_lan_addresses_still_parse() {
        let mut v = serde_json::to_value(StatusReport::default()).unwrap();
        v.as_object_mut().unwrap().remove("lan_addresses");
        let r: StatusReport = serde_json::from_value(v).unwrap();
        assert!(r.lan_addresses.is_empty());
    }
}
