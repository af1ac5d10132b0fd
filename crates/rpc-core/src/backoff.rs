//! Exponential backoff with jitter, for reconnecting.
//!
//! Delay for attempt `n` (0-based) is drawn uniformly from `[d/2, d]` where
//! `d = min(max, base * 2^n)` ("equal jitter"): many clients that lost the same
//! server spread their retries out, and none retries in a tight loop.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0 = the first retry).
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << attempt.min(20)).min(self.max);
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(rng.random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    proptest! {
        #[test]
        fn delay_stays_within_jitter_band(attempt in 0u32..64, seed in any::<u64>()) {
            let backoff = Backoff::default();
            let mut rng = SmallRng::seed_from_u64(seed);
            let d = backoff.delay(attempt, &mut rng);
            let ceiling = (backoff.base * 2u32.pow(attempt.min(20))).min(backoff.max);
            prop_assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
        }
    }

    #[test]
    fn delays_grow_then_cap() {
        let backoff = Backoff::default();
        let mut rng = SmallRng::seed_from_u64(1);
        assert!(backoff.delay(0, &mut rng) <= Duration::from_millis(50));
        assert!(backoff.delay(30, &mut rng) >= Duration::from_millis(2500));
    }
}
