//! Reconnect delays: exponential, capped, with jitter so that a thousand agents cut off at the
//! same moment do not redial the relay in lockstep.

use std::time::Duration;

/// First reconnect delay after an ordinary failure (refused, reset, timed out, session lost):
/// short, because most losses are a blip or a relay restart.
pub const RECONNECT_BASE: Duration = Duration::from_millis(500);
/// Longest delay between ordinary reconnect attempts.
pub const RECONNECT_CAP: Duration = Duration::from_secs(30);

/// First delay after a TLS failure before the relay proved its identity (certificate pin or CA
/// mismatch, an alert during the handshake). Such a failure is not proof that the relay is gone
/// or that the pin is wrong: a brief DNS spoof or an on-path box looks exactly the same, and
/// exiting would turn it into a permanent outage (systemd does not restart exit 77). But it is
/// suspicious, so the agent retries slowly: the real relay is back within a minute once the
/// interference ends, and an impostor, or a relay whose certificate really changed, sees at
/// most one attempt every few minutes.
pub const SUSPICIOUS_BASE: Duration = Duration::from_secs(30);
/// Longest delay between attempts while the relay's identity keeps failing verification.
pub const SUSPICIOUS_CAP: Duration = Duration::from_secs(300);

/// Exponential backoff with "equal jitter": each delay is between half and all of the capped
/// exponential value.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// Ordinary reconnects: [`RECONNECT_BASE`] doubling to [`RECONNECT_CAP`].
    pub fn reconnect() -> Self {
        Self::new(RECONNECT_BASE, RECONNECT_CAP)
    }

    /// Retries after the relay failed verification: [`SUSPICIOUS_BASE`] doubling to
    /// [`SUSPICIOUS_CAP`].
    pub fn suspicious() -> Self {
        Self::new(SUSPICIOUS_BASE, SUSPICIOUS_CAP)
    }

    /// The next delay; `unit` is a random number in [0, 1) supplied by the caller.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let full = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        full / 2 + full.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
    }

    /// Back to the first delay, after a connection that worked for a while.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let low: Vec<Duration> = (0..10).map(|_| b.next_delay(0.0)).collect();
        assert_eq!(low[0], Duration::from_millis(250));
        assert_eq!(low[1], Duration::from_millis(500));
        assert!(low.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*low.last().unwrap(), Duration::from_secs(15));
        assert_eq!(b.next_delay(0.999_999).as_secs(), 29);
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(500));
    }

    #[test]
    fn ordinary_schedule_is_a_quarter_second_to_thirty_seconds() {
        let mut b = Backoff::reconnect();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(250));
        let mut b = Backoff::reconnect();
        let last = (0..20).map(|_| b.next_delay(1.0)).last().unwrap();
        assert_eq!(last, Duration::from_secs(30));
    }

    #[test]
    fn suspicious_schedule_is_long_jittered_and_capped_at_five_minutes() {
        let mut b = Backoff::suspicious();
        let low: Vec<u64> = (0..8).map(|_| b.next_delay(0.0).as_secs()).collect();
        assert_eq!(low, [15, 30, 60, 120, 150, 150, 150, 150]);
        let mut b = Backoff::suspicious();
        let high: Vec<u64> = (0..8).map(|_| b.next_delay(1.0).as_secs()).collect();
        assert_eq!(high, [30, 60, 120, 240, 300, 300, 300, 300]);
        // Never faster than 15 s, whatever the jitter.
        let mut b = Backoff::suspicious();
        for i in 0..50 {
            let d = b.next_delay(f64::from(i) / 50.0);
            assert!(d >= Duration::from_secs(15) && d <= SUSPICIOUS_CAP, "{d:?}");
        }
        b.reset();
        assert_eq!(b.next_delay(1.0), SUSPICIOUS_BASE);
    }
}
