//! Issue 15, part 1: a year of operation under a clock that runs fast. The real enrollment
//! service (store, CA, its own TLS certificate) and the appliances' real control-plane cores —
//! the hub's registry view and admissions (`HubCore`), the renewal schedules of a hub and a
//! spoke (`RenewalSchedule`) — go through 52 weeks in steps of an hour: every certificate is
//! renewed in time, the service's TLS certificate never lapses, the hub admits the spoke at
//! every step and each renewal reaches the hub as a registry event. What a day of a real district
//! adds (TLS, sockets, WireGuard) is the namespace tests' part; this one is about time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use komnet_enroll::api::admin::CreateTokenRequest;
use komnet_enroll::config::Config;
use komnet_enroll::identity::{Role, SiteId, TenantId};
use komnet_enroll::server_cert::{Renewal, RotatingServerCert};
use komnet_enroll::service::{self, Clock as _, ManualClock, Service};
use komnet_enroll_client::{csr, proof, WgKeys};
use komnet_gateway::appliance::control::hub::{HubCore, OutageSettings};
use komnet_gateway::appliance::control::renewal::{RenewalSchedule, RenewalStep, Renewed};
use komnet_policy::CompiledPolicy;
use komnet_proto::api::{EnrollRequest, EnrollResponse, RenewRequest};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// One appliance: its WireGuard key, its current certificate and its renewal schedule.
struct Appliance {
    name: &'static str,
    keys: WgKeys,
    current: EnrollResponse,
    schedule: RenewalSchedule,
    renewals: u32,
}

impl Appliance {
    fn leaf_der(&self) -> Vec<u8> {
        CertificateDer::pem_slice_iter(self.current.certificate_chain_pem.as_bytes())
            .next()
            .expect("a leaf certificate")
            .expect("PEM")
            .to_vec()
    }
}

fn key_request(service: &Service, keys: &WgKeys, csr_der: &[u8]) -> (String, String, String) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let proof = proof::prove(keys.secret(), &service.wg_proof_public, csr_der);
    (
        b64.encode(csr_der),
        keys.public().to_base64(),
        b64.encode(proof),
    )
}

fn enrol(service: &Service, name: &'static str, tenant: &str, site: &str, role: Role) -> Appliance {
    let token = service
        .create_token(
            &CreateTokenRequest {
                tenant: TenantId::parse(tenant).expect("tenant"),
                site: SiteId::parse(site).expect("site"),
                role,
                ttl_secs: 3600,
            },
            "year",
        )
        .expect("token");
    let keys = WgKeys::generate();
    let key = csr::new_key_and_csr(None).expect("csr");
    let (csr, wg_public_key, wg_proof) = key_request(service, &keys, &key.csr_der);
    let current = service
        .enroll(
            &EnrollRequest {
                token: token.token.clone(),
                csr,
                wg_public_key,
                wg_proof,
            },
            "year",
        )
        .expect("enroll");
    let schedule = RenewalSchedule::new(current.renew_after, current.identity.not_after);
    Appliance {
        name,
        keys,
        current,
        schedule,
        renewals: 0,
    }
}

#[test]
fn a_year_of_renewals_keeps_the_service_the_hub_and_the_spoke_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::default());
    let config = Config {
        hub_endpoints: [(
            SiteId::parse("hub1").expect("site"),
            "192.0.2.1:51820".into(),
        )]
        .into_iter()
        .collect(),
        ..Config::default()
    };
    service::init(dir.path(), &config, clock.now()).expect("init");
    let service = Service::open_with_config(dir.path(), config.clone(), clock.clone())
        .expect("open the service");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let start = clock.now();
    let server_cert =
        RotatingServerCert::new(&service.ca, &config.server_names, start, provider).expect("cert");

    let mut hub_appliance = enrol(&service, "hub", "kreis", "hub1", Role::Hub);
    let mut spoke = enrol(&service, "spoke", "musterstadt", "rathaus", Role::Spoke);

    let policy_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/landkreis");
    let policy = Arc::new(CompiledPolicy::load(&policy_dir).expect("example policy"));
    // The hub core runs on simulated monotonic time: t0 stands for `start`.
    let t0 = Instant::now();
    let at = |unix: i64| t0 + Duration::from_secs((unix - start) as u64);
    let mut hub = HubCore::new(at(start), OutageSettings::default(), 1);
    hub.handle_policy(start, policy);
    assert!(hub.poll_connect(at(start)));
    let snapshot = service.store.registry_snapshot(start).expect("snapshot");
    let mut version = snapshot.version;
    hub.handle_snapshot(at(start), start, &snapshot);
    let spoke_key = |s: &Appliance| *s.current.identity.wg_public_key.as_bytes();
    assert!(hub.admitted(&spoke_key(&spoke)).is_some());

    let mut server_renewals = 0;
    let mut upserts_heard = 0;
    let end = start + 364 * DAY;
    let mut t = start;
    while t < end {
        t += HOUR;
        clock.set(t);
        // The service's own TLS certificate (30 days), renewed two thirds in.
        if let Renewal::Renewed { .. } = server_cert
            .renew_if_due(&service.ca, t)
            .expect("server certificate renewal")
        {
            server_renewals += 1;
        }
        assert!(
            server_cert.not_after() - t > 9 * DAY,
            "day {}: the service's TLS certificate has less than a third of its life left",
            (t - start) / DAY
        );
        // Each appliance renews when its schedule says so, with the same WireGuard key.
        for appliance in [&mut hub_appliance, &mut spoke] {
            if appliance.schedule.poll(t) != RenewalStep::Renew {
                continue;
            }
            let key = csr::new_key_and_csr(Some(&appliance.current.identity)).expect("csr");
            let (csr, wg_public_key, wg_proof) =
                key_request(&service, &appliance.keys, &key.csr_der);
            let renewed = service
                .renew(
                    &appliance.leaf_der(),
                    &RenewRequest {
                        csr,
                        wg_public_key,
                        wg_proof,
                    },
                )
                .unwrap_or_else(|e| {
                    panic!(
                        "day {}: {} renewal refused: {e:?}",
                        (t - start) / DAY,
                        appliance.name
                    )
                });
            let on_time = appliance.schedule.handle_renewed(
                renewed.renew_after,
                renewed.identity.not_after,
                t,
            );
            assert_eq!(on_time, Renewed::OnSchedule, "day {}", (t - start) / DAY);
            appliance.current = renewed;
            appliance.renewals += 1;
        }
        // The hub follows the registry's events and checks expiry.
        let events = service
            .store
            .registry_events_since(version, 1000)
            .expect("events");
        for ev in &events {
            version = ev.version;
            if matches!(ev.change, komnet_proto::api::RegistryChange::Upsert(_)) {
                upserts_heard += 1;
            }
            hub.handle_registry_event(at(t), t, ev);
        }
        hub.handle_keepalive(at(t));
        if at(t) >= hub.next_timeout() {
            hub.handle_timeout(at(t), t);
        }
        for appliance in [&hub_appliance, &spoke] {
            assert!(
                appliance.current.identity.not_after > t,
                "day {}: {}'s certificate expired",
                (t - start) / DAY,
                appliance.name
            );
        }
        let admitted = hub.admitted(&spoke_key(&spoke));
        assert!(
            admitted.is_some(),
            "day {}: the hub no longer admits the spoke",
            (t - start) / DAY
        );
    }
    // 7-day certificates renewed at two thirds (~4.7 days): about 78 renewals a year each;
    // the 30-day service certificate about 18 times.
    for appliance in [&hub_appliance, &spoke] {
        assert!(
            (75..=80).contains(&appliance.renewals),
            "{}: {} renewals",
            appliance.name,
            appliance.renewals
        );
    }
    assert!((17..=19).contains(&server_renewals), "{server_renewals}");
    assert_eq!(upserts_heard, hub_appliance.renewals + spoke.renewals);
    // The CRL is still signed and the store holds one valid certificate per appliance.
    assert!(!service.crl().expect("crl").is_empty());
    let snapshot = service.store.registry_snapshot(t).expect("snapshot");
    assert_eq!(snapshot.peers.len(), 2, "{:?}", snapshot.peers);
}
