//! Home-office identities for the stock WireGuard app: addresses from the tenant's pool in
//! the published policy, no CSR, no renewal; and MFA-gated tunnels: in a tenant with an MFA
//! window (`[mfa_window]` in enroll.toml) a device is admitted at the hubs only for the window
//! after its person's sign-in with a second factor (`Identity::admitted_until`, which hubs
//! enforce on their own clock, so a window ends on time even while the registry is away).

use super::*;

impl Service {
    /// A home-office device identity for the stock WireGuard app (no CSR, no renewal).
    pub fn issue_homeoffice(
        &self,
        req: &HomeOfficeRequest,
        actor: &str,
    ) -> Result<HomeOfficeResponse, ApiError> {
        let lifetime = match req.ttl_secs {
            Some(s) if !(3600..=400 * 86_400).contains(&s) => {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("ttl of {s}s: must lie between 1h and 400d"),
                ))
            }
            Some(s) => s as i64,
            None => self.config.homeoffice_lifetime.0.as_secs() as i64,
        };
        let now = self.now();
        let hubs = self.hub_peers(now)?;
        if hubs.is_empty() {
            return Err(err(
                ErrorCode::NoHub,
                "no hub is enrolled yet: a home-office configuration needs a hub to connect to",
            ));
        }
        if hubs.iter().all(|h| h.endpoint.is_none()) {
            let sites: Vec<&str> = hubs.iter().map(|h| h.site.as_str()).collect();
            return Err(err(
                ErrorCode::NoHub,
                format!(
                    "no enrolled hub has an endpoint: add SITE = \"host:port\" under \
                     [hub_endpoints] in enroll.toml for one of the hubs {} and restart",
                    sites.join(", ")
                ),
            ));
        }
        let mut txn = self.store.begin()?;
        let compiled = self.compiled_policy_in(&mut *txn)?.ok_or_else(|| {
            err(
                ErrorCode::NoPolicy,
                "no policy bundle is published yet: home-office addresses come from the \
                 tenant's home-office pool in the policy; publish one with \
                 `komnet policy-publish BUNDLE`",
            )
        })?;
        let superseded =
            self.make_room(&mut *txn, &req.tenant, &req.user, &req.wg_public_key, now)?;
        let addrs = allocate_homeoffice(
            &mut *txn,
            &compiled.policy,
            &req.tenant,
            &req.user,
            now + lifetime,
            now,
        )?;
        let admitted_until = self.window_end(&req.tenant, req.mfa_at, now);
        let (issued, identity) = self.issue_in(
            &mut *txn,
            &req.tenant,
            &req.user,
            Role::HomeOffice,
            &req.wg_public_key,
            addrs,
            None,
            lifetime,
            admitted_until,
            now,
        )?;
        txn.audit(
            now,
            actor,
            "homeoffice.issue",
            &json!({"serial": identity.serial, "tenant": identity.tenant, "user": identity.site,
                    "wg_public_key": identity.wg_public_key, "tunnel_addrs": identity.tunnel_addrs,
                    "policy_version": compiled.policy.version, "superseded": superseded,
                    "admitted_until": admitted_until}),
        )?;
        txn.commit()?;
        Ok(HomeOfficeResponse {
            enrollment: self.response_for(&issued, identity, now)?,
        })
    }
}

impl Service {
    /// Where `tenant`'s home offices are MFA-gated: the end of the window a second factor
    /// proven at `mfa_at` opens (`now` when there was none: closed until a sign-in). `None`:
    /// the tenant is not gated.
    fn window_end(&self, tenant: &TenantId, mfa_at: Option<i64>, now: i64) -> Option<i64> {
        let window = self.config.mfa_window.get(tenant)?.0.as_secs() as i64;
        // A sign-in stamped in the future is a clock problem, not a longer window.
        Some(mfa_at.map_or(now, |at| at.min(now) + window))
    }

    /// A person signed in with a second factor: their home-office devices in the tenant are
    /// admitted until the window's end (a window is only ever extended here; revoking a
    /// device still ends it at once).
    pub fn open_mfa_window(
        &self,
        req: &MfaWindowRequest,
        actor: &str,
    ) -> Result<MfaWindowResponse, ApiError> {
        let now = self.now();
        let Some(until) = self.window_end(&req.tenant, Some(req.authenticated_at), now) else {
            return Ok(MfaWindowResponse {
                admitted_until: None,
                devices: Vec::new(),
            });
        };
        if until <= now {
            return Err(err(
                ErrorCode::BadRequest,
                format!(
                    "authenticated_at {}: that sign-in is older than tenant {}'s MFA window",
                    req.authenticated_at, req.tenant
                ),
            ));
        }
        let owner = req.owner.as_str();
        let mut txn = self.store.begin()?;
        let mut devices = Vec::new();
        let mut serials = Vec::new();
        for cert in txn.valid_certificates(&Selector::Tenant(req.tenant.clone()))? {
            let mut identity = cert.identity;
            if identity.role != Role::HomeOffice || identity.site.device_of(owner).is_none() {
                continue;
            }
            devices.push(identity.site.clone());
            if identity.admitted_until.is_some_and(|u| u >= until) {
                continue;
            }
            txn.set_admitted_until(&identity.serial, Some(until))?;
            identity.admitted_until = Some(until);
            serials.push(identity.serial.clone());
            txn.append_event(RegistryChange::Upsert(identity), now)?;
        }
        txn.audit(
            now,
            actor,
            "homeoffice.mfa_window",
            &json!({"tenant": req.tenant, "owner": owner, "authenticated_at": req.authenticated_at,
                    "admitted_until": until, "serials": serials}),
        )?;
        txn.commit()?;
        Ok(MfaWindowResponse {
            admitted_until: Some(until),
            devices,
        })
    }

    /// Brings the devices in line with `[mfa_window]` after it changed (at start): a tenant
    /// newly gated has its devices taken out until their people sign in; one no longer gated
    /// has them admitted for as long as their certificates last. Returns how many changed.
    pub fn apply_mfa_config(&self) -> Result<usize, ApiError> {
        let now = self.now();
        // Read before the transaction: the SQLite store's transaction holds its connection.
        let identities = self.store.valid_identities(now)?;
        let mut txn = self.store.begin()?;
        let mut changed = 0;
        for identity in identities {
            if identity.role != Role::HomeOffice {
                continue;
            }
            let gated = self.config.mfa_window.contains_key(&identity.tenant);
            let change = match (gated, identity.admitted_until) {
                (true, None) => {
                    txn.set_admitted_until(&identity.serial, Some(now))?;
                    RegistryChange::Remove {
                        tenant: identity.tenant.clone(),
                        site: identity.site.clone(),
                        role: identity.role,
                        serial: identity.serial.clone(),
                        wg_public_key: identity.wg_public_key,
                        reason: RevocationReason::PrivilegeWithdrawn,
                    }
                }
                (false, Some(_)) => {
                    txn.set_admitted_until(&identity.serial, None)?;
                    RegistryChange::Upsert(Identity {
                        admitted_until: None,
                        ..identity
                    })
                }
                _ => continue,
            };
            txn.append_event(change, now)?;
            changed += 1;
        }
        if changed > 0 {
            txn.audit(
                now,
                "komnet-enroll",
                "homeoffice.mfa_config",
                &json!({"changed": changed, "gated_tenants": self.config.mfa_window.keys().collect::<Vec<_>>()}),
            )?;
        }
        txn.commit()?;
        Ok(changed)
    }
}

/// A home-office user's tunnel addresses: one host address from each address family of the
/// tenant's home-office pool in the policy. The user keeps the addresses it holds as long as
/// they lie in the pool; others are held until their holder expires (or is decommissioned).
fn allocate_homeoffice(
    txn: &mut dyn Txn,
    policy: &komnet_policy::Policy,
    tenant: &TenantId,
    user: &SiteId,
    until: i64,
    now: i64,
) -> Result<Vec<IpNet>, ApiError> {
    let version = policy.version;
    let t = policy.tenant_by_name(tenant.as_str()).ok_or_else(|| {
        err(
            ErrorCode::NotInPolicy,
            format!("tenant {tenant} is not in the published policy (version {version})"),
        )
    })?;
    let pool = &policy.tenants[t.index()].homeoffice_pool;
    if pool.is_empty() {
        return Err(err(
            ErrorCode::NotInPolicy,
            format!(
                "tenant {tenant} has no home-office pool in the published policy (version \
                 {version}): set `homeoffice = [...]` for it in operator.toml and publish"
            ),
        ));
    }
    let held = txn.homeoffice_addrs(tenant)?;
    let mut out = Vec::new();
    let mut kept = Vec::new();
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let prefixes: Vec<IpNet> = pool
            .iter()
            .copied()
            .filter(|p| matches!(p, IpNet::V6(_)) == v6)
            .collect();
        if prefixes.is_empty() {
            continue;
        }
        // A host address of the pool: a pool moved by a new policy version can turn a held
        // address into a network or broadcast address.
        let in_pool = |a: &IpAddr| {
            prefixes.iter().any(|p| {
                p.contains(a)
                    && *a != p.network()
                    && !(matches!(p, IpNet::V4(_)) && *a == p.broadcast())
            })
        };
        let own = held
            .iter()
            .filter(|h| h.user == *user && in_pool(&h.addr))
            .map(|h| h.addr)
            .min();
        let addr = match own {
            Some(a) => a,
            None => {
                let taken: BTreeSet<IpAddr> = held
                    .iter()
                    .filter(|h| h.user != *user && h.held_until > now)
                    .map(|h| h.addr)
                    .collect();
                lowest_free(&prefixes, &taken).ok_or_else(|| {
                    err(
                        ErrorCode::AddressPoolExhausted,
                        format!(
                            "tenant {tenant}: the {family} home-office pool {} (policy version \
                             {version}) has no free address",
                            addr_list(&prefixes)
                        ),
                    )
                })?
            }
        };
        txn.hold_homeoffice_addr(tenant, user, addr, until)?;
        kept.push(addr);
        out.push(IpNet::from(addr));
    }
    // Addresses the user held outside the current pool (the policy changed) go back.
    for h in held.iter().filter(|h| h.user == *user) {
        if !kept.contains(&h.addr) {
            txn.release_homeoffice_addr(tenant, h.addr)?;
        }
    }
    Ok(out)
}

/// The lowest host address in `prefixes` (in their order) not in `taken`: never a network
/// address, and for IPv4 never a broadcast address.
fn lowest_free(prefixes: &[IpNet], taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    for prefix in prefixes {
        let (first, last) = match prefix {
            IpNet::V4(n) => (
                u128::from(u32::from(n.network())).checked_add(1),
                u128::from(u32::from(n.broadcast())).checked_sub(1),
            ),
            IpNet::V6(n) => (
                u128::from(n.network()).checked_add(1),
                Some(u128::from(n.broadcast())),
            ),
        };
        let make = |v: u128| match prefix {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
        };
        let (Some(mut candidate), Some(last)) = (first, last) else {
            continue;
        };
        // Each step skips one taken address, so this ends after at most |taken| + 1 steps.
        while candidate <= last {
            let addr = make(candidate);
            if !taken.contains(&addr) {
                return Some(addr);
            }
            candidate += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn lowest_free_skips_network_broadcast_and_taken() {
        let v4: Vec<IpNet> = vec!["10.250.1.0/30".parse().unwrap()];
        assert_eq!(
            lowest_free(&v4, &set(&[])),
            Some("10.250.1.1".parse().unwrap())
        );
        assert_eq!(
            lowest_free(&v4, &set(&["10.250.1.1"])),
            Some("10.250.1.2".parse().unwrap())
        );
        // .3 is the broadcast address.
        assert_eq!(lowest_free(&v4, &set(&["10.250.1.1", "10.250.1.2"])), None);
        // A full first prefix moves on to the next.
        let two: Vec<IpNet> = vec![
            "10.250.1.0/30".parse().unwrap(),
            "10.250.9.0/29".parse().unwrap(),
        ];
        assert_eq!(
            lowest_free(&two, &set(&["10.250.1.1", "10.250.1.2"])),
            Some("10.250.9.1".parse().unwrap())
        );
        // IPv6 has no broadcast: the last address is a host.
        let v6: Vec<IpNet> = vec!["fd00::/127".parse().unwrap()];
        assert_eq!(
            lowest_free(&v6, &set(&[])),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(lowest_free(&v6, &set(&["fd00::1"])), None);
        // Degenerate pools have no host address at all, without overflow at the edges.
        for p in [
            "0.0.0.0/32",
            "255.255.255.255/32",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ] {
            assert_eq!(lowest_free(&[p.parse().unwrap()], &set(&[])), None, "{p}");
        }
    }
}
