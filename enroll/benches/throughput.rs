//! End-to-end figures for the enrollment service, over real HTTPS on loopback:
//!
//! 1. certificates issued per second: N appliances enroll with their own tokens through
//!    `client::enroll` (TCP + TLS 1.3 handshake, `GET /v1/info`, CSR + WireGuard proof,
//!    `POST /v1/simpleenroll`), C at a time; client and service share this machine's cores;
//! 2. registry fan-out: W hubs follow the registry over server-sent events; for each of R
//!    revocations, the time from the revocation call to the last watcher having it.
//!
//! `cargo bench -p komnet-enroll --bench throughput` (env: ENROLLS, CONCURRENCY, WATCHERS,
//! REVOCATIONS). Not criterion: these are throughput and fan-out latency of a whole service,
//! not one hot function.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use komnet_enroll::api::admin::RevokeRequest;
use komnet_enroll::api::{RegistryChange, RevocationReason};
use komnet_enroll::client::{self, WgKeys};
use komnet_enroll::config::Config;
use komnet_enroll::identity::{Role, SiteId, TenantId};
use komnet_enroll::server;
use komnet_enroll::service::{self, Clock as _, Service, SystemClock};
use komnet_enroll::token::Bootstrap;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bootstrap(service: &Service, url: &str, tenant: &str, site: &str, role: Role) -> Bootstrap {
    komnet_enroll::testing::bootstrap(service, url, tenant, site, role, "bench").unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// utime + stime of a process, in seconds (from /proc/PID/stat, clock ticks of 1/100 s).
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The service as its own process (the real binary), so its CPU time per certificate can be
/// told apart from the clients'.
async fn separate_process(enrolls: usize, concurrency: usize) {
    use komnet_enroll::admin::{AdminCommand, SocketArg, TokenCommand, TokenCreateArgs};
    use komnet_enroll::config::HumanDuration;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = env!("CARGO_BIN_EXE_komnet-enroll");
    let status = std::process::Command::new(bin)
        .args(["init", "--server-name", "127.0.0.1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--enroll-url")
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mut config = Config::load(dir.path()).unwrap();
    komnet_enroll::testing::allow_many_requests_from_one_source(&mut config);
    std::fs::write(dir.path().join("enroll.toml"), config.to_toml()).unwrap();
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let mut boots = Vec::with_capacity(enrolls);
    for i in 0..enrolls {
        let out = dir.path().join(format!("b{i}.json"));
        komnet_enroll::admin::run_to(
            AdminCommand::Token(TokenCommand::Create(TokenCreateArgs {
                tenant: TenantId::parse(&format!("tenant{}", i / 1000)).unwrap(),
                site: SiteId::parse(&format!("site{i}")).unwrap(),
                role: Role::Spoke,
                ttl: HumanDuration(Duration::from_secs(3600)),
                out: Some(out.clone()),
                urls: Vec::new(),
                socket: SocketArg {
                    socket: dir.path().join("admin.sock"),
                },
            })),
            &mut std::io::sink(),
        )
        .await
        .unwrap();
        boots.push(Bootstrap::read(&out).unwrap());
    }
    let keys: Vec<WgKeys> = (0..enrolls).map(|_| WgKeys::generate()).collect();
    let cpu_before = process_cpu_secs(child.id());
    let (done, secs) = run_enrollments(boots, keys, concurrency).await;
    let cpu = process_cpu_secs(child.id()) - cpu_before;
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "enroll (service in its own process): {done} certificates in {secs:.2} s = {:.0} certificates/s end to end; service CPU {:.0} µs per certificate = {:.0} certificates/s per core, {:.0} on this machine's 2 cores with the clients elsewhere",
        done as f64 / secs,
        cpu / done as f64 * 1e6,
        done as f64 / cpu,
        2.0 * done as f64 / cpu,
    );
}

/// Enrolls every bootstrap with its key, `concurrency` at a time; (count, seconds).
async fn run_enrollments(
    boots: Vec<Bootstrap>,
    keys: Vec<WgKeys>,
    concurrency: usize,
) -> (usize, f64) {
    let work = Arc::new((boots, keys, std::sync::atomic::AtomicUsize::new(0)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            loop {
                let i = work.2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= work.0.len() {
                    return n;
                }
                client::enroll(&work.0[i], &work.1[i])
                    .await
                    .expect("enrollment failed");
                n += 1;
            }
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    (done, started.elapsed().as_secs_f64())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there is nothing to list.
    }
    let enrolls = env("ENROLLS", 5000);
    let concurrency = env("CONCURRENCY", 32);
    let watchers = env("WATCHERS", 1000);
    let revocations = env("REVOCATIONS", 20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let config = komnet_enroll::testing::loopback_config();
        service::init(dir.path(), &config, SystemClock.now()).unwrap();
        let service =
            Arc::new(Service::open_with_config(dir.path(), config, Arc::new(SystemClock)).unwrap());
        let running = server::start(service.clone(), "127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        let url = format!("https://127.0.0.1:{}", running.addr.port());

        // 1. Certificates per second.
        let boots: Vec<Bootstrap> = (0..enrolls)
            .map(|i| {
                let tenant = format!("tenant{}", i / 1000);
                bootstrap(&service, &url, &tenant, &format!("site{i}"), Role::Spoke)
            })
            .collect();
        let keys: Vec<WgKeys> = (0..enrolls).map(|_| WgKeys::generate()).collect();
        let (done, secs) = run_enrollments(boots, keys, concurrency).await;
        println!(
            "enroll: {done} certificates in {secs:.2} s = {:.0} certificates/s end to end over HTTPS ({concurrency} concurrent clients, new TLS connection each)",
            done as f64 / secs
        );

        // 2. Registry fan-out.
        let hub = client::enroll(
            &bootstrap(&service, &url, "dc", "hub1", Role::Hub),
            &WgKeys::generate(),
        )
        .await
        .unwrap();
        let version = client::registry_snapshot(&hub).await.unwrap().version;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        let ready = Arc::new(tokio::sync::Barrier::new(watchers + 1));
        let connect_started = Instant::now();
        for _ in 0..watchers {
            let hub = hub.clone();
            let tx = tx.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let mut follower = client::follow_registry(&hub, version).await.unwrap();
                ready.wait().await;
                // The stream ends with an error when the service stops at the end of the run.
                while let Some(Ok(ev)) = follower.next().await {
                    if let RegistryChange::Remove { .. } = ev.change {
                        let _ = tx.send((ev.version, Instant::now()));
                    }
                }
            });
        }
        ready.wait().await;
        println!(
            "registry: {watchers} watchers connected in {:.2} s",
            connect_started.elapsed().as_secs_f64()
        );
        let mut last_arrivals = Vec::new();
        let mut all_arrivals = Vec::new();
        for r in 0..revocations {
            let serial = {
                let snap = service.store.registry_snapshot(service.now()).unwrap();
                snap.peers
                    .iter()
                    .find(|p| p.role == Role::Spoke)
                    .map(|p| p.serial.clone())
                    .unwrap()
            };
            let t0 = Instant::now();
            let svc = service.clone();
            let resp = tokio::task::spawn_blocking(move || {
                svc.revoke(
                    &RevokeRequest {
                        serial: Some(serial),
                        tenant: None,
                        site: None,
                        reason: RevocationReason::KeyCompromise,
                    },
                    "bench",
                )
                .unwrap()
            })
            .await
            .unwrap();
            let mut got = 0;
            let mut last = t0;
            while got < watchers {
                let (v, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("a watcher missed a revocation")
                    .unwrap();
                assert_eq!(v, resp.registry_version, "round {r}");
                got += 1;
                all_arrivals.push(at - t0);
                last = last.max(at);
            }
            last_arrivals.push(last - t0);
        }
        last_arrivals.sort();
        all_arrivals.sort();
        println!(
            "registry: {revocations} revocations to {watchers} watchers: time until the LAST watcher had it p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; any watcher p50 {:.1} ms, p99 {:.1} ms",
            percentile(&last_arrivals, 0.5).as_secs_f64() * 1e3,
            percentile(&last_arrivals, 0.99).as_secs_f64() * 1e3,
            last_arrivals.last().unwrap().as_secs_f64() * 1e3,
            percentile(&all_arrivals, 0.5).as_secs_f64() * 1e3,
            percentile(&all_arrivals, 0.99).as_secs_f64() * 1e3,
        );
        drop(running);
        separate_process(enrolls, concurrency).await;
    });
}
