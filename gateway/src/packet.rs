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
    /// whose claimed length fits in `packet`.
    #[inline]
    pub fn parse(packet: &[u8]) -> Option<Self> {
        match packet.first()? >> 4 {
            4 => {
                let h: &[u8; 20] = packet.get(..20)?.try_into().ok()?;
                let ihl = usize::from(h[0] & 0x0f) * 4;
                let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
                if ihl < 20 || total_len < ihl || total_len > packet.len() {
                    return None;
                }
                Some(Self {
                    src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
                    dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
                    total_len,
                })
            }
            6 => {
                let h: &[u8; 40] = packet.get(..40)?.try_into().ok()?;
                let total_len = 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
                if total_len > packet.len() {
                    return None;
                }
                let src: [u8; 16] = h[8..24].try_into().ok()?;
                let dst: [u8; 16] = h[24..40].try_into().ok()?;
                Some(Self {
                    src: IpAddr::V6(Ipv6Addr::from(src)),
                    dst: IpAddr::V6(Ipv6Addr::from(dst)),
                    total_len,
                })
            }
            _ => None,
        }
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

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = WireMessage::parse(&bytes);
            if let Some(h) = IpHeader::parse(&bytes) {
                prop_assert!(h.total_len <= bytes.len());
            }
        }
    }
}
