//! The hub's registry handling at county scale (issue 17, part 3): a registry snapshot of
//! 10,000 home-office identities (ten communes, each with a home-office pool) applied to a
//! fresh hub — the admission decisions (`HubCore::handle_snapshot`) and the peer table they
//! go into (`Core`: peer slots and allowed IPs, as the hub driver applies them) — and the
//! re-resolution of all 10,000 when a new policy version goes in force
//! (`HubCore::handle_policy`; the new version moves one commune's pool, so its peers change).
//!
//! Then what the hub's housekeeping reads of all peers every 250 ms, before and after it
//! stopped gathering every peer's allowed IPs for it.
//!
//! `cargo bench -p komnet-gateway --bench registry` (env `COUNTY_PEERS`, default 10000)

#![allow(clippy::unwrap_used)] // bench code: a failed setup should panic loudly

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use komnet_gateway::admission::PeerChange;
use komnet_gateway::appliance::control::hub::{HubCore, OutageSettings};
use komnet_gateway::core::Core;
use komnet_policy::{CompiledPolicy, Role};
use komnet_proto::api::RegistrySnapshot;
use komnet_proto::identity::{Identity, SiteId, TenantId, WgPublicKey};

const TENANTS: usize = 10;

/// The county's policy: ten communes with a /18 home-office pool each (the first one's pool
/// is `first_pool`), and a shared service they all reach.
fn county_policy(dir: &Path, version: u64, first_pool: &str) -> Arc<CompiledPolicy> {
    std::fs::create_dir_all(dir.join("tenants")).unwrap();
    let mut op = format!(
        "[policy]\nname = \"county\"\nversion = {version}\nkinds = [\"staff\", \"homeoffice\"]\n\
         tunnel = [\"10.96.0.0/12\"]\n[tenants.kreis]\ndatacenter = [\"10.0.0.0/20\"]\n"
    );
    let names: Vec<String> = (1..=TENANTS).map(|i| format!("gemeinde-{i:02}")).collect();
    for (i, t) in names.iter().enumerate() {
        let pool = if i == 0 {
            first_pool.to_owned()
        } else {
            format!("10.{}.0.0/18", 200 + i)
        };
        op.push_str(&format!(
            "[tenants.{t}]\ndatacenter = [\"10.1.{i}.0/24\"]\nhomeoffice = [\"{pool}\"]\n"
        ));
        std::fs::write(
            dir.join("tenants").join(format!("{t}.toml")),
            format!(
                "tenant = \"{t}\"\n[segments.homeoffice]\nkind = \"homeoffice\"\n[[rule]]\n\
                 name = \"ho\"\nfrom = [\"homeoffice\"]\nto = [\"sink\"]\n"
            ),
        )
        .unwrap();
    }
    op.push_str(&format!(
        "[services.sink]\nowner = \"kreis\"\naddresses = [\"10.0.1.10\"]\nports = [\"udp/9000\"]\n\
         export = [{}]\n",
        names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    std::fs::write(dir.join("operator.toml"), op).unwrap();
    Arc::new(CompiledPolicy::load(dir).unwrap())
}

/// `n` home-office identities spread over the communes, each with a host address of its
/// commune's pool (commune 0's inside 10.200.0.0/19, so both policy versions hold them).
fn identities(n: usize) -> Vec<Identity> {
    (0..n)
        .map(|i| {
            let t = i % TENANTS;
            let host = i / TENANTS + 1;
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            key[31] = 0x40;
            Identity {
                tenant: TenantId::parse(&format!("gemeinde-{:02}", t + 1)).unwrap(),
                site: SiteId::parse(&format!("user-{i:05}")).unwrap(),
                role: Role::HomeOffice,
                wg_public_key: WgPublicKey::from_bytes(key).unwrap(),
                tunnel_addrs: vec![format!("10.{}.{}.{}/32", 200 + t, host / 256, host % 256)
                    .parse()
                    .unwrap()],
                not_after: i64::MAX / 2,
                serial: format!("{i:08x}"),
                admitted_until: None,
            }
        })
        .collect()
}

/// What the hub driver does with the changes (`appliance/hub.rs`, `apply_peer_changes`),
/// minus the firewall's identity map and the routes.
fn apply(core: &mut Core, now: Instant, changes: &[PeerChange]) {
    for c in changes {
        match c {
            PeerChange::Upsert {
                key, allowed_ips, ..
            } => {
                let id = core.upsert_peer(now, *key).unwrap();
                core.clear_allowed_ips(id);
                for net in allowed_ips {
                    core.add_allowed_ip(id, *net);
                }
            }
            PeerChange::Remove { key } => {
                if let Some(id) = core.peer_id(key) {
                    core.remove_peer(id);
                }
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let n: usize = std::env::var("COUNTY_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let v1 = county_policy(&dir.path().join("v1"), 1, "10.200.0.0/18");
    // Version 2 narrows commune 1's pool to the /19 its peers use: every one of its peers is
    // re-resolved and gets the same addresses, the other communes' are untouched.
    let v2 = county_policy(&dir.path().join("v2"), 2, "10.200.0.0/19");
    let snapshot = RegistrySnapshot {
        version: 1,
        peers: identities(n),
    };
    let unix = 1_000_000;
    let mut g = c.benchmark_group("registry");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function(format!("snapshot of {n} applied to a fresh hub"), |b| {
        b.iter_batched(
            || {
                let now = Instant::now();
                let mut hub = HubCore::new(now, OutageSettings::default(), 1);
                hub.handle_policy(unix, v1.clone());
                (hub, Core::new(now, [9; 32]))
            },
            |(mut hub, mut core)| {
                let now = Instant::now();
                let changes = hub.handle_snapshot(now, unix, &snapshot);
                assert_eq!(changes.len(), n);
                apply(&mut core, now, &changes);
                black_box((hub, core))
            },
            criterion::BatchSize::PerIteration,
        )
    });
    let now = Instant::now();
    let mut hub = HubCore::new(now, OutageSettings::default(), 1);
    hub.handle_policy(unix, v1.clone());
    let mut core = Core::new(now, [9; 32]);
    apply(&mut core, now, &hub.handle_snapshot(now, unix, &snapshot));
    assert_eq!(hub.admitted_count(), n);
    let mut flip = false;
    g.bench_function(format!("policy re-resolution of {n} peers"), |b| {
        b.iter(|| {
            flip = !flip;
            let policy = if flip { v2.clone() } else { v1.clone() };
            let changes = hub.handle_policy(unix, policy);
            apply(&mut core, Instant::now(), &changes);
            black_box(changes.len())
        })
    });
    // The hub's housekeeping reads every peer four times a second (routes that follow
    // handshakes, BGP announcements): what it read before (`peers`: every field, the allowed
    // IPs gathered from the table, ordered by key) and what it reads now (`activity_into`).
    let wall = std::time::SystemTime::now();
    g.bench_function(format!("housekeeping read of {n} peers: peers()"), |b| {
        b.iter(|| black_box(core.peers(Instant::now(), wall).len()))
    });
    let mut activity = Vec::new();
    g.bench_function(
        format!("housekeeping read of {n} peers: activity_into()"),
        |b| {
            b.iter(|| {
                core.activity_into(Instant::now(), &mut activity);
                black_box(activity.len())
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
