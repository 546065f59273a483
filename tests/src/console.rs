//! The web console on a district: komnet-console against the district's enrollment service
//! (its admin socket) and a local OpenID provider (console/tests/e2e/provider.mjs, npm
//! oidc-provider), both on loopback in the host namespace. `komnet-demo --console` keeps them
//! for a person to click through; the MFA test drives them with Chromium
//! (console/tests/e2e/mfa.mjs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::command::{wait_until, write_private_file, BackgroundProcess};
use crate::district::District;

/// The browser test's npm packages (provider.mjs, playwright-core), installed by
/// `scripts/setup.sh console` (or `test`).
pub fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../console/tests/e2e")
}

/// A port from `var` or `default`, refused with a hint when something listens there already.
pub fn free_local_port(var: &str, default: u16) -> Result<u16> {
    let port = match std::env::var(var) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{var}={v:?} is not a port number"))?,
        Err(_) => default,
    };
    std::net::TcpListener::bind(("127.0.0.1", port)).map_err(|e| {
        anyhow::anyhow!("127.0.0.1:{port} is taken ({e}): set {var} to a free port")
    })?;
    Ok(port)
}

/// The console and its provider, ended on drop.
#[derive(Debug)]
pub struct Console {
    pub url: String,
    console: BackgroundProcess,
    _provider: BackgroundProcess,
}

impl Console {
    /// Starts the provider on `idp_port` and the console on `console_port`; returns once both
    /// listen.
    pub fn start(district: &District, console_port: u16, idp_port: u16) -> Result<Console> {
        let e2e = e2e_dir();
        if !e2e.join("node_modules/oidc-provider").is_dir() {
            bail!(
                "the console's OpenID provider needs its npm packages: run `sudo scripts/setup.sh \
                 console` (npm ci in {})",
                e2e.display()
            );
        }
        let url = format!("http://localhost:{console_port}");
        let secret = district.path("console-client-secret");
        // The provider's test client and its secret (provider.mjs): loopback only.
        if !secret.exists() {
            write_private_file(&secret, "console-test-secret\n")?;
        }
        let config = district.path("console.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{console_port}\"\npublic_url = \"{url}\"\n\
                 admin_socket = \"{}\"\n[oidc]\nissuer = \"http://localhost:{idp_port}\"\n\
                 client_id = \"komnet-console\"\nclient_secret_file = \"{}\"\n\
                 scopes = [\"profile\", \"komnet\"]\n",
                district.enroll_socket().display(),
                secret.display()
            ),
        )?;
        let mut provider = BackgroundProcess::spawn(
            Command::new("node")
                .arg(e2e.join("provider.mjs"))
                .env("IDP_PORT", idp_port.to_string())
                .env("CONSOLE_URL", &url),
            &district.path("oidc-provider.log"),
        )?;
        let mut console = BackgroundProcess::spawn(
            Command::new(crate::komnet_console_binary()?)
                .arg("--config")
                .arg(&config),
            &district.path("komnet-console.log"),
        )?;
        for (name, port, process) in [
            ("the OpenID provider", idp_port, &mut provider),
            ("komnet-console", console_port, &mut console),
        ] {
            wait_until(
                &format!("{name} to listen on 127.0.0.1:{port}"),
                Duration::from_secs(20),
                || {
                    if let Some(status) = process.exited() {
                        bail!("{name} ended ({status}):\n{}", process.log_text());
                    }
                    Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                        .is_ok()
                        .then_some(()))
                },
            )?;
        }
        Ok(Console {
            url,
            console,
            _provider: provider,
        })
    }

    /// The console's exit status, once it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.console.exited()
    }

    pub fn log_text(&self) -> String {
        self.console.log_text()
    }
}
