//! Hub admission with the worked example policy: allowed IPs from the policy, expiry,
//! revocation, identities the policy does not know, and policy changes.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::path::Path;

use ipnet::IpNet;
use komnet_gateway::admission::{AdmissionError, HubPeers, PeerChange};
use komnet_policy::{Policy, Role};
use komnet_proto::identity::{Identity, SiteId, TenantId, WgPublicKey};

/// The worked example, with `edit` (from, to) applied to every file.
fn policy(edit: Option<(&str, &str)>) -> Policy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
    let apply = |text: String| match edit {
        Some((from, to)) => text.replace(from, to),
        None => text,
    };
    let op = apply(std::fs::read_to_string(dir.join("operator.toml")).unwrap());
    let mut frags = Vec::new();
    for e in std::fs::read_dir(dir.join("tenants")).unwrap() {
        let e = e.unwrap();
        frags.push((
            e.file_name().to_string_lossy().into_owned(),
            apply(std::fs::read_to_string(e.path()).unwrap()),
        ));
    }
    let refs: Vec<(&str, &str)> = frags
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    Policy::from_texts(&op, &refs).unwrap_or_else(|e| panic!("{}", e.render()))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn admission(
    tenant: &str,
    site: &str,
    role: Role,
    key: u8,
    addr: &str,
    not_after: i64,
) -> Identity {
    Identity {
        tenant: TenantId::parse(tenant).unwrap(),
        site: SiteId::parse(site).unwrap(),
        role,
        wg_public_key: WgPublicKey::from_bytes([key; 32]).unwrap(),
        tunnel_addrs: vec![net(addr)],
        not_after,
        serial: format!("{key:02x}"),
        admitted_until: None,
    }
}

#[test]
fn spokes_get_their_site_and_home_offices_only_their_address() {
    let p = policy(None);
    let mut hub = HubPeers::default();
    let (r, changes) = hub.upsert(
        1000,
        &p,
        admission(
            "musterstadt",
            "rathaus",
            Role::Spoke,
            1,
            "10.96.0.2/32",
            2000,
        ),
    );
    r.unwrap();
    let [PeerChange::Upsert {
        allowed_ips,
        identity,
        ..
    }] = changes.as_slice()
    else {
        panic!("{changes:?}")
    };
    assert_eq!(
        allowed_ips,
        &vec![
            net("10.20.0.0/16"),
            net("10.96.0.2/32"),
            net("fd00:20::/48")
        ]
    );
    assert_eq!(
        Some(*identity),
        p.peer_identity("musterstadt", Some("rathaus"), Role::Spoke)
    );

    let (r, changes) = hub.upsert(
        1000,
        &p,
        admission(
            "musterstadt",
            "anna",
            Role::HomeOffice,
            2,
            "10.250.20.9/32",
            2000,
        ),
    );
    r.unwrap();
    let [PeerChange::Upsert { allowed_ips, .. }] = changes.as_slice() else {
        panic!()
    };
    assert_eq!(allowed_ips, &vec![net("10.250.20.9/32")]);
    // A home-office address outside the tenant's pool is refused.
    let (r, _) = hub.upsert(
        1000,
        &p,
        admission(
            "musterstadt",
            "bob",
            Role::HomeOffice,
            3,
            "10.250.30.9/32",
            2000,
        ),
    );
    assert!(matches!(
        r,
        Err(AdmissionError::AddressOutsidePolicy { .. })
    ));
    assert_eq!(hub.len(), 2);
}

#[test]
fn unknown_expired_and_revoked_identities_lose_access() {
    let p = policy(None);
    let mut hub = HubPeers::default();
    let (r, _) = hub.upsert(
        1000,
        &p,
        admission("nowhere", "rathaus", Role::Spoke, 1, "10.96.0.2/32", 2000),
    );
    assert!(matches!(r, Err(AdmissionError::UnknownToPolicy { .. })));
    let (r, _) = hub.upsert(
        1000,
        &p,
        admission(
            "musterstadt",
            "rathaus",
            Role::Spoke,
            1,
            "10.96.0.2/32",
            900,
        ),
    );
    assert!(matches!(r, Err(AdmissionError::Expired { .. })));
    let (r, _) = hub.upsert(
        1000,
        &p,
        admission("kreis", "kreishaus", Role::Hub, 9, "10.96.9.1/32", 2000),
    );
    assert_eq!(r, Err(AdmissionError::HubRole));

    hub.upsert(
        1000,
        &p,
        admission(
            "musterstadt",
            "rathaus",
            Role::Spoke,
            1,
            "10.96.0.2/32",
            2000,
        ),
    )
    .0
    .unwrap();
    hub.upsert(
        1000,
        &p,
        admission(
            "beispieldorf",
            "rathaus",
            Role::Spoke,
            2,
            "10.96.1.2/32",
            1500,
        ),
    )
    .0
    .unwrap();
    // An update that is no longer acceptable withdraws the earlier admission.
    let (r, changes) = hub.upsert(
        1000,
        &p,
        admission("musterstadt", "gone", Role::Spoke, 1, "10.96.0.2/32", 2000),
    );
    assert!(r.is_err());
    assert_eq!(changes, vec![PeerChange::Remove { key: [1; 32] }]);
    // Expiry and revocation.
    assert_eq!(
        hub.expire(1500),
        vec![(PeerChange::Remove { key: [2; 32] }, false)]
    );
    assert!(hub.is_empty());
    assert_eq!(hub.remove(&[2; 32]), None);
}

#[test]
fn a_policy_change_updates_allowed_ips_and_drops_unknown_sites() {
    let p = policy(None);
    let mut hub = HubPeers::default();
    hub.upsert(
        1000,
        &p,
        admission(
            "musterstadt",
            "rathaus",
            Role::Spoke,
            1,
            "10.96.0.2/32",
            9000,
        ),
    )
    .0
    .unwrap();
    hub.upsert(
        1000,
        &p,
        admission(
            "musterstadt",
            "bauhof",
            Role::Spoke,
            2,
            "10.96.0.3/32",
            9000,
        ),
    )
    .0
    .unwrap();
    // Same policy again: nothing to do.
    assert!(hub.on_policy_change(1000, &p).is_empty());
    // The depot's range grows; the town hall is unchanged.
    let p2 = policy(Some((
        "prefixes = [\"10.21.0.0/16\", \"fd00:21::/48\"]",
        "prefixes = [\"10.21.0.0/16\", \"10.22.0.0/16\", \"fd00:21::/48\"]",
    )));
    let changes = hub.on_policy_change(1000, &p2);
    assert_eq!(changes.len(), 1, "{changes:?}");
    let PeerChange::Upsert {
        key, allowed_ips, ..
    } = &changes[0]
    else {
        panic!()
    };
    assert_eq!(key, &[2; 32]);
    assert!(allowed_ips.contains(&net("10.22.0.0/16")));
    // The depot is renamed in the policy: the peer enrolled for "bauhof" goes.
    let p3 = policy(Some(("bauhof", "werkhof")));
    let changes = hub.on_policy_change(1000, &p3);
    assert!(
        changes.contains(&PeerChange::Remove { key: [2; 32] }),
        "{changes:?}"
    );
    assert_eq!(hub.len(), 1);
    // The town hall's identity is re-resolved against the new policy (its indices moved).
    assert_eq!(
        hub.identity(&[1; 32]),
        p3.peer_identity("musterstadt", Some("rathaus"), Role::Spoke)
    );
}

/// A town hall's replaced appliance (new key K2) displaces the old one (K1) even if the
/// registry's removal of K1 never arrived: two keys never hold one site's addresses.
#[test]
fn a_new_key_for_a_site_displaces_the_old_one() {
    let p = policy(None);
    let mut hub = HubPeers::default();
    let k1 = admission(
        "musterstadt",
        "rathaus",
        Role::Spoke,
        1,
        "10.96.0.2/32",
        5000,
    );
    let (r, _) = hub.upsert(1000, &p, k1);
    r.unwrap();
    let other_site = admission(
        "musterstadt",
        "bauhof",
        Role::Spoke,
        3,
        "10.96.0.3/32",
        5000,
    );
    let (r, _) = hub.upsert(1000, &p, other_site);
    r.unwrap();
    let k2 = admission(
        "musterstadt",
        "rathaus",
        Role::Spoke,
        2,
        "10.96.0.4/32",
        6000,
    );
    let (r, changes) = hub.upsert(1100, &p, k2);
    r.unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0], PeerChange::Remove { key: [1; 32] });
    assert!(matches!(changes[1], PeerChange::Upsert { key, .. } if key == [2; 32]));
    assert!(hub.identity(&[1; 32]).is_none());
    assert!(
        hub.identity(&[3; 32]).is_some(),
        "another site is untouched"
    );
    assert_eq!(hub.len(), 2);

    // A home-office device re-issued with a new key at the same address.
    let phone1 = admission(
        "musterstadt",
        "anna",
        Role::HomeOffice,
        7,
        "10.250.20.9/32",
        5000,
    );
    let (r, _) = hub.upsert(1000, &p, phone1);
    r.unwrap();
    let phone2 = admission(
        "musterstadt",
        "anna",
        Role::HomeOffice,
        8,
        "10.250.20.9/32",
        5000,
    );
    let (r, changes) = hub.upsert(1000, &p, phone2);
    r.unwrap();
    assert_eq!(changes[0], PeerChange::Remove { key: [7; 32] });
    assert!(hub.identity(&[7; 32]).is_none());
}

/// An MFA-gated home office is admitted until its window's end, taken out then (told apart
/// from an expiry), refused while its window is closed, and let in again by a new window.
#[test]
fn an_mfa_gated_home_office_is_admitted_for_its_window_only() {
    let p = policy(None);
    let mut hub = HubPeers::default();
    let gated = |until| Identity {
        admitted_until: Some(until),
        ..admission(
            "musterstadt",
            "anna_laptop",
            Role::HomeOffice,
            2,
            "10.250.20.9/32",
            90_000,
        )
    };
    let (r, changes) = hub.upsert(1000, &p, gated(1000));
    assert_eq!(
        r,
        Err(AdmissionError::WindowClosed {
            serial: "02".into(),
            until: 1000
        })
    );
    assert!(changes.is_empty() && hub.is_empty());
    let (r, changes) = hub.upsert(1000, &p, gated(37_000));
    r.unwrap();
    assert!(matches!(changes[..], [PeerChange::Upsert { key, .. }] if key == [2; 32]));
    assert!(hub.expire(36_999).is_empty());
    assert_eq!(
        hub.expire(37_000),
        vec![(PeerChange::Remove { key: [2; 32] }, true)]
    );
    assert!(hub.is_empty());
    // The next sign-in: admitted again, until the certificate's end at the latest.
    hub.upsert(40_000, &p, gated(200_000)).0.unwrap();
    assert_eq!(
        hub.expire(90_000),
        vec![(PeerChange::Remove { key: [2; 32] }, false)]
    );
}
