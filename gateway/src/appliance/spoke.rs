//! The spoke driver: the hubs as WireGuard peers (the active one carries the routes), the
//! watch that samples the active hub and carries out the spoke core's failover, hub-list
//! refresh and LAN retries, and the LAN: VLAN interfaces, gateway addresses and the DHCP
//! server's configuration.

use super::*;

/// Makes the LAN what the policy in force wants: the VLAN interfaces on the trunk (the first
/// `lan` interface), then (with `lan_addresses`) each segment's gateway address on the
/// interface it arrives on: addresses this process put there before that are no longer wanted
/// (or wanted elsewhere) come off first, then the wanted ones go on (already there is fine).
/// Addresses it did not put there are left alone. A failure does not undo the policy (the
/// firewall is in force either way); it is logged, counted and retried by the spoke watcher.
pub(super) fn sync_lan(ctx: &Ctx) {
    let Some(trunk) = ctx.config.lan.first() else {
        return;
    };
    let _one_at_a_time = ctx.lan_lock.lock();
    let (wanted, put, vlans) = {
        let s = ctx.state.lock();
        (s.lan_wanted.clone(), s.lan_put.clone(), s.lan_vlans.clone())
    };
    let remove: Vec<(String, IpNet)> = put
        .iter()
        .filter(|a| !wanted.contains(a))
        .cloned()
        .collect();
    // Each interface on its own: a port the policy names that this appliance lacks (or a
    // VLAN the trunk refuses) must not keep the other segments from their gateway address.
    let mut failures: Vec<String> = Vec::new();
    for iface in interfaces_of(&remove) {
        let gone: Vec<IpNet> = on(&remove, &iface);
        if let Err(e) = net::set_lan_addresses(&iface, &[], &gone, false) {
            failures.push(e.to_string());
        }
    }
    match net::sync_vlans(trunk, &vlans) {
        Ok(true) => {
            tracing::info!(trunk = %trunk, vlans = ?vlans.iter().map(|(n, id)| format!("{n} (VLAN {id})")).collect::<Vec<_>>(), "VLAN interfaces set");
        }
        Ok(false) => {}
        Err(e) => failures.push(e.to_string()),
    }
    for iface in interfaces_of(&wanted) {
        if let Err(e) = net::set_lan_addresses(&iface, &on(&wanted, &iface), &[], true) {
            failures.push(e.to_string());
        }
    }
    // The DHCP server's configuration, once the gateway addresses it hands out as routers are
    // on the LAN.
    if let Some(path) = &ctx.config.dhcp_config {
        let (conf, served) = {
            let s = ctx.state.lock();
            (s.dhcp_wanted.clone(), s.dhcp_served.clone())
        };
        match dhcp::write_config(path, conf.as_deref()) {
            Ok(true) => {
                tracing::info!(file = %path.display(), served = ?served, "DHCP configuration written")
            }
            Ok(false) => {}
            Err(e) => failures.push(e),
        }
    }
    let mut s = ctx.state.lock();
    if failures.is_empty() {
        {
            let retried = s.spoke.as_ref().is_some_and(SpokeCore::lan_retry_pending);
            if s.lan_put != wanted || retried {
                tracing::info!(addresses = ?wanted.iter().map(|(i, a)| format!("{a} on {i}")).collect::<Vec<_>>(), removed = ?remove.iter().map(|(i, a)| format!("{a} on {i}")).collect::<Vec<_>>(), "LAN addresses set");
            }
            s.lan_put = wanted;
            s.lan_errors.clear();
            if let Some(core) = s.spoke.as_mut() {
                core.handle_lan_result(true);
            }
        }
    } else {
        {
            // Which lines failed is not known: everything that may be there is remembered, so
            // that a later change takes it off again.
            for a in wanted {
                if !s.lan_put.contains(&a) {
                    s.lan_put.push(a);
                }
            }
            match s.spoke.as_mut() {
                Some(core) => core.handle_lan_result(false),
                None => s.count(ControlEvent::LanAddressesFailed),
            }
            s.lan_errors = failures.clone();
            for e in &failures {
                tracing::error!(error = %e, "cannot set up the LAN (VLAN interfaces, addresses); retrying");
            }
        }
    }
}

/// The interfaces named in `addrs`, each once, in order.
fn interfaces_of(addrs: &[(String, IpNet)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, _) in addrs {
        if !out.contains(i) {
            out.push(i.clone());
        }
    }
    out
}

fn on(addrs: &[(String, IpNet)], iface: &str) -> Vec<IpNet> {
    addrs
        .iter()
        .filter(|(i, _)| i == iface)
        .map(|(_, a)| *a)
        .collect()
}

/// Configures the hubs as peers: the active one carries the data centre's routes and keeps
/// the session warm; the others wait with only their tunnel addresses.
pub(super) fn apply_hubs(ctx: &Ctx) {
    let Some(shared) = ctx.shared.get() else {
        return;
    };
    let (hubs, endpoints, active, allowed) = {
        let s = ctx.state.lock();
        let allowed = s
            .enrollment
            .as_ref()
            .map(|e| e.allowed_ips.clone())
            .unwrap_or_default();
        (
            s.hubs.clone(),
            s.hub_endpoints.clone(),
            s.active_hub(),
            allowed,
        )
    };
    let now = Instant::now();
    {
        let mut core = shared.core();
        for (i, (hub, endpoint)) in hubs.iter().zip(&endpoints).enumerate() {
            let Some(id) = core.upsert_peer(now, *hub.wg_public_key.as_bytes()) else {
                continue;
            };
            if let Some(ep) = endpoint {
                core.set_endpoint(id, *ep);
            }
            core.clear_allowed_ips(id);
            for net in &hub.tunnel_addrs {
                core.add_allowed_ip(id, *net);
            }
            if i == active {
                for net in &allowed {
                    core.add_allowed_ip(id, *net);
                }
                core.set_persistent_keepalive(now, id, Some(ctx.config.keepalive));
            } else {
                core.set_persistent_keepalive(now, id, None);
            }
        }
    }
    shared.flush_pending();
}

/// Resolves each hub's `host:port` (the first address DNS gives; `None` when it has no
/// endpoint or does not resolve, which is logged).
pub(super) async fn resolve_hub_endpoints(hubs: &[HubPeer]) -> Vec<Option<SocketAddr>> {
    let mut out = Vec::with_capacity(hubs.len());
    for hub in hubs {
        let resolved = match hub.endpoint.as_deref() {
            None => None,
            Some(e) => match tokio::net::lookup_host(e).await {
                Ok(mut it) => it.next(),
                Err(err) => {
                    tracing::warn!(endpoint = e, error = %err, "cannot resolve hub endpoint");
                    None
                }
            },
        };
        out.push(resolved);
    }
    out
}

/// Samples the active hub's received bytes every quarter second for the spoke core and carries
/// out what it decides: failover to the next hub, a new handshake, a hub-list refresh, a LAN
/// address retry.
pub(super) async fn spoke_watch(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Some(shared) = ctx.shared.get() else {
            continue;
        };
        let now = Instant::now();
        let active_key = {
            let s = ctx.state.lock();
            s.hubs
                .get(s.active_hub())
                .map(|h| *h.wg_public_key.as_bytes())
        };
        let rx = active_key.map(|key| {
            peer_snapshot(shared)
                .into_iter()
                .find(|p| p.public_key == key)
                .map_or(0, |p| p.rx_bytes)
        });
        let actions = {
            let mut s = ctx.state.lock();
            let Some(core) = s.spoke.as_mut() else {
                continue;
            };
            if let Some(rx) = rx {
                core.handle_active_rx(now, rx);
            }
            if now >= core.next_timeout() {
                core.handle_timeout(now);
            }
            std::iter::from_fn(|| core.poll_action()).collect::<Vec<_>>()
        };
        for action in actions {
            match action {
                SpokeAction::Activate { .. } => apply_hubs(&ctx),
                SpokeAction::Handshake { hub } => handshake_with(&ctx, shared, hub),
                SpokeAction::RetryLan => {
                    let task = ctx.clone();
                    let _ = tokio::task::spawn_blocking(move || sync_lan(&task)).await;
                }
                SpokeAction::RefreshHubs => refresh_hubs(&ctx).await,
            }
        }
    }
}

/// A new handshake with hub `hub` now.
fn handshake_with(ctx: &Ctx, shared: &Shared, hub: usize) {
    let key = ctx
        .state
        .lock()
        .hubs
        .get(hub)
        .map(|h| *h.wg_public_key.as_bytes());
    if let Some(key) = key {
        {
            let mut core = shared.core();
            if let Some(id) = core.peer_id(&key) {
                core.force_handshake(Instant::now(), id);
            }
        }
        shared.flush_pending();
    }
}

/// Fetches the hub list; a changed one is configured (and its routes), and the core learns
/// how many hubs there are.
async fn refresh_hubs(ctx: &Ctx) {
    let Some(enrollment) = current_enrollment(ctx) else {
        return;
    };
    let fetched = async { service_client(ctx, &enrollment)?.fetch_hubs().await };
    match fetched.await {
        Ok(hubs) => {
            // Re-resolved on every refresh: a hub's address may change in DNS.
            let endpoints = resolve_hub_endpoints(&hubs).await;
            let (changed, routes_changed) = {
                let mut s = ctx.state.lock();
                let routes_changed = s.hubs != hubs;
                let changed = routes_changed || s.hub_endpoints != endpoints;
                if changed {
                    s.hubs = hubs.clone();
                    s.hub_endpoints = endpoints;
                    if let Some(core) = s.spoke.as_mut() {
                        core.handle_hubs(hubs.len());
                    }
                }
                (changed, routes_changed)
            };
            if routes_changed {
                let mut routes = enrollment.allowed_ips.clone();
                routes.extend(hubs.iter().flat_map(|h| h.tunnel_addrs.clone()));
                poke_guard(ctx);
                if let Err(e) = net::replace_routes(&ctx.config.interface, &routes) {
                    tracing::warn!(error = %e, "routes to the hubs");
                }
            }
            if changed {
                apply_hubs(ctx);
            }
        }
        Err(e) => tracing::debug!(error = %e, "hub list refresh failed"),
    }
}
