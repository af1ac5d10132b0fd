//! `bench registry`: the ConfigServer under many sessions.
//!
//! A ConfigServer runs in a child process (same code as the `configserver`
//! binary). This process opens the sessions with the SDKs' real registry
//! client ([`RegistrySession`]):
//!
//! 1. **Registration**: `--providers` provider sessions register
//!    `--services` x `--instances-per-service` instances, all at once;
//!    `registrations_per_s` is that count over the time until all are acked.
//! 2. **Push latency**: `--subscribers` sessions subscribe to one probe
//!    service (and each to one of the services above); then, `--probes`
//!    times, a provider registers a new probe instance and the time until the
//!    *last* subscriber's list holds it is recorded (p50/p99), with the
//!    encoded bytes the server pushed per subscriber per change.
//! 3. **RSS**: the server's resident memory after all sessions are up, less
//!    its memory before, per session.
//! 4. **Storm**: one service with `--storm-providers` providers, watched by
//!    `--storm-subscribers` sessions; 10% of the providers are replaced at
//!    once (unregister + register), and the time until every subscriber
//!    holds exactly the new set is `storm_converge_ms`.
//!
//! Last line:
//! `RESULT registry push_p99_ms=<n> storm_converge_ms=<n> bytes_per_change=<n> rss_kb_per_session=<n> registrations_per_s=<n>`
//! (with ` tls=on` when `--tls` ran every session over TLS).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use prost::Message;
use rpc_core::ServiceKey;
use rpc_core::net::ClientTls;
use rpc_core::registry::{RegistrySession, Role, SessionConfig};
use tern_e2e::Process;
use tern_proto::registry::Instance;

use crate::convergence::{AddressSet, Arrivals, follow};
use crate::tls::Pki;
use tokio::task::JoinSet;

#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    #[arg(long, default_value_t = 100)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    instances_per_service: usize,
    /// Provider sessions the instances are spread over.
    #[arg(long, default_value_t = 100)]
    providers: usize,
    /// Subscribing sessions.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Probe registrations for the push-latency measurement.
    #[arg(long, default_value_t = 100)]
    probes: usize,
    #[arg(long, default_value_t = 2000)]
    storm_providers: usize,
    #[arg(long, default_value_t = 100)]
    storm_subscribers: usize,
    /// Every session over TLS (the server's certificate only: the sessions
    /// are of a thousand apps, and mTLS would need a certificate each).
    #[arg(long)]
    tls: bool,
}

/// The ConfigServer child process (rules in memory), killed when dropped.
pub struct Server {
    process: Process,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// How its admin port is reached when it serves TLS.
    pub admin_tls: Option<ClientTls>,
}

impl Server {
    pub fn start() -> anyhow::Result<Server> {
        Server::start_with(&[])
    }

    /// Starts it with `extra` flags after the bench's own.
    pub fn start_with(extra: &[String]) -> anyhow::Result<Server> {
        Server::start_on("127.0.0.1:0".parse()?, extra)
    }

    /// Starts it on `listen` (a cluster's members are known ahead), with
    /// `extra` flags after the bench's own.
    pub fn start_on(listen: SocketAddr, extra: &[String]) -> anyhow::Result<Server> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args([
                "serve-configserver",
                "--listen",
                &listen.to_string(),
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--startup-grace-ms", "0", "--store", "sqlite::memory:"])
            .args(extra)
            .env("RUST_LOG", "error");
        let (process, words) = Process::spawn_ready(&mut command).context("starting the configserver process")?;
        anyhow::ensure!(words.len() == 5, "configserver printed {:?}", words.join(" "));
        Ok(Server {
            addr: words[2].parse()?,
            admin: words[4].parse()?,
            admin_tls: None,
            process,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn rss_kb(&self) -> anyhow::Result<u64> {
        crate::proc_stats::rss_kb(self.pid())
    }

    /// `GET path` on its admin port: `(status, body)`.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(self.admin).await?;
        let mut stream = match &self.admin_tls {
            Some(tls) => tls.connect(tcp, "127.0.0.1").await?,
            None => rpc_core::net::Stream::from(tcp),
        };
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await?;
        stream.flush().await?;
        let mut response = String::new();
        // A TLS peer may close without its close_notify once it has answered.
        if let Err(e) = stream.read_to_string(&mut response).await
            && response.is_empty()
        {
            return Err(e.into());
        }
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill_hard(&mut self) -> anyhow::Result<()> {
        self.process.kill_hard()?;
        Ok(())
    }

    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let (_, page) = self.get("/metrics").await?;
        let value = page
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .with_context(|| format!("no metric {name}"))?;
        Ok(value.trim().parse()?)
    }
}

pub fn session(server: SocketAddr, app: &str, role: Role) -> RegistrySession {
    session_with(server, app, role, None)
}

/// A session, over TLS if `tls`.
pub fn session_with(server: SocketAddr, app: &str, role: Role, tls: Option<&ClientTls>) -> RegistrySession {
    let mut config = SessionConfig::new([server.to_string()], app, role);
    config.request_timeout = Duration::from_secs(30);
    config.tls = tls.cloned();
    RegistrySession::start(config)
}

pub async fn connected(sessions: &[RegistrySession]) -> anyhow::Result<()> {
    for s in sessions {
        let mut rx = s.connected();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(Option::is_some))
            .await
            .context("session did not connect")??;
    }
    Ok(())
}

pub fn instance(port: u32) -> Instance {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Instance {
        host: "127.0.0.1".into(),
        port,
        weight: 100,
        app: "bench-provider".into(),
        protocol: "tern".into(),
        start_time_ms: now_ms,
        ..Instance::default()
    }
}

/// Registers `(key, instance)` pairs over `sessions`, all at once; returns
/// the time until every one was acknowledged.
pub async fn register_all(
    sessions: &[RegistrySession],
    items: Vec<(ServiceKey, Instance)>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, (key, instance)) in items.into_iter().enumerate() {
        let session = sessions[i % sessions.len()].clone();
        tasks.spawn(async move { session.register(&key, instance).await });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(start.elapsed())
}

pub async fn run(args: RegistryArgs) -> anyhow::Result<()> {
    let pki = args.tls.then(|| Pki::new("registry")).transpose()?;
    let mut server = match &pki {
        Some(pki) => Server::start_with(&pki.server_args_one_way())?,
        None => Server::start()?,
    };
    let tls = pki.as_ref().map(Pki::anonymous_client).transpose()?;
    server.admin_tls = tls.clone();
    let session = |addr, app: &str, role| session_with(addr, app, role, tls.as_ref());
    println!(
        "registry benchmark{}: {} services x {} instances over {} provider sessions, {} subscribers, storm of {} providers / {} subscribers",
        if args.tls { " over TLS" } else { "" },
        args.services,
        args.instances_per_service,
        args.providers,
        args.subscribers,
        args.storm_providers,
        args.storm_subscribers
    );
    let rss_before = server.rss_kb()?;

    // 1. Registration.
    let providers: Vec<_> = (0..args.providers.max(1))
        .map(|i| session(server.addr, &format!("provider-{i}"), Role::Provider))
        .collect();
    connected(&providers).await?;
    let service = |i: usize| ServiceKey::new(format!("bench.Service{i}"), "1.0", "");
    let items: Vec<_> = (0..args.services * args.instances_per_service)
        .map(|k| (service(k / args.instances_per_service), instance(10_000 + k as u32)))
        .collect();
    let count = items.len();
    let took = register_all(&providers, items).await?;
    let registrations_per_s = count as f64 / took.as_secs_f64();
    println!(
        "registration: {count} instances acked in {:.1} ms ({registrations_per_s:.0}/s)",
        took.as_secs_f64() * 1e3
    );

    // 2. Push latency.
    let probe = ServiceKey::new("bench.Probe", "1.0", "");
    let subscribers: Vec<_> = (0..args.subscribers)
        .map(|i| session(server.addr, &format!("consumer-{i}"), Role::Consumer))
        .collect();
    connected(&subscribers).await?;
    let mut receivers = Vec::new();
    let mut followers = Vec::new();
    // Held to the end: a list nobody watches is unsubscribed at the next heartbeat.
    let mut others = Vec::new();
    let mut arrivals = Arrivals::new(|port, list, _| list.has(&format!("127.0.0.1:{port}")));
    for (i, s) in subscribers.iter().enumerate() {
        let observer = arrivals.observer();
        let (follower, view) = follow(s, &probe, observer);
        followers.push(follower);
        receivers.push(view);
        others.push(s.subscribe(&service(i % args.services.max(1))));
    }
    let rss_after = server.rss_kb()?;
    let sessions = providers.len() + subscribers.len();
    let rss_per_session = rss_after.saturating_sub(rss_before) as f64 / sessions as f64;
    println!(
        "memory: configserver RSS {rss_before} KiB -> {rss_after} KiB with {sessions} sessions ({rss_per_session:.1} KiB per session)"
    );

    // Let the initial snapshots (two per subscriber) go out before counting.
    let start = Instant::now();
    loop {
        let pushed = server.metric("configserver_pushed_snapshots_total").await?;
        if pushed >= 2 * subscribers.len() as u64 {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "initial snapshots not all pushed: {pushed} of {}",
            2 * subscribers.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let bytes_before = server.metric("configserver_pushed_bytes_total").await?;
    let (messages_before, direct_before) = (
        server.metric("configserver_pushed_messages_total").await?,
        server.metric("configserver_pushed_direct_total").await?,
    );
    let mut changed_entry_bytes = 0usize;
    for p in 0..args.probes {
        let port = 60_000 + p as u32;
        let probe_instance = instance(port);
        changed_entry_bytes += probe_instance.encoded_len();
        let took = arrivals
            .time(u64::from(port), &receivers, async {
                providers[0].register(&probe, probe_instance).await?;
                Ok(())
            })
            .await?;
        latency.record(took.as_micros() as u64)?;
    }
    let pushed = server.metric("configserver_pushed_bytes_total").await? - bytes_before;
    let messages = server.metric("configserver_pushed_messages_total").await? - messages_before;
    let direct = server.metric("configserver_pushed_direct_total").await? - direct_before;
    let deliveries = (args.probes * subscribers.len()) as f64;
    let bytes_per_change = pushed as f64 / deliveries;
    let entry_bytes = changed_entry_bytes as f64 / args.probes as f64;
    let push_p50 = latency.value_at_quantile(0.5) as f64 / 1e3;
    let push_p99 = latency.value_at_quantile(0.99) as f64 / 1e3;
    println!(
        "push: a registration reaches the last of {} subscribers in p50 {push_p50:.1} ms, p99 {push_p99:.1} ms (max {:.1} ms)",
        subscribers.len(),
        latency.max() as f64 / 1e3
    );
    println!(
        "push: {bytes_per_change:.0} bytes pushed per subscriber per change; the changed entry is {entry_bytes:.0} bytes"
    );
    println!("push: {direct} of {messages} pushes written by the flusher itself, the rest by the session's task");
    drop(arrivals);
    drop(subscribers);

    // 4. Storm.
    let storm = ServiceKey::new("bench.Storm", "1.0", "");
    let storm_sessions: Vec<_> = (0..20)
        .map(|i| session(server.addr, &format!("storm-{i}"), Role::Provider))
        .collect();
    connected(&storm_sessions).await?;
    let initial: Vec<_> = (0..args.storm_providers)
        .map(|k| (storm.clone(), instance(20_000 + k as u32)))
        .collect();
    let storm_took = register_all(&storm_sessions, initial).await?;
    let storm_rate = args.storm_providers as f64 / storm_took.as_secs_f64();
    println!(
        "storm: {} providers registered in {:.1} ms ({storm_rate:.0}/s)",
        args.storm_providers,
        storm_took.as_secs_f64() * 1e3
    );
    let watchers_sessions: Vec<_> = (0..args.storm_subscribers)
        .map(|i| session(server.addr, &format!("storm-consumer-{i}"), Role::Consumer))
        .collect();
    connected(&watchers_sessions).await?;
    let replaced = args.storm_providers / 10;
    let mut arrivals = storm_arrivals(args.storm_providers);
    let (_followers, receivers): (Vec<_>, Vec<_>) = watchers_sessions
        .iter()
        .map(|s| follow(s, &storm, arrivals.observer()))
        .unzip();
    arrivals.time(1, &receivers, async { Ok(()) }).await?;
    let converge = arrivals
        .time(
            2,
            &receivers,
            replace_a_tenth(&storm_sessions, &storm, args.storm_providers),
        )
        .await?;
    let storm_ms = converge.as_secs_f64() * 1e3;
    println!(
        "storm: {replaced} of {} providers replaced at once; all {} subscribers converged in {storm_ms:.1} ms",
        args.storm_providers, args.storm_subscribers
    );

    println!(
        "RESULT registry push_p99_ms={push_p99:.1} storm_converge_ms={storm_ms:.0} bytes_per_change={bytes_per_change:.0} rss_kb_per_session={rss_per_session:.1} registrations_per_s={:.0}{}",
        registrations_per_s,
        if args.tls { " tls=on" } else { "" }
    );
    Ok(())
}

/// The storm's goals for subscribers of a service of `providers`
/// providers at ports 20,000 and up: goal 1, all of them; goal 2, the
/// lowest tenth replaced by as many at 40,000 and up ([`replace_a_tenth`]).
/// The lowest ports go and the new come above every other: what the quick
/// look at a view relies on (see `Look::Quick`).
pub fn storm_arrivals(providers: usize) -> Arrivals {
    let replaced = providers / 10;
    let initial: AddressSet = (0..providers)
        .map(|k| format!("127.0.0.1:{}", 20_000 + k as u32))
        .collect();
    let expected: AddressSet = (replaced..providers)
        .map(|k| 20_000 + k as u32)
        .chain((0..replaced).map(|k| 40_000 + k as u32))
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    Arrivals::new(move |goal, list, look| {
        let want = if goal == 1 { &initial } else { &expected };
        want.seen_in(list, look)
    })
}

/// The storm itself: the lowest tenth of `providers` providers of `key`
/// unregistered and as many new ones registered, all at once, spread over
/// `sessions` (each session's registrations one after another).
pub async fn replace_a_tenth(sessions: &[RegistrySession], key: &ServiceKey, providers: usize) -> anyhow::Result<()> {
    let replaced = providers / 10;
    let mut tasks = JoinSet::new();
    for k in 0..replaced {
        let (session, key) = (sessions[k % sessions.len()].clone(), key.clone());
        tasks.spawn(async move { session.unregister(&key, "127.0.0.1", 20_000 + k as u16).await });
    }
    let mut by_session: HashMap<usize, Vec<u32>> = HashMap::new();
    for k in 0..replaced {
        by_session
            .entry(k % sessions.len())
            .or_default()
            .push(40_000 + k as u32);
    }
    for (i, ports) in by_session {
        let (session, key) = (sessions[i].clone(), key.clone());
        tasks.spawn(async move {
            for port in ports {
                session.register(&key, instance(port)).await?;
            }
            Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}
