//! The spoke's guard against an open firewall (issue 14, part 5). Debian's nftables.service
//! flushes the whole ruleset when it stops or restarts, and an admin may type
//! `nft flush ruleset`; with forwarding on, the kernel would then forward LAN <-> WAN until the
//! gateway restarts. Two layers keep the town hall closed:
//!
//! - **The fence** ([`net::install_fence`]): policy-routing rules that no nftables command
//!   touches. The kernel routes packets from a LAN interface only towards the tunnel's routes
//!   (and, between the site's segments, only where a rule lets them talk: `lan::plan`), and
//!   prohibits everything else it would forward (WAN to LAN, LAN to WAN). Checked every
//!   second and restored if someone changed it.
//! - **The watcher**: `nft monitor` reports every change of the ruleset; any change that
//!   touches the `komnet` table (its deletion by a flush, a rule removed) wakes the guard,
//!   which compares the table with the ruleset in force and reinstalls it (the closed table
//!   when no policy is in force yet). Without an event it compares once a second anyway, so
//!   a watcher that died costs at most a second.
//!
//! Between a flush and the reinstall (milliseconds) the fence still holds: the LAN reaches
//! only the tunnel's routes, where the hub enforces the same policy per packet.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};

use super::*;

/// How often the fence and the table are compared even without an nftables event.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The routes a spoke sends into its tunnel: the data centre's networks and the hubs' tunnel
/// addresses (empty before it has enrolled: then the LAN reaches nothing).
fn tunnel_routes(ctx: &Ctx) -> Vec<IpNet> {
    let s = ctx.state.lock();
    let mut routes = s
        .enrollment
        .as_ref()
        .map(|e| e.allowed_ips.clone())
        .unwrap_or_default();
    routes.extend(s.hubs.iter().flat_map(|h| h.tunnel_addrs.clone()));
    routes
}

/// The spoke's LAN interfaces: the configured ones and those the policy in force puts its
/// segments on (VLAN interfaces, ports).
fn lan_interfaces(ctx: &Ctx) -> Vec<String> {
    let mut all = ctx.config.lan.clone();
    for i in &ctx.state.lock().lan_interfaces {
        if !all.contains(i) {
            all.push(i.clone());
        }
    }
    all
}

/// Asks the guard to check the fence and the table now (the routes or the ruleset changed).
pub(super) fn poke_guard(ctx: &Ctx) {
    if let Some(wake) = ctx.guard_wake.get() {
        let _ = wake.try_send(());
    }
}

/// Puts `ruleset` in force on a spoke and makes it the one the guard keeps installed. Blocking.
pub(super) fn install_ruleset(ctx: &Ctx, ruleset: nft::Ruleset) -> Result<(), nft::NftError> {
    let mut in_force = ctx.nft_in_force.lock();
    // What the table about to be replaced dropped is kept in the totals.
    let before = nft::read_drop_counters().unwrap_or_default();
    ruleset.apply()?;
    ctx.state.lock().nft_drops.handle_replaced(&before);
    *in_force = Some(ruleset);
    Ok(())
}

/// Installs the fence and starts the guard (watcher and checker threads). Spoke only; call
/// right after the closed table went in.
pub(super) fn start_guard(ctx: &Arc<Ctx>) -> Result<()> {
    net::install_fence(&ctx.config.interface, &ctx.config.lan, &[], &[])
        .context("installing the forwarding fence (ip rule)")?;
    let (wake, woken) = sync_channel::<()>(1);
    let _ = ctx.guard_wake.set(wake.clone());
    std::thread::Builder::new()
        .name("nft-watch".into())
        .spawn(move || watch_nftables(&wake))
        .context("starting the nftables watcher")?;
    let ctx = ctx.clone();
    std::thread::Builder::new()
        .name("guard".into())
        .spawn(move || loop {
            match woken.recv_timeout(CHECK_EVERY) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => check(&ctx),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        })
        .context("starting the firewall guard")?;
    Ok(())
}

/// Strict reverse-path filtering on the interfaces the kernel forwards from towards the tunnel
/// (issue 14, part 4): a hub's outside interfaces (the data-centre side), a spoke's LAN
/// interfaces. At start, then every second (a hub: from its housekeeping; a spoke: from the
/// guard), so an interface that appears later or is switched back gets it too.
pub(super) fn keep_reverse_path(ctx: &Ctx) -> Result<(), net::NetError> {
    let interfaces = match ctx.config.role {
        GatewayRole::Hub => net::outside_interfaces(),
        GatewayRole::Spoke => lan_interfaces(ctx),
    };
    for interface in net::strict_reverse_path(&interfaces)? {
        ctx.state.lock().count(ControlEvent::RpFilterSet);
        tracing::info!(%interface, "reverse-path filtering set to strict (rp_filter = 1)");
    }
    Ok(())
}

/// One round: the fence, reverse-path filtering, then the table.
fn check(ctx: &Ctx) {
    let local = ctx.state.lock().lan_local_routes.clone();
    match net::install_fence(
        &ctx.config.interface,
        &lan_interfaces(ctx),
        &tunnel_routes(ctx),
        &local,
    ) {
        Ok(false) => {}
        Ok(true) => {
            ctx.state.lock().count(ControlEvent::FenceSet);
            tracing::info!("forwarding fence (ip rule) set to the current tunnel routes");
        }
        Err(e) => tracing::error!(error = %e, "forwarding fence"),
    }
    if let Err(e) = keep_reverse_path(ctx) {
        tracing::error!(error = %e, "reverse-path filtering");
    }
    let in_force = ctx.nft_in_force.lock();
    let wanted = in_force.clone().unwrap_or_else(nft::closed_ruleset);
    let e = match wanted.verify_installed_counting() {
        Ok(drops) => {
            ctx.state.lock().nft_drops.handle_reading(&drops);
            return;
        }
        Err(e) => e,
    };
    // Missing or changed: what it counted since the last reading is lost, not the totals.
    ctx.state
        .lock()
        .nft_drops
        .handle_reading(&std::collections::BTreeMap::new());
    tracing::warn!(error = %e, "nftables table komnet is missing or changed (a flushed ruleset?): reinstalling it");
    ctx.state.lock().count(ControlEvent::NftReinstalled);
    if let Err(e) = wanted.apply() {
        tracing::error!(error = %e, "reinstalling the komnet table failed; installing the closed one");
        if let Err(e) = nft::closed_ruleset().apply() {
            tracing::error!(error = %e, "installing the closed komnet table failed");
        }
    }
}

/// Runs `nft monitor` and wakes the guard on every event that names the komnet table (a
/// flush of the ruleset deletes it: "delete table inet komnet"). Restarted when it ends.
fn watch_nftables(wake: &SyncSender<()>) {
    loop {
        let mut cmd = Command::new("nft");
        cmd.arg("monitor")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        crate::sys::end_with_parent(&mut cmd);
        match cmd.spawn() {
            Ok(mut child) => {
                if let Some(out) = child.stdout.take() {
                    for line in BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        if line.contains(" komnet") || line.starts_with("flush ruleset") {
                            let _ = wake.try_send(());
                        }
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("nft monitor ended; the guard checks every second meanwhile");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot run `nft monitor`; the guard checks every second")
            }
        }
        std::thread::sleep(CHECK_EVERY);
    }
}
