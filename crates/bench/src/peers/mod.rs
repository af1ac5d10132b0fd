//! `bench peers`: the same discovery workload on the ConfigServer,
//! ZooKeeper and etcd, one after another, all on loopback.
//!
//! The peers are started beforehand by `crates/bench/peers.sh start`
//! (Debian's `zookeeper` and `etcd-server`); this framework's ConfigServer
//! runs in a child process as in `bench registry`. For each system:
//!
//! 1. **Push**: `--subscribers` sessions watch a probe service holding
//!    `--base-providers` providers. `--probes` times, a provider registers a
//!    new instance, and later removes it; each change is one sample: the time
//!    until the *last* subscriber's view holds the change. `--warmup-probes`
//!    probes before them are not measured.
//! 2. **Storm**: `--storm-providers` providers of one service, watched by
//!    `--storm-subscribers` sessions; 10% (the oldest) are removed and as
//!    many new ones added at once; a storm's time is until every subscriber
//!    holds exactly the new set. `--storms` storms run one after another
//!    (each once the last has converged); `storm` is the median one, as one
//!    storm alone is a single sample of a wide distribution for every
//!    system. The slowest is reported beside it.
//!
//! How each system is used is how its registries use it:
//!
//! - **tern**: the SDKs' `RegistrySession` (one natively framed stream per
//!   session); the server pushes deltas, and the SDK's list listener
//!   observes each applied one.
//! - **ZooKeeper**: Dubbo's layout, `/dubbo/<service>/providers/<URL-encoded
//!   provider URL>` as ephemeral nodes of the provider's session. A
//!   subscriber reads the children with a watch; when the watch fires it
//!   re-reads all children with a new watch (what Dubbo's Curator client
//!   does), and only then sees the change.
//! - **etcd**: `/tern/<service>/providers/<host:port>` keys attached to the
//!   provider session's lease (kept alive); a subscriber reads the prefix and
//!   then watches it from the next revision, applying each event as etcd's
//!   own clients do (no re-read: the most favourable use of etcd).
//!
//! Every subscriber's view is observed on the task that applied the change
//! (see `convergence.rs`): no task of the bench's own sits between a
//! system's client and the clock. The subscribers' clients run on the
//! bench's runtime, the providers' on a runtime of their own (one thread),
//! as they would in processes of their own.
//!
//! Provider sessions (`--provider-sessions`) carry many registrations each,
//! and failure detection is set alike (about 3-4 s): tern's heartbeat
//! timeout 3 s, ZooKeeper's session timeout 4 s (its minimum, 2 ticks), etcd
//! lease TTL 3 s.
//!
//! Measured beside the latencies: the server process's CPU time over each
//! phase (`/proc/<pid>/stat`), its RSS, and the TCP payload bytes of all of
//! the server's established connections over the push phase, both
//! directions, as the kernel counts them per socket (`ss -ti`:
//! `bytes_sent` + `bytes_received`), divided by changes x subscribers.
//!
//! Last line:
//! `RESULT peers push_p99_vs_zk=<x> push_p99_vs_etcd=<x> storm_vs_zk=<x> storm_vs_etcd=<x>`
//! (this framework / peer; lower is better).
//!
//! # Layout
//!
//! - this file: the flags, the flow that measures each system in turn
//!   (push, then storms) and the `RESULT` line, and how a provider is named;
//! - [`target`]: a running system to measure, and its subscribers;
//! - [`providers`]: the provider sessions and the runtime they run on;
//! - [`zookeeper`], [`etcd`]: each peer's client, as its registries use it
//!   (this framework's is the SDK's `RegistrySession`, via `registry.rs`);
//! - [`report`]: one system's results, the table and the plots.

mod etcd;
mod providers;
mod report;
mod target;
#[cfg(test)]
mod tests;
mod zookeeper;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use rpc_core::ServiceKey;
use rpc_core::registry::Addr;
use tokio::runtime::Handle;

use crate::convergence::{AddressSet, Arrivals};
use crate::proc_stats::{self, CpuClock};
use crate::wire;

use self::providers::{ProvidersRuntime, change_all, register_all};
use self::report::{Report, Storm, print_table, write_plots};
use self::target::Target;
use self::zookeeper::zk_prepare;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    Tern,
    Zookeeper,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Tern => "tern",
            System::Zookeeper => "zookeeper",
            System::Etcd => "etcd",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct PeersArgs {
    /// Sessions watching the probe service.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Providers the probe service holds throughout.
    #[arg(long, default_value_t = 10)]
    base_providers: usize,
    /// Probe providers: each registers, then leaves (two changes).
    #[arg(long, default_value_t = 100)]
    probes: usize,
    /// Probes made before the measured ones, not counted in any column:
    /// the first changes after a thousand sessions opened find every
    /// process's caches and buffers cold.
    #[arg(long, default_value_t = 5)]
    warmup_probes: usize,
    #[arg(long, default_value_t = 2000)]
    storm_providers: usize,
    #[arg(long, default_value_t = 100)]
    storm_subscribers: usize,
    /// Storms run one after another on the same subscribers; the ratios
    /// compare each system's median storm.
    #[arg(long, default_value_t = 5)]
    storms: usize,
    /// Provider sessions the registrations are spread over.
    #[arg(long, default_value_t = 20)]
    provider_sessions: usize,
    #[arg(long, default_value = "127.0.0.1:2181")]
    zookeeper: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:2379")]
    etcd: SocketAddr,
    /// Where `crates/bench/peers.sh` keeps the peers' pid files.
    #[arg(long, env = "PEERS_DIR", default_value = "/tmp/tern-peers")]
    peers_dir: PathBuf,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tern,zookeeper,etcd")]
    systems: Vec<System>,
    /// The ConfigServer's push coalescing window (its default, 5 ms, unless
    /// given): part of every push-latency sample of this framework.
    #[arg(long)]
    coalesce_ms: Option<u64>,
    /// Write PNG plots (push latency, storm convergence) into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// The ports of the providers: the storm service's from 20,000, the
/// probes' from 40,000, those the storms add from 50,000.
const FRESH_PORTS: usize = 50_000;

/// Whether the flags leave every provider its own port.
fn check_ports(args: &PeersArgs) -> anyhow::Result<()> {
    let replaced = args.storm_providers / 10;
    anyhow::ensure!(
        replaced > 0 && args.storms > 0,
        "--storm-providers must be at least 10 and --storms at least 1"
    );
    anyhow::ensure!(
        args.storm_providers <= 20_000
            && args.base_providers <= 20_000
            && args.warmup_probes.saturating_add(args.probes) <= 10_000,
        "at most 20,000 storm providers, 20,000 base providers and 10,000 probes (with the warm-up ones)"
    );
    let last = FRESH_PORTS + args.storms * replaced - 1;
    anyhow::ensure!(
        last <= usize::from(u16::MAX),
        "{} storms of {replaced} new providers need ports {FRESH_PORTS}-{last}: more than there are",
        args.storms
    );
    Ok(())
}

/// Bound on connecting or on one request to a peer.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

pub async fn run(args: PeersArgs) -> anyhow::Result<()> {
    println!(
        "peers benchmark: {} subscribers of a service with {} providers, {} probes (join + leave) after {} not measured; storm of {} providers / {} subscribers; {} provider sessions; configserver coalescing {}",
        args.subscribers,
        args.base_providers,
        args.probes,
        args.warmup_probes,
        args.storm_providers,
        args.storm_subscribers,
        args.provider_sessions,
        args.coalesce_ms
            .map_or("default (5 ms)".into(), |ms| format!("{ms} ms")),
    );
    check_ports(&args)?;
    // Fail before measuring anything if a peer is missing.
    let mut targets = Vec::new();
    for &system in &args.systems {
        targets.push((system, Target::prepare(system, &args).await?));
    }
    let providers_runtime = ProvidersRuntime::start()?;
    let mut reports = Vec::new();
    for (system, target) in targets {
        eprintln!("measuring {} ...", system.name());
        let report = measure(system, &target, &args, providers_runtime.handle())
            .await
            .with_context(|| format!("measuring {}", system.name()))?;
        reports.push(report);
        drop(target);
    }
    print_table(&reports);
    if let Some(dir) = &args.plot {
        write_plots(dir, &reports)?;
    }

    let find = |s: System| reports.iter().find(|r| r.system == s);
    let ratio = |f: fn(&Report) -> f64, peer: System| match (find(System::Tern), find(peer)) {
        (Some(ours), Some(theirs)) if f(theirs) > 0.0 => format!("{:.3}", f(ours) / f(theirs)),
        _ => "n/a".into(),
    };
    println!(
        "RESULT peers push_p99_vs_zk={} push_p99_vs_etcd={} storm_vs_zk={} storm_vs_etcd={}",
        ratio(|r| r.push_p99, System::Zookeeper),
        ratio(|r| r.push_p99, System::Etcd),
        ratio(Report::storm_ms, System::Zookeeper),
        ratio(Report::storm_ms, System::Etcd),
    );
    Ok(())
}

// === the workload ===

async fn measure(
    system: System,
    target: &Target,
    args: &PeersArgs,
    providers_runtime: &Handle,
) -> anyhow::Result<Report> {
    let pid = target.pid();
    let probe = "bench.Probe";
    let storm = "bench.Storm";
    if let Target::Zookeeper { addr, .. } = target {
        zk_prepare(*addr, probe).await?;
        zk_prepare(*addr, storm).await?;
    }
    let providers = target
        .providers(system, args.provider_sessions, providers_runtime)
        .await?;
    let base: Vec<u16> = (0..args.base_providers).map(|k| 20_000 + k as u16).collect();
    register_all(&providers, probe, &base).await?;

    // 1. Push.
    let base_set: Arc<AddressSet> = Arc::new(base.iter().map(|&p| address(p)).collect());
    let mut arrivals = Arrivals::new(move |goal, view, look| {
        // Goal 1: the base list; then 2 x port + 1 when a probe joined, 2 x port when it left.
        if goal == 1 {
            return base_set.seen_in(view, look);
        }
        let port = (goal / 2) as u16;
        // Built inline: this runs for every subscriber after every change.
        view.has(&Addr::new("127.0.0.1", port.into())) == (goal % 2 == 1)
    });
    let subscribers = target.subscribers(probe, args.subscribers, &mut arrivals).await?;
    subscribers.time(&arrivals, 1, async { Ok(()) }).await?;
    let rss_kb = proc_stats::rss_kb(pid)?;

    // Probe `p` joins, then leaves: how long each change took to reach every subscriber.
    let probe_once = |p: usize| {
        let (subscribers, arrivals) = (&subscribers, &arrivals);
        let port = 40_000 + p as u16;
        let session = providers.for_probe(p);
        async move {
            let mut took = [Duration::ZERO; 2];
            for (joined, took) in [true, false].into_iter().zip(&mut took) {
                let goal = 2 * u64::from(port) + u64::from(joined);
                *took = subscribers
                    .time(arrivals, goal, async {
                        if joined {
                            session.register(probe, port).await
                        } else {
                            session.unregister(probe, port).await
                        }
                    })
                    .await
                    .with_context(|| format!("probe {p} ({})", if joined { "join" } else { "leave" }))?;
            }
            anyhow::Ok(took)
        }
    };
    for p in 0..args.warmup_probes {
        probe_once(args.probes + p).await?;
    }

    let bytes_before = wire::server_bytes(target.port());
    let cpu_before = CpuClock::read(pid)?;
    let clients_before = CpuClock::read(std::process::id())?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut push_ms = Vec::new();
    for p in 0..args.probes {
        for took in probe_once(p).await? {
            latency.record(took.as_micros().max(1) as u64)?;
            push_ms.push(took.as_secs_f64() * 1e3);
        }
    }
    let push_cpu_s = CpuClock::read(pid)?.since(&cpu_before);
    let push_clients_cpu_s = CpuClock::read(std::process::id())?.since(&clients_before);
    let bytes_per_change = match (bytes_before, wire::server_bytes(target.port())) {
        (Ok(before), Ok(after)) => {
            let changes = (2 * args.probes * subscribers.len()).max(1) as f64;
            Some(wire::delta(&before, &after) as f64 / changes)
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("bytes on the wire not counted: {e:#}");
            None
        }
    };
    drop(subscribers);
    drop(arrivals);
    let push_p50 = latency.value_at_quantile(0.5) as f64 / 1e3;
    let push_p99 = latency.value_at_quantile(0.99) as f64 / 1e3;

    // 2. Storms, one after another: each replaces the oldest tenth of the
    // current set with new providers.
    let replaced = args.storm_providers / 10;
    let initial: Vec<u16> = (0..args.storm_providers).map(|k| 20_000 + k as u16).collect();
    register_all(&providers, storm, &initial).await?;
    // The set each storm leaves (index 0: before the first). The oldest
    // (lowest) go and the new come above every port: what the quick look
    // at a view relies on (see `Look::Quick`).
    let mut sets = vec![initial.clone()];
    for s in 0..args.storms {
        let current = &sets[s];
        let fresh = (0..replaced).map(|k| (FRESH_PORTS + s * replaced + k) as u16);
        sets.push(current[replaced..].iter().copied().chain(fresh).collect());
    }
    let goals: Vec<AddressSet> = sets
        .iter()
        .map(|set| set.iter().map(|&p| address(p)).collect())
        .collect();
    // Goal g (from 1): holding exactly sets[g - 1].
    let mut arrivals = Arrivals::new(move |goal, view, look| goals[goal as usize - 1].seen_in(view, look));
    let subscribers = target.subscribers(storm, args.storm_subscribers, &mut arrivals).await?;
    subscribers.time(&arrivals, 1, async { Ok(()) }).await?;
    let cpu_before = CpuClock::read(pid)?;
    let clients_before = CpuClock::read(std::process::id())?;
    let mut storms = Vec::with_capacity(args.storms);
    for s in 0..args.storms {
        let (gone, fresh) = (&sets[s][..replaced], &sets[s + 1][args.storm_providers - replaced..]);
        let mut acked = Duration::ZERO;
        let each = subscribers
            .time_each(&arrivals, s as u64 + 2, async {
                let start = std::time::Instant::now();
                tokio::try_join!(
                    change_all(&providers, storm, gone, false),
                    change_all(&providers, storm, fresh, true)
                )?;
                acked = start.elapsed();
                Ok(())
            })
            .await
            .with_context(|| format!("storm {}", s + 1))?;
        storms.push(Storm {
            each_ms: each.iter().map(|d| d.as_secs_f64() * 1e3).collect(),
            acked_ms: acked.as_secs_f64() * 1e3,
        });
    }
    let storm_cpu_s = CpuClock::read(pid)?.since(&cpu_before) / args.storms as f64;
    let storm_clients_cpu_s = CpuClock::read(std::process::id())?.since(&clients_before) / args.storms as f64;
    drop(subscribers);
    drop(arrivals);

    // Leave the peer as it was found, for the next run.
    change_all(&providers, storm, &sets[args.storms], false).await?;
    change_all(&providers, probe, &base, false).await?;

    Ok(Report {
        system,
        push_ms,
        push_p50,
        push_p99,
        storms,
        storm_clients_cpu_s,
        bytes_per_change,
        push_cpu_s,
        push_clients_cpu_s,
        storm_cpu_s,
        rss_kb,
    })
}

// === names ===

fn tern_key(service: &str) -> ServiceKey {
    ServiceKey::new(service, "1.0", "")
}

fn address(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// The provider's description, as a Dubbo URL carrying what this
/// framework's `Instance` carries (address, app, protocol, weight, start).
fn provider_url(service: &str, port: u16) -> String {
    static START_MS: OnceLock<u128> = OnceLock::new();
    let start = START_MS.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    });
    format!(
        "tern://127.0.0.1:{port}/{service}?application=bench-provider&side=provider&version=1.0&weight=100&timestamp={start}"
    )
}
