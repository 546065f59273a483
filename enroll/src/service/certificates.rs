//! Certificates after enrollment: checking a presented client certificate, renewal,
//! revocation and the CRL.

use super::*;

impl Service {
    /// Checks a client certificate presented over mutual TLS against the store.
    pub fn check_client_certificate(&self, der: &[u8]) -> Result<CertificateRecord, ApiError> {
        let ident = crate::identity::from_certificate_der(der).map_err(|e| {
            err(
                ErrorCode::CertificateRequired,
                format!("client certificate: {e}"),
            )
        })?;
        let record = self.store.certificate(&ident.serial)?.ok_or_else(|| {
            err(
                ErrorCode::CertificateRevoked,
                "client certificate: serial unknown to this CA",
            )
        })?;
        match record.status {
            CertStatus::Revoked => {
                return Err(err(
                    ErrorCode::CertificateRevoked,
                    format!(
                        "client certificate {} was revoked ({})",
                        record.identity.serial,
                        record
                            .reason
                            .unwrap_or(RevocationReason::Unspecified)
                            .as_str()
                    ),
                ))
            }
            CertStatus::Superseded => {
                return Err(err(
                    ErrorCode::CertificateSuperseded,
                    format!(
                        "client certificate {} was replaced by a renewal",
                        record.identity.serial
                    ),
                ))
            }
            CertStatus::Valid => {}
        }
        if self.now() >= record.identity.not_after {
            return Err(err(
                ErrorCode::CertificateExpired,
                format!(
                    "client certificate {} expired; enroll again with a new token",
                    record.identity.serial
                ),
            ));
        }
        Ok(record)
    }

    /// `simplereenroll`: the current certificate (already checked by TLS) buys a new one from
    /// 2/3 of its lifetime on.
    pub fn renew(
        &self,
        client_cert_der: &[u8],
        req: &RenewRequest,
    ) -> Result<EnrollResponse, ApiError> {
        let current = self.check_client_certificate(client_cert_der)?;
        let now = self.now();
        let opens = renew_after(current.not_before, current.identity.not_after);
        if now < opens {
            return Err(err(
                ErrorCode::RenewTooEarly,
                format!("renewal opens in {}s (at 2/3 of the lifetime)", opens - now),
            ));
        }
        let (csr, wg) = self.check_keys(&req.csr, &req.wg_public_key, &req.wg_proof)?;
        let id = &current.identity;
        csr.check_identity(&id.tenant, &id.site, id.role)?;
        let mut txn = self.store.begin()?;
        // Re-read inside the transaction: a revocation or a concurrent renewal may have won.
        match txn.certificate(&id.serial)? {
            Some(c) if c.status == CertStatus::Valid => {}
            _ => {
                return Err(err(
                    ErrorCode::CertificateSuperseded,
                    "client certificate was revoked or renewed meanwhile",
                ))
            }
        }
        let (_, issued, identity) = self.issue_for_site_in(
            &mut *txn,
            &id.tenant,
            &id.site,
            id.role,
            &wg,
            &csr.spki_der,
            now,
        )?;
        txn.audit(
            now,
            &format!("{}/{}", id.tenant, id.site),
            "renew",
            &json!({"old_serial": id.serial, "serial": identity.serial,
                    "wg_key_changed": wg != id.wg_public_key}),
        )?;
        txn.commit()?;
        self.response_for(&issued, identity, now)
    }

    /// Revokes by serial, site or tenant; a decommission (`cessation_of_operation`) also
    /// releases the sites' tunnel addresses.
    pub fn revoke(&self, req: &RevokeRequest, actor: &str) -> Result<RevokeResponse, ApiError> {
        let selector = match (&req.serial, &req.tenant, &req.site) {
            (Some(s), None, None) => Selector::Serial(s.clone()),
            (None, Some(t), None) => Selector::Tenant(t.clone()),
            (None, Some(t), Some(s)) => Selector::Site(t.clone(), s.clone()),
            _ => {
                return Err(err(
                    ErrorCode::BadRequest,
                    "revoke: give either a serial, or a tenant, or a tenant and a site",
                ))
            }
        };
        let now = self.now();
        let mut txn = self.store.begin()?;
        let certs = txn.valid_certificates(&selector)?;
        let release = req.reason == RevocationReason::CessationOfOperation;
        if certs.is_empty() && !(release && matches!(selector, Selector::Site(..))) {
            return Err(err(
                ErrorCode::NothingToRevoke,
                format!("revoke: no valid certificate for {selector}"),
            ));
        }
        let mut serials = Vec::new();
        for c in &certs {
            let id = &c.identity;
            txn.end_certificate(&id.serial, CertStatus::Revoked, now, req.reason)?;
            txn.append_event(
                RegistryChange::Remove {
                    tenant: id.tenant.clone(),
                    site: id.site.clone(),
                    role: id.role,
                    serial: id.serial.clone(),
                    wg_public_key: id.wg_public_key,
                    reason: req.reason,
                },
                now,
            )?;
            if release {
                txn.release_site_host(&id.tenant, &id.site)?;
                txn.release_homeoffice_user(&id.tenant, &id.site)?;
            }
            serials.push(id.serial.clone());
        }
        if let (true, Selector::Site(t, s)) = (release, &selector) {
            txn.release_site_host(t, s)?;
            txn.release_homeoffice_user(t, s)?;
        }
        txn.audit(
            now,
            actor,
            "revoke",
            &json!({"selector": selector.to_string(), "reason": req.reason,
                    "serials": serials, "addresses_released": release,
                    // Whose audit log shows it (the console's commune admins): a serial
                    // selector names no tenant itself.
                    "tenants": certs.iter().map(|c| c.identity.tenant.as_str())
                        .collect::<std::collections::BTreeSet<_>>()}),
        )?;
        let committed = txn.commit()?;
        Ok(RevokeResponse {
            revoked_serials: serials,
            registry_version: committed.registry_version.unwrap_or(0),
        })
    }

    /// The DER CRL, re-signed when a revocation happened or an hour passed.
    pub fn crl(&self) -> Result<Arc<Vec<u8>>, ApiError> {
        let now = self.now();
        let version = self.store.registry_version()?;
        let mut cache = self.crl_cache.lock();
        if let Some(c) = cache.as_ref() {
            if c.registry_version == version && now - c.made_at < CRL_REFRESH_SECS {
                return Ok(c.der.clone());
            }
        }
        let revoked = self.store.revoked_unexpired(now)?;
        // CRL numbers must grow: the registry version dominates, the time breaks ties.
        let number = (version << 32) | (now as u64 & 0xffff_ffff);
        let der = Arc::new(self.ca.crl(&revoked, number, now, CRL_VALIDITY_SECS)?);
        *cache = Some(CachedCrl {
            registry_version: version,
            made_at: now,
            der: der.clone(),
        });
        Ok(der)
    }
}
