//! Any datagram from the network, fed to a core that has a key, a peer and a session-less
//! state: it must never panic, and anything it does not accept must come back as a drop.
#![no_main]

use std::net::SocketAddr;
use std::time::Instant;

use komnet_gateway::core::{Action, Core};
use komnet_gateway::packet::{IpHeader, WireMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = WireMessage::parse(data);
    let _ = IpHeader::parse(data);
    let now = Instant::now();
    let mut core = Core::new(now, [1; 32]);
    core.set_private_key(now, Some([2; 32]));
    if let Some(peer) = core.upsert_peer(now, [3; 32]) {
        core.add_allowed_ip(peer, "10.0.0.0/24".parse().expect("static prefix"));
        core.set_endpoint(peer, "192.0.2.1:51820".parse().expect("static addr"));
    }
    let src: SocketAddr = "192.0.2.1:51820".parse().expect("static addr");
    let mut out = vec![0u8; data.len().max(2048)];
    match core.handle_datagram(now, src, None, data, &mut out) {
        Action::ToTun { offset, len, .. } => assert!(offset + len <= out.len()),
        Action::ToNetwork { offset, len, .. } => assert!(offset + len <= out.len()),
        Action::Nothing | Action::Drop(_) | Action::Unreachable { .. } => {}
    }
    // The same bytes as an outgoing TUN packet.
    let _ = core.handle_tun_packet(now, data, &mut out);
});
