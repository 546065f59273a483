//! The service as distribution point, over real HTTPS on loopback: the hub list with
//! endpoints.
#![allow(clippy::unwrap_used)]

mod common;

use komnet_enroll::api::ErrorCode;
use komnet_enroll::client;
use komnet_enroll::identity::Role;

use common::enroll;

fn code_of(e: &client::ClientError) -> ErrorCode {
    e.api_error()
        .unwrap_or_else(|| panic!("not a typed error: {e}"))
        .code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_route_lists_hubs_with_their_endpoints() {
    let h = common::start().await;
    // This spoke enrolls before any hub exists: it learns of them later from /v1/hubs.
    let (spoke, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    assert!(spoke.hubs.is_empty());
    assert_eq!(client::fetch_hubs(&spoke).await.unwrap(), vec![]);

    // hub2 first, so the answer's order comes from the sort, not from enrollment order.
    let (_, hub2_keys) = enroll(&h, "rz", "hub2", Role::Hub).await;
    let (hub1, hub1_keys) = enroll(&h, "rz", "hub1", Role::Hub).await;
    let hubs = client::fetch_hubs(&spoke).await.unwrap();
    let seen: Vec<(&str, _, Option<&str>)> = hubs
        .iter()
        .map(|p| (p.site.as_str(), p.wg_public_key, p.endpoint.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("hub1", hub1_keys.public(), Some("203.0.113.1:51820")),
            ("hub2", hub2_keys.public(), None),
        ]
    );
    assert_eq!(hubs[0].tunnel_addrs, hub1.identity.tunnel_addrs);
    // A hub may ask too.
    assert_eq!(client::fetch_hubs(&hub1).await.unwrap(), hubs);
    // Enrollment answers carry the same list.
    let (late, _) = enroll(&h, "musterstadt", "bauhof", Role::Spoke).await;
    assert_eq!(late.hubs, hubs);
    assert_eq!(late.hub_endpoints, vec!["203.0.113.1:51820".to_string()]);

    // A superseded certificate is refused: the re-enrolled site has a new one.
    let (_, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    let e = client::fetch_hubs(&spoke).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::CertificateSuperseded, "{e}");
}
