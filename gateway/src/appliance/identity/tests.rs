//! Identity tests: the policy key choice and waiting for a bootstrap file.

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
        nft_in_force: Mutex::new(None),
        guard_wake: OnceLock::new(),
        service: Mutex::new(None),
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
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
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
    assert_eq!(
        ctx.state
            .lock()
            .all_counters()
            .get("enroll_refused")
            .copied(),
        Some(1)
    );
    assert_eq!(
        ctx.state
            .lock()
            .all_counters()
            .get("bootstrap_unreadable")
            .copied(),
        Some(1)
    );

    // No key anywhere: not sent to the service (the token is not spent), moved aside.
    std::fs::write(&path, bootstrap_json(None)).unwrap();
    let s = wait_for_state(&ctx, |s| {
        s.starts_with("bootstrap file unusable: no policy signing key")
    })
    .await;
    assert!(s.ends_with(&again), "{s}");
    assert_eq!(files(&dir), ["bootstrap.json.refused"]);
    assert_eq!(
        ctx.state
            .lock()
            .all_counters()
            .get("enroll_refused")
            .copied(),
        Some(1)
    );
    assert!(!task.is_finished(), "it waits on");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_mode_a_missing_or_refused_bootstrap_file_stops_the_start() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
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
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
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

#[test]
fn a_pending_enrollment_keeps_its_keys_for_its_token_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(PENDING_ENROLLMENT_FILE);
    let (keys, tls) = PendingEnrollment::keys_for(&path, "token-a").unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the kept keys are secret");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("token-a"),
        "only a digest of the token is kept"
    );

    // A retry (or a restart) with the same token: the same WireGuard key, TLS key and CSR.
    let (again, tls_again) = PendingEnrollment::keys_for(&path, "token-a").unwrap();
    assert_eq!(again.public().to_base64(), keys.public().to_base64());
    assert_eq!(tls_again.private_key_pem, tls.private_key_pem);
    assert_eq!(tls_again.csr_der, tls.csr_der);

    // Another token: new keys, and they replace the old ones.
    let (other, other_tls) = PendingEnrollment::keys_for(&path, "token-b").unwrap();
    assert_ne!(other.public().to_base64(), keys.public().to_base64());
    assert_ne!(other_tls.csr_der, tls.csr_der);
    let (b_again, _) = PendingEnrollment::keys_for(&path, "token-b").unwrap();
    assert_eq!(b_again.public().to_base64(), other.public().to_base64());

    // A damaged file is replaced, not an error that stops the appliance.
    std::fs::write(&path, "{ not json").unwrap();
    let (fresh, _) = PendingEnrollment::keys_for(&path, "token-b").unwrap();
    assert_ne!(fresh.public().to_base64(), other.public().to_base64());
    let (fresh_again, _) = PendingEnrollment::keys_for(&path, "token-b").unwrap();
    assert_eq!(fresh_again.public().to_base64(), fresh.public().to_base64());

    PendingEnrollment::remove(&path);
    assert!(!path.exists());
    PendingEnrollment::remove(&path);
}
