//! The real binary: `komnet-enroll init` and `serve`, the admin commands over the 0600 socket,
//! `kill -9` in the middle of enrollments (no half-issued state), restart persistence, and logs
//! that never contain a token or a key.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use komnet_enroll::client::{self, WgKeys};
use komnet_enroll::config::Config;
use komnet_enroll::token::Bootstrap;

use common::daemon::{free_port, Daemon, BIN};

/// `init` with a policy key from `policy` (the `.pub` file `komnet policy keygen` writes).
fn init(dir: &Path, port: u16, policy: &common::PolicyFixture) {
    let pub_file = policy.dir.path().join("signing.pub");
    std::fs::write(&pub_file, policy.public_key_text()).unwrap();
    let out = Command::new(BIN)
        .args(["init", "--metrics-listen", "off", "--data-dir"])
        .arg(dir)
        .args([
            "--server-name",
            "127.0.0.1",
            "--hub-endpoint",
            "hub1=198.51.100.7:51820",
        ])
        .arg("--policy-public-key")
        .arg(&pub_file)
        .arg("--enroll-url")
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("root fingerprint (SHA-256): "), "{stdout}");
    for key in ["ca/root.key", "ca/issuing.key", "enroll-dh.key"] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // A second init refuses to overwrite the CA.
    let again = Command::new(BIN)
        .args(["init", "--metrics-listen", "off", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    // Many enrollments come from this one address in these tests.
    let mut config = Config::load(dir).unwrap();
    assert_eq!(
        config.policy_public_key.as_deref(),
        Some(policy.public_key_text().trim())
    );
    assert_eq!(
        config.hub_endpoints.values().collect::<Vec<_>>(),
        ["198.51.100.7:51820"]
    );
    komnet_enroll::testing::allow_many_requests_from_one_source(&mut config);
    std::fs::write(dir.join("enroll.toml"), config.to_toml()).unwrap();
}

fn serve(dir: &Path, log_name: &str) -> Daemon {
    Daemon::serve(dir, &["--log-json"], "debug", log_name)
}

fn admin(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(dir.join("admin.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "komnet-enroll {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn token(dir: &Path, tenant: &str, site: &str, role: &str) -> Bootstrap {
    let file = dir.join(format!(
        "bootstrap-{tenant}-{site}-{}.json",
        rand::random::<u32>()
    ));
    let out = admin(
        dir,
        &[
            "token",
            "create",
            "--tenant",
            tenant,
            "--site",
            site,
            "--role",
            role,
            "--ttl",
            "1h",
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.contains("bootstrap file:"), "{out}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "bootstrap file mode");
    Bootstrap::read(&file).unwrap()
}

fn db(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("enroll.db")).unwrap()
}

fn count(conn: &rusqlite::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_over_the_socket_and_logs_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policy = common::PolicyFixture::new();
    init(dir.path(), port, &policy);
    let daemon = serve(dir.path(), "serve.log");
    let sock = dir.path().join("admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");

    // The operator publishes the signed policy; home-office addresses come from its pools.
    let bundle = dir.path().join("policy.bundle");
    std::fs::write(&bundle, policy.bundle(7)).unwrap();
    let out = admin(dir.path(), &["policy-publish", bundle.to_str().unwrap()]);
    assert!(
        out.contains("published policy") && out.contains("version 7"),
        "{out}"
    );

    // Without a hub, a home-office config cannot be made, and nothing is created.
    let out = Command::new(BIN)
        .args([
            "homeoffice",
            "issue",
            "--tenant",
            "musterstadt",
            "--user",
            "anna",
            "--out-dir",
        ])
        .arg(dir.path())
        .arg("--socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_hub"));

    let hub_keys = WgKeys::generate();
    let hub = client::enroll(&token(dir.path(), "dc", "hub1", "hub"), &hub_keys)
        .await
        .unwrap();
    let spoke_bootstrap = token(dir.path(), "musterstadt", "rathaus", "spoke");
    let spoke_keys = WgKeys::generate();
    let spoke = client::enroll(&spoke_bootstrap, &spoke_keys).await.unwrap();
    // A replay of the used token is refused.
    assert!(client::enroll(&spoke_bootstrap, &WgKeys::generate())
        .await
        .is_err());

    // Home office with a generated key pair: conf + PNG (0600), the private key in the file.
    let ho_dir = dir.path().join("ho");
    let out = admin(
        dir.path(),
        &[
            "homeoffice",
            "issue",
            "--tenant",
            "musterstadt",
            "--user",
            "anna.schmidt",
            "--out-dir",
            ho_dir.to_str().unwrap(),
        ],
    );
    assert!(out.contains("PrivateKey = "), "{out}");
    assert!(
        out.contains('█') || out.contains('▀') || out.contains('▄'),
        "no QR on the terminal"
    );
    let conf = std::fs::read_to_string(ho_dir.join("anna.schmidt.conf")).unwrap();
    assert!(
        conf.contains(&format!("PublicKey = {}", hub_keys.public())),
        "{conf}"
    );
    assert!(conf.contains("Endpoint = 198.51.100.7:51820"), "{conf}");
    assert!(
        conf.contains("Address = 10.250.20.1/32, fd00:250:20::1/128"),
        "an address from musterstadt's home-office pool: {conf}"
    );
    let png = std::fs::read(ho_dir.join("anna.schmidt.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    for f in ["anna.schmidt.conf", "anna.schmidt.png"] {
        let mode = std::fs::metadata(ho_dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let ho_private = conf
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .unwrap()
        .to_owned();
    // With the user's own public key: no private key anywhere.
    let own = WgKeys::generate();
    let out = admin(
        dir.path(),
        &[
            "homeoffice",
            "issue",
            "--tenant",
            "musterstadt",
            "--user",
            "ben",
            "--public-key",
            &own.public().to_base64(),
            "--out-dir",
            ho_dir.to_str().unwrap(),
            "--no-qr",
        ],
    );
    assert!(!out.lines().any(|l| l.starts_with("PrivateKey")), "{out}");

    // The hub sees the spoke and both home-office users; revocation via the CLI removes one.
    let snap = client::registry_snapshot(&hub).await.unwrap();
    assert_eq!(snap.peers.len(), 4, "{:?}", snap.peers);
    let out = admin(
        dir.path(),
        &[
            "revoke",
            "--tenant",
            "musterstadt",
            "--site",
            "anna.schmidt",
            "--reason",
            "key-compromise",
        ],
    );
    assert!(out.contains("revoked "), "{out}");
    let snap = client::registry_snapshot(&hub).await.unwrap();
    assert_eq!(snap.peers.len(), 3);

    // The audit log names the admin by uid.
    let audit = admin(dir.path(), &["audit", "--json", "--limit", "100"]);
    for action in [
        "policy.publish",
        "token.create",
        "enroll",
        "homeoffice.issue",
        "revoke",
    ] {
        assert!(
            audit.contains(&format!("\"action\":\"{action}\"")),
            "{action}: {audit}"
        );
    }
    assert!(audit.contains("\"actor\":\"uid:"), "{audit}");

    // Logs: structured, and no secret in them.
    drop(daemon);
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(
        log.contains("\"action\":\"enroll\""),
        "audit lines missing from the log"
    );
    let (_, secret) = spoke_bootstrap.token.rsplit_once('.').unwrap();
    assert!(!log.contains(secret), "token secret in the log");
    let key_body: String = spoke
        .private_key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!log.contains(&key_body[..40]), "TLS private key in the log");
    assert!(
        !log.contains(&spoke_keys.private_base64()),
        "WireGuard private key in the log"
    );
    assert!(
        !log.contains(&ho_private),
        "home-office private key in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_enrollment_leaves_no_half_state_and_data_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    init(dir.path(), port, &common::PolicyFixture::new());
    let daemon = serve(dir.path(), "serve-1.log");
    let hub = client::enroll(&token(dir.path(), "dc", "hub1", "hub"), &WgKeys::generate())
        .await
        .unwrap();
    let fingerprint = hub.identity.serial.clone();
    let bootstraps: Vec<Bootstrap> = (0..60)
        .map(|i| token(dir.path(), "nohfelden", &format!("site{i}"), "spoke"))
        .collect();
    let bootstraps = Arc::new(bootstraps);

    let mut tasks = Vec::new();
    for i in 0..bootstraps.len() {
        let b = bootstraps.clone();
        tasks.push(tokio::spawn(async move {
            client::enroll(&b[i], &WgKeys::generate()).await
        }));
    }
    // Kill while enrollments are in flight: wait for the first few to commit.
    let started = Instant::now();
    loop {
        let n = count(&db(dir.path()), "SELECT COUNT(*) FROM certificates");
        if n >= 6 || started.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut daemon = daemon;
    daemon.child.kill().unwrap(); // SIGKILL
    daemon.child.wait().unwrap();
    let mut succeeded = Vec::new();
    let mut failed = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(e) => succeeded.push((i, e)),
            Err(_) => failed.push(i),
        }
    }
    assert!(
        !failed.is_empty(),
        "the kill came after every enrollment finished"
    );

    // Consistency straight from the file: every used token has its certificate, address,
    // registry event and audit record, and nothing exists without a used token.
    let conn = db(dir.path());
    let used = count(
        &conn,
        "SELECT COUNT(*) FROM tokens WHERE used_at IS NOT NULL",
    );
    let certs = count(&conn, "SELECT COUNT(*) FROM certificates");
    let hosts = count(&conn, "SELECT COUNT(*) FROM site_hosts");
    let upserts = count(&conn, "SELECT COUNT(*) FROM registry_events");
    let audits = count(&conn, "SELECT COUNT(*) FROM audit WHERE action = 'enroll'");
    assert_eq!((certs, hosts, upserts, audits), (used, used, used, used));
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM certificates c WHERE NOT EXISTS (SELECT 1 FROM tokens t \
             WHERE t.site = c.site AND t.tenant = c.tenant AND t.used_at IS NOT NULL)"
        ),
        0
    );
    drop(conn);

    // Restart: everything acknowledged before the kill is still there.
    let _daemon = serve(dir.path(), "serve-2.log");
    let snap = client::registry_snapshot(&hub).await.unwrap();
    assert_eq!(snap.peers.len() as i64, used, "registry after restart");
    for (_, e) in &succeeded {
        assert!(
            snap.peers.contains(&e.identity),
            "{} lost",
            e.identity.serial
        );
    }
    assert!(snap.peers.iter().any(|p| p.serial == fingerprint));
    // The interrupted ones either retry with the same token (it was never consumed) or find it
    // consumed — and then their certificate is in the registry (committed, answer lost).
    for i in failed {
        match client::enroll(&bootstraps[i], &WgKeys::generate()).await {
            Ok(_) => {}
            Err(e) => {
                let code = e.api_error().map(|a| a.code);
                assert_eq!(code, Some(komnet_enroll::api::ErrorCode::TokenUsed), "{e}");
                let site = format!("site{i}");
                assert!(snap.peers.iter().any(|p| p.site.as_str() == site), "{site}");
            }
        }
    }
    let snap = client::registry_snapshot(&hub).await.unwrap();
    assert_eq!(snap.peers.len(), 61);
}

/// Under a `Type=notify` unit: READY=1 once it listens, WATCHDOG=1 at half of WatchdogSec,
/// STOPPING=1 on SIGTERM; the socket is a file in a temporary directory, as systemd's would be.
#[test]
fn serve_notifies_systemd_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policy = common::PolicyFixture::new();
    let data = dir.path().join("data");
    init(&data, port, &policy);
    let notify_path = dir.path().join("notify");
    let manager = UnixDatagram::bind(&notify_path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon { child };
    let mut buf = [0u8; 512];
    let mut recv = || {
        let len = manager.recv(&mut buf).expect("no notification within 10 s");
        String::from_utf8_lossy(&buf[..len]).into_owned()
    };
    let first = recv();
    assert!(
        first.starts_with("READY=1\nSTATUS=serving https://127.0.0.1:"),
        "{first:?}"
    );
    // It really listens when it says so.
    std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let m = recv();
        assert_eq!(m, "WATCHDOG=1\n");
        pings += 1;
    }
    // Three pings at 100 ms intervals; well under the 10 s a stalled service would take.
    assert!(started.elapsed() < Duration::from_secs(5));
    let status = Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopping = loop {
        let m = recv();
        if m != "WATCHDOG=1\n" {
            break m;
        }
    };
    assert_eq!(stopping, "STOPPING=1\nSTATUS=stopping: SIGTERM\n");
    assert!(daemon.child.wait().unwrap().success());
}

/// The database deleted under `serve`: the process stops with the reason instead of serving
/// from an empty database, and the next start refuses to create one. `backup` works while the
/// service runs, and the backup put back in place (service stopped) starts again.
#[test]
fn serve_stops_when_its_database_is_deleted_and_a_backup_restores() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policy = common::PolicyFixture::new();
    init(dir.path(), port, &policy);
    let mut daemon = serve(dir.path(), "serve.log");
    let _ = token(dir.path(), "nohfelden", "rathaus", "spoke");

    let backup = dir.path().join("enroll-backup.db");
    let out = Command::new(BIN)
        .args(["backup", "--data-dir"])
        .arg(dir.path())
        .arg("--out")
        .arg(&backup)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(
            &rusqlite::Connection::open(&backup).unwrap(),
            "SELECT COUNT(*) FROM tokens"
        ),
        1
    );

    for f in ["enroll.db", "enroll.db-wal", "enroll.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let started = Instant::now();
    let status = loop {
        if let Some(s) = daemon.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "serve kept running on a deleted database"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(log.contains("was deleted while the service ran"), "{log}");

    // Restarting does not make a new, empty database.
    let out = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is missing") && err.contains("restore the last backup"),
        "{err}"
    );
    assert!(!dir.path().join("enroll.db").exists());

    // Restore as docs/operations.md says: the backup copied into place, then start.
    std::fs::copy(&backup, dir.path().join("enroll.db")).unwrap();
    let _daemon = serve(dir.path(), "serve2.log");
    assert_eq!(count(&db(dir.path()), "SELECT COUNT(*) FROM tokens"), 1);
}

/// Log lines for people and for log shippers: without a terminal no colour codes; with
/// `--log-json` one JSON object per line with exactly one top-level `message`; refusals say
/// what was refused in words, without Rust type names.
#[test]
fn logs_are_plain_without_a_terminal_and_json_lines_have_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policy = common::PolicyFixture::new();
    init(dir.path(), port, &policy);
    {
        let _daemon = serve(dir.path(), "serve.log");
        // A refused revocation: the error names the site as people write it.
        let out = Command::new(BIN)
            .args([
                "revoke",
                "--tenant",
                "tholey",
                "--site",
                "rathaus",
                "--reason",
                "key-compromise",
            ])
            .arg("--socket")
            .arg(dir.path().join("admin.sock"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no valid certificate for site tholey/rathaus"),
            "{err}"
        );
        assert!(!err.contains("TenantId") && !err.contains("Site("), "{err}");
    }
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert_eq!(line.matches("\"message\":").count(), 1, "{line}");
        assert!(v["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines > 0);
    assert!(
        log.contains("request refused: revoke: no valid certificate for site tholey/rathaus"),
        "{log}"
    );

    // A home-office user is a user, not a site.
    let out = Command::new(BIN)
        .args([
            "homeoffice",
            "issue",
            "--tenant",
            "tholey",
            "--user",
            "Anna Schmidt",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("user name \"Anna Schmidt\" is not valid"),
        "{err}"
    );
    assert!(!err.contains("site"), "{err}");

    // Plain text to a file: no ANSI escape sequences.
    let plain_log = dir.path().join("plain.log");
    drop(Daemon::serve(dir.path(), &[], "debug", "plain.log"));
    let text = std::fs::read_to_string(&plain_log).unwrap();
    assert!(!text.is_empty(), "no log lines to check");
    assert!(!text.contains('\u{1b}'), "{text:?}");
}
