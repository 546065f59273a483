//! Handshake DoS protection: MAC1/MAC2 checks, cookie replies (WireGuard paper, section 5.4.7)
//! and budgets per source. Everyone holding one spoke's or laptop's configuration knows the
//! hub's public key and can send initiations with a valid MAC1 at line rate (issue 14); the
//! hub must keep admitting its legitimate peers meanwhile. So, per handshake message:
//!
//! 1. **Its source's budgets first**, keyed by IPv4 address or IPv6 /64 (one host cannot
//!    spread over its /64): a source with no budget left of any kind is dropped before any
//!    cryptography — no MAC, no cookie, no reply.
//! 2. MAC1 must be valid (it proves the sender knows our public key), else drop.
//! 3. A source within its **direct** budget (default 20/s, burst 5) is admitted — unless the
//!    device is under load (more admitted handshakes this second than `global_per_second`):
//!    then only a source that has been **quiet** (a legitimate peer sends one initiation per
//!    five seconds; default burst 2, one more per two seconds) is admitted directly. One
//!    flooding source stays within its own budget and never puts the device under load, so
//!    other peers see no difference; a flood spread over many sources puts the device under
//!    load, but every one of them spends its quiet tokens at once, while a peer that shows up
//!    still has its own.
//! 4. Otherwise it needs a valid MAC2 (a cookie proves the sender receives at its address);
//!    with one, its **proven** budget (20/s, burst 256) admits it.
//! 5. Without one it gets a cookie reply — within its **reply** budget (default 20/s, burst
//!    256), so a flooding source gets at most 20 replies a second after the burst, not one
//!    per packet.
//!
//! The large bursts of 4 and 5 are for many devices behind one address (a town hall's NAT, a
//! provider's carrier-grade NAT in front of home offices): after a hub restart they all send
//! their initiation within a second, from one address and each from its own port. A cookie is
//! bound to address *and* port, so each device needs its own reply; with a burst of 2 a NAT of
//! 200 devices waited ~57 s for its last handshake (each retry round, 5 s apart, let a dozen
//! through), wireguard-go ~5 s. A reply costs one XChaCha20-Poly1305 seal and is smaller than
//! the initiation that asked for it (64 vs 148 bytes: nothing to amplify); a proven sender
//! showed it receives at its address, so it cannot be a spoofed flood. The sustained rates
//! stay at 20/s: what one address costs the device is bounded as before.
//!
//! Only what is admitted reaches the Diffie-Hellman work. The table of sources is bounded:
//! sources whose budgets are full again are forgotten at the timer tick; when it is full, new
//! sources share one overflow entry (a flood over many /64s competes with itself there, and
//! sources already known keep their own budgets).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use blake2::digest::{FixedOutput, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use komnet_proto::limit::{self, Bucket, Budget};
use rand::RngCore;

use crate::packet::{COOKIE_REPLY_LEN, MSG_COOKIE_REPLY};

const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";
/// The cookie secret changes every two minutes (paper, section 5.4.7).
const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);

/// How hard handshakes are limited. The direct and proven budgets follow wireguard-go's
/// per-source limiter (20 per second, burst 5); the global threshold of a few hundred admitted
/// handshakes per second is well under the ~3,600 full handshakes per second one core manages.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// Admitted handshakes per second above which the device is under load.
    pub global_per_second: u32,
    /// Per source, admitted without a cookie while not under load; also the sustained rate of
    /// its proven budget (admitted with a valid cookie).
    pub per_source_per_second: u32,
    pub per_source_burst: u32,
    /// Per source, admitted with a valid cookie at once (the devices behind one NAT retrying
    /// together).
    pub proven_burst: u32,
    /// Per source, admitted without a cookie while under load: a quiet source's allowance.
    pub quiet_burst: u32,
    /// One more quiet admission per this interval.
    pub quiet_interval: Duration,
    /// Per source, cookie replies sent.
    pub replies_per_second: u32,
    pub reply_burst: u32,
    /// Sources tracked at once; more share one overflow entry.
    pub max_sources: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            global_per_second: 500,
            per_source_per_second: 20,
            per_source_burst: 5,
            proven_burst: 256,
            quiet_burst: 2,
            quiet_interval: Duration::from_secs(2),
            replies_per_second: 20,
            reply_burst: 256,
            max_sources: 65_536,
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
    /// Over its source's budgets: dropped (before any MAC check if nothing was left at all).
    RateLimited,
}

/// What the guard did, for tests and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardStats {
    /// MAC1 checks made (each a keyed BLAKE2s over the message).
    pub mac_checks: u64,
    /// Messages dropped by their source's budgets before any MAC check.
    pub dropped_before_mac: u64,
    pub cookie_replies: u64,
    /// Sources tracked now.
    pub sources: usize,
}

/// The budgets of one source.
#[derive(Debug, Clone, Copy)]
struct Source {
    direct: Bucket,
    quiet: Bucket,
    proven: Bucket,
    replies: Bucket,
}

/// A source's entry in the table: its own, or the one everyone the full table had no room for
/// shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    Source(limit::Source),
    Overflow,
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

/// The responder side of the cookie mechanism plus the budgets, for one static key.
pub struct CookieGuard {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    secret: [u8; 32],
    secret_born: Duration,
    limits: HandshakeLimits,
    direct: Budget,
    quiet: Budget,
    proven: Budget,
    replies: Budget,
    window_start: Duration,
    /// Handshakes admitted in the window that started at `window_start`.
    window_admitted: u32,
    /// Keyed with std's random SipHash keys: sources are chosen by the sender.
    sources: HashMap<SourceKey, Source>,
    stats: GuardStats,
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
            direct: Budget::per_second(
                limits.per_source_per_second,
                limits.per_source_burst.max(1),
            ),
            quiet: Budget::one_every(limits.quiet_interval, limits.quiet_burst),
            proven: Budget::per_second(limits.per_source_per_second, limits.proven_burst.max(1)),
            replies: Budget::per_second(limits.replies_per_second, limits.reply_burst),
            limits,
            window_start: Duration::ZERO,
            window_admitted: 0,
            sources: HashMap::new(),
            stats: GuardStats::default(),
        }
    }

    pub fn stats(&self) -> GuardStats {
        GuardStats {
            sources: self.sources.len(),
            ..self.stats
        }
    }

    fn fresh(&self, now: Duration) -> Source {
        Source {
            direct: self.direct.full(now),
            quiet: self.quiet.full(now),
            proven: self.proven.full(now),
            replies: self.replies.full(now),
        }
    }

    /// The key of `ip`'s entry: its own, or the shared overflow entry when the table is full
    /// and it has none.
    fn key_of(&self, ip: IpAddr) -> SourceKey {
        let key = SourceKey::Source(limit::Source::of(ip));
        if self.sources.len() >= self.limits.max_sources && !self.sources.contains_key(&key) {
            SourceKey::Overflow
        } else {
            key
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
        if now.saturating_sub(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.window_admitted = 0;
        }
        let under_load = self.window_admitted >= self.limits.global_per_second;

        // 1. Budgets before any cryptography: a source with nothing left is dropped here.
        let (direct, quiet, proven, replies) = (self.direct, self.quiet, self.proven, self.replies);
        let key = self.key_of(src.ip());
        let fresh = self.fresh(now);
        let source = *self.sources.entry(key).or_insert(fresh);
        let (body, macs) = msg.split_at(split);
        let (mac1, mac2) = macs.split_at(16);
        // A sender without a cookie leaves MAC2 zero; only a non-zero one can use the proven
        // budget (and costs the two MACs of checking it).
        let has_mac2 = mac2.iter().any(|b| *b != 0);
        let may_admit = if under_load {
            quiet.has(&source.quiet, now)
        } else {
            direct.has(&source.direct, now)
        };
        let may_prove = has_mac2 && proven.has(&source.proven, now);
        if !may_admit && !may_prove && !replies.has(&source.replies, now) {
            self.stats.dropped_before_mac += 1;
            return Admission::RateLimited;
        }

        // 2. MAC1.
        self.stats.mac_checks += 1;
        if !constant_time_eq(&mac16(&self.mac1_key, &[body]), mac1) {
            return Admission::BadMac1;
        }

        // 3. Admitted directly: within the direct budget, or the quiet one under load. Every
        //    admission spends a quiet token when there is one, so the quiet budget tells
        //    whether the source has been quiet.
        let Some(s) = self.sources.get_mut(&key) else {
            return Admission::RateLimited;
        };
        let direct_ok = if under_load {
            quiet.take(&mut s.quiet, now)
        } else {
            let ok = direct.take(&mut s.direct, now);
            if ok {
                quiet.take(&mut s.quiet, now);
            }
            ok
        };
        if direct_ok {
            self.window_admitted = self.window_admitted.saturating_add(1);
            return Admission::Accept;
        }

        // 4. With a valid MAC2: the proven budget.
        let cookie = self.cookie_for(now, src, rng);
        if may_prove && constant_time_eq(&mac16(&cookie, &[body, mac1]), mac2) {
            let Some(s) = self.sources.get_mut(&key) else {
                return Admission::RateLimited;
            };
            if proven.take(&mut s.proven, now) {
                self.window_admitted = self.window_admitted.saturating_add(1);
                return Admission::Accept;
            }
            return Admission::RateLimited;
        }

        // 5. A cookie reply, within the reply budget.
        let Some(s) = self.sources.get_mut(&key) else {
            return Admission::RateLimited;
        };
        if !replies.take(&mut s.replies, now) {
            return Admission::RateLimited;
        }
        match self.cookie_reply(sender_index, &cookie, mac1, rng, out) {
            Some(n) => {
                self.stats.cookie_replies += 1;
                Admission::SendCookie(n)
            }
            None => Admission::RateLimited,
        }
    }

    /// Forgets sources whose budgets are all full again, so the table tracks only active ones.
    pub fn expire_sources(&mut self, now: Duration) {
        let (direct, quiet, proven, replies) = (self.direct, self.quiet, self.proven, self.replies);
        self.sources.retain(|_, s| {
            !(direct.is_full(&s.direct, now)
                && quiet.is_full(&s.quiet, now)
                && proven.is_full(&s.proven, now)
                && replies.is_full(&s.replies, now))
        });
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

        // The flooder that echoes a valid cookie has its proven budget, and is then limited...
        let cookie = g.cookie_for(t, flood, &mut rng);
        let with_cookie = signed_msg(&g, Some(cookie));
        for _ in 0..HandshakeLimits::default().proven_burst {
            assert_eq!(
                g.admit(t, flood, &with_cookie, 1, &mut rng, &mut out),
                Admission::Accept
            );
        }
        // (a cookie reply costs no Diffie-Hellman)...
        assert_ne!(
            g.admit(t, flood, &with_cookie, 1, &mut rng, &mut out),
            Admission::Accept
        );
        // ...until its bucket refills.
        let later = t + Duration::from_secs(1);
        assert_eq!(
            g.admit(later, flood, &with_cookie, 1, &mut rng, &mut out),
            Admission::Accept
        );
    }

    // ---- issue 14: floods -------------------------------------------------------------

    fn flood_from(
        g: &mut CookieGuard,
        rng: &mut rand::rngs::StdRng,
        msg: &[u8],
        sources: &[SocketAddr],
        per_source: usize,
        t: Duration,
    ) -> Vec<Admission> {
        let mut out = [0u8; 64];
        let mut verdicts = Vec::new();
        for _ in 0..per_source {
            for src in sources {
                verdicts.push(g.admit(t, *src, msg, 1, rng, &mut out));
            }
        }
        verdicts
    }

    #[test]
    fn a_flooding_source_gets_a_few_cookie_replies_a_second_not_one_per_packet() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut g = CookieGuard::new(&[9; 32], HandshakeLimits::default(), &mut rng);
        let msg = signed_msg(&g, None);
        let flood: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let mut replies = 0;
        let mut admitted = 0;
        // 20,000 valid-MAC1 initiations in each of 10 seconds.
        for second in 0..10u64 {
            for i in 0..20_000u64 {
                let t = Duration::from_secs(10 + second) + Duration::from_micros(i * 50);
                match flood_from(&mut g, &mut rng, &msg, &[flood], 1, t)[0] {
                    Admission::SendCookie(_) => replies += 1,
                    Admission::Accept => admitted += 1,
                    _ => {}
                }
            }
        }
        let limits = HandshakeLimits::default();
        let most = limits.reply_burst + limits.replies_per_second * 10;
        assert!(replies <= most, "{replies} cookie replies in 10 s");
        assert!(admitted <= 5 + 20 * 10, "{admitted} admitted in 10 s");
    }

    #[test]
    fn packets_over_every_budget_are_dropped_before_any_mac() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut g = CookieGuard::new(&[9; 32], HandshakeLimits::default(), &mut rng);
        let msg = signed_msg(&g, None);
        let flood: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        flood_from(
            &mut g,
            &mut rng,
            &msg,
            &[flood],
            10_000,
            Duration::from_secs(10),
        );
        let stats = g.stats();
        // Five admitted, then cookie replies while the reply burst lasts; the rest cost a
        // table lookup.
        let replies = u64::from(HandshakeLimits::default().reply_burst);
        assert_eq!(stats.mac_checks, 5 + replies, "{stats:?}");
        assert_eq!(stats.cookie_replies, replies, "{stats:?}");
        assert_eq!(stats.dropped_before_mac, 10_000 - 5 - replies, "{stats:?}");
        // A forged MAC2 (no cookie was given) is checked, but admits nothing.
        let mut junk = msg.clone();
        junk[140] = 1;
        let mut out = [0u8; 64];
        assert_eq!(
            g.admit(Duration::from_secs(10), flood, &junk, 1, &mut rng, &mut out),
            Admission::RateLimited
        );
    }

    #[test]
    fn the_source_table_is_bounded_and_known_sources_keep_their_budgets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let limits = HandshakeLimits {
            max_sources: 100,
            ..Default::default()
        };
        let mut g = CookieGuard::new(&[9; 32], limits, &mut rng);
        let msg = signed_msg(&g, None);
        let t = Duration::from_secs(10);
        // A known source has used its budgets (direct, then cookie replies).
        let known: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let all = (limits.per_source_burst + limits.reply_burst) as usize;
        flood_from(&mut g, &mut rng, &msg, &[known], all, t);
        // A flood over 10,000 /64s fills the table and then shares the overflow entry.
        let many: Vec<SocketAddr> = (0..10_000u16)
            .map(|i| SocketAddr::new(IpAddr::from([0x2001, 0xdb8, i, 0, 0, 0, 0, 1]), 9))
            .collect();
        let verdicts = flood_from(&mut g, &mut rng, &msg, &many, 1, t);
        assert!(g.stats().sources <= 101, "{:?}", g.stats());
        let admitted = verdicts.iter().filter(|v| **v == Admission::Accept).count();
        assert!(admitted <= 100 * 5 + 5, "{admitted} admitted");
        // The known source was not forgotten (its budget did not come back with the flood).
        let mut out = [0u8; 64];
        assert_eq!(
            g.admit(t, known, &msg, 1, &mut rng, &mut out),
            Admission::RateLimited
        );
        // Idle sources are forgotten once their budgets are full again.
        g.expire_sources(t + Duration::from_secs(60));
        assert_eq!(g.stats().sources, 0);
    }

    #[test]
    fn a_quiet_source_is_admitted_directly_while_a_thousand_sources_flood() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut g = CookieGuard::new(&[9; 32], HandshakeLimits::default(), &mut rng);
        let msg = signed_msg(&g, None);
        // 1,000 spoofed sources in one /24 (addresses and ports), 20 initiations each.
        let sources: Vec<SocketAddr> = (0..1000u32)
            .map(|i| SocketAddr::from(([198, 51, 100, (i % 250) as u8 + 1], 1000 + i as u16)))
            .collect();
        let t = Duration::from_secs(10);
        let verdicts = flood_from(&mut g, &mut rng, &msg, &sources, 20, t);
        let admitted = verdicts.iter().filter(|v| **v == Admission::Accept).count();
        // The device went under load and kept the Diffie-Hellman work bounded...
        assert!(admitted <= 500 + 250 * 2, "{admitted} admitted");
        // ...and a peer showing up from another address is admitted at once, without the
        // cookie round trip (which would cost it REKEY_TIMEOUT, 5 s).
        let honest: SocketAddr = "203.0.113.7:51820".parse().unwrap();
        let mut out = [0u8; 64];
        assert_eq!(
            g.admit(t, honest, &msg, 1, &mut rng, &mut out),
            Admission::Accept
        );
    }

    #[test]
    fn two_hundred_devices_behind_one_nat_all_handshake_in_their_second_attempt() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut g = CookieGuard::new(&[9; 32], HandshakeLimits::default(), &mut rng);
        let plain = signed_msg(&g, None);
        // One public address, each device behind it on its own port (a hub restart: all of
        // them initiate within the same instant).
        let devices: Vec<SocketAddr> = (0..200u16)
            .map(|i| SocketAddr::from(([192, 0, 2, 1], 40_000 + i)))
            .collect();
        let t = Duration::from_secs(10);
        let mut out = [0u8; 64];
        let mut waiting = Vec::new();
        for d in &devices {
            match g.admit(t, *d, &plain, 1, &mut rng, &mut out) {
                Admission::Accept => {}
                Admission::SendCookie(_) => waiting.push(*d),
                other => panic!("{d} got {other:?} in its first attempt"),
            }
        }
        assert_eq!(
            waiting.len(),
            200 - 5,
            "five admitted directly, the rest get a cookie"
        );
        // REKEY_TIMEOUT later each retries, echoing its own cookie: all are admitted.
        let retry = t + Duration::from_secs(5);
        for d in waiting {
            let cookie = g.cookie_for(retry, d, &mut rng);
            let msg = signed_msg(&g, Some(cookie));
            assert_eq!(
                g.admit(retry, d, &msg, 1, &mut rng, &mut out),
                Admission::Accept,
                "{d} in its second attempt"
            );
        }
    }

    #[test]
    fn a_source_with_a_valid_cookie_is_held_to_twenty_a_second_after_its_burst() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let limits = HandshakeLimits::default();
        let mut g = CookieGuard::new(&[9; 32], limits, &mut rng);
        let flood: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let mut out = [0u8; 64];
        let mut admitted = 0u32;
        // 10,000 initiations a second for 10 s, each with a valid cookie.
        for second in 0..10u64 {
            for i in 0..10_000u64 {
                let t = Duration::from_secs(10 + second) + Duration::from_micros(i * 100);
                let cookie = g.cookie_for(t, flood, &mut rng);
                let msg = signed_msg(&g, Some(cookie));
                if g.admit(t, flood, &msg, 1, &mut rng, &mut out) == Admission::Accept {
                    admitted += 1;
                }
            }
        }
        // Direct and proven budgets: each its burst plus 20/s.
        let most =
            limits.per_source_burst + limits.proven_burst + 2 * limits.per_source_per_second * 10;
        assert!(
            admitted <= most,
            "{admitted} admitted in 10 s (at most {most})"
        );
    }

    #[test]
    fn ipv6_sources_share_their_64s_budget() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let mut g = CookieGuard::new(&[9; 32], HandshakeLimits::default(), &mut rng);
        let msg = signed_msg(&g, None);
        // One host walking through the addresses of its /64.
        let sources: Vec<SocketAddr> = (1..=200u16)
            .map(|i| SocketAddr::new(IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i]), 4000))
            .collect();
        let t = Duration::from_secs(10);
        let verdicts = flood_from(&mut g, &mut rng, &msg, &sources, 1, t);
        let admitted = verdicts.iter().filter(|v| **v == Admission::Accept).count();
        assert_eq!(admitted, 5, "the /64 is one source");
        // Its neighbour /64 is another source.
        let next: SocketAddr = "[2001:db8:0:2::1]:4000".parse().unwrap();
        let mut out = [0u8; 64];
        assert_eq!(
            g.admit(t, next, &msg, 1, &mut rng, &mut out),
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
    fn under_global_load_a_source_without_quiet_budget_needs_a_cookie() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let limits = HandshakeLimits {
            global_per_second: 3,
            quiet_burst: 0,
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
