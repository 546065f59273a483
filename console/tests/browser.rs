//! The console end to end: a real enrollment service (in this process, on loopback, with its
//! admin socket), a real OpenID provider (npm `oidc-provider`, console/tests/e2e/provider.mjs),
//! the console binary, and Debian's Chromium driven by Playwright (console/tests/e2e/e2e.mjs):
//! sign-in, role separation by direct URLs, CSRF refusal, token creation and download,
//! revocation, axe-core. Afterwards the audit log must name the people from the provider.
//!
//! Needs node, /usr/bin/chromium and `npm ci` in console/tests/e2e: `scripts/setup.sh test`
//! installs them. Missing pieces fail the test with that message; it never skips.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use komnet_enroll::config::Config;
use komnet_enroll::identity::Role;
use komnet_enroll::service::{self, Clock as _, Service, SystemClock};

/// A child process killed when the test ends, however it ends.
struct Killed(Child, &'static str);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

fn chromium() -> PathBuf {
    std::env::var_os("KOMNET_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Everything the test needs from outside Cargo, or a message saying how to get it.
fn check_prerequisites() {
    let mut missing = Vec::new();
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (Debian package nodejs)".to_owned());
    }
    if !chromium().exists() {
        missing.push(format!(
            "{} (Debian package chromium)",
            chromium().display()
        ));
    }
    for module in ["oidc-provider", "playwright-core", "@axe-core/playwright"] {
        if !e2e_dir().join("node_modules").join(module).exists() {
            missing.push(format!("{module} (npm ci in {})", e2e_dir().display()));
        }
    }
    assert!(
        missing.is_empty(),
        "the console's browser test needs: {}; scripts/setup.sh test installs them",
        missing.join(", ")
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Killed) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("{} exited before it listened: {status}", child.1);
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen on {port} within 20 s",
            child.1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The demo district's policy (examples/policy/st-wendel) with two more sites in Tholey,
/// signed with a fresh key, and its next version (a fourth site, a new description: what the
/// policy page shows as the diff): returns both bundles and enroll.toml's `policy_public_key`.
fn policy_bundles(dir: &Path) -> (Vec<u8>, Vec<u8>, String) {
    use base64::Engine as _;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/st-wendel");
    let dst = dir.join("policy");
    std::fs::create_dir_all(dst.join("tenants")).unwrap();
    for entry in std::fs::read_dir(src.join("tenants")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join("tenants").join(entry.file_name())).unwrap();
    }
    let operator = std::fs::read_to_string(src.join("operator.toml")).unwrap();
    let marker = "[tenants.tholey.sites.rathaus]";
    let (version, description) = ("\nversion = 1\n", "description = \"Gemeinde Tholey\"");
    assert!(
        operator.contains(marker) && operator.contains(version) && operator.contains(description),
        "examples/policy/st-wendel changed"
    );
    let operator = operator.replace(
        marker,
        "[tenants.tholey.sites.bauhof]\nprefixes = [\"10.41.0.0/16\"]\n\
         [tenants.tholey.sites.schule]\nprefixes = [\"10.42.0.0/16\"]\n\
         [tenants.tholey.sites.rathaus]",
    );
    std::fs::write(dst.join("operator.toml"), &operator).unwrap();
    let (private, public) = komnet_policy::bundle::generate_key().unwrap();
    let first = komnet_policy::bundle::create(&dst, &private).unwrap();
    let next = operator
        .replace(version, "\nversion = 2\n")
        .replace(
            description,
            "description = \"Gemeinde Tholey (Schaumberg)\"",
        )
        .replace(
            marker,
            "[tenants.tholey.sites.freibad]\nprefixes = [\"10.43.0.0/16\"]\n\
             [tenants.tholey.sites.rathaus]",
        );
    std::fs::write(dst.join("operator.toml"), next).unwrap();
    let second = komnet_policy::bundle::create(&dst, &private).unwrap();
    let key = format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(public)
    );
    (first, second, key)
}

/// Tholey's home offices are MFA-gated (10 h after a sign-in with a second factor).
fn service_config(policy_public_key: String) -> Config {
    let mut config = Config {
        policy_public_key: Some(policy_public_key),
        ..komnet_enroll::testing::loopback_config()
    };
    config.mfa_window.insert(
        komnet_enroll::identity::TenantId::parse("tholey").unwrap(),
        komnet_proto::config::HumanDuration(Duration::from_secs(10 * 3600)),
    );
    config
}

/// Enrolls an appliance over the service's HTTPS API, as a town hall's (or hub's) would.
async fn enroll(
    service: &Service,
    url: &str,
    tenant: &str,
    site: &str,
    role: Role,
) -> (
    komnet_enroll::client::Enrollment,
    komnet_enroll::client::WgKeys,
) {
    let bootstrap =
        komnet_enroll::testing::bootstrap(service, url, tenant, site, role, "browser-test")
            .unwrap();
    let keys = komnet_enroll::client::WgKeys::generate();
    let enrollment = komnet_enroll::client::enroll(&bootstrap, &keys)
        .await
        .unwrap();
    (enrollment, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    check_prerequisites();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("enroll");
    let (bundle, next_bundle, policy_key) = policy_bundles(dir.path());
    let config = service_config(policy_key);
    service::init(&data, &config, SystemClock.now()).unwrap();
    let service =
        Arc::new(Service::open_with_config(&data, config, Arc::new(SystemClock)).unwrap());
    let socket = data.join(komnet_enroll::server::ADMIN_SOCKET);
    let server = komnet_enroll::server::start(
        service.clone(),
        "127.0.0.1:0".parse().unwrap(),
        Some(&socket),
    )
    .await
    .unwrap();
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    service.publish_policy(&bundle, "browser-test").unwrap();
    // The policy page shows what version 2 changed from version 1.
    service
        .publish_policy(&next_bundle, "browser-test")
        .unwrap();
    let mut enrolled = Vec::new();
    for (tenant, site, role) in [
        ("kreis", "hub1", Role::Hub),
        ("tholey", "rathaus", Role::Spoke),
        ("tholey", "bauhof", Role::Spoke),
        ("nohfelden", "rathaus", Role::Spoke),
    ] {
        enrolled.push(enroll(&service, &url, tenant, site, role).await);
    }
    // The hub reports Tholey's town hall: a handshake a minute ago, 3 refused packets (what
    // a running hub sends every 15 s; the fleet page shows it per site).
    let report = komnet_proto::status::HubReport {
        peers: vec![komnet_proto::status::HubPeerReport {
            public_key: enrolled[1].1.public().to_base64(),
            tenant: "tholey".into(),
            site: "rathaus".into(),
            role: "spoke".into(),
            last_handshake: Some(SystemClock.now() - 60),
            rx_bytes: 4_096,
            tx_bytes: 8_192,
            drops: 1,
            denied: 2,
        }],
    };
    komnet_enroll::client::Client::for_enrollment(&enrolled[0].0)
        .unwrap()
        .report_hub(&report)
        .await
        .unwrap();

    let idp_port = free_port();
    let console_port = free_port();
    let console_url = format!("http://localhost:{console_port}");
    let mut idp = Killed(
        Command::new("node")
            .arg(e2e_dir().join("provider.mjs"))
            .env("IDP_PORT", idp_port.to_string())
            .env("CONSOLE_URL", &console_url)
            .stdout(Stdio::null())
            .spawn()
            .expect("start node provider.mjs"),
        "the OpenID provider (provider.mjs)",
    );
    wait_for_port(idp_port, &mut idp);

    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "console-test-secret\n").unwrap();
    let console_toml = dir.path().join("console.toml");
    std::fs::write(
        &console_toml,
        format!(
            r#"listen = "127.0.0.1:{console_port}"
public_url = "{console_url}"
admin_socket = "{}"
[oidc]
issuer = "http://localhost:{idp_port}"
client_id = "komnet-console"
client_secret_file = "{}"
scopes = ["profile", "komnet"]
"#,
            socket.display(),
            secret.display()
        ),
    )
    .unwrap();
    let mut console = Killed(
        Command::new(env!("CARGO_BIN_EXE_komnet-console"))
            .arg("--config")
            .arg(&console_toml)
            // KOMNET_CONSOLE_LOG=info shows every sign-in (acr, amr) when a step fails.
            .env(
                "RUST_LOG",
                std::env::var("KOMNET_CONSOLE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .expect("start komnet-console"),
        "komnet-console",
    );
    wait_for_port(console_port, &mut console);
    let ready = started.elapsed();

    let shots = std::env::var("KOMNET_CONSOLE_SCREENSHOTS").unwrap_or_default();
    let mut e2e = Command::new("node")
        .arg(e2e_dir().join("e2e.mjs"))
        .env("CONSOLE_URL", &console_url)
        .env("CHROMIUM", chromium())
        .env("SCREENSHOT_DIR", &shots)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node e2e.mjs");
    let mut token_id = None;
    for line in BufReader::new(e2e.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        println!("{line}");
        if let Some(id) = line.strip_prefix("BOOTSTRAP_TOKEN_ID ") {
            token_id = Some(id.to_owned());
        }
    }
    let status = e2e.wait().unwrap();
    assert!(
        status.success(),
        "the browser test failed (its steps are above)"
    );

    // The service's audit log names the people from the identity provider.
    let audit = service.store.audit_log(1000).unwrap();
    let created = audit
        .iter()
        .find(|r| r.action == "token.create" && r.details["site"] == "schule")
        .expect("token.create for tholey/schule in the audit log");
    assert!(
        created
            .actor
            .starts_with("tom (oidc sub tom, commune admin of tholey) via uid:"),
        "{}",
        created.actor
    );
    assert_eq!(created.details["token_id"].as_str(), token_id.as_deref());
    let revoked = audit
        .iter()
        .find(|r| r.action == "revoke")
        .expect("the revocation in the audit log");
    assert!(
        revoked.actor.starts_with("tom (oidc sub tom"),
        "{}",
        revoked.actor
    );
    assert_eq!(revoked.details["selector"], "site tholey/bauhof");
    assert_eq!(revoked.details["reason"], "key_compromise");
    assert!(
        !audit
            .iter()
            .any(|r| r.action == "revoke" && r.details["selector"] == "site nohfelden/rathaus"),
        "Nohfelden's site was revoked by Tholey's admin"
    );
    let device = audit
        .iter()
        .find(|r| r.action == "homeoffice.issue")
        .expect("the home-office device in the audit log");
    assert!(
        device
            .actor
            .starts_with("uwe (oidc sub uwe, user of tholey) via uid:"),
        "{}",
        device.actor
    );
    assert_eq!(device.details["user"], "uwe_laptop");
    // Issued without a second factor: closed; Uwe's sign-in with one opened its window.
    assert!(
        device.details["admitted_until"].as_i64().is_some(),
        "{device:?}"
    );
    let window = audit
        .iter()
        .find(|r| r.action == "homeoffice.mfa_window")
        .expect("the MFA window in the audit log");
    assert!(
        window
            .actor
            .starts_with("uwe (oidc sub uwe, user of tholey)"),
        "{}",
        window.actor
    );
    assert_eq!(window.details["owner"], "uwe");
    assert_eq!(
        window.details["admitted_until"].as_i64(),
        window.details["authenticated_at"]
            .as_i64()
            .map(|at| at + 10 * 3600)
    );
    assert_eq!(window.details["serials"].as_array().map(Vec::len), Some(1));
    println!(
        "services ready after {:.1} s, whole test {:.1} s",
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(console);
    drop(idp);
    server.shutdown().await;
}
