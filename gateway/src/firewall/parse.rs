//! The packet as the firewall sees it: IP and transport headers parsed into a [`Transport`]
//! (also the packet an ICMP error quotes), and which ICMP error types fit which protocol.

use super::*;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

impl From<IpError> for FirewallDrop {
    fn from(e: IpError) -> Self {
        match e {
            IpError::Malformed => FirewallDrop::Malformed,
            IpError::Fragment => FirewallDrop::Fragment,
        }
    }
}

/// Parses IP and transport headers (the IP part is [`IpPacket::parse`], shared with the
/// core). `quoted`: the packet quoted in an ICMP error, cut after the transport ports.
pub(super) fn parse(packet: &[u8], quoted: bool) -> Result<Transport, FirewallDrop> {
    let ip = IpPacket::parse(packet, quoted)?;
    let l4 = ip.transport(packet);
    let t = |sport, dport, kind| Transport {
        src: ip.header.src,
        dst: ip.header.dst,
        proto: ip.proto,
        sport,
        dport,
        kind,
    };
    match ip.proto {
        proto::TCP => {
            let sport = be16(l4, 0).ok_or(FirewallDrop::Malformed)?;
            let dport = be16(l4, 2).ok_or(FirewallDrop::Malformed)?;
            // Flags are beyond the 8 bytes an ICMP error must quote; treat them as unknown there.
            let flags = l4.get(13).copied().unwrap_or(0);
            Ok(t(
                sport,
                dport,
                Kind::Tcp {
                    closing: flags & 0x05 != 0,
                },
            ))
        }
        proto::UDP => Ok(t(
            be16(l4, 0).ok_or(FirewallDrop::Malformed)?,
            be16(l4, 2).ok_or(FirewallDrop::Malformed)?,
            Kind::Udp,
        )),
        proto::ICMP | proto::ICMPV6 => {
            let ty = *l4.first().ok_or(FirewallDrop::Malformed)?;
            let v6 = ip.proto == proto::ICMPV6;
            let echo = if v6 {
                matches!(ty, 128 | 129)
            } else {
                matches!(ty, 0 | 8)
            };
            let error = if v6 {
                matches!(ty, 1..=4)
            } else {
                matches!(ty, 3 | 11 | 12)
            };
            if echo {
                let id = be16(l4, 4).ok_or(FirewallDrop::Malformed)?;
                let request = if v6 { ty == 128 } else { ty == 8 };
                Ok(t(id, id, Kind::IcmpEcho { request }))
            } else if error {
                let head = l4.get(..8).ok_or(FirewallDrop::Malformed)?;
                Ok(t(
                    0,
                    0,
                    Kind::IcmpError {
                        inner: ip.l4 + 8,
                        ty,
                        code: head[1],
                        rest: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
                    },
                ))
            } else {
                Ok(t(0, 0, Kind::Other))
            }
        }
        _ => Ok(t(0, 0, Kind::Other)),
    }
}

/// Whether an ICMP error of `ty`/`code` may be about a packet of protocol `quoted_proto`.
/// Port unreachable is the answer to a UDP datagram (TCP answers with a reset); the codes are
/// those RFC 792/1812 (ICMP) and RFC 4443/7112 (ICMPv6) define; a "packet too big" below the
/// IPv6 minimum MTU is refused (RFC 8201, section 4).
pub(super) fn error_fits(v6: bool, ty: u8, code: u8, rest: u32, quoted_proto: u8) -> bool {
    let port_unreachable = if v6 {
        ty == 1 && code == 4
    } else {
        ty == 3 && code == 3
    };
    if port_unreachable {
        return quoted_proto == proto::UDP;
    }
    match (v6, ty) {
        (false, 3) => code <= 15,
        (false, 11) => code <= 1,
        (false, 12) => code <= 2,
        (true, 1) => code <= 8,
        (true, 2) => code == 0 && rest >= 1280,
        (true, 3) => code <= 1,
        (true, 4) => code <= 3,
        _ => false,
    }
}
