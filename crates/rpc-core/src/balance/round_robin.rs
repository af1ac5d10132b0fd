//! Smooth weighted round robin (as in nginx): every pick adds each
//! provider's weight to its running score, takes the highest, and subtracts
//! the total from the winner. Over a cycle each provider gets exactly its
//! weight's share, spread out rather than in a burst to the heaviest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use super::{Candidate, LoadBalance, PickContext, effective_weight};

#[derive(Debug, Default)]
pub struct RoundRobin {
    scores: Mutex<HashMap<SocketAddr, f64>>,
}

impl RoundRobin {
    pub fn new() -> RoundRobin {
        RoundRobin::default()
    }
}

impl LoadBalance for RoundRobin {
    fn pick(&self, candidates: &[Candidate<'_>], ctx: &PickContext<'_>) -> usize {
        let mut scores = self.scores.lock().expect("round robin lock");
        if scores.len() > candidates.len() * 2 + 8 {
            // Forget providers that left.
            scores.retain(|addr, _| candidates.iter().any(|c| c.addr == *addr));
        }
        let mut total = 0.0;
        let mut best: Option<(usize, f64)> = None;
        for (i, candidate) in candidates.iter().enumerate() {
            let weight = effective_weight(candidate, ctx);
            total += weight;
            let score = scores.entry(candidate.addr).or_insert(0.0);
            *score += weight;
            if best.is_none_or(|(_, s)| *score > s) {
                best = Some((i, *score));
            }
        }
        let (index, _) = best.expect("candidates are never empty");
        *scores.get_mut(&candidates[index].addr).expect("scored above") -= total;
        index
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn shares_follow_weights() {
        let loads = loads(4);
        let weights = [100, 200, 300, 400];
        let shares = shares(&RoundRobin::new(), &candidates(&weights, &loads), 100_000);
        assert_shares(&shares, &weights, 0.02);
    }

    #[test]
    fn equal_weights_rotate_strictly() {
        let loads = loads(3);
        let list = candidates(&[100; 3], &loads);
        let rr = RoundRobin::new();
        let picks: Vec<usize> = (0..6).map(|_| rr.pick(&list, &PickContext::default())).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn heavy_provider_is_interleaved_not_bursted() {
        let loads = loads(3);
        let list = candidates(&[5, 1, 1], &loads);
        let rr = RoundRobin::new();
        let ctx = PickContext::default();
        let picks: Vec<usize> = (0..70).map(|_| rr.pick(&list, &ctx)).collect();
        // A plain weighted round robin sends 5 in a row to the heavy one
        // (a a a a a b c); the smooth one interleaves: a a b a c a a.
        assert_eq!(&picks[..7], &[0, 0, 1, 0, 2, 0, 0]);
        let longest_run = picks.chunk_by(|a, b| a == b).map(<[usize]>::len).max().unwrap();
        assert!(longest_run < 5, "run of {longest_run} in {picks:?}");
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 50);
    }
}
