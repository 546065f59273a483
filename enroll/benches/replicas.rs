//! Certificates per second of the real `komnet-enroll serve` binary, in one run: on its SQLite
//! file, on PostgreSQL with one replica, and on PostgreSQL with two replicas sharing the
//! database (clients split between them). The same client load each time: N appliances enroll
//! with their own tokens through `client::enroll` (new TCP + TLS 1.3 connection, fresh P-256 key
//! and CSR, WireGuard proof, `POST /v1/simpleenroll`), C at a time. PostgreSQL is a throwaway
//! cluster of Debian's server (initdb, pg_ctl) with its default durability (fsync and
//! synchronous_commit on), on a unix socket.
//!
//! `cargo bench -p komnet-enroll --bench replicas` (env: ENROLLS, default 300; CONCURRENCY, 32;
//! SITES_PER_TENANT, 500: how many of the appliances share a commune, i.e. one tenant's address
//! pool and its allocation lock; PG_SYNCHRONOUS_COMMIT, on).
//! Needs PostgreSQL's server (`scripts/setup.sh test`); as root the cluster runs as `nobody`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/postgres.rs"]
mod postgres;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use komnet_enroll::admin::{AdminCommand, SocketArg, TokenCommand, TokenCreateArgs};
use komnet_enroll::client::{self, WgKeys};
use komnet_enroll::config::{Config, HumanDuration};
use komnet_enroll::identity::{Role, SiteId, TenantId};
use komnet_enroll::token::Bootstrap;

const BIN: &str = env!("CARGO_BIN_EXE_komnet-enroll");

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Replica {
    dir: PathBuf,
    url: String,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// `init` (with `database` if given) and `serve`, plus `copies` more replicas of the same data
/// directory on their own ports.
fn start(root: &Path, database: Option<&str>, replicas: usize) -> Vec<Replica> {
    let ports: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
    let first = root.join("r0");
    let mut init = Command::new(BIN);
    init.args([
        "init",
        "--metrics-listen",
        "off",
        "--server-name",
        "127.0.0.1",
    ])
    .arg("--data-dir")
    .arg(&first)
    .arg("--listen")
    .arg(format!("127.0.0.1:{}", ports[0]))
    .stdout(Stdio::null());
    if let Some(db) = database {
        init.arg("--database").arg(db);
    }
    assert!(init.status().unwrap().success());
    let mut config = Config::load(&first).unwrap();
    komnet_enroll::testing::allow_many_requests_from_one_source(&mut config);
    std::fs::write(first.join("enroll.toml"), config.to_toml()).unwrap();
    let mut out = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let dir = root.join(format!("r{i}"));
        if i > 0 {
            assert!(Command::new("cp")
                .arg("-a")
                .arg(&first)
                .arg(&dir)
                .status()
                .unwrap()
                .success());
            config.listen = format!("127.0.0.1:{port}").parse().unwrap();
            std::fs::write(dir.join("enroll.toml"), config.to_toml()).unwrap();
        }
        let mut child = Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on"), "{line:?}");
        out.push(Replica {
            dir,
            url: format!("https://127.0.0.1:{port}"),
            child,
        });
    }
    out
}

/// One token per appliance (through the first replica's admin socket), each appliance sent to
/// replica `i % replicas`.
async fn tokens(replicas: &[Replica], n: usize, per_tenant: usize) -> Vec<Bootstrap> {
    let mut boots = Vec::with_capacity(n);
    for i in 0..n {
        let out = replicas[0].dir.join(format!("b{i}.json"));
        komnet_enroll::admin::run_to(
            AdminCommand::Token(TokenCommand::Create(TokenCreateArgs {
                tenant: TenantId::parse(&format!("tenant{}", i / per_tenant)).unwrap(),
                site: SiteId::parse(&format!("site{i}")).unwrap(),
                role: Role::Spoke,
                ttl: HumanDuration(Duration::from_secs(3600)),
                out: Some(out.clone()),
                urls: vec![replicas[i % replicas.len()].url.clone()],
                socket: SocketArg {
                    socket: replicas[0].dir.join("admin.sock"),
                },
            })),
            &mut std::io::sink(),
        )
        .await
        .unwrap();
        boots.push(Bootstrap::read(&out).unwrap());
    }
    boots
}

/// Enrolls every bootstrap, `concurrency` at a time; seconds taken.
async fn enroll_all(boots: Vec<Bootstrap>, concurrency: usize) -> f64 {
    let keys: Vec<WgKeys> = (0..boots.len()).map(|_| WgKeys::generate()).collect();
    let work = Arc::new((boots, keys, AtomicUsize::new(0)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = work.2.fetch_add(1, Ordering::Relaxed);
                if i >= work.0.len() {
                    return;
                }
                client::enroll(&work.0[i], &work.1[i])
                    .await
                    .expect("enrollment failed");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed().as_secs_f64()
}

async fn measure(label: &str, replicas: Vec<Replica>, enrolls: usize, concurrency: usize) {
    let boots = tokens(&replicas, enrolls, env("SITES_PER_TENANT", 500).max(1)).await;
    let before: Vec<f64> = replicas.iter().map(|r| cpu_secs(r.child.id())).collect();
    let secs = enroll_all(boots, concurrency).await;
    let cpu: f64 = replicas
        .iter()
        .zip(before)
        .map(|(r, b)| cpu_secs(r.child.id()) - b)
        .sum();
    println!(
        "{label}: {enrolls} certificates in {secs:.2} s = {:.0} certificates/s; service CPU \
         {:.0} µs per certificate (all replicas)",
        enrolls as f64 / secs,
        cpu / enrolls as f64 * 1e6
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let enrolls = env("ENROLLS", 300);
    let concurrency = env("CONCURRENCY", 32);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let root = tempfile::tempdir().unwrap();
        let sqlite = start(&root.path().join("sqlite"), None, 1);
        measure("SQLite, 1 process", sqlite, enrolls, concurrency).await;

        // Default durability: every commit waits for its WAL flush, as in production.
        // PG_SYNCHRONOUS_COMMIT=off shows what that flush costs.
        let sync = std::env::var("PG_SYNCHRONOUS_COMMIT").unwrap_or_else(|_| "on".into());
        let setting = format!("synchronous_commit={sync}");
        let pg = postgres::Cluster::start_with(&["-c", &setting]);
        println!("PostgreSQL with {setting}");
        for (name, replicas) in [("one", 1), ("two", 2)] {
            let db = format!("bench_{name}");
            pg.create_database(&db).await;
            let started = start(&root.path().join(&db), Some(&pg.url(&db)), replicas);
            measure(
                &format!("PostgreSQL, {replicas} replica(s)"),
                started,
                enrolls,
                concurrency,
            )
            .await;
        }
    });
}
