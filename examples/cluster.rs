//! A ConfigServer cluster in one command: `cargo run --example cluster`.
//!
//! Three ConfigServers (child processes of this example) replicate to each
//! other; three providers and two consumers are spread over them. The
//! example narrates, with measured times: a provider registered on one
//! server called by a consumer on another; one ConfigServer killed with
//! SIGKILL under load, its nodes moving to the others with no failed call
//! and no provider missing from any list; the killed server restarted
//! empty, catching up from its peers before it says it is ready. It exits
//! 0 only if no call failed and no provider went missing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rpc_core::registry::{Follower, RegistrySession, Role, SessionConfig, Update};
use rpc_core::{Request, ServiceKey, Status};
use tern::consumer::{Consumer, ConsumerConfig, Reference};
use tern::provider::Provider;
use tern_e2e::Process;
use tern_e2e::demo::{Greeter, GreeterClient, GreeterServer, HelloReply, HelloRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VERSION: &str = "1.0.0";

// === child processes ===

struct Hello {
    name: String,
}

impl Greeter for Hello {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<HelloReply, Status> {
        Ok(HelloReply {
            message: format!("hello, {}", request.get_ref().name),
            served_by: self.name.clone(),
        })
    }
}

/// The provider role: serves demo.Greeter, registered through `servers`
/// (tried in that order).
async fn run_provider(name: String, servers: Vec<String>) -> anyhow::Result<()> {
    let mut session = SessionConfig::new(servers, name.clone(), Role::Provider);
    session.backoff.max = Duration::from_millis(500);
    let provider = Provider::builder()
        .app(name.clone())
        .bind("127.0.0.1:0")
        .registry(session)
        .service_with(GreeterServer::new(Hello { name }), VERSION, "")
        .start()
        .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    println!("listening {}", provider.local_addr());
    term.recv().await;
    provider.shutdown().await;
    Ok(())
}

/// One ConfigServer child process.
struct Server {
    process: Option<Process>,
    addr: SocketAddr,
    admin: SocketAddr,
    members: String,
}

impl Server {
    fn start(addr: SocketAddr, members: &str) -> anyhow::Result<Server> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args([
            "configserver",
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        command.args([
            "--store",
            "sqlite::memory:",
            "--peers",
            members,
            "--startup-grace-ms",
            "0",
        ]);
        command.args(["--heartbeat-interval-ms", "500", "--heartbeat-timeout-ms", "1500"]);
        command.args(["--peer-grace-ms", "3000", "--peer-digest-ms", "500"]);
        command.env("RUST_LOG", "error");
        let (process, words) = Process::spawn_ready(&mut command).context("starting a configserver process")?;
        // "configserver listening <addr> admin <addr>"
        let admin = words.get(4).context("configserver's ready line")?.parse()?;
        Ok(Server {
            process: Some(process),
            addr,
            admin,
            members: members.to_owned(),
        })
    }

    fn kill_hard(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill_hard()?;
        }
        Ok(())
    }

    async fn ready(&self) -> bool {
        get(self.admin, "/readyz").await.is_ok_and(|(status, _)| status == 200)
    }

    /// How many copies of `member`'s data it holds (`/api/cluster`).
    async fn copies_of(&self, member: &str) -> Option<usize> {
        let (_, body) = get(self.admin, "/api/cluster").await.ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let members = json["members"].as_array()?;
        let entry = members.iter().find(|m| m["node"] == member)?;
        Some(entry["copies"].as_array()?.len())
    }

    /// `(address, the server it is connected to)` of each provider it lists.
    async fn providers(&self) -> BTreeSet<(String, String)> {
        let Ok((200, body)) = get(self.admin, &format!("/api/services/demo.Greeter:{VERSION}")).await else {
            return BTreeSet::new();
        };
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        json["providers"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|p| {
                        let field = |name: &str| p[name].as_str().unwrap_or_default().to_owned();
                        (field("address"), field("server"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A provider child process.
struct ProviderProcess {
    name: String,
    _process: Process,
    addr: SocketAddr,
}

impl ProviderProcess {
    fn start(name: &str, servers: &[&Server]) -> anyhow::Result<ProviderProcess> {
        let list: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["provider", name, &list.join(",")]);
        let (process, words) = Process::spawn_ready(&mut command).context("starting a provider process")?;
        let addr = match words.as_slice() {
            [listening, addr] if listening == "listening" => addr.parse()?,
            _ => bail!("provider said {words:?}, not `listening <addr>`"),
        };
        Ok(ProviderProcess {
            name: name.to_owned(),
            _process: process,
            addr,
        })
    }
}

/// `GET path` over HTTP/1.0, within a second: `(status, body)`.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: demo\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(1), exchange).await??;
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

// === the consumers ===

/// A consumer of demo.Greeter whose session goes to `servers` in turn.
fn consumer(app: &str, servers: &[&Server]) -> anyhow::Result<GreeterClient<Reference>> {
    let list: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let mut config = ConsumerConfig::with_registry(app, list);
    if let Some(session) = &mut config.registry {
        session.backoff.max = Duration::from_millis(500);
    }
    Ok(Consumer::new(config)
        .reference::<GreeterClient<_>>()
        .version(VERSION)
        .timeout(Duration::from_secs(2))
        .build()?)
}

/// Follows demo.Greeter through `servers` as a consumer's directory does,
/// and counts every moment, once all of `want` were seen, that one of
/// them was missing.
struct ListWatch {
    session: RegistrySession,
    _follower: Follower,
    gaps: Arc<AtomicU64>,
    held: Arc<Mutex<BTreeSet<String>>>,
}

impl ListWatch {
    fn start(servers: &[&Server], want: BTreeSet<String>) -> ListWatch {
        let list: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
        let mut config = SessionConfig::new(list, "demo-watch", Role::Consumer);
        config.backoff.max = Duration::from_millis(500);
        let session = RegistrySession::start(config);
        let (gaps, held) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(BTreeSet::new())));
        let armed = AtomicBool::new(false);
        let (gaps2, held2) = (gaps.clone(), held.clone());
        let key = ServiceKey::new("demo.Greeter", VERSION, "");
        let follower = session.follow(&key, move |update| {
            let mut held = held2.lock().unwrap();
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
                armed.store(true, Ordering::Relaxed);
            } else if armed.load(Ordering::Relaxed) {
                gaps2.fetch_add(1, Ordering::Relaxed);
            }
        });
        ListWatch {
            session,
            _follower: follower,
            gaps,
            held,
        }
    }

    fn len(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
}

/// Calls at a steady pace (~1,000 calls/s) until `stop`.
async fn steady_load(client: GreeterClient<Reference>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = client.say_hello(HelloRequest { name: "load".into() }).await {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            eprintln!("   call failed: {e}");
        }
        tally.calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Polls `done` every 10 ms until it holds, at most `timeout`; how long it took.
async fn until<F: Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> F,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !done().await {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn run_demo() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let addrs = [free_addr()?, free_addr()?, free_addr()?];
    let members = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    println!("== three ConfigServers, each replicating to the other two");
    let mut servers = Vec::new();
    for addr in addrs {
        servers.push(Server::start(addr, &members)?);
    }
    for (i, s) in servers.iter().enumerate() {
        let took = until("the server is ready", Duration::from_secs(10), || s.ready()).await?;
        println!(
            "   server {i}: nodes on {}, admin on {}, ready after {}",
            s.addr,
            s.admin,
            ms(took)
        );
    }

    println!("== three providers, each registered on a different server");
    let (s0, s1, s2) = (&servers[0], &servers[1], &servers[2]);
    let mut providers = vec![
        ProviderProcess::start("provider-a", &[s0, s1, s2])?,
        ProviderProcess::start("provider-b", &[s1, s2, s0])?,
    ];
    let want: BTreeSet<String> = providers.iter().map(|p| p.addr.to_string()).collect();
    let watches = [
        ListWatch::start(&[s0, s1, s2], want.clone()),
        ListWatch::start(&[s2, s0, s1], want.clone()),
    ];
    let on_s0 = consumer("consumer-on-0", &[s0, s1, s2])?;
    let on_s2 = consumer("consumer-on-2", &[s2, s0, s1])?;
    for (p, s) in providers.iter().zip([0, 1]) {
        println!("   {} serving on {}, registered on server {s}", p.name, p.addr);
    }
    let started = Instant::now();
    let c = ProviderProcess::start("provider-c", &[s2, s0, s1])?;
    let c_addr = c.addr;
    let seen = on_s0
        .invoker()
        .wait_for_providers(Duration::from_secs(10), |p| p.contains(&c_addr))
        .await;
    anyhow::ensure!(seen, "the consumer on server 0 did not learn of provider-c");
    let reply = loop {
        let reply = on_s0.say_hello(HelloRequest { name: "x".into() }).await?;
        if reply.served_by == "provider-c" {
            break reply;
        }
    };
    println!(
        "   provider-c registered on server 2; the consumer on server 0 called it {} after it was started (\"{}\")",
        ms(started.elapsed()),
        reply.message
    );
    let mut want = want;
    want.insert(c_addr.to_string());
    providers.push(c);
    let watches_all = [
        ListWatch::start(&[s0, s1, s2], want.clone()),
        ListWatch::start(&[s2, s0, s1], want.clone()),
    ];
    drop(watches);
    for w in &watches_all {
        until(
            "each watch holds the three providers",
            Duration::from_secs(10),
            || async { w.len() == 3 },
        )
        .await?;
    }

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for client in [&on_s0, &on_s2] {
        for _ in 0..2 {
            load.spawn(steady_load(client.clone(), tally.clone(), stop.clone()));
        }
    }
    until("the load is running", Duration::from_secs(5), || async {
        tally.calls.load(Ordering::Relaxed) > 200
    })
    .await?;

    println!("== server 0 killed with SIGKILL under load");
    let killed = servers[0].addr.to_string();
    let killed_at = Instant::now();
    servers[0].kill_hard()?;
    let a = providers[0].addr.to_string();
    let moved = until(
        "provider-a registered again elsewhere",
        Duration::from_secs(10),
        || async {
            servers[1]
                .providers()
                .await
                .iter()
                .any(|(addr, server)| *addr == a && *server != killed)
        },
    )
    .await?;
    println!(
        "   provider-a re-registered on another server {} after the kill",
        ms(moved)
    );
    until(
        "every provider is held by a live server",
        Duration::from_secs(10),
        || async { servers[1].providers().await.iter().all(|(_, server)| *server != killed) },
    )
    .await?;
    println!(
        "   every provider held by a live server's session {} after the kill",
        ms(killed_at.elapsed())
    );
    until("the dead server's copy is dropped", Duration::from_secs(15), || async {
        servers[1].copies_of(&killed).await == Some(0)
    })
    .await?;
    println!(
        "   server 1 dropped its copy of server 0's data {} after the kill (the peer grace period is 3 s)",
        ms(killed_at.elapsed())
    );
    let gaps: u64 = watches_all.iter().map(|w| w.gaps.load(Ordering::Relaxed)).sum();
    println!(
        "   calls: {} made, {} failed; moments a list lacked a live provider: {gaps}",
        tally.calls.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed)
    );

    println!("== server 0 restarted, empty");
    let restarted = Instant::now();
    let members = servers[0].members.clone();
    servers[0] = Server::start(servers[0].addr, &members)?;
    let ready = until("the restarted server is ready", Duration::from_secs(15), || {
        servers[0].ready()
    })
    .await?;
    let listed = servers[0].providers().await.len();
    println!(
        "   ready {} after the restart, listing {listed} providers it got from its peers",
        ms(ready.max(restarted.elapsed()))
    );
    anyhow::ensure!(listed == 3, "the restarted server lists {listed} providers, not 3");

    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let (calls, failed) = (
        tally.calls.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    let gaps: u64 = watches_all.iter().map(|w| w.gaps.load(Ordering::Relaxed)).sum();
    println!("== totals: {calls} calls, {failed} failed, {gaps} moments a list lacked a live provider");
    for w in &watches_all {
        w.session.shutdown();
    }
    for s in &mut servers {
        s.kill_hard()?;
    }
    println!("== done in {:.1} s", t0.elapsed().as_secs_f64());
    anyhow::ensure!(failed == 0, "{failed} calls failed");
    anyhow::ensure!(gaps == 0, "a live provider went missing from a list {gaps} times");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("configserver") => {
            let cli = configserver::config::Cli::parse_from(&args[1..]);
            return configserver::config::run(cli);
        }
        Some("provider") => {
            let (name, servers) = (
                args.get(2).cloned().unwrap_or_default(),
                args.get(3).cloned().unwrap_or_default(),
            );
            let servers = servers.split(',').map(str::to_owned).collect();
            return tokio::runtime::Runtime::new()?.block_on(run_provider(name, servers));
        }
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Runtime::new()?.block_on(run_demo())
}
