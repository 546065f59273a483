//! The policy the service distributes: the signing keys it accepts, publishing a signed
//! bundle, serving it to gateways (cached with its compiled form) and the version handed out
//! with enrollments.

use super::*;

impl Service {
    /// The policy key new appliances pin: the configured one, or the one it rotated to.
    /// The policy signing key bootstrap files carry (base64), when the service has one.
    pub fn current_policy_key(&self) -> Option<String> {
        match &self.policy_keys {
            Some(store) => store.accepted_keys().first().map(|k| STANDARD.encode(k)),
            None => None,
        }
    }

    /// The keys a bundle may be signed with: the current one and an announced successor.
    /// The published bundle's validity window (`not_before` or its publication time,
    /// `expires`), when it has an expiry.
    pub fn published_policy_validity(&self) -> Option<(i64, i64)> {
        let published = self.store.published_policy().ok()??;
        let verified = bundle::verify_any(&published.bytes, &self.accepted_policy_keys()).ok()?;
        Some((
            verified.not_before.unwrap_or(published.published_at),
            verified.expires?,
        ))
    }

    fn accepted_policy_keys(&self) -> Vec<Vec<u8>> {
        self.policy_keys
            .as_ref()
            .map(bundle::BundleStore::accepted_keys)
            .unwrap_or_default()
    }

    /// Verifies, compiles and publishes a signed policy bundle: it is then served at
    /// `/v1/policy`, and its version is handed out with enrollments. Refuses a bundle that does
    /// not verify with `policy_public_key` or does not compile, a lower version than the
    /// published one, and the published version with other bytes. Publishing the published
    /// bundle again changes nothing.
    pub fn publish_policy(
        &self,
        bytes: &[u8],
        actor: &str,
    ) -> Result<PolicyPublishResponse, ApiError> {
        self.policy_key.as_deref().ok_or_else(no_policy_key)?;
        // Verified and compiled before the transaction: compiling runs the policy's tests and
        // should not hold the store's write lock.
        let verified =
            bundle::verify_any(bytes, &self.accepted_policy_keys()).map_err(bundle_error)?;
        let key_id = bundle::key_id(&verified.signed_by);
        // Gateways would refuse it: refuse it here, where the operator sees why.
        verified.check_time(self.now()).map_err(bundle_error)?;
        let compiled = Arc::new(verified.compile().map_err(bundle_error)?);
        let response = PolicyPublishResponse {
            version: verified.version,
            name: verified.name.clone(),
            key_id: key_id.clone(),
            unchanged: false,
        };
        let now = self.now();
        let mut txn = self.store.begin()?;
        if let Some(current) = txn.published_policy()? {
            if verified.version < current.version {
                return Err(err(
                    ErrorCode::PolicyRollback,
                    format!(
                        "bundle version {} is older than the published version {}: refusing \
                         a rollback (to undo a change, publish the old policy as version {})",
                        verified.version,
                        current.version,
                        current.version + 1
                    ),
                ));
            }
            if verified.version == current.version {
                if current.bytes != bytes {
                    return Err(err(
                        ErrorCode::PolicyVersionReused,
                        format!(
                            "version {} is already published with other content: a changed \
                             policy needs a new version in operator.toml",
                            verified.version
                        ),
                    ));
                }
                return Ok(PolicyPublishResponse {
                    unchanged: true,
                    ..response
                });
            }
        }
        txn.publish_policy(&PublishedPolicy {
            version: verified.version,
            bytes: bytes.to_vec(),
            key_id: key_id.clone(),
            published_at: now,
        })?;
        txn.set_policy_version(verified.version)?;
        txn.audit(
            now,
            actor,
            "policy.publish",
            &json!({"version": verified.version, "key_id": key_id, "name": verified.name,
                    "bytes": bytes.len()}),
        )?;
        txn.commit()?;
        if let Some(store) = &self.policy_keys {
            // Follows an announced or completed key rotation. The database has the bundle
            // already; a failure here only delays the rotation until the next publish.
            let before = store.accepted_keys();
            match store.commit(&verified) {
                Ok(()) if store.accepted_keys() != before => tracing::info!(
                    keys = ?store.accepted_keys().iter().map(|k| bundle::key_id(k)).collect::<Vec<_>>(),
                    "policy signing keys changed: bundles are accepted with these keys, \
                     bootstrap files carry the first; set policy_public_key in enroll.toml to it \
                     once the rotation is complete"
                ),
                Ok(()) => {}
                Err(e) => tracing::error!(error = %e, "cannot record the policy signing keys"),
            }
        }
        let mut cache = self.policy_cache.lock();
        cache.bundle = Some((verified.version, Bytes::copy_from_slice(bytes)));
        cache.compiled = Some(compiled);
        Ok(response)
    }

    /// The published bundle for a caller that has version `have`.
    pub fn policy_bundle(&self, have: Option<u64>) -> Result<PolicyAnswer, ApiError> {
        let version = self.store.published_policy_version()?.ok_or_else(|| {
            err(
                ErrorCode::NoPolicy,
                "no policy bundle is published yet; try again later",
            )
        })?;
        if have == Some(version) {
            return Ok(PolicyAnswer::NotModified { version });
        }
        if let Some((v, bytes)) = &self.policy_cache.lock().bundle {
            if *v == version {
                return Ok(PolicyAnswer::Bundle {
                    version,
                    bytes: bytes.clone(),
                });
            }
        }
        // Read without the cache lock: a bundle can be megabytes.
        let published = self
            .store
            .published_policy()?
            .ok_or_else(|| err(ErrorCode::NoPolicy, "no policy bundle is published yet"))?;
        let bytes = Bytes::from(published.bytes);
        self.policy_cache.lock().bundle = Some((published.version, bytes.clone()));
        Ok(PolicyAnswer::Bundle {
            version: published.version,
            bytes,
        })
    }

    /// The compiled published policy as `txn` sees it; `None` when none is published. Read
    /// inside the caller's transaction so a decision and what it writes rest on one version.
    pub(super) fn compiled_policy_in(
        &self,
        txn: &mut dyn Txn,
    ) -> Result<Option<Arc<CompiledPolicy>>, ApiError> {
        let Some(version) = txn.published_policy_version()? else {
            return Ok(None);
        };
        if let Some(c) = &self.policy_cache.lock().compiled {
            if c.policy.version == version {
                return Ok(Some(c.clone()));
            }
        }
        // Once per version after a start: the store is not trusted more than the wire, so the
        // bundle is verified again with the configured key.
        let published = txn
            .published_policy()?
            .ok_or_else(|| err(ErrorCode::Internal, "published policy vanished"))?;
        if self.policy_key.is_none() {
            return Err(err(
                ErrorCode::PolicyKeyMissing,
                format!(
                    "policy version {version} is published but enroll.toml has no \
                     policy_public_key to verify it with: set it and restart komnet-enroll"
                ),
            ));
        }
        let loaded = bundle::verify_any(&published.bytes, &self.accepted_policy_keys())
            .and_then(|b| b.compile());
        let compiled = Arc::new(loaded.map_err(|e| {
            let mut e = bundle_error(e);
            e.message = format!(
                "the published policy bundle (version {version}) does not load: {}; publish a \
                 bundle signed with the configured policy_public_key",
                e.message
            );
            e
        })?);
        self.policy_cache.lock().compiled = Some(compiled.clone());
        Ok(Some(compiled))
    }

    /// Sets the policy version handed out with enrollments by hand (publishing a bundle sets
    /// it too; this stays for policies distributed some other way).
    pub fn set_policy_version(&self, version: u64, actor: &str) -> Result<(), ApiError> {
        let now = self.now();
        let mut txn = self.store.begin()?;
        txn.set_policy_version(version)?;
        txn.audit(now, actor, "policy.version", &json!({"version": version}))?;
        txn.commit()?;
        Ok(())
    }
}
