//! The fault suite: what a consumer and the ConfigServer do when a
//! provider or the ConfigServer fails, across real processes on real
//! sockets. Each test runs under a hard time limit ([`TEST_LIMIT`]) and
//! bounds every wait ([`common::LIMIT`]).
//!
//! Here:
//! - a provider killed with SIGKILL is dropped by every consumer at once;
//! - a provider frozen with SIGSTOP is expired after the heartbeat timeout
//!   and comes back after SIGCONT;
//! - the ConfigServer killed and restarted under load: no call fails, the
//!   registrations come back;
//! - a provider cut off by a network partition (a network namespace the
//!   test makes, its veth link set down): calls fail over with none failing,
//!   the ConfigServer drops it within the heartbeat timeout, and it is back
//!   after healing. Where the machine cannot make a namespace (no `ip`, no
//!   privilege) the test prints `SKIPPED: ...` to stderr and returns.
//!
//! Elsewhere, because they need a fake peer in the test process rather than
//! a real one: `tests/cluster.rs` has providers that refuse connections,
//! reset them, fail every call or accept and never answer;
//! `tests/registry.rs` has a ConfigServer that never answers and a control
//! connection cut and restored; `tests/data_plane.rs` a provider process
//! killed in the middle of calls.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    FAST_HEARTBEAT, LIMIT, Load, Netns, Node, Signal, consumer, free_port, greeter, http_get, metric, wait_for,
};
use consumer_sdk::Reference;
use tern_e2e::demo::{GreeterClient, HelloRequest};

/// Hard limit on one whole test.
const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn within<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .unwrap_or_else(|_| panic!("test still running after its limit of {TEST_LIMIT:?}"));
}

// === process faults ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_provider_is_dropped_by_every_consumer() {
    within(async {
        let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
        let mut providers: Vec<_> = ["a", "b", "c"].iter().map(|n| Node::provider(registry, n)).collect();
        let consumers = [consumer(registry, 2), consumer(registry, 2)];
        for c in &consumers {
            wait_for(c, "3 providers", |p| p.len() == 3).await;
        }
        let victim = providers[0].1;
        providers[0].0.kill_hard();
        for c in &consumers {
            let took = wait_for(c, "the killed provider is dropped", |p| {
                p.len() == 2 && !p.contains(&victim)
            })
            .await;
            assert!(took < Duration::from_secs(1), "dropped after {took:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_provider_is_dropped_within_the_heartbeat_timeout_and_returns_after_sigcont() {
    within(async {
        let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &FAST_HEARTBEAT);
        let (stopped, stopped_addr) = Node::provider(registry, "a");
        let _other = Node::provider(registry, "b");
        let client = consumer(registry, 2);
        wait_for(&client, "2 providers", |p| p.len() == 2).await;

        stopped.signal(Signal::STOP);
        let took = wait_for(&client, "the stopped provider is dropped", |p| {
            p.len() == 1 && !p.contains(&stopped_addr)
        })
        .await;
        assert!(
            took <= Duration::from_millis(1500 + 1000),
            "dropped after {took:?} (timeout 1.5 s)"
        );

        stopped.signal(Signal::CONT);
        wait_for(&client, "the provider is back", |p| p.contains(&stopped_addr)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configserver_killed_and_restarted_under_load_loses_no_call_and_gets_registrations_back() {
    within(async {
        let listen = format!("127.0.0.1:{}", free_port());
        let args = ["--startup-grace-ms", "1000"];
        let (mut cs, registry, _) = Node::configserver(&listen, &args);
        let _providers: Vec<_> = ["a", "b", "c"].iter().map(|n| Node::provider(registry, n)).collect();
        let client = consumer(registry, 0);
        wait_for(&client, "3 providers", |p| p.len() == 3).await;

        let load = Load::start(&client, 4);
        load.run_for_calls(300).await;
        cs.kill_hard();
        load.run_for_calls(1000).await;
        assert_eq!(
            client.invoker().providers().len(),
            3,
            "lists kept while the ConfigServer is down"
        );

        let (_cs, _, admin) = Node::configserver(&listen, &args);
        let start = Instant::now();
        loop {
            let body = http_get(admin, "/api/services/demo.Greeter:1.0.0")
                .await
                .unwrap_or_default();
            if body.matches("\"address\"").count() == 3 {
                break;
            }
            assert!(start.elapsed() < LIMIT, "registrations not back: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Past the restarted server's grace period its complete snapshot applies.
        let page = loop {
            let page = http_get(admin, "/metrics").await.unwrap();
            if start.elapsed() > Duration::from_millis(1500) {
                break page;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(metric(&page, "configserver_pushed_snapshots_total") >= 2, "{page}");
        load.run_for_calls(300).await;
        assert_eq!(client.invoker().providers().len(), 3);
        let (calls, failed) = load.finish().await;
        assert_eq!(failed, 0, "{failed} of {calls} calls failed");
    })
    .await;
}

// === network partition ===

/// A consumer that retries a timed-out try elsewhere (SayHello is
/// idempotent) and sets a provider aside after two failures.
fn failover_consumer(registry: SocketAddr) -> GreeterClient<Reference> {
    greeter(registry)
        .timeout(Duration::from_secs(2))
        .attempt_timeout(Duration::from_millis(200))
        .retries(2)
        .idempotent(["SayHello"])
        .circuit_breaker(Some(2))
        .build()
        .unwrap()
}

/// Calls until provider `name` serves one (bounded by [`LIMIT`]).
async fn served_by(client: &GreeterClient<Reference>, name: &str) {
    let start = Instant::now();
    loop {
        let reply = client.say_hello(HelloRequest { name: "probe".into() }).await;
        if reply.is_ok_and(|r| r.served_by == name) {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "provider {name} served no call within {LIMIT:?}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_cut_off_by_a_network_partition_fails_over_is_dropped_and_returns_after_healing() {
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(why) => {
            common::skipped(&format!(
                "network partition test: cannot make a network namespace here: {why}"
            ));
            return;
        }
    };
    within(async {
        // The ConfigServer listens on this side's veth address so that the
        // provider in the namespace can reach it; consumers and two other
        // providers stay in this namespace.
        let listen = format!("{}:0", netns.host_ip);
        let (_cs, registry, _) = Node::configserver(&listen, &FAST_HEARTBEAT);
        let _others = [Node::provider(registry, "a"), Node::provider(registry, "b")];
        let (registry_arg, bind) = (registry.to_string(), format!("{}:0", netns.ns_ip));
        let cut = Node::spawn_wrapped(
            &netns.wrapper(),
            &[
                "provider",
                "--bind",
                &bind,
                "--registry",
                &registry_arg,
                "--name",
                "cut",
            ],
        );
        let cut_addr: SocketAddr = cut.first_line[1].parse().expect("provider address");
        let client = failover_consumer(registry);
        wait_for(&client, "3 providers", |p| p.len() == 3).await;
        served_by(&client, "cut").await;

        let load = Load::start(&client, 8);
        load.run_for_calls(300).await;
        netns.set_link(false);
        let took = wait_for(&client, "the partitioned provider is dropped", |p| {
            p.len() == 2 && !p.contains(&cut_addr)
        })
        .await;
        eprintln!("partition: the provider was dropped {took:?} after its link went down");
        assert!(
            took <= Duration::from_millis(1500 + 1000),
            "dropped after {took:?} (heartbeat timeout 1.5 s)"
        );
        load.run_for_calls(500).await;

        netns.set_link(true);
        let took = wait_for(&client, "the provider is back after healing", |p| p.contains(&cut_addr)).await;
        eprintln!("partition: the provider was back {took:?} after healing");
        load.run_for_calls(300).await;
        let (calls, failed) = load.finish().await;
        assert_eq!(failed, 0, "{failed} of {calls} calls failed");
        served_by(&client, "cut").await;
        drop(cut);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configserver_stopped_for_longer_than_the_heartbeat_timeout_drops_no_live_provider() {
    within(async {
        // FAST_HEARTBEAT, with a startup grace (which a stall starts again).
        let args = [&FAST_HEARTBEAT[2..], &["--startup-grace-ms", "3000"]].concat();
        let (cs, registry, admin) = Node::configserver("127.0.0.1:0", &args);
        let providers = [Node::provider(registry, "a"), Node::provider(registry, "b")];
        let want: Vec<SocketAddr> = providers.iter().map(|(_, addr)| *addr).collect();
        let client = consumer(registry, 2);
        wait_for(&client, "2 providers", |p| p.len() == 2).await;
        // Every list the consumer's directory held, from here on.
        let missing = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let watcher = {
            let (client, missing, want) = (client.clone(), missing.clone(), want.clone());
            tokio::spawn(async move {
                loop {
                    let held = client.invoker().providers();
                    if !want.iter().all(|w| held.contains(w)) {
                        missing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };

        // Stopped for well over the heartbeat timeout (1.5 s): every node's
        // heartbeats wait in its socket, and the nodes give up on it.
        cs.signal(Signal::STOP);
        tokio::time::sleep(Duration::from_secs(4)).await;
        cs.signal(Signal::CONT);

        let start = Instant::now();
        loop {
            let page = http_get(admin, "/metrics").await.unwrap_or_default();
            if !page.is_empty() && metric(&page, "configserver_stalls_total") >= 1 {
                assert_eq!(
                    metric(&page, "configserver_sessions_expired_total"),
                    0,
                    "sessions expired for time the server did not run"
                );
                break;
            }
            assert!(start.elapsed() < LIMIT, "the server never noticed it had been stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The nodes are back (they reconnected), and no list lost a provider.
        wait_for(&client, "both providers after the stall", |p| {
            want.iter().all(|w| p.contains(w))
        })
        .await;
        // The server lists them again once their nodes have reconnected and
        // registered anew (a node's reconnect backoff can run past the
        // consumer's check above, whose list never lost them).
        let start = Instant::now();
        loop {
            let listed = http_get(admin, "/api/services/demo.Greeter:1.0.0")
                .await
                .unwrap_or_default();
            if want.iter().all(|addr| listed.contains(&addr.to_string())) {
                break;
            }
            assert!(start.elapsed() < LIMIT, "not listed again after the stall: {listed}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        load_ok(&client).await;
        watcher.abort();
        assert_eq!(
            missing.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "a live provider left the consumer's list"
        );
    })
    .await;
}

/// A few calls succeed.
async fn load_ok(client: &GreeterClient<Reference>) {
    for _ in 0..20 {
        client.say_hello(HelloRequest { name: "after".into() }).await.unwrap();
    }
}
