//! Reconnect delays: exponential, capped, with jitter so that a thousand agents cut off at the
//! same moment do not redial the relay in lockstep.

use std::time::Duration;

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
}
