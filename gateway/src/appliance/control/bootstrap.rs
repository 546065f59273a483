//! Waiting for a usable bootstrap file on first start. The driver reads the file every poll
//! interval and hands the result in; the watch decides whether to wait for an operator, give a
//! file that may still be being written one more poll, enrol with it, move it aside (unusable,
//! or refused by the service), or fail the start (without `wait_for_bootstrap`, when nothing
//! will change by waiting). A refused file that cannot be moved aside is not tried again while
//! it is unchanged. Nothing here touches the file.

use komnet_proto::bootstrap::Bootstrap;

use super::{ControlEvent, Counters};

/// What the driver read at the bootstrap path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRead {
    Missing,
    /// It exists but cannot be read (permissions, an I/O error).
    Unreadable(String),
    /// Its bytes (possibly blank).
    Content(Vec<u8>),
}

/// What to do next.
#[derive(Debug)]
pub enum BootstrapStep {
    /// Show `state`, count as ready (an operator must act), and read again after one poll.
    WaitForOperator { state: String },
    /// Read again after one poll, state unchanged.
    PollAgain,
    /// Enrol with this file (`bytes` as read, for moving it aside if refused).
    Enrol {
        bootstrap: Box<Bootstrap>,
        bytes: Vec<u8>,
    },
    /// Move the file aside if it still holds `bytes`, report with
    /// [`BootstrapWatch::handle_set_aside`], then read again at once.
    SetAside { bytes: Vec<u8> },
    /// Fail the start with this message.
    Fail(String),
}

/// What moving a file aside did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAside {
    /// Renamed to `<file>.refused`.
    Moved,
    /// The file had changed meanwhile: the new one is read next.
    Replaced,
    /// It could not be renamed: it is ignored until its content changes.
    Failed,
}

/// The first-start watch over the bootstrap path.
#[derive(Debug)]
pub struct BootstrapWatch {
    path: String,
    wait: bool,
    is_credential: bool,
    /// What the state says while there is no usable file.
    waiting: String,
    /// A file that failed to parse once: judged again one poll later.
    unparsed: Option<Vec<u8>>,
    /// A refused file that could not be moved aside.
    refused: Option<Vec<u8>>,
    /// The file being set aside.
    setting_aside: Option<Vec<u8>>,
    counters: Counters,
}

impl BootstrapWatch {
    /// `path` as shown in messages; `wait`: `wait_for_bootstrap`; `is_credential`: the path is
    /// a systemd credential (blank when the file it names is missing).
    pub fn new(path: &str, wait: bool, is_credential: bool) -> Self {
        BootstrapWatch {
            path: path.to_owned(),
            wait,
            is_credential,
            waiting: format!("waiting for a bootstrap file at {path}"),
            unparsed: None,
            refused: None,
            setting_aside: None,
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// One read of the file; `parse` turns its bytes into a bootstrap or says why not.
    pub fn handle_read(
        &mut self,
        read: FileRead,
        parse: impl FnOnce(&[u8]) -> Result<Bootstrap, String>,
    ) -> BootstrapStep {
        let wait = self.wait;
        let bytes = match read {
            FileRead::Content(b) if !b.iter().all(u8::is_ascii_whitespace) => b,
            FileRead::Content(_) if !wait && self.is_credential => {
                return BootstrapStep::Fail(
                    "not enrolled yet and no bootstrap file: put the one `komnet token create` \
                     wrote at the path LoadCredential=bootstrap.json:… names in \
                     komnet-gateway.service (/var/lib/komnet/bootstrap.json unless changed) and \
                     restart"
                        .into(),
                )
            }
            FileRead::Content(_) | FileRead::Missing if wait => {
                return BootstrapStep::WaitForOperator {
                    state: self.waiting.clone(),
                }
            }
            FileRead::Unreadable(e) if wait => {
                // Not moved aside: it may be a copy whose owner or mode is about to be fixed.
                return BootstrapStep::WaitForOperator {
                    state: format!(
                        "bootstrap file unreadable: {e}; waiting for a readable bootstrap file at {}",
                        self.path
                    ),
                };
            }
            // Without wait mode, a blank or missing file is reported by the parser below.
            FileRead::Content(b) => b,
            FileRead::Missing | FileRead::Unreadable(_) => Vec::new(),
        };
        if self.refused.as_ref() == Some(&bytes) {
            return BootstrapStep::WaitForOperator {
                state: self.waiting.clone(),
            };
        }
        match parse(&bytes) {
            Ok(bootstrap) => {
                self.unparsed = None;
                BootstrapStep::Enrol {
                    bootstrap: Box::new(bootstrap),
                    bytes,
                }
            }
            Err(e) if !wait => BootstrapStep::Fail(format!(
                "not enrolled yet and no usable bootstrap file at {}: {e}",
                self.path
            )),
            Err(_) if self.unparsed.as_ref() != Some(&bytes) => {
                self.unparsed = Some(bytes);
                BootstrapStep::PollAgain
            }
            Err(e) => {
                self.counters.count(ControlEvent::BootstrapUnreadable);
                tracing::error!(error = %e, "bootstrap file unreadable; moving it aside");
                self.waiting = format!(
                    "bootstrap file unreadable: {e}; waiting for a new bootstrap file at {}",
                    self.path
                );
                self.set_aside(bytes)
            }
        }
    }

    fn set_aside(&mut self, bytes: Vec<u8>) -> BootstrapStep {
        self.setting_aside = Some(bytes.clone());
        BootstrapStep::SetAside { bytes }
    }

    /// The file parsed but cannot be used (`event`: why it is counted); `fail` is the start's
    /// error without wait mode, `state` what the appliance shows while it waits for a new one.
    pub fn handle_unusable(
        &mut self,
        bytes: Vec<u8>,
        event: ControlEvent,
        fail: String,
        state: String,
    ) -> BootstrapStep {
        self.counters.count(event);
        if !self.wait {
            return BootstrapStep::Fail(fail);
        }
        self.waiting = format!("{state}; waiting for a new bootstrap file at {}", self.path);
        self.set_aside(bytes)
    }

    /// What moving the file aside did.
    pub fn handle_set_aside(&mut self, outcome: SetAside) {
        let bytes = self.setting_aside.take();
        match outcome {
            SetAside::Moved => self.refused = None,
            SetAside::Failed => self.refused = bytes,
            SetAside::Replaced => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use komnet_proto::identity::WgPublicKey;

    fn good() -> Vec<u8> {
        serde_json::to_vec(&Bootstrap {
            version: 1,
            token: "kmt1.0011223344556677.c2VjcmV0".into(),
            enroll_urls: vec!["https://enroll.example:8443".into()],
            root_fingerprint: "00".repeat(32),
            root_ca_pem: String::new(),
            wg_proof_public_key: WgPublicKey::from_bytes([9; 32]).unwrap(),
            policy_public_key: None,
        })
        .unwrap()
    }

    fn parse(bytes: &[u8]) -> Result<Bootstrap, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn without_a_file_it_waits_for_the_operator_or_fails_the_start() {
        let mut w = BootstrapWatch::new("/media/komnet/bootstrap.json", true, false);
        for read in [FileRead::Missing, FileRead::Content(b"  \n".to_vec())] {
            let BootstrapStep::WaitForOperator { state } = w.handle_read(read, parse) else {
                panic!()
            };
            assert_eq!(
                state,
                "waiting for a bootstrap file at /media/komnet/bootstrap.json"
            );
        }
        let BootstrapStep::WaitForOperator { state } =
            w.handle_read(FileRead::Unreadable("permission denied".into()), parse)
        else {
            panic!()
        };
        assert!(
            state.starts_with("bootstrap file unreadable: permission denied"),
            "{state}"
        );

        let mut w = BootstrapWatch::new("/x/bootstrap.json", false, false);
        let BootstrapStep::Fail(e) = w.handle_read(FileRead::Missing, parse) else {
            panic!()
        };
        assert!(
            e.starts_with("not enrolled yet and no usable bootstrap file at /x/bootstrap.json"),
            "{e}"
        );
        let mut w = BootstrapWatch::new("/run/credentials/bootstrap.json", false, true);
        let BootstrapStep::Fail(e) = w.handle_read(FileRead::Content(Vec::new()), parse) else {
            panic!()
        };
        assert!(e.contains("LoadCredential=bootstrap.json"), "{e}");
    }

    #[test]
    fn a_half_written_file_gets_one_more_poll_then_is_moved_aside() {
        let mut w = BootstrapWatch::new("/b.json", true, false);
        let half = good()[..20].to_vec();
        assert!(matches!(
            w.handle_read(FileRead::Content(half.clone()), parse),
            BootstrapStep::PollAgain
        ));
        // The copy finished in the meantime: enrol.
        let BootstrapStep::Enrol { bootstrap, .. } =
            w.handle_read(FileRead::Content(good()), parse)
        else {
            panic!()
        };
        assert_eq!(bootstrap.version, 1);
        // Broken for good: the same bytes twice are moved aside and counted.
        assert!(matches!(
            w.handle_read(FileRead::Content(half.clone()), parse),
            BootstrapStep::PollAgain
        ));
        let BootstrapStep::SetAside { bytes } =
            w.handle_read(FileRead::Content(half.clone()), parse)
        else {
            panic!()
        };
        assert_eq!(bytes, half);
        w.handle_set_aside(SetAside::Moved);
        assert_eq!(w.counters().get(ControlEvent::BootstrapUnreadable), 1);
        // From now on the state says why.
        let BootstrapStep::WaitForOperator { state } = w.handle_read(FileRead::Missing, parse)
        else {
            panic!()
        };
        assert!(state.starts_with("bootstrap file unreadable: "), "{state}");
    }

    #[test]
    fn a_refused_file_that_cannot_be_moved_is_not_tried_again_until_it_changes() {
        let mut w = BootstrapWatch::new("/b.json", true, false);
        let BootstrapStep::Enrol { bytes, .. } = w.handle_read(FileRead::Content(good()), parse)
        else {
            panic!()
        };
        let step = w.handle_unusable(
            bytes,
            ControlEvent::EnrollRefused,
            "enrollment refused: token used".into(),
            "enrollment refused: token already used (token_used)".into(),
        );
        assert!(matches!(step, BootstrapStep::SetAside { .. }));
        w.handle_set_aside(SetAside::Failed);
        let BootstrapStep::WaitForOperator { state } =
            w.handle_read(FileRead::Content(good()), parse)
        else {
            panic!("the refused file was tried again")
        };
        assert_eq!(
            state,
            "enrollment refused: token already used (token_used); waiting for a new bootstrap file at /b.json"
        );
        // A new file (another token) is tried.
        let mut other: Bootstrap = parse(&good()).unwrap();
        other.token = "kmt1.8899aabbccddeeff.c2VjcmV0".into();
        let step = w.handle_read(
            FileRead::Content(serde_json::to_vec(&other).unwrap()),
            parse,
        );
        assert!(matches!(step, BootstrapStep::Enrol { .. }));
        assert_eq!(w.counters().get(ControlEvent::EnrollRefused), 1);

        // Without wait mode a refusal fails the start.
        let mut w = BootstrapWatch::new("/b.json", false, false);
        let step = w.handle_unusable(
            good(),
            ControlEvent::EnrollRefused,
            "enrollment refused: x".into(),
            "x".into(),
        );
        assert!(matches!(step, BootstrapStep::Fail(e) if e == "enrollment refused: x"));
    }
}
