//! The PostgreSQL transaction: READ COMMITTED, with the locks each decision needs taken before
//! the reads it rests on (see the module comment in `mod.rs` for why locks, not SERIALIZABLE).
//!
//! Lock order, the same in every transaction so that two do not wait on each other: token row
//! → the site's lock → the site's certificate rows → tenant pools → the tenant's host numbers
//! or home-office addresses → the registry lock, taken last, at commit, where nothing else is
//! waited for. A revocation by serial or of a whole tenant locks certificate rows without a
//! site's lock; a deadlock PostgreSQL might still find there fails one of the two transactions
//! with an error (the caller sees an internal error and may repeat), never with a half-made
//! change.

use super::*;

pub(super) struct PgTxn<'a> {
    store: &'a PgStore,
    /// `None` only after commit or a failed rollback took it.
    client: Option<Object>,
    /// Registry changes, given their versions at commit.
    pending: Vec<(i64, RegistryChange)>,
    pending_audit: Vec<(i64, String, String, String)>,
}

impl<'a> PgTxn<'a> {
    pub(super) fn new(store: &'a PgStore, client: Object) -> Self {
        PgTxn {
            store,
            client: Some(client),
            pending: Vec::new(),
            pending_audit: Vec::new(),
        }
    }

    fn c(&self) -> Result<&Object, StoreError> {
        self.client.as_ref().ok_or_else(|| StoreError::Connect {
            database: self.store.database.clone(),
            message: "the transaction's connection is gone".into(),
        })
    }

    fn lock_name(&self, space: i32, name: &str) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&space, &name],
        )?;
        Ok(())
    }

    fn lock(&self, key: i64) -> Result<(), StoreError> {
        exec(self.c()?, "SELECT pg_advisory_xact_lock($1)", &[&key])?;
        Ok(())
    }

    fn certs(
        &self,
        where_clause: &str,
        params: Params<'_>,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        certs(self.c()?, where_clause, params)
    }
}

impl Drop for PgTxn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // A connection whose rollback failed may still be inside the transaction: it does
            // not go back to the pool.
            if batch(&client, "ROLLBACK").is_err() {
                drop(Object::take(client));
            }
        }
    }
}

impl Txn for PgTxn<'_> {
    fn insert_token(&mut self, t: &TokenRecord) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "INSERT INTO tokens (id, secret_hash, tenant, site, role, created_at, expires_at, \
             used_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &t.id,
                &t.secret_hash,
                &t.tenant.as_str(),
                &t.site.as_str(),
                &t.role.as_str(),
                &t.created_at,
                &t.expires_at,
                &t.used_at,
                &t.created_by,
            ],
        )?;
        Ok(())
    }

    /// Locks the token's row: a concurrent use through another replica waits here and then
    /// sees it used (and answers a retry with the same certificate, as on SQLite).
    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let Some(r) = opt(
            self.c()?,
            "SELECT id, secret_hash, tenant, site, role, created_at, expires_at, used_at, \
             created_by FROM tokens WHERE id = $1 FOR UPDATE",
            &[&id],
        )?
        else {
            return Ok(None);
        };
        Ok(Some(TokenRecord {
            id: r.try_get(0)?,
            secret_hash: r.try_get(1)?,
            tenant: parse_name("tenant", r.try_get(2)?, TenantId::parse)?,
            site: parse_name("site", r.try_get(3)?, SiteId::parse)?,
            role: parse_name("role", r.try_get(4)?, str::parse)?,
            created_at: r.try_get(5)?,
            expires_at: r.try_get(6)?,
            used_at: r.try_get(7)?,
            created_by: r.try_get(8)?,
        }))
    }

    fn use_token(&mut self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = exec(
            self.c()?,
            "UPDATE tokens SET used_at = $2 WHERE id = $1 AND used_at IS NULL",
            &[&id, &now],
        )?;
        Ok(n == 1)
    }

    fn set_token_certificate(&mut self, token_id: &str, serial: &str) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "INSERT INTO token_certificates (token_id, serial) VALUES ($1, $2)",
            &[&token_id, &serial],
        )?;
        Ok(())
    }

    fn token_certificate(&mut self, token_id: &str) -> Result<Option<String>, StoreError> {
        Ok(opt(
            self.c()?,
            "SELECT serial FROM token_certificates WHERE token_id = $1",
            &[&token_id],
        )?
        .map(|r| r.try_get(0))
        .transpose()?)
    }

    fn tenant_pool(&mut self, tenant: &TenantId, max: u64) -> Result<Option<u64>, StoreError> {
        let find = "SELECT pool FROM tenant_pools WHERE tenant = $1";
        if let Some(r) = opt(self.c()?, find, &[&tenant.as_str()])? {
            return Ok(Some(r.try_get::<_, i64>(0)? as u64));
        }
        // A new tenant: one allocation at a time across every replica, and looked up again
        // under the lock (another replica may just have given this tenant its pool).
        self.lock(POOLS_LOCK)?;
        if let Some(r) = opt(self.c()?, find, &[&tenant.as_str()])? {
            return Ok(Some(r.try_get::<_, i64>(0)? as u64));
        }
        let max = max.min(i64::MAX as u64) as i64;
        // Usually one past the highest; after releases, the lowest gap (as on SQLite).
        let next: i64 = one(
            self.c()?,
            "SELECT COALESCE(MAX(pool) + 1, 0) FROM tenant_pools",
            &[],
        )?
        .try_get(0)?;
        let pool = if next < max {
            next
        } else {
            one(
                self.c()?,
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM tenant_pools WHERE pool = 0) THEN 0 \
                 ELSE (SELECT MIN(a.pool + 1) FROM tenant_pools a WHERE NOT EXISTS \
                 (SELECT 1 FROM tenant_pools b WHERE b.pool = a.pool + 1)) END",
                &[],
            )?
            .try_get(0)?
        };
        if pool >= max {
            return Ok(None);
        }
        exec(
            self.c()?,
            "INSERT INTO tenant_pools (tenant, pool) VALUES ($1, $2)",
            &[&tenant.as_str(), &pool],
        )?;
        Ok(Some(pool as u64))
    }

    fn site_host(
        &mut self,
        tenant: &TenantId,
        site: &SiteId,
        max: u64,
    ) -> Result<Option<u64>, StoreError> {
        let find = "SELECT host FROM site_hosts WHERE tenant = $1 AND site = $2";
        let key: [&(dyn ToSql + Sync); 2] = [&tenant.as_str(), &site.as_str()];
        if let Some(r) = opt(self.c()?, find, &key)? {
            return Ok(Some(r.try_get::<_, i64>(0)? as u64));
        }
        self.lock_name(HOSTS_LOCK, tenant.as_str())?;
        if let Some(r) = opt(self.c()?, find, &key)? {
            return Ok(Some(r.try_get::<_, i64>(0)? as u64));
        }
        let max = max.min(i64::MAX as u64) as i64;
        let next: i64 = one(
            self.c()?,
            "SELECT COALESCE(MAX(host) + 1, 1) FROM site_hosts WHERE tenant = $1",
            &[&tenant.as_str()],
        )?
        .try_get(0)?;
        let host = if next <= max {
            next
        } else {
            one(
                self.c()?,
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM site_hosts WHERE tenant = $1 AND \
                 host = 1) THEN 1 ELSE (SELECT MIN(a.host + 1) FROM site_hosts a WHERE \
                 a.tenant = $1 AND NOT EXISTS (SELECT 1 FROM site_hosts b WHERE b.tenant = $1 \
                 AND b.host = a.host + 1)) END",
                &[&tenant.as_str()],
            )?
            .try_get(0)?
        };
        if host > max {
            return Ok(None);
        }
        exec(
            self.c()?,
            "INSERT INTO site_hosts (tenant, site, host) VALUES ($1, $2, $3)",
            &[&tenant.as_str(), &site.as_str(), &host],
        )?;
        Ok(Some(host as u64))
    }

    fn release_site_host(&mut self, tenant: &TenantId, site: &SiteId) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "DELETE FROM site_hosts WHERE tenant = $1 AND site = $2",
            &[&tenant.as_str(), &site.as_str()],
        )?;
        Ok(())
    }

    /// Locks the certificate's site, then its row: a renewal and a revocation or re-enrollment
    /// of one site through two replicas take turns, and the second sees what the first did.
    /// (The site's lock first, as every other transaction takes them: see the lock order above.)
    fn certificate(&mut self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        let Some(found) = self.certs("serial = $1", &[&serial])?.into_iter().next() else {
            return Ok(None);
        };
        let id = &found.identity;
        self.lock_name(SITE_LOCK, &format!("{}/{}", id.tenant, id.site))?;
        Ok(self
            .certs("serial = $1 FOR UPDATE", &[&serial])?
            .into_iter()
            .next())
    }

    fn valid_certificates(
        &mut self,
        selector: &Selector,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        match selector {
            Selector::Serial(s) => self.certs(
                "status = 'valid' AND serial = $1 FOR UPDATE",
                &[&s.to_ascii_lowercase()],
            ),
            Selector::Tenant(t) => self.certs(
                "status = 'valid' AND tenant = $1 ORDER BY site FOR UPDATE",
                &[&t.as_str()],
            ),
            Selector::Site(t, s) => {
                // Also when the site has no certificate yet: two first enrollments of one site
                // (two tokens) take turns, and the second supersedes the first's.
                self.lock_name(SITE_LOCK, &format!("{t}/{s}"))?;
                self.certs(
                    "status = 'valid' AND tenant = $1 AND site = $2 FOR UPDATE",
                    &[&t.as_str(), &s.as_str()],
                )
            }
        }
    }

    fn valid_certificate_for_key(
        &mut self,
        key: &WgPublicKey,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        // Not locked: the caller only refuses a key another site holds, and the unique index
        // on valid keys catches one that another replica gives out meanwhile. (Locking it here
        // would take a row before the site's lock.)
        Ok(self
            .certs(
                "status = 'valid' AND wg_public_key = $1",
                &[&key.to_base64()],
            )?
            .into_iter()
            .next())
    }

    fn insert_certificate(&mut self, c: &CertificateRecord) -> Result<(), StoreError> {
        let id = &c.identity;
        let addrs = serde_json::to_string(&id.tunnel_addrs).unwrap_or_else(|_| "[]".into());
        exec(
            self.c()?,
            &format!(
                "INSERT INTO certificates ({CERT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            ),
            &[
                &id.serial,
                &id.tenant.as_str(),
                &id.site.as_str(),
                &id.role.as_str(),
                &id.wg_public_key.to_base64(),
                &addrs,
                &c.not_before,
                &id.not_after,
                &c.status.as_str(),
                &c.revoked_at,
                &c.reason.map(|r| r.as_str()),
                &c.der,
                &id.admitted_until,
            ],
        )?;
        Ok(())
    }

    fn set_admitted_until(&mut self, serial: &str, until: Option<i64>) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "UPDATE certificates SET admitted_until = $2 WHERE serial = $1",
            &[&serial, &until],
        )?;
        Ok(())
    }

    fn end_certificate(
        &mut self,
        serial: &str,
        status: CertStatus,
        at: i64,
        reason: RevocationReason,
    ) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "UPDATE certificates SET status = $2, revoked_at = $3, reason = $4 WHERE serial = $1",
            &[&serial, &status.as_str(), &at, &reason.as_str()],
        )?;
        Ok(())
    }

    fn append_event(&mut self, change: RegistryChange, now: i64) -> Result<(), StoreError> {
        self.pending.push((now, change));
        Ok(())
    }

    fn audit(
        &mut self,
        now: i64,
        actor: &str,
        action: &str,
        details: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let details = details.to_string();
        exec(
            self.c()?,
            "INSERT INTO audit (at, actor, action, details) VALUES ($1, $2, $3, $4)",
            &[&now, &actor, &action, &details],
        )?;
        self.pending_audit
            .push((now, actor.to_owned(), action.to_owned(), details));
        Ok(())
    }

    fn set_policy_version(&mut self, version: u64) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "INSERT INTO meta (key, value) VALUES ('policy_version', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&version.to_string()],
        )?;
        Ok(())
    }

    fn published_policy_version(&mut self) -> Result<Option<u64>, StoreError> {
        published_policy_version(self.c()?)
    }

    /// Takes the policy lock: publishing reads the current bundle to refuse a rollback, and
    /// two publishes through two replicas must not both pass that check.
    fn published_policy(&mut self) -> Result<Option<PublishedPolicy>, StoreError> {
        self.lock(POLICY_LOCK)?;
        published_policy(self.c()?)
    }

    fn publish_policy(&mut self, p: &PublishedPolicy) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "INSERT INTO policy_bundle (id, version, bytes, key_id, published_at) \
             VALUES (1, $1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET version = excluded.version, \
             bytes = excluded.bytes, key_id = excluded.key_id, \
             published_at = excluded.published_at",
            &[&p.version.to_string(), &p.bytes, &p.key_id, &p.published_at],
        )?;
        // The service publishes a version once (the same bytes again change nothing); should
        // a version come again, the history keeps what was published last, like the bundle.
        exec(
            self.c()?,
            "INSERT INTO policy_history (version, bytes, key_id, published_at) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (version) DO UPDATE SET bytes = excluded.bytes, \
             key_id = excluded.key_id, published_at = excluded.published_at",
            &[
                &history_key(p.version),
                &p.bytes,
                &p.key_id,
                &p.published_at,
            ],
        )?;
        Ok(())
    }

    /// Takes the tenant's home-office lock: the caller picks a free address from what this
    /// returns, and no other replica may pick from the same list meanwhile.
    fn homeoffice_addrs(&mut self, tenant: &TenantId) -> Result<Vec<HomeofficeAddr>, StoreError> {
        self.lock_name(HOMEOFFICE_LOCK, tenant.as_str())?;
        let rows = query(
            self.c()?,
            "SELECT holder, addr, held_until FROM homeoffice_addrs WHERE tenant = $1",
            &[&tenant.as_str()],
        )?;
        rows.iter()
            .map(|r| {
                let addr: String = r.try_get(1)?;
                Ok(HomeofficeAddr {
                    user: parse_name("home-office user", r.try_get(0)?, SiteId::parse)?,
                    addr: addr.parse().map_err(|_| StoreError::Corrupt {
                        what: "home-office address",
                        value: addr,
                    })?,
                    held_until: r.try_get(2)?,
                })
            })
            .collect()
    }

    fn hold_homeoffice_addr(
        &mut self,
        tenant: &TenantId,
        user: &SiteId,
        addr: IpAddr,
        until: i64,
    ) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "INSERT INTO homeoffice_addrs (tenant, holder, addr, held_until) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, addr) DO UPDATE SET holder = excluded.holder, \
             held_until = excluded.held_until",
            &[&tenant.as_str(), &user.as_str(), &addr.to_string(), &until],
        )?;
        Ok(())
    }

    fn release_homeoffice_addr(
        &mut self,
        tenant: &TenantId,
        addr: IpAddr,
    ) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "DELETE FROM homeoffice_addrs WHERE tenant = $1 AND addr = $2",
            &[&tenant.as_str(), &addr.to_string()],
        )?;
        Ok(())
    }

    fn release_homeoffice_user(
        &mut self,
        tenant: &TenantId,
        user: &SiteId,
    ) -> Result<(), StoreError> {
        exec(
            self.c()?,
            "DELETE FROM homeoffice_addrs WHERE tenant = $1 AND holder = $2",
            &[&tenant.as_str(), &user.as_str()],
        )?;
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<Committed, StoreError> {
        let mut registry_version = None;
        if !self.pending.is_empty() {
            // Versions are given out here, under a lock held until the commit, so they become
            // visible in order: a replica that has read version N has every version below N.
            let ats: Vec<i64> = self.pending.iter().map(|(at, _)| *at).collect();
            let changes: Vec<String> = self
                .pending
                .iter()
                .map(|(_, c)| serde_json::to_string(c).unwrap_or_default())
                .collect();
            let client = self.c()?;
            // Three statements in one round trip (tokio-postgres pipelines what is polled
            // together); the INSERT's snapshot is taken after the lock is held.
            let (locked, inserted, notified) = block_on(async {
                let lock = client.prepare_cached("SELECT pg_advisory_xact_lock($1)");
                let insert = client.prepare_cached(
                    "INSERT INTO registry_events (version, at, change) \
                     SELECT base.v + e.n, e.at, e.change \
                     FROM (SELECT COALESCE(MAX(version), 0) AS v FROM registry_events) base, \
                     UNNEST($1::bigint[], $2::text[]) WITH ORDINALITY AS e(at, change, n) \
                     RETURNING version",
                );
                let (lock, insert) = futures_util::future::try_join(lock, insert).await?;
                let notify = format!("NOTIFY {CHANNEL}");
                Ok::<_, tokio_postgres::Error>(
                    futures_util::future::join3(
                        client.execute(&lock, &[&REGISTRY_LOCK]),
                        client.query(&insert, &[&ats, &changes]),
                        client.batch_execute(&notify),
                    )
                    .await,
                )
            })?;
            locked?;
            let rows = inserted?;
            notified?;
            let mut max = 0i64;
            for r in &rows {
                max = max.max(r.try_get(0)?);
            }
            registry_version = Some(max as u64);
        }
        batch(self.c()?, "COMMIT")?;
        // Committed: the connection goes back to the pool as it is.
        self.client.take();
        for (at, actor, action, details) in self.pending_audit.drain(..) {
            tracing::info!(target: "komnet_enroll::audit", at, actor, action, details, "audit");
        }
        Ok(Committed { registry_version })
    }
}
