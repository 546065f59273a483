//! The registry stream (server-sent events): the changes a hub follows, and keep-alives.

use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use komnet_proto::api::RegistryEvent;

use crate::transport::Connection;
use crate::ClientError;

/// What the registry stream carried next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryItem {
    Event(RegistryEvent),
    /// A keep-alive comment: the stream is alive, nothing changed.
    KeepAlive,
}

/// A stream of registry changes (server-sent events).
pub struct RegistryFollower {
    url: String,
    body: Incoming,
    buffer: Vec<u8>,
    /// The last version received; reconnect with it after an error.
    pub last_version: u64,
    /// How often the service promised a keep-alive on a quiet stream.
    pub keepalive: Duration,
    _conn: Connection,
}

impl RegistryFollower {
    pub(crate) fn new(conn: Connection, body: Incoming, since: u64, keepalive: Duration) -> Self {
        RegistryFollower {
            url: conn.url.clone(),
            body,
            buffer: Vec::new(),
            last_version: since,
            keepalive,
            _conn: conn,
        }
    }
}

impl std::fmt::Debug for RegistryFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryFollower")
            .field("url", &self.url)
            .field("last_version", &self.last_version)
            .finish_non_exhaustive()
    }
}

/// Largest single event accepted from the stream.
const MAX_EVENT_BYTES: usize = 64 * 1024;

impl RegistryFollower {
    /// The next change; `None` when the service closed the stream. Keep-alives are skipped:
    /// callers that watch the stream's liveness use [`Self::next_item`].
    pub async fn next(&mut self) -> Option<Result<RegistryEvent, ClientError>> {
        loop {
            match self.next_item().await? {
                Ok(RegistryItem::KeepAlive) => continue,
                Ok(RegistryItem::Event(ev)) => return Some(Ok(ev)),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next change or keep-alive; `None` when the service closed the stream.
    pub async fn next_item(&mut self) -> Option<Result<RegistryItem, ClientError>> {
        loop {
            if let Some(end) = find_event_end(&self.buffer) {
                let raw: Vec<u8> = self.buffer.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&raw[..end.0]).into_owned();
                let data: String = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    return Some(Ok(RegistryItem::KeepAlive));
                }
                return Some(match serde_json::from_str::<RegistryEvent>(&data) {
                    Ok(ev) => {
                        self.last_version = ev.version;
                        Ok(RegistryItem::Event(ev))
                    }
                    Err(e) => Err(ClientError::Protocol {
                        url: self.url.clone(),
                        message: format!("registry event: {e}"),
                    }),
                });
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Some(Err(ClientError::Protocol {
                    url: self.url.clone(),
                    message: "registry event larger than 64 KiB".into(),
                }));
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Err(e) => {
                    return Some(Err(ClientError::Protocol {
                        url: self.url.clone(),
                        message: format!("registry stream: {e}"),
                    }))
                }
            }
        }
    }
}

/// (end of the event's text, end including the blank line).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| (p, p + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, p + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}
