//! ICMP "host unreachable" answers for packets the tunnel cannot deliver (no peer owns the
//! destination, or the peer has no endpoint), as the kernel's WireGuard sends them
//! (`icmp_ndo_send` / `icmpv6_ndo_send`): the application sees EHOSTUNREACH at once instead of
//! waiting for a timeout. Sans-IO: bytes in, bytes out.
//!
//! One difference from the kernel is forced on a userspace daemon: the answer enters the host
//! through the TUN device, so its source cannot be one of the host's own addresses (the kernel
//! drops such a packet as a martian). It comes from the unreachable destination itself, which
//! routes back through the tunnel interface and so passes reverse-path filtering.
//!
//! No answer is ever sent for an ICMP error, a fragment other than the first, or to or from a
//! multicast, broadcast or unspecified address (RFC 1122 section 3.2.2, RFC 4443 section 2.4).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Largest answer: RFC 1812 (IPv4) keeps ICMP errors within 576 bytes, RFC 4443 within the
/// IPv6 minimum MTU.
pub const MAX_V4: usize = 576;
pub const MAX_V6: usize = 1280;

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn v4_excluded(a: Ipv4Addr) -> bool {
    a.is_unspecified() || a.is_multicast() || a.is_broadcast()
}

fn v6_excluded(a: Ipv6Addr) -> bool {
    a.is_unspecified() || a.is_multicast()
}

/// Writes into `out` the ICMP/ICMPv6 host-unreachable answer to `packet` (an IPv4 or IPv6
/// packet read from the TUN device), addressed to its sender. Returns its length, or `None`
/// when no answer may be sent or `out` is too small.
pub fn answer(packet: &[u8], out: &mut [u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 => answer_v4(packet, out),
        6 => answer_v6(packet, out),
        _ => None,
    }
}

fn answer_v4(packet: &[u8], out: &mut [u8]) -> Option<usize> {
    let h = packet.get(..20)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    let fragment_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    if ihl < 20 || v4_excluded(src) || v4_excluded(dst) || fragment_offset != 0 {
        return None;
    }
    if h[9] == 1 {
        // Never answer an ICMP error (destination unreachable, source quench, redirect, time
        // exceeded, parameter problem) or a malformed ICMP packet.
        let icmp_type = *packet.get(ihl)?;
        if matches!(icmp_type, 3 | 4 | 5 | 11 | 12) {
            return None;
        }
    }
    let quoted = packet.len().min(MAX_V4 - 28);
    let len = 28 + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[8] = 64; // TTL
    out[9] = 1; // ICMP
    out[12..16].copy_from_slice(&dst.octets());
    out[16..20].copy_from_slice(&src.octets());
    let sum = checksum(&[&out[..20]]);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    out[20] = 3; // destination unreachable
    out[21] = 1; // host unreachable, as the kernel's WireGuard
    out[28..].copy_from_slice(&packet[..quoted]);
    let sum = checksum(&[&out[20..]]);
    out[22..24].copy_from_slice(&sum.to_be_bytes());
    Some(len)
}

fn answer_v6(packet: &[u8], out: &mut [u8]) -> Option<usize> {
    let h = packet.get(..40)?;
    let src: [u8; 16] = h[8..24].try_into().ok()?;
    let dst: [u8; 16] = h[24..40].try_into().ok()?;
    let (src, dst) = (Ipv6Addr::from(src), Ipv6Addr::from(dst));
    if v6_excluded(src) || v6_excluded(dst) {
        return None;
    }
    if h[6] == 58 {
        // ICMPv6 errors are types 0..=127.
        if *packet.get(40)? < 128 {
            return None;
        }
    }
    let quoted = packet.len().min(MAX_V6 - 48);
    let len = 48 + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x60;
    out[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    out[6] = 58; // ICMPv6
    out[7] = 64; // hop limit
    out[8..24].copy_from_slice(&dst.octets());
    out[24..40].copy_from_slice(&src.octets());
    out[40] = 1; // destination unreachable
    out[41] = 3; // address unreachable, as the kernel's WireGuard
    out[48..].copy_from_slice(&packet[..quoted]);
    let upper_len = ((len - 40) as u32).to_be_bytes();
    let sum = checksum(&[&out[8..40], &upper_len, &[0, 0, 0, 58], &out[40..]]);
    out[42..44].copy_from_slice(&sum.to_be_bytes());
    Some(len)
}

/// The source and destination of an answer `answer` wrote (for tests and logs).
pub fn addresses(answer: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let h = crate::packet::IpHeader::parse(answer)?;
    Some((h.src, h.dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_udp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[3] = 40;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn v4_answer_is_a_valid_host_unreachable_to_the_sender() {
        let p = v4_udp([10, 0, 0, 1], [10, 0, 0, 3]);
        let mut out = [0u8; 600];
        let len = answer(&p, &mut out).unwrap();
        let a = &out[..len];
        assert_eq!(len, 28 + 40);
        assert_eq!(
            addresses(a),
            Some(("10.0.0.3".parse().unwrap(), "10.0.0.1".parse().unwrap()))
        );
        assert_eq!((a[20], a[21]), (3, 1));
        assert_eq!(checksum(&[&a[..20]]), 0, "IP header checksum");
        assert_eq!(checksum(&[&a[20..]]), 0, "ICMP checksum");
        assert_eq!(&a[28..], &p[..]);
    }

    #[test]
    fn no_answer_to_errors_multicast_or_later_fragments() {
        let mut out = [0u8; 600];
        let mut icmp_err = v4_udp([10, 0, 0, 1], [10, 0, 0, 3]);
        icmp_err[9] = 1;
        icmp_err[20] = 3;
        assert_eq!(answer(&icmp_err, &mut out), None);
        icmp_err[20] = 8; // echo request: answered
        assert!(answer(&icmp_err, &mut out).is_some());
        assert_eq!(
            answer(&v4_udp([10, 0, 0, 1], [224, 0, 0, 1]), &mut out),
            None
        );
        assert_eq!(answer(&v4_udp([0, 0, 0, 0], [10, 0, 0, 3]), &mut out), None);
        let mut frag = v4_udp([10, 0, 0, 1], [10, 0, 0, 3]);
        frag[7] = 10;
        assert_eq!(answer(&frag, &mut out), None);
        assert_eq!(answer(&[0x45; 10], &mut out), None, "truncated");
        assert_eq!(
            answer(&v4_udp([10, 0, 0, 1], [10, 0, 0, 3]), &mut out[..50]),
            None
        );
    }

    #[test]
    fn v6_answer_is_a_valid_address_unreachable_to_the_sender() {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[5] = 8;
        p[6] = 17;
        p[23] = 1;
        p[8] = 0xfd;
        p[24] = 0xfd;
        p[39] = 3;
        let mut out = [0u8; 1300];
        let len = answer(&p, &mut out).unwrap();
        let a = &out[..len];
        assert_eq!((a[40], a[41]), (1, 3));
        let upper = ((len - 40) as u32).to_be_bytes();
        assert_eq!(checksum(&[&a[8..40], &upper, &[0, 0, 0, 58], &a[40..]]), 0);
        let (s, d) = addresses(a).unwrap();
        assert_eq!(
            (s.to_string(), d.to_string()),
            ("fd00::3".into(), "fd00::1".into())
        );
        // Neighbour discovery to a multicast group gets nothing.
        p[24] = 0xff;
        assert_eq!(answer(&p, &mut out), None);
    }
}
