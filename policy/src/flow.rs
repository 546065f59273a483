//! Protocols, port ranges and the packet fields a decision is made on.

use std::fmt;
use std::net::IpAddr;

/// The transport protocols a policy can name. ICMP means ICMPv4 or ICMPv6 by the packet's family,
/// so one rule means the same for both families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    /// The protocol of an IP packet's `protocol`/`next header` number, if the policy can name it.
    pub fn from_ip_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            1 | 58 => Some(Proto::Icmp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }

    fn parse(s: &str) -> Option<Proto> {
        match s {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "icmp" => Some(Proto::Icmp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A protocol with an inclusive destination-port range; ICMP always has `0..=0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub proto: Proto,
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, proto: Proto, port: u16) -> bool {
        self.proto == proto && self.lo <= port && port <= self.hi
    }

    pub fn intersect(&self, other: &PortRange) -> Option<PortRange> {
        if self.proto != other.proto {
            return None;
        }
        let lo = self.lo.max(other.lo);
        let hi = self.hi.min(other.hi);
        (lo <= hi).then_some(PortRange {
            proto: self.proto,
            lo,
            hi,
        })
    }

    /// Parses `tcp/443`, `udp/5060-5061`, `tcp/*` or `icmp`.
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let s = s.trim();
        let (proto, ports) = match s.split_once('/') {
            Some((p, rest)) => (p, Some(rest)),
            None => (s, None),
        };
        let proto = Proto::parse(proto).ok_or_else(|| {
            format!("unknown protocol {proto:?} in {s:?}: use tcp/PORT, udp/PORT or icmp")
        })?;
        if proto == Proto::Icmp {
            return match ports {
                None => Ok(PortRange {
                    proto,
                    lo: 0,
                    hi: 0,
                }),
                Some(_) => Err(format!("{s:?}: icmp has no ports; write just \"icmp\"")),
            };
        }
        let ports = ports.ok_or_else(|| {
            format!("{s:?} names no port: write {proto}/PORT, {proto}/LOW-HIGH or {proto}/*")
        })?;
        if ports == "*" {
            return Ok(PortRange {
                proto,
                lo: 0,
                hi: u16::MAX,
            });
        }
        let (lo, hi) = match ports.split_once('-') {
            Some((lo, hi)) => (parse_port(lo, s)?, parse_port(hi, s)?),
            None => {
                let p = parse_port(ports, s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!(
                "port range {lo}-{hi} in {s:?} is backwards (low > high): did you mean \"{proto}/{hi}-{lo}\"?"
            ));
        }
        Ok(PortRange { proto, lo, hi })
    }

    /// Like [`PortRange::parse`], and also takes the other order some people write, `443/tcp`
    /// (as in /etc/services), with a hint to write `tcp/443` — PROTO/PORT, as everywhere in the
    /// policy.
    pub fn parse_lenient(s: &str) -> Result<(PortRange, Option<String>), String> {
        match PortRange::parse(s) {
            Ok(r) => Ok((r, None)),
            Err(e) => match swapped(s) {
                Some(fixed) => {
                    let r = PortRange::parse(&fixed)?;
                    Ok((r, Some(swapped_hint(s, &fixed))))
                }
                None => Err(e),
            },
        }
    }
}

/// `443/tcp` → `tcp/443`, `5060-5061/udp` → `udp/5060-5061`; `None` for anything else.
pub(crate) fn swapped(s: &str) -> Option<String> {
    let (ports, proto) = s.trim().split_once('/')?;
    let proto = Proto::parse(proto).filter(|p| *p != Proto::Icmp)?;
    let numeric = !ports.is_empty()
        && (ports == "*" || ports.chars().all(|c| c.is_ascii_digit() || c == '-'));
    numeric.then(|| format!("{proto}/{ports}"))
}

pub(crate) fn swapped_hint(written: &str, fixed: &str) -> String {
    format!(
        "write {fixed:?}, not {:?}: ports are PROTO/PORT everywhere in the policy (services, rules, tests, explain)",
        written.trim()
    )
}

fn parse_port(p: &str, whole: &str) -> Result<u16, String> {
    match p.trim().parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        Ok(n) => Err(format!("port {n} in {whole:?} is out of range (1-65535)")),
        Err(_) => Err(format!("{p:?} in {whole:?} is not a port number")),
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.proto, self.lo, self.hi) {
            (Proto::Icmp, _, _) => f.write_str("icmp"),
            (p, 0, u16::MAX) => write!(f, "{p}/*"),
            (p, lo, hi) if lo == hi => write!(f, "{p}/{lo}"),
            (p, lo, hi) => write!(f, "{p}/{lo}-{hi}"),
        }
    }
}

/// The fields of a packet that a decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PacketMeta {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, …).
    pub ip_proto: u8,
    /// Destination port; 0 for ICMP.
    pub dport: u16,
}

impl PacketMeta {
    pub fn new(src: IpAddr, dst: IpAddr, proto: Proto, dport: u16) -> Self {
        let ip_proto = match (proto, dst) {
            (Proto::Tcp, _) => 6,
            (Proto::Udp, _) => 17,
            (Proto::Icmp, IpAddr::V4(_)) => 1,
            (Proto::Icmp, IpAddr::V6(_)) => 58,
        };
        let dport = if proto == Proto::Icmp { 0 } else { dport };
        PacketMeta {
            src,
            dst,
            ip_proto,
            dport,
        }
    }
}

/// Who sent a packet, as far as the enforcement point knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Only the source address is known (the appliance's LAN, the data centre's side).
    Address,
    /// An authenticated WireGuard peer with a certificate identity: its source address must lie
    /// in one of its own tenant's segments, a spoke's at its own site, a home office's in the
    /// home-office segment.
    Peer(PeerIdentity),
}

/// The identity fields of a peer, resolved to the policy's indices with
/// [`crate::Policy::peer_identity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub tenant: crate::TenantId,
    pub role: Role,
    /// The spoke's site; `None` for hubs and home offices.
    pub site: Option<crate::SiteId>,
}

/// The role carried in a certificate: komnet's one `Role`, from `komnet-proto`.
pub use komnet_proto::identity::Role;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_print() {
        for (text, shown) in [
            ("tcp/443", "tcp/443"),
            ("udp/5060-5061", "udp/5060-5061"),
            ("tcp/*", "tcp/*"),
            ("icmp", "icmp"),
        ] {
            let parsed = PortRange::parse(text).unwrap();
            assert_eq!(parsed.to_string(), shown);
        }
        for (bad, needle) in [
            ("tcp/0", "out of range"),
            ("tcp/70000", "out of range"),
            (
                "tcp/99-1",
                "backwards (low > high): did you mean \"tcp/1-99\"?",
            ),
            ("sctp/1", "unknown protocol"),
            ("tcp", "names no port"),
            ("icmp/8", "no ports"),
            ("tcp/http", "not a port number"),
        ] {
            let err = PortRange::parse(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        // The other order is taken, with a hint to write PROTO/PORT.
        let (r, hint) = PortRange::parse_lenient("443/tcp").unwrap();
        assert_eq!(r.to_string(), "tcp/443");
        assert!(hint
            .unwrap()
            .starts_with("write \"tcp/443\", not \"443/tcp\""));
        let (r, hint) = PortRange::parse_lenient("5060-5061/udp").unwrap();
        assert_eq!(
            (r.to_string(), hint.is_some()),
            ("udp/5060-5061".to_owned(), true)
        );
        assert_eq!(PortRange::parse_lenient("tcp/22").unwrap().1, None);
        assert!(PortRange::parse_lenient("443/icmp").is_err());
    }
}
