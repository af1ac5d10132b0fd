//! One system's results from `bench peers`, and how they are shown: the
//! table printed after the runs and the PNG plots of `--plot DIR`.

use std::path::Path;

use anyhow::Context;

use super::System;
use crate::plot;

/// One system's results.
pub(super) struct Report {
    pub(super) system: System,
    /// Push latency of every change, ms.
    pub(super) push_ms: Vec<f64>,
    pub(super) push_p50: f64,
    pub(super) push_p99: f64,
    /// The storms, in the order run.
    pub(super) storms: Vec<Storm>,
    /// Wire bytes per change per subscriber, if `ss` could count them.
    pub(super) bytes_per_change: Option<f64>,
    pub(super) push_cpu_s: f64,
    /// This process's over the push phase (every client, and the checks).
    pub(super) push_clients_cpu_s: f64,
    /// The server's, per storm.
    pub(super) storm_cpu_s: f64,
    /// This process's (every provider's and subscriber's client), per storm.
    pub(super) storm_clients_cpu_s: f64,
    pub(super) rss_kb: u64,
}

/// One storm's outcome.
pub(super) struct Storm {
    /// When each subscriber converged, ms (sorted; the last is the storm's
    /// convergence time).
    pub(super) each_ms: Vec<f64>,
    /// Until the server acknowledged every change of the storm, ms.
    pub(super) acked_ms: f64,
}

impl Storm {
    fn ms(&self) -> f64 {
        self.each_ms.last().copied().unwrap_or_default()
    }
}

impl Report {
    /// The storms sorted by convergence time.
    fn storms_by_time(&self) -> Vec<&Storm> {
        let mut storms: Vec<&Storm> = self.storms.iter().collect();
        storms.sort_by(|a, b| a.ms().total_cmp(&b.ms()));
        storms
    }

    /// The median storm (the lower middle one of an even count): the one
    /// the ratios compare.
    fn median_storm(&self) -> &Storm {
        let storms = self.storms_by_time();
        storms[(storms.len() - 1) / 2]
    }

    pub(super) fn storm_ms(&self) -> f64 {
        self.median_storm().ms()
    }
}

pub(super) fn print_table(reports: &[Report]) {
    println!();
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>15} {:>11} {:>12} {:>10} {:>14} {:>13} {:>14} {:>8}",
        "system",
        "push p50",
        "push p99",
        "push max",
        "storm",
        "storm min-max",
        "storm acked",
        "bytes/change",
        "push cpu s",
        "clients cpu s",
        "storm cpu ms",
        "clients cpu ms",
        "rss MiB"
    );
    for r in reports {
        let max = r.push_ms.iter().copied().fold(0.0, f64::max);
        let storms = r.storms_by_time();
        let range = format!("{:.1}-{:.1}ms", storms[0].ms(), storms[storms.len() - 1].ms());
        println!(
            "{:<10} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>15} {:>9.1}ms {:>12} {:>10.2} {:>14.2} {:>13.1} {:>14.1} {:>8.1}",
            r.system.name(),
            r.push_p50,
            r.push_p99,
            max,
            r.storm_ms(),
            range,
            r.median_storm().acked_ms,
            r.bytes_per_change.map_or("n/a".into(), |b| format!("{b:.0}")),
            r.push_cpu_s,
            r.push_clients_cpu_s,
            r.storm_cpu_s * 1e3,
            r.storm_clients_cpu_s * 1e3,
            r.rss_kb as f64 / 1024.0,
        );
    }
    println!(
        "(push: a change -> the last subscriber holds it; storm: 10% replaced -> every subscriber holds the new set, the median storm (min-max: the fastest and slowest); storm acked: until the server acknowledged every write of the median storm; bytes/change: TCP payload both ways over all the server's connections during the push phase, per change per subscriber; push cpu s: the server process's CPU seconds over the push phase; clients cpu s: this process's over it (every subscriber's and provider's client, and the checks); storm cpu ms: the server's CPU per storm; clients cpu ms: this process's (every provider's and subscriber's client, and the checks) per storm; rss: the server's resident memory with every push subscriber connected)"
    );
    println!();
}

pub(super) fn write_plots(dir: &Path, reports: &[Report]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let plots = [
        (
            "peers_push_latency.png",
            "Push latency: a provider joins or leaves -> the last subscriber sees it",
            "ms (log scale)",
        ),
        (
            "peers_storm_convergence.png",
            "Storm (the median one): 10% of providers replaced -> subscribers holding the new set",
            "ms since the storm began (log scale)",
        ),
    ];
    for (file, title, x_label) in plots {
        let series: Vec<_> = reports
            .iter()
            .map(|r| {
                let samples = if file == "peers_push_latency.png" {
                    &r.push_ms
                } else {
                    &r.median_storm().each_ms
                };
                (r.system.name().to_owned(), samples.clone())
            })
            .collect();
        let path = dir.join(file);
        plot::cdf(&path, title, x_label, &series)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}
