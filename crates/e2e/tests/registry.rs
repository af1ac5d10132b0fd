//! End-to-end tests of the registry with real processes: a ConfigServer and
//! providers run as `tern-node` child processes; consumers run here. Process
//! and network faults (kill -9, SIGSTOP, a ConfigServer restart, a
//! partition) are in `tests/faults.rs`.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{FAST_HEARTBEAT, LIMIT, Load, Node, Proxy, Signal, consumer, http_get, metric, wait_for};
use consumer_sdk::{Consumer, ConsumerConfig};
use rpc_core::registry::framing;
use rpc_core::registry::{RegistrySession, Role, SessionConfig, Transport};
use tern_e2e::demo::{GreeterClient, HelloRequest};
use tern_proto::registry::registry_client::RegistryClient;
use tern_proto::registry::{self as pb, NodeMessage, ServerMessage, node_message, server_message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::task::AbortOnDropHandle;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_provider_stop_loses_no_call_even_without_retries() {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let mut providers: Vec<_> = ["a", "b", "c"].iter().map(|n| Node::provider(registry, n)).collect();
    let client = consumer(registry, 0);
    wait_for(&client, "3 providers", |p| p.len() == 3).await;

    let load = Load::start(&client, 8);
    load.run_for_calls(500).await;
    let (stopping, addr) = &mut providers[0];
    stopping.signal(Signal::TERM);
    let status = tokio::task::block_in_place(|| stopping.wait_exit(LIMIT));
    assert!(status.success(), "provider exited with {status}");
    wait_for(&client, "the stopped provider is gone", |p| !p.contains(addr)).await;
    load.run_for_calls(500).await;
    let (calls, failed) = load.finish().await;
    assert_eq!(failed, 0, "{failed} of {calls} calls failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_after_the_last_push_went_out_waits_for_no_window() {
    // A coalescing window long enough that waiting for it would show.
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0", "--coalesce-ms", "5000"]);
    let client = consumer(registry, 0);
    let (_a, a_addr) = Node::provider(registry, "a");
    wait_for(&client, "provider a", |p| p == [a_addr]).await;
    // Well within the window of a's flush, but a's push is out: b's
    // registration is flushed at once.
    let (_b, b_addr) = Node::provider(registry, "b");
    let took = wait_for(&client, "provider b", |p| p.contains(&b_addr)).await;
    assert!(took < Duration::from_millis(2500), "held {took:?} by the window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_consumer_receives_a_delta_not_a_snapshot() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let proxy = Proxy::start(registry).await;
    let (_a, a_addr) = Node::provider(registry, "a");
    let client = consumer(proxy.addr, 2);
    wait_for(&client, "provider a", |p| p == [a_addr]).await;
    let snapshots = metric(
        &http_get(admin, "/metrics").await.unwrap(),
        "configserver_pushed_snapshots_total",
    );
    let sessions_closed = metric(
        &http_get(admin, "/metrics").await.unwrap(),
        "configserver_sessions_closed_total",
    );

    proxy.cut();
    // The ConfigServer sees the consumer's session end.
    let start = Instant::now();
    while metric(
        &http_get(admin, "/metrics").await.unwrap(),
        "configserver_sessions_closed_total",
    ) == sessions_closed
    {
        assert!(start.elapsed() < LIMIT, "session not closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_b, b_addr) = Node::provider(registry, "b");
    proxy.restore();
    wait_for(&client, "provider b, after reconnecting", |p| {
        p.contains(&b_addr) && p.contains(&a_addr)
    })
    .await;

    let page = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(
        metric(&page, "configserver_pushed_snapshots_total"),
        snapshots,
        "no new snapshot:\n{page}"
    );
}

// === bad input ===

/// A node's control stream spoken by hand, over either transport.
struct RawSession {
    tx: mpsc::Sender<NodeMessage>,
    rx: Pin<Box<dyn Stream<Item = Result<ServerMessage, String>> + Send>>,
    _writer: Option<AbortOnDropHandle<()>>,
}

impl RawSession {
    async fn open(addr: SocketAddr, transport: Transport) -> RawSession {
        let (tx, mut out) = mpsc::channel::<NodeMessage>(16);
        match transport {
            Transport::Grpc => {
                let mut client = RegistryClient::connect(format!("http://{addr}")).await.unwrap();
                let rx = client
                    .session(tokio_stream::wrappers::ReceiverStream::new(out))
                    .await
                    .unwrap()
                    .into_inner()
                    .map(|m| m.map_err(|status| status.to_string()));
                RawSession {
                    tx,
                    rx: Box::pin(rx),
                    _writer: None,
                }
            }
            _ => {
                let (read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
                let writer = tokio::spawn(async move {
                    let _ = write.write_all(&framing::PREFACE).await;
                    while let Some(message) = out.recv().await {
                        let mut frame = BytesMut::new();
                        framing::put_frame(&mut frame, &message);
                        if write.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                });
                RawSession {
                    tx,
                    rx: Box::pin(native_inbound(read)),
                    _writer: Some(AbortOnDropHandle::new(writer)),
                }
            }
        }
    }

    async fn send(&self, request_id: u64, body: node_message::Body) {
        self.tx
            .send(NodeMessage {
                request_id,
                body: Some(body),
            })
            .await
            .unwrap();
    }

    /// The next answer that is not a push.
    async fn answer(&mut self) -> Option<server_message::Body> {
        loop {
            let message = tokio::time::timeout(LIMIT, self.rx.next())
                .await
                .expect("an answer in time");
            match message?.ok()? {
                ServerMessage {
                    body:
                        Some(
                            server_message::Body::Snapshot(_)
                            | server_message::Body::Delta(_)
                            | server_message::Body::Rules(_),
                        ),
                    ..
                } => continue,
                message => return message.body,
            }
        }
    }

    async fn hello(addr: SocketAddr, transport: Transport, app: &str) -> RawSession {
        let mut session = RawSession::open(addr, transport).await;
        session
            .send(
                0,
                node_message::Body::Hello(pb::Hello {
                    app: app.into(),
                    ..Default::default()
                }),
            )
            .await;
        assert!(matches!(session.answer().await, Some(server_message::Body::Welcome(_))));
        session
    }
}

/// Server messages of a natively framed stream.
fn native_inbound(read: impl AsyncRead + Send + 'static) -> impl Stream<Item = Result<ServerMessage, String>> + Send {
    framing::read_messages(
        read,
        framing::MAX_SERVER_FRAME,
        8 * 1024,
        "ServerMessage",
        framing::decode_server_message,
    )
}

fn greeter_key() -> pb::ServiceKey {
    pb::ServiceKey {
        interface: "demo.Greeter".into(),
        version: "1.0.0".into(),
        group: String::new(),
    }
}

fn register(instance: pb::Instance, key: pb::ServiceKey) -> node_message::Body {
    node_message::Body::Register(pb::Register {
        service: Some(key),
        instance: Some(instance),
    })
}

fn expect_error(answer: Option<server_message::Body>, kind: &str, text: &str) {
    match answer {
        Some(server_message::Body::Error(e)) => {
            assert_eq!(e.kind, kind, "{}", e.message);
            assert!(e.message.contains(text), "{:?} does not mention {text:?}", e.message);
        }
        other => panic!("expected a {kind} error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_control_messages_get_clear_errors_and_the_server_keeps_serving() {
    bad_control_messages(Transport::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_control_messages_over_grpc_get_clear_errors_and_the_server_keeps_serving() {
    bad_control_messages(Transport::Grpc).await;
}

async fn bad_control_messages(transport: Transport) {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let instance = pb::Instance {
        host: "127.0.0.1".into(),
        port: 4000,
        weight: 100,
        ..Default::default()
    };

    // A Hello with a field past its bound (a 1 MB zone would otherwise be
    // copied into every subscription of the session).
    for (field, hello) in [
        (
            "zone",
            pb::Hello {
                app: "app-z".into(),
                zone: "z".repeat(1_000_000),
                ..Default::default()
            },
        ),
        (
            "app",
            pb::Hello {
                app: "a".repeat(300),
                ..Default::default()
            },
        ),
        (
            "labels",
            pb::Hello {
                app: "app-l".into(),
                labels: (0..100).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..Default::default()
            },
        ),
    ] {
        let mut big = RawSession::open(registry, transport).await;
        big.send(1, node_message::Body::Hello(hello)).await;
        expect_error(big.answer().await, "invalid", field);
        assert!(big.answer().await.is_none(), "the session with a bad Hello stays open");
    }

    // Register before Hello.
    let mut early = RawSession::open(registry, transport).await;
    early.send(1, register(instance.clone(), greeter_key())).await;
    expect_error(early.answer().await, "protocol", "first message must be Hello");

    let mut a = RawSession::hello(registry, transport, "app-a").await;
    let bad_key = pb::ServiceKey {
        interface: "demo Greeter".into(),
        ..greeter_key()
    };
    a.send(2, register(instance.clone(), bad_key)).await;
    expect_error(a.answer().await, "invalid", r#"interface "demo Greeter" contains ' '"#);
    a.send(
        3,
        node_message::Body::Register(pb::Register {
            service: Some(greeter_key()),
            instance: None,
        }),
    )
    .await;
    expect_error(a.answer().await, "invalid", "needs a service and an instance");
    let mut huge = instance.clone();
    huge.metadata.insert("blob".into(), "x".repeat(100_000));
    a.send(4, register(huge, greeter_key())).await;
    expect_error(a.answer().await, "too_large", "more than 16384");
    a.send(
        5,
        node_message::Body::Unregister(pb::Unregister {
            service: Some(pb::ServiceKey {
                interface: "demo.Nothing".into(),
                ..Default::default()
            }),
            host: "127.0.0.1".into(),
            port: 1,
        }),
    )
    .await;
    expect_error(a.answer().await, "not_found", "demo.Nothing");
    a.send(6, node_message::Body::Hello(pb::Hello::default())).await;
    expect_error(a.answer().await, "invalid", "Hello sent twice");
    a.send(7, register(instance.clone(), greeter_key())).await;
    assert!(matches!(a.answer().await, Some(server_message::Body::Ack(_))));

    // The same instance from another node.
    let mut b = RawSession::hello(registry, transport, "app-b").await;
    b.send(8, register(instance.clone(), greeter_key())).await;
    expect_error(
        b.answer().await,
        "duplicate",
        "127.0.0.1:4000 is already registered by session",
    );

    // A message over the size limit ends that stream only.
    let mut c = RawSession::hello(registry, transport, "app-c").await;
    let mut oversized = instance.clone();
    oversized.metadata.insert("blob".into(), "x".repeat(2 * 1024 * 1024));
    c.send(9, register(oversized, greeter_key())).await;
    // Told why (natively: from its length prefix, before the body is read).
    expect_error(c.answer().await, "protocol", "1048576");
    assert!(c.answer().await.is_none(), "the oversized stream ends");

    // Still serving: a consumer sees the one valid registration.
    let client = consumer(registry, 0);
    let expected: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    wait_for(&client, "the valid registration", |p| p == [expected]).await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_native_frames_close_only_their_connection() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let mut healthy = RawSession::hello(registry, Transport::Native, "healthy").await;

    // Not a body a NodeMessage decodes from: told why, then closed.
    let mut garbage = TcpStream::connect(registry).await.unwrap();
    garbage.write_all(&framing::PREFACE).await.unwrap();
    garbage.write_all(&[0, 0, 0, 3, 0xFF, 0xFF, 0xFF]).await.unwrap();
    let (read, _write) = garbage.into_split();
    let mut answers = Box::pin(native_inbound(read));
    match tokio::time::timeout(LIMIT, answers.next()).await.unwrap() {
        Some(Ok(ServerMessage {
            body: Some(server_message::Body::Error(e)),
            ..
        })) => {
            assert_eq!(e.kind, "protocol");
            assert!(e.message.contains("malformed NodeMessage"), "{}", e.message);
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert!(tokio::time::timeout(LIMIT, answers.next()).await.unwrap().is_none());

    // A preface of an unknown version: closed without an answer.
    let mut future = TcpStream::connect(registry).await.unwrap();
    future.write_all(&[framing::PREFACE[0], b'T', b'C', 99]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(LIMIT, future.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(read.is_err() || rest.is_empty(), "nothing is answered: {rest:?}");

    // A frame cut off by the close.
    let mut cut = TcpStream::connect(registry).await.unwrap();
    cut.write_all(&framing::PREFACE).await.unwrap();
    cut.write_all(&[0, 0, 1, 0, 1, 2, 3]).await.unwrap();
    drop(cut);

    // The healthy session and new ones are served throughout.
    healthy
        .send(1, node_message::Body::Heartbeat(pb::Heartbeat { seq: 1 }))
        .await;
    let echo = tokio::time::timeout(LIMIT, healthy.rx.next()).await.unwrap();
    assert!(
        matches!(
            &echo,
            Some(Ok(ServerMessage {
                body: Some(server_message::Body::Heartbeat(_)),
                ..
            }))
        ),
        "{echo:?}"
    );
    let instance = pb::Instance {
        host: "127.0.0.1".into(),
        port: 4001,
        weight: 100,
        ..Default::default()
    };
    healthy.send(2, register(instance, greeter_key())).await;
    assert!(matches!(healthy.answer().await, Some(server_message::Body::Ack(_))));
    let client = consumer(registry, 0);
    let expected: SocketAddr = "127.0.0.1:4001".parse().unwrap();
    wait_for(&client, "the healthy registration", |p| p == [expected]).await;
    assert!(http_get(admin, "/healthz").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_node_and_a_native_node_share_one_registry_port() {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let (_a, a_addr) = Node::provider(registry, "a");
    // The consumer side over gRPC sees the natively registered provider.
    let mut session = SessionConfig::new([registry.to_string()], "grpc-consumer", Role::Consumer);
    session.transport = Transport::Grpc;
    let client = Consumer::new(ConsumerConfig {
        registry: Some(session),
        ..ConsumerConfig::default()
    })
    .reference::<GreeterClient<_>>()
    .version("1.0.0")
    .timeout(Duration::from_secs(2))
    .build()
    .unwrap();
    wait_for(&client, "provider a, over gRPC", |p| p == [a_addr]).await;
    let reply = client.say_hello(HelloRequest { name: "grpc".into() }).await.unwrap();
    assert!(reply.message.contains("grpc"), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_restarted_while_the_configserver_is_down_finds_providers_in_its_cache() {
    let cache = std::env::temp_dir().join(format!("tern-provider-cache-{}.bin", std::process::id()));
    let _ = std::fs::remove_file(&cache);
    let consumer_with_cache = |registry: SocketAddr| {
        let mut session = SessionConfig::new([registry.to_string()], "cached-consumer", Role::Consumer);
        session.cache_file = Some(cache.clone());
        let consumer = Consumer::new(ConsumerConfig {
            registry: Some(session),
            ..ConsumerConfig::default()
        });
        consumer
            .reference::<GreeterClient<_>>()
            .version("1.0.0")
            .retries(0)
            .build()
            .unwrap()
    };

    let (mut cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let (_provider, provider_addr) = Node::provider(registry, "a");
    let first = consumer_with_cache(registry);
    wait_for(&first, "the provider", |p| p == [provider_addr]).await;
    // The cache is written as the list arrives.
    let start = Instant::now();
    while !cache.exists() {
        assert!(start.elapsed() < LIMIT, "no cache file written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(first);
    cs.kill_hard();

    // A new consumer, with no ConfigServer to ask.
    let second = consumer_with_cache(registry);
    assert_eq!(
        second.invoker().providers(),
        vec![provider_addr],
        "providers come from the cache, at once"
    );
    let reply = second.say_hello(HelloRequest { name: "cache".into() }).await.unwrap();
    assert_eq!(reply.served_by, "a");
    let _ = std::fs::remove_file(&cache);
}

struct Hello;

impl tern_e2e::demo::Greeter for Hello {
    async fn say_hello(
        &self,
        _: rpc_core::Request<HelloRequest>,
    ) -> Result<tern_e2e::demo::HelloReply, rpc_core::Status> {
        Ok(tern_e2e::demo::HelloReply::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_start_fails_when_the_configserver_refuses_its_registration() {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let err = provider_sdk::Provider::builder()
        .bind("127.0.0.1:0")
        .weight(20_000)
        .registry(SessionConfig::new([registry.to_string()], "heavy", Role::Provider))
        .service_with(tern_e2e::demo::GreeterServer::new(Hello), "1.0.0", "")
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has weight 20000, more than 10000"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_configserver_is_left_for_the_next_one() {
    let timing = FAST_HEARTBEAT;
    let (first, first_addr, _) = Node::configserver("127.0.0.1:0", &timing);
    let (_second, second_addr, _) = Node::configserver("127.0.0.1:0", &timing);
    let servers = format!("{first_addr},{second_addr}");
    let provider = Node::spawn(&["provider", "--registry", &servers, "--name", "a"]);
    let provider_addr: SocketAddr = provider.first_line[1].parse().unwrap();
    let on_first = consumer(first_addr, 0);
    wait_for(&on_first, "the provider on the first server", |p| p == [provider_addr]).await;

    // The first server stops answering but keeps its connections open.
    first.signal(Signal::STOP);
    let on_second = consumer(second_addr, 0);
    let took = wait_for(&on_second, "the provider on the second server", |p| {
        p == [provider_addr]
    })
    .await;
    assert!(
        took < Duration::from_secs(6),
        "moved after {took:?} (silence timeout 1.5 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configserver_lists_consumers_and_forgets_a_dropped_reference() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let (_provider, provider_addr) = Node::provider(registry, "a");
    let consumer = Consumer::new(ConsumerConfig {
        app: "lister".into(),
        registry: Some(SessionConfig::new([registry.to_string()], "lister", Role::Consumer)),
        ..ConsumerConfig::default()
    });
    let client = consumer
        .reference::<GreeterClient<_>>()
        .version("1.0.0")
        .build()
        .unwrap();
    wait_for(&client, "the provider", |p| p == [provider_addr]).await;
    let detail = http_get(admin, "/api/services/demo.Greeter:1.0.0").await.unwrap();
    assert!(detail.contains(r#""app":"lister""#), "{detail}");

    drop(client);
    let start = Instant::now();
    loop {
        let detail = http_get(admin, "/api/services/demo.Greeter:1.0.0").await.unwrap();
        if !detail.contains("lister") {
            break;
        }
        assert!(start.elapsed() < LIMIT, "consumer still listed: {detail}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(consumer);
}

/// An established session polls no stop token on its wake-ups: `shutdown`
/// wakes it through its command queue. The ConfigServer must see the
/// stream end at once (not at a heartbeat timeout) and drop the
/// provider, and requests after it are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_an_established_session_at_once() {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let key = rpc_core::ServiceKey::new("demo.Stopped", "1.0.0", "");
    let provider = RegistrySession::start(SessionConfig::new([registry.to_string()], "p", Role::Provider));
    let consumer = RegistrySession::start(SessionConfig::new([registry.to_string()], "c", Role::Consumer));
    let mut list = consumer.subscribe(&key);
    let instance = pb::Instance {
        host: "127.0.0.1".into(),
        port: 4301,
        weight: 100,
        ..Default::default()
    };
    provider.register(&key, instance.clone()).await.unwrap();
    tokio::time::timeout(LIMIT, list.wait_for(|l| l.providers.contains_key("127.0.0.1:4301")))
        .await
        .expect("the provider pushed within the limit")
        .expect("the list is kept");

    let stopped_at = Instant::now();
    provider.shutdown();
    tokio::time::timeout(LIMIT, list.wait_for(|l| l.providers.is_empty()))
        .await
        .expect("the provider removed within the limit")
        .expect("the list is kept");
    let took = stopped_at.elapsed();
    // The heartbeat timeout is 3 s: a removal well before it came from the
    // stream's end.
    assert!(took < Duration::from_secs(2), "removed {took:?} after shutdown");
    assert_eq!(
        provider.register(&key, instance).await,
        Err(rpc_core::registry::RegistryError::Stopped)
    );
}

/// The registry port holds `--max-connections` at once: one more is closed
/// as soon as it is accepted, and counted; a node turned away gets in once
/// a place is free; a gRPC connection gives its place back when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_limit_is_closed_at_once_and_a_node_gets_in_when_a_place_frees() {
    let (_cs, registry, admin) =
        Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0", "--max-connections", "2"]);
    let session = |name: &str| RegistrySession::start(SessionConfig::new([registry.to_string()], name, Role::Consumer));
    // A gRPC node's connection, held by the gRPC server, counts as well.
    let grpc_session = |name: &str| {
        let mut config = SessionConfig::new([registry.to_string()], name, Role::Consumer);
        config.transport = Transport::Grpc;
        RegistrySession::start(config)
    };
    let connected = |s: &RegistrySession| {
        let mut connected = s.connected();
        async move {
            tokio::time::timeout(LIMIT, connected.wait_for(Option::is_some))
                .await
                .expect("connected within the limit")
                .expect("the session runs");
        }
    };
    let read_metric = |name: &'static str| async move { metric(&http_get(admin, "/metrics").await.unwrap(), name) };
    // Polls the server's metric until `ok` (its counters are what tells
    // that a connection was turned away or given back).
    let metric_until = |name: &'static str, ok: fn(u64) -> bool| async move {
        let deadline = Instant::now() + LIMIT;
        loop {
            let value = read_metric(name).await;
            if ok(value) {
                return value;
            }
            assert!(Instant::now() < deadline, "{name} still {value} after {LIMIT:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (first, second) = (session("c1"), grpc_session("c2"));
    connected(&first).await;
    connected(&second).await;
    assert_eq!(read_metric("configserver_connections").await, 2);

    // A third: closed at once, not after the heartbeat timeout (3 s) that
    // ends a connection which sends nothing.
    let mut third = TcpStream::connect(registry).await.unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(LIMIT, third.read(&mut byte))
        .await
        .expect("closed within the limit");
    assert!(matches!(read, Ok(0) | Err(_)), "the third connection got {read:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "closed {took:?} after connecting");
    assert_eq!(read_metric("configserver_connections_refused_total").await, 1);

    // A node trying while the server is full is turned away, and keeps
    // trying: it gets in once a place frees.
    let fourth = session("c4");
    metric_until("configserver_connections_refused_total", |n| n >= 2).await;
    assert!(fourth.connected().borrow().is_none(), "connected past the limit");
    first.shutdown();
    connected(&fourth).await;

    // The gRPC connection's place comes back when its session ends.
    second.shutdown();
    metric_until("configserver_connections", |n| n == 1).await;
}

/// A connection handed to the gRPC server that then goes quiet (here, one
/// byte of an HTTP/2 preface that never finishes) is closed once the
/// heartbeat timeout passes, and its place under the connection limit
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_connection_that_goes_quiet_is_closed_after_the_heartbeat_timeout() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &FAST_HEARTBEAT);
    let timeout = Duration::from_millis(1500);
    let mut quiet = TcpStream::connect(registry).await.unwrap();
    // Not the native preface: the server hands the connection to gRPC.
    quiet.write_all(b"P").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(LIMIT, quiet.read(&mut buf))
            .await
            .expect("closed within the limit")
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {} // what the server sent first (its settings)
        }
    }
    let took = started.elapsed();
    assert!(
        took >= timeout - Duration::from_millis(100),
        "closed after {took:?}, before the timeout"
    );
    // The place is given back as the connection is dropped, just after
    // its socket closes.
    let deadline = Instant::now() + LIMIT;
    while metric(&http_get(admin, "/metrics").await.unwrap(), "configserver_connections") != 0 {
        assert!(
            Instant::now() < deadline,
            "the connection's place not given back within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_claiming_a_live_providers_address_cannot_take_it_away() {
    let (_cs, registry, admin) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let (_provider, addr) = Node::provider_with(registry, "live", &["--app", "greeter"]);
    let client = consumer(registry, 0);
    wait_for(&client, "the live provider", |p| p == [addr]).await;

    // An impostor says it is the same node (app and host), registers the
    // live provider's address, and goes away.
    let mut impostor = RawSession::open(registry, Transport::Native).await;
    let hello = pb::Hello {
        app: "greeter".into(),
        host: "127.0.0.1".into(),
        ..Default::default()
    };
    impostor.send(0, node_message::Body::Hello(hello)).await;
    assert!(matches!(
        impostor.answer().await,
        Some(server_message::Body::Welcome(_))
    ));
    let instance = pb::Instance {
        host: addr.ip().to_string().into(),
        port: u32::from(addr.port()),
        weight: 100,
        ..Default::default()
    };
    impostor.send(1, register(instance, greeter_key())).await;
    assert!(matches!(impostor.answer().await, Some(server_message::Body::Ack(_))));
    let closed_before = metric(
        &http_get(admin, "/metrics").await.unwrap(),
        "configserver_sessions_closed_total",
    );
    drop(impostor);
    let start = Instant::now();
    while metric(
        &http_get(admin, "/metrics").await.unwrap(),
        "configserver_sessions_closed_total",
    ) == closed_before
    {
        assert!(start.elapsed() < LIMIT, "the impostor's session never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The live provider's own session holds it again: still listed.
    let listed = http_get(admin, "/api/services/demo.Greeter:1.0.0").await.unwrap();
    assert!(
        listed.contains(&addr.to_string()),
        "the live provider was taken away: {listed}"
    );
    client
        .say_hello(HelloRequest {
            name: "still here".into(),
        })
        .await
        .unwrap();
    assert_eq!(client.invoker().providers(), [addr]);
}
