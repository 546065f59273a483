//! Handshake DoS protection: MAC1/MAC2 checks, cookie replies (WireGuard paper, section 5.4.7)
//! and a per-source handshake rate limit. boringtun's `RateLimiter` has only one global
//! counter, so one flooding source would push every honest peer into the cookie round trip;
//! here the global load switch and a token bucket per source address work together:
//!
//! 1. MAC1 must be valid (it proves the sender knows our public key), else drop.
//! 2. While the device is under load (more handshakes this second than `global_limit`), or
//!    while this source has used up its own bucket, a handshake needs a valid MAC2 (proof the
//!    sender can receive at its address); without it the source gets a cookie reply.
//! 3. A source still over its bucket with a valid MAC2 is dropped: a cookie proves the
//!    address, not that the sender is polite.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use blake2::digest::{FixedOutput, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

use crate::packet::{COOKIE_REPLY_LEN, MSG_COOKIE_REPLY};

const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";
/// The cookie secret changes every two minutes (paper, section 5.4.7).
const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);
/// Sources we keep a bucket for; past this the table is cleared, which only forgives.
const MAX_TRACKED_SOURCES: usize = 65_536;

/// How hard handshakes are limited. Defaults follow wireguard-go's per-source limiter
/// (20 per second, burst 5) and a global threshold of a few hundred per second, well under
/// the ~3,600 full handshakes per second one core manages.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    pub global_per_second: u32,
    pub per_source_per_second: u32,
    pub per_source_burst: u32,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            global_per_second: 500,
            per_source_per_second: 20,
            per_source_burst: 5,
        }
    }
}

/// What to do with a handshake message after the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accept,
    BadMac1,
    /// Send the cookie reply written into the output buffer, drop the message.
    SendCookie(usize),
    RateLimited,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Duration,
}

fn hash2(a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, a);
    Digest::update(&mut h, b);
    h.finalize().into()
}

fn mac16(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // Keys here are 16 or 32 bytes, both valid Blake2s keys.
    let mut m = match <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("blake2s key of {} bytes", key.len()),
    };
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// The responder side of the cookie mechanism plus the rate limits, for one static key.
pub struct CookieGuard {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    secret: [u8; 32],
    secret_born: Duration,
    limits: HandshakeLimits,
    window_start: Duration,
    window_count: u32,
    sources: HashMap<IpAddr, Bucket>,
}

impl std::fmt::Debug for CookieGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieGuard")
            .field("limits", &self.limits)
            .field("tracked_sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

impl CookieGuard {
    pub fn new(our_public: &[u8; 32], limits: HandshakeLimits, rng: &mut impl RngCore) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self {
            mac1_key: hash2(LABEL_MAC1, our_public),
            cookie_key: hash2(LABEL_COOKIE, our_public),
            secret,
            secret_born: Duration::ZERO,
            limits,
            window_start: Duration::ZERO,
            window_count: 0,
            sources: HashMap::new(),
        }
    }

    /// Checks a handshake initiation or response (`msg`, its MACs in the last 32 bytes) from
    /// `src` at core time `now`. A cookie reply, if due, is written to `out`.
    pub fn admit(
        &mut self,
        now: Duration,
        src: SocketAddr,
        msg: &[u8],
        sender_index: u32,
        rng: &mut impl RngCore,
        out: &mut [u8],
    ) -> Admission {
        let Some(split) = msg.len().checked_sub(32) else {
            return Admission::BadMac1;
        };
        let (body, macs) = msg.split_at(split);
        let (mac1, mac2) = macs.split_at(16);
        if !constant_time_eq(&mac16(&self.mac1_key, &[body]), mac1) {
            return Admission::BadMac1;
        }

        if now.saturating_sub(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.window_count = 0;
        }
        self.window_count = self.window_count.saturating_add(1);
        let under_load = self.window_count > self.limits.global_per_second;
        let source_has_tokens = self.take_token(now, src.ip());

        if !under_load && source_has_tokens {
            return Admission::Accept;
        }
        let cookie = self.cookie_for(now, src, rng);
        if !constant_time_eq(&mac16(&cookie, &[body, mac1]), mac2) {
            return match self.cookie_reply(sender_index, &cookie, mac1, rng, out) {
                Some(n) => Admission::SendCookie(n),
                None => Admission::RateLimited,
            };
        }
        if source_has_tokens {
            Admission::Accept
        } else {
            Admission::RateLimited
        }
    }

    fn take_token(&mut self, now: Duration, ip: IpAddr) -> bool {
        if self.sources.len() >= MAX_TRACKED_SOURCES && !self.sources.contains_key(&ip) {
            self.sources.clear();
        }
        let burst = f64::from(self.limits.per_source_burst.max(1));
        let rate = f64::from(self.limits.per_source_per_second);
        let b = self.sources.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_sub(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets buckets that have refilled completely, so the table tracks only active sources.
    pub fn expire_sources(&mut self, now: Duration) {
        let burst = f64::from(self.limits.per_source_burst.max(1));
        let rate = f64::from(self.limits.per_source_per_second.max(1));
        let full_after = Duration::from_secs_f64(burst / rate);
        self.sources
            .retain(|_, b| now.saturating_sub(b.last) < full_after);
    }

    fn cookie_for(&mut self, now: Duration, src: SocketAddr, rng: &mut impl RngCore) -> [u8; 16] {
        if now.saturating_sub(self.secret_born) >= COOKIE_SECRET_LIFETIME {
            rng.fill_bytes(&mut self.secret);
            self.secret_born = now;
        }
        let port = src.port().to_be_bytes();
        match src.ip() {
            IpAddr::V4(a) => mac16(&self.secret, &[&a.octets(), &port]),
            IpAddr::V6(a) => mac16(&self.secret, &[&a.octets(), &port]),
        }
    }

    fn cookie_reply(
        &self,
        receiver: u32,
        cookie: &[u8; 16],
        mac1: &[u8],
        rng: &mut impl RngCore,
        out: &mut [u8],
    ) -> Option<usize> {
        let out = out.get_mut(..COOKIE_REPLY_LEN)?;
        out[..4].copy_from_slice(&u32::from(MSG_COOKIE_REPLY).to_le_bytes());
        out[4..8].copy_from_slice(&receiver.to_le_bytes());
        rng.fill_bytes(&mut out[8..32]);
        let nonce = *XNonce::from_slice(&out[8..32]);
        out[32..48].copy_from_slice(cookie);
        let cipher = XChaCha20Poly1305::new(&self.cookie_key.into());
        let tag = cipher
            .encrypt_in_place_detached(&nonce, mac1, &mut out[32..48])
            .ok()?;
        out[48..64].copy_from_slice(&tag);
        Some(COOKIE_REPLY_LEN)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn signed_msg(guard: &CookieGuard, mac2_cookie: Option<[u8; 16]>) -> Vec<u8> {
        let mut msg = vec![1u8; 148];
        msg[1..4].fill(0);
        let mac1 = mac16(&guard.mac1_key, &[&msg[..116]]);
        msg[116..132].copy_from_slice(&mac1);
        let mac2 = mac2_cookie.map_or([0; 16], |c| mac16(&c, &[&msg[..132]]));
        msg[132..148].copy_from_slice(&mac2);
        msg
    }

    #[test]
    fn a_flooding_source_gets_cookies_while_others_pass() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut g = CookieGuard::new(&[9; 32], HandshakeLimits::default(), &mut rng);
        let flood: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let honest: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let msg = signed_msg(&g, None);
        let mut out = [0u8; 64];
        let t = Duration::from_secs(10);
        let verdicts: Vec<_> = (0..8)
            .map(|_| g.admit(t, flood, &msg, 1, &mut rng, &mut out))
            .collect();
        assert_eq!(verdicts[..5], [Admission::Accept; 5]);
        assert!(matches!(verdicts[5], Admission::SendCookie(64)));
        assert_eq!(
            g.admit(t, honest, &msg, 1, &mut rng, &mut out),
            Admission::Accept
        );

        // The flooder that echoes a valid cookie is still limited by its bucket...
        let cookie = g.cookie_for(t, flood, &mut rng);
        let with_cookie = signed_msg(&g, Some(cookie));
        assert_eq!(
            g.admit(t, flood, &with_cookie, 1, &mut rng, &mut out),
            Admission::RateLimited
        );
        // ...until its bucket refills.
        let later = t + Duration::from_secs(1);
        assert_eq!(
            g.admit(later, flood, &with_cookie, 1, &mut rng, &mut out),
            Admission::Accept
        );
    }

    #[test]
    fn bad_mac1_is_refused_before_anything_else() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut g = CookieGuard::new(&[9; 32], HandshakeLimits::default(), &mut rng);
        let mut msg = signed_msg(&g, None);
        msg[20] ^= 1;
        let src = "192.0.2.1:1".parse().unwrap();
        assert_eq!(
            g.admit(Duration::ZERO, src, &msg, 1, &mut rng, &mut [0; 64]),
            Admission::BadMac1
        );
    }

    #[test]
    fn under_global_load_everyone_needs_a_cookie() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let limits = HandshakeLimits {
            global_per_second: 3,
            ..Default::default()
        };
        let mut g = CookieGuard::new(&[9; 32], limits, &mut rng);
        let msg = signed_msg(&g, None);
        let mut out = [0u8; 64];
        for i in 0..3 {
            let src = SocketAddr::new(IpAddr::from([198, 51, 100, i]), 5);
            assert_eq!(
                g.admit(Duration::ZERO, src, &msg, 1, &mut rng, &mut out),
                Admission::Accept
            );
        }
        let src: SocketAddr = "198.51.100.9:5".parse().unwrap();
        assert!(matches!(
            g.admit(Duration::ZERO, src, &msg, 1, &mut rng, &mut out),
            Admission::SendCookie(_)
        ));
        let cookie = g.cookie_for(Duration::ZERO, src, &mut rng);
        let msg2 = signed_msg(&g, Some(cookie));
        assert_eq!(
            g.admit(Duration::ZERO, src, &msg2, 1, &mut rng, &mut out),
            Admission::Accept
        );
    }
}
