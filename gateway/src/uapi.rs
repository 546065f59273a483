//! The cross-platform WireGuard userspace API (<https://www.wireguard.com/xplatform/>), the
//! text protocol `wg` and `wg-quick` speak over `/run/wireguard/IFNAME.sock`.
//!
//! Sans-IO: `parse_set` turns the lines of a `set=1` request into a validated `DeviceSet`
//! without touching anything, so a request with any bad line changes nothing; `apply_set`
//! then applies it to a `Core` in one go; `format_get` renders the `get=1` answer. Error codes
//! follow wireguard-go's, which `wg` turns back into an errno (negative values).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use crate::core::{Core, PeerInfo};

/// `-EINVAL`: a key or value that is not valid.
pub const ERRNO_INVALID: i32 = -libc::EINVAL;
/// `-EPROTO`: a line that is not `key=value`, or an unknown operation.
pub const ERRNO_PROTOCOL: i32 = -libc::EPROTO;
/// `-EADDRINUSE`: the listen port cannot be bound.
pub const ERRNO_PORT_IN_USE: i32 = -libc::EADDRINUSE;
/// `-EIO`: the request could not be read.
pub const ERRNO_IO: i32 = -libc::EIO;

/// Why a request was refused: the errno the client gets and, for the log, which line and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("UAPI line {line}: {message} (errno {errno})")]
pub struct UapiError {
    pub errno: i32,
    /// 1-based line of the request (the `set=1` line is line 1); 0 for the request as a whole.
    pub line: usize,
    pub message: String,
}

impl UapiError {
    pub fn new(errno: i32, line: usize, message: impl Into<String>) -> Self {
        Self {
            errno,
            line,
            message: message.into(),
        }
    }
}

/// The first line of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Get,
    Set,
}

pub fn parse_operation(line: &str) -> Result<Operation, UapiError> {
    match line {
        "get=1" => Ok(Operation::Get),
        "set=1" => Ok(Operation::Set),
        other => Err(UapiError::new(
            ERRNO_PROTOCOL,
            1,
            format!("unknown operation {:?}", truncate(other)),
        )),
    }
}

/// A key that is set to a value or cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<T> {
    Set(T),
    Clear,
}

/// One peer section of a `set=1` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    pub public_key: [u8; 32],
    pub remove: bool,
    pub update_only: bool,
    pub preshared_key: Option<Change<[u8; 32]>>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

/// A whole, validated `set=1` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSet {
    pub private_key: Option<Change<[u8; 32]>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerSet>,
}

fn truncate(s: &str) -> &str {
    // Keep log lines short even for hostile input; cut on a char boundary.
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn parse_key(value: &str, line: usize, what: &str) -> Result<[u8; 32], UapiError> {
    let mut key = [0u8; 32];
    if value.len() != 64 || hex::decode_to_slice(value, &mut key).is_err() {
        // Never echo a key value: it may be a private key.
        return Err(UapiError::new(
            ERRNO_INVALID,
            line,
            format!("{what} is not 64 hex digits"),
        ));
    }
    Ok(key)
}

fn parse_bool(value: &str, line: usize, key: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(UapiError::new(
            ERRNO_INVALID,
            line,
            format!("{key} must be true or false"),
        )),
    }
}

fn parse_num<T: std::str::FromStr>(value: &str, line: usize, key: &str) -> Result<T, UapiError> {
    value.parse().map_err(|_| {
        UapiError::new(
            ERRNO_INVALID,
            line,
            format!("{key}={:?} is not a valid number", truncate(value)),
        )
    })
}

/// Parses the body of a `set=1` request: the lines after `set=1`, up to (not including) the
/// empty line. The first body line is line 2 in errors.
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<DeviceSet, UapiError> {
    let mut set = DeviceSet::default();
    for (i, raw) in lines.into_iter().enumerate() {
        let line = i + 2;
        let Some((key, value)) = raw.split_once('=') else {
            return Err(UapiError::new(
                ERRNO_PROTOCOL,
                line,
                format!("{:?} is not key=value", truncate(raw)),
            ));
        };
        if let Some(peer) = set.peers.last_mut() {
            match key {
                "public_key" => {}
                "remove" => {
                    peer.remove = parse_bool(value, line, key)?;
                    continue;
                }
                "update_only" => {
                    peer.update_only = parse_bool(value, line, key)?;
                    continue;
                }
                "preshared_key" => {
                    let k = parse_key(value, line, key)?;
                    peer.preshared_key = Some(if k == [0; 32] {
                        Change::Clear
                    } else {
                        Change::Set(k)
                    });
                    continue;
                }
                "endpoint" => {
                    let ep: SocketAddr = value.parse().map_err(|_| {
                        UapiError::new(
                            ERRNO_INVALID,
                            line,
                            format!(
                                "endpoint {:?} is not IP:port or [IPv6]:port",
                                truncate(value)
                            ),
                        )
                    })?;
                    peer.endpoint = Some(ep);
                    continue;
                }
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive = Some(parse_num(value, line, key)?);
                    continue;
                }
                "replace_allowed_ips" => {
                    if parse_bool(value, line, key)? {
                        peer.replace_allowed_ips = true;
                        peer.allowed_ips.clear();
                    }
                    continue;
                }
                "allowed_ip" => {
                    let net: IpNet = value.parse().map_err(|_| {
                        UapiError::new(
                            ERRNO_INVALID,
                            line,
                            format!("allowed_ip {:?} is not an IP prefix", truncate(value)),
                        )
                    })?;
                    peer.allowed_ips.push(net);
                    continue;
                }
                "protocol_version" => {
                    if value != "1" {
                        return Err(UapiError::new(
                            ERRNO_INVALID,
                            line,
                            format!(
                                "protocol_version {:?} is not supported (only 1)",
                                truncate(value)
                            ),
                        ));
                    }
                    continue;
                }
                _ => {
                    return Err(UapiError::new(
                        ERRNO_INVALID,
                        line,
                        format!("unknown peer key {:?}", truncate(key)),
                    ));
                }
            }
        }
        match key {
            "private_key" => {
                let k = parse_key(value, line, key)?;
                set.private_key = Some(if k == [0; 32] {
                    Change::Clear
                } else {
                    Change::Set(k)
                });
            }
            "listen_port" => set.listen_port = Some(parse_num(value, line, key)?),
            "fwmark" => set.fwmark = Some(parse_num(value, line, key)?),
            "replace_peers" => {
                if parse_bool(value, line, key)? {
                    set.replace_peers = true;
                    set.peers.clear();
                }
            }
            "public_key" => set.peers.push(PeerSet {
                public_key: parse_key(value, line, key)?,
                remove: false,
                update_only: false,
                preshared_key: None,
                endpoint: None,
                persistent_keepalive: None,
                replace_allowed_ips: false,
                allowed_ips: Vec::new(),
            }),
            _ => {
                return Err(UapiError::new(
                    ERRNO_INVALID,
                    line,
                    format!("unknown device key {:?}", truncate(key)),
                ));
            }
        }
    }
    Ok(set)
}

/// Applies a validated request to the core. Listen port and fwmark are recorded here; binding
/// sockets to them is the driver's job and happens before this is called.
pub fn apply_set(core: &mut Core, now: Instant, set: &DeviceSet) {
    match set.private_key {
        Some(Change::Set(k)) => core.set_private_key(now, Some(k)),
        Some(Change::Clear) => core.set_private_key(now, None),
        None => {}
    }
    if let Some(port) = set.listen_port {
        core.set_listen_port(port);
    }
    if let Some(mark) = set.fwmark {
        core.set_fwmark(mark);
    }
    if set.replace_peers {
        core.remove_all_peers();
    }
    for p in &set.peers {
        let existing = core.peer_id(&p.public_key);
        if p.remove {
            if let Some(id) = existing {
                core.remove_peer(id);
            }
            continue;
        }
        if p.update_only && existing.is_none() {
            continue;
        }
        // Our own public key cannot be a peer (wireguard-go ignores it likewise).
        if core.public_key() == Some(p.public_key) {
            continue;
        }
        let Some(id) = existing.or_else(|| core.upsert_peer(now, p.public_key)) else {
            tracing::warn!("peer table full; a peer was not added");
            continue;
        };
        match p.preshared_key {
            Some(Change::Set(k)) => core.set_preshared_key(id, Some(k)),
            Some(Change::Clear) => core.set_preshared_key(id, None),
            None => {}
        }
        if let Some(ep) = p.endpoint {
            core.set_endpoint(id, ep);
        }
        if p.replace_allowed_ips {
            core.clear_allowed_ips(id);
        }
        for net in &p.allowed_ips {
            core.add_allowed_ip(id, *net);
        }
        if let Some(ka) = p.persistent_keepalive {
            core.set_persistent_keepalive(now, id, Some(ka));
        }
    }
}

/// Renders the answer to `get=1`, ending with `errno=0` and the empty line.
pub fn format_get(core: &mut Core, now: Instant, wall: SystemTime) -> String {
    let mut out = String::with_capacity(256);
    if let Some(k) = core.private_key() {
        let _ = writeln!(out, "private_key={}", hex::encode(k));
    }
    if core.listen_port() != 0 {
        let _ = writeln!(out, "listen_port={}", core.listen_port());
    }
    if core.fwmark() != 0 {
        let _ = writeln!(out, "fwmark={}", core.fwmark());
    }
    for peer in core.peers(now, wall) {
        format_peer(&mut out, &peer);
    }
    out.push_str("errno=0\n\n");
    out
}

fn format_peer(out: &mut String, p: &PeerInfo) {
    let _ = writeln!(out, "public_key={}", hex::encode(p.public_key));
    let _ = writeln!(
        out,
        "preshared_key={}",
        hex::encode(p.preshared_key.unwrap_or([0; 32]))
    );
    let _ = writeln!(out, "protocol_version=1");
    if let Some(ep) = p.endpoint {
        let _ = writeln!(out, "endpoint={ep}");
    }
    let since_epoch = p
        .last_handshake
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    let _ = writeln!(out, "last_handshake_time_sec={}", since_epoch.as_secs());
    let _ = writeln!(
        out,
        "last_handshake_time_nsec={}",
        since_epoch.subsec_nanos()
    );
    let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
    let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
    let _ = writeln!(
        out,
        "persistent_keepalive_interval={}",
        p.persistent_keepalive.unwrap_or(0)
    );
    for net in &p.allowed_ips {
        let _ = writeln!(out, "allowed_ip={net}");
    }
}

/// The answer to a `set=1` request or a refused request.
pub fn format_errno(result: Result<(), &UapiError>) -> String {
    format!("errno={}\n\n", result.err().map_or(0, |e| e.errno))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K1: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
    const K2: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    #[test]
    fn parses_a_full_request() {
        let req = format!(
            "private_key={K1}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\npublic_key={K2}\n\
             preshared_key={K1}\nendpoint=[fd00::1]:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\nprotocol_version=1"
        );
        let set = parse_set(lines(&req)).unwrap();
        assert!(matches!(set.private_key, Some(Change::Set(_))));
        assert_eq!(set.listen_port, Some(51820));
        assert!(set.replace_peers);
        let p = &set.peers[0];
        assert_eq!(p.endpoint, Some("[fd00::1]:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(p.allowed_ips.len(), 2);
        assert!(p.replace_allowed_ips);
    }

    #[test]
    fn errors_name_the_line_and_the_right_errno() {
        let e = parse_set(lines(&format!("private_key={K1}\nlisten_port=99999"))).unwrap_err();
        assert_eq!((e.errno, e.line), (ERRNO_INVALID, 3));
        let e = parse_set(lines("bogus")).unwrap_err();
        assert_eq!(e.errno, ERRNO_PROTOCOL);
        let e = parse_set(lines("frobnicate=1")).unwrap_err();
        assert_eq!(e.errno, ERRNO_INVALID);
        let e = parse_set(lines(&format!("public_key={K2}\nlisten_port=1"))).unwrap_err();
        assert_eq!(e.errno, ERRNO_INVALID, "device key inside a peer section");
        let e = parse_set(lines(&format!("public_key={K2}\nprotocol_version=2"))).unwrap_err();
        assert_eq!(e.errno, ERRNO_INVALID);
        let e = parse_set(lines("private_key=zz")).unwrap_err();
        assert!(!e.message.contains("zz"), "key material is never echoed");
        assert_eq!(parse_operation("get=2").unwrap_err().errno, ERRNO_PROTOCOL);
    }

    #[test]
    fn a_bad_line_leaves_the_core_unchanged() {
        let mut core = Core::new(Instant::now(), [1; 32]);
        let good = parse_set(lines(&format!(
            "private_key={K1}\npublic_key={K2}\nallowed_ip=10.0.0.0/24"
        )))
        .unwrap();
        apply_set(&mut core, Instant::now(), &good);
        let before = format_get(&mut core, Instant::now(), UNIX_EPOCH);
        let bad = format!("replace_peers=true\npublic_key={K1}\nallowed_ip=10.9.0.0/33");
        assert!(parse_set(lines(&bad)).is_err());
        assert_eq!(format_get(&mut core, Instant::now(), UNIX_EPOCH), before);
    }

    #[test]
    fn get_round_trips_through_set() {
        let mut core = Core::new(Instant::now(), [1; 32]);
        let req = format!(
            "private_key={K1}\nlisten_port=4242\nfwmark=7\npublic_key={K2}\npreshared_key={K1}\n\
             endpoint=192.0.2.1:51820\npersistent_keepalive_interval=0\nallowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64"
        );
        apply_set(&mut core, Instant::now(), &parse_set(lines(&req)).unwrap());
        let got = format_get(&mut core, Instant::now(), UNIX_EPOCH);
        // The private key comes back clamped, as from the kernel and wireguard-go.
        let clamped = hex::encode(crate::core::clamp_private_key(
            hex::decode(K1).unwrap().try_into().unwrap(),
        ));
        let expected = format!(
            "private_key={clamped}\nlisten_port=4242\nfwmark=7\npublic_key={K2}\npreshared_key={K1}\n\
             protocol_version=1\nendpoint=192.0.2.1:51820\nlast_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n\
             allowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\nerrno=0\n\n"
        );
        assert_eq!(got, expected);
        // update_only on an unknown peer creates nothing; remove removes.
        let req = format!("public_key={K1}\nupdate_only=true\nallowed_ip=10.1.0.0/16\npublic_key={K2}\nremove=true");
        apply_set(&mut core, Instant::now(), &parse_set(lines(&req)).unwrap());
        assert_eq!(core.peer_count(), 0);
    }

    proptest! {
        #[test]
        fn parser_never_panics(input in "[a-z_=0-9./:\\[\\]\n-]{0,400}") {
            let _ = parse_set(input.lines());
        }

        #[test]
        fn parser_never_panics_on_arbitrary_text(input in any::<String>()) {
            let _ = parse_set(input.lines());
            let _ = parse_operation(&input);
        }
    }
}
