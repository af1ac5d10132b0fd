//! Consumer-side fault tolerance on real sockets: failover never repeats a
//! provider within a call, timeouts are retried only for idempotent
//! methods, the retry budget caps retries, and a provider that refuses
//! connections is set aside at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use consumer_sdk::{Balance, Cluster, Consumer, ConsumerConfig, MethodConfig, Reference, ReferenceBuilder};
use provider_sdk::Provider;
use rpc_core::{Error, Request, RetryBudget, Status};
use tern_e2e::demo::{Echo, EchoClient, EchoReply, EchoRequest, EchoServer};

/// Records `(call id, provider)` for every request it sees, then answers
/// `Busy` (while `busy_left` > 0), or echoes after `delay`.
#[derive(Clone)]
struct Recording {
    name: usize,
    seen: Arc<Mutex<Vec<(u64, usize)>>>,
    busy_left: Arc<AtomicI64>,
    delay: Duration,
}

impl Echo for Recording {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<EchoReply, Status> {
        let id = request.get_ref().id;
        self.seen.lock().unwrap().push((id, self.name));
        if self.busy_left.fetch_sub(1, Ordering::SeqCst) > 0 {
            return Err(Status::busy("busy"));
        }
        tokio::time::sleep(self.delay).await;
        Ok(EchoReply {
            id,
            payload: Bytes::new(),
        })
    }
}

async fn providers(n: usize, busy: bool, delay: Duration) -> (Vec<Provider>, Arc<Mutex<Vec<(u64, usize)>>>) {
    let delays = vec![delay; n];
    providers_with(&delays, if busy { i64::MAX } else { 0 }).await
}

/// Providers with the given delays, each busy for its first `busy_first` calls.
async fn providers_with(delays: &[Duration], busy_first: i64) -> (Vec<Provider>, Arc<Mutex<Vec<(u64, usize)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut list = Vec::new();
    for (name, &delay) in delays.iter().enumerate() {
        let service = Recording {
            name,
            seen: seen.clone(),
            busy_left: Arc::new(AtomicI64::new(busy_first)),
            delay,
        };
        list.push(
            Provider::builder()
                .bind("127.0.0.1:0")
                .service(EchoServer::new(service))
                .start()
                .await
                .unwrap(),
        );
    }
    (list, seen)
}

fn reference(addrs: impl IntoIterator<Item = SocketAddr>) -> ReferenceBuilder<EchoClient<Reference>> {
    Consumer::new(ConsumerConfig::default())
        .reference::<EchoClient<_>>()
        .balance(Balance::Random)
        .direct(addrs)
}

fn request(id: u64) -> EchoRequest {
    EchoRequest {
        id,
        ..EchoRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_never_tries_the_same_provider_twice_while_untried_ones_remain() {
    let (list, seen) = providers(3, true, Duration::ZERO).await;
    let client = reference(list.iter().map(Provider::local_addr))
        .retries(2)
        .retry_budget(None)
        .build()
        .unwrap();
    for id in 0..100 {
        let err = client.echo(request(id)).await.unwrap_err();
        assert!(matches!(err, Error::Busy(_)), "{err}");
    }
    let seen = seen.lock().unwrap();
    for id in 0..100 {
        let mut tried: Vec<usize> = seen.iter().filter(|(i, _)| *i == id).map(|(_, p)| *p).collect();
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2], "call {id} tried {tried:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_retried_only_for_idempotent_methods() {
    let (list, seen) = providers(2, false, Duration::from_millis(500)).await;
    let addrs: Vec<_> = list.iter().map(Provider::local_addr).collect();

    let plain = reference(addrs.clone())
        .timeout(Duration::from_secs(2))
        .attempt_timeout(Duration::from_millis(100))
        .retries(1)
        .build()
        .unwrap();
    let err = plain.echo(request(1)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert_eq!(
        seen.lock().unwrap().iter().filter(|(id, _)| *id == 1).count(),
        1,
        "not retried"
    );

    let idempotent = reference(addrs)
        .timeout(Duration::from_secs(2))
        .attempt_timeout(Duration::from_millis(100))
        .retries(1)
        .idempotent(["Echo"])
        .build()
        .unwrap();
    let err = idempotent.echo(request(2)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    let mut tried: Vec<usize> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _)| *id == 2)
        .map(|(_, p)| *p)
        .collect();
    tried.sort_unstable();
    assert_eq!(tried, [0, 1], "retried once, on the other provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_when_every_provider_fails() {
    let (list, seen) = providers(3, true, Duration::ZERO).await;
    let client = reference(list.iter().map(Provider::local_addr))
        .retries(2)
        .retry_budget(Some(RetryBudget::new(0.2, 0.0, Duration::from_secs(60))))
        .build()
        .unwrap();
    for id in 0..500 {
        assert!(client.echo(request(id)).await.is_err());
    }
    let tries = seen.lock().unwrap().len();
    assert_eq!(tries, 500 + 100, "500 calls may add 20% retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_refusing_connections_is_set_aside_at_once() {
    let (list, _) = providers(1, false, Duration::ZERO).await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let client = reference([list[0].local_addr(), dead]).retries(0).build().unwrap();
    let mut failed = 0;
    for id in 0..200 {
        failed += usize::from(client.echo(request(id)).await.is_err());
    }
    // Without setting it aside, about half the calls would go to the dead
    // provider; with it, only the probes after each back-off do.
    assert!(failed <= 5, "{failed} of 200 calls failed");
}

fn hits(seen: &Mutex<Vec<(u64, usize)>>, id: u64) -> Vec<usize> {
    let mut providers: Vec<usize> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, p)| *p)
        .collect();
    providers.sort_unstable();
    providers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failfast_tries_once() {
    let (list, seen) = providers(2, true, Duration::ZERO).await;
    let client = reference(list.iter().map(Provider::local_addr))
        .cluster(Cluster::Failfast)
        .retries(5)
        .build()
        .unwrap();
    assert!(matches!(client.echo(request(1)).await, Err(Error::Busy(_))));
    assert_eq!(hits(&seen, 1).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_answers_an_empty_reply() {
    let (list, _) = providers(1, true, Duration::ZERO).await;
    let client = reference(list.iter().map(Provider::local_addr))
        .cluster(Cluster::Failsafe)
        .build()
        .unwrap();
    assert_eq!(client.echo(request(7)).await.unwrap(), EchoReply::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_answers_now_and_retries_in_the_background() {
    let (list, seen) = providers_with(&[Duration::ZERO], 1).await;
    let client = reference(list.iter().map(Provider::local_addr))
        .cluster(Cluster::Failback)
        .build()
        .unwrap();
    assert_eq!(client.echo(request(3)).await.unwrap(), EchoReply::default());
    let start = Instant::now();
    while hits(&seen, 3).len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "no background retry");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forking_returns_the_first_success() {
    let slow = Duration::from_secs(5);
    let (list, seen) = providers_with(&[slow, Duration::ZERO, slow], 0).await;
    let client = reference(list.iter().map(Provider::local_addr))
        .cluster(Cluster::Forking { parallel: 3 })
        .build()
        .unwrap();
    let start = Instant::now();
    assert_eq!(client.echo(request(4)).await.unwrap().id, 4);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "waited {:?} for the slow ones",
        start.elapsed()
    );
    // All three were asked (the slow ones may log their start just after).
    while hits(&seen, 4) != [0, 1, 2] {
        assert!(start.elapsed() < Duration::from_secs(4), "asked {:?}", hits(&seen, 4));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_calls_everyone_and_fails_if_anyone_fails() {
    let (list, seen) = providers(3, false, Duration::ZERO).await;
    let client = reference(list.iter().map(Provider::local_addr))
        .cluster(Cluster::Broadcast)
        .build()
        .unwrap();
    assert_eq!(client.echo(request(5)).await.unwrap().id, 5);
    assert_eq!(hits(&seen, 5), [0, 1, 2]);

    let (mut list, _) = providers(2, false, Duration::ZERO).await;
    let (busy, _) = providers(1, true, Duration::ZERO).await;
    list.extend(busy);
    let client = reference(list.iter().map(Provider::local_addr))
        .cluster(Cluster::Broadcast)
        .build()
        .unwrap();
    assert!(matches!(client.echo(request(6)).await, Err(Error::Busy(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_settings_override_the_reference() {
    let (list, seen) = providers(3, true, Duration::ZERO).await;
    let client = reference(list.iter().map(Provider::local_addr))
        .retries(2)
        .retry_budget(None)
        .method(
            "Echo",
            MethodConfig {
                retries: Some(0),
                ..MethodConfig::default()
            },
        )
        .build()
        .unwrap();
    assert!(client.echo(request(8)).await.is_err());
    assert_eq!(hits(&seen, 8).len(), 1, "the method's retries (0) apply");
}

struct Broken;

impl Echo for Broken {
    async fn echo(&self, _: Request<EchoRequest>) -> Result<EchoReply, Status> {
        Err(Status::internal("broken"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_eject_a_provider() {
    let (healthy, _) = providers(1, false, Duration::ZERO).await;
    let broken = Provider::builder()
        .bind("127.0.0.1:0")
        .service(EchoServer::new(Broken))
        .start()
        .await
        .unwrap();
    let addrs = [healthy[0].local_addr(), broken.local_addr()];
    let count_failures = |client: EchoClient<Reference>| async move {
        let mut failed = 0;
        for id in 0..200 {
            failed += usize::from(client.echo(request(id)).await.is_err());
        }
        failed
    };
    let without = count_failures(reference(addrs).retries(0).build().unwrap()).await;
    let with = count_failures(reference(addrs).retries(0).circuit_breaker(Some(3)).build().unwrap()).await;
    assert!(without > 50, "{without} failures without the breaker");
    assert!(with <= 5, "{with} failures with the breaker (3 to trip it)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_resetting_connections_is_set_aside_at_once() {
    let (healthy, _) = providers(1, false, Duration::ZERO).await;
    // Accepts every connection and closes it at once.
    let resetting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resetting_addr = resetting.local_addr().unwrap();
    let acceptor = tokio::spawn(async move {
        while let Ok((stream, _)) = resetting.accept().await {
            drop(stream);
        }
    });
    let client = reference([healthy[0].local_addr(), resetting_addr])
        .retries(0)
        .build()
        .unwrap();
    let mut failed = 0;
    for id in 0..200 {
        failed += usize::from(client.echo(request(id)).await.is_err());
    }
    assert!(failed <= 8, "{failed} of 200 calls failed");
    acceptor.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_accepts_but_never_answers_is_timed_out_and_ejected() {
    let (healthy, _) = providers(1, false, Duration::ZERO).await;
    // Accepts connections and holds them open without reading or answering.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let client = reference([healthy[0].local_addr(), silent_addr])
        .timeout(Duration::from_secs(2))
        .attempt_timeout(Duration::from_millis(100))
        .retries(1)
        .idempotent(["Echo"])
        .circuit_breaker(Some(2))
        .build()
        .unwrap();
    let start = Instant::now();
    for id in 0..100 {
        client
            .echo(request(id))
            .await
            .expect("every call answered by the healthy provider");
    }
    // Only the tries that tripped the breaker waited for the deadline.
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    holder.abort();
}
