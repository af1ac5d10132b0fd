//! CPU time and memory of a process, from `/proc`.

use std::collections::BTreeMap;
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

/// A process's CPU time at one moment, per thread to the nanosecond
/// (`/proc/<pid>/task/*/schedstat`) and in all in 10 ms ticks
/// (`/proc/<pid>/stat`, which keeps the time of threads that ended).
#[derive(Debug, Clone)]
pub struct CpuClock {
    pid: u32,
    ticks_s: f64,
    threads_ns: BTreeMap<u32, u64>,
}

impl CpuClock {
    pub fn read(pid: u32) -> anyhow::Result<CpuClock> {
        let mut threads_ns = BTreeMap::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let task = task?;
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = task.path().join("schedstat");
            // A thread that ended since the listing is no longer there.
            let Ok(stat) = std::fs::read_to_string(&path) else {
                continue;
            };
            let on_cpu = stat.split_whitespace().next().unwrap_or_default();
            let ns = on_cpu
                .parse()
                .map_err(|e| anyhow::anyhow!("unexpected {}: {stat:?} ({e})", path.display()))?;
            threads_ns.insert(tid, ns);
        }
        anyhow::ensure!(
            !threads_ns.is_empty(),
            "no thread of pid {pid} has a readable schedstat"
        );
        Ok(CpuClock {
            pid,
            ticks_s: cpu_seconds(pid)?,
            threads_ns,
        })
    }

    /// CPU seconds used since `before`: to the nanosecond when every
    /// thread of then is still there (a thread started since counts whole),
    /// otherwise in ticks (an ended thread's time is only there).
    pub fn since(&self, before: &CpuClock) -> f64 {
        debug_assert_eq!(self.pid, before.pid);
        let all_there = before.threads_ns.keys().all(|tid| self.threads_ns.contains_key(tid));
        if !all_there {
            return self.ticks_s - before.ticks_s;
        }
        let ns: u64 = self
            .threads_ns
            .iter()
            .map(|(tid, &now)| now.saturating_sub(before.threads_ns.get(tid).copied().unwrap_or(0)))
            .sum();
        ns as f64 / 1e9
    }
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
