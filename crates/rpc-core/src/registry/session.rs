//! The session task and its handle.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
#[cfg(feature = "grpc")]
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use prost::Message;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
#[cfg(feature = "grpc")]
use tern_proto::registry::registry_client::RegistryClient;
use tern_proto::registry::{
    self as pb, Delta, Hello, Instance, NodeMessage, ProviderCache, ServerMessage, Snapshot, node_message,
    server_message,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
#[cfg(feature = "grpc")]
use tokio_stream::StreamExt;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::Addr;
use super::convert::instance_addr;
use super::framing;
use crate::governance::{Rule, RuleSet};
use crate::{Backoff, ServiceKey};

/// What this node is to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Provider,
    Consumer,
    Both,
}

impl Role {
    fn to_pb(self) -> i32 {
        match self {
            Role::Provider => pb::Role::Provider as i32,
            Role::Consumer => pb::Role::Consumer as i32,
            Role::Both => pb::Role::Both as i32,
        }
    }
}

/// Settings of a [`RegistrySession`].
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// ConfigServer addresses (`host:port`), tried in turn.
    pub servers: Vec<String>,
    pub app: String,
    pub role: Role,
    /// This node's host as others should reach it.
    pub host: String,
    pub zone: String,
    pub labels: HashMap<String, String>,
    pub connect_timeout: Duration,
    /// How long a register/unregister waits for the server's answer.
    pub request_timeout: Duration,
    /// Delays between reconnect attempts.
    pub backoff: Backoff,
    /// Where to keep the last known provider lists, if anywhere.
    pub cache_file: Option<PathBuf>,
    /// This app's credential, when the ConfigServer requires one.
    pub token: String,
    /// How the stream is carried (both reach the same port).
    pub transport: Transport,
}

/// How a node's control stream is carried to the ConfigServer. Both carry
/// the same messages and reach the same port; see [`framing`](super::framing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// Length-prefixed messages over TCP: a few KiB per node on the server.
    #[default]
    Native,
    /// One gRPC bidirectional stream (`tern.registry.Registry/Session`);
    /// needs the `grpc` feature.
    #[cfg(feature = "grpc")]
    Grpc,
}

impl SessionConfig {
    pub fn new(
        servers: impl IntoIterator<Item = impl Into<String>>,
        app: impl Into<String>,
        role: Role,
    ) -> SessionConfig {
        SessionConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            app: app.into(),
            role,
            host: "127.0.0.1".to_owned(),
            zone: String::new(),
            labels: HashMap::new(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_secs(2),
            },
            cache_file: None,
            token: String::new(),
            transport: Transport::default(),
        }
    }
}

/// A request refused by the ConfigServer (the message names the bad value),
/// or not answered in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("configserver refused ({kind}): {message}")]
    Refused { kind: String, message: String },
    #[error("configserver did not answer within {0:?}")]
    Timeout(Duration),
    #[error("registry session stopped")]
    Stopped,
}

/// Stream-level refusals that retrying cannot fix (a bad credential).
fn is_refusal(reason: &str) -> bool {
    reason.starts_with(REFUSED)
}

const REFUSED: &str = "refused: ";

/// How an attempt that never reached a server starts its reason.
const CONNECT_FAILED: &str = "connect: ";

/// The providers of one service as this node knows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderList {
    /// Epoch of the ConfigServer the list came from ("" = none yet).
    pub epoch: String,
    pub revision: u64,
    /// By `host:port` (look up with a `&str`). Instances are shared between
    /// successive lists, so an update costs the changed entries, not a copy
    /// of every instance.
    pub providers: BTreeMap<Addr, Arc<Instance>>,
    /// False while the list rests on a partial snapshot (a restarted server
    /// still hearing from providers): it is then never resumed by revision,
    /// only replaced by the next complete snapshot.
    pub complete: bool,
}

/// Handle to the session task; cheap to clone. The task stops when the last
/// handle is dropped (the ConfigServer then removes this node's instances at
/// once) or on [`RegistrySession::shutdown`].
#[derive(Debug, Clone)]
pub struct RegistrySession {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SessionConfig,
    commands: mpsc::Sender<Command>,
    desired: Arc<Mutex<Desired>>,
    /// Bumped, under the `desired` lock, whenever a subscription or a
    /// listener is added or removed: the session's task keeps the last
    /// subscription a message was for while this stays the same.
    lists_changed: Arc<AtomicU64>,
    /// Why the last server refused the session, if it did (cleared on connect).
    refusal: Arc<Mutex<Option<String>>>,
    connected: watch::Receiver<Option<String>>,
    stop: CancellationToken,
    _stop_guard: DropGuard,
}

/// Told each new provider list of a service (see
/// [`RegistrySession::subscribe_with`]).
#[derive(Clone)]
struct Listener(Arc<dyn Fn(&ProviderList) + Send + Sync>);

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Listener")
    }
}

/// What this node wants the registry to hold.
#[derive(Debug, Default)]
struct Desired {
    registrations: BTreeMap<(ServiceKey, Addr), Instance>,
    subscriptions: HashMap<ServiceKey, watch::Sender<Arc<ProviderList>>>,
    /// Called on the session task after each change of a list.
    listeners: HashMap<ServiceKey, Arc<Vec<Listener>>>,
    /// The last rules received per service; kept across reconnects.
    rules: HashMap<ServiceKey, watch::Sender<Arc<RuleSet>>>,
    /// Lists loaded from the cache file, used as subscriptions start.
    cached: HashMap<ServiceKey, ProviderList>,
    /// Set, under this lock, when the desired state is replayed on a new
    /// stream: a change made while it is false goes out with the next
    /// replay, a change made while it is true goes out as a command.
    connected: bool,
    /// Subscriptions that found the command queue full; sent by the task.
    unsent: Vec<ServiceKey>,
    /// A list changed since the cache file was written.
    cache_dirty: bool,
}

#[derive(Debug)]
struct Command {
    /// `None`: only wakes the task to notice that the session was stopped.
    message: Option<node_message::Body>,
    reply: Option<oneshot::Sender<Result<(), RegistryError>>>,
}

// === impl RegistrySession ===

impl RegistrySession {
    /// Starts the session task (it connects in the background).
    pub fn start(config: SessionConfig) -> RegistrySession {
        let (commands, command_rx) = mpsc::channel(256);
        let (connected_tx, connected) = watch::channel(None);
        let stop = CancellationToken::new();
        let mut desired = Desired::default();
        if let Some(path) = &config.cache_file {
            let (lists, rules) = load_cache(path);
            desired.cached = lists;
            desired.rules = rules
                .into_iter()
                .map(|(key, set)| (key, watch::channel(Arc::new(set)).0))
                .collect();
        }
        let desired = Arc::new(Mutex::new(desired));
        let lists_changed = Arc::new(AtomicU64::new(0));
        let refusal = Arc::new(Mutex::new(None));
        let task = SessionTask {
            config: config.clone(),
            desired: desired.clone(),
            lists_changed: lists_changed.clone(),
            refusal: refusal.clone(),
            connected: connected_tx,
            stop: stop.clone(),
            rng: SmallRng::from_os_rng(),
        };
        tokio::spawn(task.run(command_rx));
        RegistrySession {
            inner: Arc::new(Inner {
                config,
                commands,
                desired,
                lists_changed,
                refusal,
                connected,
                _stop_guard: stop.clone().drop_guard(),
                stop,
            }),
        }
    }

    /// The epoch of the ConfigServer while connected, `None` while not.
    pub fn connected(&self) -> watch::Receiver<Option<String>> {
        self.inner.connected.clone()
    }

    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// Why the ConfigServer refused this node's session (e.g. a wrong
    /// token), if its last answer was a refusal.
    pub fn refusal(&self) -> Option<String> {
        self.inner.refusal.lock().expect("refusal lock").clone()
    }

    /// Registers a provider instance: now if connected (waiting for the
    /// server's answer), and again after every reconnect.
    ///
    /// # Errors
    ///
    /// The server refused it (it is then forgotten), or did not answer.
    pub async fn register(&self, key: &ServiceKey, instance: Instance) -> Result<(), RegistryError> {
        let addr = instance_addr(&instance);
        let connected = {
            let mut desired = self.desired();
            desired
                .registrations
                .insert((key.clone(), addr.clone()), instance.clone());
            desired.connected
        };
        let message = node_message::Body::Register(pb::Register {
            service: Some(key.into()),
            instance: Some(instance),
        });
        let result = self.request(message, connected).await;
        if let Err(RegistryError::Refused { .. }) = &result {
            self.desired().registrations.remove(&(key.clone(), addr));
        }
        result
    }

    /// Withdraws a registration.
    ///
    /// # Errors
    ///
    /// The server did not answer in time.
    pub async fn unregister(&self, key: &ServiceKey, host: &str, port: u16) -> Result<(), RegistryError> {
        let connected = {
            let mut desired = self.desired();
            desired
                .registrations
                .remove(&(key.clone(), Addr::new(host, port.into())));
            desired.connected
        };
        let message = node_message::Body::Unregister(pb::Unregister {
            service: Some(key.into()),
            host: host.to_owned(),
            port: port.into(),
        });
        match self.request(message, connected).await {
            // Already gone on the server (e.g. it restarted): that is the goal.
            Err(RegistryError::Refused { kind, .. }) if kind == "not_found" => Ok(()),
            other => other,
        }
    }

    /// The live provider list of `key`. Starts from the cached list, if any.
    /// When every receiver of it is dropped, the session unsubscribes (at
    /// its next heartbeat).
    pub fn subscribe(&self, key: &ServiceKey) -> watch::Receiver<Arc<ProviderList>> {
        self.subscribe_telling(key, None)
    }

    fn subscribe_telling(&self, key: &ServiceKey, listener: Option<Listener>) -> watch::Receiver<Arc<ProviderList>> {
        let mut desired = self.desired();
        // Added in the same critical section as the subscription: the first
        // snapshot cannot be applied before the listener is there.
        if let Some(listener) = listener {
            let listeners = desired.listeners.entry(key.clone()).or_default();
            // Copied when the session's task holds the vector (it keeps the
            // last pushed list's): listeners come with subscriptions, rarely.
            Arc::make_mut(listeners).push(listener);
            self.inner.lists_changed.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(existing) = desired.subscriptions.get(key) {
            return existing.subscribe();
        }
        let initial = desired.cached.remove(key).unwrap_or_default();
        let known = resume_point(&initial);
        let (tx, rx) = watch::channel(Arc::new(initial));
        desired.subscriptions.insert(key.clone(), tx);
        self.inner.lists_changed.fetch_add(1, Ordering::AcqRel);
        // Sent now if connected; otherwise by the replay on connect.
        if desired.connected {
            let command = Command {
                message: Some(subscribe_message(key, known)),
                reply: None,
            };
            if self.inner.commands.try_send(command).is_err() {
                desired.unsent.push(key.clone());
            }
        }
        rx
    }

    /// Like [`RegistrySession::subscribe`], and `on_change` is called with
    /// the list each time a pushed snapshot or delta has been applied to it
    /// (the first snapshot included), as Dubbo tells its `NotifyListener`.
    /// It runs on the session's task, before the next message is read, while
    /// the list's `watch` is read-locked: it must be quick, must not block
    /// and must not panic. It is called as long as the list is subscribed,
    /// i.e. while some receiver of it is held.
    pub fn subscribe_with(
        &self,
        key: &ServiceKey,
        on_change: impl Fn(&ProviderList) + Send + Sync + 'static,
    ) -> watch::Receiver<Arc<ProviderList>> {
        self.subscribe_telling(key, Some(Listener(Arc::new(on_change))))
    }

    /// The governance rules of `key` as last pushed (empty until the first
    /// push). The server sends them for every service this node registers
    /// or subscribes to; they are kept while the ConfigServer is away.
    pub fn rules(&self, key: &ServiceKey) -> watch::Receiver<Arc<RuleSet>> {
        let mut desired = self.desired();
        desired
            .rules
            .entry(key.clone())
            .or_insert_with(|| watch::channel(Arc::default()).0)
            .subscribe()
    }

    /// Closes the stream; the ConfigServer drops this node's instances and
    /// subscriptions at once.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        // Wakes the task, which looks for the stop at every command; if the
        // queue is full, the commands in it wake it.
        let _ = self.inner.commands.try_send(Command {
            message: None,
            reply: None,
        });
    }

    fn desired(&self) -> std::sync::MutexGuard<'_, Desired> {
        self.inner.desired.lock().expect("registry desired lock")
    }

    async fn request(&self, message: node_message::Body, connected: bool) -> Result<(), RegistryError> {
        if self.inner.stop.is_cancelled() {
            return Err(RegistryError::Stopped);
        }
        if !connected {
            return Ok(()); // sent by the replay on connect
        }
        let (reply, answer) = oneshot::channel();
        let timeout = self.inner.config.request_timeout;
        let exchange = async {
            self.inner
                .commands
                .send(Command {
                    message: Some(message),
                    reply: Some(reply),
                })
                .await
                .map_err(|_| RegistryError::Stopped)?;
            answer.await.map_err(|_| RegistryError::Stopped)?
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RegistryError::Timeout(timeout))?
    }
}

/// Where a node holding `list` can resume: its epoch and revision, if it is
/// a complete list from a server.
fn resume_point(list: &ProviderList) -> Option<(String, u64)> {
    (list.complete && !list.epoch.is_empty()).then(|| (list.epoch.clone(), list.revision))
}

fn subscribe_message(key: &ServiceKey, known: Option<(String, u64)>) -> node_message::Body {
    let (known_epoch, known_revision) = known.unwrap_or_default();
    node_message::Body::Subscribe(pb::Subscribe {
        service: Some(key.into()),
        known_epoch,
        known_revision,
    })
}

// === the task ===

/// Read buffer a natively framed stream starts with (tokio-util's default).
const READ_BUFFER: usize = 8 * 1024;

/// A node reads at most this many messages in a row before it looks at
/// its commands and timer (a server that never stops sending must not
/// starve its heartbeats).
const READS_IN_A_ROW: u32 = 64;

/// Heartbeats come every `interval` less up to this share of it.
const HEARTBEAT_JITTER: f64 = 0.2;

/// `interval` less a random part of it, up to `share` (0..1) of it.
fn jittered(interval: Duration, share: f64, rng: &mut SmallRng) -> Duration {
    interval.mul_f64(1.0 - rng.random_range(0.0..=share.clamp(0.0, 1.0)))
}

/// One open control stream.
struct Stream {
    /// Messages to the server, in order.
    out: mpsc::Sender<NodeMessage>,
    inbound: Inbound,
    /// Writes `out` to the socket (native framing; gRPC has its own task).
    _writer: Option<AbortOnDropHandle<()>>,
}

/// The server's messages on a stream.
enum Inbound {
    Native(framing::MessageReader<tokio::net::tcp::OwnedReadHalf>),
    #[cfg(feature = "grpc")]
    Grpc(Pin<Box<dyn tokio_stream::Stream<Item = Result<ServerMessage, String>> + Send>>),
}

impl Inbound {
    /// The next message; `None` when the server closed the stream.
    /// Cancel-safe.
    async fn next(&mut self) -> Option<Result<ServerMessage, String>> {
        match self {
            Inbound::Native(reader) => reader
                .next(framing::decode_server_frame)
                .await
                .map(|message| message.map_err(|e| format!("stream error: {e}"))),
            #[cfg(feature = "grpc")]
            Inbound::Grpc(messages) => messages.next().await,
        }
    }
}

struct SessionTask {
    config: SessionConfig,
    desired: Arc<Mutex<Desired>>,
    /// See [`Inner`]'s.
    lists_changed: Arc<AtomicU64>,
    refusal: Arc<Mutex<Option<String>>>,
    connected: watch::Sender<Option<String>>,
    stop: CancellationToken,
    rng: SmallRng,
}

/// Why a stream ended.
type Ended = String;

/// A subscribed list, as a pushed message finds it.
struct Subscription {
    key: ServiceKey,
    tx: watch::Sender<Arc<ProviderList>>,
    listeners: Option<Arc<Vec<Listener>>>,
    /// `lists_changed` when it was looked up.
    looked_up: u64,
}

/// Tells each listener the list `tx` now holds.
fn tell(listeners: Option<&Vec<Listener>>, tx: &watch::Sender<Arc<ProviderList>>) {
    if let Some(listeners) = listeners {
        let list = tx.borrow();
        for Listener(listener) in listeners {
            listener(&list);
        }
    }
}

impl SessionTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut failures = 0u32;
        let mut next = 0usize;
        loop {
            if self.config.servers.is_empty() {
                warn!("no configserver address configured; registry session idle");
                self.stop.cancelled().await;
                return;
            }
            let server = self.config.servers[next % self.config.servers.len()].clone();
            next += 1;
            let stop = self.stop.clone();
            let connected = tokio::select! {
                _ = stop.cancelled() => return,
                connected = self.connect(&server) => connected,
            };
            let result = match connected {
                Ok((stream, welcome)) => match self.serve(&server, stream, welcome, &mut commands).await {
                    Some(ended) => Ok(ended),
                    None => Err("stopped".to_owned()),
                },
                Err(reason) => Err(reason),
            };
            self.connected.send_replace(None);
            if self.stop.is_cancelled() || commands.is_closed() {
                return; // every handle is gone
            }
            match result {
                Ok(reason) => {
                    failures = 0;
                    warn!(%server, %reason, "configserver stream ended; reconnecting");
                }
                Err(reason) if is_refusal(&reason) => {
                    failures = failures.saturating_add(1);
                    warn!(%server, %reason, "configserver refused this node's session; check its app name and token");
                    *self.refusal.lock().expect("refusal lock") = Some(reason);
                }
                Err(reason) if reason.starts_with(CONNECT_FAILED) => {
                    failures = failures.saturating_add(1);
                    debug!(%server, %reason, failures, "cannot reach configserver");
                }
                Err(reason) => {
                    // Something answered but never welcomed us: a server
                    // at its connection limit (it closes at once), one of
                    // another version or transport, or not a ConfigServer.
                    // Said at the 1st, 2nd, 4th, 8th... failure in a row.
                    failures = failures.saturating_add(1);
                    if failures.is_power_of_two() {
                        warn!(%server, %reason, failures, transport = ?self.config.transport, "configserver did not open a session: is it full (--max-connections), or not a ConfigServer that speaks this transport?");
                    } else {
                        debug!(%server, %reason, failures, "configserver did not open a session");
                    }
                }
            }
            let delay = self.config.backoff.delay(failures.saturating_sub(1), &mut self.rng);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Opens a stream to `server` and sends `hello` on it.
    async fn open(&self, server: &str, hello: NodeMessage) -> Result<Stream, String> {
        let (out, out_rx) = mpsc::channel::<NodeMessage>(256);
        out.try_send(hello).expect("fresh channel has room");
        match self.config.transport {
            Transport::Native => {
                let connect = tokio::net::TcpStream::connect(server);
                let socket = tokio::time::timeout(self.config.connect_timeout, connect)
                    .await
                    .map_err(|_| format!("{CONNECT_FAILED}no answer within {:?}", self.config.connect_timeout))?
                    .map_err(|e| format!("{CONNECT_FAILED}{e}"))?;
                let _ = socket.set_nodelay(true);
                let (read, write) = socket.into_split();
                let inbound =
                    framing::MessageReader::new(read, framing::MAX_SERVER_FRAME, READ_BUFFER, "ServerMessage");
                let mut preface = BytesMut::with_capacity(512);
                preface.put_slice(&framing::PREFACE);
                let writer = framing::write_frames(out_rx, write, preface, |m, buf| framing::put_frame(buf, m));
                Ok(Stream {
                    out,
                    inbound: Inbound::Native(inbound),
                    _writer: Some(AbortOnDropHandle::new(tokio::spawn(writer))),
                })
            }
            #[cfg(feature = "grpc")]
            Transport::Grpc => {
                let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
                    .map_err(|e| format!("bad configserver address {server:?}: {e}"))?
                    .connect_timeout(self.config.connect_timeout)
                    .tcp_nodelay(true);
                let channel = endpoint.connect().await.map_err(|e| format!("{CONNECT_FAILED}{e}"))?;
                let mut client = RegistryClient::new(channel);
                let response = tokio::time::timeout(
                    self.config.connect_timeout,
                    client.session(tokio_stream::wrappers::ReceiverStream::new(out_rx)),
                )
                .await
                .map_err(|_| "no answer to the session request".to_owned())?
                .map_err(|e| format!("session refused: {e}"))?;
                let inbound = response
                    .into_inner()
                    .map(|message| message.map_err(|status| format!("stream error: {status}")));
                Ok(Stream {
                    out,
                    inbound: Inbound::Grpc(Box::pin(inbound)),
                    _writer: None,
                })
            }
        }
    }

    /// Connects to `server` and waits for its Welcome. `Err` if it never
    /// got as far as that.
    async fn connect(&self, server: &str) -> Result<(Stream, pb::Welcome), String> {
        let hello = Hello {
            app: self.config.app.clone(),
            role: self.config.role.to_pb(),
            host: self.config.host.clone(),
            zone: self.config.zone.clone(),
            labels: self.config.labels.clone(),
            token: self.config.token.clone(),
        };
        let hello = NodeMessage {
            request_id: 0,
            body: Some(node_message::Body::Hello(hello)),
        };
        let mut stream = self.open(server, hello).await?;
        let welcome = match tokio::time::timeout(self.config.connect_timeout, stream.inbound.next()).await {
            Ok(Some(Ok(ServerMessage {
                body: Some(server_message::Body::Welcome(welcome)),
                ..
            }))) => welcome,
            Ok(Some(Ok(ServerMessage {
                body: Some(server_message::Body::Error(e)),
                ..
            }))) => return Err(format!("{REFUSED}{} ({})", e.message, e.kind)),
            Err(_) => return Err(format!("no Welcome within {:?}", self.config.connect_timeout)),
            Ok(None) => return Err("closed before Welcome".to_owned()),
            Ok(Some(Err(e))) => return Err(format!("before Welcome: {e}")),
            Ok(Some(Ok(other))) => return Err(format!("expected Welcome, got {other:?}")),
        };
        Ok((stream, welcome))
    }

    /// A welcomed stream: replay, then serve until it ends, or until the
    /// session is stopped (`None`).
    ///
    /// The loop reads first: a push is what wakes a node most often, and
    /// its task then polls nothing before the socket. The session's stop
    /// is not polled on every wake either: [`RegistrySession::shutdown`]
    /// wakes the task with an empty command, and every command received
    /// checks for it.
    async fn serve(
        &self,
        server: &str,
        stream: Stream,
        welcome: pb::Welcome,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Option<Ended> {
        let Stream {
            out,
            mut inbound,
            _writer,
        } = stream;
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(100).into());
        let timeout = Duration::from_millis(welcome.heartbeat_timeout_ms.max(300).into());
        info!(%server, session = %welcome.session_id, epoch = %welcome.epoch, "registry session established");

        // Replay the desired state, then report connected.
        let replay = self.replay();
        for body in replay {
            if out
                .send(NodeMessage {
                    request_id: 0,
                    body: Some(body),
                })
                .await
                .is_err()
            {
                return Some("stream closed during replay".into());
            }
        }
        self.refusal.lock().expect("refusal lock").take();
        self.connected.send_replace(Some(welcome.epoch.clone()));

        let mut pending: HashMap<u64, oneshot::Sender<Result<(), RegistryError>>> = HashMap::new();
        // The subscription the last pushed list was for: a push is most
        // often for the same service as the one before.
        let mut last = None;
        let mut next_request = 1u64;
        // Jittered, so that nodes that (re)connected together do not beat
        // together: a ConfigServer's load stays level instead of a burst of
        // every node's heartbeat once per interval.
        let mut rng = SmallRng::from_os_rng();
        let mut next_beat = Instant::now() + jittered(interval, 0.9, &mut rng);
        let mut seq = 0u64;
        // One timer for both the next heartbeat and the silence check,
        // moved only when it fires: resetting a timer for every message
        // would cost a timer-wheel update per push.
        let mut heard = Instant::now();
        let timer = tokio::time::sleep_until(next_beat.min(heard + timeout));
        tokio::pin!(timer);
        // Messages read in a row: past a bound, commands and the timer are
        // looked at before the socket is read again.
        let mut streak = 0u32;
        let mut stopped = false;
        let ended = loop {
            tokio::select! {
                biased;
                message = inbound.next(), if streak < READS_IN_A_ROW => {
                    streak += 1;
                    match message {
                        None => break "closed by configserver".to_owned(),
                        Some(Err(e)) => break e,
                        Some(Ok(message)) => {
                            heard = Instant::now();
                            if let Some(resync) = self.on_message(message, &welcome.epoch, &mut pending, &mut last) {
                                let _ = out.send(NodeMessage { request_id: 0, body: Some(resync) }).await;
                            }
                        }
                    }
                }
                command = commands.recv() => {
                    streak = 0;
                    let Some(command) = command else { break "session handle dropped".to_owned() };
                    if self.stop.is_cancelled() {
                        stopped = true;
                        break "stopped".to_owned();
                    }
                    let Some(message) = command.message else { continue };
                    let request_id = if command.reply.is_some() { next_request += 1; next_request } else { 0 };
                    if let Some(reply) = command.reply {
                        pending.insert(request_id, reply);
                    }
                    if out.send(NodeMessage { request_id, body: Some(message) }).await.is_err() {
                        break "stream closed".to_owned();
                    }
                }
                _ = &mut timer => {
                    streak = 0;
                    if self.stop.is_cancelled() {
                        // Its wake-up was lost to a full queue that has
                        // since drained (each command looks for it too).
                        stopped = true;
                        break "stopped".to_owned();
                    }
                    let now = Instant::now();
                    if now.saturating_duration_since(heard) >= timeout {
                        break format!("configserver silent for {timeout:?}");
                    }
                    if now >= next_beat {
                        next_beat = now + jittered(interval, HEARTBEAT_JITTER, &mut rng);
                        seq += 1;
                        let beat = NodeMessage { request_id: 0, body: Some(node_message::Body::Heartbeat(pb::Heartbeat { seq })) };
                        // A full queue means the server is not reading; the
                        // silence check ends the stream if it stays that way.
                        if let Err(mpsc::error::TrySendError::Closed(_)) = out.try_send(beat) {
                            break "stream closed".to_owned();
                        }
                        let abandoned = self.take_abandoned();
                        if !abandoned.is_empty() {
                            // An unsubscribed list is not kept alive here either.
                            last = None;
                        }
                        for body in self.take_unsent().into_iter().chain(abandoned) {
                            if out.send(NodeMessage { request_id: 0, body: Some(body) }).await.is_err() {
                                break;
                            }
                        }
                        self.save_cache().await;
                    }
                    timer.as_mut().reset(next_beat.min(heard + timeout));
                }
                // Reached only when the socket was skipped and nothing else
                // is ready: read it again.
                _ = std::future::ready(()), if streak >= READS_IN_A_ROW => streak = 0,
            }
        };
        self.desired.lock().expect("registry desired lock").connected = false;
        self.save_cache().await;
        if stopped {
            return None; // requests in flight get `Stopped` as their replies drop
        }
        // Requests in flight will be sent again by the next replay.
        for (_, reply) in pending {
            let _ = reply.send(Ok(()));
        }
        Some(ended)
    }

    /// Subscriptions nobody watches any more, as Unsubscribe messages.
    fn take_abandoned(&self) -> Vec<node_message::Body> {
        let mut desired = self.desired.lock().expect("registry desired lock");
        let abandoned: Vec<ServiceKey> = desired
            .subscriptions
            .iter()
            .filter(|(_, tx)| tx.receiver_count() == 0)
            .map(|(key, _)| key.clone())
            .collect();
        abandoned
            .into_iter()
            .map(|key| {
                desired.subscriptions.remove(&key);
                desired.listeners.remove(&key);
                self.lists_changed.fetch_add(1, Ordering::AcqRel);
                debug!(service = %key, "no one watches the list any more; unsubscribing");
                node_message::Body::Unsubscribe(pb::Unsubscribe {
                    service: Some((&key).into()),
                })
            })
            .collect()
    }

    /// Subscriptions that could not be queued when they were made.
    fn take_unsent(&self) -> Vec<node_message::Body> {
        let mut desired = self.desired.lock().expect("registry desired lock");
        let unsent = std::mem::take(&mut desired.unsent);
        unsent
            .iter()
            .filter_map(|key| {
                desired
                    .subscriptions
                    .get(key)
                    .map(|tx| subscribe_message(key, resume_point(&tx.borrow())))
            })
            .collect()
    }

    /// The desired state as messages. From here on changes go out as
    /// commands: `connected` is set in the same critical section.
    fn replay(&self) -> Vec<node_message::Body> {
        let mut desired = self.desired.lock().expect("registry desired lock");
        desired.connected = true;
        desired.unsent.clear();
        let registrations = desired.registrations.iter().map(|((key, _), instance)| {
            node_message::Body::Register(pb::Register {
                service: Some(key.into()),
                instance: Some(instance.clone()),
            })
        });
        let subscriptions = desired
            .subscriptions
            .iter()
            .map(|(key, tx)| subscribe_message(key, resume_point(&tx.borrow())));
        registrations.chain(subscriptions).collect()
    }

    /// Applies one server message; returns a message to send back when a
    /// list fell out of step and must be re-fetched.
    fn on_message(
        &self,
        message: ServerMessage,
        epoch: &str,
        pending: &mut HashMap<u64, oneshot::Sender<Result<(), RegistryError>>>,
        last: &mut Option<Subscription>,
    ) -> Option<node_message::Body> {
        let request_id = message.request_id;
        let mut answer = |result| {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(result);
            }
        };
        match message.body {
            Some(server_message::Body::Snapshot(mut snapshot)) => {
                if let Some(subscription) = self.subscription(snapshot.service.take(), last) {
                    self.apply_snapshot(subscription, snapshot);
                }
                None
            }
            Some(server_message::Body::Delta(mut delta)) => {
                let subscription = self.subscription(delta.service.take(), last)?;
                self.apply_delta(subscription, delta, epoch)
            }
            Some(server_message::Body::Rules(rules)) => {
                self.apply_rules(rules);
                None
            }
            Some(server_message::Body::Ack(_)) => {
                answer(Ok(()));
                None
            }
            Some(server_message::Body::Error(e)) => {
                if request_id == 0 {
                    warn!(kind = %e.kind, message = %e.message, "configserver refused a request");
                }
                answer(Err(RegistryError::Refused {
                    kind: e.kind,
                    message: e.message,
                }));
                None
            }
            _ => None,
        }
    }

    /// The subscription of a pushed message's `key`: `last`, if it is for
    /// that key and no subscription or listener changed since it was looked
    /// up (no lock, no hashing, no copies), else looked up into `last`.
    fn subscription<'a>(
        &self,
        key: Option<pb::ServiceKey>,
        last: &'a mut Option<Subscription>,
    ) -> Option<&'a Subscription> {
        let key = key?;
        let changed = self.lists_changed.load(Ordering::Acquire);
        let same = |s: &Subscription| {
            s.looked_up == changed
                && s.key.interface == key.interface
                && s.key.version == key.version
                && s.key.group == key.group
        };
        if !last.as_ref().is_some_and(same) {
            let key = ServiceKey::from(key);
            let desired = self.desired.lock().expect("registry desired lock");
            // Read again under the lock: what is read below is as of it.
            let looked_up = self.lists_changed.load(Ordering::Acquire);
            *last = desired.subscriptions.get(&key).map(|tx| Subscription {
                tx: tx.clone(),
                listeners: desired.listeners.get(&key).cloned(),
                key,
                looked_up,
            });
        }
        last.as_ref()
    }

    /// Notes that a list changed since the cache file was written.
    fn mark_cache_dirty(&self) {
        if self.config.cache_file.is_some() {
            self.desired.lock().expect("registry desired lock").cache_dirty = true;
        }
    }

    fn apply_snapshot(&self, subscription: &Subscription, snapshot: Snapshot) {
        let Subscription { key, tx, listeners, .. } = subscription;
        let partial = snapshot.partial;
        tx.send_modify(|list| {
            let list = Arc::make_mut(list);
            if !partial {
                list.providers.clear();
            }
            // A partial snapshot (the server restarted and is still hearing
            // from providers) adds to what we had instead of replacing it.
            list.epoch = snapshot.epoch;
            list.revision = snapshot.revision;
            list.complete = !partial;
            for instance in snapshot.providers {
                list.providers.insert(instance_addr(&instance), Arc::new(instance));
            }
            debug!(service = %key, revision = list.revision, providers = list.providers.len(), partial, "snapshot");
        });
        tell(listeners.as_deref(), tx);
        self.mark_cache_dirty();
    }

    fn apply_delta(&self, subscription: &Subscription, delta: Delta, epoch: &str) -> Option<node_message::Body> {
        let Subscription { key, tx, listeners, .. } = subscription;
        let (held_epoch, held) = {
            let current = tx.borrow();
            (current.epoch == epoch, current.revision)
        };
        if !held_epoch || held != delta.from_revision {
            if held_epoch && delta.to_revision <= held {
                return None; // already have it
            }
            warn!(service = %key, held, from = delta.from_revision, "delta out of step; asking for a snapshot");
            return Some(subscribe_message(key, None));
        }
        tx.send_modify(|list| {
            let list = Arc::make_mut(list);
            for addr in &delta.removed {
                list.providers.remove(addr.as_str());
            }
            for instance in delta.added.into_iter().chain(delta.updated) {
                list.providers.insert(instance_addr(&instance), Arc::new(instance));
            }
            list.revision = delta.to_revision;
            debug!(service = %key, revision = list.revision, providers = list.providers.len(), "delta");
        });
        tell(listeners.as_deref(), tx);
        self.mark_cache_dirty();
        None
    }

    fn apply_rules(&self, message: pb::Rules) {
        let Some(key) = message.service.as_ref().map(ServiceKey::from) else {
            return;
        };
        let set = match parse_rules(message.revision, &message.rules_json) {
            Ok(set) => set,
            Err(e) => {
                warn!(service = %key, error = %e, "unreadable rules pushed; keeping the previous ones");
                return;
            }
        };
        debug!(service = %key, revision = set.revision, rules = set.rules.len(), "rules");
        let mut desired = self.desired.lock().expect("registry desired lock");
        let tx = desired
            .rules
            .entry(key)
            .or_insert_with(|| watch::channel(Arc::default()).0);
        tx.send_replace(Arc::new(set));
        desired.cache_dirty = true;
    }

    /// Writes the lists to the cache file if they changed since the last
    /// write (called at most once per heartbeat interval, and at stream end).
    async fn save_cache(&self) {
        let Some(path) = &self.config.cache_file else { return };
        let cache = {
            let mut desired = self.desired.lock().expect("registry desired lock");
            if !std::mem::take(&mut desired.cache_dirty) {
                return;
            }
            let rules = desired
                .rules
                .iter()
                .map(|(key, tx)| {
                    let set = tx.borrow();
                    pb::Rules {
                        service: Some(key.into()),
                        revision: set.revision,
                        rules_json: serde_json::to_string(&set.rules).expect("rules serialize"),
                    }
                })
                .collect();
            ProviderCache {
                rules,
                services: desired
                    .subscriptions
                    .iter()
                    .map(|(key, tx)| {
                        let list = tx.borrow();
                        Snapshot {
                            service: Some(key.into()),
                            epoch: list.epoch.clone(),
                            revision: list.revision,
                            providers: list.providers.values().map(|i| Instance::clone(i)).collect(),
                            partial: !list.complete,
                        }
                    })
                    .collect(),
            }
        };
        let tmp = path.with_extension("tmp");
        let written = async {
            tokio::fs::write(&tmp, cache.encode_to_vec()).await?;
            tokio::fs::rename(&tmp, path).await
        };
        if let Err(e) = written.await {
            warn!(path = %path.display(), error = %e, "cannot save provider cache");
        }
    }
}

/// A pushed rule set. A rule this version does not understand (a kind added
/// by a newer server) is skipped with a warning rather than discarding the
/// whole set.
fn parse_rules(revision: u64, json: &str) -> Result<RuleSet, serde_json::Error> {
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(json)?;
    let rules = raw
        .into_iter()
        .filter_map(|(name, value)| match serde_json::from_value::<Rule>(value) {
            Ok(rule) => Some((name, rule)),
            Err(e) => {
                warn!(rule = %name, error = %e, "skipping a rule this node does not understand");
                None
            }
        })
        .collect();
    Ok(RuleSet { revision, rules })
}

type Cached = (HashMap<ServiceKey, ProviderList>, HashMap<ServiceKey, RuleSet>);

fn load_cache(path: &PathBuf) -> Cached {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Cached::default(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read provider cache");
            return Cached::default();
        }
    };
    let cache = match ProviderCache::decode(&bytes[..]) {
        Ok(cache) => cache,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "provider cache is corrupt; ignoring it");
            return Cached::default();
        }
    };
    let lists: HashMap<_, _> = cache
        .services
        .into_iter()
        .filter_map(|s| {
            let key = ServiceKey::from(s.service.as_ref()?);
            let providers = s
                .providers
                .into_iter()
                .map(|i| (instance_addr(&i), Arc::new(i)))
                .collect();
            Some((
                key,
                ProviderList {
                    epoch: s.epoch,
                    revision: s.revision,
                    providers,
                    complete: !s.partial,
                },
            ))
        })
        .collect();
    let rules: HashMap<_, _> = cache
        .rules
        .into_iter()
        .filter_map(|r| {
            let key = ServiceKey::from(r.service.as_ref()?);
            parse_rules(r.revision, &r.rules_json).ok().map(|set| (key, set))
        })
        .collect();
    info!(path = %path.display(), services = lists.len(), rules = rules.len(), "loaded provider cache");
    (lists, rules)
}
