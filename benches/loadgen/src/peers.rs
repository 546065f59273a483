//! The peers file the generator and the benchmark share, the inner packets it sends, and when
//! a peer that got no answer tries again. Pure logic, tested here.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// WireGuard's REKEY_TIMEOUT: an initiation that got no answer is sent again after this (plus
/// up to [`REKEY_JITTER`]), as every WireGuard implementation does.
pub(crate) const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const REKEY_JITTER: Duration = Duration::from_millis(333);

/// One line of the peers file: `PRIVATE_KEY PUBLIC_KEY TUNNEL_ADDRESS`, keys in base64, the
/// address the enrollment service gave the device (IPv4, its host address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerLine {
    pub(crate) private: [u8; 32],
    pub(crate) public: [u8; 32],
    pub(crate) addr: Ipv4Addr,
}

fn key(text: &str, what: &str, line: usize) -> Result<[u8; 32]> {
    let bytes = B64
        .decode(text)
        .with_context(|| format!("line {line}: {what} is not base64"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("line {line}: {what} is not 32 bytes"))
}

impl PeerLine {
    pub(crate) fn render(&self) -> String {
        format!(
            "{} {} {}",
            B64.encode(self.private),
            B64.encode(self.public),
            self.addr
        )
    }
}

/// Parses a peers file; every line must be complete and every key must belong to its private
/// key (a file mixed up from two runs would otherwise make peers the hub never answers).
pub(crate) fn parse_peers(text: &str) -> Result<Vec<PeerLine>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [private, public, addr] = fields[..] else {
            bail!(
                "line {n}: expected `PRIVATE PUBLIC ADDRESS`, found {} fields",
                fields.len()
            );
        };
        let private = key(private, "the private key", n)?;
        let public = key(public, "the public key", n)?;
        let derived =
            boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(private));
        if derived.as_bytes() != &public {
            bail!("line {n}: the public key does not belong to the private key");
        }
        let addr = addr
            .split('/')
            .next()
            .unwrap_or(addr)
            .parse()
            .with_context(|| format!("line {n}: {addr:?} is not an IPv4 address"))?;
        out.push(PeerLine {
            private,
            public,
            addr,
        });
    }
    Ok(out)
}

/// An IPv4/UDP packet of `len` bytes in all (at least 28) from `src` to `dst:port`, source
/// port `sport`, with a correct header checksum and no UDP checksum (allowed for IPv4).
pub(crate) fn udp_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    len: usize,
) -> Vec<u8> {
    let len = len.clamp(28, usize::from(u16::MAX));
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    p
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// When a peer whose initiation went out at `sent` (since the run's start) sends the next one,
/// `jitter` in 0..=1 chosen per try.
pub(crate) fn next_try(sent: Duration, jitter: f64) -> Duration {
    sent + REKEY_TIMEOUT + REKEY_JITTER.mul_f64(jitter.clamp(0.0, 1.0))
}

/// The `i`-th address after `base` (IPv4: the host part counts up; IPv6: the low bits).
pub(crate) fn nth_address(base: std::net::IpAddr, i: usize) -> std::net::IpAddr {
    match base {
        std::net::IpAddr::V4(a) => Ipv4Addr::from(u32::from(a).wrapping_add(i as u32)).into(),
        std::net::IpAddr::V6(a) => {
            std::net::Ipv6Addr::from(u128::from(a).wrapping_add(i as u128)).into()
        }
    }
}

/// The p-th percentile (0..=100) of sorted `values`, nearest rank.
pub(crate) fn percentile(sorted: &[Duration], p: u32) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (u64::from(p.min(100)) * sorted.len() as u64).div_ceil(100) as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seed: u8, addr: &str) -> PeerLine {
        let private = [seed; 32];
        let public =
            *boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(private))
                .as_bytes();
        PeerLine {
            private,
            public,
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn a_peers_file_round_trips_and_refuses_mismatched_keys() {
        let a = line(1, "10.200.0.1");
        let b = line(2, "10.201.0.7");
        let text = format!("# comment\n{}\n\n{}/32\n", a.render(), b.render());
        assert_eq!(parse_peers(&text).unwrap(), vec![a.clone(), b.clone()]);
        let mixed = format!(
            "{} {} {}",
            B64.encode(a.private),
            B64.encode(b.public),
            a.addr
        );
        let err = parse_peers(&mixed).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("does not belong"),
            "{err}"
        );
        let err = parse_peers("abc def").unwrap_err().to_string();
        assert!(err.contains("2 fields"), "{err}");
    }

    #[test]
    fn udp_packets_carry_a_valid_ipv4_header() {
        let p = udp_packet(
            "10.200.0.1".parse().unwrap(),
            "10.0.1.10".parse().unwrap(),
            4000,
            9000,
            1400,
        );
        assert_eq!(p.len(), 1400);
        // A correct header sums to 0xffff, i.e. its checksum over itself is zero.
        assert_eq!(ipv4_checksum(&p[..20]), 0);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 1380);
        assert_eq!(&p[16..20], &[10, 0, 1, 10]);
        assert_eq!(
            udp_packet(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, 2, 3).len(),
            28
        );
    }

    #[test]
    fn retries_follow_rekey_timeout_and_percentiles_take_the_nearest_rank() {
        let s = Duration::from_secs(1);
        assert_eq!(next_try(s, 0.0), s + REKEY_TIMEOUT);
        assert_eq!(next_try(s, 7.0), s + REKEY_TIMEOUT + REKEY_JITTER);
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&v, 99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&v, 100), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&v, 0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50), None);
        let base: std::net::IpAddr = "10.236.0.1".parse().unwrap();
        assert_eq!(nth_address(base, 0), base);
        assert_eq!(nth_address(base, 300).to_string(), "10.236.1.45");
    }
}
