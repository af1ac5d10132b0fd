//! The whole story in one command: `cargo run --example demo`.
//!
//! A ConfigServer, three providers (child processes of this demo) and a
//! consumer that calls them directly. The demo narrates, with measured
//! times: calls spread over the providers; one provider killed hard; a new
//! provider joining; a governance rule denying a second app (enforced by
//! every provider within milliseconds); the ConfigServer stopping (calls go
//! on) and returning (registrations rebuilt, the rule still stored). It
//! exits 0 only if no call of the main consumer failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use configserver::admin_client::AdminClient;
use configserver::{ConfigServer, ConfigServerConfig, RegistryConfig};
use rpc_core::registry::{Role, SessionConfig};
use rpc_core::{Error, Request, Status};
use tern::consumer::{Consumer, ConsumerConfig, Reference};
use tern::provider::Provider;
use tern_e2e::Process;
use tern_e2e::demo::{Greeter, GreeterClient, GreeterServer, HelloReply, HelloRequest};

const VERSION: &str = "1.0.0";

// === provider role (a child process) ===

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

async fn run_provider(name: String, registry: String) -> anyhow::Result<()> {
    let provider = Provider::builder()
        .app(name.clone())
        .bind("127.0.0.1:0")
        .registry(SessionConfig::new([registry], name.clone(), Role::Provider))
        .service_with(GreeterServer::new(Hello { name }), VERSION, "")
        .start()
        .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    println!("listening {}", provider.local_addr());
    term.recv().await;
    provider.shutdown().await;
    Ok(())
}

/// A provider child process, killed (hard) when dropped.
struct ProviderProcess {
    name: String,
    process: Process,
    addr: SocketAddr,
}

impl ProviderProcess {
    fn start(name: &str, registry: SocketAddr) -> anyhow::Result<ProviderProcess> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["provider", name, &registry.to_string()]);
        let (process, words) = Process::spawn_ready(&mut command).context("starting a provider process")?;
        let addr = match words.as_slice() {
            [listening, addr] if listening == "listening" => addr.parse()?,
            _ => bail!("provider said {words:?}, not `listening <addr>`"),
        };
        Ok(ProviderProcess {
            name: name.to_owned(),
            process,
            addr,
        })
    }

    fn kill_hard(&mut self) -> anyhow::Result<()> {
        self.process.kill_hard()?;
        Ok(())
    }

    fn stop_gracefully(mut self) -> anyhow::Result<()> {
        self.process.terminate(Duration::from_secs(30))?;
        Ok(())
    }
}

// === consumer side ===

/// Calls made by the background load, by provider, and failures.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
    served: Mutex<BTreeMap<String, u64>>,
}

/// Calls the greeter back to back until `stop`, recording who answered.
async fn steady_load(client: GreeterClient<Reference>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        match client
            .say_hello(HelloRequest {
                name: format!("call-{i}"),
            })
            .await
        {
            Ok(reply) => {
                *tally.served.lock().unwrap().entry(reply.served_by).or_default() += 1;
            }
            Err(e) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("   call failed: {e}");
            }
        }
        tally.calls.fetch_add(1, Ordering::Relaxed);
        // A steady pace (~2,000 calls/s per caller), not a flood.
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(start.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Starts the ConfigServer with its rules in an SQLite file under `data`.
async fn start_configserver(listen: SocketAddr, data: &std::path::Path) -> anyhow::Result<ConfigServer> {
    Ok(ConfigServer::start(ConfigServerConfig {
        listen,
        admin_listen: "127.0.0.1:0".parse()?,
        store: Some(format!("sqlite://{}?mode=rwc", data.join("rules.db").display())),
        registry: RegistryConfig {
            startup_grace: Duration::from_secs(2),
            ..RegistryConfig::default()
        },
        ..ConfigServerConfig::default()
    })
    .await?)
}

async fn run_demo() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let data = std::env::temp_dir().join(format!("tern-demo-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    println!("== ConfigServer");
    let server = start_configserver("127.0.0.1:0".parse()?, &data).await?;
    let registry_addr = server.local_addr();
    println!("   listening on {registry_addr} (admin API on {})", server.admin_addr());

    println!("== three providers of demo.Greeter:{VERSION}, each its own process");
    let mut providers = Vec::new();
    for name in ["provider-a", "provider-b", "provider-c"] {
        let p = ProviderProcess::start(name, registry_addr)?;
        println!("   {name} (pid {}) serving on {}", p.process.pid(), p.addr);
        providers.push(p);
    }

    let consumer = Consumer::new(ConsumerConfig {
        app: "demo-consumer".into(),
        registry: Some(SessionConfig::new(
            [registry_addr.to_string()],
            "demo-consumer",
            Role::Consumer,
        )),
        ..ConsumerConfig::default()
    });
    let client = consumer
        .reference::<GreeterClient<_>>()
        .version(VERSION)
        .timeout(Duration::from_secs(1))
        .build()?;
    let reference = client.invoker().clone();
    let found = reference
        .wait_for_providers(Duration::from_secs(5), |p| p.len() == 3)
        .await;
    anyhow::ensure!(found, "consumer did not learn of the three providers");
    println!(
        "   consumer learned of {} providers from the ConfigServer",
        reference.providers().len()
    );

    println!("== 3,000 calls, straight from consumer to providers (P2C balancer: the faster get more)");
    let started = Instant::now();
    let mut spread = BTreeMap::new();
    for i in 0..3000 {
        let reply = client
            .say_hello(HelloRequest {
                name: format!("call-{i}"),
            })
            .await?;
        *spread.entry(reply.served_by).or_insert(0) += 1;
    }
    println!(
        "   done in {} ({:.0} µs per call)",
        ms(started.elapsed()),
        started.elapsed().as_secs_f64() * 1e6 / 3000.0
    );
    for (provider, count) in &spread {
        println!("   {provider}: {count} calls");
    }

    // Steady load for the rest of the story.
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        load.spawn(steady_load(client.clone(), tally.clone(), stop.clone()));
    }
    wait_until("the load is running", Duration::from_secs(5), || {
        tally.calls.load(Ordering::Relaxed) > 100
    })
    .await?;

    println!("== provider-a killed hard (SIGKILL) under load");
    let killed_addr = providers[0].addr;
    let failed_before = tally.failed.load(Ordering::Relaxed);
    providers[0].kill_hard()?;
    let gone = wait_until("the consumer drops provider-a", Duration::from_secs(10), || {
        !reference.providers().contains(&killed_addr)
    })
    .await?;
    println!("   consumer's provider list updated after {}", ms(gone));
    println!(
        "   failed calls: {}",
        tally.failed.load(Ordering::Relaxed) - failed_before
    );
    providers.remove(0);

    println!("== provider-d starts");
    let started = Instant::now();
    let d = ProviderProcess::start("provider-d", registry_addr)?;
    let reached = wait_until("a call reaches provider-d", Duration::from_secs(10), || {
        tally.served.lock().unwrap().contains_key("provider-d")
    })
    .await;
    println!(
        "   first call reached provider-d {} after it was started",
        ms(started.elapsed())
    );
    reached?;
    providers.push(d);

    println!("== a governance rule: app \"batch\" may not call demo.Greeter");
    let batch = Consumer::new(ConsumerConfig {
        app: "batch".into(),
        registry: Some(SessionConfig::new([registry_addr.to_string()], "batch", Role::Consumer)),
        ..ConsumerConfig::default()
    })
    .reference::<GreeterClient<_>>()
    .version(VERSION)
    .build()?;
    anyhow::ensure!(
        batch
            .invoker()
            .wait_for_providers(Duration::from_secs(5), |p| p.len() == 3)
            .await,
        "batch did not learn of the providers"
    );
    batch.say_hello(HelloRequest { name: "batch".into() }).await?;
    println!("   before: batch's calls are served");
    let admin = AdminClient::new(&format!("http://{}", server.admin_addr()), None, Some("demo".into()));
    let service = format!("demo.Greeter:{VERSION}");
    let written = Instant::now();
    let revision = admin
        .put_rule(&service, "no-batch", r#"{"kind":"access","deny_apps":["batch"]}"#)
        .await?;
    let refused = loop {
        match batch.say_hello(HelloRequest { name: "batch".into() }).await {
            Err(Error::Forbidden(why)) => break why,
            _ if written.elapsed() > Duration::from_secs(5) => bail!("the rule was not enforced within 5 s"),
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    };
    println!(
        "   PUT /api/rule (revision {revision}): batch refused {} after the write: {refused}",
        ms(written.elapsed())
    );
    println!(
        "   demo-consumer meanwhile: {} failed calls",
        tally.failed.load(Ordering::Relaxed)
    );

    println!("== the ConfigServer stops");
    server.shutdown().await;
    let calls_before = tally.calls.load(Ordering::Relaxed);
    let failed_before = tally.failed.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "   calls go on: {} calls in the next second, {} failed, {} providers still known",
        tally.calls.load(Ordering::Relaxed) - calls_before,
        tally.failed.load(Ordering::Relaxed) - failed_before,
        reference.providers().len()
    );

    println!("== the ConfigServer returns (same address, empty registry, rules in its store)");
    let restarted = Instant::now();
    let server = start_configserver(registry_addr, &data).await?;
    let rebuilt = wait_until("providers re-register", Duration::from_secs(10), || {
        server.registry().counts().2 == 3
    })
    .await?;
    println!(
        "   registrations rebuilt {} after the restart: 3 providers back",
        ms(rebuilt)
    );
    println!("   consumer kept {} providers meanwhile", reference.providers().len());
    let _ = restarted;
    let kept = server.governance().list(Some(&service)).await?;
    println!(
        "   rules read back from the store: {:?}; batch still refused: {}",
        kept.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        matches!(
            batch.say_hello(HelloRequest { name: "batch".into() }).await,
            Err(Error::Forbidden(_))
        )
    );

    println!("== graceful stop of provider-b under load");
    let failed_before = tally.failed.load(Ordering::Relaxed);
    let b = providers.remove(0);
    let stopping = Instant::now();
    let b_name = b.name.clone();
    tokio::task::spawn_blocking(move || b.stop_gracefully()).await??;
    println!(
        "   {b_name} stopped in {}, failed calls: {}",
        ms(stopping.elapsed()),
        tally.failed.load(Ordering::Relaxed) - failed_before
    );

    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let (calls, failed) = (
        tally.calls.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    println!("== totals under load: {calls} calls, {failed} failed");
    for (provider, count) in tally.served.lock().unwrap().iter() {
        println!("   {provider}: {count} calls");
    }
    for p in providers {
        tokio::task::spawn_blocking(move || p.stop_gracefully()).await??;
    }
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&data);
    println!("== done in {:.1} s", t0.elapsed().as_secs_f64());
    anyhow::ensure!(failed == 0, "{failed} calls failed");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("provider") {
        let (name, registry) = (
            args.get(2).cloned().unwrap_or_default(),
            args.get(3).cloned().unwrap_or_default(),
        );
        return runtime.block_on(run_provider(name, registry));
    }
    runtime.block_on(run_demo())
}
