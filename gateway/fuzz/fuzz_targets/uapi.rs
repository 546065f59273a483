//! Any UAPI request text: parsing never panics, and a request that parses applies cleanly and
//! its `get` output parses back as a valid request body.
#![no_main]

use std::time::{Instant, SystemTime};

use komnet_gateway::core::Core;
use komnet_gateway::uapi;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    if let Some(first) = lines.next() {
        let _ = uapi::parse_operation(first);
    }
    let Ok(set) = uapi::parse_set(lines) else {
        return;
    };
    let now = Instant::now();
    let mut core = Core::new(now, [1; 32]);
    uapi::apply_set(&mut core, now, &set);
    let got = uapi::format_get(&mut core, now, SystemTime::now());
    let body: Vec<&str> = got
        .lines()
        .take_while(|l| !l.starts_with("errno="))
        .collect();
    let reparsed = uapi::parse_set(body.iter().copied().filter(|l| {
        !l.starts_with("last_handshake_time")
            && !l.starts_with("tx_bytes")
            && !l.starts_with("rx_bytes")
    }));
    assert!(reparsed.is_ok(), "get output does not parse back: {got:?}");
});
