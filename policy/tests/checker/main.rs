//! The checker: every kind of mistake gets an error at the right file, line and column, all of
//! them at once, and no input makes it panic.

#![allow(clippy::unwrap_used)] // test code: a failed setup should panic loudly

use std::path::Path;

use komnet_policy::{run_tests, Binding, Policy, PolicyErrors};

const OPERATOR: &str = r#"[policy]
name = "test district"
version = 1
kinds = ["staff", "guest", "iot", "homeoffice"]

[tenants.a]
datacenter = ["10.1.1.0/24", "fd00:1:1::/64"]
homeoffice = ["10.250.1.0/24"]
[tenants.a.sites.hq]
prefixes = ["10.10.0.0/16", "fd00:10::/48"]

[tenants.b]
datacenter = ["10.1.2.0/24"]
[tenants.b.sites.hq]
prefixes = ["10.20.0.0/16"]

[services.dms]
addresses = ["10.1.1.10", "fd00:1:1::10"]
ports = ["tcp/443"]
export = ["a"]

[[guardrail]]
name = "guest-isolation"
from_kinds = ["guest"]
to = ["*"]
"#;

const TENANT_A: &str = r#"tenant = "a"

[segments.staff]
kind = "staff"
site = "hq"
prefixes = ["10.10.1.0/24", "fd00:10:0:1::/64"]
vlan = 10

[segments.guests]
kind = "guest"
site = "hq"
prefixes = ["10.10.100.0/24"]
vlan = 100

[services.files]
addresses = ["10.1.1.5"]
ports = ["tcp/445"]

[[rule]]
name = "staff-dms"
from = ["staff"]
to = ["dms", "files"]
"#;

const TENANT_B: &str = r#"tenant = "b"

[segments.staff]
kind = "staff"
site = "hq"
prefixes = ["10.20.1.0/24"]
"#;

fn load(op: &str, a: &str, b: &str) -> Result<Policy, PolicyErrors> {
    Policy::from_texts(op, &[("a.toml", a), ("b.toml", b)])
}

/// The errors as `file:line:col: message`, and the rendered report.
fn errors(op: &str, a: &str, b: &str) -> (Vec<String>, String) {
    match load(op, a, b) {
        Ok(_) => panic!("expected errors, the policy loaded"),
        Err(e) => {
            let list = e
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| match &d.loc {
                    Some(l) => format!("{}: {}", e.sources.position(l), d.message),
                    None => d.message.clone(),
                })
                .collect();
            (list, e.render())
        }
    }
}

fn assert_error(op: &str, a: &str, b: &str, at: &str, needle: &str) {
    let (list, rendered) = errors(op, a, b);
    assert!(
        list.iter().any(|e| e.starts_with(at) && e.contains(needle)),
        "wanted an error at {at} containing {needle:?}; got:\n{rendered}"
    );
}

/// The warnings as `file:line:col: message`.
fn warnings(p: &Policy) -> Vec<String> {
    p.warnings
        .iter()
        .filter(|d| d.is_warning())
        .map(|d| match &d.loc {
            Some(l) => format!("{}: {}", p.sources.position(l), d.message),
            None => d.message.clone(),
        })
        .collect()
}

mod addresses;
mod input;
mod references;
