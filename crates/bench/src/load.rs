//! Load generators: closed loop (N callers back to back) and fixed rate
//! (open loop: calls issued on a schedule whatever the answers do, so a
//! stalled server cannot slow the load down and hide its queueing delay).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

use crate::proc_stats::CpuMeter;
use crate::systems::Clients;

/// Period of the fixed-rate generator.
const TICK: Duration = Duration::from_millis(1);

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// What one run measured.
#[derive(Debug)]
pub struct Outcome {
    pub calls: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency in nanoseconds.
    pub latency: Histogram<u64>,
    /// CPU% of the measured processes, in the order given.
    pub cpu: Vec<f64>,
}

impl Outcome {
    pub fn qps(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    pub fn quantile_us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid bounds")
}

#[derive(Debug, Clone)]
pub struct Window {
    pub warmup: Duration,
    pub duration: Duration,
}

/// `concurrency` callers, each calling again as soon as its call returns.
pub async fn closed_loop(
    clients: Arc<Clients>,
    concurrency: usize,
    payload: Bytes,
    window: &Window,
    pids: &[u32],
) -> anyhow::Result<Outcome> {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let mut callers = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let (clients, phase, payload) = (clients.clone(), phase.clone(), payload.clone());
        callers.push(tokio::spawn(async move {
            let (mut hist, mut calls, mut errors) = (histogram(), 0u64, 0u64);
            loop {
                let started_in = phase.load(Ordering::Relaxed);
                if started_in == STOP {
                    break;
                }
                let t0 = Instant::now();
                let result = clients.call(i, &payload).await;
                let latency = t0.elapsed();
                if started_in == MEASURE && phase.load(Ordering::Relaxed) == MEASURE {
                    match result {
                        Ok(()) => {
                            calls += 1;
                            hist.saturating_record(latency.as_nanos() as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, calls, errors)
        }));
    }
    tokio::time::sleep(window.warmup).await;
    let meter = CpuMeter::start(pids)?;
    phase.store(MEASURE, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(window.duration).await;
    phase.store(STOP, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let cpu = meter.stop()?;
    let mut outcome = Outcome {
        calls: 0,
        errors: 0,
        elapsed,
        latency: histogram(),
        cpu,
    };
    for caller in callers {
        let (hist, calls, errors) = tokio::time::timeout(Duration::from_secs(30), caller).await??;
        outcome.latency.add(&hist)?;
        outcome.calls += calls;
        outcome.errors += errors;
    }
    Ok(outcome)
}

/// Calls started at `rate` per second; at most one second's worth
/// outstanding (a call that finds no room counts as an error).
pub async fn fixed_rate(
    clients: Arc<Clients>,
    rate: u32,
    payload: Bytes,
    window: &Window,
    pids: &[u32],
) -> anyhow::Result<Outcome> {
    let rate = rate.max(1);
    let outstanding = Arc::new(Semaphore::new(rate as usize));
    let shared = Arc::new(Mutex::new((histogram(), 0u64, 0u64)));
    let start = Instant::now();
    let measure_from = start + window.warmup;
    let end = measure_from + window.duration;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut meter = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent: u64 = 0;
    let mut shed: u64 = 0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        if meter.is_none() && now >= measure_from {
            meter = Some(CpuMeter::start(pids)?);
        }
        let due = ((now.min(end) - start).as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            // Open loop: calls are issued on schedule whatever the answers
            // do, so latency counts from the moment of issue (the generator
            // ticks every millisecond and issues the calls due since the
            // last tick together; tokio's timer fires up to a tick late,
            // which is the generator's lag, not the system's).
            let scheduled = start + interval.mul_f64(sent as f64);
            let intended = now;
            sent += 1;
            let measured = scheduled >= measure_from;
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                shed += u64::from(measured);
                continue;
            };
            let (clients, shared, payload) = (clients.clone(), shared.clone(), payload.clone());
            tokio::spawn(async move {
                let result = clients.call(sent as usize, &payload).await;
                let latency = intended.elapsed();
                drop(permit);
                if measured {
                    let mut shared = shared.lock().await;
                    match result {
                        Ok(()) => {
                            shared.0.saturating_record(latency.as_nanos() as u64);
                            shared.1 += 1;
                        }
                        Err(_) => shared.2 += 1,
                    }
                }
            });
        }
        if now >= end {
            break;
        }
    }
    let cpu = match meter {
        Some(meter) => meter.stop()?,
        None => vec![0.0; pids.len()],
    };
    // Wait for the calls still out (each is bounded by its own deadline).
    let _all_back = tokio::time::timeout(Duration::from_secs(30), outstanding.acquire_many(rate)).await??;
    let (latency, calls, errors) = std::mem::replace(&mut *shared.lock().await, (histogram(), 0, 0));
    Ok(Outcome {
        calls,
        errors: errors + shed,
        elapsed: window.duration,
        latency,
        cpu,
    })
}
