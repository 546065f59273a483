//! The SQLite transaction: every change an enrollment, renewal or revocation makes, committed
//! whole or not at all; its registry events and audit lines go out only after the commit.

use super::*;

impl Txn for SqliteTxn<'_> {
    fn insert_token(&mut self, t: &TokenRecord) -> Result<(), StoreError> {
        self.conn.prepare_cached(
            "INSERT INTO tokens (id, secret_hash, tenant, site, role, created_at, expires_at, used_at, created_by) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            t.id,
            t.secret_hash,
            t.tenant.as_str(),
            t.site.as_str(),
            t.role.as_str(),
            t.created_at,
            t.expires_at,
            t.used_at,
            t.created_by
        ])?;
        Ok(())
    }

    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT id, secret_hash, tenant, site, role, created_at, expires_at, used_at, created_by \
                 FROM tokens WHERE id = ?1",
            )?
            .query_row(params![id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, String>(8)?,
                ))
            })
            .optional()?;
        let Some((id, secret_hash, tenant, site, role, created_at, expires_at, used_at, by)) = row
        else {
            return Ok(None);
        };
        Ok(Some(TokenRecord {
            id,
            secret_hash,
            tenant: parse_name("tenant", tenant, TenantId::parse)?,
            site: parse_name("site", site, SiteId::parse)?,
            role: parse_name("role", role, str::parse)?,
            created_at,
            expires_at,
            used_at,
            created_by: by,
        }))
    }

    fn set_token_certificate(&mut self, token_id: &str, serial: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO token_certificates (token_id, serial) VALUES (?1, ?2)")?
            .execute(params![token_id, serial])?;
        Ok(())
    }

    fn token_certificate(&mut self, token_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT serial FROM token_certificates WHERE token_id = ?1")?
            .query_row(params![token_id], |r| r.get(0))
            .optional()?)
    }

    fn use_token(&mut self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("UPDATE tokens SET used_at = ?2 WHERE id = ?1 AND used_at IS NULL")?
            .execute(params![id, now])?;
        Ok(n == 1)
    }

    fn tenant_pool(&mut self, tenant: &TenantId, max: u64) -> Result<Option<u64>, StoreError> {
        let existing: Option<i64> = self
            .conn
            .prepare_cached("SELECT pool FROM tenant_pools WHERE tenant = ?1")?
            .query_row(params![tenant.as_str()], |r| r.get(0))
            .optional()?;
        if let Some(p) = existing {
            return Ok(Some(p as u64));
        }
        // Usually one past the highest (an index lookup); after releases, the lowest gap.
        let next: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(pool) + 1, 0) FROM tenant_pools")?
            .query_row([], |r| r.get(0))?;
        if (next as u64) < max {
            self.conn
                .prepare_cached("INSERT INTO tenant_pools (tenant, pool) VALUES (?1, ?2)")?
                .execute(params![tenant.as_str(), next])?;
            return Ok(Some(next as u64));
        }
        // The lowest number not taken: 0 if free, else one past a taken number whose successor
        // is free.
        let free: i64 = self.conn.prepare_cached(
            "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM tenant_pools WHERE pool = 0) THEN 0 ELSE \
             (SELECT MIN(a.pool + 1) FROM tenant_pools a WHERE NOT EXISTS \
               (SELECT 1 FROM tenant_pools b WHERE b.pool = a.pool + 1)) END",
        )?
        .query_row([], |r| r.get(0))?;
        if free as u64 >= max {
            return Ok(None);
        }
        self.conn
            .prepare_cached("INSERT INTO tenant_pools (tenant, pool) VALUES (?1, ?2)")?
            .execute(params![tenant.as_str(), free])?;
        Ok(Some(free as u64))
    }

    fn site_host(
        &mut self,
        tenant: &TenantId,
        site: &SiteId,
        max: u64,
    ) -> Result<Option<u64>, StoreError> {
        let existing: Option<i64> = self
            .conn
            .prepare_cached("SELECT host FROM site_hosts WHERE tenant = ?1 AND site = ?2")?
            .query_row(params![tenant.as_str(), site.as_str()], |r| r.get(0))
            .optional()?;
        if let Some(h) = existing {
            return Ok(Some(h as u64));
        }
        // Usually one past the highest (an index lookup); after releases, the lowest gap (a
        // scan of the tenant's sites, at most a few thousand rows).
        let next: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(host) + 1, 1) FROM site_hosts WHERE tenant = ?1")?
            .query_row(params![tenant.as_str()], |r| r.get(0))?;
        let free: i64 = if (next as u64) <= max {
            next
        } else {
            self
            .conn
            .prepare_cached(
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM site_hosts WHERE tenant = ?1 AND host = 1) THEN 1 ELSE \
                 (SELECT MIN(a.host + 1) FROM site_hosts a WHERE a.tenant = ?1 AND NOT EXISTS \
                   (SELECT 1 FROM site_hosts b WHERE b.tenant = ?1 AND b.host = a.host + 1)) END",
            )?
            .query_row(params![tenant.as_str()], |r| r.get(0))?
        };
        if free as u64 > max {
            return Ok(None);
        }
        self.conn
            .prepare_cached("INSERT INTO site_hosts (tenant, site, host) VALUES (?1, ?2, ?3)")?
            .execute(params![tenant.as_str(), site.as_str(), free])?;
        Ok(Some(free as u64))
    }

    fn release_site_host(&mut self, tenant: &TenantId, site: &SiteId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM site_hosts WHERE tenant = ?1 AND site = ?2")?
            .execute(params![tenant.as_str(), site.as_str()])?;
        Ok(())
    }

    fn certificate(&mut self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(query_certs(&self.conn, "serial = ?1", &[&serial])?
            .into_iter()
            .next())
    }

    fn valid_certificates(
        &mut self,
        selector: &Selector,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        match selector {
            Selector::Serial(s) => query_certs(
                &self.conn,
                "status = 'valid' AND serial = ?1",
                &[&s.to_ascii_lowercase()],
            ),
            Selector::Tenant(t) => query_certs(
                &self.conn,
                "status = 'valid' AND tenant = ?1 ORDER BY site",
                &[&t.as_str()],
            ),
            Selector::Site(t, s) => query_certs(
                &self.conn,
                "status = 'valid' AND tenant = ?1 AND site = ?2",
                &[&t.as_str(), &s.as_str()],
            ),
        }
    }

    fn valid_certificate_for_key(
        &mut self,
        key: &WgPublicKey,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(query_certs(
            &self.conn,
            "status = 'valid' AND wg_public_key = ?1",
            &[&key.to_base64()],
        )?
        .into_iter()
        .next())
    }

    fn insert_certificate(&mut self, c: &CertificateRecord) -> Result<(), StoreError> {
        let id = &c.identity;
        let addrs = serde_json::to_string(&id.tunnel_addrs).unwrap_or_else(|_| "[]".into());
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO certificates ({CERT_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ))?
            .execute(params![
                id.serial,
                id.tenant.as_str(),
                id.site.as_str(),
                id.role.as_str(),
                id.wg_public_key.to_base64(),
                addrs,
                c.not_before,
                id.not_after,
                c.status.as_str(),
                c.revoked_at,
                c.reason.map(|r| r.as_str()),
                c.der,
                id.admitted_until
            ])?;
        Ok(())
    }

    fn set_admitted_until(&mut self, serial: &str, until: Option<i64>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE certificates SET admitted_until = ?2 WHERE serial = ?1")?
            .execute(params![serial, until])?;
        Ok(())
    }

    fn end_certificate(
        &mut self,
        serial: &str,
        status: CertStatus,
        at: i64,
        reason: RevocationReason,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE certificates SET status = ?2, revoked_at = ?3, reason = ?4 WHERE serial = ?1",
            )?
            .execute(params![serial, status.as_str(), at, reason.as_str()])?;
        Ok(())
    }

    fn append_event(&mut self, change: RegistryChange, now: i64) -> Result<(), StoreError> {
        let text = serde_json::to_string(&change).unwrap_or_default();
        self.conn
            .prepare_cached("INSERT INTO registry_events (at, change) VALUES (?1, ?2)")?
            .execute(params![now, text])?;
        let version = self.conn.last_insert_rowid() as u64;
        self.pending.push(RegistryEvent { version, change });
        Ok(())
    }

    fn audit(
        &mut self,
        now: i64,
        actor: &str,
        action: &str,
        details: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO audit (at, actor, action, details) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![now, actor, action, details.to_string()])?;
        self.pending_audit.push((
            now,
            actor.to_owned(),
            action.to_owned(),
            details.to_string(),
        ));
        Ok(())
    }

    fn set_policy_version(&mut self, version: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('policy_version', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![version.to_string()])?;
        Ok(())
    }

    fn published_policy_version(&mut self) -> Result<Option<u64>, StoreError> {
        published_policy_version(&self.conn)
    }

    fn published_policy(&mut self) -> Result<Option<PublishedPolicy>, StoreError> {
        published_policy(&self.conn)
    }

    fn publish_policy(&mut self, p: &PublishedPolicy) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO policy_bundle (id, version, bytes, key_id, published_at) \
                 VALUES (1, ?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version, \
                 bytes = excluded.bytes, key_id = excluded.key_id, \
                 published_at = excluded.published_at",
            )?
            .execute(params![
                p.version.to_string(),
                p.bytes,
                p.key_id,
                p.published_at
            ])?;
        // The service publishes a version once (the same bytes again change nothing); should
        // a version come again, the history keeps what was published last, like the bundle.
        self.conn
            .prepare_cached(
                "INSERT INTO policy_history (version, bytes, key_id, published_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (version) DO UPDATE SET bytes = excluded.bytes, \
                 key_id = excluded.key_id, published_at = excluded.published_at",
            )?
            .execute(params![
                history_key(p.version),
                p.bytes,
                p.key_id,
                p.published_at
            ])?;
        Ok(())
    }

    fn homeoffice_addrs(&mut self, tenant: &TenantId) -> Result<Vec<HomeofficeAddr>, StoreError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT user, addr, held_until FROM homeoffice_addrs WHERE tenant = ?1",
            )?
            .query_map(params![tenant.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(user, addr, held_until)| {
                Ok(HomeofficeAddr {
                    user: parse_name("home-office user", user, SiteId::parse)?,
                    addr: addr.parse().map_err(|_| StoreError::Corrupt {
                        what: "home-office address",
                        value: addr,
                    })?,
                    held_until,
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
        self.conn
            .prepare_cached(
                "INSERT INTO homeoffice_addrs (tenant, user, addr, held_until) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (tenant, addr) DO UPDATE SET user = excluded.user, \
                 held_until = excluded.held_until",
            )?
            .execute(params![
                tenant.as_str(),
                user.as_str(),
                addr.to_string(),
                until
            ])?;
        Ok(())
    }

    fn release_homeoffice_addr(
        &mut self,
        tenant: &TenantId,
        addr: IpAddr,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM homeoffice_addrs WHERE tenant = ?1 AND addr = ?2")?
            .execute(params![tenant.as_str(), addr.to_string()])?;
        Ok(())
    }

    fn release_homeoffice_user(
        &mut self,
        tenant: &TenantId,
        user: &SiteId,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM homeoffice_addrs WHERE tenant = ?1 AND user = ?2")?
            .execute(params![tenant.as_str(), user.as_str()])?;
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<Committed, StoreError> {
        self.conn.execute_batch("COMMIT")?;
        self.done = true;
        let committed = Committed {
            registry_version: self.pending.last().map(|e| e.version),
        };
        // Logged only once committed, so the log never shows an action the store does not have.
        for (at, actor, action, details) in self.pending_audit.drain(..) {
            tracing::info!(target: "komnet_enroll::audit", at, actor, action, details, "audit");
        }
        // Still holding the connection lock: events reach watchers in commit order.
        for event in self.pending.drain(..) {
            let _ = self.events.send(Arc::new(event));
        }
        Ok(committed)
    }
}
