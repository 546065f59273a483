//! The admin socket as the web console uses it (komnet-console, issue 18): calls made for a
//! person name them in the audit log, the fleet, and the audit log filtered by tenant, actor,
//! action and time.

#![allow(clippy::unwrap_used)]

mod common;

use komnet_enroll::admin::{AdminClient, AdminError};
use komnet_enroll::api::admin::{AuditQuery, CreateTokenRequest, RevokeRequest};
use komnet_enroll::api::{ErrorCode, RevocationReason};
use komnet_enroll::identity::{Role, SiteId, TenantId};

fn token(tenant: &str, site: &str) -> CreateTokenRequest {
    CreateTokenRequest {
        tenant: TenantId::parse(tenant).unwrap(),
        site: SiteId::parse(site).unwrap(),
        role: Role::Spoke,
        ttl_secs: 600,
    }
}

#[tokio::test]
async fn console_calls_are_audited_for_the_person_and_filtered() {
    let h = common::start().await;
    let admin = AdminClient::new(h.server.admin_socket.clone().unwrap());
    common::enroll(&h, "tholey", "rathaus", Role::Spoke).await;
    common::enroll(&h, "nohfelden", "rathaus", Role::Spoke).await;
    admin
        .create_token(
            &token("tholey", "schule"),
            "tom (oidc sub 7, commune admin of tholey)",
        )
        .await
        .unwrap();

    // A person's name must be one line of printable text.
    let e = admin
        .create_token(&token("tholey", "x"), "tom\tevil")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AdminError::Refused(api) if api.code == ErrorCode::BadRequest),
        "{e}"
    );

    let fleet = admin.fleet("anna").await.unwrap();
    let mut sites: Vec<String> = fleet
        .peers
        .iter()
        .map(|p| format!("{}/{}", p.tenant, p.site))
        .collect();
    sites.sort();
    assert_eq!(sites, ["nohfelden/rathaus", "tholey/rathaus"]);
    assert!(fleet.registry_version >= 2);

    // A revocation by serial names its tenant, so that tenant's admin sees it.
    let serial = fleet
        .peers
        .iter()
        .find(|p| p.tenant.as_str() == "nohfelden")
        .unwrap()
        .serial
        .clone();
    admin
        .revoke(
            &RevokeRequest {
                serial: Some(serial),
                tenant: None,
                site: None,
                reason: RevocationReason::KeyCompromise,
            },
            "nina",
        )
        .await
        .unwrap();

    let q = |tenant: Option<&str>, actor: Option<&str>, action: Option<&str>| AuditQuery {
        tenant: tenant.map(|t| TenantId::parse(t).unwrap()),
        actor: actor.map(str::to_owned),
        action: action.map(str::to_owned),
        ..Default::default()
    };
    let tholey = admin
        .audit(&q(Some("tholey"), None, None), "anna")
        .await
        .unwrap();
    let actions: Vec<&str> = tholey.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["token.create", "enroll", "token.create"],
        "{tholey:#?}"
    );
    let toms = admin
        .audit(&q(None, Some("tom (oidc"), None), "anna")
        .await
        .unwrap();
    assert_eq!(toms.len(), 1);
    assert!(
        toms[0]
            .actor
            .starts_with("tom (oidc sub 7, commune admin of tholey) via uid:"),
        "{}",
        toms[0].actor
    );
    let nohfelden_revokes = admin
        .audit(&q(Some("nohfelden"), None, Some("revoke")), "anna")
        .await
        .unwrap();
    assert_eq!(nohfelden_revokes.len(), 1);
    assert!(nohfelden_revokes[0].actor.starts_with("nina via uid:"));
    let none = admin
        .audit(
            &AuditQuery {
                since: Some(h.service.now() + 3600),
                ..Default::default()
            },
            "anna",
        )
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:#?}");
}
