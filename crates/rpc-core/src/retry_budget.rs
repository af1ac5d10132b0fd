//! A retry budget: retries may add at most a share of the calls made over a
//! sliding window (default 20% over 10 s), plus a small reserve so a quiet
//! service can still retry. When a whole cluster is sick, calls fail at
//! once instead of multiplying the load on it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const BUCKETS: usize = 10;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// (calls, retries) per bucket of `window / BUCKETS`.
    buckets: [(u64, u64); BUCKETS],
    current: usize,
    started: Instant,
}

impl RetryBudget {
    /// Retries may be `ratio` of the calls in `window`, plus
    /// `reserve_per_sec` x the window's seconds.
    pub fn new(ratio: f64, reserve_per_sec: f64, window: Duration) -> RetryBudget {
        RetryBudget {
            ratio: ratio.max(0.0),
            reserve: reserve_per_sec.max(0.0) * window.as_secs_f64(),
            window: window.max(Duration::from_millis(BUCKETS as u64)),
            state: Mutex::new(Window {
                buckets: [(0, 0); BUCKETS],
                current: 0,
                started: Instant::now(),
            }),
        }
    }

    /// Counts a call (its first try).
    pub fn record_call(&self) {
        let mut state = self.state.lock().expect("budget lock");
        self.advance(&mut state);
        let current = state.current;
        state.buckets[current].0 += 1;
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_retry(&self) -> bool {
        let mut state = self.state.lock().expect("budget lock");
        self.advance(&mut state);
        let (calls, retries) = state.buckets.iter().fold((0, 0), |(c, r), b| (c + b.0, r + b.1));
        if (retries + 1) as f64 > self.ratio * calls as f64 + self.reserve {
            return false;
        }
        let current = state.current;
        state.buckets[current].1 += 1;
        true
    }

    /// Moves to the bucket for now, clearing the ones that fell out.
    fn advance(&self, state: &mut Window) {
        let bucket = self.window / BUCKETS as u32;
        let elapsed = state.started.elapsed();
        let steps = (elapsed.as_nanos() / bucket.as_nanos()) as usize;
        for _ in 0..steps.min(BUCKETS) {
            state.current = (state.current + 1) % BUCKETS;
            let current = state.current;
            state.buckets[current] = (0, 0);
        }
        if steps > 0 {
            state.started += bucket * steps as u32;
        }
    }
}

impl Default for RetryBudget {
    fn default() -> RetryBudget {
        RetryBudget::new(0.2, 1.0, Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_the_ratio() {
        let budget = RetryBudget::new(0.2, 0.0, Duration::from_secs(60));
        let mut retried = 0;
        for _ in 0..1000 {
            budget.record_call();
            // Every call would like two retries.
            for _ in 0..2 {
                retried += usize::from(budget.try_retry());
            }
        }
        assert_eq!(retried, 200);
    }

    #[test]
    fn reserve_allows_retries_when_quiet() {
        let budget = RetryBudget::new(0.2, 1.0, Duration::from_secs(10));
        budget.record_call();
        assert!(budget.try_retry());
    }
}
