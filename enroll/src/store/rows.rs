//! What both backends read back: rows turned into records, with a malformed value reported as
//! [`StoreError::Corrupt`] rather than trusted.

use super::*;

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt {
        what,
        value: text.chars().take(200).collect(),
    })
}

pub(super) fn parse_name<T>(
    what: &'static str,
    text: String,
    f: impl FnOnce(&str) -> Result<T, crate::identity::IdentityError>,
) -> Result<T, StoreError> {
    f(&text).map_err(|_| StoreError::Corrupt { what, value: text })
}

pub(super) const CERT_COLUMNS: &str =
    "serial, tenant, site, role, wg_public_key, tunnel_addrs, not_before, \
                            not_after, status, revoked_at, reason, der, admitted_until";

pub(super) type CertRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
    Option<i64>,
    Option<String>,
    Vec<u8>,
    Option<i64>,
);

pub(super) fn cert_from_row(r: CertRow) -> Result<CertificateRecord, StoreError> {
    let (
        serial,
        tenant,
        site,
        role,
        key,
        addrs,
        not_before,
        not_after,
        status,
        rat,
        reason,
        der,
        admitted_until,
    ) = r;
    let tunnel_addrs: Vec<IpNet> = parse_json("tunnel addresses", &addrs)?;
    let reason = match reason {
        None => None,
        Some(r) => Some(RevocationReason::parse(&r).ok_or(StoreError::Corrupt {
            what: "revocation reason",
            value: r,
        })?),
    };
    Ok(CertificateRecord {
        identity: Identity {
            tenant: parse_name("tenant", tenant, TenantId::parse)?,
            site: parse_name("site", site, SiteId::parse)?,
            role: parse_name("role", role, str::parse)?,
            wg_public_key: parse_name("WireGuard key", key, WgPublicKey::from_base64)?,
            tunnel_addrs,
            not_after,
            serial,
            admitted_until,
        },
        not_before,
        status: CertStatus::parse(&status)?,
        revoked_at: rat,
        reason,
        der,
    })
}

pub(super) fn parse_version(what: &'static str, text: String) -> Result<u64, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt { what, value: text })
}

/// `policy_history.version`: the version padded with zeros to 20 digits (u64::MAX has 20), so
/// that the text order both databases sort by is the order of the numbers.
pub(super) fn history_key(version: u64) -> String {
    format!("{version:020}")
}
