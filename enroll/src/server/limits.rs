//! Limits per client: what one source is (an IPv4 address or an IPv6 /64), connection slots
//! per source, a token bucket per source, and refusal log lines at most once per source and
//! interval.

use komnet_proto::limit::{Bucket, Budget, Source};

use super::*;

/// What one client is, for limits (`komnet_proto::limit::Source`): an IPv4 address, or the
/// /64 of an IPv6 address; IPv4-mapped IPv6 is IPv4. Returned as the address that stands for it.
pub fn source_key(ip: IpAddr) -> IpAddr {
    Source::of(ip).ip()
}

/// Connections held per source, so one host cannot take every slot.
#[derive(Debug, Default)]
pub struct SourceConnections {
    held: Mutex<HashMap<Source, usize>>,
}

/// One held connection; dropping it gives the slot back.
#[derive(Debug)]
pub struct SourceSlot {
    table: Arc<SourceConnections>,
    key: Source,
}

impl SourceConnections {
    /// A slot for `ip`'s source, or `None` when it holds `max` already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let key = Source::of(ip);
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
        self.held.lock().get(&Source::of(ip)).copied().unwrap_or(0)
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
    seen: Mutex<HashMap<Source, (Instant, u64)>>,
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
        let key = Source::of(ip);
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

/// A token bucket per client (see [`source_key`]), komnet's one bucket
/// (`komnet_proto::limit::Budget`).
#[derive(Debug)]
pub struct RateLimiter {
    budget: Budget,
    /// Buckets count time from here.
    epoch: Instant,
    buckets: Mutex<HashMap<Source, Bucket>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> Self {
        RateLimiter {
            budget: Budget::rate(per_second, burst),
            epoch: Instant::now(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `ip` at `now`; false when the bucket is empty.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let now = now.saturating_duration_since(self.epoch);
        let budget = self.budget;
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Forget sources whose buckets have refilled: they are indistinguishable from new.
            buckets.retain(|_, bucket| !budget.is_full(bucket, now));
        }
        let bucket = buckets
            .entry(Source::of(ip))
            .or_insert_with(|| budget.full(now));
        budget.take(bucket, now)
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
