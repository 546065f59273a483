//! `komnet-gateway run --config gateway.toml`: the appliance, hub or spoke.
//!
//! The packet path is the same driver as in the wireguard-go-compatible mode; around it runs
//! the control plane (one tokio runtime): enrollment on first start and renewal, the policy
//! bundle (last-known-good from disk, then polled from the enrollment service), and per role:
//! - **hub**: follows the enrollment registry, admits peers with valid certificates (allowed IPs
//!   from the policy), enforces the policy per packet through the driver's [`Gate`], routes a
//!   peer's addresses to the tunnel when it completes a handshake here;
//! - **spoke**: tunnels its town-hall LAN to the active hub, fails over to the next hub when the
//!   active one falls silent, and enforces the policy for its site with nftables.
//!
//! Fail closed: a spoke installs a drop-everything `komnet` table before anything else, and the
//! table outlives the daemon; a hub's gate drops every packet until a policy is in force.

pub mod config;
pub mod lan;
pub mod net;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
use komnet_proto::api::{ErrorCode, HubPeer, RegistryChange};
use komnet_proto::bootstrap::Bootstrap;
use komnet_proto::identity::Identity;
use komnet_sdnotify::Notifier;
use parking_lot::Mutex;
use rand::RngCore;

use crate::admission::{HubPeers, PeerChange};
use crate::core::{Core, PeerId, PeerInfo};
use crate::daemon;
use crate::driver::{self, Event, Shared, Sockets};
use crate::firewall::{FirewallConfig, FlowOwner};
use crate::gate::Gate;
use config::{GatewayConfig, GatewayRole};
use status::{CertificateStatus, FlowShare, PeerStatus, PolicyStatus, StatusReport};

const TUNNEL_MTU: u16 = 1420;
const ENROLLMENT_FILE: &str = "enrollment.json";
const WG_KEY_FILE: &str = "wg.key";
const POLICY_DIR: &str = "policy";
/// The policy signing key pinned at enrollment from the bootstrap file (when gateway.toml
/// names none).
const POLICY_KEY_FILE: &str = "policy.pub";
/// How often a missing bootstrap file is looked for (`wait_for_bootstrap`).
const BOOTSTRAP_POLL: Duration = Duration::from_secs(2);

/// What the control plane knows, for its own decisions and for `/status`.
#[derive(Default)]
struct ControlState {
    state: String,
    enrollment: Option<Enrollment>,
    policy: Option<(Arc<CompiledPolicy>, VerifiedBundle, i64)>,
    /// Hub: the policy the gate enforces, set under the same locks as the gate's.
    in_force: Option<Arc<CompiledPolicy>>,
    policy_error: Option<String>,
    /// Hub: every valid identity the registry lists, admitted or not.
    registry: BTreeMap<[u8; 32], Identity>,
    hub_peers: HubPeers,
    /// Hub: the handshake time for which a peer's routes were last claimed, and those routes.
    claimed: HashMap<[u8; 32], (SystemTime, Vec<IpNet>)>,
    /// Spoke: the hubs and which one carries the traffic.
    hubs: Vec<HubPeer>,
    /// The hubs' endpoints, resolved when the list is learnt or refreshed: a failover must not
    /// wait for DNS (whose server may sit behind the hub that just failed).
    hub_endpoints: Vec<Option<SocketAddr>>,
    active_hub: usize,
    /// Spoke with `lan_addresses`: what the policy in force wants on the LAN interface, what
    /// this process put there (and may have to take off again), and whether the last attempt
    /// failed (retried by the spoke watcher).
    lan_wanted: Vec<IpNet>,
    lan_put: Vec<IpNet>,
    lan_retry: bool,
    counters: BTreeMap<String, u64>,
}

impl ControlState {
    fn count(&mut self, event: &str) {
        *self.counters.entry(event.to_owned()).or_default() += 1;
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
    });
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
    if !json {
        daemon::init_logging();
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Where the pinned policy key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySource {
    /// `policy_public_key` in gateway.toml.
    Configured(PathBuf),
    /// `DATA_DIR/policy.pub`, from the bootstrap file of an earlier enrollment.
    Stored(PathBuf),
}

#[derive(Debug, Clone)]
struct PinnedKey {
    key: Vec<u8>,
    source: KeySource,
}

/// The key gateway.toml names, else the one an earlier enrollment stored, else none yet (the
/// bootstrap file brings it).
fn pinned_policy_key(config: &GatewayConfig) -> Result<Option<PinnedKey>> {
    if let Some(path) = &config.policy_public_key {
        let key = read_policy_key(path, "policy_public_key").map_err(|e| {
            if config.policy_key_is_credential() && is_blank(path) {
                // komnet-gateway.service falls back to a blank credential when
                // /etc/komnet/policy.pub is not there.
                anyhow!(
                    "policy_public_key names the systemd credential {}, which is empty: the file \
                     LoadCredential=policy.pub:… names in komnet-gateway.service \
                     (/etc/komnet/policy.pub unless changed) is missing; put the .pub file of \
                     `komnet policy keygen` there, or remove policy_public_key from gateway.toml to \
                     pin the key the bootstrap file carries",
                    path.display()
                )
            } else {
                e
            }
        })?;
        return Ok(Some(PinnedKey {
            key,
            source: KeySource::Configured(path.clone()),
        }));
    }
    let stored = config.data_dir.join(POLICY_KEY_FILE);
    if !stored.exists() {
        return Ok(None);
    }
    let key = read_policy_key(&stored, "stored policy key").with_context(|| {
        format!(
            "{} was written when this appliance enrolled; set policy_public_key in gateway.toml \
             or put the right .pub file there",
            stored.display()
        )
    })?;
    Ok(Some(PinnedKey {
        key,
        source: KeySource::Stored(stored),
    }))
}

fn is_blank(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace))
}

fn read_policy_key(path: &Path, what: &str) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{what}: cannot read {}", path.display()))?;
    let key = B64.decode(text.trim()).map_err(|e| {
        anyhow!(
            "{what}: {} is not a base64 Ed25519 public key: {e}",
            path.display()
        )
    })?;
    if key.len() != 32 {
        bail!(
            "{what}: {} holds {} bytes, an Ed25519 public key has 32",
            path.display(),
            key.len()
        );
    }
    Ok(key)
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
    if let Some((compiled, _, _)) = &s.policy {
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
            tokio::spawn(follow_registry(ctx.clone()));
            tokio::spawn(hub_housekeeping(ctx.clone()));
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

// ---- identity ------------------------------------------------------------------------------

fn write_secret(path: &Path, text: &str) -> Result<()> {
    write_atomically(path, text, 0o600)
}

/// A public file (the pinned policy key).
fn write_public(path: &Path, text: &str) -> Result<()> {
    write_atomically(path, text, 0o644)
}

/// Temp file with `mode`, synced, renamed over `path`: a crash leaves the old file or the new.
fn write_atomically(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn load_keys(path: &Path) -> Result<WgKeys> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{}: the WireGuard private key is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let bytes: [u8; 32] = B64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow!("{}: not a base64 WireGuard private key", path.display()))?;
    Ok(WgKeys::from_secret(x25519_dalek::StaticSecret::from(bytes)))
}

/// The stored identity with its pinned policy key, or a new identity from the bootstrap file.
/// Network trouble is retried; a refused token is final (it will not become valid by
/// retrying): the start fails and says why, or with `wait_for_bootstrap` the file is moved
/// aside to `<file>.refused` and the next one is waited for. Nothing is written before the
/// service said yes.
async fn obtain_identity(ctx: &Ctx) -> Result<(Enrollment, WgKeys, Vec<u8>)> {
    let dir = &ctx.config.data_dir;
    let enrollment_path = dir.join(ENROLLMENT_FILE);
    let key_path = dir.join(WG_KEY_FILE);
    if enrollment_path.exists() {
        let mut enrollment = Enrollment::load(&enrollment_path).with_context(|| {
            format!(
                "{}: stored enrollment unreadable",
                enrollment_path.display()
            )
        })?;
        let keys = load_keys(&key_path)?;
        if keys.public() != enrollment.identity.wg_public_key {
            bail!(
                "{} and {} do not belong together (the certificate is for another WireGuard key)",
                key_path.display(),
                enrollment_path.display()
            );
        }
        if !ctx.config.enroll_urls.is_empty() {
            enrollment.enroll_urls = ctx.config.enroll_urls.clone();
        }
        let Some(pinned) = &ctx.pinned_key else {
            let stored = dir.join(POLICY_KEY_FILE);
            bail!(
                "no policy signing key: gateway.toml sets no policy_public_key and {} does not \
                 exist, and this appliance is enrolled already (the bootstrap file, which may \
                 carry the key, is read only to enrol); set policy_public_key in gateway.toml or \
                 put the .pub file of `komnet policy keygen` at {}",
                stored.display(),
                stored.display()
            );
        };
        return Ok((enrollment, keys, pinned.key.clone()));
    }
    let path = ctx.config.bootstrap_path();
    let wait = ctx.config.wait_for_bootstrap;
    // What the state says while there is no usable bootstrap file.
    let mut waiting = format!("waiting for a bootstrap file at {}", path.display());
    // A file that failed to parse is judged again one poll later: it may still be being written.
    let mut unparsed: Option<Vec<u8>> = None;
    // A refused file that could not be moved aside is not tried again while it is unchanged.
    let mut refused: Option<Vec<u8>> = None;
    loop {
        let bytes = match std::fs::read(&path) {
            Ok(b) if !b.iter().all(u8::is_ascii_whitespace) => b,
            // Blank: komnet-gateway.service falls back to a blank credential (SetCredential=)
            // when the file LoadCredential= names is missing.
            Ok(_) if !wait && ctx.config.bootstrap_is_credential() => bail!(
                "not enrolled yet and no bootstrap file: put the one `komnet token create` wrote \
                 at the path LoadCredential=bootstrap.json:… names in komnet-gateway.service \
                 (/var/lib/komnet/bootstrap.json unless changed) and restart"
            ),
            Ok(_) if wait => {
                wait_for_operator(ctx, &waiting).await;
                continue;
            }
            Err(e) if wait && e.kind() == std::io::ErrorKind::NotFound => {
                wait_for_operator(ctx, &waiting).await;
                continue;
            }
            Err(e) if wait => {
                // Not moved aside: it may be a copy whose owner or mode is about to be fixed.
                wait_for_operator(
                    ctx,
                    &format!(
                        "bootstrap file unreadable: {e}; waiting for a readable bootstrap file at {}",
                        path.display()
                    ),
                )
                .await;
                continue;
            }
            // Without wait mode, a blank or missing file is reported by the parser below.
            Ok(b) => b,
            Err(_) => Vec::new(),
        };
        if refused.as_ref() == Some(&bytes) {
            wait_for_operator(ctx, &waiting).await;
            continue;
        }
        let bootstrap =
            match Bootstrap::from_bytes(&path, &bytes).map_err(|e| match std::fs::metadata(&path) {
                // Say "no such file" rather than what an empty file fails to parse as.
                Err(io) => anyhow!("{}: {io}", path.display()),
                Ok(_) => anyhow!(e),
            }) {
                Ok(b) => b,
                Err(e) if !wait => bail!(
                    "not enrolled yet and no usable bootstrap file at {}: {e}",
                    path.display()
                ),
                Err(e) => {
                    if unparsed.as_ref() != Some(&bytes) {
                        unparsed = Some(bytes);
                        tokio::time::sleep(ctx.bootstrap_poll).await;
                        continue;
                    }
                    ctx.state.lock().count("bootstrap_unreadable");
                    tracing::error!(error = %e, "bootstrap file unreadable; moving it aside");
                    set_aside(&path, &bytes, &mut refused);
                    waiting = format!(
                        "bootstrap file unreadable: {e}; waiting for a new bootstrap file at {}",
                        path.display()
                    );
                    continue;
                }
            };
        unparsed = None;
        let carried = bootstrap
            .policy_key()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let choice = match choose_policy_key(ctx.pinned_key.as_ref(), carried, dir, &path) {
            Ok(c) => c,
            Err(e) if !wait => bail!("{e}"),
            Err(e) => {
                // The token is not spent: the file is kept (moved aside) for a second try.
                ctx.state.lock().count("bootstrap_without_policy_key");
                tracing::error!(error = %e, "bootstrap file unusable; moving it aside");
                set_aside(&path, &bytes, &mut refused);
                waiting = format!(
                    "bootstrap file unusable: {e}; waiting for a new bootstrap file at {}",
                    path.display()
                );
                continue;
            }
        };
        if let Some(w) = &choice.warning {
            tracing::warn!("{w}");
        }
        let mut bootstrap = bootstrap;
        if !ctx.config.enroll_urls.is_empty() {
            bootstrap.enroll_urls = ctx.config.enroll_urls.clone();
        }
        set_state(ctx, "enrolling");
        let keys = WgKeys::generate();
        let enrollment = match enroll_with_retries(ctx, &bootstrap, &keys).await {
            Ok(e) => e,
            Err(e) => {
                ctx.state.lock().count("enroll_refused");
                if !wait {
                    bail!("enrollment refused: {e}");
                }
                tracing::error!(error = %e, "enrollment refused; moving the bootstrap file aside");
                set_aside(&path, &bytes, &mut refused);
                waiting = format!(
                    "enrollment refused: {}; waiting for a new bootstrap file at {}",
                    refusal_reason(&e),
                    path.display()
                );
                continue;
            }
        };
        // The key first: an enrollment without its key would be useless, a key without an
        // enrollment is overwritten on the next attempt. The policy key before the enrollment
        // too: an enrolled appliance without it could not verify any policy.
        write_secret(&key_path, &format!("{}\n", keys.private_base64()))?;
        if choice.store {
            let stored = dir.join(POLICY_KEY_FILE);
            write_public(&stored, &format!("{}\n", B64.encode(&choice.key)))?;
            tracing::info!(path = %stored.display(), key_id = %komnet_policy::bundle::key_id(&choice.key), "policy signing key from the bootstrap file pinned");
        }
        enrollment
            .save(&enrollment_path)
            .with_context(|| format!("saving {}", enrollment_path.display()))?;
        ctx.state.lock().count("enrolled");
        tracing::info!(path = %enrollment_path.display(), "enrolled; the bootstrap token is used up");
        return Ok((enrollment, keys, choice.key));
    }
}

/// Enrols, retrying network trouble (and the service's rate limit) for as long as it takes;
/// returns the service's final refusal.
async fn enroll_with_retries(
    ctx: &Ctx,
    bootstrap: &Bootstrap,
    keys: &WgKeys,
) -> Result<Enrollment, ClientError> {
    let mut delay = Duration::from_secs(1);
    loop {
        match client::enroll(bootstrap, keys).await {
            Ok(e) => return Ok(e),
            Err(e) if is_final(&e) => return Err(e),
            Err(e) => {
                ctx.state.lock().count("enroll_retry");
                tracing::warn!(error = %e, retry_in = ?delay, "enrollment service not reachable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The service's own words when it answered, else the whole error.
fn refusal_reason(e: &ClientError) -> String {
    match e.api_error() {
        Some(api) => {
            // The code as the service spells it on the wire (`token_used`).
            let code = serde_json::to_value(api.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{:?}", api.code));
            format!("{} ({code})", api.message)
        }
        None => e.to_string(),
    }
}

/// Shows `state` while the appliance waits for an operator to bring a bootstrap file, and
/// waits one poll interval.
///
/// READY=1 goes out when the wait begins. systemd's start job would otherwise stay open until
/// someone brings a file, possibly days: `systemctl start` would hang and the boot would never
/// finish (multi-user.target waits for the units it wants). The daemon has done all it can
/// without an operator, the state says what it needs, and the watchdog covers it from now on.
/// A first start that waits for the enrollment service (no operator needed) still extends the
/// start timeout instead.
async fn wait_for_operator(ctx: &Ctx, state: &str) {
    set_state(ctx, state);
    if !ctx.ready.swap(true, Ordering::AcqRel) {
        notify_logged(&ctx.notify.ready(&status_line(ctx)));
    }
    tokio::time::sleep(ctx.bootstrap_poll).await;
}

/// Renames a refused bootstrap file to `<file>.refused` (replacing an older one) unless it
/// changed meanwhile; when that fails its content is remembered, so it is not tried again.
fn set_aside(path: &Path, bytes: &[u8], refused: &mut Option<Vec<u8>>) {
    let mut to = path.as_os_str().to_owned();
    to.push(".refused");
    let to = PathBuf::from(to);
    if std::fs::read(path).ok().as_deref() != Some(bytes) {
        // Already replaced by a new file: that one is tried next.
        return;
    }
    match std::fs::rename(path, &to) {
        Ok(()) => {
            *refused = None;
            tracing::info!(to = %to.display(), "refused bootstrap file moved aside");
        }
        Err(e) => {
            tracing::warn!(error = %e, to = %to.display(), "cannot move the refused bootstrap file aside; ignoring it until it changes");
            *refused = Some(bytes.to_vec());
        }
    }
}

/// Which policy key to pin at a first enrollment, and whether to store it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyChoice {
    key: Vec<u8>,
    /// Write it to `DATA_DIR/policy.pub` once enrolled (it came from the bootstrap file).
    store: bool,
    warning: Option<String>,
}

/// gateway.toml's key wins; else the bootstrap file's (it comes with the trust anchor this
/// enrollment is made with, so at a re-enrollment it replaces the one stored at the earlier
/// one); else the stored one.
fn choose_policy_key(
    pinned: Option<&PinnedKey>,
    carried: Option<Vec<u8>>,
    data_dir: &Path,
    bootstrap: &Path,
) -> Result<KeyChoice, String> {
    use komnet_policy::bundle::key_id;
    match (pinned, carried) {
        (
            Some(
                p @ PinnedKey {
                    source: KeySource::Configured(path),
                    ..
                },
            ),
            carried,
        ) => Ok(KeyChoice {
            key: p.key.clone(),
            store: false,
            warning: carried.filter(|c| *c != p.key).map(|c| {
                format!(
                    "the bootstrap file carries policy signing key {}, but gateway.toml's \
                     policy_public_key ({}) is {}: pinning the configured one",
                    key_id(&c),
                    path.display(),
                    key_id(&p.key)
                )
            }),
        }),
        (
            Some(
                p @ PinnedKey {
                    source: KeySource::Stored(path),
                    ..
                },
            ),
            Some(c),
        ) => Ok(KeyChoice {
            warning: (c != p.key).then(|| {
                format!(
                    "{} holds policy signing key {} from an earlier enrollment; the bootstrap file \
                     carries {}, which replaces it",
                    path.display(),
                    key_id(&p.key),
                    key_id(&c)
                )
            }),
            key: c,
            store: true,
        }),
        (Some(p), None) => Ok(KeyChoice {
            key: p.key.clone(),
            store: false,
            warning: None,
        }),
        (None, Some(c)) => Ok(KeyChoice {
            key: c,
            store: true,
            warning: None,
        }),
        (None, None) => Err(format!(
            "no policy signing key: gateway.toml sets no policy_public_key, {} does not exist, and \
             the bootstrap file {} carries none (the enrollment service had no policy_public_key \
             when the token was made); set policy_public_key in the service's enroll.toml and make \
             a new token with `komnet token create`, or set policy_public_key in gateway.toml",
            data_dir.join(POLICY_KEY_FILE).display(),
            bootstrap.display()
        )),
    }
}

fn is_final(e: &ClientError) -> bool {
    match e.api_error() {
        Some(api) => !matches!(api.code, ErrorCode::RateLimited | ErrorCode::Internal),
        // A root that does not match its pinned fingerprint is a broken bootstrap file.
        None => matches!(e, ClientError::Config(_) | ClientError::PinMismatch { .. }),
    }
}

// ---- tunnel --------------------------------------------------------------------------------

fn bring_up(ctx: &Ctx, enrollment: &Enrollment, keys: &WgKeys) -> Result<Arc<Shared>> {
    let ifname = &ctx.config.interface;
    let tun = daemon::create_tun(ifname)?;
    net::configure_interface(ifname, &enrollment.identity.tunnel_addrs, TUNNEL_MTU)?;
    net::enable_forwarding()?;
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
    }
    tracing::info!(interface = %ifname, port = shared.sockets().port(), "tunnel up");
    Ok(shared)
}

// ---- policy --------------------------------------------------------------------------------

/// Puts a verified, compiled policy in force (spoke: nftables; hub: the gate and the peer
/// table), then records it as last-known-good. On error the previous policy stays.
async fn put_in_force(
    ctx: &Arc<Ctx>,
    bundle: VerifiedBundle,
    compiled: CompiledPolicy,
) -> Result<()> {
    let compiled = Arc::new(compiled);
    match ctx.config.role {
        GatewayRole::Spoke => {
            let identity = own_identity(ctx)?;
            let policy = &compiled.policy;
            let tenant = policy.tenant_by_name(identity.tenant.as_str());
            let site = tenant
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
            tokio::task::spawn_blocking(move || ruleset.apply())
                .await
                .context("nft task")??;
            if let (true, Some(tenant)) = (ctx.config.lan_addresses, tenant) {
                let plan = lan::gateway_addresses(policy, tenant, site);
                for (segment, prefix) in &plan.skipped {
                    tracing::warn!(
                        segment = %segment,
                        prefix = %prefix,
                        "lan_addresses: no address taken in a single-address prefix (/32, /128): it leaves no room for a router beside its host"
                    );
                }
                ctx.state.lock().lan_wanted = plan.addrs;
                let task = ctx.clone();
                tokio::task::spawn_blocking(move || sync_lan_addresses(&task))
                    .await
                    .context("LAN address task")?;
            }
        }
        GatewayRole::Hub => {
            let shared = ctx.shared.get().ok_or_else(|| anyhow!("tunnel not up"))?;
            let removed = {
                let mut s = ctx.state.lock();
                let now = unix_now();
                let mut changes = s.hub_peers.on_policy_change(now, &compiled.policy);
                // Identities the previous policy did not know may be admitted now.
                let pending: Vec<Identity> = s
                    .registry
                    .values()
                    .filter(|a| s.hub_peers.identity(a.wg_public_key.as_bytes()).is_none())
                    .cloned()
                    .collect();
                for a in pending {
                    let (_, mut c) = s.hub_peers.upsert(now, &compiled.policy, a);
                    changes.append(&mut c);
                }
                // The policy and the identities resolved against it change under one lock, so
                // no packet sees an identity from the other version, and registry changes
                // (which take the state lock first) resolve against the new one from now on.
                let (gate, mut core) = shared.gate_and_core();
                let mut gate = gate.ok_or_else(|| anyhow!("hub without a gate"))?;
                gate.set_policy(compiled.clone());
                s.in_force = Some(compiled.clone());
                apply_peer_changes(ctx, &mut gate, &mut core, &changes)
            };
            release_routes(ctx, &removed);
        }
    }
    bundles(ctx)?.commit(&bundle)?;
    let version = bundle.version;
    let mut s = ctx.state.lock();
    s.policy = Some((compiled, bundle, unix_now()));
    s.policy_error = None;
    s.count("policy_installed");
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
fn bundles(ctx: &Ctx) -> Result<&BundleStore> {
    ctx.bundles
        .get()
        .ok_or_else(|| anyhow!("no policy signing key yet"))
}

fn own_identity(ctx: &Ctx) -> Result<Identity> {
    ctx.state
        .lock()
        .enrollment
        .as_ref()
        .map(|e| e.identity.clone())
        .ok_or_else(|| anyhow!("not enrolled"))
}

fn current_enrollment(ctx: &Ctx) -> Option<Enrollment> {
    ctx.state.lock().enrollment.clone()
}

/// Polls the enrollment service for a newer bundle.
async fn policy_sync(ctx: Arc<Ctx>) {
    loop {
        if let Some(enrollment) = current_enrollment(&ctx) {
            let have = ctx.state.lock().policy.as_ref().map(|p| p.1.version);
            match client::fetch_policy(&enrollment, have).await {
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

async fn offer_bundle(ctx: &Arc<Ctx>, version: u64, bytes: &[u8]) {
    let prepared = bundles(ctx).and_then(|store| {
        let s = ctx.state.lock();
        Ok(store.prepare(bytes, s.policy.as_ref().map(|p| &p.1))?)
    });
    let result = match prepared {
        Ok((bundle, compiled)) => put_in_force(ctx, bundle, compiled).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let message = format!("policy version {version} refused: {e:#}");
        let mut s = ctx.state.lock();
        s.count("policy_refused");
        if s.policy_error.as_deref() != Some(&message) {
            tracing::error!(error = %message, "keeping the policy in force");
        }
        s.policy_error = Some(message);
    }
}

// ---- LAN addresses (spoke, `lan_addresses`) ---------------------------------------------

/// Makes the first `lan` interface carry the addresses the policy in force wants: adds the
/// wanted ones (already there is fine) and takes off those this process put there before that
/// are no longer wanted. Addresses it did not put there are left alone. A failure does not
/// undo the policy (the firewall is in force either way); it is logged, counted and retried
/// by the spoke watcher.
fn sync_lan_addresses(ctx: &Ctx) {
    let Some(lan) = ctx.config.lan.first() else {
        return;
    };
    let _one_at_a_time = ctx.lan_lock.lock();
    let (wanted, put) = {
        let s = ctx.state.lock();
        (s.lan_wanted.clone(), s.lan_put.clone())
    };
    let remove: Vec<IpNet> = put
        .iter()
        .filter(|a| !wanted.contains(a))
        .copied()
        .collect();
    let result = net::set_lan_addresses(lan, &wanted, &remove);
    let mut s = ctx.state.lock();
    match result {
        Ok(()) => {
            if s.lan_put != wanted || s.lan_retry {
                tracing::info!(interface = %lan, addresses = ?wanted.iter().map(ToString::to_string).collect::<Vec<_>>(), removed = ?remove.iter().map(ToString::to_string).collect::<Vec<_>>(), "LAN addresses set");
            }
            s.lan_put = wanted;
            s.lan_retry = false;
        }
        Err(e) => {
            // Which lines failed is not known: everything that may be there is remembered, so
            // that a later change takes it off again.
            for a in wanted {
                if !s.lan_put.contains(&a) {
                    s.lan_put.push(a);
                }
            }
            s.lan_retry = true;
            s.count("lan_addresses_failed");
            tracing::error!(interface = %lan, error = %e, "cannot set the LAN addresses; retrying");
        }
    }
}

// ---- renewal -------------------------------------------------------------------------------

async fn renewal(ctx: Arc<Ctx>) {
    let Some(keys) = ctx.keys.get().cloned() else {
        return;
    };
    loop {
        let Some(enrollment) = current_enrollment(&ctx) else {
            return;
        };
        let wait = enrollment.renew_after - unix_now();
        if wait > 0 {
            tokio::time::sleep(Duration::from_secs(wait.min(3600) as u64)).await;
            continue;
        }
        match client::renew(&enrollment, &keys).await {
            Ok(renewed) => {
                let path = ctx.config.data_dir.join(ENROLLMENT_FILE);
                if let Err(e) = renewed.save(&path) {
                    tracing::error!(error = %e, path = %path.display(), "cannot store the renewed certificate");
                }
                tracing::info!(serial = %renewed.identity.serial, not_after = renewed.identity.not_after, "certificate renewed");
                // The hub list is the spoke watcher's to change (it re-applies the peers).
                let mut s = ctx.state.lock();
                s.count("renewed");
                s.enrollment = Some(renewed);
            }
            Err(e) => {
                ctx.state.lock().count("renew_failed");
                let expired = enrollment.identity.not_after <= unix_now();
                if expired {
                    tracing::error!(error = %e, "certificate expired; the appliance needs a new bootstrap token");
                } else {
                    tracing::warn!(error = %e, "renewal failed; retrying");
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

// ---- hub -----------------------------------------------------------------------------------

/// Applies admission changes to the peer table and the gate (both locked by the caller).
/// Returns the keys that were removed, whose routes the caller releases.
fn apply_peer_changes(
    ctx: &Ctx,
    gate: &mut Gate,
    core: &mut Core,
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
                    core.remove_peer(id);
                }
                removed.push(*key);
            }
        }
    }
    removed
}

fn release_routes(ctx: &Ctx, keys: &[[u8; 32]]) {
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
fn change_peers(ctx: &Ctx, decide: impl FnOnce(&mut ControlState) -> Vec<PeerChange>) {
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
        apply_peer_changes(ctx, &mut gate, &mut core, &changes)
    };
    shared.flush_pending();
    release_routes(ctx, &removed);
}

/// Admits (or refuses) one identity from the registry.
fn admit(s: &mut ControlState, identity: &Identity) -> Vec<PeerChange> {
    let admission = identity.clone();
    s.registry
        .insert(*admission.wg_public_key.as_bytes(), admission.clone());
    let Some(policy) = s.in_force.clone() else {
        // Kept in the registry view; admitted once a policy is in force.
        return Vec::new();
    };
    let (result, changes) = s.hub_peers.upsert(unix_now(), &policy.policy, admission);
    match result {
        Ok(()) => s.count("peer_admitted"),
        Err(e) => {
            s.count("peer_refused");
            tracing::warn!(tenant = identity.tenant.as_str(), site = identity.site.as_str(), error = %e, "identity not admitted");
        }
    }
    changes
}

fn withdraw(s: &mut ControlState, key: &[u8; 32]) -> Vec<PeerChange> {
    s.registry.remove(key);
    let change = s.hub_peers.remove(key);
    if change.is_some() {
        s.count("peer_removed");
    }
    change.into_iter().collect()
}

/// Follows the registry: a snapshot, then its change stream; after any failure, again.
async fn follow_registry(ctx: Arc<Ctx>) {
    loop {
        if let Err(e) = follow_once(&ctx).await {
            tracing::warn!(error = %e, "registry connection lost; reconnecting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow_once(ctx: &Arc<Ctx>) -> Result<()> {
    let enrollment = current_enrollment(ctx).ok_or_else(|| anyhow!("not enrolled"))?;
    let snapshot = client::registry_snapshot(&enrollment).await?;
    let keys: std::collections::BTreeSet<[u8; 32]> = snapshot
        .peers
        .iter()
        .map(|i| *i.wg_public_key.as_bytes())
        .collect();
    change_peers(ctx, |s| {
        let mut changes = Vec::new();
        let gone: Vec<[u8; 32]> = s
            .registry
            .keys()
            .filter(|k| !keys.contains(*k))
            .copied()
            .collect();
        for k in gone {
            changes.extend(withdraw(s, &k));
        }
        for identity in &snapshot.peers {
            if identity.role != Role::Hub {
                changes.extend(admit(s, identity));
            }
        }
        changes
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
            s.count("registry_event");
            match &event.change {
                RegistryChange::Upsert(identity) if identity.role != Role::Hub => {
                    admit(s, identity)
                }
                RegistryChange::Upsert(_) => Vec::new(),
                RegistryChange::Remove {
                    wg_public_key,
                    tenant,
                    site,
                    reason,
                    ..
                } => {
                    tracing::info!(
                        tenant = tenant.as_str(),
                        site = site.as_str(),
                        reason = reason.as_str(),
                        "peer revoked"
                    );
                    withdraw(s, wg_public_key.as_bytes())
                }
            }
        });
    }
    bail!("the registry stream ended")
}

/// Expiry of peer certificates, and routes that follow handshakes: a peer's addresses are
/// routed into this hub's tunnel when the peer completes a handshake here (after a spoke
/// fails over, the hub it moved to takes its routes).
async fn hub_housekeeping(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_expiry = Instant::now();
    loop {
        tick.tick().await;
        if last_expiry.elapsed() >= Duration::from_secs(1) {
            last_expiry = Instant::now();
            change_peers(&ctx, |s| {
                let expired = s.hub_peers.expire(unix_now());
                for c in &expired {
                    if let PeerChange::Remove { key } = c {
                        s.registry.remove(key);
                        s.count("peer_expired");
                    }
                }
                expired
            });
        }
        claim_routes(&ctx);
    }
}

fn peer_snapshot(shared: &Shared) -> Vec<PeerInfo> {
    shared.core().peers(Instant::now(), SystemTime::now())
}

fn claim_routes(ctx: &Ctx) {
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

// ---- spoke ---------------------------------------------------------------------------------

/// Configures the hubs as peers: the active one carries the data centre's routes and keeps
/// the session warm; the others wait with only their tunnel addresses.
fn apply_hubs(ctx: &Ctx) {
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
            s.active_hub,
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
async fn resolve_hub_endpoints(hubs: &[HubPeer]) -> Vec<Option<SocketAddr>> {
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

/// Watches the active hub; when it has sent nothing for `failover_after`, moves to the next.
/// Also refreshes the list of hubs from the enrollment service now and then.
async fn spoke_watch(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_rx: Option<(usize, u64)> = None;
    let mut heard = Instant::now();
    let mut last_refresh = Instant::now();
    let mut last_lan_retry = Instant::now();
    loop {
        tick.tick().await;
        let Some(shared) = ctx.shared.get() else {
            continue;
        };
        let (active_key, n, active) = {
            let s = ctx.state.lock();
            (
                s.hubs
                    .get(s.active_hub)
                    .map(|h| *h.wg_public_key.as_bytes()),
                s.hubs.len(),
                s.active_hub,
            )
        };
        if let Some(key) = active_key {
            let rx = peer_snapshot(shared)
                .into_iter()
                .find(|p| p.public_key == key)
                .map_or(0, |p| p.rx_bytes);
            if last_rx != Some((active, rx)) {
                last_rx = Some((active, rx));
                heard = Instant::now();
            } else if heard.elapsed() >= ctx.config.failover_after.0 {
                // With one hub: a fresh handshake (it may have restarted and lost the
                // session); with more: the next hub takes over.
                let next = (active + 1) % n;
                if next != active {
                    {
                        let mut s = ctx.state.lock();
                        s.active_hub = next;
                        s.count("failover");
                    }
                    tracing::warn!(from = active, to = next, silent_for = ?heard.elapsed(), "hub not answering; failing over");
                    apply_hubs(&ctx);
                } else {
                    ctx.state.lock().count("hub_rehandshake");
                    tracing::info!(silent_for = ?heard.elapsed(), "hub silent; starting a new handshake");
                }
                let next_key = ctx
                    .state
                    .lock()
                    .hubs
                    .get(next)
                    .map(|h| *h.wg_public_key.as_bytes());
                if let Some(key) = next_key {
                    {
                        let mut core = shared.core();
                        if let Some(id) = core.peer_id(&key) {
                            core.force_handshake(Instant::now(), id);
                        }
                    }
                    shared.flush_pending();
                }
                heard = Instant::now();
            }
        }
        if ctx.state.lock().lan_retry && last_lan_retry.elapsed() >= Duration::from_secs(10) {
            last_lan_retry = Instant::now();
            let task = ctx.clone();
            let _ = tokio::task::spawn_blocking(move || sync_lan_addresses(&task)).await;
        }
        let refresh_every = if n == 0 {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(60)
        };
        if last_refresh.elapsed() >= refresh_every {
            last_refresh = Instant::now();
            if let Some(enrollment) = current_enrollment(&ctx) {
                match client::fetch_hubs(&enrollment).await {
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
                                s.active_hub = s.active_hub.min(hubs.len().saturating_sub(1));
                            }
                            (changed, routes_changed)
                        };
                        if routes_changed {
                            let mut routes = enrollment.allowed_ips.clone();
                            routes.extend(hubs.iter().flat_map(|h| h.tunnel_addrs.clone()));
                            if let Err(e) = net::replace_routes(&ctx.config.interface, &routes) {
                                tracing::warn!(error = %e, "routes to the hubs");
                            }
                        }
                        if changed {
                            apply_hubs(&ctx);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "hub list refresh failed"),
                }
            }
        }
    }
}

// ---- status --------------------------------------------------------------------------------

fn report(ctx: &Ctx) -> StatusReport {
    let peers = ctx
        .shared
        .get()
        .map(|s| peer_snapshot(s))
        .unwrap_or_default();
    let mut shares: HashMap<PeerId, FlowShare> = HashMap::new();
    let mut datacentre_flows = None;
    let (flows, mut drops, mut counters) = match ctx.shared.get() {
        Some(shared) => {
            let (gate, core) = shared.gate_and_core();
            if let Some(g) = gate.as_ref() {
                let share = |s: crate::firewall::OwnerStats| FlowShare {
                    flows: s.flows,
                    evicted: s.evicted,
                };
                for p in &peers {
                    shares.insert(p.id, share(g.owner_stats(FlowOwner::Peer(p.id))));
                }
                datacentre_flows = Some(share(g.owner_stats(FlowOwner::DataCentre)));
            }
            let mut drops: BTreeMap<String, u64> = BTreeMap::new();
            for reason in crate::core::DropReason::ALL {
                let mut n = core.device_drops().get(*reason);
                for p in &peers {
                    n += core.peer_drops(p.id).map_or(0, |d| d.get(*reason));
                }
                if n > 0 {
                    drops.insert(reason.as_str().to_owned(), n);
                }
            }
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
    let s = ctx.state.lock();
    counters.extend(s.counters.iter().map(|(k, v)| (k.clone(), *v)));
    drops.retain(|_, v| *v > 0);
    let identity = s.enrollment.as_ref().map(|e| &e.identity);
    let active_key = s
        .hubs
        .get(s.active_hub)
        .map(|h| *h.wg_public_key.as_bytes());
    let peers = peers
        .into_iter()
        .map(|p| {
            let admitted = s.registry.get(&p.public_key);
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
        lan_addresses: s.lan_put.iter().map(ToString::to_string).collect(),
        certificate: s.enrollment.as_ref().map(|e| CertificateStatus {
            serial: e.identity.serial.clone(),
            not_after: e.identity.not_after,
            renew_after: e.renew_after,
        }),
        policy: s.policy.as_ref().map(|(c, b, at)| PolicyStatus {
            version: c.version(),
            name: b.name.clone(),
            installed_at: *at,
        }),
        policy_error: s.policy_error.clone(),
        peers,
        flows,
        datacentre_flows,
        drops,
        counters,
    }
}

/// Serves `GET /metrics` and `GET /status` on the management address: a bare HTTP/1 server,
/// one task per connection, each connection closed after a minute.
async fn serve_status(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) {
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

async fn status_answer(
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
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text.into_bytes(),
            )
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

    fn pinned(key: u8, source: KeySource) -> PinnedKey {
        PinnedKey {
            key: vec![key; 32],
            source,
        }
    }

    fn choose(pinned: Option<&PinnedKey>, carried: Option<u8>) -> Result<KeyChoice, String> {
        choose_policy_key(
            pinned,
            carried.map(|k| vec![k; 32]),
            Path::new("/var/lib/komnet"),
            Path::new("/var/lib/komnet/bootstrap.json"),
        )
    }

    #[test]
    fn the_configured_policy_key_wins_and_a_different_carried_one_is_warned_about() {
        let configured = pinned(1, KeySource::Configured("/etc/komnet/policy.pub".into()));
        let c = choose(Some(&configured), Some(1)).unwrap();
        assert_eq!((c.key, c.store, c.warning), (vec![1; 32], false, None));
        let c = choose(Some(&configured), None).unwrap();
        assert_eq!((c.key, c.store, c.warning), (vec![1; 32], false, None));
        let c = choose(Some(&configured), Some(2)).unwrap();
        assert_eq!((&c.key, c.store), (&vec![1; 32], false));
        let w = c.warning.unwrap();
        assert!(
            w.contains("/etc/komnet/policy.pub") && w.contains("pinning the configured one"),
            "{w}"
        );
    }

    #[test]
    fn the_bootstrap_files_key_is_pinned_and_stored_when_none_is_configured() {
        let c = choose(None, Some(3)).unwrap();
        assert_eq!((c.key, c.store, c.warning), (vec![3; 32], true, None));
        // Stored at an earlier enrollment: kept when the new file carries none, replaced (with
        // a warning) by the key of the file this enrollment is made with.
        let stored = pinned(4, KeySource::Stored("/var/lib/komnet/policy.pub".into()));
        let c = choose(Some(&stored), None).unwrap();
        assert_eq!((c.key, c.store, c.warning), (vec![4; 32], false, None));
        let c = choose(Some(&stored), Some(4)).unwrap();
        assert_eq!((c.key, c.store, c.warning), (vec![4; 32], true, None));
        let c = choose(Some(&stored), Some(5)).unwrap();
        assert_eq!((&c.key, c.store), (&vec![5; 32], true));
        assert!(c.warning.unwrap().contains("replaces it"));
    }

    #[test]
    fn no_policy_key_anywhere_says_where_it_looked_and_what_to_do() {
        let e = choose(None, None).unwrap_err();
        for part in [
            "no policy signing key",
            "gateway.toml sets no policy_public_key",
            "/var/lib/komnet/policy.pub does not exist",
            "/var/lib/komnet/bootstrap.json carries none",
            "set policy_public_key in the service's enroll.toml",
            "komnet token create",
        ] {
            assert!(e.contains(part), "{part:?} not in {e}");
        }
    }

    #[test]
    fn a_refusal_is_shown_in_the_services_words() {
        let e = ClientError::Api {
            url: "https://enroll.example:8443".into(),
            status: 409,
            error: komnet_proto::api::ApiError {
                code: ErrorCode::TokenUsed,
                message: "token already used".into(),
            },
        };
        assert_eq!(refusal_reason(&e), "token already used (token_used)");
        assert!(is_final(&e));
        let pin = ClientError::PinMismatch {
            expected: "aa".into(),
            actual: "bb".into(),
        };
        assert!(is_final(&pin));
        let net = ClientError::Connect {
            url: "https://enroll.example:8443".into(),
            message: "connection refused".into(),
        };
        assert!(!is_final(&net));
    }

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "komnet-appliance-{name}-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn test_config(dir: &Path, extra: &str) -> GatewayConfig {
        GatewayConfig::parse(
            Path::new("gateway.toml"),
            &format!(
                "role = \"spoke\"\nlan = [\"eth1\"]\ndata_dir = \"{}\"\n{extra}",
                dir.display()
            ),
        )
        .unwrap()
    }

    fn test_ctx(dir: &Path, extra: &str) -> Arc<Ctx> {
        let config = test_config(dir, extra);
        let (events, _) = channel();
        Arc::new(Ctx {
            pinned_key: pinned_policy_key(&config).unwrap(),
            config,
            state: Mutex::new(ControlState::default()),
            shared: OnceLock::new(),
            keys: OnceLock::new(),
            bundles: OnceLock::new(),
            lan_lock: Mutex::new(()),
            bootstrap_poll: Duration::from_millis(20),
            events,
            notify: Notifier::disabled(),
            ready: AtomicBool::new(false),
        })
    }

    /// A bootstrap file that parses but whose root is no certificate: the client refuses it
    /// before any connection, as final as a spent token.
    fn bootstrap_json(policy_key: Option<u8>) -> String {
        let b = Bootstrap {
            version: 1,
            token: "kmt1.0011223344556677.secret".into(),
            enroll_urls: vec!["https://127.0.0.1:9".into()],
            root_fingerprint: "00".repeat(32),
            root_ca_pem: "not a certificate".into(),
            wg_proof_public_key: komnet_proto::identity::WgPublicKey::from_bytes([9; 32]).unwrap(),
            policy_public_key: policy_key.map(|k| B64.encode([k; 32])),
        };
        serde_json::to_string(&b).unwrap()
    }

    async fn wait_for_state(ctx: &Ctx, what: impl Fn(&str) -> bool) -> String {
        for _ in 0..500 {
            let state = ctx.state.lock().state.clone();
            if what(&state) {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("state now: {}", ctx.state.lock().state);
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_bootstrap_file_sets_refused_and_unreadable_ones_aside() {
        let scratch = Scratch::new("wait");
        let dir = scratch.0.clone();
        let path = dir.join("bootstrap.json");
        let ctx = test_ctx(&dir, "wait_for_bootstrap = true\n");
        let task = {
            let ctx = ctx.clone();
            tokio::spawn(async move { obtain_identity(&ctx).await.map(|_| ()) })
        };
        let waiting = format!("waiting for a bootstrap file at {}", path.display());
        wait_for_state(&ctx, |s| s == waiting).await;
        assert!(ctx.ready.load(Ordering::Acquire), "READY=1 once waiting");

        // Blank is the same as missing.
        std::fs::write(&path, "\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ctx.state.lock().state, waiting);
        assert!(path.exists());

        // Not JSON: moved aside (once it stayed the same for a poll), and said why.
        std::fs::write(&path, "{ half a file").unwrap();
        let s = wait_for_state(&ctx, |s| s.starts_with("bootstrap file unreadable: ")).await;
        let again = format!("; waiting for a new bootstrap file at {}", path.display());
        assert!(s.ends_with(&again), "{s}");
        assert_eq!(files(&dir), ["bootstrap.json.refused"]);

        // Refused: moved aside, replacing the older one, nothing else written.
        std::fs::write(&path, bootstrap_json(Some(7))).unwrap();
        let s = wait_for_state(&ctx, |s| s.starts_with("enrollment refused: ")).await;
        assert!(s.contains("bootstrap root CA"), "{s}");
        assert!(s.ends_with(&again), "{s}");
        assert_eq!(files(&dir), ["bootstrap.json.refused"]);
        assert_eq!(
            std::fs::read_to_string(dir.join("bootstrap.json.refused")).unwrap(),
            bootstrap_json(Some(7))
        );
        assert_eq!(ctx.state.lock().counters.get("enroll_refused"), Some(&1));
        assert_eq!(
            ctx.state.lock().counters.get("bootstrap_unreadable"),
            Some(&1)
        );

        // No key anywhere: not sent to the service (the token is not spent), moved aside.
        std::fs::write(&path, bootstrap_json(None)).unwrap();
        let s = wait_for_state(&ctx, |s| {
            s.starts_with("bootstrap file unusable: no policy signing key")
        })
        .await;
        assert!(s.ends_with(&again), "{s}");
        assert_eq!(files(&dir), ["bootstrap.json.refused"]);
        assert_eq!(ctx.state.lock().counters.get("enroll_refused"), Some(&1));
        assert!(!task.is_finished(), "it waits on");
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_wait_mode_a_missing_or_refused_bootstrap_file_stops_the_start() {
        let scratch = Scratch::new("nowait");
        let dir = scratch.0.clone();
        let ctx = test_ctx(&dir, "");
        let e = format!("{:#}", obtain_identity(&ctx).await.err().unwrap());
        assert!(
            e.contains("not enrolled yet and no usable bootstrap file"),
            "{e}"
        );
        assert!(e.contains("No such file"), "{e}");

        std::fs::write(dir.join("bootstrap.json"), bootstrap_json(None)).unwrap();
        let e = format!("{:#}", obtain_identity(&ctx).await.err().unwrap());
        assert!(e.starts_with("no policy signing key"), "{e}");

        // A configured key is enough; the refusal is final and leaves the file where it is.
        let configured = dir.join("configured.pub");
        std::fs::write(&configured, B64.encode([3u8; 32])).unwrap();
        let ctx = test_ctx(
            &dir,
            &format!("policy_public_key = \"{}\"\n", configured.display()),
        );
        let e = format!("{:#}", obtain_identity(&ctx).await.err().unwrap());
        assert!(e.starts_with("enrollment refused: "), "{e}");
        assert_eq!(files(&dir), ["bootstrap.json", "configured.pub"]);
        assert!(!ctx.ready.load(Ordering::Acquire));
    }

    #[test]
    fn a_stored_policy_key_is_pinned_at_start_and_a_broken_one_named() {
        let scratch = Scratch::new("stored");
        let dir = scratch.0.clone();
        assert!(pinned_policy_key(&test_config(&dir, "")).unwrap().is_none());
        let stored = dir.join(POLICY_KEY_FILE);
        std::fs::write(&stored, format!("{}\n", B64.encode([5u8; 32]))).unwrap();
        let p = pinned_policy_key(&test_config(&dir, "")).unwrap().unwrap();
        assert_eq!(p.key, vec![5; 32]);
        assert_eq!(p.source, KeySource::Stored(stored.clone()));
        // A configured one is read instead.
        let configured = dir.join("c.pub");
        std::fs::write(&configured, B64.encode([6u8; 32])).unwrap();
        let c = test_config(
            &dir,
            &format!("policy_public_key = \"{}\"\n", configured.display()),
        );
        assert_eq!(pinned_policy_key(&c).unwrap().unwrap().key, vec![6; 32]);
        std::fs::write(&stored, "short\n").unwrap();
        let e = format!(
            "{:#}",
            pinned_policy_key(&test_config(&dir, "")).unwrap_err()
        );
        assert!(
            e.contains("policy.pub was written when this appliance enrolled"),
            "{e}"
        );
    }
}
