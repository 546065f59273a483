//! The hub's view of its BGP sessions, read from the hub machine's BIRD (`[bgp] bird_socket`):
//! the request sent on BIRD's control socket and the parsing of its answer. A session that is
//! not Established means the data-centre router does not route to this hub's peers, whatever
//! the hub announces; the hub says so (log, `/metrics`, `komnet status`) and carries on.
//!
//! BIRD's control protocol answers a command with lines that start with a four-digit code,
//! `-` while more lines of the same reply follow and a space on the last; a line that starts
//! with a space continues the code above it; `0000` ends the reply, codes 8xxx and 9xxx are
//! errors. `show protocols` gives one line per protocol (code 1002):
//! `NAME PROTO TABLE STATE SINCE INFO…`, where a BGP session that is up reads `up …
//! Established`.

use komnet_proto::status::{BgpSessionStatus, BgpSessions};

/// What the hub sends on the control socket.
pub const SHOW_PROTOCOLS: &[u8] = b"show protocols\n";

/// One BGP session of the hub machine's BIRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpSession {
    /// The protocol's name in bird.conf (`protocol bgp dc { … }`).
    pub name: String,
    pub established: bool,
    /// BIRD's state and info columns, e.g. `up Established` or `start Active Socket: Connection
    /// refused`.
    pub state: String,
}

/// Whether `received` holds BIRD's whole reply (its `0000` line, or an error line).
pub fn reply_complete(received: &str) -> bool {
    received
        .lines()
        .any(|l| l.starts_with("0000") || (l.len() >= 5 && l.as_bytes()[4] == b' ' && is_error(l)))
}

fn is_error(line: &str) -> bool {
    line.starts_with('8') || line.starts_with('9')
}

/// The BGP sessions in BIRD's reply to [`SHOW_PROTOCOLS`] (greeting included or not).
pub fn parse_show_protocols(reply: &str) -> Result<Vec<BgpSession>, String> {
    let mut sessions = Vec::new();
    let mut code = "";
    for line in reply.lines() {
        let text = match line.as_bytes() {
            [d0, d1, d2, d3, sep, ..]
                if [d0, d1, d2, d3].iter().all(|d| d.is_ascii_digit())
                    && (*sep == b'-' || *sep == b' ') =>
            {
                code = &line[..4];
                &line[5..]
            }
            [b' ', ..] => &line[1..],
            _ => return Err(format!("BIRD answered a line it should not have: {line:?}")),
        };
        if is_error(code) {
            return Err(format!("BIRD refused `show protocols`: {}", text.trim()));
        }
        if code != "1002" {
            continue;
        }
        let mut fields = text.split_whitespace();
        let (Some(name), Some(proto), Some(_table), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(format!(
                "a protocol line BIRD answered is too short: {line:?}"
            ));
        };
        if proto != "BGP" {
            continue;
        }
        // SINCE, then INFO (BIRD's time format has no spaces unless configured so; the info
        // of a session that is up is the single word Established).
        let info: Vec<&str> = fields.skip(1).collect();
        sessions.push(BgpSession {
            name: name.to_owned(),
            established: state == "up" && info.first() == Some(&"Established"),
            state: std::iter::once(state)
                .chain(info.iter().copied())
                .collect::<Vec<_>>()
                .join(" "),
        });
    }
    Ok(sessions)
}

/// What changed with a read of the sessions.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionChanges {
    /// Sessions that are not Established now but were (or that the hub sees for the first
    /// time not Established).
    pub down: Vec<BgpSession>,
    /// Sessions Established now that were not.
    pub up: Vec<String>,
}

/// Folds a read of BIRD's sessions at Unix time `now` into `known` (what `/status` shows): the
/// states, since when each is in its state, or why the read failed (the sessions as last seen
/// are kept then, but not trusted: `error` says so).
pub fn apply_read(
    known: &mut BgpSessions,
    read: Result<Vec<BgpSession>, String>,
    now: i64,
) -> SessionChanges {
    known.checked = now;
    let sessions = match read {
        Ok(s) => s,
        Err(e) => {
            known.error = Some(e);
            return SessionChanges::default();
        }
    };
    known.error = None;
    let mut changes = SessionChanges::default();
    let mut next = Vec::with_capacity(sessions.len());
    for s in sessions {
        let before = known.sessions.iter().find(|k| k.name == s.name);
        let since = match before {
            Some(b) if b.established == s.established => b.since,
            _ => now,
        };
        match (before.map(|b| b.established), s.established) {
            (Some(true) | None, false) => changes.down.push(s.clone()),
            (Some(false), true) => changes.up.push(s.name.clone()),
            _ => {}
        }
        next.push(BgpSessionStatus {
            name: s.name,
            established: s.established,
            state: s.state,
            since,
        });
    }
    known.sessions = next;
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(name: &str, established: bool) -> BgpSession {
        BgpSession {
            name: name.into(),
            established,
            state: if established {
                "up Established"
            } else {
                "start Active"
            }
            .into(),
        }
    }

    #[test]
    fn a_session_going_down_and_up_is_told_once_each_with_its_time() {
        let mut known = BgpSessions::default();
        let first = apply_read(
            &mut known,
            Ok(vec![session("dc", true), session("dc2", false)]),
            100,
        );
        assert_eq!(
            first.down,
            vec![session("dc2", false)],
            "not up at the first look"
        );
        assert!(first.up.is_empty());
        let same = apply_read(
            &mut known,
            Ok(vec![session("dc", true), session("dc2", false)]),
            105,
        );
        assert_eq!(same, SessionChanges::default());
        assert_eq!(known.sessions[1].since, 100);
        let flip = apply_read(
            &mut known,
            Ok(vec![session("dc", false), session("dc2", true)]),
            110,
        );
        assert_eq!(flip.down, vec![session("dc", false)]);
        assert_eq!(flip.up, vec!["dc2".to_owned()]);
        assert_eq!(
            (known.sessions[0].since, known.sessions[1].since),
            (110, 110)
        );
        // BIRD unreachable: said, and the sessions as last seen kept.
        let lost = apply_read(&mut known, Err("connection refused".into()), 115);
        assert_eq!(lost, SessionChanges::default());
        assert_eq!(known.error.as_deref(), Some("connection refused"));
        assert_eq!((known.checked, known.sessions.len()), (115, 2));
        apply_read(
            &mut known,
            Ok(vec![session("dc", false), session("dc2", true)]),
            120,
        );
        assert_eq!(known.error, None);
    }

    /// As BIRD 2.0.12 answers (captured): one session up, one retrying, one disabled.
    const REPLY: &str = "0001 BIRD 2.0.12 ready.\n\
        2002-Name       Proto      Table      State  Since         Info\n\
        1002-device1    Device     ---        up     18:09:06.606  \n\
        \x20dc         BGP        ---        up     18:09:07.001  Established   \n\
        \x20second_router BGP        ---        start  18:09:06.609  Active        Socket: Connection refused\n\
        \x20old        BGP        ---        down   18:09:06.609  \n\
        \x20komnet4    Kernel     master4    up     18:09:06.606  \n\
        0000 \n";

    #[test]
    fn bgp_sessions_are_read_from_show_protocols() {
        assert!(reply_complete(REPLY));
        let sessions = parse_show_protocols(REPLY).unwrap();
        assert_eq!(
            sessions,
            vec![
                BgpSession {
                    name: "dc".into(),
                    established: true,
                    state: "up Established".into(),
                },
                BgpSession {
                    name: "second_router".into(),
                    established: false,
                    state: "start Active Socket: Connection refused".into(),
                },
                BgpSession {
                    name: "old".into(),
                    established: false,
                    state: "down".into(),
                },
            ]
        );
    }

    #[test]
    fn an_unfinished_reply_an_error_and_garbage_are_told_apart() {
        assert!(!reply_complete(
            "0001 BIRD 2.0.12 ready.\n2002-Name Proto\n"
        ));
        let refused = "0001 BIRD 2.0.12 ready.\n8007 Access denied\n";
        assert!(reply_complete(refused));
        let e = parse_show_protocols(refused).unwrap_err();
        assert!(e.contains("Access denied"), "{e}");
        let e = parse_show_protocols("HTTP/1.1 400 Bad Request\n").unwrap_err();
        assert!(e.contains("should not have"), "{e}");
        assert_eq!(
            parse_show_protocols("0001 BIRD ready.\n0000 \n"),
            Ok(vec![])
        );
    }
}
