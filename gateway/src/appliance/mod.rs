//! `komnet-gateway run --config gateway.toml`: the appliance, hub or spoke.
//!
//! The packet path is the same driver as in the wireguard-go-compatible mode; around it runs
//! the control plane (one tokio runtime): enrollment on first start and renewal, the policy
//! bundle (last-known-good from disk, then polled from the enrollment service), and per role:
//! - **hub**: follows the enrollment registry, admits peers with valid certificates (allowed IPs
//!   from the policy), enforces the policy per packet through the driver's [`Gate`], routes a
//!   peer's addresses to the tunnel when it completes a handshake here, and with `[bgp]` keeps
//!   the prefixes of the peers that send to it in a kernel table a routing daemon announces;
//! - **spoke**: tunnels its town-hall LAN to the active hub, fails over to the next hub when the
//!   active one falls silent, and enforces the policy for its site with nftables.
//!
//! Fail closed: a spoke installs a drop-everything `komnet` table before anything else, and the
//! table outlives the daemon; a hub's gate drops every packet until a policy is in force.

pub mod config;
pub mod control;
pub mod dhcp;
mod guard;
mod hub;
mod identity;
pub mod lan;
pub mod net;
mod policy;
pub mod route_table;
mod spoke;
pub mod status;

use guard::*;
use hub::*;
use identity::*;
use policy::*;
use spoke::*;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ipnet::IpNet;
use komnet_enroll_client::{self as client, ClientError, Enrollment, PolicyFetch, WgKeys};
use komnet_policy::bundle::{BundleStore, VerifiedBundle};
use komnet_policy::nft::{self, Interfaces};
use komnet_policy::{CompiledPolicy, Role};
use komnet_proto::api::{ErrorCode, HubPeer};
use komnet_proto::bootstrap::Bootstrap;
use komnet_proto::identity::Identity;
use komnet_proto::service_manager::Notifier;
use parking_lot::Mutex;
use rand::RngCore;

use crate::admission::PeerChange;
use crate::core::DropReason;
use crate::core::{Core, PeerActivity, PeerId, PeerInfo};
use crate::daemon;
use crate::driver::{self, Event, Shared, Sockets};
use crate::firewall::{FirewallConfig, FlowOwner};
use crate::gate::Gate;
use config::{BgpConfig, GatewayConfig, GatewayRole};
use control::announce::{AnnounceSettings, Announcer, PeerSample};
use control::bootstrap::{BootstrapStep, BootstrapWatch, FileRead, SetAside};
use control::hub::{HubCore, LinkLoss, LinkState, OutageSettings};
use control::policy::{PolicyAction, PolicySlot};
use control::renewal::{RenewalFailure, RenewalSchedule, RenewalStep, Renewed};
use control::spoke::{SpokeAction, SpokeCore};
use control::{ControlEvent, Counters};
use komnet_proto::files::{write_atomic, Visibility};
use status::{serve_status, RetiredDrops};

const TUNNEL_MTU: u16 = 1420;
const ENROLLMENT_FILE: &str = "enrollment.json";
const WG_KEY_FILE: &str = "wg.key";
/// The keys of a first enrollment asked for and not yet answered ([`identity::PendingEnrollment`]).
const PENDING_ENROLLMENT_FILE: &str = "enrollment.pending.json";
const POLICY_DIR: &str = "policy";
/// The policy signing key pinned at enrollment from the bootstrap file (when gateway.toml
/// names none).
const POLICY_KEY_FILE: &str = "policy.pub";
/// How often a missing bootstrap file is looked for (`wait_for_bootstrap`).
const BOOTSTRAP_POLL: Duration = Duration::from_secs(2);

/// What the control plane knows, for its own decisions and for `/status`. The decisions are
/// the sans-IO cores' ([`control`]); the rest is what the drivers learnt and did.
#[derive(Default)]
struct ControlState {
    state: String,
    enrollment: Option<Enrollment>,
    /// The policy in force and its verified bundle.
    policy: Option<(Arc<CompiledPolicy>, VerifiedBundle)>,
    /// Which version is in force since when, the step a new one is at, why one was refused.
    slot: PolicySlot,
    renewal: Option<RenewalSchedule>,
    /// Hub: the registry view, admissions, certificate expiry, the link to the registry.
    hub: Option<HubCore>,
    /// Hub: the handshake (core time) for which a peer's routes were last claimed, and those
    /// routes.
    claimed: HashMap<[u8; 32], (Instant, Vec<IpNet>)>,
    /// Hub with `[bgp]`: which prefixes go into the announcement table.
    announcer: Option<Announcer>,
    /// Hub with `[bgp] bird_socket`: its BGP sessions as last read from BIRD.
    bgp_sessions: Option<komnet_proto::status::BgpSessions>,
    /// Spoke: which hub carries the traffic, failover, hub-list refresh, LAN retries.
    spoke: Option<SpokeCore>,
    /// Spoke: the hubs.
    hubs: Vec<HubPeer>,
    /// The hubs' endpoints, resolved when the list is learnt or refreshed: a failover must not
    /// wait for DNS (whose server may sit behind the hub that just failed).
    hub_endpoints: Vec<Option<SocketAddr>>,
    /// Spoke with `lan_addresses`: what the policy in force wants on the LAN interface, and
    /// what this process put there (and may have to take off again).
    lan_wanted: Vec<(String, IpNet)>,
    lan_put: Vec<(String, IpNet)>,
    /// Spoke: what the last attempt to set up the LAN could not do (empty when it all worked).
    lan_errors: Vec<String>,
    /// This process held a certificate that was valid (when the identity was ready, or after a
    /// renewal). One that arrived expired is a clock problem, not one a new token solves.
    certificate_was_valid: bool,
    /// Spoke with `dhcp_config`: the DHCP server's configuration the policy in force wants
    /// (`None`: it serves no segment, and the file goes), and what it serves (for `/status`).
    dhcp_wanted: Option<String>,
    dhcp_served: Vec<String>,
    /// Spoke: the VLAN interfaces the policy in force wants on the trunk, and every interface
    /// its site's segments arrive on (the fence and reverse-path filtering cover them).
    lan_vlans: Vec<(String, u16)>,
    lan_interfaces: Vec<String>,
    /// Spoke: the fence's LAN-to-LAN routes for the policy in force (`LanPlan::local_routes`).
    lan_local_routes: Vec<(String, IpNet)>,
    /// Spoke: the komnet table's drop counts (`segment_spoof`, …), kept across new tables.
    nft_drops: control::NftDropTotals,
    /// Drops of peers removed from the table (so `komnet_drops_total` never goes down).
    retired_drops: RetiredDrops,
    /// The bootstrap watch's counts (first start only).
    bootstrap: Counters,
    counters: Counters,
}

impl ControlState {
    fn count(&mut self, event: ControlEvent) {
        self.counters.count(event);
    }

    /// The spoke's active hub (index into `hubs`).
    fn active_hub(&self) -> usize {
        self.spoke.as_ref().map_or(0, SpokeCore::active_hub)
    }

    /// Every control-plane count, by name, for `/status` and `/metrics`.
    fn all_counters(&self) -> BTreeMap<String, u64> {
        let mut all = self.counters.clone();
        all.absorb(&self.bootstrap);
        all.absorb(self.slot.counters());
        if let Some(r) = &self.renewal {
            all.absorb(r.counters());
        }
        if let Some(h) = &self.hub {
            all.absorb(h.counters());
        }
        if let Some(a) = &self.announcer {
            all.absorb(a.counters());
        }
        if let Some(c) = &self.spoke {
            all.absorb(c.counters());
        }
        all.iter()
            .map(|(k, v)| (k.as_str().to_owned(), v))
            .collect()
    }
}

struct Ctx {
    config: GatewayConfig,
    state: Mutex<ControlState>,
    shared: OnceLock<Arc<Shared>>,
    keys: OnceLock<WgKeys>,
    /// The key gateway.toml names or an earlier enrollment stored, read at start.
    pinned_key: Option<PinnedKey>,
    /// Made once the policy key is known (at the latest after enrolling).
    bundles: OnceLock<BundleStore>,
    /// One change of the LAN addresses at a time (policy task and spoke watcher).
    lan_lock: Mutex<()>,
    /// How often a missing bootstrap file is looked for ([`BOOTSTRAP_POLL`]; tests go faster).
    bootstrap_poll: Duration,
    events: Sender<Event>,
    /// systemd's readiness, watchdog and status (a no-op outside a `Type=notify` unit).
    notify: Notifier,
    /// READY=1 was sent: the tunnel is up and the role's tasks run, or the appliance waits for
    /// an operator to bring a bootstrap file (`wait_for_bootstrap`).
    ready: AtomicBool,
    /// Spoke: the site's ruleset in force (`None`: the closed table), which the guard keeps
    /// installed; locked while it is applied.
    nft_in_force: Mutex<Option<nft::Ruleset>>,
    /// Spoke: wakes the guard to check the fence and the table now.
    guard_wake: OnceLock<std::sync::mpsc::SyncSender<()>>,
    /// The enrollment service's client for the certificate in force (its chain is the key):
    /// one for every poll and the registry, so their connection is reused ([`service_client`]).
    service: Mutex<Option<(String, Arc<client::Client>)>>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs the appliance described by `config_path`; returns the process exit code.
pub fn run(config_path: &Path) -> Result<i32> {
    let config = GatewayConfig::load(config_path)?;
    init_logging(config.log_json);
    let notify = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not sending systemd notifications");
        Notifier::disabled()
    });
    let pinned_key = pinned_policy_key(&config)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    if config.role == GatewayRole::Spoke {
        // Before anything can forward: a killed or half-started spoke must not be open.
        nft::closed_ruleset()
            .apply()
            .context("installing the fail-closed nftables table")?;
    }
    let (events_tx, events) = channel();
    daemon::spawn_signals(events_tx.clone()).context("installing signal handlers")?;
    let ctx = Arc::new(Ctx {
        pinned_key,
        bundles: OnceLock::new(),
        lan_lock: Mutex::new(()),
        bootstrap_poll: BOOTSTRAP_POLL,
        config,
        state: Mutex::new(ControlState {
            state: "starting".into(),
            ..Default::default()
        }),
        shared: OnceLock::new(),
        keys: OnceLock::new(),
        events: events_tx,
        notify,
        ready: AtomicBool::new(false),
        nft_in_force: Mutex::new(None),
        guard_wake: OnceLock::new(),
        service: Mutex::new(None),
    });
    if ctx.config.role == GatewayRole::Spoke {
        start_guard(&ctx)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    publish_status(&ctx);
    runtime.spawn(keepalive(ctx.clone()));
    {
        let ctx = ctx.clone();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(ctx.config.metrics_listen))
            .with_context(|| format!("binding metrics_listen {}", ctx.config.metrics_listen))?;
        runtime.spawn(serve_status(listener, ctx));
    }
    {
        let ctx = ctx.clone();
        runtime.spawn(async move {
            if let Err(e) = start(ctx.clone()).await {
                let _ = ctx.events.send(Event::Fatal(format!("{e:#}")));
            }
        });
    }
    tracing::info!(role = ?ctx.config.role, interface = %ctx.config.interface, "komnet-gateway starting");
    let reason = events
        .recv()
        .unwrap_or(Event::Fatal("all event senders gone".into()));
    let stopping = match &reason {
        Event::InterfaceGone => "stopping: tunnel interface deleted".to_owned(),
        Event::Signal(sig) => format!("stopping: signal {sig}"),
        Event::Fatal(msg) => format!("failed: {msg}"),
    };
    notify_logged(&ctx.notify.stopping(&stopping));
    if let Some(shared) = ctx.shared.get() {
        shared.stop();
    }
    runtime.shutdown_timeout(Duration::from_millis(500));
    match reason {
        Event::InterfaceGone => {
            tracing::info!("tunnel interface deleted; shutting down");
            Ok(0)
        }
        Event::Signal(sig) => {
            tracing::info!(signal = sig, "shutting down");
            Ok(0)
        }
        Event::Fatal(msg) => {
            tracing::error!(error = %msg, "stopping");
            eprintln!("komnet-gateway: {msg}");
            Ok(1)
        }
    }
}

fn init_logging(json: bool) {
    daemon::init_logging(komnet_proto::logging::Format::json_if(json));
}

/// Returns whether the state changed (and the status was published).
fn set_state(ctx: &Ctx, state: &str) -> bool {
    let changed = {
        let mut s = ctx.state.lock();
        let changed = s.state != state;
        if changed {
            tracing::info!(state, "appliance state");
            s.state = state.to_owned();
        }
        changed
    };
    if changed {
        publish_status(ctx);
    }
    changed
}

/// One line for `systemctl status`: role, identity, state and policy version.
fn status_line(ctx: &Ctx) -> String {
    let s = ctx.state.lock();
    let role = match ctx.config.role {
        GatewayRole::Hub => "hub",
        GatewayRole::Spoke => "spoke",
    };
    let mut line = match &s.enrollment {
        Some(e) => format!(
            "{role} {}/{}: {}",
            e.identity.tenant.as_str(),
            e.identity.site.as_str(),
            s.state
        ),
        None => format!("{role}: {}", s.state),
    };
    if let Some((compiled, _)) = &s.policy {
        line.push_str(&format!(", policy version {}", compiled.version()));
    }
    line
}

fn publish_status(ctx: &Ctx) {
    notify_logged(&ctx.notify.status(&status_line(ctx)));
}

/// A notification that did not reach systemd changes nothing for the appliance itself; if
/// systemd is waiting for it, its own timeout says so.
fn notify_logged(result: &std::io::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "systemd notification not sent");
    }
}

/// Tells systemd the control plane is alive: `WATCHDOG=1` once the appliance is ready, and
/// `EXTEND_TIMEOUT_USEC` while the start is under way (a first start waits for the enrollment
/// service as long as it takes, and a start timeout in the middle of an enrollment could waste
/// the one-time token). Either is sent only when the control state and the packet path's
/// locks can be taken, so a wedged daemon goes silent and systemd restarts it. Waiting for an
/// operator's bootstrap file counts as ready (see [`wait_for_operator`]): from then on the
/// watchdog applies.
async fn keepalive(ctx: Arc<Ctx>) {
    const START_PROBE: Duration = Duration::from_secs(10);
    let watchdog = ctx.notify.watchdog_interval();
    let every = match watchdog {
        Some(d) => d.max(Duration::from_millis(100)),
        None if ctx.notify.is_enabled() => START_PROBE,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let probe = ctx.clone();
        let alive = tokio::task::spawn_blocking(move || control_plane_responsive(&probe, every))
            .await
            .unwrap_or(false);
        if !alive {
            tracing::error!(
                waited = ?every,
                "control plane not responding; withholding the systemd keep-alive"
            );
            continue;
        }
        let sent = if ctx.ready.load(Ordering::Acquire) {
            if watchdog.is_none() {
                // Ready and no watchdog: nothing more to say.
                return;
            }
            ctx.notify.watchdog()
        } else {
            ctx.notify.extend_timeout(every * 3)
        };
        notify_logged(&sent);
    }
}

fn control_plane_responsive(ctx: &Ctx, timeout: Duration) -> bool {
    if ctx.state.try_lock_for(timeout).is_none() {
        return false;
    }
    ctx.shared.get().is_none_or(|s| s.responsive(timeout))
}

/// Enrols (or loads the stored identity), brings up the tunnel and starts the role's tasks.
async fn start(ctx: Arc<Ctx>) -> Result<()> {
    let (enrollment, keys, policy_key) = obtain_identity(&ctx).await?;
    let _ = ctx.bundles.set(BundleStore::new(
        ctx.config.data_dir.join(POLICY_DIR),
        policy_key,
    ));
    identity::raise_policy_floor(&ctx, enrollment.policy_version);
    let expected = match ctx.config.role {
        GatewayRole::Hub => Role::Hub,
        GatewayRole::Spoke => Role::Spoke,
    };
    if enrollment.identity.role != expected {
        bail!(
            "the stored certificate is for role {}, but gateway.toml says role = {:?}",
            enrollment.identity.role.as_str(),
            ctx.config.role
        );
    }
    let _ = ctx.keys.set(keys.clone());
    tracing::info!(
        tenant = enrollment.identity.tenant.as_str(),
        site = enrollment.identity.site.as_str(),
        serial = %enrollment.identity.serial,
        "identity ready"
    );
    {
        let mut s = ctx.state.lock();
        s.hubs = enrollment.hubs.clone();
        s.enrollment = Some(enrollment.clone());
        s.certificate_was_valid = enrollment.identity.not_after > unix_now();
        s.renewal = Some(RenewalSchedule::new(
            enrollment.renew_after,
            enrollment.identity.not_after,
        ));
        let now = Instant::now();
        match ctx.config.role {
            GatewayRole::Hub => {
                let outage = OutageSettings {
                    alarm_after: ctx.config.registry_outage_alarm.0,
                    policy: ctx.config.registry_outage,
                };
                s.hub = Some(HubCore::new(now, outage, rand::thread_rng().next_u64()));
            }
            GatewayRole::Spoke => {
                s.spoke = Some(SpokeCore::new(
                    now,
                    ctx.config.failover_after.0,
                    enrollment.hubs.len(),
                ));
            }
        }
    }
    let shared = {
        let ctx = ctx.clone();
        let enrollment = enrollment.clone();
        tokio::task::spawn_blocking(move || bring_up(&ctx, &enrollment, &keys))
            .await
            .context("tunnel set-up task")??
    };
    let _ = ctx.shared.set(shared);
    set_state(&ctx, "waiting for policy");
    // The last-known-good policy first: a restarted appliance enforces at once, even when the
    // data centre is unreachable.
    match bundles(&ctx)?.load_last_known_good() {
        Ok(Some((bundle, compiled))) => {
            let version = bundle.version;
            match put_in_force(&ctx, bundle, compiled).await {
                Ok(()) => tracing::info!(version, "last-known-good policy in force"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "last-known-good policy cannot be applied")
                }
            }
        }
        Ok(None) => tracing::info!("no policy stored yet; forwarding nothing until one arrives"),
        Err(e) => {
            tracing::error!(error = %e, "stored policy refused; forwarding nothing until a valid one arrives")
        }
    }
    tokio::spawn(policy_sync(ctx.clone()));
    tokio::spawn(renewal(ctx.clone()));
    match ctx.config.role {
        GatewayRole::Hub => {
            if let Some(bgp) = &ctx.config.bgp {
                start_announcing(&ctx, bgp)?;
            }
            tokio::spawn(follow_registry(ctx.clone()));
            tokio::spawn(hub_housekeeping(ctx.clone()));
            tokio::spawn(report_peers(ctx.clone()));
            if let Some(socket) = ctx.config.bgp.as_ref().and_then(|b| b.bird_socket.clone()) {
                tokio::spawn(watch_bgp_sessions(ctx.clone(), socket));
            }
        }
        GatewayRole::Spoke => {
            let hubs = ctx.state.lock().hubs.clone();
            let endpoints = resolve_hub_endpoints(&hubs).await;
            ctx.state.lock().hub_endpoints = endpoints;
            apply_hubs(&ctx);
            tokio::spawn(spoke_watch(ctx.clone()));
        }
    }
    // Ready means the tunnel is up and the role's tasks run; a missing policy is a state the
    // appliance handles itself (fail closed), shown in the status, not a failed start.
    ctx.ready.store(true, Ordering::Release);
    notify_logged(&ctx.notify.ready(&status_line(&ctx)));
    Ok(())
}

// ---- tunnel --------------------------------------------------------------------------------

fn bring_up(ctx: &Ctx, enrollment: &Enrollment, keys: &WgKeys) -> Result<Arc<Shared>> {
    let ifname = &ctx.config.interface;
    let tun = daemon::create_tun(ifname)?;
    net::configure_interface(ifname, &enrollment.identity.tunnel_addrs, TUNNEL_MTU)?;
    net::enable_forwarding()?;
    keep_reverse_path(ctx).context("setting reverse-path filtering")?;
    if net::reverse_path_all_loose() {
        tracing::warn!("net.ipv4.conf.all.rp_filter is 2 (loose), which overrides the strict reverse-path filtering komnet sets per interface: set it to 0 or 1");
    }
    let sockets = Sockets::bind(ctx.config.listen_port, 0)
        .with_context(|| format!("binding UDP port {}", ctx.config.listen_port))?;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let now = Instant::now();
    let mut core = Core::new(now, seed);
    core.set_private_key(now, Some(keys.secret().to_bytes()));
    core.set_listen_port(sockets.port());
    let gate = (ctx.config.role == GatewayRole::Hub).then(|| {
        Gate::new(FirewallConfig {
            max_flows: ctx.config.max_flows,
            ..FirewallConfig::default()
        })
    });
    let shared = Shared::new(core, gate, tun, ifname.clone(), sockets)
        .context("creating the wake-up pipe")?;
    driver::spawn(&shared, &ctx.events).context("starting driver threads")?;
    if ctx.config.role == GatewayRole::Spoke {
        let mut routes = enrollment.allowed_ips.clone();
        routes.extend(enrollment.hubs.iter().flat_map(|h| h.tunnel_addrs.clone()));
        net::replace_routes(ifname, &routes)?;
        // The LAN may now reach these routes through the fence.
        poke_guard(ctx);
    }
    tracing::info!(interface = %ifname, port = shared.sockets().port(), "tunnel up");
    Ok(shared)
}
