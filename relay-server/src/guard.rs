//! Defences against floods and guessing: bans for addresses that keep failing the agent
//! handshake, and a per-port rate limit on new user connections.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Window in which failed handshakes are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
}

/// Counts failed agent handshakes per source address and bans addresses that exceed the limit.
#[derive(Debug)]
pub struct AuthGuard {
    failures: DashMap<IpAddr, Failures>,
    limit: u32,
    ban: Duration,
}

impl AuthGuard {
    /// Bans an address for `ban` after `limit` failures within a minute.
    pub fn new(limit: u32, ban: Duration) -> Self {
        Self {
            failures: DashMap::new(),
            limit,
            ban,
        }
    }

    /// Whether `ip` is banned at `now`.
    pub fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        self.failures
            .get(&ip)
            .and_then(|f| f.banned_until)
            .is_some_and(|until| now < until)
    }

    /// Records a failure; returns the ban's length if this failure started one.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut entry = self.failures.entry(ip).or_insert(Failures {
            count: 0,
            window_start: now,
            banned_until: None,
        });
        if now.duration_since(entry.window_start) > FAILURE_WINDOW {
            entry.count = 0;
            entry.window_start = now;
        }
        entry.count += 1;
        if entry.count >= self.limit && entry.banned_until.is_none_or(|u| u <= now) {
            entry.banned_until = Some(now + self.ban);
            entry.count = 0;
            return Some(self.ban);
        }
        None
    }

    /// Forgets addresses whose window and ban are over, so the table cannot grow without bound.
    pub fn sweep(&self, now: Instant) {
        self.failures.retain(|_, f| {
            f.banned_until.is_some_and(|u| u > now)
                || now.duration_since(f.window_start) <= FAILURE_WINDOW
        });
    }
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if one is available at `now`.
    pub fn try_take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
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
    fn bans_after_limit_and_lifts_after_ban() {
        let g = AuthGuard::new(3, Duration::from_secs(10));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(g.record_failure(ip, t0), None);
        assert_eq!(g.record_failure(ip, t0), None);
        assert_eq!(g.record_failure(ip, t0), Some(Duration::from_secs(10)));
        assert!(g.is_banned(ip, t0 + Duration::from_secs(9)));
        assert!(!g.is_banned(ip, t0 + Duration::from_secs(11)));
        assert!(!g.is_banned("192.0.2.2".parse().unwrap(), t0));
        g.sweep(t0 + Duration::from_secs(200));
        assert!(g.failures.is_empty());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let g = AuthGuard::new(2, Duration::from_secs(10));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(g.record_failure(ip, t0), None);
        assert_eq!(g.record_failure(ip, t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, t0);
        assert!(b.try_take(1.0, 2.0, t0));
        assert!(b.try_take(1.0, 2.0, t0));
        assert!(!b.try_take(1.0, 2.0, t0));
        assert!(b.try_take(1.0, 2.0, t0 + Duration::from_millis(1100)));
    }
}
