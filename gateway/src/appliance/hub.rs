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
    s.hub
        .get_or_insert_with(|| HubCore::new(Instant::now(), OutageSettings::default(), 1))
}

/// Follows the registry: a snapshot, then its change stream; the hub core says when the link
/// is dead (an error, the stream's end, missed keep-alives, an attempt that hangs) and when to
/// connect again.
pub(super) async fn follow_registry(ctx: Arc<Ctx>) {
    loop {
        let wait = {
            let mut s = ctx.state.lock();
            let core = hub_core(&mut s);
            if core.poll_connect(Instant::now()) {
                None
            } else {
                Some(core.link().next_timeout())
            }
        };
        if let Some(at) = wait {
            let at = at.unwrap_or_else(|| Instant::now() + Duration::from_millis(250));
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            continue;
        }
        let why = match follow_once(&ctx).await {
            Ok(why) => {
                tracing::warn!(reason = %why, "registry link given up; reconnecting");
                why
            }
            Err(e) => {
                tracing::warn!(error = %e, "registry connection lost; reconnecting");
                LinkLoss::Failed
            }
        };
        hub_core(&mut ctx.state.lock()).handle_registry_lost(Instant::now(), why);
    }
}

/// Waits for `work` unless the link's deadline passes first (checked again whenever it was
/// moved by something heard): `Err(loss)` then.
async fn before_link_deadline<T>(
    ctx: &Ctx,
    work: impl std::future::Future<Output = T>,
) -> std::result::Result<T, LinkLoss> {
    tokio::pin!(work);
    loop {
        let (deadline, expired) = {
            let mut s = ctx.state.lock();
            let link = hub_core(&mut s).link();
            (link.deadline(), link.expired(Instant::now()))
        };
        if let Some(why) = expired {
            return Err(why);
        }
        let Some(deadline) = deadline else {
            return Ok(work.await);
        };
        tokio::select! {
            out = &mut work => return Ok(out),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
        }
    }
}

/// Tells the enrollment service every 15 s how this hub's peers are doing (last handshake,
/// traffic, refusals), for the web console's fleet page. A failure is logged once until a
/// report is taken again; nothing else depends on it.
pub(super) async fn report_peers(ctx: Arc<Ctx>) {
    let every = Duration::from_secs(komnet_proto::status::HUB_REPORT_SECS);
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        let Some(enrollment) = current_enrollment(&ctx) else {
            continue;
        };
        let report = komnet_proto::status::HubReport::of(&super::status::report(&ctx));
        let sent = async {
            let service = service_client(&ctx, &enrollment)?;
            service.report_hub(&report).await
        };
        match tokio::time::timeout(every, sent).await {
            Ok(Ok(())) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("the enrollment service takes the peer reports again");
                }
            }
            Ok(Err(e)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "the enrollment service did not take the peer report (the console's fleet page shows older figures)");
                }
            }
            Err(_) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!("the peer report to the enrollment service timed out");
                }
            }
        }
    }
}

/// One connection: the snapshot, then the stream until it fails. `Ok(why)` when the core gave
/// the link up, `Err` when the connection did.
async fn follow_once(ctx: &Arc<Ctx>) -> Result<LinkLoss> {
    let enrollment = current_enrollment(ctx).ok_or_else(|| anyhow!("not enrolled"))?;
    // The snapshot's connection carries the stream after it.
    let service = service_client(ctx, &enrollment)?;
    let snapshot = match before_link_deadline(ctx, service.registry_snapshot()).await {
        Ok(snapshot) => snapshot?,
        Err(why) => return Ok(why),
    };
    change_peers(ctx, |s| {
        hub_core(s).handle_snapshot(Instant::now(), unix_now(), &snapshot)
    });
    tracing::info!(
        version = snapshot.version,
        peers = snapshot.peers.len(),
        "registry snapshot applied"
    );
    let follow = service.follow_registry(snapshot.version);
    let mut follower = match before_link_deadline(ctx, follow).await {
        Ok(follower) => follower?,
        Err(why) => return Ok(why),
    };
    hub_core(&mut ctx.state.lock()).handle_stream_open(Instant::now(), follower.keepalive);
    loop {
        let item = match before_link_deadline(ctx, follower.next_item()).await {
            Ok(Some(item)) => item?,
            Ok(None) => bail!("the registry stream ended"),
            Err(why) => return Ok(why),
        };
        match item {
            client::RegistryItem::KeepAlive => {
                hub_core(&mut ctx.state.lock()).handle_keepalive(Instant::now())
            }
            client::RegistryItem::Event(event) => change_peers(ctx, |s| {
                hub_core(s).handle_registry_event(Instant::now(), unix_now(), &event)
            }),
        }
    }
}

/// Expiry of peer certificates, and routes that follow handshakes: a peer's addresses are
/// routed into this hub's tunnel when the peer completes a handshake here (after a spoke
/// fails over, the hub it moved to takes its routes).
pub(super) async fn hub_housekeeping(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut ticks = 0u32;
    let mut activity: Vec<PeerActivity> = Vec::new();
    // The allowed-IPs and handshake versions whose routes were all claimed (`None`: check
    // every peer's).
    let mut routes_seen: Option<(u64, u64)> = None;
    let announcing = ctx.config.bgp.is_some();
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
        let Some(shared) = ctx.shared.get() else {
            continue;
        };
        // Handshake and data times only, and only when a handshake completed or allowed IPs
        // changed since the last claim (or, with BGP, for the data times): an idle hub of
        // 10,000 sessions reads two numbers a tick. A peer's prefixes are fetched when they
        // matter.
        let (versions, changed) = {
            let mut core = shared.core();
            let versions = (core.allowed_ips_version(), core.handshakes_version());
            let changed = routes_seen != Some(versions);
            if changed || announcing {
                core.activity_into(now, &mut activity);
            }
            (versions, changed)
        };
        if changed {
            let recheck = routes_seen.map(|(ips, _)| ips) != Some(versions.0);
            if claim_routes(&ctx, shared, &activity, recheck) {
                routes_seen = Some(versions);
            }
        }
        if announcing {
            announce_routes(&ctx, shared, &activity);
        }
    }
}

/// How often a hub reads its BGP sessions from BIRD: a session lost is reported within the
/// failover bound.
const BGP_WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// BIRD answers `show protocols` in milliseconds; one that takes longer is stuck.
const BIRD_TIMEOUT: Duration = Duration::from_secs(2);

/// Hub with `[bgp] bird_socket`: reads the hub machine's BGP sessions every
/// [`BGP_WATCH_INTERVAL`] and reports the ones that went down or came back (log,
/// `bgp_session_down`/`bgp_session_up`, `/status`, `/metrics`). A task of its own, so that a
/// stuck BIRD never holds up the route claims and announcements of `hub_housekeeping`.
pub(super) async fn watch_bgp_sessions(ctx: Arc<Ctx>, socket: std::path::PathBuf) {
    let mut tick = tokio::time::interval(BGP_WATCH_INTERVAL);
    loop {
        tick.tick().await;
        read_and_report_bgp_sessions(&ctx, &socket).await;
    }
}

async fn read_and_report_bgp_sessions(ctx: &Ctx, socket: &std::path::Path) {
    let read = read_bird_sessions(socket).await;
    let (changes, new_error) = {
        let mut s = ctx.state.lock();
        let known = s.bgp_sessions.get_or_insert_with(Default::default);
        let had_error = known.error.clone();
        let changes = control::bird::apply_read(known, read, unix_now());
        let new_error = known
            .error
            .clone()
            .filter(|e| had_error.as_ref() != Some(e));
        for _ in &changes.down {
            s.count(ControlEvent::BgpSessionDown);
        }
        for _ in &changes.up {
            s.count(ControlEvent::BgpSessionUp);
        }
        (changes, new_error)
    };
    for session in &changes.down {
        tracing::error!(
            session = %session.name,
            state = %session.state,
            "BGP session not established: the data-centre router does not route to this hub's \
             peers, while they keep sending through it (docs/operations.md, 'When BGP is down')"
        );
    }
    for name in &changes.up {
        tracing::info!(session = %name, "BGP session established again");
    }
    if let Some(e) = new_error {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot read the BGP sessions from BIRD");
    }
}

/// `show protocols` on BIRD's control socket: its BGP sessions.
async fn read_bird_sessions(
    socket: &std::path::Path,
) -> Result<Vec<control::bird::BgpSession>, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(control::bird::SHOW_PROTOCOLS)
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("BIRD closed the connection before its answer ended".to_owned());
            }
            reply.extend_from_slice(&chunk[..n]);
            if reply.len() > 1 << 20 {
                return Err("BIRD's answer is over 1 MiB".to_owned());
            }
            let text = String::from_utf8_lossy(&reply);
            if control::bird::reply_complete(&text) {
                return control::bird::parse_show_protocols(&text);
            }
        }
    };
    match tokio::time::timeout(BIRD_TIMEOUT, exchange).await {
        Ok(read) => read,
        Err(_) => Err(format!("no answer within {} s", BIRD_TIMEOUT.as_secs())),
    }
}

pub(super) fn peer_snapshot(shared: &Shared) -> Vec<PeerInfo> {
    shared.core().peers(Instant::now(), SystemTime::now())
}

/// Routes into this hub's tunnel the addresses of every peer that completed a handshake since
/// its routes were last claimed, and (with `recheck`, after any allowed IPs changed) of peers
/// whose addresses changed. Returns whether every claim went through.
pub(super) fn claim_routes(
    ctx: &Ctx,
    shared: &Shared,
    activity: &[PeerActivity],
    recheck: bool,
) -> bool {
    // Which peers to look at closer: those with a new handshake, and with `recheck` every
    // claimed one (with the routes claimed for it).
    type Candidate = (PeerId, [u8; 32], Instant, Option<Vec<IpNet>>);
    let mut candidates: Vec<Candidate> = Vec::new();
    {
        let s = ctx.state.lock();
        for p in activity {
            let Some(at) = p.handshake_at else {
                continue;
            };
            match s.claimed.get(&p.public_key) {
                Some((t, _)) if *t != at => candidates.push((p.id, p.public_key, at, None)),
                Some((_, routes)) if recheck => {
                    candidates.push((p.id, p.public_key, at, Some(routes.clone())))
                }
                Some(_) => {}
                None => candidates.push((p.id, p.public_key, at, None)),
            }
        }
    }
    if candidates.is_empty() {
        return true;
    }
    let mut claims: Vec<([u8; 32], Instant, Vec<IpNet>)> = Vec::new();
    {
        let core = shared.core();
        for (id, key, at, claimed) in candidates {
            let routes = core.allowed_ips_of(id);
            if claimed.as_ref() != Some(&routes) {
                claims.push((key, at, routes));
            }
        }
    }
    if claims.is_empty() {
        return true;
    }
    // One `ip -batch` for every claim of this tick: after a hub restart a thousand peers
    // handshake within a second, and one process per peer took seconds of the hub's CPU.
    let all: Vec<IpNet> = claims
        .iter()
        .flat_map(|(_, _, r)| r.iter().copied())
        .collect();
    if net::replace_routes(&ctx.config.interface, &all).is_ok() {
        let mut s = ctx.state.lock();
        for (key, at, routes) in claims {
            s.claimed.insert(key, (at, routes));
        }
        return true;
    }
    // Something was refused: peer by peer, so one bad route does not hold up the others.
    let mut all_claimed = true;
    for (key, at, routes) in claims {
        match net::replace_routes(&ctx.config.interface, &routes) {
            Ok(()) => {
                ctx.state.lock().claimed.insert(key, (at, routes));
            }
            Err(e) => {
                all_claimed = false;
                tracing::warn!(error = %e, "routing a peer's addresses");
            }
        }
    }
    all_claimed
}

/// Hub with `[bgp]`: empties the announcement table at start (routes an earlier process left
/// there) and makes the announcer.
pub(super) fn start_announcing(ctx: &Ctx, bgp: &BgpConfig) -> Result<()> {
    route_table::flush(bgp.table).with_context(|| {
        format!(
            "emptying the announcement table {} ([bgp] table)",
            bgp.table
        )
    })?;
    ctx.state.lock().announcer = Some(Announcer::new(AnnounceSettings {
        spoke_hold: bgp.hold.0,
        ..AnnounceSettings::default()
    }));
    tracing::info!(
        table = bgp.table,
        hold = ?bgp.hold.0,
        "announcing the prefixes of the peers that use this hub in the kernel table for BGP"
    );
    Ok(())
}

/// Hub with `[bgp]`: keeps the announcement table what the announcer decides for the peers
/// as sampled now (read back every few seconds, repaired when someone else changed it).
pub(super) fn announce_routes(ctx: &Ctx, shared: &Shared, activity: &[PeerActivity]) {
    let Some(bgp) = &ctx.config.bgp else {
        return;
    };
    let now = Instant::now();
    // The admitted peers the announcer would count as live; only their prefixes are fetched.
    let live: Vec<(PeerId, Role, Option<Instant>)> = {
        let s = ctx.state.lock();
        let (Some(hub), Some(announcer)) = (s.hub.as_ref(), s.announcer.as_ref()) else {
            return;
        };
        activity
            .iter()
            .filter_map(|p| {
                let role = hub.admitted(&p.public_key)?.role;
                let heard = p.last_data?;
                // Hubs never route through one another.
                (role != Role::Hub && heard + announcer.hold(role) > now).then_some((
                    p.id,
                    role,
                    p.last_data,
                ))
            })
            .collect()
    };
    let prefixes: Vec<Vec<IpNet>> = {
        let core = shared.core();
        live.iter()
            .map(|(id, ..)| core.allowed_ips_of(*id))
            .collect()
    };
    let check = {
        let mut guard = ctx.state.lock();
        let Some(announcer) = guard.announcer.as_mut() else {
            return;
        };
        let samples = live
            .iter()
            .zip(&prefixes)
            .map(|(&(_, role, last_data), prefixes)| PeerSample {
                role,
                last_data,
                prefixes,
            });
        announcer.handle_peers(now, samples);
        announcer.poll_check(now)
    };
    if check {
        match route_table::read(bgp.table) {
            Ok(held) => {
                if let Some(a) = ctx.state.lock().announcer.as_mut() {
                    a.handle_table(held);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the announcement table back"),
        }
    }
    let diff = ctx
        .state
        .lock()
        .announcer
        .as_mut()
        .and_then(|a| a.poll_diff(now));
    let Some(diff) = diff else {
        return;
    };
    let result = route_table::apply(&ctx.config.interface, bgp.table, &diff);
    match &result {
        Ok(()) => tracing::info!(
            table = bgp.table,
            announced = ?diff.announce.iter().map(ToString::to_string).collect::<Vec<_>>(),
            withdrawn = ?diff.withdraw.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "announcement table changed"
        ),
        Err(e) => tracing::error!(error = %e, "cannot change the announcement table; retrying"),
    }
    if let Some(a) = ctx.state.lock().announcer.as_mut() {
        a.handle_applied(now, &diff, result.is_ok());
    }
}
