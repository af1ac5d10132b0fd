//! `bench rpc`: the data plane against tonic and raw TCP.
//!
//! For each system, one after another: start its echo server in a child
//! process, then from this process run a closed loop (`--concurrency`
//! callers over `--connections` connections), a serial run (one caller) and
//! a fixed-rate run (`--rate` calls/s). The last line is
//! `RESULT rpc qps_vs_tonic=<x> qps_vs_raw=<y> p99_vs_tonic=<z> serial_p50_us=<n>`:
//! closed-loop QPS and fixed-rate p99 as ratios this framework / peer.
//! With `--tls`, this framework runs again over mTLS (certificates made
//! for the run) and the line adds `tls_qps_ratio=<x>`: closed-loop QPS
//! over TLS / plain, measured in the same run.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tern_e2e::Process;

use crate::load::{self, Outcome, Window};
use crate::systems::{Clients, System};
use crate::tls::Pki;

#[derive(Debug, clap::Args)]
pub struct RpcArgs {
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds before each measured run.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Concurrent callers in the closed loop.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Payload bytes per call.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Connections the callers share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Calls per second of the fixed-rate run.
    #[arg(long, default_value_t = 20_000)]
    rate: u32,
    /// Dispatch mode of this framework's provider.
    #[arg(long, default_value = "all")]
    dispatch: String,
    /// Systems to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tern,tonic,raw")]
    systems: Vec<System>,
    /// Also measure this framework over TLS (mTLS), after its plain run.
    #[arg(long)]
    tls: bool,
    /// Write PNG plots of the latency distributions into this directory.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

/// The three runs of one system.
struct Report {
    system: System,
    closed: Outcome,
    serial: Outcome,
    fixed: Outcome,
}

struct ServerProcess {
    process: Process,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start(system: System, dispatch: &str, tls: Option<&Pki>) -> anyhow::Result<ServerProcess> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["serve", "--system", system.name_arg(), "--dispatch", dispatch]);
        if let Some(pki) = tls {
            command.args(pki.server_args());
        }
        let (process, words) = Process::spawn_ready(&mut command).context("starting the server process")?;
        let addr = match words.as_slice() {
            [listening, addr] if listening == "listening" => addr.parse()?,
            _ => anyhow::bail!("server printed {:?}", words.join(" ")),
        };
        Ok(ServerProcess { process, addr })
    }
}

impl System {
    fn name_arg(self) -> &'static str {
        match self {
            System::Tern => "tern",
            System::TernTls => "tern-tls",
            System::Tonic => "tonic",
            System::Raw => "raw",
        }
    }
}

pub async fn run(args: RpcArgs) -> anyhow::Result<()> {
    let window = Window {
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.duration),
    };
    let payload = Bytes::from(vec![0xA5u8; args.payload]);
    println!(
        "rpc benchmark: {} connection(s), concurrency {}, payload {} B, warm-up {:?}, measured {:?}, fixed rate {}/s, dispatch {}",
        args.connections, args.concurrency, args.payload, window.warmup, window.duration, args.rate, args.dispatch
    );
    let mut systems = args.systems.clone();
    let pki = if args.tls || systems.contains(&System::TernTls) {
        if !systems.contains(&System::TernTls) {
            // Right after the plain run: the ratio compares neighbours in time.
            let at = systems.iter().position(|s| *s == System::Tern).map_or(0, |i| i + 1);
            systems.insert(at, System::TernTls);
        }
        Some(Pki::new("rpc")?)
    } else {
        None
    };
    let mut reports = Vec::new();
    for &system in &systems {
        let tls = pki.as_ref().filter(|_| system == System::TernTls);
        let server = ServerProcess::start(system, &args.dispatch, tls)?;
        let pids = [server.process.pid(), std::process::id()];
        let client_tls = tls.map(Pki::client).transpose()?;
        let clients = Arc::new(Clients::connect(system, server.addr, args.connections, client_tls.as_ref()).await?);
        eprintln!("measuring {} ...", system.name());
        let closed = load::closed_loop(clients.clone(), args.concurrency, payload.clone(), &window, &pids).await?;
        let serial = load::closed_loop(clients.clone(), 1, payload.clone(), &window, &pids).await?;
        let fixed = load::fixed_rate(clients.clone(), args.rate, payload.clone(), &window, &pids).await?;
        drop(clients);
        drop(server);
        reports.push(Report {
            system,
            closed,
            serial,
            fixed,
        });
    }
    print_table(&reports);
    if let Some(dir) = &args.plot {
        write_plots(dir, &reports, &args)?;
    }

    let find = |s: System| reports.iter().find(|r| r.system == s);
    let ratio = |ours: f64, theirs: f64| {
        if theirs > 0.0 {
            format!("{:.2}", ours / theirs)
        } else {
            "n/a".into()
        }
    };
    let (tern, tonic, raw) = (find(System::Tern), find(System::Tonic), find(System::Raw));
    let tern_qps = tern.map_or(0.0, |r| r.closed.qps());
    let tern_p99 = tern.map_or(0.0, |r| r.fixed.quantile_us(0.99));
    let tls = match find(System::TernTls) {
        Some(over_tls) => format!(" tls_qps_ratio={}", ratio(over_tls.closed.qps(), tern_qps)),
        None => String::new(),
    };
    println!(
        "RESULT rpc qps_vs_tonic={} qps_vs_raw={} p99_vs_tonic={} serial_p50_us={:.0}{tls}",
        ratio(tern_qps, tonic.map_or(0.0, |r| r.closed.qps())),
        ratio(tern_qps, raw.map_or(0.0, |r| r.closed.qps())),
        ratio(tern_p99, tonic.map_or(0.0, |r| r.fixed.quantile_us(0.99))),
        tern.map_or(0.0, |r| r.serial.quantile_us(0.5)),
    );
    Ok(())
}

fn print_table(reports: &[Report]) {
    println!();
    println!(
        "{:<8} {:<11} {:>10} {:>7} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "system", "run", "qps", "errors", "p50 us", "p99 us", "p999 us", "srv cpu%", "cli cpu%"
    );
    for report in reports {
        for (run, o) in [
            ("closed", &report.closed),
            ("serial", &report.serial),
            ("fixed-rate", &report.fixed),
        ] {
            println!(
                "{:<8} {:<11} {:>10.0} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>10.0}",
                report.system.name(),
                run,
                o.qps(),
                o.errors,
                o.quantile_us(0.5),
                o.quantile_us(0.99),
                o.quantile_us(0.999),
                o.cpu.first().copied().unwrap_or(0.0),
                o.cpu.get(1).copied().unwrap_or(0.0),
            );
        }
    }
    println!();
}

/// One latency CDF per run kind, the systems side by side.
fn write_plots(dir: &std::path::Path, reports: &[Report], args: &RpcArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let runs = [
        ("rpc_latency_fixed_rate.png", "fixed rate"),
        ("rpc_latency_closed_loop.png", "closed loop"),
    ];
    for (file, run) in runs {
        // The histogram's quantiles stand for its samples: 1,000 evenly
        // spaced ones draw the same curve.
        let series: Vec<_> = reports
            .iter()
            .map(|r| {
                let o = if run == "fixed rate" { &r.fixed } else { &r.closed };
                let points = (1..=1000).map(|q| o.quantile_us(f64::from(q) / 1000.0)).collect();
                (r.system.name().to_owned(), points)
            })
            .collect();
        let path = dir.join(file);
        let load = if run == "fixed rate" {
            format!("{} calls/s", args.rate)
        } else {
            format!("concurrency {}", args.concurrency)
        };
        let title = format!("Call latency, {run} ({load}, {} B payload)", args.payload);
        crate::plot::cdf(&path, &title, "microseconds (log scale)", &series)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}
