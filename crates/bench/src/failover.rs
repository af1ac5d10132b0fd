//! `bench failover`: calls that survive providers dying, stalling, leaving,
//! joining, and one of them being ten times slower.
//!
//! A ConfigServer and providers run as child processes; this process is the
//! consumer, calling at `--rate` calls/s for `--duration` seconds with the
//! default cluster mode (Failover) and the P2C balancer. Three providers
//! start; `c` answers ten times slower than the others throughout. At 1/4 of
//! the run `a` is killed with SIGKILL; at 1/2 a new provider `d` starts; at
//! 3/4 `b` stops gracefully (SIGTERM). Printed: calls, failures, the share of
//! calls the slow provider got, and the time until `d` served its first
//! call. Then, for every balancer, a shorter steady run with `c` slow gives
//! its share.
//!
//! Last line:
//! `RESULT failover calls=<n> failed=<n> slow_share_p2c=<x> slow_share_least_active=<x> new_provider_ms=<n>`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use consumer_sdk::{Balance, Consumer, ConsumerConfig, Reference};
use rpc_core::registry::{Role, SessionConfig};
use tern_e2e::{Process, Signal};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::proto::{EchoClient, EchoRequest};

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Calls per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Seconds of the main run.
    #[arg(long, default_value_t = 12.0)]
    duration: f64,
    /// Seconds of each per-balancer run.
    #[arg(long, default_value_t = 4.0)]
    balancer_duration: f64,
    /// Service time of a normal provider; the slow one takes 10x.
    #[arg(long, default_value_t = 2)]
    delay_ms: u64,
}

/// A child process of this binary and the words of its ready line.
struct Proc {
    process: Process,
    words: Vec<String>,
}

impl Proc {
    fn start(args: &[&str]) -> anyhow::Result<Proc> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(args).env("RUST_LOG", "error");
        let (process, words) = Process::spawn_ready(&mut command).context("starting a child process")?;
        Ok(Proc { process, words })
    }

    fn provider(registry: SocketAddr, name: &str, delay_ms: u64) -> anyhow::Result<Proc> {
        let registry = registry.to_string();
        let delay = delay_ms.to_string();
        Proc::start(&[
            "serve",
            "--system",
            "tern",
            "--registry",
            &registry,
            "--name",
            name,
            "--delay-ms",
            &delay,
        ])
    }
}

/// Calls and who served them.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
    served: Mutex<BTreeMap<String, u64>>,
    first_seen: Mutex<BTreeMap<String, Instant>>,
}

/// Issues `rate` calls/s for `duration`, each in its own task (at most one
/// second's worth in flight; beyond that a call counts as failed).
async fn steady(client: &EchoClient<Reference>, rate: u32, duration: Duration, tally: &Arc<Tally>) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0u64;
    let mut calls = JoinSet::new();
    let payload = Bytes::from_static(&[0xA5; 64]);
    while start.elapsed() < duration {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            sent += 1;
            if calls.len() >= rate as usize {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (client, tally, payload) = (client.clone(), tally.clone(), payload.clone());
            calls.spawn(async move {
                match client.echo(EchoRequest { payload }).await {
                    Ok(reply) => {
                        *tally
                            .served
                            .lock()
                            .expect("tally")
                            .entry(reply.served_by.clone())
                            .or_default() += 1;
                        tally
                            .first_seen
                            .lock()
                            .expect("tally")
                            .entry(reply.served_by)
                            .or_insert_with(Instant::now);
                    }
                    Err(e) => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "call failed");
                    }
                }
                tally.calls.fetch_add(1, Ordering::Relaxed);
            });
        }
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

fn new_client(registry: SocketAddr, balance: Balance) -> anyhow::Result<EchoClient<Reference>> {
    let consumer = Consumer::new(ConsumerConfig {
        app: "bench-consumer".into(),
        registry: Some(SessionConfig::new(
            [registry.to_string()],
            "bench-consumer",
            Role::Consumer,
        )),
        ..ConsumerConfig::default()
    });
    Ok(consumer
        .reference::<EchoClient<_>>()
        .balance(balance)
        .timeout(Duration::from_secs(1))
        .build()?)
}

async fn wait_providers(client: &EchoClient<Reference>, n: usize) -> anyhow::Result<()> {
    let ok = client
        .invoker()
        .wait_for_providers(Duration::from_secs(10), |p| p.len() == n)
        .await;
    anyhow::ensure!(ok, "expected {n} providers, have {:?}", client.invoker().providers());
    Ok(())
}

fn share(tally: &Tally, name: &str) -> f64 {
    let served = tally.served.lock().expect("tally");
    let total: u64 = served.values().sum();
    served.get(name).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    let cs = Proc::start(&[
        "serve-configserver",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--startup-grace-ms",
        "0",
        "--store",
        "sqlite::memory:",
    ])?;
    let registry: SocketAddr = cs.words.get(2).context("configserver address")?.parse()?;
    let (fast, slow) = (args.delay_ms, args.delay_ms * 10);
    println!(
        "failover benchmark: {} calls/s for {} s; providers a, b ({fast} ms) and c ({slow} ms, 10x slower); \
         kill -9 a at 1/4, start d at 1/2, stop b gracefully at 3/4",
        args.rate, args.duration
    );
    let a = Proc::provider(registry, "a", fast)?;
    let b = Proc::provider(registry, "b", fast)?;
    let c = Proc::provider(registry, "c", slow)?;
    let client = new_client(registry, Balance::P2c)?;
    wait_providers(&client, 3).await?;

    let tally = Arc::new(Tally::default());
    let duration = Duration::from_secs_f64(args.duration);
    let load = steady(&client, args.rate, duration, &tally);
    let events = async {
        let quarter = duration / 4;
        tokio::time::sleep(quarter).await;
        a.process.signal(Signal::KILL)?;
        tokio::time::sleep(quarter).await;
        let d_started = Instant::now();
        let d = Proc::provider(registry, "d", fast)?;
        tokio::time::sleep(quarter).await;
        b.process.signal(Signal::TERM)?;
        anyhow::Ok((d, d_started))
    };
    let ((), events) = tokio::join!(load, events);
    let (_d, d_started) = events?;
    let new_provider_ms = tally
        .first_seen
        .lock()
        .expect("tally")
        .get("d")
        .map_or(f64::NAN, |t| t.duration_since(d_started).as_secs_f64() * 1e3);
    let calls = tally.calls.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let slow_share_p2c = share(&tally, "c");
    println!(
        "main run (P2C): {calls} calls, {failed} failed; slow provider's share {slow_share_p2c:.3}; served: {:?}",
        tally.served.lock().expect("tally")
    );
    println!("new provider d served its first call {new_provider_ms:.0} ms after it was started");
    drop((b, c));

    // Steady runs per balancer: two normal providers and a 10x slower one.
    let _e = Proc::provider(registry, "e", fast)?;
    let _f = Proc::provider(registry, "f", fast)?;
    let _g = Proc::provider(registry, "slow", slow)?;
    let mut shares = BTreeMap::new();
    for (name, balance) in [
        ("random", Balance::Random),
        ("round_robin", Balance::RoundRobin),
        ("least_active", Balance::LeastActive),
        ("shortest_response", Balance::ShortestResponse),
        ("p2c", Balance::P2c),
    ] {
        let client = new_client(registry, balance)?;
        // d from the main run is still up: wait for it plus e, f, slow.
        wait_providers(&client, 4).await?;
        let tally = Arc::new(Tally::default());
        steady(
            &client,
            args.rate,
            Duration::from_secs_f64(args.balancer_duration),
            &tally,
        )
        .await;
        let share = share(&tally, "slow");
        println!("{name:<18} slow provider's share {share:.3} (of 4 providers; fair share 0.25)");
        shares.insert(name, share);
    }
    drop(cs);
    println!(
        "RESULT failover calls={calls} failed={failed} slow_share_p2c={:.3} slow_share_least_active={:.3} new_provider_ms={new_provider_ms:.0}",
        shares["p2c"], shares["least_active"]
    );
    Ok(())
}
