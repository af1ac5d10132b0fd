//! Shortest response: the lowest mean of recent response times multiplied by
//! (calls in flight + 1), per unit of weight; random among equals, weighted.

use super::least_active::lowest_cost;
use super::{Candidate, LoadBalance, PickContext, SharedRng};

#[derive(Debug)]
pub struct ShortestResponse {
    rng: SharedRng,
}

impl ShortestResponse {
    pub fn new() -> ShortestResponse {
        ShortestResponse {
            rng: SharedRng::from_os(),
        }
    }

    pub fn seeded(seed: u64) -> ShortestResponse {
        ShortestResponse {
            rng: SharedRng::seeded(seed),
        }
    }
}

impl Default for ShortestResponse {
    fn default() -> ShortestResponse {
        ShortestResponse::new()
    }
}

impl LoadBalance for ShortestResponse {
    fn pick(&self, candidates: &[Candidate<'_>], ctx: &PickContext<'_>) -> usize {
        let [unit] = self.rng.units();
        // Providers not measured yet look as fast as the fastest, so they
        // get tried.
        let fastest = candidates
            .iter()
            .filter_map(|c| c.load.mean_response_ns())
            .fold(f64::INFINITY, f64::min);
        let default = if fastest.is_finite() { fastest } else { 1.0 };
        lowest_cost(candidates, ctx, unit, |c| {
            c.load.mean_response_ns().unwrap_or(default) * f64::from(c.load.active() + 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::simulation::{simulate, slow_share};
    use super::super::testing::*;
    use super::*;

    #[test]
    fn shares_follow_weights_under_load() {
        let weights = [100, 200, 300, 400];
        let shares = simulate(&ShortestResponse::seeded(7), &weights, &[1.0; 4], 40, 100_000);
        assert_shares(&shares, &weights, 0.02);
    }

    #[test]
    fn ten_times_slower_provider_gets_under_15_percent() {
        let share = slow_share(&ShortestResponse::seeded(3));
        assert!(share < 0.15, "slow provider got {share:.3}");
    }
}
