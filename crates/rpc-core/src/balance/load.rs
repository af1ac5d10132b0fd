//! Live load of one provider, as seen by this consumer: calls in flight, a
//! peak-EWMA of latency, and a window of recent response times.
//!
//! A call is timed with [`Load::start`]; the returned [`CallTimer`] records
//! the outcome when finished (or, if dropped, just ends the call).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Decay time of the latency EWMA.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed before a provider has answered anything.
const INITIAL_LATENCY: Duration = Duration::from_millis(1);
/// Response times kept for the mean.
const WINDOW: usize = 64;

#[derive(Debug)]
pub struct Load {
    active: AtomicU32,
    latency: Mutex<Latency>,
}

#[derive(Debug)]
struct Latency {
    /// Peak EWMA, nanoseconds.
    ewma_ns: f64,
    at: Instant,
    window: [u32; WINDOW],
    /// Samples written (the window holds min(len, WINDOW)).
    len: usize,
}

impl Default for Load {
    fn default() -> Load {
        Load {
            active: AtomicU32::new(0),
            latency: Mutex::new(Latency {
                ewma_ns: INITIAL_LATENCY.as_nanos() as f64,
                at: Instant::now(),
                window: [0; WINDOW],
                len: 0,
            }),
        }
    }
}

impl Load {
    /// Calls in flight.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency in nanoseconds, decayed to now: a slow answer raises
    /// it at once; it falls back over ~10 s of faster answers.
    pub fn peak_ewma_ns(&self) -> f64 {
        self.latency.lock().expect("load lock").ewma_ns
    }

    /// Mean of the recent response times, nanoseconds (`None` before any).
    pub fn mean_response_ns(&self) -> Option<f64> {
        let latency = self.latency.lock().expect("load lock");
        let n = latency.len.min(WINDOW);
        (n > 0).then(|| {
            latency.window[..n]
                .iter()
                .map(|&us| f64::from(us) * 1000.0)
                .sum::<f64>()
                / n as f64
        })
    }

    /// Starts timing a call; it counts as in flight until the timer is
    /// finished or dropped.
    pub fn start(&self) -> CallTimer<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        CallTimer {
            load: self,
            started: Instant::now(),
        }
    }

    /// Records a response time measured now.
    pub fn record(&self, rtt: Duration) {
        self.record_at(rtt, Instant::now());
    }

    /// Records a response time measured at `now` (simulations run their own
    /// clock).
    pub fn record_at(&self, rtt: Duration, now: Instant) {
        let mut latency = self.latency.lock().expect("load lock");
        let rtt_ns = rtt.as_nanos() as f64;
        if rtt_ns > latency.ewma_ns {
            latency.ewma_ns = rtt_ns;
        } else {
            let elapsed = now.saturating_duration_since(latency.at).as_secs_f64();
            let keep = (-elapsed / EWMA_DECAY.as_secs_f64()).exp();
            latency.ewma_ns = latency.ewma_ns * keep + rtt_ns * (1.0 - keep);
        }
        latency.at = now;
        let slot = latency.len % WINDOW;
        latency.window[slot] = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX);
        latency.len += 1;
    }

    /// Adjusts the in-flight count (for simulations).
    pub fn add_active(&self, delta: i32) {
        if delta >= 0 {
            self.active.fetch_add(delta as u32, Ordering::Relaxed);
        } else {
            self.active.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }
}

/// A call in flight on a provider.
#[derive(Debug)]
pub struct CallTimer<'a> {
    load: &'a Load,
    started: Instant,
}

impl CallTimer<'_> {
    /// The call answered (successfully or with an error from the provider):
    /// record its response time.
    pub fn finish(self) {
        self.load.record(self.started.elapsed());
    }
}

impl Drop for CallTimer<'_> {
    fn drop(&mut self) {
        self.load.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_counts_in_flight_until_done() {
        let load = Load::default();
        let a = load.start();
        let b = load.start();
        assert_eq!(load.active(), 2);
        a.finish();
        drop(b);
        assert_eq!(load.active(), 0);
        assert!(load.mean_response_ns().is_some());
    }

    #[test]
    fn peak_ewma_jumps_up_at_once() {
        let load = Load::default();
        load.record(Duration::from_millis(50));
        assert!(load.peak_ewma_ns() >= 50e6);
    }
}
