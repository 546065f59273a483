//! The hub driver: follows the registry and feeds the hub core, applies its peer changes to
//! the packet path, expires certificates on the core's timer and routes a peer's addresses
//! here when it completes a handshake.

use super::*;

// ---- hub -----------------------------------------------------------------------------------

/// Applies admission changes to the peer table and the gate (both locked by the caller).
/// Returns the keys that were removed, whose routes the caller releases.
pub(super) fn apply_peer_changes(
    ctx: &Ctx,
    gate: &mut Gate,
    core: &mut Core,
    retired: &mut RetiredDrops,
    changes: &[PeerChange],
) -> Vec<[u8; 32]> {
    let now = Instant::now();
    let mut removed = Vec::new();
    for change in changes {
        match change {
            PeerChange::Upsert {
                key,
                allowed_ips,
                identity,
            } => {
                let Some(id) = core.upsert_peer(now, *key) else {
                    tracing::error!("peer table full; peer not admitted");
                    continue;
                };
                core.clear_allowed_ips(id);
                for net in allowed_ips {
                    core.add_allowed_ip(id, *net);
                }
                gate.set_identity(id, *identity);
                // Spokes hear from the hub every keepalive interval: that is how they notice
                // a hub that stopped. Home-office devices (phones, laptops) are spared.
                let keepalive = (identity.role == Role::Spoke).then_some(ctx.config.keepalive);
                core.set_persistent_keepalive(now, id, keepalive);
            }
            PeerChange::Remove { key } => {
                if let Some(id) = core.peer_id(key) {
                    gate.forget(id);
                    if let Some(drops) = core.peer_drops(id) {
                        retired.retire(drops);
                    }
                    core.remove_peer(id);
                }
                removed.push(*key);
            }
        }
    }
    removed
}

pub(super) fn release_routes(ctx: &Ctx, keys: &[[u8; 32]]) {
    let mut nets = Vec::new();
    {
        let mut s = ctx.state.lock();
        for k in keys {
            if let Some((_, routes)) = s.claimed.remove(k) {
                nets.extend(routes);
            }
        }
    }
    if let Err(e) = net::delete_routes(&ctx.config.interface, &nets) {
        tracing::warn!(error = %e, "removing routes of departed peers");
    }
}

/// Decides peer changes on the control state and applies them to the gate and the core while
/// the state is still locked (lock order: state, gate, core): a policy swap cannot slip in
/// between resolving an identity against one version and applying it under another.
pub(super) fn change_peers(ctx: &Ctx, decide: impl FnOnce(&mut ControlState) -> Vec<PeerChange>) {
    let Some(shared) = ctx.shared.get() else {
        return;
    };
    let removed = {
        let mut s = ctx.state.lock();
        let changes = decide(&mut s);
        if changes.is_empty() {
            return;
        }
        let (gate, mut core) = shared.gate_and_core();
        let Some(mut gate) = gate else {
            return;
        };
        apply_peer_changes(ctx, &mut gate, &mut core, &mut s.retired_drops, &changes)
    };
    shared.flush_pending();
    release_routes(ctx, &removed);
}

/// The hub core, which exists from the start on a hub.
fn hub_core(s: &mut ControlState) -> &mut HubCore {
    s.hub.get_or_insert_with(|| HubCore::new(Instant::now()))
}

/// Follows the registry: a snapshot, then its change stream; when the link is lost, the hub
/// core says when to connect again.
pub(super) async fn follow_registry(ctx: Arc<Ctx>) {
    loop {
        let connect = {
            let mut s = ctx.state.lock();
            let core = hub_core(&mut s);
            if core.poll_connect(Instant::now()) {
                None
            } else {
                Some(core.link().next_timeout())
            }
        };
        match connect {
            None => {}
            Some(at) => {
                let at = at.unwrap_or_else(|| Instant::now() + Duration::from_millis(250));
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                continue;
            }
        }
        if let Err(e) = follow_once(&ctx).await {
            tracing::warn!(error = %e, "registry connection lost; reconnecting");
        }
        hub_core(&mut ctx.state.lock()).handle_registry_lost(Instant::now());
    }
}

async fn follow_once(ctx: &Arc<Ctx>) -> Result<()> {
    let enrollment = current_enrollment(ctx).ok_or_else(|| anyhow!("not enrolled"))?;
    let snapshot = client::registry_snapshot(&enrollment).await?;
    change_peers(ctx, |s| {
        hub_core(s).handle_snapshot(Instant::now(), unix_now(), &snapshot)
    });
    tracing::info!(
        version = snapshot.version,
        peers = snapshot.peers.len(),
        "registry snapshot applied"
    );
    let mut follower = client::follow_registry(&enrollment, snapshot.version).await?;
    while let Some(event) = follower.next().await {
        let event = event?;
        change_peers(ctx, |s| {
            hub_core(s).handle_registry_event(Instant::now(), unix_now(), &event)
        });
    }
    bail!("the registry stream ended")
}

/// Expiry of peer certificates, and routes that follow handshakes: a peer's addresses are
/// routed into this hub's tunnel when the peer completes a handshake here (after a spoke
/// fails over, the hub it moved to takes its routes).
pub(super) async fn hub_housekeeping(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(4) {
            if let Err(e) = keep_reverse_path(&ctx) {
                tracing::error!(error = %e, "reverse-path filtering");
            }
        }
        let now = Instant::now();
        let due = {
            let mut s = ctx.state.lock();
            now >= hub_core(&mut s).next_timeout()
        };
        if due {
            change_peers(&ctx, |s| hub_core(s).handle_timeout(now, unix_now()));
        }
        claim_routes(&ctx);
    }
}

pub(super) fn peer_snapshot(shared: &Shared) -> Vec<PeerInfo> {
    shared.core().peers(Instant::now(), SystemTime::now())
}

pub(super) fn claim_routes(ctx: &Ctx) {
    let Some(shared) = ctx.shared.get() else {
        return;
    };
    let peers = peer_snapshot(shared);
    let mut claims: Vec<([u8; 32], SystemTime, Vec<IpNet>)> = Vec::new();
    {
        let s = ctx.state.lock();
        for p in peers {
            let Some(at) = p.last_handshake else {
                continue;
            };
            let fresh = match s.claimed.get(&p.public_key) {
                Some((t, routes)) => *t != at || *routes != p.allowed_ips,
                None => true,
            };
            if fresh {
                claims.push((p.public_key, at, p.allowed_ips));
            }
        }
    }
    for (key, at, routes) in claims {
        match net::replace_routes(&ctx.config.interface, &routes) {
            Ok(()) => {
                ctx.state.lock().claimed.insert(key, (at, routes));
            }
            Err(e) => tracing::warn!(error = %e, "routing a peer's addresses"),
        }
    }
}
