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

/// Hubs report how their peers are doing (`POST /v1/hub/report`, with the hub's certificate);
/// the fleet carries each hub's last report. A spoke's certificate is refused, a new report
/// replaces the hub's previous one.
#[tokio::test]
async fn hub_reports_reach_the_fleet_and_only_hubs_may_send_them() {
    use komnet_enroll::client::Client;
    use komnet_proto::status::{HubPeerReport, HubReport};

    let h = common::start().await;
    let admin = AdminClient::new(h.server.admin_socket.clone().unwrap());
    let (hub, _) = common::enroll(&h, "kreis", "hub1", Role::Hub).await;
    let (spoke, spoke_keys) = common::enroll(&h, "tholey", "rathaus", Role::Spoke).await;
    let report = |handshake: i64, denied: u64| HubReport {
        peers: vec![HubPeerReport {
            public_key: spoke_keys.public().to_base64(),
            tenant: "tholey".into(),
            site: "rathaus".into(),
            role: "spoke".into(),
            last_handshake: Some(handshake),
            rx_bytes: 1_000,
            tx_bytes: 2_000,
            drops: 1,
            denied,
        }],
    };

    let e = Client::for_enrollment(&spoke)
        .unwrap()
        .report_hub(&report(100, 0))
        .await
        .unwrap_err();
    assert_eq!(
        e.api_error().map(|a| a.code),
        Some(ErrorCode::Forbidden),
        "{e}"
    );
    assert!(admin.fleet("anna").await.unwrap().hub_reports.is_empty());

    let client = Client::for_enrollment(&hub).unwrap();
    client.report_hub(&report(100, 2)).await.unwrap();
    client.report_hub(&report(200, 5)).await.unwrap();
    let fleet = admin.fleet("anna").await.unwrap();
    assert_eq!(fleet.hub_reports.len(), 1, "{:?}", fleet.hub_reports);
    let seen = &fleet.hub_reports[0];
    assert_eq!(
        (seen.tenant.as_str(), seen.site.as_str()),
        ("kreis", "hub1")
    );
    assert_eq!(
        seen.report,
        report(200, 5),
        "the newer report replaced the older"
    );
    assert!(seen.at > 0);

    // An appliance polling for a newer policy says which one it holds: the fleet shows it.
    let spoke_client = Client::for_enrollment(&spoke).unwrap();
    let _ = spoke_client.fetch_policy(Some(7)).await;
    let held = admin.fleet("anna").await.unwrap().policy_held;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (
            held[0].tenant.as_str(),
            held[0].site.as_str(),
            held[0].version
        ),
        ("tholey", "rathaus", 7)
    );
}
