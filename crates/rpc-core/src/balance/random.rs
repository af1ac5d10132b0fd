//! Weighted random: each provider gets calls in proportion to its
//! (warmed-up) weight; uniform when the weights are equal.

use super::{Candidate, LoadBalance, PickContext, SharedRng, effective_weight, weighted_choice};

#[derive(Debug)]
pub struct Random {
    rng: SharedRng,
}

impl Random {
    pub fn new() -> Random {
        Random {
            rng: SharedRng::from_os(),
        }
    }

    /// Reproducible picks (tests).
    pub fn seeded(seed: u64) -> Random {
        Random {
            rng: SharedRng::seeded(seed),
        }
    }
}

impl Default for Random {
    fn default() -> Random {
        Random::new()
    }
}

impl LoadBalance for Random {
    fn pick(&self, candidates: &[Candidate<'_>], ctx: &PickContext<'_>) -> usize {
        let indices: Vec<usize> = (0..candidates.len()).collect();
        let weights: Vec<f64> = candidates.iter().map(|c| effective_weight(c, ctx)).collect();
        let [unit] = self.rng.units();
        weighted_choice(&indices, &weights, unit)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{DEFAULT_WARMUP, PickContext};
    use super::*;

    #[test]
    fn shares_follow_weights() {
        let loads = loads(4);
        let weights = [100, 200, 300, 400];
        let shares = shares(&Random::seeded(7), &candidates(&weights, &loads), 100_000);
        assert_shares(&shares, &weights, 0.02);
    }

    #[test]
    fn equal_weights_are_uniform() {
        let loads = loads(5);
        let weights = [100; 5];
        let shares = shares(&Random::seeded(8), &candidates(&weights, &loads), 100_000);
        assert_shares(&shares, &weights, 0.02);
    }

    #[test]
    fn warming_provider_gets_its_ramped_share() {
        let loads = loads(2);
        let mut list = candidates(&[100, 100], &loads);
        let now_ms = 10_000_000;
        list[1].start_time_ms = now_ms - 150_000; // a quarter into a 10 min warm-up
        let ctx = PickContext {
            now_ms,
            warmup: DEFAULT_WARMUP,
            ..PickContext::default()
        };
        let random = Random::seeded(9);
        let mut warm = 0;
        for _ in 0..100_000 {
            warm += usize::from(random.pick(&list, &ctx) == 1);
        }
        let share = warm as f64 / 100_000.0;
        assert!((share - 25.0 / 125.0).abs() <= 0.02, "warming share {share}");
    }
}
