//! The admin API as a library, for a program that acts for people (`komnet-console`).

use std::path::PathBuf;

use hyper::Method;
use komnet_proto::api::admin::{
    self, AuditRecord, CreateTokenRequest, CreateTokenResponse, HomeOfficeRequest,
    HomeOfficeResponse, RevokeRequest, RevokeResponse,
};

use crate::{call_with, AdminError};

/// The admin API for a program that acts for people (the web console): each call names the
/// person in [`admin::ON_BEHALF_OF_HEADER`], so the audit log records who asked.
#[derive(Debug, Clone)]
pub struct AdminClient {
    pub socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AdminClient {
            socket: socket.into(),
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        person: &str,
    ) -> Result<T, AdminError> {
        call_with(
            &self.socket,
            method,
            path,
            body,
            "application/json",
            Some(person),
        )
        .await
    }

    pub async fn create_token(
        &self,
        req: &CreateTokenRequest,
        person: &str,
    ) -> Result<CreateTokenResponse, AdminError> {
        let body = serde_json::to_vec(req)?;
        self.json(Method::POST, admin::TOKENS, Some(body), person)
            .await
    }

    pub async fn revoke(
        &self,
        req: &RevokeRequest,
        person: &str,
    ) -> Result<RevokeResponse, AdminError> {
        let body = serde_json::to_vec(req)?;
        self.json(Method::POST, admin::REVOKE, Some(body), person)
            .await
    }

    pub async fn homeoffice(
        &self,
        req: &HomeOfficeRequest,
        person: &str,
    ) -> Result<HomeOfficeResponse, AdminError> {
        let body = serde_json::to_vec(req)?;
        self.json(Method::POST, admin::HOMEOFFICE, Some(body), person)
            .await
    }

    /// The person signed in with a second factor: opens their devices' MFA window.
    pub async fn open_mfa_window(
        &self,
        req: &admin::MfaWindowRequest,
        person: &str,
    ) -> Result<admin::MfaWindowResponse, AdminError> {
        let body = serde_json::to_vec(req)?;
        self.json(Method::POST, admin::HOMEOFFICE_WINDOW, Some(body), person)
            .await
    }

    pub async fn policy(&self, person: &str) -> Result<admin::PolicyBundleResponse, AdminError> {
        self.json(Method::GET, admin::POLICY, None, person).await
    }

    pub async fn fleet(&self, person: &str) -> Result<admin::FleetResponse, AdminError> {
        self.json(Method::GET, admin::FLEET, None, person).await
    }

    /// Audit entries matching `query`, oldest first.
    pub async fn audit(
        &self,
        query: &admin::AuditQuery,
        person: &str,
    ) -> Result<Vec<AuditRecord>, AdminError> {
        let mut path = String::from(admin::AUDIT);
        let mut sep = '?';
        let mut add = |k: &str, v: &str| {
            path.push(sep);
            path.push_str(k);
            path.push('=');
            path.push_str(&percent_encode(v));
            sep = '&';
        };
        if let Some(l) = query.limit {
            add("limit", &l.to_string());
        }
        if let Some(t) = &query.tenant {
            add("tenant", t.as_str());
        }
        if let Some(a) = &query.actor {
            add("actor", a);
        }
        if let Some(a) = &query.action {
            add("action", a);
        }
        if let Some(s) = query.since {
            add("since", &s.to_string());
        }
        if let Some(u) = query.until {
            add("until", &u.to_string());
        }
        self.json(Method::GET, &path, None, person).await
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (a query value).
fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
