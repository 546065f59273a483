//! Sequences of packets from the hub's peers and from its data-centre side, with time passing
//! and sweeps, fed to the firewall with the worked example policy: whatever the sequence,
//! nothing the policy denies ever passes (see `common` for the invariant and its model).
#![no_main]

mod common;

use std::time::{Duration, Instant};

use common::{district, policies, Decoder, Model, Owners, Side, Step};
use komnet_gateway::firewall::{Firewall, FirewallConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = &policies()[0];
    // A small table, so that the fair-share eviction runs too.
    let mut fw = Firewall::new(FirewallConfig {
        max_flows: 16,
        ..FirewallConfig::default()
    });
    let mut model = Model::default();
    let mut now = Instant::now();
    let mut steps = Decoder::new(data);
    while let Some(step) = steps.step(false) {
        match step {
            Step::Packet(side, packet) => {
                let passed = match side {
                    Side::DataCentre => fw.to_peer(now, policy, &Owners, &packet).is_ok(),
                    Side::Peer(id) => {
                        let identity = district()
                            .iter()
                            .find(|p| p.id == id)
                            .and_then(|p| p.identity(policy));
                        fw.from_peer(now, policy, id, identity, &Owners, &packet)
                            .is_ok()
                    }
                };
                if passed {
                    model.passed(policy, side, &packet);
                }
            }
            Step::Wait(secs) => now += Duration::from_secs(secs * 30),
            Step::Expire => fw.expire(now),
            Step::SwitchPolicy | Step::Forget(_) => {}
        }
        assert!(fw.flow_count() <= 16, "the table outgrew its bound");
    }
});
