//! Limits per client: what one source is (an IPv4 address or an IPv6 /64), connection slots
//! per source, a token bucket per source, and refusal log lines at most once per source and
//! interval.

use super::*;

/// What one client is, for limits: an IPv4 address, or the /64 of an IPv6 address (one host
/// holds a whole /64 and picks addresses from it at will). IPv4-mapped IPv6 is IPv4.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
    }
}

/// Connections held per source, so one host cannot take every slot.
#[derive(Debug, Default)]
pub struct SourceConnections {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One held connection; dropping it gives the slot back.
#[derive(Debug)]
pub struct SourceSlot {
    table: Arc<SourceConnections>,
    key: IpAddr,
}

impl SourceConnections {
    /// A slot for `ip`'s source, or `None` when it holds `max` already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut held = self.held.lock();
        let n = held.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: self.clone(),
            key,
        })
    }

    pub fn held(&self, ip: IpAddr) -> usize {
        self.held.lock().get(&source_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.table.held.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Log lines about refused requests and connections, at most one per source and interval:
/// a flood must not flood the journal. The line after a quiet interval says how many were
/// left out.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

impl RefusalLog {
    pub fn new(interval: Duration) -> Self {
        RefusalLog {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(left_out)` when a line for `ip` may be written now (with the number of refusals
    /// since the last line that were not logged), `None` when it is to be left out.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let key = source_key(ip);
        let mut seen = self.seen.lock();
        if seen.len() > 100_000 {
            let interval = self.interval;
            seen.retain(|_, (at, _)| now.duration_since(*at) < interval);
        }
        match seen.get_mut(&key) {
            Some((at, left_out)) if now.duration_since(*at) < self.interval => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                let n = *left_out;
                *at = now;
                *left_out = 0;
                Some(n)
            }
            None => {
                seen.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// A token bucket per client (see [`source_key`]).
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> Self {
        RateLimiter {
            per_second,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `ip` at `now`; false when the bucket is empty.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Forget sources whose buckets have refilled: they are indistinguishable from new.
            let full = self.burst / self.per_second;
            buckets.retain(|_, (_, last)| now.duration_since(*last).as_secs_f64() < full);
        }
        let (tokens, last) = buckets.entry(source_key(ip)).or_insert((self.burst, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let key = |s: &str| source_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
    }

    #[test]
    fn a_rate_limit_counts_a_whole_ipv6_64() {
        let limiter = RateLimiter::new(0.001, 3);
        let now = Instant::now();
        for host in 1..=3 {
            let ip: IpAddr = format!("2001:db8::{host}").parse().unwrap();
            assert!(limiter.allow(ip, now));
        }
        assert!(!limiter.allow("2001:db8::99".parse().unwrap(), now));
        assert!(limiter.allow("2001:db8:0:1::1".parse().unwrap(), now));
    }

    #[test]
    fn refusals_are_logged_once_per_source_and_interval_with_a_count() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(log.admit(ip, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.admit(ip, t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(log.admit("192.0.2.8".parse().unwrap(), t0), Some(0));
        assert_eq!(log.admit(ip, t0 + Duration::from_secs(11)), Some(5));
        assert_eq!(log.admit(ip, t0 + Duration::from_secs(12)), None);
    }

    #[test]
    fn connection_slots_per_source_come_back() {
        let table = Arc::new(SourceConnections::default());
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let a = table.take(ip, 2).unwrap();
        let _b = table.take("2001:db8::2".parse().unwrap(), 2).unwrap();
        assert!(table.take(ip, 2).is_none(), "one /64 is one source");
        drop(a);
        assert_eq!(table.held(ip), 1);
        assert!(table.take(ip, 2).is_some());
    }
}
