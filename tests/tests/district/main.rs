//! The district end to end (`komnet_netns_tests::district`): the demo's scenario asserted
//! cell by cell, revocation time, spoofing, restarts, live policy updates, refused bundles,
//! fail-closed after `kill -9`, and failover between two hubs. Needs root; never skipped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use komnet_netns_tests::district::{
    destination, render_matrix, Destination, District, Options, Source, DESTINATIONS, DMS,
};
use komnet_netns_tests::{require_root_and_tools, run, wait_until, COMMAND_TIMEOUT};
use komnet_policy::Origin;

fn netprobe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netprobe"))
}

fn counter(status: &serde_json::Value, group: &str, key: &str) -> u64 {
    status[group][key].as_u64().unwrap_or(0)
}

/// The WireGuard key an appliance's enrollment file (`DATA_DIR/<file>`) was issued for.
fn enrolled_key(data_dir: &Path, file: &str) -> String {
    let text = std::fs::read_to_string(data_dir.join(file)).expect("enrollment file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("enrollment JSON");
    v["identity"]["wg_public_key"]
        .as_str()
        .expect("key")
        .to_owned()
}

/// The keys a hub's status lists for tenant/site.
fn hub_keys(status: &serde_json::Value, tenant: &str, site: &str) -> Vec<String> {
    status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter(|p| p["tenant"] == tenant && p["site"] == site)
        .filter_map(|p| p["public_key"].as_str().map(str::to_owned))
        .collect()
}

/// The district's policy copied as version `version` (only operator.toml's version changed).
fn policy_version(district: &District, version: u64) -> PathBuf {
    let dir = district.dir.path().join(format!("policy-v{version}"));
    komnet_netns_tests::district::copy_policy(&dir, version).expect("copying the policy");
    dir
}

/// Rewrites a policy file as `change` says.
fn edit(path: &Path, change: impl FnOnce(String) -> String) {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    std::fs::write(path, change(text))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A policy version that also lets Tholey's staff use Nohfelden's file server.
fn policy_v2(district: &District, version: u64) -> PathBuf {
    let dir = policy_version(district, version);
    edit(&dir.join("tenants/nohfelden.toml"), |text| {
        text.replace(
            "ports = [\"tcp/445\"]",
            "ports = [\"tcp/445\"]\nexport = [\"tholey\"]",
        )
    });
    edit(&dir.join("tenants/tholey.toml"), |text| {
        text + "\n[[rule]]\nname = \"shared-building-office\"\nfrom = [\"verwaltung\"]\nto = [\"nohfelden/dateiserver\"]\n"
    });
    dir
}

fn wait_version(district: &mut District, version: u64) {
    for hub in &mut district.hubs {
        hub.wait_running(version, Duration::from_secs(20))
            .expect("hub policy version");
    }
    for c in &mut district.communes {
        c.spoke
            .wait_running(version, Duration::from_secs(20))
            .expect("spoke policy version");
    }
}

/// Pings started now in `ns` towards `dst`, every 2 ms for `seconds` (ended by SIGINT, so
/// ping prints its summary; a deadline would end it at the first ICMP error).
fn start_ping(ns: &str, dst: &str, seconds: u32) -> std::process::Child {
    std::process::Command::new("timeout")
        .args(["-s", "INT", &seconds.to_string()])
        .args(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-i", "0.002"])
        .args(["-W", "1", "-c", "1000000", dst])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ping")
}

fn replies(child: std::process::Child) -> (u32, u32, String) {
    let out = child.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = komnet_netns_tests::parse_ping_summary(&text).expect("ping summary");
    (summary.received, summary.transmitted, text)
}

/// The district's policy as version `version`, Nohfelden's fragment with `extra` appended.
fn policy_with(district: &District, version: u64, extra: &str) -> PathBuf {
    let dir = policy_version(district, version);
    edit(&dir.join("tenants/nohfelden.toml"), |text| text + extra);
    dir
}

mod certificates;
mod lan;
mod mfa;
mod restarts;
mod revocation;
