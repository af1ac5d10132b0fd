//! The whole story in one command: `cargo run --example demo`.
//!
//! Three providers of `demo.Greeter` and one consumer that calls them
//! directly. The demo narrates, with measured times, how calls spread over
//! the providers and what happens when one of them stops.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rpc_core::{Request, Status};
use tern::consumer::{Consumer, ConsumerConfig, Reference};
use tern::demo::{Greeter, GreeterClient, GreeterServer, HelloReply, HelloRequest};
use tern::provider::Provider;

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

async fn start_provider(name: &str) -> anyhow::Result<Provider> {
    let provider = Provider::builder()
        .app(name)
        .bind("127.0.0.1:0")
        .service_with(
            GreeterServer::new(Hello {
                name: name.to_owned(),
            }),
            "1.0.0",
            "",
        )
        .start()
        .await?;
    Ok(provider)
}

/// Makes `n` calls; returns how many each provider served and how many failed.
async fn call_many(
    client: &GreeterClient<Reference>,
    n: usize,
) -> (BTreeMap<String, usize>, usize) {
    let mut served = BTreeMap::new();
    let mut failed = 0;
    for i in 0..n {
        match client
            .say_hello(HelloRequest {
                name: format!("call-{i}"),
            })
            .await
        {
            Ok(reply) => *served.entry(reply.served_by).or_insert(0) += 1,
            Err(e) => {
                failed += 1;
                eprintln!("  call {i} failed: {e}");
            }
        }
    }
    (served, failed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let t0 = Instant::now();

    println!("== starting three providers of demo.Greeter:1.0.0");
    let mut providers = Vec::new();
    for name in ["provider-a", "provider-b", "provider-c"] {
        let provider = start_provider(name).await?;
        println!("   {name} serving on {}", provider.local_addr());
        providers.push(provider);
    }

    let consumer = Consumer::new(ConsumerConfig {
        app: "demo-consumer".into(),
        ..ConsumerConfig::default()
    });
    let client = consumer
        .reference::<GreeterClient<_>>()
        .version("1.0.0")
        .timeout(Duration::from_secs(1))
        .direct(providers.iter().map(Provider::local_addr))
        .build()
        .context("building the reference")?;

    println!("== 3,000 calls straight from consumer to providers");
    let started = Instant::now();
    let (served, failed) = call_many(&client, 3000).await;
    let elapsed = started.elapsed();
    println!(
        "   {} calls in {:.1} ms ({:.0} µs each), failed: {failed}",
        3000,
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / 3000.0
    );
    for (provider, count) in &served {
        println!("   {provider}: {count} calls");
    }

    println!("== stopping provider-a gracefully; the consumer still lists it");
    let stopped = providers.remove(0);
    let stopping = Instant::now();
    stopped.shutdown().await;
    println!(
        "   provider-a stopped in {:.1} ms",
        stopping.elapsed().as_secs_f64() * 1e3
    );
    let (served, failed) = call_many(&client, 1000).await;
    println!(
        "   1,000 more calls, failed: {failed} (each call to the stopped provider retried on another)"
    );
    for (provider, count) in &served {
        println!("   {provider}: {count} calls");
    }

    for provider in providers {
        provider.shutdown().await;
    }
    println!("== done in {:.2} s", t0.elapsed().as_secs_f64());
    anyhow::ensure!(
        failed == 0,
        "{failed} calls failed after the provider stopped"
    );
    Ok(())
}
