//! Power of two choices over peak-EWMA: pick two providers at random (by
//! weight), send the call to the one with the lower cost = peak-EWMA latency
//! x (calls in flight + 1) / weight. The cost comes from real answers and
//! real in-flight counts, so a slow or overloaded provider loses most
//! comparisons while every provider keeps being sampled.

use super::{Candidate, LoadBalance, PickContext, SharedRng, effective_weight, weighted_choice};

#[derive(Debug)]
pub struct P2c {
    rng: SharedRng,
}

impl P2c {
    pub fn new() -> P2c {
        P2c {
            rng: SharedRng::from_os(),
        }
    }

    pub fn seeded(seed: u64) -> P2c {
        P2c {
            rng: SharedRng::seeded(seed),
        }
    }
}

impl Default for P2c {
    fn default() -> P2c {
        P2c::new()
    }
}

impl LoadBalance for P2c {
    fn pick(&self, candidates: &[Candidate<'_>], ctx: &PickContext<'_>) -> usize {
        if candidates.len() == 1 {
            return 0;
        }
        let weights: Vec<f64> = candidates.iter().map(|c| effective_weight(c, ctx)).collect();
        let [u1, u2] = self.rng.units();
        let all: Vec<usize> = (0..candidates.len()).collect();
        let a = weighted_choice(&all, &weights, u1);
        let rest: Vec<usize> = all.iter().copied().filter(|&i| i != a).collect();
        let rest_weights: Vec<f64> = rest.iter().map(|&i| weights[i]).collect();
        let b = weighted_choice(&rest, &rest_weights, u2);
        let cost = |i: usize| {
            let c = &candidates[i];
            let w = weights[i].max(f64::MIN_POSITIVE);
            c.load.peak_ewma_ns() * f64::from(c.load.active() + 1) / w
        };
        if cost(b) < cost(a) { b } else { a }
    }
}

#[cfg(test)]
mod tests {
    use super::super::simulation::{simulate, slow_share};
    use super::super::testing::*;
    use super::*;

    #[test]
    fn ten_times_slower_provider_gets_under_15_percent() {
        let share = slow_share(&P2c::seeded(4));
        assert!(share < 0.15, "slow provider got {share:.3}");
    }

    #[test]
    fn shares_follow_weights_under_load() {
        let weights = [100, 200, 300, 400];
        let shares = simulate(&P2c::seeded(6), &weights, &[1.0; 4], 40, 100_000);
        assert_shares(&shares, &weights, 0.02);
    }

    #[test]
    fn equal_providers_share_evenly() {
        let weights = [100, 100, 100];
        let shares = simulate(&P2c::seeded(5), &weights, &[1.0; 3], 30, 100_000);
        assert_shares(&shares, &weights, 0.02);
    }
}
