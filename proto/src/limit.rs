//! Rate limits: what one source is ([`Source`]: an IPv4 address, or an IPv6 /64) and the one
//! token bucket every komnet limit uses ([`Budget`] and [`Bucket`]) — the enrollment service's
//! requests per source and the gateway's handshake budgets per source.
//!
//! Sans-IO: time is a [`Duration`] since any fixed instant the caller picks, passed in; tokens
//! are integers refilled exactly (no floating point, no rounding lost per call), so the same
//! calls give the same answers.
//!
//! ```
//! use std::time::Duration;
//! use komnet_proto::limit::Budget;
//! let budget = Budget::per_second(2, 3); // 2 tokens a second, at most 3 saved up
//! let mut bucket = budget.full(Duration::ZERO);
//! assert!((0..3).all(|_| budget.take(&mut bucket, Duration::ZERO)));
//! assert!(!budget.take(&mut bucket, Duration::ZERO));
//! assert!(budget.take(&mut bucket, Duration::from_millis(500))); // one more after 0.5 s
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// What one client is for a limit: an IPv4 address, or the /64 of an IPv6 address (one host
/// holds a whole /64 and picks addresses from it at will). IPv4-mapped IPv6 is IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    V4(u32),
    /// The upper 64 bits of the address.
    V6(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Source::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(a) >> 64) as u64),
            },
        }
    }

    /// The address that stands for the source: the IPv4 address, or the /64's first address.
    pub fn ip(&self) -> IpAddr {
        match *self {
            Source::V4(a) => IpAddr::V4(Ipv4Addr::from(a)),
            Source::V6(prefix) => IpAddr::V6(Ipv6Addr::from(u128::from(prefix) << 64)),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(_) => write!(f, "{}", self.ip()),
            Source::V6(_) => write!(f, "{}/64", self.ip()),
        }
    }
}

/// Rates are kept in millionths of a token per second (so `0.5` is exact).
const RATE_UNIT: u128 = 1_000_000;
/// One token in a bucket: the tokens a rate of one millionth of a token per second gains in a
/// nanosecond is 1, so refilling is one exact multiplication, with nothing lost to rounding
/// however often a bucket is looked at.
const TOKEN: u128 = RATE_UNIT * 1_000_000_000;

/// Rate and capacity of a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Millionths of a token gained per second.
    rate: u128,
    /// Capacity, in [`TOKEN`]s.
    burst: u128,
}

/// A bucket's state: the tokens in it when it was last looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// In [`TOKEN`]s.
    tokens: u128,
    last: Duration,
}

impl Budget {
    /// `tokens` a second, at most `burst` saved up.
    pub const fn per_second(tokens: u32, burst: u32) -> Self {
        Budget {
            rate: tokens as u128 * RATE_UNIT,
            burst: burst as u128 * TOKEN,
        }
    }

    /// A rate that need not be whole (`0.5`: one token every two seconds), to a millionth of a
    /// token a second; a negative or non-finite rate is none.
    pub fn rate(tokens_per_second: f64, burst: u32) -> Self {
        let rate = (tokens_per_second * RATE_UNIT as f64).round();
        Budget {
            // `as` saturates: a huge rate is the largest one.
            rate: if rate > 0.0 { rate as u128 } else { 0 },
            burst: u128::from(burst) * TOKEN,
        }
    }

    /// One token every `interval` (at least a millisecond), at most `burst` saved up.
    pub fn one_every(interval: Duration, burst: u32) -> Self {
        let nanos = interval.as_nanos().max(1_000_000);
        Budget {
            rate: RATE_UNIT * 1_000_000_000 / nanos,
            burst: u128::from(burst) * TOKEN,
        }
    }

    /// A bucket that starts full at `now`.
    pub fn full(&self, now: Duration) -> Bucket {
        Bucket {
            tokens: self.burst,
            last: now,
        }
    }

    fn refill(&self, b: &mut Bucket, now: Duration) {
        let elapsed = now.saturating_sub(b.last).as_nanos();
        let gained = elapsed.saturating_mul(self.rate);
        b.tokens = b.tokens.saturating_add(gained).min(self.burst);
        // Time that does not go forward (a caller's clock stepping back) gains nothing and
        // does not move the bucket's clock back either.
        b.last = b.last.max(now);
    }

    /// Whether a token could be taken at `now`, without taking it.
    pub fn has(&self, b: &Bucket, now: Duration) -> bool {
        let mut copy = *b;
        self.refill(&mut copy, now);
        copy.tokens >= TOKEN
    }

    /// Takes a token at `now`; false when there is none.
    pub fn take(&self, b: &mut Bucket, now: Duration) -> bool {
        self.refill(b, now);
        if b.tokens >= TOKEN {
            b.tokens -= TOKEN;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has filled up again at `now`: it is then the same as a new one, and a
    /// table of buckets may forget it.
    pub fn is_full(&self, b: &Bucket, now: Duration) -> bool {
        let mut copy = *b;
        self.refill(&mut copy, now);
        copy.tokens >= self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let of = |s: &str| Source::of(s.parse().unwrap_or_else(|_| panic!("{s}")));
        assert_eq!(of("192.0.2.7").to_string(), "192.0.2.7");
        assert_eq!(
            of("2001:db8:1:2:aaaa:bbbb:cccc:dddd").to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(of("2001:db8:1:2::1"), of("2001:db8:1:2:ffff::9"));
        assert_ne!(of("2001:db8:1:2::1"), of("2001:db8:1:3::1"));
        assert_eq!(of("::ffff:192.0.2.7"), of("192.0.2.7"));
        assert_eq!(of("2001:db8:1:2::7").ip().to_string(), "2001:db8:1:2::");
    }

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let budget = Budget::per_second(10, 3);
        let mut b = budget.full(ms(0));
        assert!(budget.is_full(&b, ms(0)));
        assert_eq!((0..5).filter(|_| budget.take(&mut b, ms(0))).count(), 3);
        assert!(!budget.has(&b, ms(99)), "a token every 100 ms");
        assert!(budget.has(&b, ms(100)));
        assert!(
            !budget.has(&b, ms(0)),
            "has() takes nothing and does not refill"
        );
        assert!(budget.take(&mut b, ms(100)));
        assert!(!budget.take(&mut b, ms(150)));
        // Never more than the burst, however long the pause.
        assert!(budget.is_full(&b, Duration::from_secs(3600)));
        assert_eq!(
            (0..5)
                .filter(|_| budget.take(&mut b, Duration::from_secs(3600)))
                .count(),
            3
        );
    }

    #[test]
    fn fractional_and_interval_rates() {
        let half = Budget::rate(0.5, 1);
        let mut b = half.full(ms(0));
        assert!(half.take(&mut b, ms(0)));
        assert!(!half.take(&mut b, ms(1999)));
        assert!(half.take(&mut b, ms(2000)));
        let every = Budget::one_every(Duration::from_secs(2), 1);
        let mut b = every.full(ms(0));
        assert!(every.take(&mut b, ms(0)));
        assert!(!every.has(&b, ms(1999)));
        assert!(every.has(&b, ms(2000)));
        // A rate of nothing never refills; nonsense rates are nothing.
        for none in [
            Budget::rate(0.0, 2),
            Budget::rate(-1.0, 2),
            Budget::rate(f64::NAN, 2),
        ] {
            let mut b = none.full(ms(0));
            assert!(none.take(&mut b, ms(0)) && none.take(&mut b, ms(0)));
            assert!(!none.take(&mut b, Duration::from_secs(1_000_000)));
        }
    }

    #[test]
    fn time_going_back_gains_nothing() {
        let budget = Budget::per_second(1, 1);
        let mut b = budget.full(Duration::from_secs(10));
        assert!(budget.take(&mut b, Duration::from_secs(10)));
        assert!(!budget.take(&mut b, Duration::from_secs(5)));
        assert!(!budget.take(&mut b, ms(10_999)), "the clock stayed at 10 s");
        assert!(budget.take(&mut b, Duration::from_secs(11)));
    }

    #[test]
    fn huge_rates_and_times_do_not_overflow() {
        let budget = Budget::rate(1e30, u32::MAX);
        let mut b = budget.full(Duration::ZERO);
        assert!(budget.take(&mut b, Duration::ZERO));
        assert!(!budget.is_full(&b, Duration::ZERO));
        assert!(budget.is_full(&b, Duration::MAX));
        assert!(budget.take(&mut b, Duration::MAX));
    }
}
