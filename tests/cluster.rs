//! Consumer-side fault tolerance on real sockets: failover never repeats a
//! provider within a call, timeouts are retried only for idempotent
//! methods, the retry budget caps retries, and a provider that refuses
//! connections is set aside at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rpc_core::{Error, Request, RetryBudget, Status};
use tern::consumer::{Balance, Consumer, ConsumerConfig, Reference, ReferenceBuilder};
use tern::demo::{Echo, EchoClient, EchoReply, EchoRequest, EchoServer};
use tern::provider::Provider;

/// Records `(call id, provider)` for every request it sees, then answers
/// `Busy`, or echoes after `delay`.
#[derive(Clone)]
struct Recording {
    name: usize,
    seen: Arc<Mutex<Vec<(u64, usize)>>>,
    busy: bool,
    delay: Duration,
}

impl Echo for Recording {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<EchoReply, Status> {
        let id = request.get_ref().id;
        self.seen.lock().unwrap().push((id, self.name));
        if self.busy {
            return Err(Status::busy("always busy"));
        }
        tokio::time::sleep(self.delay).await;
        Ok(EchoReply {
            id,
            payload: Bytes::new(),
        })
    }
}

async fn providers(n: usize, busy: bool, delay: Duration) -> (Vec<Provider>, Arc<Mutex<Vec<(u64, usize)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut list = Vec::new();
    for name in 0..n {
        let service = Recording {
            name,
            seen: seen.clone(),
            busy,
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
