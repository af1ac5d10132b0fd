//! `bench rules`: a governance rule change against many subscribed nodes.
//!
//! A ConfigServer runs in a child process (in-memory rule store). This
//! process runs `--providers` providers of `bench.Echo` (provider-sdk,
//! enforcing rules) and `--consumers` consumers (consumer-sdk, each with its
//! own registry session and a reference to the service). Then, `--changes`
//! times, one access rule is rewritten through the admin API, alternately
//! denying and allowing the app `probe`. From just before the write:
//!
//! - **push**: until the last consumer session has received the new rules;
//! - **enforce**: until the last consumer reference applies them (its next
//!   call uses them) *and* every provider answers a `probe` call as the rule
//!   says (Forbidden, or served). Each provider is probed once per
//!   millisecond by its own direct-mode client.
//!
//! p50/p99 are over the changes. Last line:
//! `RESULT rules push_p99_ms=<n> enforce_p99_ms=<n>`

use std::time::{Duration, Instant};

use anyhow::Context;
use configserver::admin_client::AdminClient;
use consumer_sdk::{Consumer, ConsumerConfig, Reference};
use hdrhistogram::Histogram;
use provider_sdk::Provider;
use rpc_core::registry::{Role, SessionConfig};
use rpc_core::{Error, ServiceKey};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::proto::{EchoClient, EchoRequest, EchoServer};
use crate::registry::Server;
use crate::systems::EchoService;

#[derive(Debug, clap::Args)]
pub struct RulesArgs {
    /// Consumers, each with its own ConfigServer session.
    #[arg(long, default_value_t = 1000)]
    consumers: usize,
    /// Providers enforcing the rule.
    #[arg(long, default_value_t = 2)]
    providers: usize,
    /// Rule changes measured.
    #[arg(long, default_value_t = 40)]
    changes: usize,
}

/// Bound on any one wait.
const LIMIT: Duration = Duration::from_secs(30);
const RULE_NAME: &str = "bench-access";

/// The rule of change `i`: even changes deny `probe`, odd ones allow it.
fn rule(i: usize) -> (String, bool) {
    let deny = i.is_multiple_of(2);
    let app = if deny {
        "probe".to_owned()
    } else {
        format!("nobody-{i}")
    };
    (format!(r#"{{"kind":"access","deny_apps":["{app}"]}}"#), deny)
}

pub async fn run(args: RulesArgs) -> anyhow::Result<()> {
    let server = Server::start()?;
    println!(
        "rules benchmark: {} consumer sessions, {} providers, {} rule changes",
        args.consumers, args.providers, args.changes
    );
    let registry = server.addr.to_string();
    let key = ServiceKey::new("bench.Echo", "", "");

    let mut providers = Vec::new();
    for i in 0..args.providers.max(1) {
        let provider = Provider::builder()
            .app("bench-provider")
            .bind("127.0.0.1:0")
            .service(EchoServer::new(EchoService::named(format!("p{i}"))))
            .registry(SessionConfig::new([registry.clone()], "bench-provider", Role::Provider))
            .start()
            .await?;
        providers.push(provider);
    }
    let consumers: Vec<(Consumer, EchoClient<Reference>)> = (0..args.consumers)
        .map(|i| {
            let app = format!("consumer-{i}");
            let consumer = Consumer::new(ConsumerConfig {
                app: app.clone(),
                registry: Some(SessionConfig::new([registry.clone()], app, Role::Consumer)),
                ..ConsumerConfig::default()
            });
            let client = consumer.reference::<EchoClient<_>>().build()?;
            Ok((consumer, client))
        })
        .collect::<anyhow::Result<_>>()?;
    for (_, client) in &consumers {
        let all = client
            .invoker()
            .wait_for_providers(LIMIT, |p| p.len() == providers.len())
            .await;
        anyhow::ensure!(all, "a consumer never saw all providers");
    }
    println!(
        "setup: {} sessions up, every consumer sees every provider",
        consumers.len() + providers.len()
    );

    // One probe per provider: a direct-mode client of app `probe`, calling
    // every millisecond and reporting when its answers match the goal.
    let (goal, _) = watch::channel::<Option<(usize, bool)>>(None);
    let (seen_tx, mut seen) = mpsc::channel::<(usize, Instant)>(1024);
    let mut probes = JoinSet::new();
    for provider in &providers {
        let client = Consumer::new(ConsumerConfig {
            app: "probe".into(),
            default_retries: 0,
            ..ConsumerConfig::default()
        })
        .reference::<EchoClient<_>>()
        .direct([provider.local_addr()])
        .build()?;
        let (mut goal, seen) = (goal.subscribe(), seen_tx.clone());
        probes.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut reported = None;
            loop {
                tick.tick().await;
                let Some((change, deny)) = *goal.borrow_and_update() else {
                    continue;
                };
                if reported == Some(change) {
                    if goal.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                let result = client.echo(EchoRequest::default()).await;
                let matches = match result {
                    Err(Error::Forbidden(_)) => deny,
                    Ok(_) => !deny,
                    Err(_) => false,
                };
                if matches {
                    reported = Some(change);
                    if seen.send((change, Instant::now())).await.is_err() {
                        return;
                    }
                }
            }
        });
    }

    let admin = AdminClient::new(&format!("http://{}", server.admin), None, Some("bench".into()));
    let mut push = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut enforce = push.clone();
    let (mut worst_consumer, mut worst_provider) = (Duration::ZERO, Duration::ZERO);
    let mut revision = 0;
    for change in 0..args.changes {
        let (rule, deny) = rule(change);
        let expected = revision + 1;
        // Watchers first: they record the instant each node has the change.
        let mut pushed = JoinSet::new();
        let mut applied = JoinSet::new();
        for (consumer, client) in &consumers {
            let mut rules = consumer.registry().context("consumer has a session")?.rules(&key);
            pushed.spawn(async move {
                rules.wait_for(|set| set.revision >= expected).await.ok()?;
                Some(Instant::now())
            });
            let client = client.clone();
            applied.spawn(async move {
                client
                    .invoker()
                    .wait_for_rules(expected, LIMIT)
                    .await
                    .then(Instant::now)
            });
        }
        goal.send_replace(Some((change, deny)));
        let start = Instant::now();
        revision = admin.put_rule(&key.to_string(), RULE_NAME, &rule).await?;
        anyhow::ensure!(
            revision == expected,
            "revision {revision}, expected {expected}: another writer?"
        );

        let last_push = last(&mut pushed, "sessions received the rule").await?;
        let last_consumer = last(&mut applied, "consumers applied the rule").await?;
        let mut last_provider = start;
        for _ in &providers {
            let (seen_change, at) = tokio::time::timeout(LIMIT, seen.recv())
                .await
                .context("a provider never enforced the rule")?
                .context("probes stopped")?;
            anyhow::ensure!(
                seen_change == change,
                "probe reported change {seen_change} during {change}"
            );
            last_provider = last_provider.max(at);
        }
        let enforced = last_consumer.max(last_provider);
        tracing::debug!(
            change,
            push_ms = last_push.duration_since(start).as_secs_f64() * 1e3,
            enforce_ms = enforced.duration_since(start).as_secs_f64() * 1e3,
            "rule change measured"
        );
        push.record(last_push.duration_since(start).as_micros().max(1) as u64)?;
        enforce.record(enforced.duration_since(start).as_micros().max(1) as u64)?;
        worst_consumer = worst_consumer.max(last_consumer.duration_since(start));
        worst_provider = worst_provider.max(last_provider.duration_since(start));
    }
    probes.abort_all();

    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "push: a rule change reaches the last of {} sessions in p50 {:.1} ms, p99 {:.1} ms",
        consumers.len(),
        ms(&push, 0.5),
        ms(&push, 0.99)
    );
    println!(
        "enforce: every consumer applies it and every provider answers as it says in p50 {:.1} ms, p99 {:.1} ms \
         (slowest consumer {:.1} ms, slowest provider {:.1} ms)",
        ms(&enforce, 0.5),
        ms(&enforce, 0.99),
        worst_consumer.as_secs_f64() * 1e3,
        worst_provider.as_secs_f64() * 1e3
    );
    println!(
        "RESULT rules push_p99_ms={:.1} enforce_p99_ms={:.1}",
        ms(&push, 0.99),
        ms(&enforce, 0.99)
    );
    // Close the sessions before the server goes, so none reports it lost.
    for (consumer, _) in &consumers {
        if let Some(session) = consumer.registry() {
            let mut connected = session.connected();
            session.shutdown();
            let _ = tokio::time::timeout(LIMIT, connected.wait_for(Option::is_none)).await;
        }
    }
    for provider in providers {
        provider.shutdown().await;
    }
    Ok(())
}

/// The latest instant the tasks report; an error if any timed out.
async fn last(tasks: &mut JoinSet<Option<Instant>>, what: &str) -> anyhow::Result<Instant> {
    let mut latest: Option<Instant> = None;
    let total = tasks.len();
    let mut done = 0;
    while let Some(result) = tokio::time::timeout(LIMIT, tasks.join_next())
        .await
        .with_context(|| format!("only {done} of {total} {what}"))?
    {
        let at = result?.with_context(|| format!("only {done} of {total} {what}"))?;
        latest = Some(latest.map_or(at, |l| l.max(at)));
        done += 1;
    }
    latest.context("no node to measure")
}
