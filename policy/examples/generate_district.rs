//! Writes a generated district policy into a directory (operator.toml, tenants/*.toml), for the
//! scale benchmark (`benches/policy-scale.sh`) and for trying the tools on a large policy.
//!
//! `cargo run --release -p komnet-policy --example generate_district -- DIR [large|district]`

use std::path::PathBuf;
use std::process::ExitCode;

use komnet_policy::synthetic::{generate, Shape};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: generate_district DIR [large|district]");
        return ExitCode::from(2);
    };
    let shape = match args.next().as_deref() {
        None | Some("large") => Shape::LARGE_DISTRICT,
        Some("district") => Shape::DISTRICT,
        Some(other) => {
            eprintln!("unknown shape {other:?}: large (issue 19's district) or district");
            return ExitCode::from(2);
        }
    };
    let (operator, tenants) = generate(shape);
    let write = || -> std::io::Result<u64> {
        std::fs::create_dir_all(dir.join("tenants"))?;
        std::fs::write(dir.join("operator.toml"), &operator)?;
        let mut bytes = operator.len() as u64;
        for (name, text) in &tenants {
            std::fs::write(dir.join("tenants").join(name), text)?;
            bytes += text.len() as u64;
        }
        Ok(bytes)
    };
    match write() {
        Ok(bytes) => {
            println!(
                "{}: {} communes, {} rules, {bytes} bytes",
                dir.display(),
                shape.communes,
                shape.rules
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}
