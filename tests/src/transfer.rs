//! TCP transfers of random files through the tunnel, checksummed at both ends.

use crate::command::{run_ok, wait_until, BackgroundProcess};
use crate::daemon::netprobe_binary;
use crate::netns::Netns;
use crate::next_id;
use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, File};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// TCP port the transfer receiver listens on (inside the receiving namespace).
const TRANSFER_PORT: u16 = 5001;

/// The outcome of a TCP transfer through the tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferReport {
    pub bytes: u64,
    pub received_bytes: u64,
    pub seconds: f64,
    /// `sha256sum` of the file at the sending end, computed inside the sending namespace.
    pub sent_sha256: String,
    /// `sha256sum` of the file at the receiving end, computed inside the receiving namespace.
    pub received_sha256: String,
}

impl TransferReport {
    pub fn checksums_match(&self) -> bool {
        self.sent_sha256 == self.received_sha256 && self.bytes == self.received_bytes
    }

    pub fn gbit_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 * 8.0 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

/// A transfer under way; [`RunningTransfer::finish`] waits for it and compares checksums.
/// Dropping it kills both ends and removes the files.
#[derive(Debug)]
pub struct RunningTransfer {
    sender: BackgroundProcess,
    receiver: BackgroundProcess,
    started: Instant,
    bytes: u64,
    source: PathBuf,
    destination: PathBuf,
    sending_netns: String,
    receiving_netns: String,
}

impl RunningTransfer {
    /// Whether the sender is still sending (a test that changes the network "during a
    /// transfer" checks this, or it may have tested nothing).
    pub fn is_running(&mut self) -> bool {
        matches!(self.sender.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for both ends, then checksums the file at each end.
    pub fn finish(mut self, timeout: Duration) -> Result<TransferReport> {
        let sender_status = self.sender.wait_timeout(timeout)?;
        let seconds = self.started.elapsed().as_secs_f64();
        if !sender_status.success() {
            bail!(
                "the transfer sender `{}` failed with {sender_status}:\n{}",
                self.sender.command,
                self.sender.log_text()
            );
        }
        let receiver_status = self.receiver.wait_timeout(Duration::from_secs(10))?;
        if !receiver_status.success() {
            bail!(
                "the transfer receiver `{}` failed with {receiver_status}:\n{}",
                self.receiver.command,
                self.receiver.log_text()
            );
        }
        let received_bytes = fs::metadata(&self.destination)
            .with_context(|| format!("cannot stat {}", self.destination.display()))?
            .len();
        let sent_sha256 = sha256_in(&self.sending_netns, &self.source)?;
        let received_sha256 = sha256_in(&self.receiving_netns, &self.destination)?;
        Ok(TransferReport {
            bytes: self.bytes,
            received_bytes,
            seconds,
            sent_sha256,
            received_sha256,
        })
    }
}

impl Drop for RunningTransfer {
    fn drop(&mut self) {
        // The processes are killed by their own guards (fields drop after this).
        let _ = fs::remove_file(&self.source);
        let _ = fs::remove_file(&self.destination);
    }
}

/// `sha256sum PATH` run inside namespace `netns_name`; the hex digest.
fn sha256_in(netns_name: &str, path: &Path) -> Result<String> {
    let output = run_ok(
        Command::new("ip")
            .args(["netns", "exec", netns_name, "sha256sum"])
            .arg(path),
        Duration::from_secs(60),
    )?;
    output
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("sha256sum printed nothing for {}", path.display()))
}

/// Writes `bytes` random bytes (from /dev/urandom) to `path`.
pub fn write_random_file(path: &Path, bytes: u64) -> Result<()> {
    let mut random = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let copied = std::io::copy(&mut (&mut random).take(bytes), &mut file)
        .with_context(|| format!("cannot fill {}", path.display()))?;
    if copied != bytes {
        bail!("/dev/urandom gave {copied} bytes, not {bytes}");
    }
    Ok(())
}

/// Starts a TCP transfer of a fresh random file of `bytes` bytes from namespace `from` to
/// `destination` (an address of namespace `to`), paced to `rate` bytes/s if given.
/// Files live in `work_dir`.
pub fn start_transfer(
    from: &Netns,
    to: &Netns,
    destination: IpAddr,
    bytes: u64,
    rate: Option<u64>,
    work_dir: &Path,
) -> Result<RunningTransfer> {
    let id = next_id();
    let source = work_dir.join(format!("transfer-{id}.sent"));
    let received = work_dir.join(format!("transfer-{id}.received"));
    let ready = work_dir.join(format!("transfer-{id}.ready"));
    write_random_file(&source, bytes)?;

    let netprobe = netprobe_binary()?;
    let target = SocketAddr::new(destination, TRANSFER_PORT).to_string();
    let mut receiver_cmd = to.command(&netprobe);
    receiver_cmd
        .args(["receive", &target])
        .arg(&received)
        .arg(&ready);
    let mut receiver = BackgroundProcess::spawn(
        &mut receiver_cmd,
        &work_dir.join(format!("transfer-{id}.receiver.log")),
    )?;
    wait_until(
        "the transfer receiver to listen",
        Duration::from_secs(10),
        || {
            if let Some(status) = receiver.child.try_wait()? {
                bail!(
                    "the transfer receiver exited with {status}:\n{}",
                    receiver.log_text()
                );
            }
            Ok(ready.exists().then_some(()))
        },
    )?;

    let mut sender_cmd = from.command(&netprobe);
    sender_cmd
        .args(["send", &target])
        .arg(&source)
        .arg(rate.unwrap_or(0).to_string());
    let started = Instant::now();
    let sender = BackgroundProcess::spawn(
        &mut sender_cmd,
        &work_dir.join(format!("transfer-{id}.sender.log")),
    )?;
    Ok(RunningTransfer {
        sender,
        receiver,
        started,
        bytes,
        source,
        destination: received,
        sending_netns: from.name().to_owned(),
        receiving_netns: to.name().to_owned(),
    })
}
