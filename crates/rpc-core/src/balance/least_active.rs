//! Least active: the provider with the fewest calls in flight *per unit of
//! weight* (so a provider of weight 200 may carry twice the calls of one of
//! weight 100 before it stops being preferred); random among equals,
//! weighted.

use super::{Candidate, LoadBalance, PickContext, SharedRng, effective_weight, weighted_choice};

#[derive(Debug)]
pub struct LeastActive {
    rng: SharedRng,
}

impl LeastActive {
    pub fn new() -> LeastActive {
        LeastActive {
            rng: SharedRng::from_os(),
        }
    }

    pub fn seeded(seed: u64) -> LeastActive {
        LeastActive {
            rng: SharedRng::seeded(seed),
        }
    }
}

impl Default for LeastActive {
    fn default() -> LeastActive {
        LeastActive::new()
    }
}

/// Picks the lowest `cost` (per unit of effective weight); weighted random
/// among the lowest. Shared by the cost-based balancers.
pub(super) fn lowest_cost(
    candidates: &[Candidate<'_>],
    ctx: &PickContext<'_>,
    unit: f64,
    cost: impl Fn(&Candidate<'_>) -> f64,
) -> usize {
    let weights: Vec<f64> = candidates.iter().map(|c| effective_weight(c, ctx)).collect();
    let scores: Vec<f64> = candidates
        .iter()
        .zip(&weights)
        .map(|(c, &w)| if w > 0.0 { cost(c) / w } else { f64::INFINITY })
        .collect();
    let best = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let tied: Vec<usize> = (0..candidates.len())
        .filter(|&i| scores[i] <= best * (1.0 + 1e-9) || best.is_infinite())
        .collect();
    let tied_weights: Vec<f64> = tied.iter().map(|&i| weights[i]).collect();
    weighted_choice(&tied, &tied_weights, unit)
}

impl LoadBalance for LeastActive {
    fn pick(&self, candidates: &[Candidate<'_>], ctx: &PickContext<'_>) -> usize {
        let [unit] = self.rng.units();
        lowest_cost(candidates, ctx, unit, |c| f64::from(c.load.active() + 1))
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
        let shares = simulate(&LeastActive::seeded(1), &weights, &[1.0; 4], 40, 100_000);
        assert_shares(&shares, &weights, 0.02);
    }

    #[test]
    fn ten_times_slower_provider_gets_under_15_percent() {
        let share = slow_share(&LeastActive::seeded(2));
        assert!(share < 0.15, "slow provider got {share:.3}");
    }
}
