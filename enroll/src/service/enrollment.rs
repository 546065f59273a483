//! Tokens and first enrollment: creating a token, checking the keys a request brings,
//! allocating tunnel addresses, issuing the certificate, and answering a retried request the
//! same way.

use super::*;

impl Service {
    /// Creates a one-time token bound to tenant, site and role.
    pub fn create_token(
        &self,
        req: &CreateTokenRequest,
        actor: &str,
    ) -> Result<CreateTokenResponse, ApiError> {
        if req.ttl_secs < 60 || req.ttl_secs > 30 * 86_400 {
            return Err(err(
                ErrorCode::BadRequest,
                format!("ttl of {}s: must lie between 1m and 30d", req.ttl_secs),
            ));
        }
        let now = self.now();
        let token = NewToken::generate();
        let expires_at = now + req.ttl_secs as i64;
        let mut txn = self.store.begin()?;
        // A spoke the policy does not know would be refused by every hub; say so now, while
        // the token is being made, not when the technician stands in the town hall. Hubs are
        // the data centre's own and not in the tenants' policy.
        if req.role == Role::Spoke {
            if let Some(compiled) = self.compiled_policy_in(&mut *txn)? {
                let policy = &compiled.policy;
                let tenant = policy.tenant_by_name(req.tenant.as_str()).ok_or_else(|| {
                    err(
                        ErrorCode::NotInPolicy,
                        format!(
                            "tenant {} is not in the published policy (version {}): a spoke's \
                             tenant and site must be in it",
                            req.tenant, policy.version
                        ),
                    )
                })?;
                if policy.site_by_name(tenant, req.site.as_str()).is_none() {
                    return Err(err(
                        ErrorCode::NotInPolicy,
                        format!(
                            "tenant {} has no site {} in the published policy (version {})",
                            req.tenant, req.site, policy.version
                        ),
                    ));
                }
            }
        }
        txn.insert_token(&TokenRecord {
            id: token.id.clone(),
            secret_hash: token.secret_hash.clone(),
            tenant: req.tenant.clone(),
            site: req.site.clone(),
            role: req.role,
            created_at: now,
            expires_at,
            used_at: None,
            created_by: actor.to_owned(),
        })?;
        txn.audit(
            now,
            actor,
            "token.create",
            &json!({"token_id": token.id, "tenant": req.tenant, "site": req.site,
                    "role": req.role, "expires_at": expires_at}),
        )?;
        txn.commit()?;
        Ok(CreateTokenResponse {
            token: token.text,
            token_id: token.id,
            expires_at,
            enroll_urls: self.config.enroll_urls.clone(),
            root_ca_pem: self.ca.root_pem.clone(),
            root_fingerprint: self.ca.root_fingerprint.clone(),
            wg_proof_public_key: self.wg_proof_public,
            policy_public_key: self.current_policy_key(),
        })
    }

    /// Checks the request parts that need no store: CSR, WireGuard key, possession proof.
    pub(super) fn check_keys(
        &self,
        csr_b64: &str,
        wg_b64: &str,
        proof_b64: &str,
    ) -> Result<(VerifiedCsr, WgPublicKey), ApiError> {
        let csr_der = STANDARD
            .decode(csr_b64)
            .map_err(|e| err(ErrorCode::CsrInvalid, format!("csr: not base64: {e}")))?;
        let csr = VerifiedCsr::from_der(&csr_der)?;
        let wg = WgPublicKey::from_base64(wg_b64)
            .map_err(|e| err(ErrorCode::WgKeyInvalid, format!("wg_public_key: {e}")))?;
        let proof = STANDARD.decode(proof_b64).map_err(|e| {
            err(
                ErrorCode::WgProofInvalid,
                format!("wg_proof: not base64: {e}"),
            )
        })?;
        wgproof::verify(&self.wg_proof_secret, &wg, &csr_der, &proof)
            .map_err(|e| err(ErrorCode::WgProofInvalid, format!("wg_proof: {e}")))?;
        Ok((csr, wg))
    }

    /// The tunnel addresses of a site: its host number in its tenant's pools.
    pub(super) fn allocate_addresses(
        &self,
        txn: &mut dyn Txn,
        tenant: &TenantId,
        site: &SiteId,
    ) -> Result<Vec<IpNet>, ApiError> {
        let c = &self.config;
        let v4_pools = 1u64 << (c.tenant_prefix_v4 - c.tunnel_pool_v4.prefix_len());
        let v6_pools = c
            .tunnel_pool_v6
            .map(|p| 1u64 << (c.tenant_prefix_v6 - p.prefix_len()).min(63))
            .unwrap_or(u64::MAX);
        let exhausted = |what: &str| {
            err(
                ErrorCode::AddressPoolExhausted,
                format!("tenant {tenant}: {what}"),
            )
        };
        let pool = txn
            .tenant_pool(tenant, v4_pools.min(v6_pools))
            .map_err(ApiError::from)?
            .ok_or_else(|| exhausted("no free tenant pool left in tunnel_pool_v4/v6"))?;
        let v4_hosts = (1u64 << (32 - c.tenant_prefix_v4)) - 2;
        let host = txn
            .site_host(tenant, site, v4_hosts)
            .map_err(ApiError::from)?
            .ok_or_else(|| exhausted("its pool has no free address"))?;
        let base4 = u32::from(c.tunnel_pool_v4.network()) as u64;
        let v4 = base4 + (pool << (32 - c.tenant_prefix_v4)) + host;
        let mut out = vec![IpNet::V4(Ipv4Net::from(Ipv4Addr::from(v4 as u32)))];
        if let Some(p6) = c.tunnel_pool_v6 {
            let base6 = u128::from(p6.network());
            let v6 = base6 + ((pool as u128) << (128 - c.tenant_prefix_v6)) + host as u128;
            out.push(IpNet::V6(Ipv6Net::from(Ipv6Addr::from(v6))));
        }
        Ok(out)
    }

    /// The valid hubs, ordered by site, each with its configured endpoint.
    pub fn hub_peers(&self, now: i64) -> Result<Vec<HubPeer>, ApiError> {
        let mut hubs: Vec<HubPeer> = self
            .store
            .hubs(now)?
            .into_iter()
            .map(|h| HubPeer {
                endpoint: self.config.hub_endpoints.get(&h.site).cloned(),
                site: h.site,
                wg_public_key: h.wg_public_key,
                tunnel_addrs: h.tunnel_addrs,
            })
            .collect();
        // The store orders by (tenant, site); endpoints are keyed by site alone.
        hubs.sort_by(|a, b| a.site.cmp(&b.site));
        Ok(hubs)
    }

    pub(super) fn response_for(
        &self,
        issued: &Issued,
        identity: Identity,
        issued_at: i64,
    ) -> Result<EnrollResponse, ApiError> {
        let hubs = self.hub_peers(self.now())?;
        Ok(EnrollResponse {
            renew_after: renew_after(issued_at, identity.not_after),
            certificate_chain_pem: format!("{}{}", issued.pem, self.ca.issuing_pem),
            identity,
            hub_endpoints: self.config.hub_endpoints.values().cloned().collect(),
            hubs,
            allowed_ips: self.config.allowed_ips.clone(),
            policy_version: self.store.policy_version()?,
        })
    }

    /// Supersedes whatever valid certificate the site has (a re-enrollment replaces the old
    /// appliance) and checks the WireGuard key is not another site's. A superseded certificate
    /// with another WireGuard key is removed from the registry: the replaced box (stolen, lost,
    /// broken) must not keep its access until its certificate runs out. One with the same key
    /// is replaced by the new certificate's upsert.
    pub(super) fn make_room(
        &self,
        txn: &mut dyn Txn,
        tenant: &TenantId,
        site: &SiteId,
        wg: &WgPublicKey,
        now: i64,
    ) -> Result<Vec<String>, ApiError> {
        if let Some(holder) = txn.valid_certificate_for_key(wg)? {
            if holder.identity.tenant != *tenant || holder.identity.site != *site {
                return Err(err(
                    ErrorCode::WgKeyInUse,
                    "wg_public_key: this WireGuard key belongs to another valid identity",
                ));
            }
        }
        let mut superseded = Vec::new();
        for old in txn.valid_certificates(&Selector::Site(tenant.clone(), site.clone()))? {
            let id = &old.identity;
            txn.end_certificate(
                &id.serial,
                CertStatus::Superseded,
                now,
                RevocationReason::Superseded,
            )?;
            if id.wg_public_key != *wg {
                txn.append_event(
                    RegistryChange::Remove {
                        tenant: id.tenant.clone(),
                        site: id.site.clone(),
                        role: id.role,
                        serial: id.serial.clone(),
                        wg_public_key: id.wg_public_key,
                        reason: RevocationReason::Superseded,
                    },
                    now,
                )?;
            }
            superseded.push(old.identity.serial);
        }
        Ok(superseded)
    }

    /// A site's (an appliance's) new certificate inside `txn`, for enrollment and renewal
    /// alike: supersedes what the site held, gives it its tunnel addresses and issues for the
    /// configured lifetime. Returns the serials it superseded.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn issue_for_site_in(
        &self,
        txn: &mut dyn Txn,
        tenant: &TenantId,
        site: &SiteId,
        role: Role,
        wg: &WgPublicKey,
        spki: &[u8],
        now: i64,
    ) -> Result<(Vec<String>, Issued, Identity), ApiError> {
        let superseded = self.make_room(txn, tenant, site, wg, now)?;
        let addrs = self.allocate_addresses(txn, tenant, site)?;
        let lifetime = self.config.cert_lifetime.0.as_secs() as i64;
        let (issued, identity) = self.issue_in(
            txn,
            tenant,
            site,
            role,
            wg,
            addrs,
            Some(spki),
            lifetime,
            None,
            now,
        )?;
        Ok((superseded, issued, identity))
    }

    /// Issues, records and publishes one identity inside `txn`. `admitted_until`: an MFA-gated
    /// home-office device's window (`Identity::admitted_until`); one that is closed already is
    /// recorded but not published (hubs learn of it when a sign-in opens its window).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn issue_in(
        &self,
        txn: &mut dyn Txn,
        tenant: &TenantId,
        site: &SiteId,
        role: Role,
        wg: &WgPublicKey,
        addrs: Vec<IpNet>,
        spki: Option<&[u8]>,
        lifetime_secs: i64,
        admitted_until: Option<i64>,
        now: i64,
    ) -> Result<(Issued, Identity), ApiError> {
        let spec = LeafSpec {
            tenant,
            site,
            role,
            wg_public_key: wg,
            tunnel_addrs: &addrs,
            not_before: now - ca::CLOCK_SKEW_SECS,
            not_after: now + lifetime_secs,
        };
        let issued = match spki {
            Some(spki) => self.ca.issue_identity(spki, &spec)?,
            None => self.ca.issue_identity_with_throwaway_key(&spec)?,
        };
        let not_after = spec.not_after;
        let identity = Identity {
            tenant: tenant.clone(),
            site: site.clone(),
            role,
            wg_public_key: *wg,
            tunnel_addrs: addrs,
            not_after,
            serial: issued.serial.clone(),
            admitted_until,
        };
        txn.insert_certificate(&CertificateRecord {
            identity: identity.clone(),
            not_before: now,
            status: CertStatus::Valid,
            revoked_at: None,
            reason: None,
            der: issued.der.to_vec(),
        })?;
        if identity.admitted_until() > now {
            txn.append_event(RegistryChange::Upsert(identity.clone()), now)?;
        }
        Ok((issued, identity))
    }

    /// `simpleenroll`: token + CSR + WireGuard key → identity, in one transaction.
    pub fn enroll(&self, req: &EnrollRequest, source: &str) -> Result<EnrollResponse, ApiError> {
        let presented = PresentedToken::parse(&req.token)
            .map_err(|e| err(ErrorCode::TokenInvalid, format!("token: {e}")))?;
        let (csr, wg) = self.check_keys(&req.csr, &req.wg_public_key, &req.wg_proof)?;
        let now = self.now();
        let mut txn = self.store.begin()?;
        let token = match txn.token(&presented.id)? {
            Some(t) if presented.matches(&t.secret_hash) => t,
            _ => {
                return Err(err(
                    ErrorCode::TokenInvalid,
                    "token: unknown or wrong secret",
                ))
            }
        };
        if token.used_at.is_some() {
            // The answer to the first use may have been lost (service killed after the commit,
            // connection dropped): the same appliance asking again with the same key and CSR
            // key gets the same certificate, not a trip to the town hall.
            if let Some((issued, identity, issued_at)) =
                self.answer_again(&mut *txn, &token.id, &csr, &wg, now)?
            {
                txn.audit(
                    now,
                    &format!("appliance@{source}"),
                    "enroll.retry",
                    &json!({"token_id": token.id, "serial": identity.serial}),
                )?;
                txn.commit()?;
                return self.response_for(&issued, identity, issued_at);
            }
            return Err(err(
                ErrorCode::TokenUsed,
                "token: already used; tokens are single-use (a retry is answered only with the \
                 same WireGuard key and CSR key as the first use, while that certificate is valid)",
            ));
        }
        if now >= token.expires_at {
            return Err(err(
                ErrorCode::TokenExpired,
                format!("token: expired {}s ago", now - token.expires_at),
            ));
        }
        csr.check_identity(&token.tenant, &token.site, token.role)?;
        if token.role == Role::HomeOffice {
            return Err(err(
                ErrorCode::BadRequest,
                "token: home-office identities are issued with `komnet homeoffice issue`",
            ));
        }
        if !txn.use_token(&token.id, now)? {
            return Err(err(
                ErrorCode::TokenUsed,
                "token: already used; tokens are single-use",
            ));
        }
        let (superseded, issued, identity) = self.issue_for_site_in(
            &mut *txn,
            &token.tenant,
            &token.site,
            token.role,
            &wg,
            &csr.spki_der,
            now,
        )?;
        txn.set_token_certificate(&token.id, &identity.serial)?;
        txn.audit(
            now,
            &format!("appliance@{source}"),
            "enroll",
            &json!({"token_id": token.id, "serial": identity.serial, "tenant": identity.tenant,
                    "site": identity.site, "role": identity.role,
                    "wg_public_key": identity.wg_public_key, "tunnel_addrs": identity.tunnel_addrs,
                    "superseded": superseded}),
        )?;
        txn.commit()?;
        self.response_for(&issued, identity, now)
    }

    /// The certificate of a token's first use again, when the request carries the same
    /// WireGuard key and CSR key and the certificate is still the site's valid one. (The answer
    /// is made after the commit: it reads the store.)
    fn answer_again(
        &self,
        txn: &mut dyn Txn,
        token_id: &str,
        csr: &VerifiedCsr,
        wg: &WgPublicKey,
        now: i64,
    ) -> Result<Option<(Issued, Identity, i64)>, ApiError> {
        let Some(serial) = txn.token_certificate(token_id)? else {
            return Ok(None);
        };
        let Some(cert) = txn.certificate(&serial)? else {
            return Ok(None);
        };
        if cert.status != CertStatus::Valid
            || cert.identity.not_after <= now
            || cert.identity.wg_public_key != *wg
        {
            return Ok(None);
        }
        let same_key = x509_parser::parse_x509_certificate(&cert.der)
            .map(|(_, c)| c.public_key().raw == csr.spki_der.as_slice())
            .unwrap_or(false);
        if !same_key {
            return Ok(None);
        }
        let der = rustls_pki_types::CertificateDer::from(cert.der.clone());
        let pem = pem_certificate(&cert.der);
        let issued = Issued {
            der,
            pem,
            serial: cert.identity.serial.clone(),
        };
        Ok(Some((issued, cert.identity, cert.not_before)))
    }
}
