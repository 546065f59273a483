//! What an appliance shows its operators: `/status` (JSON, read by `komnet status`) and
//! `/metrics` (Prometheus text format), served on the configured management address.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use komnet_proto::status::{
    CertificateStatus, FlowShare, PeerStatus, PolicyStatus, RegistryStatus, StatusReport,
    PEER_UP_SECS,
};

/// A label set: names and values in the order they are shown.
type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// One family of one scrape, its rows in the order the report gives them.
#[derive(Debug)]
struct FamilyRows {
    name: String,
    help: String,
    kind: Kind,
    /// `None`: one sample without labels.
    rows: Vec<(Option<Labels>, i64, u64)>,
}

/// The families of one exposition: typed gauges and counters, encoded by `prometheus-client`
/// (names, escaping, `_total` suffixes, the Prometheus 0.0.4 text format). Rows come in the
/// report's order, so the same report always gives the same text.
#[derive(Debug, Default)]
struct Exposition {
    families: Vec<FamilyRows>,
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let kind = match f.kind {
                Kind::Gauge => MetricType::Gauge,
                Kind::Counter => MetricType::Counter,
            };
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, kind)?;
            if let [(None, gauge, counter)] = f.rows.as_slice() {
                match f.kind {
                    Kind::Gauge => ConstGauge::new(*gauge).encode(metric)?,
                    Kind::Counter => ConstCounter::new(*counter).encode(metric)?,
                }
                continue;
            }
            for (labels, gauge, counter) in &f.rows {
                let Some(labels) = labels else { continue };
                let sample = metric.encode_family(labels)?;
                match f.kind {
                    Kind::Gauge => ConstGauge::new(*gauge).encode(sample)?,
                    Kind::Counter => ConstCounter::new(*counter).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

impl Exposition {
    fn push(&mut self, name: &str, help: &str, kind: Kind, rows: Vec<(Option<Labels>, i64, u64)>) {
        self.families.push(FamilyRows {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            rows,
        });
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.push(name, help, Kind::Gauge, vec![(None, value, 0)]);
    }

    fn gauges(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, i64)>) {
        let rows = rows.into_iter().map(|(l, v)| (Some(l), v, 0)).collect();
        self.push(name, help, Kind::Gauge, rows);
    }

    /// A counter family; `name` without `_total`, which the encoder appends. The values are
    /// the appliance's own monotonic counts as they are at the scrape.
    fn counters(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let rows = rows.into_iter().map(|(l, v)| (Some(l), 0, v)).collect();
        self.push(name, help, Kind::Counter, rows);
    }

    fn finish(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// The content type of [`to_prometheus`]'s text.
pub const METRICS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

fn opt(value: Option<&str>) -> String {
    value.unwrap_or("").to_owned()
}

/// The Prometheus text exposition of a report at `now` (Unix seconds).
pub fn to_prometheus(report: &StatusReport, now: i64) -> String {
    let this = report;
    let mut x = Exposition::default();

    x.gauges(
        "komnet_info",
        "The appliance's role and identity.",
        [(
            vec![
                ("role", this.role.clone()),
                ("tenant", opt(this.tenant.as_deref())),
                ("site", opt(this.site.as_deref())),
                ("state", this.state.clone()),
            ],
            1,
        )],
    );

    let mut by_tenant: BTreeMap<(String, String, &str), i64> = BTreeMap::new();
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
    x.gauges(
        "komnet_peers",
        "Peers by tenant, role and state (up: handshake within 180 s).",
        by_tenant.into_iter().map(|((tenant, role, state), n)| {
            (
                vec![
                    ("tenant", tenant),
                    ("role", role),
                    ("state", state.to_owned()),
                ],
                n,
            )
        }),
    );

    let peer_labels = |p: &PeerStatus| -> Labels {
        vec![
            ("tenant", opt(p.tenant.as_deref())),
            ("site", opt(p.site.as_deref())),
            ("role", opt(p.role.as_deref())),
        ]
    };
    x.gauges(
        "komnet_peer_last_handshake_seconds",
        "Unix time of the peer's last completed handshake.",
        this.peers
            .iter()
            .filter_map(|p| Some((peer_labels(p), p.last_handshake?))),
    );
    x.counters(
        "komnet_peer_rx_bytes",
        "Bytes received from the peer (encrypted).",
        this.peers.iter().map(|p| (peer_labels(p), p.rx_bytes)),
    );
    x.counters(
        "komnet_peer_tx_bytes",
        "Bytes sent to the peer (encrypted).",
        this.peers.iter().map(|p| (peer_labels(p), p.tx_bytes)),
    );
    x.gauges(
        "komnet_peer_certificate_expiry_seconds",
        "Unix time the peer's certificate expires.",
        this.peers
            .iter()
            .filter_map(|p| Some((peer_labels(p), p.cert_not_after?))),
    );
    x.counters(
        "komnet_drops",
        "Packets dropped, by reason (WireGuard layer and policy firewall).",
        this.drops
            .iter()
            .map(|(reason, n)| (vec![("reason", reason.clone())], *n)),
    );
    x.counters(
        "komnet_events",
        "Control-plane and firewall events: registry changes, admissions, renewals, policy installs and refusals, failovers, new flows, evictions.",
        this.counters
            .iter()
            .map(|(event, n)| (vec![("event", event.clone())], *n)),
    );
    if let Some(flows) = this.flows {
        x.gauge(
            "komnet_flows",
            "Flows the hub firewall remembers.",
            flows as i64,
        );
    }
    // Per owner of flows: each peer (labelled with its key too, as several home offices of
    // one tenant share the other labels) and the data centre.
    let owners: Vec<(Labels, FlowShare)> = this
        .peers
        .iter()
        .filter_map(|p| {
            let share = p.flows?;
            let mut labels = peer_labels(p);
            labels.push(("key", p.public_key.clone()));
            Some((labels, share))
        })
        .chain(this.datacentre_flows.map(|d| {
            (
                vec![
                    ("tenant", String::new()),
                    ("site", String::new()),
                    ("role", "datacentre".to_owned()),
                    ("key", String::new()),
                ],
                d,
            )
        }))
        .collect();
    if !owners.is_empty() {
        x.gauges(
            "komnet_flow_owner_flows",
            "Hub: flows each peer (or the data centre) started that the firewall remembers.",
            owners.iter().map(|(l, s)| (l.clone(), s.flows as i64)),
        );
        x.counters(
            "komnet_flow_owner_evicted",
            "Hub: flows a peer (or the data centre) lost because the table was full; it loses its own oldest when it holds its share or more (an attacker's count grows, others' stay).",
            owners.iter().map(|(l, s)| (l.clone(), s.evicted)),
        );
    }
    x.gauge(
        "komnet_policy_version",
        "Version of the policy in force (0: none yet, forwarding nothing).",
        this.policy.as_ref().map_or(0, |p| p.version as i64),
    );
    if let Some(p) = &this.policy {
        x.gauge(
            "komnet_policy_age_seconds",
            "Seconds since the policy in force was installed here.",
            (now - p.installed_at).max(0),
        );
    }
    if let Some(r) = &this.registry {
        x.gauge(
            "komnet_registry_connected",
            "Hub: 1 while it follows the registry (the source of revocations), else 0.",
            i64::from(r.state == "connected"),
        );
        x.gauge(
            "komnet_registry_state_since_seconds",
            "Hub: Unix time the registry link was connected, or was lost.",
            r.since,
        );
        if r.state != "connected" {
            x.gauge(
                "komnet_registry_outage_seconds",
                "Hub: how long the registry has been unreachable.",
                (now - r.since).max(0),
            );
        }
        x.gauge(
            "komnet_registry_outage_alarm",
            "Hub: 1 while the registry outage lasts beyond registry_outage_alarm (revocations made meanwhile are not heard).",
            i64::from(r.alarm),
        );
        if let Some(v) = r.version {
            x.gauge(
                "komnet_registry_version",
                "Hub: the registry version applied.",
                v as i64,
            );
        }
        if let Some(t) = r.last_event {
            x.gauge(
                "komnet_registry_last_event_seconds",
                "Hub: Unix time of the last registry event received.",
                t,
            );
        }
    }
    if let Some(a) = &this.announced {
        x.gauge(
            "komnet_announced_prefixes",
            "Hub with [bgp]: prefixes in its announcement table (those of the peers sending to it now).",
            a.prefixes.len() as i64,
        );
        if let Some(b) = &a.sessions {
            x.gauge(
                "komnet_bgp_watch_ok",
                "Hub with [bgp] bird_socket: 1 when the last read of BIRD's sessions worked.",
                i64::from(b.error.is_none()),
            );
            x.gauges(
                "komnet_bgp_session_established",
                "Hub with [bgp] bird_socket: 1 while the BGP session (BIRD's protocol name) is Established.",
                b.sessions.iter().map(|session| {
                    (
                        vec![("session", session.name.clone())],
                        i64::from(session.established),
                    )
                }),
            );
        }
    }
    if let Some(c) = &this.certificate {
        x.gauge(
            "komnet_certificate_expiry_seconds",
            "Unix time this appliance's own certificate expires.",
            c.not_after,
        );
    }
    if let Some(end) = this.policy.as_ref().and_then(|p| p.expires) {
        x.gauge(
            "komnet_policy_expiry_seconds",
            "Unix time the policy bundle in force stops being valid (komnet policy bundle --valid-for).",
            end,
        );
    }
    let mut expiring = Vec::new();
    if let Some(c) = &this.certificate {
        expiring.push((
            vec![("what", "certificate".to_owned())],
            i64::from(c.expiring(now)),
        ));
    }
    if let Some(p) = this.policy.as_ref().filter(|p| p.expires.is_some()) {
        expiring.push((
            vec![("what", "policy".to_owned())],
            i64::from(p.expiring(now)),
        ));
    }
    x.gauges(
        "komnet_expiring",
        "1 when less than a third of the lifetime of what the appliance holds is left (certificate: renewal keeps failing; policy: a new bundle must be signed and published).",
        expiring,
    );
    x.finish()
}

// ---- the report and its server -------------------------------------------------------------

use super::*;

/// Drop counts of peers that left the peer table. `komnet_drops_total` is a counter: it must
/// never go down, but a removed peer takes its own counters with it, so they are kept here
/// when it goes (under the same locks as the removal) and added to every report.
#[derive(Debug, Clone, Default)]
pub struct RetiredDrops(Vec<u64>);

impl RetiredDrops {
    /// Keeps a departing peer's counts.
    pub fn retire(&mut self, counters: &crate::core::DropCounters) {
        if self.0.len() < DropReason::ALL.len() {
            self.0.resize(DropReason::ALL.len(), 0);
        }
        for reason in DropReason::ALL {
            self.0[*reason as usize] += counters.get(*reason);
        }
    }

    /// Drops by reason: the device's, the live peers', and those of peers gone.
    pub fn totals(
        &self,
        core: &Core,
        peers: impl IntoIterator<Item = PeerId> + Clone,
    ) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for reason in DropReason::ALL {
            let mut n = core.device_drops().get(*reason);
            n += self.0.get(*reason as usize).copied().unwrap_or(0);
            for id in peers.clone() {
                n += core.peer_drops(id).map_or(0, |d| d.get(*reason));
            }
            if n > 0 {
                out.insert(reason.as_str(), n);
            }
        }
        out
    }
}

pub(super) fn report(ctx: &Ctx) -> StatusReport {
    // The state first (lock order: state, gate, core): a peer removed meanwhile is counted
    // either live or retired, never both or neither.
    let s = ctx.state.lock();
    let peers = ctx
        .shared
        .get()
        .map(|s| peer_snapshot(s))
        .unwrap_or_default();
    let mut shares: HashMap<PeerId, FlowShare> = HashMap::new();
    let mut tunnel_drops: HashMap<PeerId, u64> = HashMap::new();
    let mut datacentre_flows = None;
    let (flows, mut drops, mut counters) = match ctx.shared.get() {
        Some(shared) => {
            let (gate, core) = shared.gate_and_core();
            for p in &peers {
                if let Some(d) = core.peer_drops(p.id) {
                    tunnel_drops.insert(p.id, d.total());
                }
            }
            if let Some(g) = gate.as_ref() {
                let share = |s: crate::firewall::OwnerStats| FlowShare {
                    flows: s.flows,
                    evicted: s.evicted,
                    denied: s.denied,
                };
                for p in &peers {
                    shares.insert(p.id, share(g.owner_stats(FlowOwner::Peer(p.id))));
                }
                datacentre_flows = Some(share(g.owner_stats(FlowOwner::DataCentre)));
            }
            let mut drops: BTreeMap<String, u64> = s
                .retired_drops
                .totals(&core, peers.iter().map(|p| p.id))
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            let mut counters = BTreeMap::new();
            let flows = gate.as_ref().map(|g| {
                let c = g.counters();
                for (k, v) in &c.drops {
                    drops.insert((*k).to_owned(), *v);
                }
                if g.no_policy_drops() > 0 {
                    drops.insert("no_policy".into(), g.no_policy_drops());
                }
                for (k, v) in [
                    ("flow_new", c.new_flows),
                    ("flow_established_packet", c.established_packets),
                    ("flow_related_icmp", c.related_icmp),
                    ("flow_expired", c.expired),
                    ("flow_evicted", c.evicted),
                    ("flow_cut_by_policy", c.cut_by_policy),
                    ("flow_cut_peer_removed", c.cut_peer_removed),
                ] {
                    counters.insert(k.to_owned(), v);
                }
                g.flow_count()
            });
            (flows, drops, counters)
        }
        None => (None, BTreeMap::new(), BTreeMap::new()),
    };
    counters.extend(s.all_counters());
    // Spoke: what its nftables table dropped (read by the guard every second).
    for (reason, n) in s.nft_drops.totals() {
        *drops.entry(reason).or_default() += n;
    }
    drops.retain(|_, v| *v > 0);
    let identity = s.enrollment.as_ref().map(|e| &e.identity);
    let active_key = s
        .hubs
        .get(s.active_hub())
        .map(|h| *h.wg_public_key.as_bytes());
    let peers = peers
        .into_iter()
        .map(|p| {
            let admitted = s.hub.as_ref().and_then(|h| h.registered(&p.public_key));
            let hub = s
                .hubs
                .iter()
                .find(|h| h.wg_public_key.as_bytes() == &p.public_key);
            PeerStatus {
                public_key: B64.encode(p.public_key),
                tenant: admitted.map(|a| a.tenant.to_string()),
                site: admitted
                    .map(|a| a.site.to_string())
                    .or_else(|| hub.map(|h| h.site.as_str().to_owned())),
                role: admitted
                    .map(|a| a.role.as_str().to_owned())
                    .or_else(|| hub.map(|_| "hub".to_owned())),
                endpoint: p.endpoint.map(|e| e.to_string()),
                last_handshake: p
                    .last_handshake
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                cert_not_after: admitted.map(|a| a.not_after),
                active: active_key == Some(p.public_key),
                flows: shares.get(&p.id).copied(),
                drops: tunnel_drops.get(&p.id).copied().unwrap_or(0),
            }
        })
        .collect();
    StatusReport {
        role: match ctx.config.role {
            GatewayRole::Hub => "hub".into(),
            GatewayRole::Spoke => "spoke".into(),
        },
        state: s.state.clone(),
        interface: ctx.config.interface.clone(),
        listen_port: ctx.shared.get().map_or(0, |sh| sh.sockets().port()),
        tenant: identity.map(|i| i.tenant.as_str().to_owned()),
        site: identity.map(|i| i.site.as_str().to_owned()),
        tunnel_addrs: identity
            .map(|i| i.tunnel_addrs.iter().map(|a| a.to_string()).collect())
            .unwrap_or_default(),
        lan_addresses: s.lan_put.iter().map(|(_, a)| a.to_string()).collect(),
        lan_errors: s.lan_errors.clone(),
        dhcp: if ctx.config.dhcp_config.is_some() {
            s.dhcp_served.clone()
        } else {
            Vec::new()
        },
        certificate: s.enrollment.as_ref().map(|e| CertificateStatus {
            serial: e.identity.serial.clone(),
            not_after: e.identity.not_after,
            renew_after: e.renew_after,
        }),
        policy: s.policy.as_ref().map(|(c, b)| PolicyStatus {
            version: c.version(),
            name: b.name.clone(),
            installed_at: s.slot.in_force().map_or(0, |p| p.installed_at),
            not_before: b.not_before,
            expires: b.expires,
        }),
        policy_error: s.slot.error().map(str::to_owned),
        peers,
        flows,
        datacentre_flows,
        drops,
        counters,
        registry: s.hub.as_ref().map(registry_status),
        announced: ctx
            .config
            .bgp
            .as_ref()
            .map(|bgp| komnet_proto::status::Announced {
                table: bgp.table,
                prefixes: s
                    .announcer
                    .as_ref()
                    .map(|a| a.announced().map(ToString::to_string).collect())
                    .unwrap_or_default(),
                sessions: s.bgp_sessions.clone(),
            }),
    }
}

/// The hub's registry link in wall-clock terms.
fn registry_status(hub: &HubCore) -> RegistryStatus {
    let now = Instant::now();
    let unix = unix_now();
    let at = |t: Instant| unix - now.saturating_duration_since(t).as_secs() as i64;
    let link = hub.link();
    let (state, since) = match (link.state(), link.down_since()) {
        (LinkState::Following { since, .. }, _) => ("connected", *since),
        (LinkState::Connecting { .. }, Some(down)) => ("connecting", down),
        (_, down) => ("unreachable", down.unwrap_or(now)),
    };
    let settings = hub.outage_settings();
    RegistryStatus {
        state: state.to_owned(),
        since: at(since),
        version: link.version(),
        last_event: link.last_event().map(at),
        alarm: hub.alarmed(),
        alarm_after_secs: settings.alarm_after.as_secs(),
        on_outage: settings.policy.as_str().to_owned(),
    }
}

/// Serves `GET /metrics` and `GET /status` on the management address: a bare HTTP/1 server,
/// one task per connection, each connection closed after a minute.
pub(super) async fn serve_status(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "status server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, std::convert::Infallible>(status_answer(ctx, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

pub(super) async fn status_answer(
    ctx: Arc<Ctx>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::{header, Method, StatusCode};
    let respond = |status: StatusCode, content_type: &'static str, body: Vec<u8>| {
        let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        resp
    };
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            b"only GET\n".to_vec(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let text = tokio::task::spawn_blocking(move || {
                status::to_prometheus(&report(&ctx), unix_now())
            })
            .await
            .unwrap_or_default();
            respond(StatusCode::OK, METRICS_CONTENT_TYPE, text.into_bytes())
        }
        "/status" => {
            let r = tokio::task::spawn_blocking(move || report(&ctx))
                .await
                .unwrap_or_default();
            respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&r).unwrap_or_default(),
            )
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            b"not found: /metrics or /status\n".to_vec(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A removed peer's drops stay in `komnet_drops_total` (it used to sum live peers only,
    /// so the counter went down when a peer was revoked).
    #[test]
    fn drop_totals_never_go_down_when_a_peer_is_removed() {
        let now = std::time::Instant::now();
        let mut core = Core::new(now, [7; 32]);
        core.set_private_key(now, Some([1; 32]));
        let id = core.upsert_peer(now, [2; 32]).unwrap();
        core.add_allowed_ip(id, "10.0.0.0/24".parse().unwrap());
        // An IPv4 packet for the peer, which has no endpoint yet: dropped on its account.
        let packet = [
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 5,
        ];
        let mut out = vec![0u8; 2048];
        for _ in 0..3 {
            core.handle_tun_packet(now, &packet, &mut out);
        }
        let mut retired = RetiredDrops::default();
        let before = retired.totals(&core, [id]);
        assert_eq!(before.get("no_endpoint"), Some(&3), "{before:?}");

        retired.retire(core.peer_drops(id).unwrap());
        core.remove_peer(id);
        assert_eq!(retired.totals(&core, []), before);
        // What the bare sum over the live peers shows after the removal: the counter went down.
        let bare = RetiredDrops::default().totals(&core, []);
        assert_eq!(bare.get("no_endpoint"), None);
    }

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
                denied: 7,
            }),
            drops: 2,
        });
        r.datacentre_flows = Some(FlowShare {
            flows: 4,
            evicted: 0,
            denied: 0,
        });
        r.drops.insert("policy_default_deny".into(), 3);
        r.registry = Some(RegistryStatus {
            state: "connecting".into(),
            since: 400,
            version: None,
            last_event: Some(350),
            alarm: true,
            alarm_after_secs: 300,
            on_outage: "keep-peers".into(),
        });
        r.announced = Some(komnet_proto::status::Announced {
            table: 200,
            prefixes: vec!["10.30.0.0/16".into(), "10.96.4.1/32".into()],
            sessions: Some(komnet_proto::status::BgpSessions {
                checked: 990,
                error: None,
                sessions: vec![komnet_proto::status::BgpSessionStatus {
                    name: "dc".into(),
                    established: false,
                    state: "start Active".into(),
                    since: 900,
                }],
            }),
        });
        let text = to_prometheus(&r, 1000);
        for needle in [
            "komnet_announced_prefixes 2\n",
            "komnet_bgp_watch_ok 1\n",
            "komnet_bgp_session_established{session=\"dc\"} 0\n",
            "komnet_registry_connected 0\n",
            "komnet_registry_outage_seconds 600\n",
            "komnet_registry_outage_alarm 1\n",
            "komnet_registry_last_event_seconds 350\n",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        assert!(!text.contains("komnet_registry_version"), "{text}");
        assert!(
            text.contains("komnet_peers{tenant=\"noh\\\"felden\",role=\"spoke\",state=\"up\"} 1")
        );
        assert!(text.contains("komnet_drops_total{reason=\"policy_default_deny\"} 3"));
        assert!(text.contains("komnet_policy_version 0"), "{text}");
        assert!(
            text.contains("# TYPE komnet_drops_total counter\n"),
            "{text}"
        );
        assert!(text.contains(
            "# HELP komnet_drops_total Packets dropped, by reason (WireGuard layer and policy firewall).\n"
        ));
        assert!(
            text.contains("komnet_info{role=\"hub\",tenant=\"\",site=\"\",state=\"running\"} 1\n")
        );
        assert!(text.contains("komnet_peer_rx_bytes_total{tenant=\"noh\\\"felden\",site=\"rathaus\",role=\"spoke\"} 5\n"), "{text}");
        // The same report gives the same text (rows in the report's order, no hashing).
        assert_eq!(to_prometheus(&r, 1000), text);
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
        // Less than a third of the certificate's lifetime left (renewal due since 900):
        // expiring; the policy without a validity window is not listed.
        r.certificate = Some(CertificateStatus {
            serial: "AB".into(),
            not_after: 1200,
            renew_after: 900,
        });
        let text = to_prometheus(&r, 1000);
        assert!(
            text.contains("komnet_expiring{what=\"certificate\"} 1\n"),
            "{text}"
        );
        r.policy = Some(PolicyStatus {
            version: 2,
            name: "x".into(),
            installed_at: 0,
            not_before: Some(0),
            expires: Some(3000),
        });
        let text = to_prometheus(&r, 1000);
        assert!(
            text.contains("komnet_expiring{what=\"policy\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("komnet_policy_expiry_seconds 3000\n"),
            "{text}"
        );
        let text = to_prometheus(&r, 2001);
        assert!(
            text.contains("komnet_expiring{what=\"policy\"} 1\n"),
            "{text}"
        );
    }
}
