//! Defences against floods and guessing: bans for addresses that keep failing the agent
//! handshake (sparing addresses real agents come from), caps per source address, and a per-port
//! rate limit on new user connections.
//!
//! Bans, like the caps, count IPv6 sources per /64: one host can pick any of its /64's
//! addresses for each connection, so a ban of one address would ban nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Window in which failed handshakes are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Handshake timeouts one source may have within [`FAILURE_WINDOW`] before further ones count
/// towards its ban like failed handshakes. A timeout alone is not guessing (a flaky link, a NAT
/// of workers whose uplink stalls), so a few are forgiven; but idle connections are the cheapest
/// way to hold the handshake slots, and without this a handful of sources (IPv6 /64s, each
/// allowed its share of slots) could hold every slot for ever by reconnecting as each times
/// out. With it, a source that fills its share with idle connections is banned after one round
/// of timeouts (its share is far above this allowance plus `auth_failure_limit`).
pub const TIMEOUTS_FORGIVEN: u32 = 32;

/// How long an address that carried a successful agent handshake is spared from bans. Workers
/// behind one NAT share an address; garbage from one job there must not lock the others out.
/// Guessing a token from such an address stays hopeless (tokens are at least 16 random
/// characters), so the exemption costs nothing that a ban protected.
const TRUSTED_FOR: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// Handshake timeouts in the window (see [`TIMEOUTS_FORGIVEN`]).
    timeouts: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
    /// Until when a recent successful handshake spares this address from bans.
    trusted_until: Option<Instant>,
}

impl Failures {
    fn new(now: Instant) -> Self {
        Self {
            count: 0,
            timeouts: 0,
            window_start: now,
            banned_until: None,
            trusted_until: None,
        }
    }

    fn trusted(&self, now: Instant) -> bool {
        self.trusted_until.is_some_and(|until| now < until)
    }

    /// Starts a new counting window if the current one is over.
    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.window_start) > FAILURE_WINDOW {
            self.count = 0;
            self.timeouts = 0;
            self.window_start = now;
        }
    }
}

/// Counts failed agent handshakes per source address (IPv6: /64) and bans sources that exceed
/// the limit, except sources agents recently placed a session from.
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
            .get(&source_of(ip))
            .is_some_and(|f| !f.trusted(now) && f.banned_until.is_some_and(|until| now < until))
    }

    /// Records an agent that got a session placed (or a lane joined) from `ip`: its source is
    /// spared from bans for a while, and a ban it has is lifted. A valid credential alone is
    /// not enough (it may then be refused its name or lane).
    pub fn record_success(&self, ip: IpAddr, now: Instant) {
        let mut entry = self
            .failures
            .entry(source_of(ip))
            .or_insert(Failures::new(now));
        entry.trusted_until = Some(now + TRUSTED_FOR);
        entry.banned_until = None;
    }

    /// Records a failure; returns the ban's length if this failure started one.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut entry = self
            .failures
            .entry(source_of(ip))
            .or_insert(Failures::new(now));
        entry.roll(now);
        entry.count += 1;
        if entry.trusted(now) {
            return None;
        }
        if entry.count >= self.limit && entry.banned_until.is_none_or(|u| u <= now) {
            entry.banned_until = Some(now + self.ban);
            entry.count = 0;
            return Some(self.ban);
        }
        None
    }

    /// Records a handshake that timed out; past [`TIMEOUTS_FORGIVEN`] within the window it
    /// counts as a failure. Returns the ban's length if this started one.
    pub fn record_timeout(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        {
            let mut entry = self
                .failures
                .entry(source_of(ip))
                .or_insert(Failures::new(now));
            entry.roll(now);
            entry.timeouts = entry.timeouts.saturating_add(1);
            if entry.timeouts <= TIMEOUTS_FORGIVEN {
                return None;
            }
        }
        self.record_failure(ip, now)
    }

    /// Forgets addresses whose window and ban are over, so the table cannot grow without bound.
    pub fn sweep(&self, now: Instant) {
        self.failures.retain(|_, f| {
            f.banned_until.is_some_and(|u| u > now)
                || f.trusted(now)
                || now.duration_since(f.window_start) <= FAILURE_WINDOW
        });
    }
}

/// How many of something one source holds at a time (handshakes in progress, user connections
/// on a port), so that one address cannot take every slot of a shared cap. IPv6 sources count
/// per /64, the block one host or one customer usually has. The most a source may hold is given
/// with each take, so a reloaded limit applies at once.
///
/// A plain map under a mutex, not a `DashMap`: every allocated port has one of these, and an
/// empty `DashMap` allocates its shards up front (4 per CPU, each padded to 128 bytes: 1 KiB per
/// port on 2 CPUs, 8 KiB on 16), while an empty `HashMap` allocates nothing. A take or a give
/// back holds the lock for one map operation.
#[derive(Debug, Default)]
pub struct PerSource {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot held by a source; given back when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    owner: Arc<PerSource>,
    source: IpAddr,
}

impl PerSource {
    /// Takes a slot for `ip`, or `None` when its source already holds `max` (at least one is
    /// always allowed).
    pub fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let source = source_of(ip);
        let mut map = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.entry(source).or_insert(0);
        if *held >= max.max(1) {
            return None;
        }
        *held += 1;
        drop(map);
        Some(SourceSlot {
            owner: self.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = map.get_mut(&self.source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                map.remove(&self.source);
            }
        }
    }
}

/// The address a cap counts `ip` under: itself for IPv4 (also when mapped into IPv6), its /64
/// for IPv6.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
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
    fn an_address_agents_authenticate_from_is_never_banned() {
        let g = AuthGuard::new(2, Duration::from_secs(10));
        let nat: IpAddr = "192.0.2.9".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(g.record_failure(nat, t0), None);
        assert!(
            g.record_failure(nat, t0).is_some(),
            "banned before any success"
        );
        g.record_success(nat, t0);
        assert!(!g.is_banned(nat, t0), "a success lifts the ban");
        for _ in 0..10 {
            assert_eq!(g.record_failure(nat, t0), None);
        }
        assert!(!g.is_banned(nat, t0 + Duration::from_secs(1)));
        g.sweep(t0 + Duration::from_secs(600));
        assert!(!g.failures.is_empty(), "trust outlives the failure window");
        let later = t0 + TRUSTED_FOR + Duration::from_secs(1);
        g.record_failure(nat, later);
        assert!(g.record_failure(nat, later).is_some(), "trust ends");
    }

    #[test]
    fn per_source_slots_cap_each_source_and_come_back() {
        let cap = Arc::new(PerSource::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| cap.try_take(a, 2)).collect();
        assert_eq!(held.iter().filter(|s| s.is_some()).count(), 2);
        assert!(cap.try_take("192.0.2.2".parse().unwrap(), 2).is_some());
        // One IPv6 /64 is one source; the next /64 is another.
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let first = cap.try_take(v6("2001:db8:0:1::1"), 2);
        let second = cap.try_take(v6("2001:db8:0:1::ffff"), 2);
        assert!(first.is_some() && second.is_some());
        assert!(cap.try_take(v6("2001:db8:0:1:8000::1"), 2).is_none());
        assert!(cap.try_take(v6("2001:db8:0:2::1"), 2).is_some());
        assert!(
            cap.try_take(v6("::ffff:192.0.2.1"), 2).is_none(),
            "mapped IPv4 is the IPv4 source"
        );
        drop(held);
        drop((first, second));
        assert!(cap.try_take(a, 2).is_some());
        assert!(
            cap.held.lock().unwrap().is_empty(),
            "nothing held is remembered"
        );
    }

    #[test]
    fn timeouts_count_towards_a_ban_only_past_the_allowance() {
        let g = AuthGuard::new(3, Duration::from_secs(10));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..TIMEOUTS_FORGIVEN {
            assert_eq!(g.record_timeout(ip, t0), None);
        }
        assert!(!g.is_banned(ip, t0), "forgiven timeouts ban nobody");
        assert_eq!(g.record_timeout(ip, t0), None);
        assert_eq!(g.record_timeout(ip, t0), None);
        assert_eq!(g.record_timeout(ip, t0), Some(Duration::from_secs(10)));
        assert!(g.is_banned(ip, t0));
        // A new window forgives again; a placed session spares the source altogether.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(g.record_timeout(ip, later), None);
        let nat: IpAddr = "192.0.2.2".parse().unwrap();
        g.record_success(nat, t0);
        for _ in 0..3 * TIMEOUTS_FORGIVEN {
            assert_eq!(g.record_timeout(nat, t0), None);
        }
    }

    #[test]
    fn an_ipv6_source_is_banned_by_its_64() {
        let g = AuthGuard::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(g.record_failure(v6("2001:db8:0:1::1"), t0), None);
        assert!(g.record_failure(v6("2001:db8:0:1::2"), t0).is_some());
        assert!(g.is_banned(v6("2001:db8:0:1:ffff::9"), t0));
        assert!(!g.is_banned(v6("2001:db8:0:2::1"), t0));
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
