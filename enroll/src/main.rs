//! `komnet-enroll`: the data centre's enrollment service. `init` creates a data directory with
//! the CA; `serve` runs the HTTPS API and the admin socket; the admin commands (`token create`,
//! `revoke`, `homeoffice issue`, `audit`, `policy-publish`, `policy-version set`) talk to a
//! running service over that socket and are the same ones the `komnet` admin tool offers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use komnet_enroll::admin::AdminCommand;
use komnet_enroll::config::{self, Config, DatabaseUrl, HumanDuration};
use komnet_enroll::identity::SiteId;
use komnet_enroll::server;
use komnet_enroll::service::{self, Clock as _, Service, SystemClock};
use komnet_proto::service_manager::Notifier;

#[derive(Debug, Parser)]
#[command(
    name = "komnet-enroll",
    version,
    about = "komnet enrollment service and CA"
)]
struct Cli {
    /// Log lines as JSON objects (for the journal and log shippers).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create the data directory: enroll.toml, root and issuing CA (ECDSA P-256, key files
    /// 0600), proof-of-possession key, database. Prints the root fingerprint appliances pin.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// Address the service will listen on.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// DNS name or IP address for the service's TLS certificate (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// URL appliances enroll at, written into bootstrap files (repeatable).
        #[arg(long = "enroll-url")]
        enroll_urls: Vec<String>,
        /// SITE=HOST:PORT: where the hub enrolled as site SITE takes WireGuard connections,
        /// e.g. hub1=192.0.2.1:51820 (repeatable, one per hub).
        #[arg(long = "hub-endpoint", value_parser = parse_hub_endpoint)]
        hub_endpoints: Vec<(SiteId, String)>,
        /// The `.pub` file of `komnet policy keygen`: policy bundles must be signed with its
        /// private key to be published.
        #[arg(long)]
        policy_public_key: Option<PathBuf>,
        /// Lifetime of appliance certificates (at least 1h).
        #[arg(long)]
        cert_lifetime: Option<HumanDuration>,
        /// Where `/metrics` is served (plain HTTP: loopback or a management network), or
        /// `off`.
        #[arg(long, default_value = "127.0.0.1:9130", value_parser = parse_metrics_listen)]
        metrics_listen: MetricsListen,
        /// Keep the state in this PostgreSQL database instead of DATA_DIR/enroll.db:
        /// postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME (or host=… dbname=… user=…). It must be
        /// empty (or hold no komnet schema yet); further replicas copy this data directory
        /// instead of running init (docs/operations.md, "Replicas").
        #[arg(long, value_parser = parse_database)]
        database: Option<DatabaseUrl>,
        /// TLS to that database: the CA certificate (PEM) the server's certificate must chain
        /// to, with the host name in it (libpq's sslmode=verify-full). Copied into DATA_DIR
        /// (enroll.toml: database_ca = "database-ca.pem").
        #[arg(long, requires = "database")]
        database_ca: Option<PathBuf>,
    },
    /// Serve the HTTPS API and the admin socket DATA_DIR/admin.sock until SIGTERM or SIGINT.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        /// Override enroll.toml's listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Copy the database, consistently, while the service runs (SQLite's VACUUM INTO): the
    /// copy is written to OUT.partial, synced and renamed to OUT (mode 0600). Restore: see
    /// docs/operations.md, "Backup and restore". (A PostgreSQL database: pg_dump.)
    Backup {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    #[command(flatten)]
    Admin(AdminCommand),
}

/// Returns when the database file under the running service was deleted or replaced: every
/// write checks it too, but a service that only reads (polls, registry streams) would go on
/// serving what may no longer be true.
async fn watch_database(service: &Service) -> komnet_enroll::store::StoreError {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Err(e) = service.store.check_file() {
            return e;
        }
    }
}

fn parse_database(text: &str) -> Result<DatabaseUrl, String> {
    DatabaseUrl::parse(text)
}

fn parse_hub_endpoint(text: &str) -> Result<(SiteId, String), String> {
    let (site, endpoint) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: write SITE=HOST:PORT, e.g. hub1=192.0.2.1:51820"))?;
    let site = SiteId::parse(site).map_err(|e| e.to_string())?;
    config::check_endpoint(endpoint)?;
    Ok((site, endpoint.to_owned()))
}

/// The key file's content as enroll.toml keeps it (trimmed), after checking it is a key.
fn read_policy_public_key(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    config::decode_policy_public_key(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}; expected the .pub file of `komnet policy keygen`",
            path.display()
        )
    })?;
    Ok(text.trim().to_owned())
}

/// `init` run as root into a data directory that belongs to the service's user (the package
/// creates /var/lib/komnet-enroll for komnet-enroll): the keys and the database it made would
/// be root's, unreadable to the service. Everything under the directory goes to its owner.
/// Returns how many entries changed hands, and to whom.
fn hand_over_to_directory_owner(data_dir: &Path) -> anyhow::Result<Option<(usize, u32)>> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(data_dir)
        .with_context(|| format!("cannot read {}", data_dir.display()))?;
    let (uid, gid) = (meta.uid(), meta.gid());
    let mut changed = 0;
    let mut pending = vec![data_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot list {}", dir.display()))?
                .path();
            let m = std::fs::symlink_metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if m.is_dir() {
                pending.push(path.clone());
            }
            if m.uid() != uid || m.gid() != gid {
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).with_context(|| {
                    format!(
                        "cannot give {} to uid {uid} (the data directory's owner); \
                         run init as that user or as root",
                        path.display()
                    )
                })?;
                changed += 1;
            }
        }
    }
    Ok((changed > 0).then_some((changed, uid)))
}

/// A notification that did not reach systemd changes nothing for the service; if systemd is
/// waiting for it, its own timeout says so.
fn notify_logged(result: &std::io::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "systemd notification not sent");
    }
}

/// `WATCHDOG=1` at half of `WatchdogSec=`, sent only when the database answers in time: a
/// service whose store is wedged answers no enrollment either, and is better restarted.
async fn keepalive(notify: Arc<Notifier>, service: Arc<Service>) {
    let Some(every) = notify.watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = service.clone();
        let probe = tokio::task::spawn_blocking(move || store.store.registry_version());
        match tokio::time::timeout(every, probe).await {
            Ok(Ok(Ok(_))) => notify_logged(&notify.watchdog()),
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "database not answering; withholding the systemd keep-alive");
            }
            Ok(Err(_)) | Err(_) => {
                tracing::error!(waited = ?every, "database not answering in time; withholding the systemd keep-alive");
            }
        }
    }
}

fn init_logging(json: bool) {
    komnet_proto::logging::init(komnet_proto::logging::Format::json_if(json), "info");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("komnet-enroll: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("komnet-enroll: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--metrics-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct MetricsListen(Option<SocketAddr>);

fn parse_metrics_listen(text: &str) -> Result<MetricsListen, String> {
    if text == "off" {
        return Ok(MetricsListen(None));
    }
    text.parse()
        .map(|a| MetricsListen(Some(a)))
        .map_err(|_| format!("{text:?} is not ADDRESS:PORT (e.g. 127.0.0.1:9130) or off"))
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Init {
            data_dir,
            listen,
            server_names,
            enroll_urls,
            hub_endpoints,
            policy_public_key,
            cert_lifetime,
            metrics_listen,
            database,
            database_ca,
        } => {
            let database_ca = database_ca
                .map(|ca| {
                    std::path::absolute(&ca)
                        .with_context(|| format!("--database-ca {}", ca.display()))
                })
                .transpose()?;
            let mut config = Config {
                metrics_listen: metrics_listen.0,
                database,
                database_ca,
                ..Config::default()
            };
            if let Some(l) = listen {
                config.listen = l;
            }
            if !server_names.is_empty() {
                config.server_names = server_names;
            }
            if !enroll_urls.is_empty() {
                config.enroll_urls = enroll_urls;
            } else {
                config.enroll_urls = vec![format!(
                    "https://{}:{}",
                    config
                        .server_names
                        .first()
                        .map(String::as_str)
                        .unwrap_or("localhost"),
                    config.listen.port()
                )];
            }
            let mut endpoints = BTreeMap::new();
            for (site, endpoint) in hub_endpoints {
                if endpoints.insert(site.clone(), endpoint).is_some() {
                    anyhow::bail!("--hub-endpoint: hub {site} given twice");
                }
            }
            config.hub_endpoints = endpoints;
            if let Some(path) = policy_public_key {
                config.policy_public_key = Some(read_policy_public_key(&path)?);
            }
            if let Some(l) = cert_lifetime {
                config.cert_lifetime = l;
            }
            let report = service::init(&data_dir, &config, SystemClock.now())
                .with_context(|| format!("init {}", data_dir.display()))?;
            let handed = hand_over_to_directory_owner(&data_dir)?;
            println!("initialised {}", report.data_dir.display());
            if let Some(db) = &config.database {
                println!(
                    "state kept in the {}; a further replica gets a copy of this data directory \
                     (not init)",
                    db.describe()
                );
            }
            if let Some((n, uid)) = handed {
                println!("gave {n} files to uid {uid}, the owner of the data directory");
            }
            println!("root fingerprint (SHA-256): {}", report.root_fingerprint);
            println!(
                "the root key {} is needed only to make a new issuing CA: move it offline",
                report.root_key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { data_dir, listen } => {
            let service = Arc::new(
                Service::open(&data_dir, Arc::new(SystemClock))
                    .with_context(|| format!("open {}", data_dir.display()))?,
            );
            let listen = listen.unwrap_or(service.config.listen);
            let running = server::start(
                service.clone(),
                listen,
                Some(&data_dir.join(server::ADMIN_SOCKET)),
            )
            .await?;
            println!("komnet-enroll listening on https://{}", running.addr);
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("SIGTERM handler")?;
            let notify = Arc::new(Notifier::from_env().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "not sending systemd notifications");
                Notifier::disabled()
            }));
            notify_logged(&notify.ready(&format!("serving https://{}", running.addr)));
            let keepalive = tokio::spawn(keepalive(notify.clone(), service.clone()));
            let stopped = tokio::select! {
                _ = term.recv() => Ok("SIGTERM"),
                _ = tokio::signal::ctrl_c() => Ok("SIGINT"),
                e = watch_database(&service) => Err(e),
            };
            keepalive.abort();
            match stopped {
                Ok(signal) => {
                    notify_logged(&notify.stopping(&format!("stopping: {signal}")));
                    running.shutdown().await;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    tracing::error!(error = %e, "stopping: the database is gone");
                    notify_logged(&notify.stopping(&format!("stopping: {e}")));
                    running.shutdown().await;
                    Err(anyhow::Error::new(e))
                }
            }
        }
        Command::Backup { data_dir, out } => {
            let config = Config::load(&data_dir)?;
            if let Some(db) = &config.database {
                anyhow::bail!(
                    "{} keeps its state in the {}: back it up with pg_dump \
                     (docs/operations.md, \"Backup and restore\")",
                    data_dir.display(),
                    db.describe()
                );
            }
            let store = komnet_enroll::store::SqliteStore::open(&data_dir)
                .with_context(|| format!("open {}", data_dir.display()))?;
            komnet_enroll::store::Store::backup_to(&store, &out)
                .with_context(|| format!("backup of {}", data_dir.display()))?;
            println!("backup written to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(cmd) => Ok(komnet_enroll::admin::run(cmd).await?),
    }
}
