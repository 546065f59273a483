//! Running external commands with timeouts, background processes, temporary directories.

use crate::COMMAND_TIMEOUT;
use anyhow::{anyhow, bail, Context, Result};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What a finished command left behind.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn succeeded(&self) -> bool {
        self.code == Some(0)
    }

    /// The standard output, or an error quoting the command and everything it printed.
    pub fn into_stdout(self) -> Result<String> {
        if self.succeeded() {
            Ok(self.stdout)
        } else {
            Err(anyhow!("{self}"))
        }
    }
}

impl fmt::Display for CommandOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.code {
            Some(code) => format!("exit code {code}"),
            None => "killed by a signal".to_owned(),
        };
        write!(f, "`{}` finished with {status}", self.command)?;
        for (label, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let text = text.trim_end();
            if !text.is_empty() {
                write!(f, "\n--- {label} ---\n{}", tail(text, 60))?;
            }
        }
        Ok(())
    }
}

/// The last `max_lines` lines of `text`.
pub(crate) fn tail(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines ...]\n"));
    }
    out.push_str(&lines[start..].join("\n"));
    out
}

/// A command line as a shell user would type it (quoting is approximate; it is for messages).
pub fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            words.push(format!("'{}'", arg.replace('\n', "\\n")));
        } else {
            words.push(arg.into_owned());
        }
    }
    let line = words.join(" ");
    // Embedded scripts make for very long lines; the start identifies the command.
    if line.len() > 300 {
        let mut cut = 300;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &line[..cut])
    } else {
        line
    }
}

/// Runs `cmd` to completion, capturing its output; fails only if it cannot be started or does
/// not finish within `timeout` (then it is killed). A non-zero exit is reported, not an error.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<CommandOutput> {
    run_with_input(cmd, None, timeout)
}

/// Like [`run`] but errors on a non-zero exit; returns the standard output.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    run(cmd, timeout)?.into_stdout()
}

/// Runs `cmd` with `input` on its standard input (when given); see [`run`].
pub fn run_with_input(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<CommandOutput> {
    let command = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{command}`"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // Small inputs (keys) fit in the pipe buffer; dropping stdin closes it.
        stdin
            .write_all(input)
            .with_context(|| format!("cannot write to the standard input of `{command}`"))?;
    }
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err).with_context(|| format!("cannot wait for `{command}`"));
            }
        }
    };
    let output = CommandOutput {
        command,
        code: status.and_then(|status| status.code()),
        stdout: collect_output(&stdout),
        stderr: collect_output(&stderr),
    };
    match status {
        Some(_) => Ok(output),
        None => Err(anyhow!(
            "timed out after {timeout:?} and was killed: {output}"
        )),
    }
}

fn read_in_background<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buffer = Vec::new();
            let _ = pipe.read_to_end(&mut buffer);
            let _ = sender.send(buffer);
        });
    }
    receiver
}

fn collect_output(receiver: &mpsc::Receiver<Vec<u8>>) -> String {
    // A daemon the command started in the background (wg-quick does that) may hold the pipe
    // open for its whole life; do not wait for it beyond a grace period.
    match receiver.recv_timeout(Duration::from_secs(2)) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => "[output still held open by a background process]".to_owned(),
    }
}

/// `program args...` in the host namespace, with [`COMMAND_TIMEOUT`]; stdout on success.
pub fn host(program: &str, args: &[&str]) -> Result<String> {
    run_ok(Command::new(program).args(args), COMMAND_TIMEOUT)
}

/// Polls `probe` every 100 ms until it yields a value; fails after `timeout`, quoting the last
/// error the probe returned (if any) and `what` it was waiting for.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(err) => Some(err),
        };
        if Instant::now() >= deadline {
            return Err(match last_error {
                Some(err) => err.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `signal` (e.g. "TERM") to `pid` with the `kill` binary: no unsafe code needed.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A child process that is killed (SIGKILL) and reaped if still running when dropped.
#[derive(Debug)]
pub struct BackgroundProcess {
    pub(crate) child: Child,
    pub(crate) command: String,
    log: PathBuf,
}

impl BackgroundProcess {
    /// Starts `cmd` with stdout and stderr going to the file `log`.
    pub fn spawn(cmd: &mut Command, log: &Path) -> Result<BackgroundProcess> {
        let command = describe(cmd);
        let log_file =
            File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let log_file_for_stderr = log_file
            .try_clone()
            .with_context(|| format!("cannot duplicate the handle of {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_file_for_stderr)
            .spawn()
            .with_context(|| format!("cannot start `{command}`"))?;
        Ok(BackgroundProcess {
            child,
            command,
            log: log.to_owned(),
        })
    }

    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for `{}`", self.command))?
            {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "`{}` did not finish within {timeout:?} and was killed; its output:\n{}",
                    self.command,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its exit status once it has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_text(&self) -> String {
        match fs::read_to_string(&self.log) {
            Ok(text) => tail(&text, 40),
            Err(err) => format!("[cannot read {}: {err}]", self.log.display()),
        }
    }
}

impl Drop for BackgroundProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fresh directory under the system temp dir (`komnet-netns-LABEL-…`), removed with its
/// contents on drop.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(label: &str) -> Result<TempDir> {
        let prefix = format!("komnet-netns-{label}-");
        tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .map(TempDir)
            .with_context(|| format!("cannot create a temporary directory {prefix}…"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Creates `path` with mode 0600 (private keys, wg-quick configs) and writes `contents`.
pub fn write_private_file(path: &Path, contents: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
