//! The appliance's identity: the stored enrollment or a first enrollment from the bootstrap
//! file (waiting for one if asked to), the pinned policy signing key, and certificate renewal.

use super::*;

/// Where the pinned policy key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeySource {
    /// `policy_public_key` in gateway.toml.
    Configured(PathBuf),
    /// `DATA_DIR/policy.pub`, from the bootstrap file of an earlier enrollment.
    Stored(PathBuf),
}

#[derive(Debug, Clone)]
pub(super) struct PinnedKey {
    key: Vec<u8>,
    source: KeySource,
}

/// The key gateway.toml names, else the one an earlier enrollment stored, else none yet (the
/// bootstrap file brings it).
pub(super) fn pinned_policy_key(config: &GatewayConfig) -> Result<Option<PinnedKey>> {
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

pub(super) fn is_blank(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace))
}

pub(super) fn read_policy_key(path: &Path, what: &str) -> Result<Vec<u8>> {
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

// ---- identity ------------------------------------------------------------------------------

pub(super) fn write_secret(path: &Path, text: &str) -> Result<()> {
    Ok(write_atomic(path, text.as_bytes(), Visibility::Secret)?)
}

/// A public file (the pinned policy key).
pub(super) fn write_public(path: &Path, text: &str) -> Result<()> {
    Ok(write_atomic(path, text.as_bytes(), Visibility::Public)?)
}

pub(super) fn load_keys(path: &Path) -> Result<WgKeys> {
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

/// The keys of a first enrollment that went out and was not answered yet (or whose answer was
/// lost: the service committed, then the connection broke or the appliance lost power). Kept
/// (mode 0600) before the request goes out, so that every retry, in this process or after a
/// restart, asks with the same token, WireGuard key and TLS key: the service then answers again
/// with the certificate it issued, where fresh keys would be refused as `token_used` and send a
/// technician to the town hall with a new stick. Removed once the enrollment is saved, or when
/// the service refused the token.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct PendingEnrollment {
    /// BLAKE2s-256 of the bootstrap token (hex): the keys belong to this token only.
    token_digest: String,
    /// The WireGuard private key, base64.
    wg_private_key: String,
    /// The TLS key (PKCS#8 PEM) and its CSR (DER, base64).
    tls_private_key_pem: String,
    csr_der: String,
}

impl PendingEnrollment {
    fn token_digest(token: &str) -> String {
        use blake2::{Blake2s256, Digest};
        hex::encode(Blake2s256::digest(token.as_bytes()))
    }

    /// The keys kept in `path` for `token`, or new ones, kept there before they are used. A
    /// file for another token (an earlier, refused one) or one that does not parse is replaced.
    pub(super) fn keys_for(path: &Path, token: &str) -> Result<(WgKeys, client::csr::NewKey)> {
        let digest = Self::token_digest(token);
        match std::fs::read(path) {
            Ok(bytes) => match Self::parse(&bytes) {
                Ok((kept, keys, tls)) if kept.token_digest == digest => {
                    tracing::info!(path = %path.display(), "this token was sent before without an answer saved; asking again with the same keys");
                    return Ok((keys, tls));
                }
                Ok(_) => {
                    tracing::info!(path = %path.display(), "keys of an earlier token's enrollment replaced")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable pending enrollment replaced")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("{}: {e}", path.display())),
        }
        let keys = WgKeys::generate();
        let tls = client::new_enrollment_key()?;
        let kept = PendingEnrollment {
            token_digest: digest,
            wg_private_key: keys.private_base64(),
            tls_private_key_pem: tls.private_key_pem.clone(),
            csr_der: B64.encode(&tls.csr_der),
        };
        let text =
            serde_json::to_string_pretty(&kept).context("encoding the pending enrollment")?;
        write_secret(path, &text)
            .with_context(|| format!("keeping the enrollment keys in {}", path.display()))?;
        Ok((keys, tls))
    }

    fn parse(bytes: &[u8]) -> Result<(PendingEnrollment, WgKeys, client::csr::NewKey)> {
        let kept: PendingEnrollment = serde_json::from_slice(bytes)?;
        let secret: [u8; 32] = B64
            .decode(kept.wg_private_key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("wg_private_key is not a base64 WireGuard private key"))?;
        let keys = WgKeys::from_secret(x25519_dalek::StaticSecret::from(secret));
        let csr_der = B64
            .decode(kept.csr_der.trim())
            .map_err(|e| anyhow!("csr_der: {e}"))?;
        let tls = client::csr::NewKey {
            private_key_pem: kept.tls_private_key_pem.clone(),
            csr_der,
        };
        Ok((kept, keys, tls))
    }

    /// Gone: the enrollment is saved, or the token was refused. Already gone is fine.
    pub(super) fn remove(path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the pending enrollment");
            }
        }
    }
}

/// The stored identity with its pinned policy key, or a new identity from the bootstrap file.
/// Network trouble is retried; a refused token is final (it will not become valid by
/// retrying): the start fails and says why, or with `wait_for_bootstrap` the file is moved
/// aside to `<file>.refused` and the next one is waited for. Only the keys of the request
/// ([`PendingEnrollment`]) are written before the service said yes.
pub(super) async fn obtain_identity(ctx: &Ctx) -> Result<(Enrollment, WgKeys, Vec<u8>)> {
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
        let now = unix_now();
        if enrollment.identity.not_after <= now {
            // Switched off past its expiry (a town hall closed for two weeks): renewal cannot
            // work any more, a new token can. The stored enrollment stays until the service has
            // said yes to that token, so a clock that was wrong at boot loses nothing.
            let note = format!(
                "the certificate (serial {}) expired on {} without being renewed (was the \
                 appliance switched off?); it needs a new bootstrap token",
                enrollment.identity.serial,
                client::utc(enrollment.identity.not_after)
            );
            tracing::error!("{note}");
            return enrol_from_bootstrap(ctx, Some(note)).await;
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
    enrol_from_bootstrap(ctx, None).await
}

/// A new identity from the bootstrap file (see [`obtain_identity`]). `expired`: the stored
/// enrollment's certificate expired (why a token is needed, shown with every waiting state); it
/// is kept as `enrollment.json.expired` once the new one is stored.
async fn enrol_from_bootstrap(
    ctx: &Ctx,
    expired: Option<String>,
) -> Result<(Enrollment, WgKeys, Vec<u8>)> {
    let dir = &ctx.config.data_dir;
    let enrollment_path = dir.join(ENROLLMENT_FILE);
    let key_path = dir.join(WG_KEY_FILE);
    let why = |text: &str| match &expired {
        Some(note) => format!("{note}: {text}"),
        None => text.to_owned(),
    };
    let path = ctx.config.bootstrap_path();
    let wait = ctx.config.wait_for_bootstrap;
    let mut watch = BootstrapWatch::new(
        &path.display().to_string(),
        wait,
        ctx.config.bootstrap_is_credential(),
    );
    let mut step = read_bootstrap(&mut watch, &path);
    loop {
        ctx.state.lock().bootstrap = watch.counters().clone();
        let (bootstrap, bytes) = match step {
            BootstrapStep::Fail(message) => bail!("{}", why(&message)),
            BootstrapStep::WaitForOperator { state } => {
                wait_for_operator(ctx, &why(&state)).await;
                step = read_bootstrap(&mut watch, &path);
                continue;
            }
            BootstrapStep::PollAgain => {
                tokio::time::sleep(ctx.bootstrap_poll).await;
                step = read_bootstrap(&mut watch, &path);
                continue;
            }
            BootstrapStep::SetAside { bytes } => {
                watch.handle_set_aside(set_aside(&path, &bytes));
                step = read_bootstrap(&mut watch, &path);
                continue;
            }
            BootstrapStep::Enrol { bootstrap, bytes } => (*bootstrap, bytes),
        };
        let carried = bootstrap
            .policy_key()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let choice = match choose_policy_key(ctx.pinned_key.as_ref(), carried, dir, &path) {
            Ok(c) => c,
            Err(e) => {
                // The token is not spent: the file is kept (moved aside) for a second try.
                if wait {
                    tracing::error!(error = %e, "bootstrap file unusable; moving it aside");
                }
                step = watch.handle_unusable(
                    bytes,
                    ControlEvent::BootstrapWithoutPolicyKey,
                    e.clone(),
                    format!("bootstrap file unusable: {e}"),
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
        let pending_path = dir.join(PENDING_ENROLLMENT_FILE);
        let (keys, tls_key) = PendingEnrollment::keys_for(&pending_path, &bootstrap.token)?;
        let enrollment = match enroll_with_retries(ctx, &bootstrap, &keys, &tls_key).await {
            Ok(e) => e,
            Err(e) => {
                PendingEnrollment::remove(&pending_path);
                if wait {
                    tracing::error!(error = %e, "enrollment refused; moving the bootstrap file aside");
                }
                step = watch.handle_unusable(
                    bytes,
                    ControlEvent::EnrollRefused,
                    format!("enrollment refused: {e}"),
                    format!("enrollment refused: {}", refusal_reason(&e)),
                );
                continue;
            }
        };
        // The expired enrollment goes aside first (its key is worthless now: the service
        // withdrew it when it issued the new certificate for this site). Then the key: an
        // enrollment without its key would be useless, a key without an enrollment is
        // overwritten on the next attempt. The policy key before the enrollment too: an
        // enrolled appliance without it could not verify any policy.
        if expired.is_some() {
            let aside = dir.join(format!("{ENROLLMENT_FILE}.expired"));
            std::fs::rename(&enrollment_path, &aside).with_context(|| {
                format!(
                    "moving the expired {} aside to {}",
                    enrollment_path.display(),
                    aside.display()
                )
            })?;
            tracing::info!(path = %aside.display(), "expired enrollment kept aside");
        }
        write_secret(&key_path, &format!("{}\n", keys.private_base64()))?;
        if choice.store {
            let stored = dir.join(POLICY_KEY_FILE);
            write_public(&stored, &format!("{}\n", B64.encode(&choice.key)))?;
            tracing::info!(path = %stored.display(), key_id = %komnet_policy::bundle::key_id(&choice.key), "policy signing key from the bootstrap file pinned");
        }
        enrollment
            .save(&enrollment_path)
            .with_context(|| format!("saving {}", enrollment_path.display()))?;
        PendingEnrollment::remove(&pending_path);
        ctx.state.lock().count(ControlEvent::Enrolled);
        tracing::info!(path = %enrollment_path.display(), "enrolled; the bootstrap token is used up");
        // The spent token in the data directory (where a stick puts it) goes aside, so that an
        // appliance that needs a new one later (its certificate expired while it was off)
        // waits for it instead of trying this one. A file the operator named elsewhere, or a
        // credential, is left alone.
        if !ctx.config.bootstrap_is_credential() && path.starts_with(dir) {
            let used = PathBuf::from(format!("{}.used", path.display()));
            if let Err(e) = std::fs::rename(&path, &used) {
                tracing::debug!(error = %e, path = %path.display(), "spent bootstrap file left in place");
            }
        }
        return Ok((enrollment, keys, choice.key));
    }
}

/// Enrols, retrying network trouble (and the service's rate limit) for as long as it takes;
/// returns the service's final refusal.
pub(super) async fn enroll_with_retries(
    ctx: &Ctx,
    bootstrap: &Bootstrap,
    keys: &WgKeys,
    tls_key: &client::csr::NewKey,
) -> Result<Enrollment, ClientError> {
    let mut delay = Duration::from_secs(1);
    loop {
        match client::enroll_with_key(bootstrap, keys, tls_key).await {
            Ok(e) => return Ok(e),
            Err(e) if is_final(&e) => return Err(e),
            Err(e) => {
                ctx.state.lock().count(ControlEvent::EnrollRetry);
                tracing::warn!(error = %e, retry_in = ?delay, "enrollment service not reachable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The service's own words when it answered, else the whole error.
pub(super) fn refusal_reason(e: &ClientError) -> String {
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
pub(super) async fn wait_for_operator(ctx: &Ctx, state: &str) {
    set_state(ctx, state);
    if !ctx.ready.swap(true, Ordering::AcqRel) {
        notify_logged(&ctx.notify.ready(&status_line(ctx)));
    }
    tokio::time::sleep(ctx.bootstrap_poll).await;
}

/// Reads the bootstrap path and lets the watch decide.
fn read_bootstrap(watch: &mut BootstrapWatch, path: &Path) -> BootstrapStep {
    let read = match std::fs::read(path) {
        Ok(bytes) => FileRead::Content(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileRead::Missing,
        Err(e) => FileRead::Unreadable(e.to_string()),
    };
    watch.handle_read(read, |bytes| {
        Bootstrap::from_bytes(path, bytes).map_err(|e| match std::fs::metadata(path) {
            // Say "no such file" rather than what an empty file fails to parse as.
            Err(io) => format!("{}: {io}", path.display()),
            Ok(_) => e.to_string(),
        })
    })
}

/// Renames a refused bootstrap file to `<file>.refused` (replacing an older one) unless it
/// changed meanwhile.
fn set_aside(path: &Path, bytes: &[u8]) -> SetAside {
    let mut to = path.as_os_str().to_owned();
    to.push(".refused");
    let to = PathBuf::from(to);
    if std::fs::read(path).ok().as_deref() != Some(bytes) {
        // Already replaced by a new file: that one is tried next.
        return SetAside::Replaced;
    }
    match std::fs::rename(path, &to) {
        Ok(()) => {
            tracing::info!(to = %to.display(), "refused bootstrap file moved aside");
            SetAside::Moved
        }
        Err(e) => {
            tracing::warn!(error = %e, to = %to.display(), "cannot move the refused bootstrap file aside; ignoring it until it changes");
            SetAside::Failed
        }
    }
}

/// Which policy key to pin at a first enrollment, and whether to store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyChoice {
    key: Vec<u8>,
    /// Write it to `DATA_DIR/policy.pub` once enrolled (it came from the bootstrap file).
    store: bool,
    warning: Option<String>,
}

/// gateway.toml's key wins; else the bootstrap file's (it comes with the trust anchor this
/// enrollment is made with, so at a re-enrollment it replaces the one stored at the earlier
/// one); else the stored one.
pub(super) fn choose_policy_key(
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

pub(super) fn is_final(e: &ClientError) -> bool {
    match e.api_error() {
        Some(api) => !matches!(api.code, ErrorCode::RateLimited | ErrorCode::Internal),
        // A root that does not match its pinned fingerprint is a broken bootstrap file.
        None => matches!(e, ClientError::Config(_) | ClientError::PinMismatch { .. }),
    }
}

// ---- renewal -------------------------------------------------------------------------------

/// Renews the certificate when the renewal schedule says so (from `renew_after` on, a minute
/// after a failure).
pub(super) async fn renewal(ctx: Arc<Ctx>) {
    let Some(keys) = ctx.keys.get().cloned() else {
        return;
    };
    loop {
        let Some(enrollment) = current_enrollment(&ctx) else {
            return;
        };
        let step = {
            let mut s = ctx.state.lock();
            s.renewal
                .get_or_insert_with(|| {
                    RenewalSchedule::new(enrollment.renew_after, enrollment.identity.not_after)
                })
                .poll(unix_now())
        };
        if let RenewalStep::Sleep(secs) = step {
            tokio::time::sleep(Duration::from_secs(secs.max(1) as u64)).await;
            continue;
        }
        match client::renew(&enrollment, &keys).await {
            Ok(renewed) => {
                let path = ctx.config.data_dir.join(ENROLLMENT_FILE);
                if let Err(e) = renewed.save(&path) {
                    tracing::error!(error = %e, path = %path.display(), "cannot store the renewed certificate");
                }
                tracing::info!(serial = %renewed.identity.serial, not_after = renewed.identity.not_after, "certificate renewed");
                raise_policy_floor(&ctx, renewed.policy_version);
                // The hub list is the spoke watcher's to change (it re-applies the peers).
                let now = unix_now();
                let mut s = ctx.state.lock();
                let due = s.renewal.as_mut().map(|r| {
                    r.handle_renewed(renewed.renew_after, renewed.identity.not_after, now)
                });
                if renewed.identity.not_after > now {
                    s.certificate_was_valid = true;
                }
                if due == Some(Renewed::DueAlready) {
                    tracing::warn!(
                        renew_after = %client::utc(renewed.renew_after),
                        not_after = %client::utc(renewed.identity.not_after),
                        now = %client::utc(now),
                        "the renewed certificate is due for renewal already: the enrollment service's clock is probably behind this appliance's (check NTP on both); renewing again in a minute, not at once"
                    );
                }
                s.enrollment = Some(renewed);
            }
            Err(e) => {
                let failure = ctx
                    .state
                    .lock()
                    .renewal
                    .as_mut()
                    .map(|r| r.handle_failed(unix_now()));
                if failure == Some(RenewalFailure::Expired) {
                    tracing::error!(error = %e, "certificate expired; the appliance needs a new bootstrap token");
                    let ran_out_here = ctx.state.lock().certificate_was_valid;
                    if ctx.config.role == GatewayRole::Spoke
                        && ctx.config.wait_for_bootstrap
                        && ran_out_here
                    {
                        // Its tunnel is dead (hubs drop expired certificates). A start with an
                        // expired certificate waits for a new token (the stick script takes
                        // one then): the process ends and its service starts it again, so the
                        // technician's stick is all it takes, no reboot. Not for a certificate
                        // that arrived expired (the service's clock is wrong: a new token
                        // would not help), and not for a hub, which keeps forwarding for its
                        // spokes and keeps saying so.
                        let _ = ctx.events.send(Event::Fatal(format!(
                            "the certificate (serial {}) expired on {} and could not be renewed ({e}); stopping so \
                             that the next start waits for a new bootstrap token",
                            enrollment.identity.serial,
                            client::utc(enrollment.identity.not_after)
                        )));
                        return;
                    }
                } else if e
                    .api_error()
                    .is_some_and(|api| api.code == ErrorCode::RenewTooEarly)
                {
                    // This appliance's clock says renewal is due (the service set when), the
                    // service's clock says not yet: one of the two is wrong.
                    tracing::error!(
                        error = %e,
                        renew_after = %client::utc(enrollment.renew_after),
                        now = %client::utc(unix_now()),
                        "the enrollment service says renewal has not opened yet, while this appliance's clock says it has: this appliance's clock is ahead or the service's is behind (check NTP on both); retrying in a minute"
                    );
                } else {
                    // Renewal opens two thirds into the lifetime: whenever it fails, less than a
                    // third is left, which is worth an alarm, not a note.
                    tracing::error!(
                        error = %e,
                        expires_in_secs = enrollment.identity.not_after - unix_now(),
                        "certificate renewal failed (less than a third of its lifetime left); retrying in a minute"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// The policy version the enrollment service vouched for in its answer becomes the floor of
/// the bundle store: a new or re-flashed appliance refuses older signed bundles (anti-rollback
/// without a bundle of its own to compare with).
pub(super) fn raise_policy_floor(ctx: &Ctx, version: u64) {
    let Some(store) = ctx.bundles.get() else {
        return;
    };
    if let Err(e) = store.raise_floor(version) {
        tracing::warn!(error = %e, version, "cannot record the policy version floor");
    }
}
