//! The policy driver: polls the enrollment service for signed bundles, verifies and compiles
//! them (prepare), puts them in force in the packet path (nftables on a spoke, the gate on a
//! hub) and commits them as last-known-good.

use super::*;

/// Puts a verified, compiled policy in force (spoke: nftables; hub: the gate and the peer
/// table), then records it as last-known-good. On error the previous policy stays.
pub(super) async fn put_in_force(
    ctx: &Arc<Ctx>,
    bundle: VerifiedBundle,
    compiled: CompiledPolicy,
) -> Result<()> {
    let compiled = Arc::new(compiled);
    let version = bundle.version;
    let PolicyAction::Install { .. } = ctx.state.lock().slot.handle_prepared(version) else {
        bail!("policy version {version}: prepared but not to be installed");
    };
    match ctx.config.role {
        GatewayRole::Spoke => {
            let identity = own_identity(ctx)?;
            let policy = &compiled.policy;
            let site = policy
                .tenant_by_name(identity.tenant.as_str())
                .and_then(|t| policy.site_by_name(t, identity.site.as_str()))
                .ok_or_else(|| {
                    anyhow!(
                        "policy version {} has no site {}/{}: not applied",
                        policy.version,
                        identity.tenant.as_str(),
                        identity.site.as_str()
                    )
                })?;
            let interfaces = Interfaces {
                lan: ctx.config.lan.clone(),
                tunnel: ctx.config.interface.clone(),
            };
            let ruleset = nft::ruleset_for_site(policy, site, &interfaces)?;
            let plan = lan::plan(policy, site, &interfaces)?;
            if !policy.site_translations(site).is_empty() {
                // Local prefixes that the WAN or the tunnel already use cannot be the LAN's.
                let outside: Vec<(String, IpNet)> = net::interface_addresses()?
                    .into_iter()
                    .filter(|(i, _)| !plan.interfaces.contains(i) && !ctx.config.lan.contains(i))
                    .collect();
                let clashes = lan::local_prefix_clashes(policy, site, &outside);
                if !clashes.is_empty() {
                    bail!("{}", clashes.join("; "));
                }
            }
            let dhcp_plan = dhcp::plan(policy, site, &interfaces)?;
            let task = ctx.clone();
            tokio::task::spawn_blocking(move || install_ruleset(&task, ruleset))
                .await
                .context("nft task")??;
            // The new ruleset is in force: now the LAN follows (a segment that moved to another
            // VLAN or port leaves the old one and arrives on the new one).
            {
                let mut s = ctx.state.lock();
                s.lan_vlans = plan.vlans.clone();
                s.lan_interfaces = plan.interfaces.clone();
                s.lan_local_routes = plan.local_routes.clone();
                if ctx.config.lan_addresses {
                    for (segment, prefix) in &plan.skipped {
                        tracing::warn!(
                            segment = %segment,
                            prefix = %prefix,
                            "lan_addresses: no address taken in a single-address prefix (/32, /128): it leaves no room for a router beside its host"
                        );
                    }
                    s.lan_wanted = plan.addrs;
                }
                if ctx.config.dhcp_config.is_some() {
                    let about = format!("{}/{}", identity.tenant.as_str(), identity.site.as_str());
                    s.dhcp_wanted = (!dhcp_plan.is_empty()).then(|| dhcp_plan.dnsmasq_conf(&about));
                    s.dhcp_served = dhcp_plan.summary();
                }
            }
            let task = ctx.clone();
            tokio::task::spawn_blocking(move || sync_lan(&task))
                .await
                .context("LAN task")?;
            poke_guard(ctx);
        }
        GatewayRole::Hub => {
            let shared = ctx.shared.get().ok_or_else(|| anyhow!("tunnel not up"))?;
            let removed = {
                let mut s = ctx.state.lock();
                let changes = match s.hub.as_mut() {
                    Some(hub) => hub.handle_policy(unix_now(), compiled.clone()),
                    None => bail!("hub without its control core"),
                };
                // The policy and the identities resolved against it change under one lock, so
                // no packet sees an identity from the other version, and registry changes
                // (which take the state lock first) resolve against the new one from now on.
                let (gate, mut core) = shared.gate_and_core();
                let mut gate = gate.ok_or_else(|| anyhow!("hub without a gate"))?;
                gate.set_policy(compiled.clone());
                apply_peer_changes(ctx, &mut gate, &mut core, &mut s.retired_drops, &changes)
            };
            release_routes(ctx, &removed);
        }
    }
    // In force in the packet path: now it becomes last-known-good.
    if ctx.state.lock().slot.handle_installed(version).is_none() {
        bail!("policy version {version} was not being installed");
    }
    bundles(ctx)?.commit(&bundle)?;
    let mut s = ctx.state.lock();
    if s.slot.handle_committed(version, unix_now()) {
        s.policy = Some((compiled, bundle));
    }
    drop(s);
    if !set_state(ctx, "running") {
        // Same state, new policy version: the status line still changes.
        publish_status(ctx);
    }
    tracing::info!(version, "policy in force");
    Ok(())
}

/// The bundle store; there is none before the policy key is known (it may come with the
/// bootstrap file), and no policy task runs before that.
pub(super) fn bundles(ctx: &Ctx) -> Result<&BundleStore> {
    ctx.bundles
        .get()
        .ok_or_else(|| anyhow!("no policy signing key yet"))
}

pub(super) fn own_identity(ctx: &Ctx) -> Result<Identity> {
    ctx.state
        .lock()
        .enrollment
        .as_ref()
        .map(|e| e.identity.clone())
        .ok_or_else(|| anyhow!("not enrolled"))
}

pub(super) fn current_enrollment(ctx: &Ctx) -> Option<Enrollment> {
    ctx.state.lock().enrollment.clone()
}

/// The enrollment service's client for `enrollment`: the same one for every call while its
/// certificate is in force (so polls reuse its connection), a new one after a renewal.
pub(super) fn service_client(
    ctx: &Ctx,
    enrollment: &Enrollment,
) -> Result<Arc<client::Client>, ClientError> {
    let mut cached = ctx.service.lock();
    if let Some((chain, client)) = cached.as_ref() {
        if *chain == enrollment.certificate_chain_pem {
            return Ok(client.clone());
        }
    }
    let client = Arc::new(client::Client::for_enrollment(enrollment)?);
    *cached = Some((enrollment.certificate_chain_pem.clone(), client.clone()));
    Ok(client)
}

/// Polls the enrollment service for a newer bundle.
pub(super) async fn policy_sync(ctx: Arc<Ctx>) {
    let mut last_expiry_alarm: Option<i64> = None;
    loop {
        warn_if_policy_expiring(&ctx, &mut last_expiry_alarm);
        if let Some(enrollment) = current_enrollment(&ctx) {
            let have = ctx.state.lock().slot.have();
            let fetched = async { service_client(&ctx, &enrollment)?.fetch_policy(have).await };
            match fetched.await {
                Ok(PolicyFetch::Bundle { version, bytes }) => {
                    offer_bundle(&ctx, version, &bytes).await;
                }
                Ok(PolicyFetch::NotModified) | Ok(PolicyFetch::NoneYet) => {}
                Err(e) => tracing::warn!(error = %e, "policy poll failed"),
            }
        }
        tokio::time::sleep(ctx.config.policy_poll.0).await;
    }
}

/// Logs (at most hourly) when less than a third of the validity of the bundle in force is
/// left and no newer one has arrived: the operator has to sign and publish one.
fn warn_if_policy_expiring(ctx: &Ctx, last: &mut Option<i64>) {
    let now = unix_now();
    let s = ctx.state.lock();
    let Some((_, bundle)) = s.policy.as_ref() else {
        return;
    };
    let Some(expires) = bundle.expires else {
        return;
    };
    let start = bundle
        .not_before
        .or_else(|| s.slot.in_force().map(|p| p.installed_at))
        .unwrap_or(now);
    if !komnet_proto::status::less_than_a_third_left(start, expires, now) {
        *last = None;
        return;
    }
    if last.is_some_and(|t| now - t < 3600) {
        return;
    }
    *last = Some(now);
    tracing::error!(
        version = bundle.version,
        expires_in_secs = expires - now,
        "the policy bundle in force expires soon (less than a third of its validity left): \
         sign and publish a new one (komnet policy bundle --valid-for, komnet policy publish)"
    );
}

pub(super) async fn offer_bundle(ctx: &Arc<Ctx>, version: u64, bytes: &[u8]) {
    let prepared = bundles(ctx).and_then(|store| {
        let s = ctx.state.lock();
        Ok(store.prepare(bytes, s.policy.as_ref().map(|p| &p.1))?)
    });
    let result = match prepared {
        Ok((bundle, compiled)) => put_in_force(ctx, bundle, compiled).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let mut s = ctx.state.lock();
        if s.slot.handle_refused(version, &format!("{e:#}")) {
            let message = s.slot.error().unwrap_or_default().to_owned();
            tracing::error!(error = %message, "keeping the policy in force");
        }
    }
}
