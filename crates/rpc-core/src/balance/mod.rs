//! Load balancing: which provider gets the next call.
//!
//! Every balancer implements [`LoadBalance`]: given the candidates (the
//! providers not yet tried for this call, each with its weight, start time
//! and live [`Load`]), pick one. Balancers are seedable so tests are
//! reproducible.
//!
//! | balancer | picks | weights |
//! |---|---|---|
//! | [`Random`] | at random | proportional |
//! | [`RoundRobin`] | in turn, smoothly interleaved (no bursts to the heaviest) | proportional |
//! | [`LeastActive`] | fewest calls in flight *per unit of weight*; random among equals | yes |
//! | [`ConsistentHash`] | by a key, on a ring of virtual nodes | no |
//! | [`ShortestResponse`] | lowest recent mean response time x (in flight + 1), per unit of weight | yes |
//! | [`P2c`] | the better of two random picks by peak-EWMA latency x (in flight + 1) | yes |
//!
//! **Warm-up.** A provider's effective weight ramps linearly from its start
//! time over the warm-up period (default 10 minutes), in every weighted
//! balancer: see [`effective_weight`].

mod consistent_hash;
mod least_active;
mod load;
mod p2c;
mod random;
mod round_robin;
mod shortest_response;

use std::net::SocketAddr;
use std::time::Duration;

pub use consistent_hash::ConsistentHash;
pub use least_active::LeastActive;
pub use load::{CallTimer, Load};
pub use p2c::P2c;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use shortest_response::ShortestResponse;

/// Default warm-up period.
pub const DEFAULT_WARMUP: Duration = Duration::from_secs(600);

/// One provider a balancer may pick.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub addr: SocketAddr,
    /// Configured weight (0 = no traffic unless nothing else is left).
    pub weight: u32,
    /// When the provider started, Unix ms (0 = unknown: no warm-up).
    pub start_time_ms: i64,
    pub load: &'a Load,
}

/// What a pick may depend on besides the candidates.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext<'a> {
    /// Key for [`ConsistentHash`] (an argument field or an attachment).
    pub hash_key: Option<&'a [u8]>,
    /// Now, Unix ms (for warm-up).
    pub now_ms: i64,
    pub warmup: Duration,
}

/// Picks a provider for a call.
pub trait LoadBalance: Send + Sync + std::fmt::Debug {
    /// Index into `candidates` (never empty) of the provider to call.
    fn pick(&self, candidates: &[Candidate<'_>], ctx: &PickContext<'_>) -> usize;
}

/// A provider's weight during warm-up: `weight x uptime / warmup`, at least
/// 1 (so a new provider gets some traffic) and at most `weight`.
pub fn effective_weight(candidate: &Candidate<'_>, ctx: &PickContext<'_>) -> f64 {
    let weight = f64::from(candidate.weight);
    if weight == 0.0 || candidate.start_time_ms <= 0 || ctx.warmup.is_zero() {
        return weight;
    }
    let uptime_ms = (ctx.now_ms - candidate.start_time_ms).max(0) as f64;
    let warmup_ms = ctx.warmup.as_millis() as f64;
    if uptime_ms >= warmup_ms {
        weight
    } else {
        (weight * uptime_ms / warmup_ms).clamp(1.0, weight)
    }
}

/// The random source of a balancer: seeded from the OS, or from a fixed seed
/// for reproducible tests. Locked only for the draw itself.
#[derive(Debug)]
struct SharedRng(std::sync::Mutex<rand::rngs::SmallRng>);

impl SharedRng {
    fn from_os() -> SharedRng {
        SharedRng(std::sync::Mutex::new(rand::SeedableRng::from_os_rng()))
    }

    fn seeded(seed: u64) -> SharedRng {
        SharedRng(std::sync::Mutex::new(rand::SeedableRng::seed_from_u64(seed)))
    }

    /// `N` uniform draws in [0, 1).
    fn units<const N: usize>(&self) -> [f64; N] {
        let mut rng = self.0.lock().expect("rng lock");
        std::array::from_fn(|_| rand::Rng::random::<f64>(&mut *rng))
    }
}

/// Weighted random choice among `indices` (by `weights`, same order);
/// uniform if all weights are zero.
fn weighted_choice(indices: &[usize], weights: &[f64], unit: f64) -> usize {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return indices[((unit * indices.len() as f64) as usize).min(indices.len() - 1)];
    }
    let mut target = unit * total;
    for (i, w) in indices.iter().zip(weights) {
        if target < *w {
            return *i;
        }
        target -= w;
    }
    *indices.last().expect("non-empty")
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the statistical tests of the balancers.

    use super::*;

    pub fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 20000 + i as u16))
    }

    pub fn loads(n: usize) -> Vec<Load> {
        (0..n).map(|_| Load::default()).collect()
    }

    pub fn candidates<'a>(weights: &[u32], loads: &'a [Load]) -> Vec<Candidate<'a>> {
        weights
            .iter()
            .zip(loads)
            .enumerate()
            .map(|(i, (&weight, load))| Candidate {
                addr: addr(i),
                weight,
                start_time_ms: 0,
                load,
            })
            .collect()
    }

    /// Shares of `picks` picks by provider.
    pub fn shares(balancer: &dyn LoadBalance, candidates: &[Candidate<'_>], picks: usize) -> Vec<f64> {
        let mut counts = vec![0usize; candidates.len()];
        let ctx = PickContext::default();
        for _ in 0..picks {
            counts[balancer.pick(candidates, &ctx)] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    /// Asserts each share is within `tolerance` (absolute) of its weight's share.
    pub fn assert_shares(shares: &[f64], weights: &[u32], tolerance: f64) {
        let total: u32 = weights.iter().sum();
        for (i, (share, weight)) in shares.iter().zip(weights).enumerate() {
            let expected = f64::from(*weight) / f64::from(total);
            assert!(
                (share - expected).abs() <= tolerance,
                "provider {i}: share {share:.4}, expected {expected:.4} (weights {weights:?}, shares {shares:?})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// Shares of a provider warming up next to an old one, at points along
    /// the ramp, under each weighted balancer that needs no live load.
    #[test]
    fn warming_provider_shares_follow_the_ramp() {
        let loads = loads(2);
        let mut list = candidates(&[100, 100], &loads);
        let now_ms = 100_000_000;
        for (elapsed_s, expected) in [(60, 10.0 / 110.0), (300, 50.0 / 150.0), (600, 0.5)] {
            list[1].start_time_ms = now_ms - elapsed_s * 1000;
            let ctx = PickContext {
                now_ms,
                warmup: DEFAULT_WARMUP,
                ..PickContext::default()
            };
            let balancers: [&dyn LoadBalance; 2] = [&Random::seeded(11), &RoundRobin::new()];
            for balancer in balancers {
                let warm = (0..100_000).filter(|_| balancer.pick(&list, &ctx) == 1).count();
                let share = warm as f64 / 100_000.0;
                assert!(
                    (share - expected).abs() <= 0.02,
                    "{balancer:?} at {elapsed_s} s: {share:.4} vs {expected:.4}"
                );
            }
        }
    }

    #[test]
    fn warmup_ramps_linearly_then_holds() {
        let loads = loads(1);
        let mut c = candidates(&[100], &loads)[0];
        c.start_time_ms = 1_000_000;
        let ctx = |elapsed_s: i64| PickContext {
            now_ms: 1_000_000 + elapsed_s * 1000,
            warmup: DEFAULT_WARMUP,
            ..PickContext::default()
        };
        assert_eq!(effective_weight(&c, &ctx(0)), 1.0, "at least 1");
        assert!((effective_weight(&c, &ctx(150)) - 25.0).abs() < 1e-9);
        assert!((effective_weight(&c, &ctx(300)) - 50.0).abs() < 1e-9);
        assert_eq!(effective_weight(&c, &ctx(600)), 100.0);
        assert_eq!(effective_weight(&c, &ctx(6000)), 100.0);
    }
}

#[cfg(test)]
pub(crate) mod simulation {
    //! A discrete-event simulation of a consumer calling providers with
    //! different service times, to test balancers under real (simulated)
    //! load: each of `callers` callers picks a provider, the call takes that
    //! provider's service time (in units of 100 ms, times a random factor), and the
    //! caller calls again when it completes.

    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::Duration;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::testing::{candidates, loads};
    use super::{LoadBalance, PickContext};

    /// Microseconds per unit of `service_ms`: 100 ms, so that 100k calls
    /// span minutes of simulated time, well past the 10 s decay of the
    /// latency EWMA (a short run would let one early outlier weigh on a
    /// provider for the whole run).
    const UNIT_US: f64 = 100_000.0;

    /// Shares of `picks` calls by provider.
    pub fn simulate(
        balancer: &dyn LoadBalance,
        weights: &[u32],
        service_ms: &[f64],
        callers: usize,
        picks: usize,
    ) -> Vec<f64> {
        let loads = loads(weights.len());
        let list = candidates(weights, &loads);
        let ctx = PickContext::default();
        // Simulated time, so that time-decayed statistics are reproducible.
        let epoch = std::time::Instant::now();
        let mut rng = SmallRng::seed_from_u64(42);
        // (completion time in µs, provider)
        let mut events = BinaryHeap::new();
        let mut counts = vec![0usize; weights.len()];
        let mut issue = |now: u64, events: &mut BinaryHeap<Reverse<(u64, usize, u64)>>, rng: &mut SmallRng| {
            let i = balancer.pick(&list, &ctx);
            counts[i] += 1;
            loads[i].add_active(1);
            // Exponential-ish spread around the mean service time.
            let factor = -(1.0 - rng.random::<f64>()).ln();
            let took = (service_ms[i] * UNIT_US * factor).max(1.0) as u64;
            events.push(Reverse((now + took, i, took)));
        };
        for _ in 0..callers {
            issue(0, &mut events, &mut rng);
        }
        for _ in callers..picks {
            let Reverse((now, i, took)) = events.pop().expect("a call in flight");
            loads[i].add_active(-1);
            loads[i].record_at(Duration::from_micros(took), epoch + Duration::from_micros(now));
            issue(now, &mut events, &mut rng);
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    /// Share of calls that the third of three equal-weight providers gets
    /// when it is ten times slower.
    pub fn slow_share(balancer: &dyn LoadBalance) -> f64 {
        simulate(balancer, &[100, 100, 100], &[1.0, 1.0, 10.0], 16, 100_000)[2]
    }

    #[test]
    fn round_robin_gives_the_slow_provider_its_third() {
        let share = slow_share(&super::RoundRobin::new());
        assert!((share - 1.0 / 3.0).abs() < 0.01, "{share}");
    }
}
