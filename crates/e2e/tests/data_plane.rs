//! End-to-end tests of the data plane on real sockets: multiplexing,
//! deadlines, connection loss, dispatch bounds, graceful shutdown and bad
//! input.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::Node;
use consumer_sdk::{Consumer, ConsumerConfig, Reference};
use provider_sdk::Provider;
use rpc_core::codec::{FrameCodec, FrameReader};
use rpc_core::frame::{self, RequestHead};
use rpc_core::{Code, Connection, ConnectionConfig, Dispatch, Error, Request, ServerConfig, ServiceKey, Status};
use tern_e2e::demo::{Echo, EchoClient, EchoReply, EchoRequest, EchoServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

/// Bound on any single wait in these tests.
const LIMIT: Duration = Duration::from_secs(20);

/// Echoes; records the peers it saw; optionally holds every call at a gate
/// until the test releases it, announcing each call as it starts.
#[derive(Clone, Default)]
struct TestEcho {
    peers: Arc<Mutex<HashSet<SocketAddr>>>,
    gate: Option<Arc<Semaphore>>,
    started: Option<mpsc::Sender<u64>>,
}

impl TestEcho {
    fn gated() -> (TestEcho, Arc<Semaphore>, mpsc::Receiver<u64>) {
        let gate = Arc::new(Semaphore::new(0));
        let (tx, rx) = mpsc::channel(1024);
        let echo = TestEcho {
            gate: Some(gate.clone()),
            started: Some(tx),
            ..TestEcho::default()
        };
        (echo, gate, rx)
    }
}

impl Echo for TestEcho {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<EchoReply, Status> {
        if let Some(peer) = request.peer() {
            self.peers.lock().unwrap().insert(peer);
        }
        let request = request.into_inner();
        if let Some(started) = &self.started {
            let _ = started.send(request.id).await;
        }
        if let Some(gate) = &self.gate {
            let _permit = gate.acquire().await.map_err(|_| Status::internal("gate closed"))?;
        }
        if request.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(request.delay_ms.into())).await;
        }
        Ok(EchoReply {
            id: request.id,
            payload: request.payload,
        })
    }
}

async fn start_provider(echo: TestEcho, dispatch: Dispatch) -> Provider {
    Provider::builder()
        .app("test-provider")
        .bind("127.0.0.1:0")
        .dispatch(dispatch)
        .service(EchoServer::new(echo))
        .start()
        .await
        .expect("provider starts")
}

fn client(addr: SocketAddr, timeout: Duration, retries: usize) -> EchoClient<Reference> {
    Consumer::new(ConsumerConfig::default())
        .reference::<EchoClient<_>>()
        .timeout(timeout)
        .retries(retries)
        .direct([addr])
        .build()
        .expect("valid reference")
}

fn request(id: u64) -> EchoRequest {
    EchoRequest {
        id,
        payload: Bytes::from(format!("payload-{id}")),
        delay_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_calls_over_one_connection_all_answered_correctly() {
    let echo = TestEcho::default();
    let provider = start_provider(echo.clone(), Dispatch::default()).await;
    let client = client(provider.local_addr(), LIMIT, 0);

    let mut calls = JoinSet::new();
    for id in 0..10_000u64 {
        let client = client.clone();
        calls.spawn(async move { (id, client.echo(request(id)).await) });
    }
    let mut answered = 0;
    while let Some(joined) = calls.join_next().await {
        let (id, reply) = joined.unwrap();
        let reply = reply.unwrap_or_else(|e| panic!("call {id} failed: {e}"));
        assert_eq!(reply.id, id);
        assert_eq!(reply.payload, Bytes::from(format!("payload-{id}")));
        answered += 1;
    }
    assert_eq!(answered, 10_000);
    assert_eq!(echo.peers.lock().unwrap().len(), 1, "all calls shared one connection");
    assert_eq!(client.invoker().in_flight(), 0);
    provider.shutdown().await;
}

/// A provider that answers the first request only when told to, after the
/// caller gave up, and every later request at once.
async fn late_answering_provider() -> (SocketAddr, mpsc::Sender<()>, mpsc::Receiver<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release_tx, mut release_rx) = mpsc::channel::<()>(1);
    let (seen_tx, seen_rx) = mpsc::channel::<u64>(16);
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = stream.into_split();
        let mut frames = FrameReader::new(rd, FrameCodec::default());
        let mut first = true;
        while let Some(Ok(frame)) = frames.next().await {
            let id = frame.header.request_id;
            seen_tx.send(id).await.unwrap();
            if first {
                first = false;
                release_rx.recv().await.unwrap();
            }
            let mut answer = BytesMut::new();
            frame::encode_response(&mut answer, id, Code::Ok, "", b"");
            wr.write_all(&answer).await.unwrap();
        }
    });
    (addr, release_tx, seen_rx)
}

#[tokio::test]
async fn call_past_deadline_times_out_and_late_answer_is_dropped_without_leaking_a_slot() {
    let (addr, release, mut seen) = late_answering_provider().await;
    let conn = Connection::connect(addr, &ConnectionConfig::default()).await.unwrap();
    let key = ServiceKey::new("demo.Echo", "", "");
    let attachments = Default::default();
    let head = RequestHead {
        service: &key,
        method: "Echo",
        timeout_ms: 0,
        attachments: &attachments,
        extra: &[],
    };

    let started = Instant::now();
    let err = conn.call(head, b"slow", Duration::from_millis(100)).await.unwrap_err();
    assert!(
        matches!(err, Error::Timeout(d) if d == Duration::from_millis(100)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(conn.in_flight(), 0, "the timed-out call freed its slot");
    let late_id = seen.recv().await.unwrap();

    // Now the provider answers the abandoned call, then the next one. The
    // late answer arrives first on the stream and must be dropped.
    release.send(()).await.unwrap();
    let reply = conn.call(head, b"next", LIMIT).await.unwrap();
    assert_eq!(reply, Bytes::new());
    let next_id = seen.recv().await.unwrap();
    assert_ne!(late_id, next_id);
    assert_eq!(conn.in_flight(), 0);
    assert!(!conn.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_call_future_frees_its_slot() {
    let (echo, gate, mut started) = TestEcho::gated();
    let provider = start_provider(echo, Dispatch::default()).await;
    let client = client(provider.local_addr(), LIMIT, 0);
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.echo(request(1)).await }
    });
    started.recv().await.unwrap();
    assert_eq!(client.invoker().in_flight(), 1);
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(client.invoker().in_flight(), 0);
    gate.add_permits(1);
    provider.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_provider_fails_pending_calls_at_once_with_a_retryable_error() {
    let mut provider = Node::spawn(&["provider", "--version", ""]);
    let addr = provider.first_line[1].parse().unwrap();
    let client = client(addr, Duration::from_secs(30), 0);
    client.echo(request(0)).await.expect("warm-up call");

    let mut calls = JoinSet::new();
    for id in 1..=100u64 {
        let client = client.clone();
        calls.spawn(async move {
            let slow = EchoRequest {
                delay_ms: 25_000,
                ..request(id)
            };
            client.echo(slow).await
        });
    }
    // Every call has reached the provider and is waiting there.
    let mut provider = tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            let line = provider.next_line();
            assert!(line.starts_with("begin "), "{line}");
        }
        provider
    })
    .await
    .unwrap();
    assert_eq!(client.invoker().in_flight(), 100);

    provider.kill_hard();
    let killed = Instant::now();
    let mut failed = 0;
    while let Some(joined) = calls.join_next().await {
        let err = joined.unwrap().expect_err("the provider died");
        assert!(matches!(err, Error::ConnectionClosed { .. }), "{err}");
        assert!(err.is_retryable(), "{err}");
        failed += 1;
    }
    let elapsed = killed.elapsed();
    assert_eq!(failed, 100);
    assert!(
        elapsed < Duration::from_secs(2),
        "pending calls failed after {elapsed:?}"
    );
    assert_eq!(client.invoker().in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_execution_pool_answers_busy() {
    let (echo, gate, mut started) = TestEcho::gated();
    let provider = start_provider(echo, Dispatch::Execution { threads: 1, queue: 1 }).await;
    let client = client(provider.local_addr(), LIMIT, 0);

    let first = tokio::spawn({
        let client = client.clone();
        async move { client.echo(request(1)).await }
    });
    assert_eq!(started.recv().await, Some(1), "call 1 runs");
    // Call 2 is queued for writing before call 3 on the one connection
    // (`biased` polls in order): 2 waits in the pool's queue, 3 finds the
    // pool and its queue full and is answered at once, while 1 still runs.
    let (second, third) = tokio::join!(biased; client.echo(request(2)), async {
        let third = client.echo(request(3)).await;
        gate.add_permits(2);
        third
    });
    let err = third.unwrap_err();
    assert!(matches!(err, Error::Busy(_)), "{err}");
    assert!(err.is_retryable());
    assert_eq!(first.await.unwrap().unwrap().id, 1);
    assert_eq!(second.unwrap().id, 2);
    provider.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_calls() {
    let (echo, gate, mut started) = TestEcho::gated();
    let provider = start_provider(echo, Dispatch::default()).await;
    let addr = provider.local_addr();
    let client = client(addr, LIMIT, 0);

    let mut calls = JoinSet::new();
    for id in 0..5u64 {
        let client = client.clone();
        calls.spawn(async move { client.echo(request(id)).await });
    }
    for _ in 0..5 {
        started.recv().await.unwrap();
    }
    let shutdown = tokio::spawn(provider.shutdown());

    // Wait until the listener is closed: new connections are refused.
    let deadline = Instant::now() + LIMIT;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!shutdown.is_finished(), "shutdown waits for in-flight calls");

    gate.add_permits(5);
    let mut ok = 0;
    while let Some(joined) = calls.join_next().await {
        joined.unwrap().expect("in-flight call finishes");
        ok += 1;
    }
    assert_eq!(ok, 5);
    tokio::time::timeout(LIMIT, shutdown)
        .await
        .expect("shutdown completes")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_past_grace_period_is_abandoned() {
    let (echo, _gate, mut started) = TestEcho::gated();
    let config = ServerConfig {
        grace_period: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let provider = Provider::builder()
        .bind("127.0.0.1:0")
        .server_config(config)
        .service(EchoServer::new(echo))
        .start()
        .await
        .unwrap();
    let client = client(provider.local_addr(), LIMIT, 0);
    let call = tokio::spawn(async move { client.echo(request(1)).await });
    started.recv().await.unwrap();
    let begun = Instant::now();
    provider.shutdown().await;
    assert!(begun.elapsed() < Duration::from_secs(5));
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Internal(_) | Error::ConnectionClosed { .. }),
        "{err}"
    );
}

// === bad input ===

/// Collects log output so a test can check the reason a connection closed.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Writes `bytes` on a fresh connection (then half-closes if `eof`) and
/// waits for the provider to close it.
async fn send_and_expect_close(addr: SocketAddr, bytes: &[u8], eof: bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if eof {
        stream.shutdown().await.unwrap();
    }
    let mut sink = Vec::new();
    // EOF (Ok) or reset (Err) both mean closed; a timeout means it was not.
    let read = tokio::time::timeout(LIMIT, stream.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "provider kept the connection open");
    assert!(sink.is_empty(), "provider answered garbage with {} bytes", sink.len());
}

#[tokio::test]
async fn bad_input_closes_only_that_connection_with_a_logged_reason() {
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let provider = start_provider(TestEcho::default(), Dispatch::default()).await;
    let addr = provider.local_addr();
    let client = client(addr, LIMIT, 0);
    client.echo(request(0)).await.unwrap();

    // Random bytes (seeded; the first two are not the magic).
    let mut random = Vec::with_capacity(4096);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        random.push(x as u8);
    }
    assert_ne!(random[..2], frame::MAGIC);
    send_and_expect_close(addr, &random, false).await;
    client.echo(request(1)).await.expect("other clients are still served");

    send_and_expect_close(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
    client.echo(request(2)).await.unwrap();

    // A header claiming a 100-byte body, then 10 bytes and EOF.
    let mut truncated = BytesMut::new();
    frame::Header {
        kind: frame::Kind::Request,
        status: 0,
        flags: 0,
        request_id: 1,
        body_len: 100,
    }
    .encode(&mut truncated);
    truncated.put_slice(&[0u8; 10]);
    send_and_expect_close(addr, &truncated, true).await;
    client.echo(request(3)).await.unwrap();

    // A header claiming a 4 GiB body.
    let mut huge = BytesMut::new();
    frame::Header {
        kind: frame::Kind::Request,
        status: 0,
        flags: 0,
        request_id: 1,
        body_len: u32::MAX,
    }
    .encode(&mut huge);
    send_and_expect_close(addr, &huge, false).await;
    client.echo(request(4)).await.unwrap();

    let logs = logs.contents();
    for reason in [
        "bad magic 0x",
        "bad magic 0x4745",
        "connection closed in the middle of a frame (28 bytes buffered)",
        "frame length 4294967295 exceeds max_frame_len 8388608",
    ] {
        assert!(logs.contains(reason), "no log line with {reason:?} in:\n{logs}");
    }
    assert_eq!(logs.matches("closing connection: bad frame").count(), 4, "{logs}");
    provider.shutdown().await;
}

#[tokio::test]
async fn unknown_service_and_method_get_their_status() {
    let provider = start_provider(TestEcho::default(), Dispatch::Direct).await;
    let conn = Connection::connect(provider.local_addr(), &ConnectionConfig::default())
        .await
        .unwrap();
    let attachments = Default::default();
    let missing = ServiceKey::new("demo.Missing", "", "");
    let head = RequestHead {
        service: &missing,
        method: "Echo",
        timeout_ms: 0,
        attachments: &attachments,
        extra: &[],
    };
    let err = conn.call(head, b"", LIMIT).await.unwrap_err();
    assert!(
        matches!(err, Error::ServiceNotFound(ref s) if s == "demo.Missing"),
        "{err}"
    );

    let echo = ServiceKey::new("demo.Echo", "", "");
    let head = RequestHead {
        service: &echo,
        method: "Nope",
        ..head
    };
    let err = conn.call(head, b"", LIMIT).await.unwrap_err();
    assert!(
        matches!(err, Error::MethodNotFound(ref s) if s == "demo.Echo/Nope"),
        "{err}"
    );

    // A payload that is not an EchoRequest: BadRequest, connection stays up.
    let head = RequestHead { method: "Echo", ..head };
    let err = conn.call(head, &[0xff, 0xff, 0xff], LIMIT).await.unwrap_err();
    assert!(matches!(err, Error::BadRequest(_)), "{err}");
    assert!(!conn.is_closed());
    provider.shutdown().await;
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_its_answers_cannot_grow_a_provider_without_bound() {
    // A provider process (default dispatch), and a connection that sends
    // 4,000 requests of 64 KiB (250 MiB) and never reads an answer.
    let provider = Node::spawn(&["provider", "--name", "p"]);
    let addr: SocketAddr = provider.first_line[1].parse().unwrap();
    let before = rss_kib(provider.pid());
    let key = ServiceKey::new("demo.Echo", "1.0.0", "");
    let attachments = std::collections::HashMap::new();
    let head = RequestHead {
        service: &key,
        method: "Echo",
        timeout_ms: 0,
        attachments: &attachments,
        extra: &[],
    };
    let payload = prost::Message::encode_to_vec(&EchoRequest {
        id: 1,
        payload: Bytes::from(vec![7u8; 64 * 1024]),
        delay_ms: 0,
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let (_unread, mut write) = stream.into_split();
    let mut sent = 0u64;
    let started = Instant::now();
    for id in 1..=4_000u64 {
        let mut frame = BytesMut::new();
        frame::encode_request(&mut frame, id, &head, &payload);
        // Once the provider stops reading, writes stop going through.
        match tokio::time::timeout(Duration::from_millis(500), write.write_all(&frame)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) | Err(_) => break,
        }
        assert!(started.elapsed() < LIMIT, "sending took too long");
    }
    let grown_mib = rss_kib(provider.pid()).saturating_sub(before) / 1024;
    eprintln!("{sent} requests sent before the provider stopped reading; provider RSS grew {grown_mib} MiB");
    assert!(
        sent < 4_000,
        "the provider read all 250 MiB of requests whose answers were never read"
    );
    assert!(
        grown_mib < 96,
        "the provider grew {grown_mib} MiB for one connection that does not read"
    );
}
