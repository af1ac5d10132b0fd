//! End-to-end tests of governance rules with real processes: the
//! ConfigServer and providers run as `tern-node` children, consumers run
//! here, rules are written through the admin API.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Node, free_port, http, http_with, skipped};
use consumer_sdk::{Balance, Consumer, ConsumerConfig, Reference};
use rpc_core::Error;
use rpc_core::ServiceKey;
use rpc_core::registry::{RegistrySession, Role, SessionConfig};
use tern_e2e::demo::{GreeterClient, HelloRequest};
use tern_proto::registry::registry_client::RegistryClient;
use tern_proto::registry::{self as pb, NodeMessage, node_message, server_message};

/// Bound on any single wait.
const LIMIT: Duration = Duration::from_secs(15);
const SERVICE: &str = "demo.Greeter:1.0.0";

/// Writes a rule through the admin API; its revision.
async fn put_rule(admin: SocketAddr, name: &str, rule: &str) -> u64 {
    let path = format!("/api/rule?service={SERVICE}&name={name}");
    let (status, body) = http(admin, "PUT", &path, rule).await.unwrap();
    assert_eq!(status, 200, "PUT {name}: {body}");
    let stored: serde_json::Value = serde_json::from_str(&body).unwrap();
    stored["revision"].as_u64().expect("revision")
}

struct Who<'a> {
    app: &'a str,
    zone: &'a str,
    labels: &'a [(&'a str, &'a str)],
}

const WEB: Who<'static> = Who {
    app: "web",
    zone: "",
    labels: &[],
};

fn consumer(registry: SocketAddr, who: Who<'_>, balance: Balance) -> GreeterClient<Reference> {
    let mut session = SessionConfig::new([registry.to_string()], who.app, Role::Consumer);
    session.zone = who.zone.to_owned();
    session.labels = who.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let consumer = Consumer::new(ConsumerConfig {
        app: who.app.to_owned(),
        registry: Some(session),
        ..ConsumerConfig::default()
    });
    consumer
        .reference::<GreeterClient<_>>()
        .version("1.0.0")
        .timeout(Duration::from_secs(2))
        .balance(balance)
        // Providers here are seconds old: no warm-up ramp on their weights.
        .warmup(Duration::ZERO)
        .build()
        .unwrap()
}

async fn wait_for_providers(client: &GreeterClient<Reference>, n: usize) {
    let ok = client.invoker().wait_for_providers(LIMIT, |p| p.len() == n).await;
    assert!(ok, "expected {n} providers, have {:?}", client.invoker().providers());
}

/// Waits until the consumer applies rules of at least `revision`.
async fn wait_for_rules(client: &GreeterClient<Reference>, revision: u64) {
    let deadline = Instant::now() + LIMIT;
    while client.invoker().rules_revision() < revision {
        assert!(
            Instant::now() < deadline,
            "consumer never applied rules revision {revision}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn hello(client: &GreeterClient<Reference>) -> Result<String, Error> {
    client
        .say_hello(HelloRequest { name: "rules".into() })
        .await
        .map(|r| r.served_by)
}

/// Calls until `done` holds for a result (bounded); the time it took.
async fn call_until(
    client: &GreeterClient<Reference>,
    what: &str,
    done: impl Fn(&Result<String, Error>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let result = hello(client).await;
        if done(&result) {
            return start.elapsed();
        }
        assert!(start.elapsed() < LIMIT, "never saw {what}; last result {result:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Shares of `calls` calls by provider name.
async fn shares(client: &GreeterClient<Reference>, calls: usize) -> HashMap<String, f64> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..calls {
        *counts.entry(hello(client).await.unwrap()).or_default() += 1;
    }
    counts.into_iter().map(|(k, v)| (k, v as f64 / calls as f64)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_consumer_gets_forbidden_within_a_second_while_others_go_on() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &[]);
    let (_provider, _) = Node::provider(registry, "a");
    let web = consumer(registry, WEB, Balance::Random);
    let batch = consumer(registry, Who { app: "batch", ..WEB }, Balance::Random);
    wait_for_providers(&web, 1).await;
    wait_for_providers(&batch, 1).await;
    hello(&batch).await.unwrap();

    let written = Instant::now();
    put_rule(admin, "no-batch", r#"{"kind":"access","deny_apps":["batch"]}"#).await;
    call_until(&batch, "Forbidden", |r| matches!(r, Err(Error::Forbidden(_)))).await;
    let took = written.elapsed();
    eprintln!("deny rule enforced {took:?} after the write");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let Err(Error::Forbidden(message)) = hello(&batch).await else {
        panic!("batch allowed again")
    };
    assert!(message.contains("no-batch") && message.contains("batch"), "{message}");
    assert_eq!(hello(&web).await.unwrap(), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qps_limit_holds_the_provider_to_its_rate_under_heavier_load() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &[]);
    let (_provider, _) = Node::provider(registry, "a");
    let client = consumer(registry, WEB, Balance::Random);
    wait_for_providers(&client, 1).await;
    put_rule(admin, "limit", r#"{"kind":"qps_limit","qps":100}"#).await;
    call_until(&client, "RateLimited", |r| matches!(r, Err(Error::RateLimited(_)))).await;

    // Eight callers back to back: far more than 100 calls/s offered.
    let window = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.spawn(async move {
            let (mut ok, mut limited) = (0u64, 0u64);
            while start.elapsed() < window {
                match hello(&client).await {
                    Ok(_) => ok += 1,
                    Err(Error::RateLimited(_)) => limited += 1,
                    Err(e) => panic!("unexpected failure {e}"),
                }
            }
            (ok, limited)
        });
    }
    let (mut ok, mut limited) = (0, 0);
    while let Some(counts) = tasks.join_next().await {
        let (o, l) = counts.unwrap();
        ok += o;
        limited += l;
    }
    let rate = ok as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "{ok} admitted, {limited} limited in {:?}: {rate:.1} calls/s",
        start.elapsed()
    );
    assert!(
        limited > ok,
        "the load was not heavier than the limit: {limited} limited, {ok} admitted"
    );
    assert!((90.0..=110.0).contains(&rate), "{rate:.1} calls/s admitted, limit 100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_override_shifts_the_shares() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &[]);
    let (_a, a) = Node::provider(registry, "a");
    let (_b, _) = Node::provider(registry, "b");
    let client = consumer(registry, WEB, Balance::RoundRobin);
    wait_for_providers(&client, 2).await;
    let before = shares(&client, 400).await;
    assert!((before["a"] - 0.5).abs() < 0.05, "{before:?}");

    let rule = format!(r#"{{"kind":"weight","overrides":[{{"address":"{a}","weight":300}}]}}"#);
    let revision = put_rule(admin, "a-heavier", &rule).await;
    wait_for_rules(&client, revision).await;
    let after = shares(&client, 2000).await;
    eprintln!("shares before {before:?}, after a=300 b=100: {after:?}");
    assert!((after["a"] - 0.75).abs() < 0.03, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_affinity_keeps_calls_in_zone_and_falls_back_when_the_zone_empties() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &[]);
    let (mut near, _) = Node::provider_with(registry, "near", &["--zone", "z1"]);
    let (_far1, _) = Node::provider_with(registry, "far1", &["--zone", "z2"]);
    let (_far2, _) = Node::provider_with(registry, "far2", &["--zone", "z2"]);
    let client = consumer(registry, Who { zone: "z1", ..WEB }, Balance::Random);
    wait_for_providers(&client, 3).await;
    let revision = put_rule(
        admin,
        "stay-in-zone",
        r#"{"kind":"zone_affinity","min_healthy_share":0.5}"#,
    )
    .await;
    wait_for_rules(&client, revision).await;
    let in_zone = shares(&client, 200).await;
    assert_eq!(in_zone.get("near"), Some(&1.0), "{in_zone:?}");

    near.kill_hard();
    wait_for_providers(&client, 2).await;
    let fallback = shares(&client, 200).await;
    eprintln!("in zone: {in_zone:?}; after the zone emptied: {fallback:?}");
    assert!(
        fallback.contains_key("far1") && fallback.contains_key("far2"),
        "{fallback:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_affinity_leaves_the_zone_when_too_few_of_its_providers_are_healthy() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &[]);
    let (_near, _) = Node::provider_with(registry, "near", &["--zone", "z1"]);
    let (_far, _) = Node::provider_with(registry, "far", &["--zone", "z2"]);
    // A second provider in the zone, which refuses every connection: once
    // tried, the consumer sets it aside, and half the zone is healthy.
    let ghost = RegistrySession::start(SessionConfig::new([registry.to_string()], "ghost", Role::Provider));
    let nobody = pb::Instance {
        host: "127.0.0.1".into(),
        port: free_port().into(),
        weight: 100,
        zone: "z1".into(),
        protocol: "tern".into(),
        ..pb::Instance::default()
    };
    ghost.register(&SERVICE.parse().unwrap(), nobody).await.unwrap();
    let client = consumer(registry, Who { zone: "z1", ..WEB }, Balance::Random);
    wait_for_providers(&client, 3).await;

    let rule = |share: f64| format!(r#"{{"kind":"zone_affinity","min_healthy_share":{share}}}"#);
    let revision = put_rule(admin, "zone", &rule(0.75)).await;
    wait_for_rules(&client, revision).await;
    call_until(&client, "a call served out of the zone", |r| {
        matches!(r.as_deref(), Ok("far"))
    })
    .await;

    let revision = put_rule(admin, "zone", &rule(0.5)).await;
    wait_for_rules(&client, revision).await;
    let in_zone = shares(&client, 100).await;
    assert_eq!(in_zone.get("near"), Some(&1.0), "{in_zone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_sends_matching_consumers_to_matching_providers() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &[]);
    let (_stable, _) = Node::provider_with(registry, "stable", &["--label", "env=stable"]);
    let (_gray, _) = Node::provider_with(registry, "gray", &["--label", "env=gray"]);
    let tester = consumer(
        registry,
        Who {
            labels: &[("env", "gray")],
            ..WEB
        },
        Balance::Random,
    );
    let plain = consumer(registry, WEB, Balance::Random);
    wait_for_providers(&tester, 2).await;
    wait_for_providers(&plain, 2).await;

    // A route whose providers do not exist is refused, naming the field.
    let path = format!("/api/rule?service={SERVICE}&name=nowhere");
    let (status, body) = http(
        admin,
        "PUT",
        &path,
        r#"{"kind":"route","when":{"labels":{"env":"gray"}},"then":{"env":"canary"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("then") && body.contains("canary"), "{body}");
    let (status, stored) = http(admin, "GET", &format!("/api/rules?service={SERVICE}"), "")
        .await
        .unwrap();
    assert_eq!((status, stored.trim()), (200, "[]"), "a refused rule was stored");
    let (status, history) = http(admin, "GET", "/api/rules/history?name=nowhere", "").await.unwrap();
    assert_eq!((status, history.trim()), (200, "[]"), "a refused rule was audited");

    let rule = r#"{"kind":"route","when":{"labels":{"env":"gray"}},"then":{"env":"gray"}}"#;
    let revision = put_rule(admin, "gray", rule).await;
    wait_for_rules(&tester, revision).await;
    wait_for_rules(&plain, revision).await;
    assert_eq!(shares(&tester, 100).await.get("gray"), Some(&1.0));
    let spread = shares(&plain, 200).await;
    assert!(
        spread.len() == 2,
        "a consumer the route does not match uses every provider: {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_without_the_service_token_are_refused() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &[]);
    let (_provider, addr) = Node::provider(registry, "a");
    let web = consumer(registry, WEB, Balance::Random);
    let batch = consumer(registry, Who { app: "batch", ..WEB }, Balance::Random);
    wait_for_providers(&web, 1).await;
    put_rule(admin, "web-only", r#"{"kind":"access","allow_apps":["web"]}"#).await;
    let revision = put_rule(admin, "token", r#"{"kind":"token"}"#).await;
    wait_for_rules(&web, revision).await;
    wait_for_rules(&batch, revision).await;

    // The ConfigServer handed the token to web, which the rules allow.
    call_until(&web, "a call with the token", Result::is_ok).await;
    // A consumer that does not go through the registry has no token.
    let direct = Consumer::new(ConsumerConfig {
        app: "web".into(),
        ..ConsumerConfig::default()
    })
    .reference::<GreeterClient<_>>()
    .version("1.0.0")
    .direct([addr])
    .build()
    .unwrap();
    let refused = hello(&direct).await.unwrap_err();
    assert!(matches!(refused, Error::Unauthenticated(_)), "{refused}");
    // batch was not sent the token, and is denied anyway.
    assert!(matches!(hello(&batch).await, Err(Error::Forbidden(_))));
}

/// On the default store (an SQLite file in the data dir), then on
/// PostgreSQL and MySQL when their URLs are set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_survive_a_configserver_restart_and_providers_enforce_them_while_it_is_down() {
    restart_keeps_rules(None).await;
    for var in ["TEST_POSTGRES_URL", "TEST_MYSQL_URL"] {
        match std::env::var(var) {
            Ok(url) if !url.is_empty() => restart_keeps_rules(Some(&url)).await,
            _ => skipped(&format!("{var} is not set; the restart test ran on SQLite only")),
        }
    }
}

async fn restart_keeps_rules(store: Option<&str>) {
    let dir = std::env::temp_dir().join(format!("tern-governance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data_dir = dir.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut flags = vec![
        "--data-dir",
        data_dir,
        "--heartbeat-interval-ms",
        "200",
        "--heartbeat-timeout-ms",
        "600",
    ];
    if let Some(url) = store {
        flags.extend(["--store", url]);
    }
    let (mut cs, registry, admin) = Node::configserver(&listen, &flags);
    // A shared database may hold this rule from an earlier run.
    let path = format!("/api/rule?service={SERVICE}&name=no-batch");
    http(admin, "DELETE", &path, "").await.unwrap();
    let (_provider, _) = Node::provider(registry, "a");
    let batch = consumer(registry, Who { app: "batch", ..WEB }, Balance::Random);
    wait_for_providers(&batch, 1).await;
    put_rule(admin, "no-batch", r#"{"kind":"access","deny_apps":["batch"]}"#).await;
    call_until(&batch, "Forbidden", |r| matches!(r, Err(Error::Forbidden(_)))).await;

    // The ConfigServer dies. Past the nodes' silence timeout (600 ms) the
    // provider has no server, and still refuses batch.
    cs.kill_hard();
    let observe = Instant::now();
    let mut calls = 0;
    while observe.elapsed() < Duration::from_millis(1500) {
        let result = hello(&batch).await;
        assert!(matches!(result, Err(Error::Forbidden(_))), "{result:?}");
        calls += 1;
    }
    eprintln!("{calls} calls refused while the ConfigServer was down");

    // Back with the same data dir: a provider that starts now gets the rule
    // from the store.
    let (_cs, registry, admin) = Node::configserver(&listen, &flags);
    let (_fresh, fresh) = Node::provider(registry, "fresh");
    let fresh_only = Consumer::new(ConsumerConfig {
        app: "batch".into(),
        ..ConsumerConfig::default()
    })
    .reference::<GreeterClient<_>>()
    .version("1.0.0")
    .direct([fresh])
    .build()
    .unwrap();
    let refused = hello(&fresh_only).await.unwrap_err();
    assert!(matches!(refused, Error::Forbidden(_)), "{store:?}: {refused}");
    let (status, body) = http(admin, "DELETE", &path, "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_is_acknowledged_only_after_its_rules_arrived() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &[]);
    let revision = put_rule(admin, "deny-batch", r#"{"kind":"access","deny_apps":["batch"]}"#).await;
    let key: ServiceKey = SERVICE.parse().unwrap();
    // Each provider session holds the rules the moment its registration
    // returns: a provider can serve right after it without a call slipping
    // past its rules.
    for port in 30_001..30_021u32 {
        let session = RegistrySession::start(SessionConfig::new([registry.to_string()], "greeter", Role::Provider));
        let instance = pb::Instance {
            host: "127.0.0.1".into(),
            port,
            weight: 100,
            ..pb::Instance::default()
        };
        // As a provider does: register on a live stream, so the call waits
        // for the server's answer.
        let mut connected = session.connected();
        tokio::time::timeout(LIMIT, connected.wait_for(Option::is_some))
            .await
            .expect("connected in time")
            .unwrap();
        tokio::time::timeout(LIMIT, session.register(&key, instance))
            .await
            .expect("registered in time")
            .unwrap();
        let held = session.rules(&key).borrow().clone();
        assert_eq!(held.revision, revision, "port {port}: the ack came before the rules");
        assert_eq!(held.rules.len(), 1);
        session.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_restarted_while_the_configserver_is_down_keeps_its_token_from_the_cache() {
    let cache = std::env::temp_dir().join(format!("tern-rules-cache-{}.bin", std::process::id()));
    let _ = std::fs::remove_file(&cache);
    let consumer_with_cache = |registry: SocketAddr| {
        let mut session = SessionConfig::new([registry.to_string()], "web", Role::Consumer);
        session.cache_file = Some(cache.clone());
        Consumer::new(ConsumerConfig {
            app: "web".into(),
            registry: Some(session),
            ..ConsumerConfig::default()
        })
        .reference::<GreeterClient<_>>()
        .version("1.0.0")
        .build()
        .unwrap()
    };
    let (mut cs, registry, admin) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let (_provider, _) = Node::provider(registry, "a");
    let revision = put_rule(admin, "token", r#"{"kind":"token","token":"cached-token-123"}"#).await;
    let first = consumer_with_cache(registry);
    wait_for_providers(&first, 1).await;
    wait_for_rules(&first, revision).await;
    hello(&first).await.unwrap();
    // The cache file is rewritten at the session's next heartbeat.
    let start = Instant::now();
    while !std::fs::read(&cache).is_ok_and(|b| b.windows(16).any(|w| w == b"cached-token-123")) {
        assert!(start.elapsed() < LIMIT, "rules never written to the cache file");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(first);
    cs.kill_hard();

    let second = consumer_with_cache(registry);
    assert_eq!(
        second.invoker().rules_revision(),
        revision,
        "rules come from the cache, at once"
    );
    assert_eq!(hello(&second).await.unwrap(), "a");
    let _ = std::fs::remove_file(&cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_credentials_apps_must_authenticate_and_provide_only_their_services() {
    let dir = std::env::temp_dir().join(format!("tern-credentials-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("credentials.toml");
    std::fs::write(
        &file,
        r#"
        admin-token = "admin-secret-1"
        [apps.greeter]
        token = "greeter-secret"
        provide = ["demo.Greeter:1.0.0", "demo.Echo:1.0.0"]
        consume = ["demo.Greeter"]
        [apps.rogue]
        token = "rogue-secret"
        "#,
    )
    .unwrap();
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &["--credentials", file.to_str().unwrap()]);

    // The allowed app registers; the rogue one is refused with a clear error.
    let (_good, _) = Node::provider_with(registry, "good", &["--app", "greeter", "--token", "greeter-secret"]);
    let registry_flag = registry.to_string();
    let (status, stderr) = Node::run_to_end(
        &[
            "provider",
            "--registry",
            &registry_flag,
            "--app",
            "rogue",
            "--token",
            "rogue-secret",
        ],
        LIMIT,
    );
    assert!(!status.success());
    assert!(
        stderr.contains("may not provide") && stderr.contains("rogue"),
        "{stderr}"
    );

    // A wrong token ends the session at Hello: a provider with one fails to start.
    let (status, stderr) = Node::run_to_end(
        &[
            "provider",
            "--registry",
            &registry_flag,
            "--app",
            "greeter",
            "--token",
            "guess",
        ],
        LIMIT,
    );
    assert!(!status.success());
    assert!(stderr.contains("refused") && stderr.contains("greeter"), "{stderr}");
    let mut client = RegistryClient::connect(format!("http://{registry}")).await.unwrap();
    let hello = NodeMessage {
        request_id: 1,
        body: Some(node_message::Body::Hello(pb::Hello {
            app: "greeter".into(),
            token: "guess".into(),
            ..pb::Hello::default()
        })),
    };
    let mut answers = client.session(tokio_stream::iter([hello])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    let Some(server_message::Body::Error(error)) = answer.body else {
        panic!("{answer:?}")
    };
    assert_eq!(error.kind, "unauthenticated", "{error:?}");

    // Subscribing needs the service in the app's consume list.
    for (app, token, service, refused) in [
        ("greeter", "greeter-secret", "demo.Greeter", false),
        ("greeter", "greeter-secret", "demo.Echo", true),
        ("rogue", "rogue-secret", "demo.Greeter", true),
    ] {
        let messages = [
            NodeMessage {
                request_id: 1,
                body: Some(node_message::Body::Hello(pb::Hello {
                    app: app.into(),
                    token: token.into(),
                    ..pb::Hello::default()
                })),
            },
            NodeMessage {
                request_id: 2,
                body: Some(node_message::Body::Subscribe(pb::Subscribe {
                    service: Some(pb::ServiceKey {
                        interface: service.into(),
                        version: "1.0.0".into(),
                        group: String::new(),
                    }),
                    ..pb::Subscribe::default()
                })),
            },
        ];
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        for m in messages {
            tx.send(m).await.unwrap();
        }
        let mut answers = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let answer = loop {
            let message = answers.message().await.unwrap().expect("an answer");
            if message.request_id == 2 {
                break message.body;
            }
        };
        match answer {
            Some(server_message::Body::Error(e)) if refused => {
                assert_eq!(e.kind, "forbidden", "{e:?}");
                assert!(
                    e.message.contains("may not consume") && e.message.contains(app),
                    "{e:?}"
                );
            }
            Some(server_message::Body::Ack(_)) if !refused => {}
            other => panic!("{app} subscribing to {service}: {other:?}"),
        }
        drop(tx);
    }

    // Admin writes need the admin token.
    let path = format!("/api/rule?service={SERVICE}&name=x");
    let (status, _) = http(admin, "PUT", &path, r#"{"kind":"qps_limit","qps":5}"#)
        .await
        .unwrap();
    assert_eq!(status, 401);
    let wrong = "Authorization: Bearer greeter-secret\r\n";
    let (status, _) = http_with(admin, "PUT", &path, r#"{"kind":"qps_limit","qps":5}"#, wrong)
        .await
        .unwrap();
    assert_eq!(status, 401, "an app's token is not the admin token");
    let admin_token = "Authorization: Bearer admin-secret-1\r\n";
    let (status, body) = http_with(admin, "PUT", &path, r#"{"kind":"qps_limit","qps":5}"#, admin_token)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // So do the listings and metrics; probes and the address server's
    // list stay open.
    for path in [
        "/api/services",
        "/api/services/demo.Greeter:1.0.0",
        "/api/cluster",
        "/metrics",
    ] {
        let (status, _) = http(admin, "GET", path, "").await.unwrap();
        assert_eq!(status, 401, "{path} answered without the admin token");
        let (status, body) = http_with(admin, "GET", path, "", admin_token).await.unwrap();
        assert!(status == 200 || status == 404, "{path} with the token: {status} {body}");
    }
    for path in ["/healthz", "/readyz", "/api/cluster/servers"] {
        let (status, _) = http(admin, "GET", path, "").await.unwrap();
        assert_eq!(status, 200, "{path} needs no token");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
