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

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use rpc_core::ServiceKey;
use rpc_core::registry::{Addr, ProviderList, RegistrySession, Role};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use zookeeper_client as zk;

use crate::convergence::{AddressSet, Arrivals, Observer};
use crate::etcd::{self, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient};
use crate::proc_stats::{self, CpuClock};
use crate::registry::{self, Server};
use crate::{plot, wire};

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

/// Failure detection of the peers' sessions (see the module docs).
const ZK_SESSION_TIMEOUT: Duration = Duration::from_secs(4);
const ETCD_LEASE_TTL_S: i64 = 3;
/// Bound on connecting or on one request to a peer.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// One system's results.
struct Report {
    system: System,
    /// Push latency of every change, ms.
    push_ms: Vec<f64>,
    push_p50: f64,
    push_p99: f64,
    /// The storms, in the order run.
    storms: Vec<Storm>,
    /// Wire bytes per change per subscriber, if `ss` could count them.
    bytes_per_change: Option<f64>,
    push_cpu_s: f64,
    /// This process's over the push phase (every client, and the checks).
    push_clients_cpu_s: f64,
    /// The server's, per storm.
    storm_cpu_s: f64,
    /// This process's (every provider's and subscriber's client), per storm.
    storm_clients_cpu_s: f64,
    rss_kb: u64,
}

/// One storm's outcome.
struct Storm {
    /// When each subscriber converged, ms (sorted; the last is the storm's
    /// convergence time).
    each_ms: Vec<f64>,
    /// Until the server acknowledged every change of the storm, ms.
    acked_ms: f64,
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

    fn storm_ms(&self) -> f64 {
        self.median_storm().ms()
    }
}

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

// === targets ===

/// A running registry to measure: its address and server process.
enum Target {
    Tern(Server),
    Zookeeper { addr: SocketAddr, pid: u32 },
    Etcd { addr: SocketAddr, pid: u32 },
}

impl Target {
    async fn prepare(system: System, args: &PeersArgs) -> anyhow::Result<Target> {
        let not_running = |what: &str| {
            format!(
                "{what} is not running (looked for its pid under {}): start the peers with `crates/bench/peers.sh start` (it installs Debian's zookeeper and etcd-server if missing), or leave it out with --systems",
                args.peers_dir.display()
            )
        };
        Ok(match system {
            System::Tern => {
                let extra: Vec<String> = match args.coalesce_ms {
                    Some(ms) => vec!["--coalesce-ms".into(), ms.to_string()],
                    None => Vec::new(),
                };
                Target::Tern(Server::start_with(&extra)?)
            }
            System::Zookeeper => {
                let pid = peer_pid(&args.peers_dir, "zookeeper").with_context(|| not_running("ZooKeeper"))?;
                zk_connect(args.zookeeper)
                    .await
                    .with_context(|| not_running(&format!("ZooKeeper at {}", args.zookeeper)))?;
                Target::Zookeeper {
                    addr: args.zookeeper,
                    pid,
                }
            }
            System::Etcd => {
                let pid = peer_pid(&args.peers_dir, "etcd").with_context(|| not_running("etcd"))?;
                etcd_channel(args.etcd)
                    .await
                    .with_context(|| not_running(&format!("etcd at {}", args.etcd)))?;
                Target::Etcd { addr: args.etcd, pid }
            }
        })
    }

    fn pid(&self) -> u32 {
        match self {
            Target::Tern(server) => server.child.id(),
            Target::Zookeeper { pid, .. } | Target::Etcd { pid, .. } => *pid,
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Target::Tern(server) => server.addr,
            Target::Zookeeper { addr, .. } | Target::Etcd { addr, .. } => *addr,
        }
    }

    fn port(&self) -> u16 {
        self.addr().port()
    }

    /// `n` provider sessions of `system` (this target's), opened on (and
    /// run by) `runtime`.
    async fn providers(&self, system: System, n: usize, runtime: &Handle) -> anyhow::Result<Providers> {
        let addr = self.addr();
        let mut sessions = Vec::new();
        for i in 0..n.max(1) {
            let session = runtime.spawn(async move {
                anyhow::Ok(match system {
                    System::Tern => {
                        let session = registry::session(addr, &format!("provider-{i}"), Role::Provider);
                        registry::connected(std::slice::from_ref(&session)).await?;
                        ProviderSession::Tern(session)
                    }
                    System::Zookeeper => ProviderSession::Zookeeper(zk_connect(addr).await?),
                    System::Etcd => ProviderSession::Etcd(EtcdProvider::start(addr).await?),
                })
            });
            sessions.push(session.await??);
        }
        Ok(Providers {
            sessions: Arc::new(sessions),
            runtime: runtime.clone(),
        })
    }

    /// `n` subscribers of `service`, each with its own connection and an
    /// observer from `arrivals`. Their first lists may still be on their
    /// way: the goal of holding them is timed next.
    async fn subscribers(&self, service: &str, n: usize, arrivals: &mut Arrivals) -> anyhow::Result<Subscribers> {
        let mut subs = Subscribers::default();
        match self {
            Target::Tern(server) => {
                let sessions: Vec<_> = (0..n)
                    .map(|i| registry::session(server.addr, &format!("consumer-{i}"), Role::Consumer))
                    .collect();
                registry::connected(&sessions).await?;
                let key = tern_key(service);
                for session in &sessions {
                    let observer = arrivals.observer();
                    subs.tern
                        .push(session.subscribe_with(&key, move |list| observer.saw(list)));
                }
                subs.sessions = sessions;
            }
            Target::Zookeeper { addr, .. } => {
                for _ in 0..n {
                    let client = zk_connect(*addr).await?;
                    let (tx, rx) = watch::channel(Arc::new(BTreeSet::new()));
                    subs.tasks
                        .spawn(zk_watch(client, zk_dir(service), tx, arrivals.observer()));
                    subs.sets.push(rx);
                }
            }
            Target::Etcd { addr, .. } => {
                for _ in 0..n {
                    let channel = etcd_channel(*addr).await?;
                    let (tx, rx) = watch::channel(Arc::new(BTreeSet::new()));
                    let first = etcd_read(&channel, service).await?;
                    subs.tasks
                        .spawn(etcd_watch(channel, service.to_owned(), first, tx, arrivals.observer()));
                    subs.sets.push(rx);
                }
            }
        }
        Ok(subs)
    }
}

/// The pid `peers.sh` wrote for `name`, if that process is alive.
fn peer_pid(dir: &Path, name: &str) -> anyhow::Result<u32> {
    let file = dir.join(name).join("pid");
    let pid: u32 = std::fs::read_to_string(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", file.display()))?;
    anyhow::ensure!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "{name} (pid {pid} from {}) has exited",
        file.display()
    );
    Ok(pid)
}

/// Subscribers of one system and their current views.
#[derive(Default)]
struct Subscribers {
    sessions: Vec<RegistrySession>,
    tern: Vec<watch::Receiver<Arc<ProviderList>>>,
    sets: Vec<watch::Receiver<Arc<BTreeSet<String>>>>,
    /// The peers' watch loops; aborted when dropped.
    tasks: JoinSet<()>,
}

impl Subscribers {
    fn len(&self) -> usize {
        self.tern.len() + self.sets.len()
    }

    /// Sets `goal`, runs `act`, and returns when each subscriber reached it.
    async fn time_each(
        &self,
        arrivals: &Arrivals,
        goal: u64,
        act: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Vec<Duration>> {
        if self.tern.is_empty() {
            arrivals.time_each(goal, &self.sets, act).await
        } else {
            arrivals.time_each(goal, &self.tern, act).await
        }
    }

    async fn time(
        &self,
        arrivals: &Arrivals,
        goal: u64,
        act: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Duration> {
        let each = self.time_each(arrivals, goal, act).await?;
        Ok(each.last().copied().unwrap_or_default())
    }
}

// === provider sessions ===

enum ProviderSession {
    Tern(RegistrySession),
    Zookeeper(zk::Client),
    Etcd(EtcdProvider),
}

impl ProviderSession {
    async fn register(&self, service: &str, port: u16) -> anyhow::Result<()> {
        match self {
            ProviderSession::Tern(session) => {
                session
                    .register(&tern_key(service), registry::instance(port.into()))
                    .await?;
            }
            ProviderSession::Zookeeper(client) => {
                let options = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
                let path = format!("{}/{}", zk_dir(service), url_encode(&provider_url(service, port)));
                client.create(&path, b"", &options).await?;
            }
            ProviderSession::Etcd(provider) => {
                let request = etcd::PutRequest {
                    key: etcd_key(service, port).into_bytes(),
                    value: provider_url(service, port).into_bytes(),
                    lease: provider.lease,
                };
                provider.kv.clone().put(request).await?;
            }
        }
        Ok(())
    }

    async fn unregister(&self, service: &str, port: u16) -> anyhow::Result<()> {
        match self {
            ProviderSession::Tern(session) => session.unregister(&tern_key(service), "127.0.0.1", port).await?,
            ProviderSession::Zookeeper(client) => {
                let path = format!("{}/{}", zk_dir(service), url_encode(&provider_url(service, port)));
                client.delete(&path, None).await?;
            }
            ProviderSession::Etcd(provider) => {
                let request = etcd::DeleteRangeRequest {
                    key: etcd_key(service, port).into_bytes(),
                    range_end: Vec::new(),
                };
                provider.kv.clone().delete_range(request).await?;
            }
        }
        Ok(())
    }
}

/// The runtime the providers' clients run on, one thread of its own, as
/// they would run in processes of their own: on the subscribers' runtime, a
/// storm's requests (and their acks) waited behind a hundred subscribers'
/// tasks applying its first changes, and the last was acknowledged 13-19
/// ms after the storm began (4-8 ms here). Every system's provider
/// sessions run here; a probe's request is made from the bench's task.
struct ProvidersRuntime(Option<tokio::runtime::Runtime>);

impl ProvidersRuntime {
    fn start() -> anyhow::Result<ProvidersRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("providers")
            .enable_all()
            .build()
            .context("starting the providers' runtime")?;
        Ok(ProvidersRuntime(Some(runtime)))
    }

    fn handle(&self) -> &Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for ProvidersRuntime {
    fn drop(&mut self) {
        // Dropped inside the bench's own runtime, where a runtime may not
        // wait for its tasks.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// One system's provider sessions, run by the providers' runtime.
struct Providers {
    sessions: Arc<Vec<ProviderSession>>,
    runtime: Handle,
}

impl Providers {
    /// The session probe `p` registers through.
    fn for_probe(&self, p: usize) -> &ProviderSession {
        &self.sessions[p % self.sessions.len()]
    }
}

/// Registers `ports` of `service` over the providers' sessions, all at once.
async fn register_all(providers: &Providers, service: &str, ports: &[u16]) -> anyhow::Result<()> {
    change_all(providers, service, ports, true).await
}

/// Registers (or removes) a provider on each of `ports` at once, each from a
/// task of its own on the providers' runtime.
async fn change_all(providers: &Providers, service: &str, ports: &[u16], register: bool) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    for &port in ports {
        let (sessions, service) = (providers.sessions.clone(), service.to_owned());
        tasks.spawn_on(
            async move {
                // By port: a provider leaves through the session it joined on
                // (this framework's ConfigServer lets only that session remove
                // it).
                let session = &sessions[usize::from(port) % sessions.len()];
                if register {
                    session.register(&service, port).await
                } else {
                    session.unregister(&service, port).await
                }
            },
            &providers.runtime,
        );
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}

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

// === ZooKeeper ===

async fn zk_connect(addr: SocketAddr) -> anyhow::Result<zk::Client> {
    let cluster = addr.to_string();
    let connect = zk::Client::connector()
        .with_session_timeout(ZK_SESSION_TIMEOUT)
        .connect(&cluster);
    Ok(tokio::time::timeout(REQUEST_LIMIT, connect)
        .await
        .with_context(|| format!("connecting to ZooKeeper at {addr}"))??)
}

fn zk_dir(service: &str) -> String {
    format!("/dubbo/{service}/providers")
}

/// Percent-encodes everything but unreserved characters, as Dubbo's
/// `URL.encode` (Java's `URLEncoder`) does for node names.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `host:port` of a node name made by [`url_encode`]`(`[`provider_url`]`)`.
fn zk_node_address(node: &str) -> Option<String> {
    let rest = node.split_once("%3A%2F%2F")?.1;
    let authority = rest.split_once("%2F")?.0;
    Some(authority.replace("%3A", ":"))
}

/// A Dubbo-style subscriber: read the children with a watch, publish them,
/// wait for the watch, read again. Ends when its task is aborted or the
/// session fails.
async fn zk_watch(client: zk::Client, dir: String, view: watch::Sender<Arc<BTreeSet<String>>>, observer: Observer) {
    loop {
        let (children, _, watcher) = match client.get_and_watch_children(&dir).await {
            Ok(read) => read,
            Err(e) => {
                eprintln!("zookeeper subscriber: reading {dir}: {e}");
                return;
            }
        };
        let children: Arc<BTreeSet<String>> = Arc::new(children.iter().filter_map(|c| zk_node_address(c)).collect());
        view.send_replace(children.clone());
        observer.saw(&*children);
        watcher.changed().await;
    }
}

/// Creates the persistent parents of `service`'s provider directory.
async fn zk_prepare(addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    let client = zk_connect(addr).await?;
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    client.mkdir(&zk_dir(service), &options).await?;
    Ok(())
}

// === etcd ===

async fn etcd_channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(REQUEST_LIMIT)
        .timeout(REQUEST_LIMIT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to etcd at {addr}"))
}

fn etcd_prefix(service: &str) -> String {
    format!("/tern/{service}/providers/")
}

fn etcd_key(service: &str, port: u16) -> String {
    format!("{}{}", etcd_prefix(service), address(port))
}

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // The prefix is ASCII ending in '/': its last byte can be incremented.
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

/// A provider's etcd session: a lease kept alive, which its keys carry.
struct EtcdProvider {
    kv: KvClient<Channel>,
    lease: i64,
    _keepalive: JoinSet<()>,
}

impl EtcdProvider {
    async fn start(addr: SocketAddr) -> anyhow::Result<EtcdProvider> {
        let channel = etcd_channel(addr).await?;
        let mut leases = LeaseClient::new(channel.clone());
        let grant = leases
            .lease_grant(etcd::LeaseGrantRequest {
                ttl: ETCD_LEASE_TTL_S,
                id: 0,
            })
            .await?
            .into_inner();
        anyhow::ensure!(grant.error.is_empty(), "etcd refused a lease: {}", grant.error);
        let lease = grant.id;
        let (tx, rx) = mpsc::channel(1);
        // etcd answers the call (headers included) only once a first
        // keep-alive arrives: queue it before waiting for the answer.
        tx.send(etcd::LeaseKeepAliveRequest { id: lease }).await?;
        let mut answers = leases.lease_keep_alive(ReceiverStream::new(rx)).await?.into_inner();
        let mut keepalive = JoinSet::new();
        keepalive.spawn(async move {
            // Renew at a third of the TTL, as etcd's clients do; stops when
            // the provider is dropped (the task is aborted) or etcd hangs up.
            let period = Duration::from_millis(ETCD_LEASE_TTL_S as u64 * 1000 / 3);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tokio::select! {
                    _ = tick.tick() => if tx.send(etcd::LeaseKeepAliveRequest { id: lease }).await.is_err() { return },
                    answer = answers.message() => if !matches!(answer, Ok(Some(_))) { return },
                }
            }
        });
        Ok(EtcdProvider {
            kv: KvClient::new(channel),
            lease,
            _keepalive: keepalive,
        })
    }
}

/// The prefix's addresses and the revision they were read at.
async fn etcd_read(channel: &Channel, service: &str) -> anyhow::Result<(BTreeSet<String>, i64)> {
    let prefix = etcd_prefix(service);
    let response = KvClient::new(channel.clone())
        .range(etcd::RangeRequest {
            key: prefix.clone().into_bytes(),
            range_end: prefix_end(&prefix),
            limit: 0,
            revision: 0,
        })
        .await?
        .into_inner();
    let revision = response.header.map_or(0, |h| h.revision);
    let addresses = response
        .kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(prefix.as_bytes()))
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Ok((addresses, revision))
}

/// An etcd subscriber: from the list read at `revision`, apply every watch
/// event after it. Ends when its task is aborted or the watch fails.
async fn etcd_watch(
    channel: Channel,
    service: String,
    (addresses, revision): (BTreeSet<String>, i64),
    view: watch::Sender<Arc<BTreeSet<String>>>,
    observer: Observer,
) {
    let addresses = Arc::new(addresses);
    view.send_replace(addresses.clone());
    observer.saw(&*addresses);
    let prefix = etcd_prefix(&service);
    let create = etcd::WatchRequest {
        request_union: Some(etcd::watch_request::RequestUnion::CreateRequest(
            etcd::WatchCreateRequest {
                key: prefix.clone().into_bytes(),
                range_end: prefix_end(&prefix),
                start_revision: revision + 1,
            },
        )),
    };
    // The request stream stays open (`_requests`): etcd ends the watch when
    // the client closes its side.
    let (_requests, rx) = mpsc::channel::<etcd::WatchRequest>(1);
    let requests = tokio_stream::once(create).chain(ReceiverStream::new(rx));
    let mut stream = match WatchClient::new(channel).watch(requests).await {
        Ok(response) => response.into_inner(),
        Err(e) => {
            eprintln!("etcd subscriber: watching {prefix}: {e}");
            return;
        }
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return,
            Err(e) => {
                eprintln!("etcd subscriber: watch of {prefix} failed: {e}");
                return;
            }
        };
        if response.canceled {
            eprintln!(
                "etcd subscriber: watch of {prefix} canceled: {}",
                response.cancel_reason
            );
            return;
        }
        if response.events.is_empty() {
            continue;
        }
        // In place: the set is shared with no one between borrows, so
        // `make_mut` does not copy it (a copy per event would make the
        // bench, not etcd, the bottleneck of a storm).
        view.send_modify(|view| {
            let addresses = Arc::make_mut(view);
            for event in &response.events {
                let Some(kv) = &event.kv else { continue };
                let Some(addr) = kv.key.strip_prefix(prefix.as_bytes()) else {
                    continue;
                };
                let addr = String::from_utf8_lossy(addr).into_owned();
                if event.r#type == etcd::event::EventType::Delete as i32 {
                    addresses.remove(&addr);
                } else {
                    addresses.insert(addr);
                }
            }
        });
        observer.saw(&**view.borrow());
    }
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

fn print_table(reports: &[Report]) {
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

fn write_plots(dir: &Path, reports: &[Report]) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zookeeper_node_names_round_trip_the_address() {
        let node = url_encode(&provider_url("bench.Probe", 40_001));
        assert!(!node.contains('/'), "{node}");
        assert_eq!(zk_node_address(&node).as_deref(), Some("127.0.0.1:40001"));
    }

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
    }
}
