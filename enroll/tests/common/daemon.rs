//! `komnet-enroll serve` as a real child process, for the tests that need the binary itself
//! (signals, systemd notifications, replicas on one database, crash recovery).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_komnet-enroll");

/// A `komnet-enroll serve` child, killed by its PID when dropped.
pub struct Daemon {
    pub child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// `komnet-enroll [global_args] serve --data-dir dir` with `RUST_LOG=rust_log` and its
    /// log in `dir/log_name`; returns once it says it is listening, panics with the log if it
    /// does not.
    pub fn serve(dir: &Path, global_args: &[&str], rust_log: &str, log_name: &str) -> Daemon {
        let log = dir.join(log_name);
        let mut child = Command::new(BIN)
            .args(global_args)
            .args(["serve", "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("listening on"),
            "komnet-enroll serve did not start: {line:?}, log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Daemon { child }
    }

    /// `kill -9`: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
