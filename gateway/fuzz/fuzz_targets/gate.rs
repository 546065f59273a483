//! The hub's gate as the appliance drives it: packets from peers and from the data centre,
//! policy versions put in force (identities resolved again, as on a registry or policy
//! change), peers removed, time passing. Nothing the policy in force denies ever passes, a
//! tightened policy cuts the flows it no longer allows, and a removed peer passes nothing.
#![no_main]

mod common;

use std::time::{Duration, Instant};

use common::{district, policies, Decoder, Model, Owners, Side, Step};
use komnet_gateway::firewall::FirewallConfig;
use komnet_gateway::gate::Gate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut version = 0;
    let mut gate = Gate::new(FirewallConfig {
        max_flows: 64,
        ..FirewallConfig::default()
    });
    let admit = |gate: &mut Gate, version: usize| {
        for p in district() {
            match p.identity(&policies()[version]) {
                Some(id) => gate.set_identity(p.id, id),
                None => gate.forget(p.id),
            }
        }
    };
    gate.set_policy(policies()[version].clone());
    admit(&mut gate, version);
    let mut model = Model::default();
    let mut now = Instant::now();
    let mut steps = Decoder::new(data);
    while let Some(step) = steps.step(true) {
        match step {
            Step::Packet(side, packet) => {
                let passed = match side {
                    Side::DataCentre => gate.to_peer(now, &Owners, &packet),
                    Side::Peer(id) => gate.from_peer(now, id, &Owners, &packet),
                };
                if passed {
                    model.passed(&policies()[version], side, &packet);
                }
            }
            Step::Wait(secs) => now += Duration::from_secs(secs * 30),
            Step::Expire => gate.expire(now),
            Step::SwitchPolicy => {
                version = 1 - version;
                gate.set_policy(policies()[version].clone());
                admit(&mut gate, version);
                model.policy_changed(&policies()[version]);
                model.readmit_all();
            }
            Step::Forget(id) => {
                gate.forget(id);
                model.forget(id);
            }
        }
    }
});
