//! Views of the inner IP packets the tunnel carries and of WireGuard message headers. They
//! check lengths once and never panic or allocate (smoltcp's `new_checked` pattern).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// WireGuard message types (WireGuard paper, section 5.4).
pub const MSG_HANDSHAKE_INIT: u8 = 1;
pub const MSG_HANDSHAKE_RESP: u8 = 2;
pub const MSG_COOKIE_REPLY: u8 = 3;
pub const MSG_DATA: u8 = 4;

pub const HANDSHAKE_INIT_LEN: usize = 148;
pub const HANDSHAKE_RESP_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
/// Header (16) + AEAD tag (16) of a data message.
pub const DATA_OVERHEAD: usize = 32;

/// The kind of a datagram from the underlay, classified from its first bytes and length alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireMessage {
    HandshakeInit { sender: u32 },
    HandshakeResponse { sender: u32, receiver: u32 },
    CookieReply { receiver: u32 },
    Data { receiver: u32 },
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

impl WireMessage {
    /// Classifies a datagram: type byte, three reserved zero bytes, and the exact length each
    /// type has (data: at least the overhead). Anything else is `None`.
    pub fn parse(datagram: &[u8]) -> Option<Self> {
        let header = le32(datagram, 0)?;
        let len = datagram.len();
        match header {
            1 if len == HANDSHAKE_INIT_LEN => Some(Self::HandshakeInit {
                sender: le32(datagram, 4)?,
            }),
            2 if len == HANDSHAKE_RESP_LEN => Some(Self::HandshakeResponse {
                sender: le32(datagram, 4)?,
                receiver: le32(datagram, 8)?,
            }),
            3 if len == COOKIE_REPLY_LEN => Some(Self::CookieReply {
                receiver: le32(datagram, 4)?,
            }),
            4 if len >= DATA_OVERHEAD => Some(Self::Data {
                receiver: le32(datagram, 4)?,
            }),
            _ => None,
        }
    }
}

/// The addressing fields of an IPv4 or IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Length the header claims for the whole packet.
    pub total_len: usize,
}

impl IpHeader {
    /// Parses the fixed header; `None` for anything that is not a well-formed IPv4/IPv6 header
    /// whose claimed length fits in `packet`. The core's routing needs no more than this; the
    /// firewall goes on with [`IpPacket::parse`], which starts from the same fixed header.
    #[inline]
    pub fn parse(packet: &[u8]) -> Option<Self> {
        let f = Fixed::parse(packet, false)?;
        Some(f.header)
    }
}

/// Why [`IpPacket::parse`] refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpError {
    /// Not a well-formed IPv4/IPv6 packet up to and including its transport ports.
    Malformed,
    /// A non-first fragment: its transport header is in another packet.
    Fragment,
}

/// IP protocol numbers the parser and the firewall know by name.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NO_NEXT_HEADER: u8 = 59;
}

/// An IP packet parsed down to its transport header: addresses, the transport protocol after
/// any IPv6 extension headers (and an IPv4/IPv6 authentication header), and where that
/// transport header starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPacket {
    pub header: IpHeader,
    /// The transport protocol (TCP, UDP, ICMP, ...); ESP and "no next header" end the walk
    /// and are reported as such.
    pub proto: u8,
    /// Offset of the transport header in the packet.
    pub l4: usize,
}

/// The fixed IPv4/IPv6 header: what the core and the full parse share.
struct Fixed {
    header: IpHeader,
    proto: u8,
    len: usize,
    /// IPv4: the fragment offset is not zero.
    later_fragment: bool,
}

impl Fixed {
    /// `quoted`: the packet an ICMP error quotes, cut after a few bytes of its payload, whose
    /// length field still describes the original.
    #[inline(always)]
    fn parse(packet: &[u8], quoted: bool) -> Option<Self> {
        match packet.first()? >> 4 {
            4 => {
                let h: &[u8; 20] = packet.get(..20)?.try_into().ok()?;
                let ihl = usize::from(h[0] & 0x0f) * 4;
                let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
                if ihl < 20 || (!quoted && (total_len < ihl || total_len > packet.len())) {
                    return None;
                }
                Some(Self {
                    header: IpHeader {
                        src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
                        dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
                        total_len,
                    },
                    proto: h[9],
                    len: ihl,
                    later_fragment: u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0,
                })
            }
            6 => {
                let h: &[u8; 40] = packet.get(..40)?.try_into().ok()?;
                let total_len = 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
                if !quoted && total_len > packet.len() {
                    return None;
                }
                let src: [u8; 16] = h[8..24].try_into().ok()?;
                let dst: [u8; 16] = h[24..40].try_into().ok()?;
                Some(Self {
                    header: IpHeader {
                        src: IpAddr::V6(Ipv6Addr::from(src)),
                        dst: IpAddr::V6(Ipv6Addr::from(dst)),
                        total_len,
                    },
                    proto: h[6],
                    len: 40,
                    later_fragment: false,
                })
            }
            _ => None,
        }
    }
}

/// Extension headers before the transport header; more than this is refused rather than walked.
const MAX_EXTENSION_HEADERS: usize = 8;

impl IpPacket {
    /// Parses `packet` down to its transport header. `quoted`: it is the packet an ICMP error
    /// quotes (its length field describes the original, which may be longer than the quote).
    ///
    /// IPv6 extension headers are walked (hop-by-hop, routing, destination options, mobility,
    /// HIP, shim6, the experimental 253/254 and the authentication header, whose length counts
    /// in 4-byte units, RFC 4302); an authentication header after an IPv4 header is walked too.
    /// A non-first fragment is [`IpError::Fragment`]; ESP ends the walk (what follows is
    /// encrypted).
    ///
    /// ```
    /// use komnet_gateway::packet::{IpPacket, proto};
    /// let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
    /// p.extend([0x30, 0x39, 0, 53, 0, 8, 0, 0]);
    /// let ip = IpPacket::parse(&p, false).unwrap();
    /// assert_eq!((ip.proto, ip.l4), (proto::UDP, 20));
    /// ```
    #[inline]
    pub fn parse(packet: &[u8], quoted: bool) -> Result<Self, IpError> {
        let f = Fixed::parse(packet, quoted).ok_or(IpError::Malformed)?;
        if f.later_fragment {
            return Err(IpError::Fragment);
        }
        let v6 = f.header.src.is_ipv6();
        let (mut next, mut off) = (f.proto, f.len);
        for _ in 0..=MAX_EXTENSION_HEADERS {
            let extension = match next {
                proto::AH => true,
                0 | 43 | 44 | 60 | 135 | 139 | 140 | 253 | 254 => v6,
                _ => false,
            };
            if !extension {
                return Ok(Self {
                    header: f.header,
                    proto: next,
                    l4: off,
                });
            }
            let ext = packet.get(off..off + 8).ok_or(IpError::Malformed)?;
            let len = match next {
                proto::AH => (usize::from(ext[1]) + 2) * 4,
                44 => {
                    if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                        return Err(IpError::Fragment);
                    }
                    8
                }
                _ => (usize::from(ext[1]) + 1) * 8,
            };
            next = ext[0];
            off += len;
            if off > packet.len() {
                return Err(IpError::Malformed);
            }
        }
        Err(IpError::Malformed)
    }

    /// The transport header and what follows (possibly empty).
    pub fn transport<'a>(&self, packet: &'a [u8]) -> &'a [u8] {
        packet.get(self.l4..).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_v4_and_v6_headers() {
        let mut v4 = [0u8; 28];
        v4[0] = 0x45;
        v4[3] = 28;
        v4[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let h = IpHeader::parse(&v4).unwrap();
        assert_eq!(h.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(h.total_len, 28);
        // Claimed length longer than the buffer.
        v4[3] = 29;
        assert_eq!(IpHeader::parse(&v4), None);

        let mut v6 = [0u8; 48];
        v6[0] = 0x60;
        v6[5] = 8;
        v6[23] = 1;
        v6[39] = 2;
        let h = IpHeader::parse(&v6).unwrap();
        assert_eq!(h.src, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "::2".parse::<IpAddr>().unwrap());
        assert_eq!(h.total_len, 48);
    }

    #[test]
    fn wire_messages_need_exact_lengths_and_zero_reserved_bytes() {
        let mut init = [0u8; HANDSHAKE_INIT_LEN];
        init[0] = 1;
        init[4] = 7;
        assert_eq!(
            WireMessage::parse(&init),
            Some(WireMessage::HandshakeInit { sender: 7 })
        );
        init[1] = 1;
        assert_eq!(WireMessage::parse(&init), None);
        assert_eq!(WireMessage::parse(&init[..147]), None);
        let mut data = [0u8; 31];
        data[0] = 4;
        assert_eq!(WireMessage::parse(&data), None);
    }

    fn v6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, rest.len() as u8, next, 64];
        p.extend([0u8; 15]);
        p.push(1);
        p.extend([0u8; 15]);
        p.push(2);
        p.extend(rest);
        p
    }

    #[test]
    fn extension_headers_are_walked_including_the_authentication_header() {
        // Hop-by-hop (8 bytes) -> AH (payload length 4: (4 + 2) * 4 = 24 bytes) -> UDP.
        let mut rest = vec![51, 0, 0, 0, 0, 0, 0, 0];
        let mut ah = vec![17, 4];
        ah.resize(24, 0);
        rest.extend(ah);
        rest.extend([0x30, 0x39, 0, 53, 0, 8, 0, 0]);
        let p = IpPacket::parse(&v6(0, &rest), false).unwrap();
        assert_eq!((p.proto, p.l4), (proto::UDP, 40 + 8 + 24));
        // A later fragment has no transport header; a first fragment has.
        let frag = |offset: u16| {
            let mut r = vec![6, 0];
            r.extend((offset << 3).to_be_bytes());
            r.extend([0, 0, 0, 1]);
            r.extend([0u8; 20]);
            v6(44, &r)
        };
        assert_eq!(IpPacket::parse(&frag(0), false).unwrap().proto, proto::TCP);
        assert_eq!(IpPacket::parse(&frag(1), false), Err(IpError::Fragment));
        // ESP ends the walk; an endless chain of headers is refused.
        assert_eq!(
            IpPacket::parse(&v6(50, &[0; 16]), false).unwrap().proto,
            proto::ESP
        );
        let chain: Vec<u8> = (0..10).flat_map(|_| [60u8, 0, 0, 0, 0, 0, 0, 0]).collect();
        assert_eq!(
            IpPacket::parse(&v6(60, &chain), false),
            Err(IpError::Malformed)
        );
        // IPv4 with an authentication header before TCP.
        let mut v4 = vec![
            0x45, 0, 0, 64, 0, 0, 0, 0, 64, 51, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let mut ah = vec![6, 4];
        ah.resize(24, 0);
        v4.extend(ah);
        v4.extend([0u8; 20]);
        let p = IpPacket::parse(&v4, false).unwrap();
        assert_eq!((p.proto, p.l4), (proto::TCP, 44));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = WireMessage::parse(&bytes);
            if let Some(h) = IpHeader::parse(&bytes) {
                prop_assert!(h.total_len <= bytes.len());
            }
            for quoted in [false, true] {
                if let Ok(p) = IpPacket::parse(&bytes, quoted) {
                    prop_assert!(p.l4 <= bytes.len());
                }
            }
        }
    }
}
