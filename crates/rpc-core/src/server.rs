//! The provider side: accept connections, decode requests, run service
//! methods, write answers.
//!
//! # Dispatch modes
//!
//! Dubbo names five ways to hand work from the IO thread to a thread pool. On
//! tokio each connection's reader is already a task on a work-stealing pool,
//! so the names map as follows (see [`Dispatch`]):
//!
//! | name         | here                                                                       |
//! |--------------|----------------------------------------------------------------------------|
//! | `direct`     | the method runs on the connection's reader task, one request at a time     |
//! | `all`        | every request is spawned as its own task (at most `max_concurrent`)        |
//! | `message`    | same as `all`: connect/disconnect/heartbeat events never leave the IO task here, so "only messages go to the pool" is what `all` already does |
//! | `execution`  | a bounded pool: `threads` run, `queue` wait, beyond that the answer is `Busy` |
//! | `connection` | one ordered worker per connection with a bounded queue; full -> `Busy`    |
//!
//! # Bounds
//!
//! At most `max_connections` connections (the accept loop waits for a free
//! slot). Per connection about `write_buffer` bytes of answers wait for the
//! writer; while they wait, or while `max_pending_per_connection` of its
//! requests are being handled, the connection is not read (a peer that
//! does not read its answers feels TCP back-pressure instead of growing the
//! provider), and a connection whose answers make no progress for
//! `write_timeout` is closed.
//! `all` waits for a free slot (TCP back-pressure on the sender) when
//! `max_concurrent` requests run; `execution` and `connection` answer `Busy`.
//!
//! # Shutdown
//!
//! [`Server::serve`] stops accepting when its `shutdown` future resolves.
//! Open connections keep being read until their consumer closes them or no
//! request has arrived for `drain_quiet` (consumers that learned of the
//! provider's departure stop sending and close; a request already on the wire
//! is still served). In-flight requests then finish and their answers flush;
//! whatever is left after `grace_period` is abandoned.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tern_proto::rpc::RequestBody;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::codec::{FrameCodec, FrameReader};
use crate::frame::{self, Frame, Kind};
use crate::governance::ATTACH_APP;
use crate::net::{ReadHalf, ServerTls, Stream, WriteHalf};
use crate::outbox::{Closed, Outbox};
use crate::{Code, ServiceKey, Status};

/// The future a type-erased service method returns.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'static>>;

/// A service as the server sees it: an interface name and methods that take
/// and return encoded payloads. Generated `XxxServer` types implement it.
pub trait Service: Send + Sync + 'static {
    /// Fully qualified interface name, e.g. `demo.Greeter`.
    fn interface(&self) -> &'static str;
    /// Method names as declared in the .proto file.
    fn methods(&self) -> &'static [&'static str];
    /// Runs `method`; an unknown name answers [`Code::MethodNotFound`].
    fn call(&self, method: &str, request: Request<Bytes>) -> BoxFuture<Bytes>;
}

/// A check every call passes before its method runs (governance rules:
/// access, tokens, QPS limits). It runs on the connection's task, so it must
/// not block.
pub trait Admission: Send + Sync + 'static {
    /// `Err` refuses the call with that status.
    ///
    /// # Errors
    ///
    /// The refusal, sent to the caller.
    fn admit(
        &self,
        service: &ServiceKey,
        method: &str,
        peer: Option<SocketAddr>,
        attachments: &HashMap<String, String>,
    ) -> Result<(), Status>;
}

/// An incoming call: the message plus what came with it.
#[derive(Debug, Clone)]
pub struct Request<T> {
    message: T,
    attachments: HashMap<String, String>,
    peer: Option<SocketAddr>,
    deadline: Option<Instant>,
}

impl<T> Request<T> {
    /// A request with no attachments, peer or deadline (for tests).
    pub fn new(message: T) -> Request<T> {
        Request {
            message,
            attachments: HashMap::new(),
            peer: None,
            deadline: None,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.message
    }

    pub fn into_inner(self) -> T {
        self.message
    }

    pub fn attachments(&self) -> &HashMap<String, String> {
        &self.attachments
    }

    /// The caller's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// When the caller stops waiting; work past it is wasted.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn try_map<U, E>(self, f: impl FnOnce(T) -> Result<U, E>) -> Result<Request<U>, E> {
        Ok(Request {
            message: f(self.message)?,
            attachments: self.attachments,
            peer: self.peer,
            deadline: self.deadline,
        })
    }
}

/// How requests are handed from a connection's reader to the method; see the
/// module docs for the Dubbo names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Run on the reader task; requests of one connection run one at a time.
    Direct,
    /// Spawn a task per request, at most `max_concurrent` at once server-wide;
    /// at the limit the readers wait.
    All { max_concurrent: usize },
    /// A bounded pool: `threads` requests run at once, `queue` more wait;
    /// beyond that the answer is `Busy`.
    Execution { threads: usize, queue: usize },
    /// One worker per connection running its requests in order; `queue`
    /// requests wait; beyond that the answer is `Busy`.
    Connection { queue: usize },
}

impl Default for Dispatch {
    fn default() -> Dispatch {
        Dispatch::All { max_concurrent: 10_000 }
    }
}

impl FromStr for Dispatch {
    type Err = String;

    /// Parses a Dubbo dispatcher name with default bounds.
    fn from_str(s: &str) -> Result<Dispatch, String> {
        match s {
            "direct" => Ok(Dispatch::Direct),
            "all" | "message" => Ok(Dispatch::default()),
            "execution" => Ok(Dispatch::Execution { threads: 200, queue: 0 }),
            "connection" => Ok(Dispatch::Connection { queue: 1024 }),
            other => Err(format!(
                "unknown dispatch mode {other:?}: expected direct, all, message, execution or connection"
            )),
        }
    }
}

/// Settings of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_connections: usize,
    pub max_frame_len: usize,
    pub dispatch: Dispatch,
    /// Answer bytes buffered per connection before handlers wait for the
    /// writer.
    pub write_buffer: usize,
    /// Requests of one connection being handled or waiting for room to
    /// answer; past it the connection is not read (its peer feels TCP
    /// back-pressure), so a peer that does not read its answers holds at
    /// most this many requests and answers.
    pub max_pending_per_connection: usize,
    /// A connection whose answers make no progress into the socket for
    /// this long is closed.
    pub write_timeout: Duration,
    /// A connection with no frame for this long is closed (clients ping
    /// every few seconds while idle).
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub grace_period: Duration,
    /// During shutdown, a connection with no request for this long stops
    /// being read.
    pub drain_quiet: Duration,
    /// TLS on every connection (`None`: plain TCP). With a client CA
    /// (mTLS) the app a caller's certificate names is its app for access
    /// rules, and a call whose `tern.app` says otherwise is refused.
    pub tls: Option<ServerTls>,
    /// How long a TLS handshake may take before the connection is closed.
    pub tls_handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 10_000,
            max_frame_len: frame::DEFAULT_MAX_FRAME_LEN,
            dispatch: Dispatch::default(),
            write_buffer: 1024 * 1024,
            max_pending_per_connection: 1024,
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            grace_period: Duration::from_secs(10),
            drain_quiet: Duration::from_millis(100),
            tls: None,
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves a set of services on a listener.
pub struct Server {
    config: ServerConfig,
    services: HashMap<ServiceKey, Arc<dyn Service>>,
    admission: Option<Arc<dyn Admission>>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .field("admission", &self.admission.is_some())
            .finish()
    }
}

impl Server {
    pub fn new(config: ServerConfig) -> Server {
        Server {
            config,
            services: HashMap::new(),
            admission: None,
        }
    }

    /// Sets the check every call passes before its method runs.
    pub fn set_admission(&mut self, admission: Arc<dyn Admission>) {
        self.admission = Some(admission);
    }

    /// Adds `service` under its interface name and the given version and
    /// group; returns the key it is served under.
    pub fn add_service(&mut self, version: &str, group: &str, service: impl Service) -> ServiceKey {
        let key = ServiceKey::new(service.interface(), version, group);
        self.services.insert(key.clone(), Arc::new(service));
        key
    }

    /// Replaces the settings (the services stay).
    pub fn set_config(&mut self, config: ServerConfig) {
        self.config = config;
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// Accepts and serves connections until `shutdown` resolves, then shuts
    /// down gracefully (see the module docs).
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let config = self.config;
        let ctx = Arc::new(Ctx {
            services: self.services,
            admission: self.admission,
            dispatch: DispatchState::new(config.dispatch),
            config: config.clone(),
            stop: CancellationToken::new(),
            force: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let slots = Arc::new(Semaphore::new(config.max_connections));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            };
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: pause, don't spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let ctx2 = ctx.clone();
            ctx.tracker.spawn(async move {
                let _ = stream.set_nodelay(true);
                let stream = match &ctx2.config.tls {
                    None => Stream::from(stream),
                    Some(tls) => {
                        let handshake = tokio::select! {
                            _ = ctx2.stop.cancelled() => return,
                            handshake = tokio::time::timeout(ctx2.config.tls_handshake_timeout, tls.accept(stream)) => handshake,
                        };
                        match handshake {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => return debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                };
                serve_connection(ctx2, stream, peer).await;
                drop(permit);
            });
        }
        drop(listener);
        info!(
            in_flight_tasks = ctx.tracker.len(),
            "server stopping; finishing in-flight calls"
        );
        ctx.stop.cancel();
        ctx.tracker.close();
        if tokio::time::timeout(config.grace_period, ctx.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                abandoned_tasks = ctx.tracker.len(),
                grace_period = ?config.grace_period,
                "grace period over; abandoning in-flight calls"
            );
            ctx.force.cancel();
            ctx.tracker.wait().await;
        }
        info!("server stopped");
    }
}

/// What every connection of a server shares.
struct Ctx {
    services: HashMap<ServiceKey, Arc<dyn Service>>,
    admission: Option<Arc<dyn Admission>>,
    dispatch: DispatchState,
    config: ServerConfig,
    /// Stop reading new requests.
    stop: CancellationToken,
    /// Abandon in-flight work (grace period over).
    force: CancellationToken,
    tracker: TaskTracker,
}

enum DispatchState {
    Direct,
    All {
        running: Arc<Semaphore>,
    },
    Execution {
        admitted: Arc<Semaphore>,
        running: Arc<Semaphore>,
    },
    Connection {
        queue: usize,
    },
}

impl DispatchState {
    fn new(dispatch: Dispatch) -> DispatchState {
        match dispatch {
            Dispatch::Direct => DispatchState::Direct,
            Dispatch::All { max_concurrent } => DispatchState::All {
                running: Arc::new(Semaphore::new(max_concurrent.max(1))),
            },
            Dispatch::Execution { threads, queue } => DispatchState::Execution {
                admitted: Arc::new(Semaphore::new(threads.max(1) + queue)),
                running: Arc::new(Semaphore::new(threads.max(1))),
            },
            Dispatch::Connection { queue } => DispatchState::Connection { queue: queue.max(1) },
        }
    }
}

async fn serve_connection(ctx: Arc<Ctx>, stream: Stream, peer: SocketAddr) {
    debug!(%peer, app = stream.peer_app().map(|a| &**a), "accepted connection");
    let caller = Caller {
        addr: peer,
        app: stream.peer_app().cloned(),
    };
    let (rd, wr) = stream.into_split();
    let mut frames = FrameReader::new(rd, FrameCodec::new(ctx.config.max_frame_len));
    if let DispatchState::Direct = ctx.dispatch {
        return serve_direct(&ctx, frames, wr, &caller).await;
    }

    let outbox = Arc::new(Outbox::new(ctx.config.write_buffer));
    ctx.tracker.spawn(crate::outbox::write_loop(
        wr,
        outbox.clone(),
        ctx.force.clone(),
        peer,
        ctx.config.write_timeout,
    ));
    let answers = Arc::new(Answers {
        outbox,
        pending: AtomicUsize::new(0),
        freed: Notify::new(),
        max_pending: ctx.config.max_pending_per_connection.max(1),
    });

    // `connection` dispatch: one ordered worker for this connection.
    let ordered = match ctx.dispatch {
        DispatchState::Connection { queue } => {
            let (otx, mut orx) = mpsc::channel::<Frame>(queue);
            let (ctx2, answers2, caller) = (ctx.clone(), answers.clone(), caller.clone());
            ctx.tracker.spawn(async move {
                while let Some(frame) = orx.recv().await {
                    let answer = handle(&ctx2, &caller, frame).await;
                    if answers2.send(answer).await.is_err() {
                        break;
                    }
                }
            });
            Some(otx)
        }
        _ => None,
    };

    // Back-pressure: nothing more is read while the answers wait for the
    // writer, or while this connection has its most requests pending.
    while answers.outbox.room().await.is_ok()
        && answers.admit().await
        && let Some(frame) = next_request(&ctx, &mut frames, peer).await
    {
        let sent = match frame.header.kind {
            Kind::Heartbeat => {
                let id = frame.header.request_id;
                let sent = answers
                    .outbox
                    .push(|buf| frame::encode_heartbeat(buf, id, true))
                    .await
                    .is_ok();
                answers.done();
                sent
            }
            _ => dispatch(&ctx, &caller, frame, &answers, ordered.as_ref()).await,
        };
        if !sent {
            break;
        }
    }
    // Dropping our handle lets the writer finish once in-flight handlers
    // (which hold clones) have sent their answers.
}

/// The answer side of a connection. When the last handle goes (the reader
/// and every in-flight handler are done) the outbox closes and the writer
/// drains it and stops.
struct Answers {
    outbox: Arc<Outbox>,
    /// Requests read and not yet answered into the outbox.
    pending: AtomicUsize,
    /// Woken when `pending` falls from `max_pending`.
    freed: Notify,
    max_pending: usize,
}

impl Answers {
    async fn send(&self, answer: Answer) -> Result<(), Closed> {
        self.outbox.push(|buf| answer.encode(buf)).await
    }

    /// Waits for a place for one more request (only the reader takes
    /// places, so a look then an add cannot overshoot); `true`.
    async fn admit(&self) -> bool {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.pending.load(Ordering::Acquire) < self.max_pending {
                self.pending.fetch_add(1, Ordering::AcqRel);
                return true;
            }
            freed.await;
        }
    }

    /// A request's answer is in the outbox (or never will be): its place
    /// is free.
    fn done(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == self.max_pending {
            self.freed.notify_one();
        }
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.outbox.close();
    }
}

/// The outcome of one request, to be written back.
struct Answer {
    id: u64,
    result: Result<Bytes, Status>,
}

impl Answer {
    fn busy(id: u64, why: &str) -> Answer {
        Answer {
            id,
            result: Err(Status::busy(why)),
        }
    }

    fn encode(&self, buf: &mut BytesMut) {
        match &self.result {
            Ok(payload) => frame::encode_response(buf, self.id, Code::Ok, "", payload),
            Err(status) => frame::encode_response(buf, self.id, status.code(), status.message(), &[]),
        }
    }
}

/// `direct` dispatch: run each request on this task and write the answers
/// ourselves, one write per batch of requests that arrived together.
async fn serve_direct(ctx: &Ctx, mut frames: FrameReader<ReadHalf>, mut wr: WriteHalf, caller: &Caller) {
    let peer = caller.addr;
    let mut out = BytesMut::with_capacity(64 * 1024);
    while let Some(frame) = next_request(ctx, &mut frames, peer).await {
        match frame.header.kind {
            Kind::Heartbeat => frame::encode_heartbeat(&mut out, frame.header.request_id, true),
            _ => handle(ctx, caller, frame).await.encode(&mut out),
        }
        if frames.has_buffered_frame() && out.len() < ctx.config.write_buffer {
            continue;
        }
        let written = tokio::select! {
            _ = ctx.force.cancelled() => break,
            written = async { wr.write_all(&out).await?; wr.flush().await } => written,
        };
        if let Err(e) = written {
            debug!(%peer, error = %e, "write failed; dropping connection");
            return;
        }
        out.clear();
    }
    let _ = wr.shutdown().await;
}

/// Reads the next request or ping; `None` when the connection should close
/// (EOF, bad frame, idle, shutting down), after logging why.
async fn next_request(ctx: &Ctx, frames: &mut FrameReader<ReadHalf>, peer: SocketAddr) -> Option<Frame> {
    loop {
        let draining = ctx.stop.is_cancelled();
        let wait = if draining {
            ctx.config.drain_quiet
        } else {
            ctx.config.idle_timeout
        };
        let next = tokio::select! {
            // Shutdown began: switch to the short drain timeout.
            _ = ctx.stop.cancelled(), if !draining => continue,
            next = tokio::time::timeout(wait, frames.next()) => next,
        };
        if draining && next.is_err() {
            debug!(%peer, "drained; no more requests");
            return None;
        }
        let frame = match next {
            Err(_) => {
                info!(%peer, idle_timeout = ?ctx.config.idle_timeout, "closing idle connection");
                return None;
            }
            Ok(None) => {
                debug!(%peer, "connection closed by peer");
                return None;
            }
            Ok(Some(Err(e))) => {
                warn!(%peer, reason = %e, "closing connection: bad frame");
                return None;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.header.kind {
            Kind::Request => return Some(frame),
            Kind::Heartbeat if frame.header.flags & frame::FLAG_ACK == 0 => return Some(frame),
            Kind::Heartbeat => {}
            Kind::Response => {
                warn!(%peer, id = frame.header.request_id, "closing connection: a consumer sent a response frame");
                return None;
            }
        }
    }
}

/// Hands one request to the configured dispatch mode. Returns false when the
/// connection's writer is gone.
async fn dispatch(
    ctx: &Arc<Ctx>,
    caller: &Caller,
    frame: Frame,
    answers: &Arc<Answers>,
    ordered: Option<&mpsc::Sender<Frame>>,
) -> bool {
    let id = frame.header.request_id;
    match &ctx.dispatch {
        DispatchState::Direct => unreachable!("direct dispatch is served by serve_direct"),
        DispatchState::All { running } => {
            let Ok(permit) = running.clone().acquire_owned().await else {
                answers.done();
                return false;
            };
            let (ctx2, answers2, caller) = (ctx.clone(), answers.clone(), caller.clone());
            ctx.tracker.spawn(async move {
                let answer = handle(&ctx2, &caller, frame).await;
                drop(permit);
                // The connection's place is given back once the answer
                // is in its outbox.
                let _ = answers2.send(answer).await;
                answers2.done();
            });
            true
        }
        DispatchState::Execution { admitted, running } => {
            let Ok(admission) = admitted.clone().try_acquire_owned() else {
                let busy = Answer::busy(id, "execution pool and its queue are full");
                let sent = answers.send(busy).await.is_ok();
                answers.done();
                return sent;
            };
            let (ctx2, answers2, running) = (ctx.clone(), answers.clone(), running.clone());
            let caller = caller.clone();
            ctx.tracker.spawn(async move {
                let Ok(permit) = running.acquire_owned().await else {
                    answers2.done();
                    return;
                };
                let answer = handle(&ctx2, &caller, frame).await;
                drop((permit, admission));
                let _ = answers2.send(answer).await;
                answers2.done();
            });
            true
        }
        DispatchState::Connection { .. } => {
            // Bounded by its worker's queue instead.
            answers.done();
            let ordered = ordered.expect("connection dispatch has a worker");
            match ordered.try_send(frame) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    answers.send(Answer::busy(id, "connection queue is full")).await.is_ok()
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        }
    }
}

/// Who sent a connection's requests.
#[derive(Debug, Clone)]
struct Caller {
    addr: SocketAddr,
    /// The app its verified client certificate names (mTLS).
    app: Option<Arc<str>>,
}

/// Runs one request.
async fn handle(ctx: &Ctx, caller: &Caller, frame: Frame) -> Answer {
    let peer = caller.addr;
    let id = frame.header.request_id;
    let answer = |result| Answer { id, result };
    let mut body = match RequestBody::decode(frame.body) {
        Ok(body) => body,
        Err(e) => {
            return answer(Err(Status::bad_request(format!("cannot decode request body: {e}"))));
        }
    };
    let key = ServiceKey {
        interface: std::mem::take(&mut body.interface),
        version: std::mem::take(&mut body.version),
        group: std::mem::take(&mut body.group),
    };
    let Some(service) = ctx.services.get(&key) else {
        return answer(Err(Status::new(Code::ServiceNotFound, key.to_string())));
    };
    if let Some(app) = &caller.app {
        // The certificate says who calls; the call may not say otherwise.
        match body.attachments.get(ATTACH_APP) {
            Some(claimed) if **claimed != **app => {
                return answer(Err(Status::new(
                    Code::Unauthenticated,
                    format!("the call says app {claimed:?}, its client certificate names app {app:?}"),
                )));
            }
            Some(_) => {}
            None => {
                body.attachments.insert(ATTACH_APP.to_owned(), app.to_string());
            }
        }
    }
    if let Some(admission) = &ctx.admission
        && let Err(refused) = admission.admit(&key, &body.method, Some(peer), &body.attachments)
    {
        return answer(Err(refused));
    }
    let timeout = (body.timeout_ms > 0).then(|| Duration::from_millis(body.timeout_ms.into()));
    let deadline = timeout.map(|t| Instant::now() + t);
    let request = Request {
        message: body.payload,
        attachments: body.attachments,
        peer: Some(peer),
        deadline,
    };
    let mut call = crate::catch_unwind::CatchUnwind(service.call(&body.method, request));
    // Most methods finish on their first poll; only those that wait get a
    // deadline timer and a shutdown watch.
    let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut call).poll(cx))).await;
    let outcome = match first {
        Poll::Ready(outcome) => outcome,
        Poll::Pending => tokio::select! {
            outcome = call => outcome,
            _ = sleep_until(deadline) => Ok(Err(Status::new(
                Code::Timeout,
                format!("{key}/{} exceeded its deadline of {:?}", body.method, timeout.unwrap_or_default()),
            ))),
            _ = ctx.force.cancelled() => Ok(Err(Status::new(Code::Internal, "provider shut down"))),
        },
    };
    answer(outcome.unwrap_or_else(|panic| {
        warn!(service = %key, method = %body.method, panic, "service method panicked");
        Err(Status::internal(format!("{key}/{} panicked", body.method)))
    }))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
