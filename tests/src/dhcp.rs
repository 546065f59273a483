//! DHCP on a spoke's LAN as the appliance runs it: dnsmasq started the way
//! `packaging/systemd/komnet-dhcp.service` starts it (its `ExecStart=` line, read from the unit,
//! with this test's paths; as an unprivileged user holding only the unit's
//! `AmbientCapabilities=`), and restarted whenever the gateway rewrites the configuration, as
//! `komnet-dhcp.path` does. A client is busybox's `udhcpc`, whose event script records what the
//! server handed out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::command::{run, BackgroundProcess};
use crate::netns::Netns;
use crate::COMMAND_TIMEOUT;

/// The unit the appliance runs dnsmasq with.
fn unit_text() -> Result<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/komnet-dhcp.service");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The value of `key=` in the unit (the first line that sets it).
fn unit_setting(text: &str, key: &str) -> Result<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("komnet-dhcp.service has no {key}="))
}

/// The DHCP server of one spoke, supervised like systemd does it.
#[derive(Debug)]
pub struct DhcpServer {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<Supervised>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Where dnsmasq keeps its leases (the unit's StateDirectory).
    pub leases: PathBuf,
    log_dir: PathBuf,
}

#[derive(Debug, Default)]
struct Supervised {
    process: Option<BackgroundProcess>,
    starts: u32,
    error: Option<String>,
}

impl DhcpServer {
    /// Watches `config` (the gateway's `dhcp_config`) and runs dnsmasq in `ns` with it while it
    /// exists, restarting it on every change; leases and logs go to `dir`.
    pub fn start(ns: &Netns, config: &Path, dir: &Path) -> Result<DhcpServer> {
        let unit = unit_text()?;
        let exec = unit_setting(&unit, "ExecStart")?;
        let caps = unit_setting(&unit, "AmbientCapabilities")?;
        let state_dir = dir.join("komnet-dhcp");
        std::fs::create_dir_all(&state_dir)?;
        // The unit's user owns its StateDirectory; here that user is nobody.
        let (uid, gid) = nobody()?;
        std::os::unix::fs::chown(&state_dir, Some(uid), Some(gid))?;
        let args: Vec<String> = exec
            .split_whitespace()
            .map(|w| {
                w.replace("/run/komnet/dnsmasq.conf", &config.to_string_lossy())
                    .replace("/var/lib/komnet-dhcp", &state_dir.to_string_lossy())
            })
            .collect();
        let caps: Vec<String> = caps
            .split_whitespace()
            .map(|c| c.strip_prefix("CAP_").unwrap_or(c).to_ascii_lowercase())
            .collect();
        let plus: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
        let plus = plus.join(",");
        let mut setpriv = vec![
            "setpriv".to_owned(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_owned(),
            "--no-new-privs".to_owned(),
            format!("--inh-caps=-all,{plus}"),
            format!("--ambient-caps=-all,{plus}"),
            format!("--bounding-set=-all,{plus}"),
        ];
        setpriv.extend(args);
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(Supervised::default()));
        let thread = {
            let (stop, state) = (stop.clone(), state.clone());
            let (ns_name, config, log_dir) =
                (ns.name().to_owned(), config.to_owned(), dir.to_owned());
            std::thread::spawn(move || {
                let mut seen: Option<String> = None;
                while !stop.load(Ordering::Relaxed) {
                    let now = std::fs::read_to_string(&config).ok();
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    let crashed = s
                        .process
                        .as_mut()
                        .is_some_and(|p| matches!(p.child.try_wait(), Ok(Some(_))));
                    if now != seen || (crashed && now.is_some()) {
                        // Restart=on-failure after a crash, a restart on every change.
                        s.process = None;
                        if now.is_some() {
                            s.starts += 1;
                            let log = log_dir.join(format!("dnsmasq-{}.log", s.starts));
                            let mut cmd = Command::new("ip");
                            cmd.args(["netns", "exec", &ns_name]).args(&setpriv);
                            match BackgroundProcess::spawn(&mut cmd, &log) {
                                Ok(p) => s.process = Some(p),
                                Err(e) => s.error = Some(format!("{e:#}")),
                            }
                        }
                        seen = now;
                    }
                    drop(s);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Ok(DhcpServer {
            stop,
            state,
            thread: Some(thread),
            leases: state_dir.join("leases"),
            log_dir: dir.to_owned(),
        })
    }

    /// How often dnsmasq was started so far.
    pub fn starts(&self) -> u32 {
        self.lock().starts
    }

    /// dnsmasq's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut s = self.lock();
        let p = s.process.as_mut()?;
        matches!(p.child.try_wait(), Ok(None)).then(|| p.child.id())
    }

    /// The log of the dnsmasq started last.
    pub fn log(&self) -> String {
        let s = self.lock();
        let mut text = s.error.clone().unwrap_or_default();
        text.push_str(
            &std::fs::read_to_string(self.log_dir.join(format!("dnsmasq-{}.log", s.starts)))
                .unwrap_or_default(),
        );
        text
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Supervised> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.lock().process = None;
    }
}

fn nobody() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = run(Command::new("id").args([flag, "nobody"]), COMMAND_TIMEOUT)?.into_stdout()?;
        out.trim().parse().context("id nobody")
    };
    Ok((id("-u")?, id("-g")?))
}

/// What a DHCP server handed a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: String,
    pub prefix_len: u8,
    pub router: String,
    /// Space-separated, as udhcpc gives them; empty when the server sent none.
    pub dns: String,
    pub lease_secs: u64,
    pub hostname: String,
}

/// Asks for a lease on `dev` in `ns` with busybox's udhcpc (a few tries, then gives up) and
/// configures it: the address, and a default route via the router it was given.
pub fn obtain_lease(ns: &Netns, dev: &str, dir: &Path) -> Result<Lease> {
    let script = dir.join("udhcpc-event.sh");
    let record = dir.join(format!("lease-{}-{dev}.txt", ns.name()));
    let _ = std::fs::remove_file(&record);
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         # udhcpc's event script (komnet tests): apply the lease, record what the server said.\n\
         case \"$1\" in\n\
         bound|renew)\n\
         \tip addr flush dev \"$interface\" scope global\n\
         \tip addr add \"$ip/$mask\" dev \"$interface\"\n\
         \t[ -n \"$router\" ] && ip route replace default via \"${router%% *}\" dev \"$interface\"\n\
         \tprintf 'ip=%s\\nmask=%s\\nrouter=%s\\ndns=%s\\nlease=%s\\nhostname=%s\\n' \"$ip\" \"$mask\" \"$router\" \"$dns\" \"$lease\" \"$hostname\" >\"$KOMNET_LEASE_RECORD\"\n\
         \t;;\n\
         esac\n",
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let out = run(
        ns.command("udhcpc")
            .args([
                "-i", dev, "-n", "-q", "-f", "-t", "8", "-T", "1", "-A", "1", "-s",
            ])
            .arg(&script)
            .env("KOMNET_LEASE_RECORD", &record),
        COMMAND_TIMEOUT,
    )?;
    if !out.succeeded() {
        bail!("no lease on {dev} in {}: {out}", ns.name());
    }
    let text = std::fs::read_to_string(&record)
        .with_context(|| format!("udhcpc got a lease but its script recorded none: {out}"))?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    Ok(Lease {
        address: get("ip"),
        prefix_len: get("mask").parse().context("the lease's mask")?,
        router: get("router"),
        dns: get("dns"),
        lease_secs: get("lease").parse().context("the lease time")?,
        hostname: get("hostname"),
    })
}
