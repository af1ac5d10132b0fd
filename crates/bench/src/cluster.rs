//! `bench cluster`: three ConfigServers replicating to each other, as a
//! company runs them, in child processes on this machine; this process
//! holds every node.
//!
//! 1. **Cross push**: `--subscribers` sessions spread over the three
//!    servers follow one service; a provider registers on server A, and the
//!    time until the last subscriber on B and C holds it is
//!    `cross_push_ms` (p99 over `--probes` registrations). The bytes A's
//!    peer links carried per change and link, over the changed entry's
//!    size (service and instance, as a node registers it), is
//!    `peer_bytes_per_change`.
//! 2. **Storm**: `--storm-providers` providers of one service registered
//!    from sessions on every server, followed by the same subscribers; 10%
//!    of them replaced at once, spread over the servers; until every
//!    subscriber everywhere holds exactly the new set: `storm_converge_ms`.
//! 3. **Node kill**: three providers and three consumers (real data-plane
//!    calls at `--rate` calls/s in all), each starting on a different
//!    server, and a follower of the service on each; server A is killed
//!    with SIGKILL. Counted: calls that failed, providers that went missing
//!    from any follower's list at any moment, and the time until every
//!    node that was on A is connected elsewhere and every provider on A is
//!    registered again (`node_kill_rehome_ms`).
//!
//! Last line:
//! `RESULT cluster cross_push_p99_ms=<n> storm_converge_ms=<n> node_kill_failed_calls=<n> node_kill_lost_providers=<n> node_kill_rehome_ms=<n> peer_bytes_per_change=<n>`

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use consumer_sdk::{Consumer, ConsumerConfig, Reference};
use hdrhistogram::Histogram;
use prost::Message;
use provider_sdk::Provider;
use rpc_core::ServiceKey;
use rpc_core::registry::{Follower, RegistrySession, Role, SessionConfig, Update};
use tern_proto::peer;
use tokio::task::JoinSet;

use crate::convergence::{Arrivals, follow};
use crate::proto::{EchoClient, EchoRequest, EchoServer};
use crate::registry::{Server, connected, instance, register_all, replace_a_tenth, storm_arrivals};
use crate::systems::EchoService;

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Subscribing sessions, spread over the three servers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Registrations timed for the cross push.
    #[arg(long, default_value_t = 100)]
    probes: usize,
    #[arg(long, default_value_t = 2000)]
    storm_providers: usize,
    /// Calls per second during the node kill, over all consumers.
    #[arg(long, default_value_t = 1500)]
    rate: u32,
}

/// Bound on any one wait.
const LIMIT: Duration = Duration::from_secs(60);

/// Three servers on loopback ports, each listing all three as peers; ready.
async fn start_cluster() -> anyhow::Result<Vec<Server>> {
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?))
        .collect::<anyhow::Result<_>>()?;
    let members = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let flags: Vec<String> = ["--peers", &members, "--peer-grace-ms", "3000"]
        .iter()
        .map(|f| f.to_string())
        .collect();
    let servers: Vec<Server> = addrs
        .iter()
        .map(|addr| Server::start_on(*addr, &flags))
        .collect::<anyhow::Result<_>>()?;
    for s in &servers {
        wait_until("a server is ready", || async {
            s.get("/readyz").await.is_ok_and(|(status, _)| status == 200)
        })
        .await?;
    }
    // Every link up, both ways, before anything is timed.
    for s in &servers {
        wait_until("every peer link is up", || async {
            let Ok((_, body)) = s.get("/api/cluster").await else {
                return false;
            };
            body.matches("\"state\":\"up\"").count() == 2
        })
        .await?;
    }
    Ok(servers)
}

/// Polls `check` every 10 ms until it holds, at most [`LIMIT`]; how long it took.
async fn wait_until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !check().await {
        anyhow::ensure!(start.elapsed() < LIMIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

/// Bytes a server's peer links have sent, over all links (`/api/cluster`).
async fn link_bytes(server: &Server) -> anyhow::Result<u64> {
    let (_, body) = server.get("/api/cluster").await?;
    let json: serde_json::Value = serde_json::from_str(&body).context("/api/cluster")?;
    Ok(json["members"]
        .as_array()
        .context("members")?
        .iter()
        .filter_map(|m| m["link"]["bytes"].as_u64())
        .sum())
}

fn session_on(servers: &[&Server], app: &str, role: Role) -> RegistrySession {
    let list: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let mut config = SessionConfig::new(list, app, role);
    config.request_timeout = Duration::from_secs(30);
    config.backoff.max = Duration::from_millis(500);
    RegistrySession::start(config)
}

/// Server `i`'s position first, then the others: where a node spread over
/// the cluster starts.
fn rotated(servers: &[Server], i: usize) -> Vec<&Server> {
    (0..servers.len()).map(|k| &servers[(i + k) % servers.len()]).collect()
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let mut servers = start_cluster().await?;
    println!(
        "cluster benchmark: 3 ConfigServers ({}), {} subscribers spread over them, storm of {} providers",
        servers
            .iter()
            .map(|s| s.addr.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        args.subscribers,
        args.storm_providers
    );

    // 1. Cross push.
    let probe = ServiceKey::new("bench.Cross", "1.0", "");
    let storm = ServiceKey::new("bench.Storm", "1.0", "");
    let subscribers: Vec<RegistrySession> = (0..args.subscribers)
        .map(|i| session_on(&rotated(&servers, i % 3)[..1], &format!("consumer-{i}"), Role::Consumer))
        .collect();
    connected(&subscribers).await?;
    let mut cross = Arrivals::new(|port, list, _| list.has(&format!("127.0.0.1:{port}")));
    let mut cross_views = Vec::new();
    let mut followers: Vec<Follower> = Vec::new();
    for (i, s) in subscribers.iter().enumerate() {
        // Subscribers on B and C: a registration on A reaches them through
        // A's peer links.
        if i % 3 != 0 {
            let (follower, view) = follow(s, &probe, cross.observer());
            followers.push(follower);
            cross_views.push(view);
        }
    }
    let on_a = session_on(&[&servers[0]], "prober", Role::Provider);
    connected(std::slice::from_ref(&on_a)).await?;
    // The first registration makes the service; it is not timed.
    on_a.register(&probe, instance(59_999)).await?;
    cross.time(59_999, &cross_views, async { Ok(()) }).await?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let bytes_before = link_bytes(&servers[0]).await?;
    let mut entry_bytes = 0usize;
    for p in 0..args.probes {
        let port = 60_000 + p as u32;
        let probe_instance = instance(port);
        entry_bytes += peer::Provider {
            service: Some((&probe).into()),
            instance: Some(probe_instance.clone()),
            session: 0,
        }
        .encoded_len();
        let took = cross
            .time(u64::from(port), &cross_views, async {
                on_a.register(&probe, probe_instance).await?;
                Ok(())
            })
            .await?;
        latency.record(took.as_micros() as u64)?;
    }
    let link_sent = link_bytes(&servers[0]).await? - bytes_before;
    // Two links carry each change.
    let per_change = link_sent as f64 / (2 * args.probes) as f64;
    let entry = entry_bytes as f64 / args.probes as f64;
    let cross_p50 = latency.value_at_quantile(0.5) as f64 / 1e3;
    let cross_p99 = latency.value_at_quantile(0.99) as f64 / 1e3;
    println!(
        "cross push: a registration on A reaches the last of {} subscribers on B and C in p50 {cross_p50:.1} ms, p99 {cross_p99:.1} ms (max {:.1} ms)",
        cross_views.len(),
        latency.max() as f64 / 1e3
    );
    println!(
        "peer links: {per_change:.0} bytes per change per link; the changed entry (service + instance) is {entry:.0} bytes ({:.2}x)",
        per_change / entry
    );
    drop(cross);

    // 2. Storm, its providers registered from every server.
    let storm_sessions: Vec<RegistrySession> = (0..30)
        .map(|i| session_on(&rotated(&servers, i % 3)[..1], &format!("storm-{i}"), Role::Provider))
        .collect();
    connected(&storm_sessions).await?;
    let initial: Vec<_> = (0..args.storm_providers)
        .map(|k| (storm.clone(), instance(20_000 + k as u32)))
        .collect();
    register_all(&storm_sessions, initial).await?;
    let replaced = args.storm_providers / 10;
    let mut arrivals = storm_arrivals(args.storm_providers);
    let mut storm_views = Vec::new();
    for s in &subscribers {
        let (follower, view) = follow(s, &storm, arrivals.observer());
        followers.push(follower);
        storm_views.push(view);
    }
    arrivals.time(1, &storm_views, async { Ok(()) }).await?;
    let converge = arrivals
        .time(
            2,
            &storm_views,
            replace_a_tenth(&storm_sessions, &storm, args.storm_providers),
        )
        .await?;
    let storm_ms = converge.as_secs_f64() * 1e3;
    println!(
        "storm: {replaced} of {} providers replaced at once from every server; all {} subscribers on the three converged in {storm_ms:.1} ms",
        args.storm_providers,
        subscribers.len()
    );
    drop(arrivals);
    drop(followers);
    drop(storm_sessions);
    drop(subscribers);
    drop(on_a);

    // 3. Node kill under load.
    let echo = ServiceKey::new("bench.Echo", "", "");
    let mut providers = Vec::new();
    let mut provider_addrs = Vec::new();
    for i in 0..3 {
        let list: Vec<String> = rotated(&servers, i).iter().map(|s| s.addr.to_string()).collect();
        let mut session = SessionConfig::new(list, format!("provider-{i}"), Role::Provider);
        session.backoff.max = Duration::from_millis(500);
        let provider = Provider::builder()
            .app(format!("provider-{i}"))
            .bind("127.0.0.1:0")
            .service(EchoServer::new(EchoService::named(format!("p{i}"))))
            .registry(session)
            .start()
            .await?;
        provider_addrs.push(provider.local_addr().to_string());
        providers.push(provider);
    }
    let want: BTreeSet<String> = provider_addrs.iter().cloned().collect();
    let watches: Vec<Watch> = (0..3)
        .map(|i| Watch::start(&rotated(&servers, i), &echo, want.clone()))
        .collect();
    let clients: Vec<(Consumer, EchoClient<Reference>)> = (0..3)
        .map(|i| {
            let list: Vec<String> = rotated(&servers, i).iter().map(|s| s.addr.to_string()).collect();
            let mut config = ConsumerConfig::with_registry(format!("consumer-{i}"), list);
            if let Some(session) = &mut config.registry {
                session.backoff.max = Duration::from_millis(500);
            }
            let consumer = Consumer::new(config);
            let client = consumer
                .reference::<EchoClient<_>>()
                .timeout(Duration::from_secs(2))
                .build()?;
            Ok((consumer, client))
        })
        .collect::<anyhow::Result<_>>()?;
    for (_, client) in &clients {
        anyhow::ensure!(
            client.invoker().wait_for_providers(LIMIT, |p| p.len() == 3).await,
            "a consumer never saw the three providers"
        );
    }
    for w in &watches {
        wait_until("each follower holds the three providers", || async { w.armed() }).await?;
    }
    let (calls, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut load = JoinSet::new();
    let per_client = Duration::from_secs_f64(3.0 / f64::from(args.rate.max(1)));
    for (_, client) in &clients {
        let (client, calls, failed, stop) = (client.clone(), calls.clone(), failed.clone(), stop.clone());
        load.spawn(async move {
            let mut tick = tokio::time::interval(per_client);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Err(e) = client
                    .echo(EchoRequest {
                        payload: bytes::Bytes::from_static(b"x"),
                    })
                    .await
                {
                    eprintln!("call failed: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    wait_until("calls are flowing", || async {
        calls.load(Ordering::Relaxed) > u64::from(args.rate) / 2
    })
    .await?;
    let killed = servers[0].addr.to_string();
    let epoch_a = epoch(&servers[0]).await?;
    let kill_at = Instant::now();
    servers[0].kill_hard()?;
    // Every node that was on A connected elsewhere (the followers show
    // it), and every provider that was on A registered again.
    let survivors = &servers[1..];
    let rehome = wait_until("the killed server's nodes are home again", || async {
        let followers_home = watches.iter().all(|w| w.connected_elsewhere(&epoch_a));
        let mut registered = true;
        for s in survivors {
            let Ok((_, body)) = s.get("/api/services/bench.Echo").await else {
                return false;
            };
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let providers = json["providers"].as_array().cloned().unwrap_or_default();
            registered &= providers.len() == 3 && providers.iter().all(|p| p["server"] != killed.as_str());
        }
        followers_home && registered
    })
    .await?;
    // Past the grace period the dead server's copy is let go; the load
    // runs on through it.
    for s in survivors {
        wait_until("the dead server's copy is dropped", || async {
            let Ok((_, body)) = s.get("/api/cluster").await else {
                return false;
            };
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            json["members"].as_array().is_some_and(|members| {
                members
                    .iter()
                    .filter(|m| m["node"] == killed.as_str())
                    .all(|m| m["copies"].as_array().is_some_and(Vec::is_empty))
            })
        })
        .await?;
    }
    let after_drop = calls.load(Ordering::Relaxed);
    wait_until("calls go on after the copy is dropped", || async {
        calls.load(Ordering::Relaxed) > after_drop + u64::from(args.rate) / 2
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let lost: BTreeSet<String> = watches.iter().flat_map(Watch::lost).collect();
    let (calls, failed) = (calls.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "node kill: server A killed with SIGKILL under {} calls/s: {calls} calls, {failed} failed; providers missing from a list at some moment: {}; its nodes home again {:.0} ms after the kill (the copy dropped {:.1} s after)",
        args.rate,
        lost.len(),
        rehome.as_secs_f64() * 1e3,
        kill_at.elapsed().as_secs_f64()
    );
    for w in &watches {
        w.session.shutdown();
    }
    for p in providers {
        p.shutdown().await;
    }
    println!(
        "RESULT cluster cross_push_p99_ms={cross_p99:.1} storm_converge_ms={storm_ms:.0} node_kill_failed_calls={failed} node_kill_lost_providers={} node_kill_rehome_ms={:.0} peer_bytes_per_change={:.2}",
        lost.len(),
        rehome.as_secs_f64() * 1e3,
        per_change / entry
    );
    Ok(())
}

/// A server's epoch (`/api/cluster`), which a session's `connected` names.
async fn epoch(server: &Server) -> anyhow::Result<String> {
    let (_, body) = server.get("/api/cluster").await?;
    let json: serde_json::Value = serde_json::from_str(&body)?;
    Ok(json["members"][0]["epoch"].as_str().context("epoch")?.to_owned())
}

/// A follower of a service that records every provider of `want` missing
/// from its list at some moment after it first held them all.
struct Watch {
    session: RegistrySession,
    _follower: Follower,
    armed: Arc<AtomicBool>,
    lost: Arc<Mutex<BTreeSet<String>>>,
}

impl Watch {
    fn start(servers: &[&Server], key: &ServiceKey, want: BTreeSet<String>) -> Watch {
        let session = session_on(servers, "watch", Role::Consumer);
        let (armed, lost) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(BTreeSet::new())));
        let (armed2, lost2) = (armed.clone(), lost.clone());
        let held = Mutex::new(BTreeSet::<String>::new());
        let follower = session.follow(key, move |update| {
            let mut held = held.lock().expect("held lock");
            match update {
                Update::Reset(list) => *held = list.iter().map(|i| format!("{}:{}", i.host, i.port)).collect(),
                Update::Change {
                    added,
                    updated,
                    removed,
                } => {
                    for i in added.iter().chain(updated.iter()) {
                        held.insert(format!("{}:{}", i.host, i.port));
                    }
                    for r in *removed {
                        held.remove(*r);
                    }
                }
            }
            if want.is_subset(&held) {
                armed2.store(true, Ordering::Relaxed);
            } else if armed2.load(Ordering::Relaxed) {
                lost2.lock().expect("lost lock").extend(want.difference(&held).cloned());
            }
        });
        Watch {
            session,
            _follower: follower,
            armed,
            lost,
        }
    }

    fn armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    fn lost(&self) -> BTreeSet<String> {
        self.lost.lock().expect("lost lock").clone()
    }

    /// Connected, and not to the server of epoch `gone`.
    fn connected_elsewhere(&self, gone: &str) -> bool {
        self.session
            .connected()
            .borrow()
            .as_deref()
            .is_some_and(|epoch| epoch != gone)
    }
}
