//! CPU time and memory of a process, from `/proc`.

use std::time::{Duration, Instant};

/// Clock ticks per second of `utime`/`stime` (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds (user + system) used so far by `pid`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat: {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).ok_or_else(|| anyhow::anyhow!("no utime"))?.parse()?;
    let stime: f64 = fields.get(12).ok_or_else(|| anyhow::anyhow!("no stime"))?.parse()?;
    Ok((utime + stime) / TICKS_PER_SEC)
}

/// CPU seconds used so far by the live threads of `pid`, to the
/// nanosecond (`/proc/<pid>/task/*/schedstat`; `/proc/<pid>/stat` counts in
/// 10 ms ticks). For phases of tens of milliseconds, over which no thread
/// ends: an ended thread's time leaves the sum.
pub fn thread_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread that ended since the listing is no longer there.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        let on_cpu = stat.split_whitespace().next().unwrap_or_default();
        ns += on_cpu
            .parse::<u64>()
            .map_err(|e| anyhow::anyhow!("unexpected {}: {stat:?} ({e})", path.display()))?;
    }
    Ok(ns as f64 / 1e9)
}

/// Measures CPU use of a set of processes over an interval.
#[derive(Debug)]
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<f64>,
    at: Instant,
}

impl CpuMeter {
    pub fn start(pids: &[u32]) -> anyhow::Result<CpuMeter> {
        let start = pids.iter().map(|&p| cpu_seconds(p)).collect::<Result<_, _>>()?;
        Ok(CpuMeter {
            pids: pids.to_vec(),
            start,
            at: Instant::now(),
        })
    }

    /// CPU% of each process since `start` (100% = one core busy).
    pub fn stop(&self) -> anyhow::Result<Vec<f64>> {
        let wall = self.at.elapsed().max(Duration::from_millis(1)).as_secs_f64();
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(&pid, start)| Ok((cpu_seconds(pid)? - start) / wall * 100.0))
            .collect()
    }
}

/// Resident memory of `pid`, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let value = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no VmRSS value in {line:?}"))?;
    Ok(value.parse()?)
}
