//! Two replicas of the real `komnet-enroll serve` binary on one real PostgreSQL (issue 17,
//! part 1): a token used 100 times at once through both yields exactly one certificate;
//! concurrent enrollments through both never share an address; a revocation made through
//! replica A reaches a hub that follows replica B within 2 s; `kill -9` of a replica in the
//! middle of enrollments leaves every token unused or used with exactly one certificate, and the
//! hub's registry stream goes on from the other replica.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use komnet_enroll::admin::{AdminCommand, RevokeArgs, SocketArg, TokenCommand, TokenCreateArgs};
use komnet_enroll::api::{ErrorCode, RegistryChange, RevocationReason};
use komnet_enroll::client::{self, Enrollment, WgKeys};
use komnet_enroll::config::{Config, HumanDuration};
use komnet_enroll::identity::{Role, SiteId, TenantId};
use komnet_enroll::token::Bootstrap;

use common::daemon::{free_port, Daemon, BIN};

/// A `komnet-enroll serve` process, killed by its PID when dropped.
struct Replica {
    dir: PathBuf,
    url: String,
    daemon: Daemon,
}

impl Replica {
    fn socket(&self) -> SocketArg {
        SocketArg {
            socket: self.dir.join("admin.sock"),
        }
    }

    /// `kill -9`.
    fn kill(&mut self) {
        self.daemon.kill9();
    }
}

fn serve(dir: &Path, port: u16) -> Replica {
    let daemon = Daemon::serve(dir, &[], "info", "serve.log");
    Replica {
        dir: dir.to_owned(),
        url: format!("https://127.0.0.1:{port}"),
        daemon,
    }
}

/// `init --database` once (replica A), a copy of its data directory for replica B (what an
/// operator does: the CA and the proof key are files every replica has), both serving.
fn two_replicas(pg: &common::postgres::Cluster, root: &Path) -> (Replica, Replica) {
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let (a_port, b_port) = (free_port(), free_port());
    let out = Command::new(BIN)
        .args(["init", "--metrics-listen", "off", "--data-dir"])
        .arg(&a_dir)
        .args(["--server-name", "127.0.0.1", "--listen"])
        .arg(format!("127.0.0.1:{a_port}"))
        .arg("--enroll-url")
        .arg(format!("https://127.0.0.1:{a_port}"))
        .arg("--enroll-url")
        .arg(format!("https://127.0.0.1:{b_port}"))
        .args(["--hub-endpoint", "hub1=198.51.100.7:51820", "--database"])
        .arg(pg.url("enroll"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("PostgreSQL database enroll"));
    let mut config = Config::load(&a_dir).unwrap();
    // Every request of these tests comes from 127.0.0.1.
    komnet_enroll::testing::allow_many_requests_from_one_source(&mut config);
    std::fs::write(a_dir.join("enroll.toml"), config.to_toml()).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&a_dir)
        .arg(&b_dir)
        .status()
        .unwrap();
    assert!(copied.success());
    config.listen = format!("127.0.0.1:{b_port}").parse().unwrap();
    std::fs::write(b_dir.join("enroll.toml"), config.to_toml()).unwrap();
    (serve(&a_dir, a_port), serve(&b_dir, b_port))
}

/// A bootstrap file made through `replica`'s admin socket, sending the appliance to `urls`.
async fn token(
    replica: &Replica,
    tenant: &str,
    site: &str,
    role: Role,
    urls: &[&str],
) -> Bootstrap {
    let out = replica
        .dir
        .join(format!("{tenant}-{site}-{}.json", rand_suffix()));
    komnet_enroll::admin::run_to(
        AdminCommand::Token(TokenCommand::Create(TokenCreateArgs {
            tenant: TenantId::parse(tenant).unwrap(),
            site: SiteId::parse(site).unwrap(),
            role,
            ttl: HumanDuration(Duration::from_secs(3600)),
            out: Some(out.clone()),
            urls: urls.iter().map(|u| u.to_string()).collect(),
            socket: replica.socket(),
        })),
        &mut std::io::sink(),
    )
    .await
    .unwrap();
    Bootstrap::read(&out).unwrap()
}

fn rand_suffix() -> u64 {
    rand::random()
}

fn with_urls(b: &Bootstrap, urls: &[&str]) -> Bootstrap {
    Bootstrap {
        enroll_urls: urls.iter().map(|u| u.to_string()).collect(),
        ..b.clone()
    }
}

async fn revoke(replica: &Replica, serial: &str) {
    komnet_enroll::admin::run_to(
        AdminCommand::Revoke(RevokeArgs {
            serial: Some(serial.to_owned()),
            tenant: None,
            site: None,
            reason: RevocationReason::KeyCompromise,
            decommission: false,
            socket: replica.socket(),
        }),
        &mut std::io::sink(),
    )
    .await
    .unwrap();
}

/// Waits (at most `within`) for the removal of `serial` on the hub's stream; how long it took.
async fn removal_arrives(
    follower: &mut komnet_enroll::client::RegistryFollower,
    serial: &str,
    started: Instant,
    within: Duration,
) -> Duration {
    loop {
        let ev = tokio::time::timeout_at((started + within).into(), follower.next())
            .await
            .unwrap_or_else(|_| panic!("the removal of {serial} did not arrive within {within:?}"))
            .expect("the registry stream ended")
            .unwrap();
        if let RegistryChange::Remove { serial: s, .. } = &ev.change {
            if s == serial {
                return started.elapsed();
            }
        }
    }
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hand_out_one_certificate_per_token_and_each_address_once() {
    let pg = common::postgres::Cluster::start();
    pg.create_database("enroll").await;
    let root = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&pg, root.path());
    let db = pg.client("enroll").await;

    // One token, used 100 times at once: 50 requests to each replica, each with its own keys
    // (a copied bootstrap file in many hands). Exactly one gets a certificate.
    let boot = token(&a, "tholey", "rathaus", Role::Spoke, &[]).await;
    let mut uses = tokio::task::JoinSet::new();
    for i in 0..100 {
        let boot = with_urls(&boot, &[if i % 2 == 0 { &a.url } else { &b.url }]);
        uses.spawn(async move { client::enroll(&boot, &WgKeys::generate()).await });
    }
    let (mut issued, mut refused) = (Vec::new(), 0);
    while let Some(r) = uses.join_next().await {
        match r.unwrap() {
            Ok(e) => issued.push(e),
            Err(e) => {
                assert_eq!(
                    e.api_error().map(|a| a.code),
                    Some(ErrorCode::TokenUsed),
                    "{e}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((issued.len(), refused), (1, 99));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM certificates").await, 1);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM token_certificates").await,
        1
    );

    // 60 sites of 6 tenants enroll at once, alternating replicas: new tenant pools and host
    // numbers are allocated concurrently on both, and no address is handed out twice.
    let mut boots = Vec::new();
    for i in 0..60 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let t = format!("gemeinde{}", i % 6);
        boots.push(
            token(
                replica,
                &t,
                &format!("site{i}"),
                Role::Spoke,
                &[&replica.url],
            )
            .await,
        );
    }
    let mut enrolls = tokio::task::JoinSet::new();
    for boot in boots {
        enrolls.spawn(async move { client::enroll(&boot, &WgKeys::generate()).await.unwrap() });
    }
    let mut addrs = BTreeSet::new();
    addrs.extend(issued[0].identity.tunnel_addrs.iter().copied());
    let mut n = 0;
    while let Some(e) = enrolls.join_next().await {
        for addr in e.unwrap().identity.tunnel_addrs {
            assert!(addrs.insert(addr), "{addr} handed out twice");
        }
        n += 1;
    }
    assert_eq!(n, 60);
    assert_eq!(addrs.len(), 61 * 2, "one IPv4 and one IPv6 address each");
    assert_eq!(
        count(&db, "SELECT COUNT(DISTINCT pool) FROM tenant_pools").await,
        7
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM certificates").await, 61);
    // The registry versions both replicas gave out form one sequence without gaps.
    assert_eq!(
        count(&db, "SELECT MAX(version) - COUNT(*) FROM registry_events").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_cross_replicas_and_a_killed_replica_leaves_no_half_enrollment() {
    let pg = common::postgres::Cluster::start();
    pg.create_database("enroll").await;
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = two_replicas(&pg, root.path());
    let db = pg.client("enroll").await;

    // The hub lists both replicas, replica A first: it follows A.
    let hub_boot = token(&a, "dc", "hub1", Role::Hub, &[&a.url, &b.url]).await;
    let hub = client::enroll(&hub_boot, &WgKeys::generate())
        .await
        .unwrap();
    let spoke_boot = token(&b, "tholey", "rathaus", Role::Spoke, &[&b.url]).await;
    let spoke = client::enroll(&spoke_boot, &WgKeys::generate())
        .await
        .unwrap();

    // A hub following replica B hears of a revocation made through replica A within 2 s.
    let hub_on_b = Enrollment {
        enroll_urls: vec![b.url.clone()],
        ..hub.clone()
    };
    let snapshot = client::registry_snapshot(&hub_on_b).await.unwrap();
    let mut on_b = client::follow_registry(&hub_on_b, snapshot.version)
        .await
        .unwrap();
    let started = Instant::now();
    revoke(&a, &spoke.identity.serial).await;
    let took = removal_arrives(
        &mut on_b,
        &spoke.identity.serial,
        started,
        Duration::from_secs(2),
    )
    .await;
    println!("revocation through replica A reached the hub on replica B after {took:?}");
    drop(on_b);

    // The hub follows replica A now (its first URL).
    let snapshot = client::registry_snapshot(&hub).await.unwrap();
    let mut follower = client::follow_registry(&hub, snapshot.version)
        .await
        .unwrap();

    // 40 appliances enroll through replica A; it is killed while they are under way. Each
    // keeps its keys and CSR, as the appliance does for a retry.
    let mut pending = Vec::new();
    for i in 0..40 {
        let boot = token(&b, "nohfelden", &format!("site{i}"), Role::Spoke, &[&a.url]).await;
        let keys = WgKeys::generate();
        let key = client::new_enrollment_key().unwrap();
        pending.push(std::sync::Arc::new((boot, keys, key)));
    }
    let mut enrolls = tokio::task::JoinSet::new();
    for (i, p) in pending.iter().cloned().enumerate() {
        enrolls.spawn(async move {
            let (boot, keys, key) = &*p;
            (i, client::enroll_with_key(boot, keys, key).await.is_ok())
        });
    }
    // Killed once some have their certificate and others are still in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    let committed =
        "SELECT COUNT(*) FROM token_certificates tc JOIN tokens t ON t.id = tc.token_id \
                     WHERE t.tenant = 'nohfelden'";
    while count(&db, committed).await < 10 {
        assert!(
            Instant::now() < deadline,
            "no enrollment went through replica A"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill();
    let mut answered = BTreeSet::new();
    while let Some(r) = enrolls.join_next().await {
        let (i, ok) = r.unwrap();
        if ok {
            answered.insert(i);
        }
    }
    assert!(
        answered.len() < 40,
        "replica A was killed after every enrollment was done"
    );

    // Every token is unused, or used with exactly one certificate: nothing half-issued.
    let rows = db
        .query(
            "SELECT t.site, t.used_at IS NOT NULL, \
             (SELECT COUNT(*) FROM token_certificates tc WHERE tc.token_id = t.id), \
             (SELECT COUNT(*) FROM certificates c WHERE c.tenant = t.tenant AND c.site = t.site), \
             (SELECT COUNT(*) FROM site_hosts h WHERE h.tenant = t.tenant AND h.site = t.site) \
             FROM tokens t WHERE t.tenant = 'nohfelden'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 40);
    let mut used = 0;
    for r in &rows {
        let (site, is_used): (String, bool) = (r.get(0), r.get(1));
        let (bought, certs, hosts): (i64, i64, i64) = (r.get(2), r.get(3), r.get(4));
        if is_used {
            used += 1;
            assert_eq!((bought, certs, hosts), (1, 1, 1), "{site}: used");
        } else {
            assert_eq!((bought, certs, hosts), (0, 0, 0), "{site}: unused");
        }
    }
    assert!(
        used >= answered.len(),
        "every answered enrollment is committed"
    );
    println!(
        "kill -9 of replica A: {} of 40 answered, {used} committed, {} unused",
        answered.len(),
        40 - used
    );

    // The hub's stream from A ended; it connects again with its last version and gets replica
    // B (A refuses connections), which carries on where A stopped.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match follower.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream from the killed replica did not end");
    assert!(!matches!(end, Some(Ok(_))));
    let mut follower = client::follow_registry(&hub, follower.last_version)
        .await
        .unwrap();

    // Every appliance whose answer was lost asks again (same token, keys and CSR) through B:
    // a committed one gets its certificate again, an uncommitted one a new one.
    for (i, p) in pending.iter().enumerate() {
        if answered.contains(&i) {
            continue;
        }
        let (boot, keys, key) = &**p;
        client::enroll_with_key(&with_urls(boot, &[&b.url]), keys, key)
            .await
            .unwrap();
    }
    assert_eq!(count(&db, committed).await, 40);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM certificates WHERE tenant = 'nohfelden'"
        )
        .await,
        40
    );

    // And the hub, now on B, still hears of revocations.
    let victim = db
        .query_one(
            "SELECT serial FROM certificates WHERE tenant = 'nohfelden' AND status = 'valid' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    let started = Instant::now();
    revoke(&b, &victim).await;
    removal_arrives(&mut follower, &victim, started, Duration::from_secs(2)).await;
}
