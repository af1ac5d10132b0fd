//! One node's control-plane stream: Hello, then requests in, pushes out.
//!
//! The session ends when the node closes the stream, when nothing arrives
//! within the heartbeat timeout (a crashed, partitioned or stopped node), on
//! a protocol error, or when the server shuts down; in every case the
//! registry drops the node's instances and subscriptions at once.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use rpc_core::ServiceKey;
use tern_proto::registry::{NodeMessage, ServerMessage, Welcome, node_message, server_message};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::Credentials;
use crate::outgoing::{Deliver, Outgoing};
use crate::service_map::{self, NodeInfo, PushQueue, Registry, SessionId};

/// Heartbeat timings announced to nodes.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeats {
    pub interval: Duration,
    pub timeout: Duration,
}

/// The registry's sessions, whatever transport carries them.
#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: Arc<Registry>,
    heartbeats: Heartbeats,
    /// `None`: access control is off.
    credentials: Option<Arc<Credentials>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl RegistryService {
    pub fn new(
        registry: Arc<Registry>,
        heartbeats: Heartbeats,
        credentials: Option<Arc<Credentials>>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        RegistryService {
            registry,
            heartbeats,
            credentials,
            shutdown,
            tracker,
        }
    }
}

impl RegistryService {
    /// Runs `session` (one node's, on some transport) until it ends or the
    /// server shuts down.
    ///
    /// A future of its own rather than an `async fn`: an `async fn` keeps
    /// its arguments in its state beside what its body polls, so `session`
    /// (the whole session's state) would be held twice in every session's
    /// task.
    pub(crate) fn until_shutdown<F: Future<Output = ()>>(&self, session: F) -> UntilShutdown<'_, F> {
        UntilShutdown {
            shutdown: self.shutdown.cancelled(),
            session,
        }
    }

    /// The server's tasks: a transport spawns a session's task here.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Runs one session over `inbound` (the node's messages, or why the
    /// stream broke) and `tx` (towards the node).
    pub(crate) async fn run(
        &self,
        mut inbound: impl Stream<Item = Result<NodeMessage, String>> + Unpin,
        tx: impl ToNode,
        peer: Option<SocketAddr>,
        verified_app: Option<Arc<str>>,
    ) {
        let (registry, heartbeats, credentials) = (&*self.registry, self.heartbeats, self.credentials.as_deref());
        // The first message must be Hello.
        let first = tokio::time::timeout(heartbeats.timeout, inbound.next()).await;
        let (request_id, hello) = match first {
            Ok(Some(Ok(NodeMessage {
                request_id,
                body: Some(node_message::Body::Hello(hello)),
            }))) => (request_id, hello),
            other => {
                let why = match other {
                    Err(_) => "no Hello within the heartbeat timeout".to_owned(),
                    Ok(Some(Err(e))) => format!("before Hello: {e}"),
                    Ok(None) => return,
                    Ok(Some(Ok(_))) => "the first message must be Hello".to_owned(),
                };
                warn!(?peer, reason = %why, "refusing session");
                let _ = tx
                    .send(
                        Outgoing::from(service_map::error(0, "protocol", why)),
                        heartbeats.timeout,
                    )
                    .await;
                return;
            }
        };
        if let Err(why) = check_hello(&hello) {
            warn!(?peer, reason = %why, "refusing session");
            registry.metrics.refused_requests.fetch_add(1, Ordering::Relaxed);
            let _ = tx
                .send(
                    Outgoing::from(service_map::error(request_id, "invalid", why)),
                    heartbeats.timeout,
                )
                .await;
            return;
        }
        if let Some(certified) = verified_app
            && *certified != *hello.app
        {
            let why = format!(
                "the client certificate names app {certified:?}, the Hello says app {:?}",
                hello.app
            );
            warn!(?peer, reason = %why, "refusing session");
            registry.metrics.refused_requests.fetch_add(1, Ordering::Relaxed);
            let _ = tx
                .send(
                    Outgoing::from(service_map::error(request_id, "unauthenticated", why)),
                    heartbeats.timeout,
                )
                .await;
            return;
        }
        if let Some(credentials) = credentials
            && let Err(why) = credentials.authenticate(&hello.app, &hello.token)
        {
            warn!(?peer, app = %hello.app, reason = ?why, "refusing session");
            registry.metrics.refused_requests.fetch_add(1, Ordering::Relaxed);
            let _ = tx
                .send(
                    Outgoing::from(service_map::error(request_id, "unauthenticated", why.to_string())),
                    heartbeats.timeout,
                )
                .await;
            return;
        }
        let node = NodeInfo {
            app: hello.app,
            role: hello.role,
            host: hello.host,
            zone: hello.zone,
            peer,
        };
        let (id, push) = registry.open_session(node);
        if let Some(direct) = tx.direct() {
            push.attach(direct);
        }
        let welcome = ServerMessage {
            request_id,
            body: Some(server_message::Body::Welcome(Welcome {
                session_id: id.to_string(),
                epoch: registry.epoch().to_owned(),
                heartbeat_interval_ms: heartbeats.interval.as_millis() as u32,
                heartbeat_timeout_ms: heartbeats.timeout.as_millis() as u32,
            })),
        };
        // Held while rules are taken from the push queue and sent, so that a
        // registration's ack follows the rules it made due (see `read_loop`).
        let rules_gate = tokio::sync::Mutex::new(());
        let reason = if tx.send(Outgoing::from(welcome), heartbeats.timeout).await.is_err() {
            "node went away".to_owned()
        } else {
            let pushing = Pushing {
                registry,
                id,
                push: &push,
                rules_gate: &rules_gate,
                tx: &tx,
                send_timeout: heartbeats.timeout,
            };
            tokio::select! {
                reason = read_loop(&pushing, heartbeats, credentials, &mut inbound) => reason,
                reason = push_loop(&pushing) => reason,
            }
        };
        registry.close_session(id, &reason);
    }

    pub(crate) fn heartbeats(&self) -> Heartbeats {
        self.heartbeats
    }
}

/// Longest app name a node may give in its Hello.
pub const MAX_APP: usize = 128;
/// Longest host.
pub const MAX_HOST: usize = 253;
/// Longest zone.
pub const MAX_ZONE: usize = 128;
/// Longest token.
pub const MAX_TOKEN: usize = 1024;
/// Most labels, and the longest key and value of one.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY: usize = 128;
pub const MAX_LABEL_VALUE: usize = 256;

/// Whether every field of `hello` is within its bound; which is not.
fn check_hello(hello: &tern_proto::registry::Hello) -> Result<(), String> {
    for (field, value, max) in [
        ("app", &hello.app, MAX_APP),
        ("host", &hello.host, MAX_HOST),
        ("zone", &hello.zone, MAX_ZONE),
        ("token", &hello.token, MAX_TOKEN),
    ] {
        if value.len() > max {
            return Err(format!("Hello's {field} is {} bytes, more than {max}", value.len()));
        }
    }
    if hello.labels.len() > MAX_LABELS {
        return Err(format!(
            "Hello has {} labels, more than {MAX_LABELS}",
            hello.labels.len()
        ));
    }
    for (key, value) in &hello.labels {
        if key.len() > MAX_LABEL_KEY || value.len() > MAX_LABEL_VALUE {
            return Err(format!(
                "Hello's labels: {:?} (key {} bytes, value {} bytes) is longer than {MAX_LABEL_KEY} / {MAX_LABEL_VALUE}",
                key.chars().take(32).collect::<String>(),
                key.len(),
                value.len()
            ));
        }
    }
    Ok(())
}

pin_project_lite::pin_project! {
    /// A session's future that ends at the server's shutdown too; see
    /// [`RegistryService::until_shutdown`].
    pub(crate) struct UntilShutdown<'a, F> {
        #[pin]
        shutdown: WaitForCancellationFuture<'a>,
        #[pin]
        session: F,
    }
}

impl<F: Future<Output = ()>> Future for UntilShutdown<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.shutdown.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.session.poll(cx)
    }
}

/// The way to one node. The session owns this contract and each
/// transport implements it (a native session's
/// [`SessionOutbox`](crate::session_outbox::SessionOutbox), a gRPC
/// stream's queue in [`crate::grpc`]), so that the session depends on no
/// transport.
pub(crate) trait ToNode: Send + Sync {
    /// Sends `message`, waiting at most `timeout` for room.
    async fn send(&self, message: Outgoing, timeout: Duration) -> Result<(), Gone>;

    /// Sends `message` if there is room now; drops it otherwise.
    fn try_send(&self, message: Outgoing);

    /// The transport, if the flusher can hand it deltas itself.
    fn direct(&self) -> Option<Weak<dyn Deliver>>;
}

/// The node went away or stopped reading.
#[derive(Debug)]
pub(crate) struct Gone;

/// What both halves of a session share.
struct Pushing<'a, T> {
    registry: &'a Registry,
    id: SessionId,
    push: &'a PushQueue,
    rules_gate: &'a tokio::sync::Mutex<()>,
    tx: &'a T,
    /// How long a message may wait for room towards the node: a node that
    /// stops reading ends its session instead of holding it (and the
    /// rules gate) forever.
    send_timeout: Duration,
}

impl<T: ToNode> Pushing<'_, T> {
    /// Sends the current rules of `key`; `false`: the node went away.
    async fn send_rules(&self, key: &ServiceKey) -> bool {
        let Some(message) = self.registry.rules_for(self.id, key) else {
            return true;
        };
        self.registry.metrics.pushed_rules.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Outgoing::from(message), self.send_timeout).await.is_ok()
    }
}

/// Handles the node's requests until the session ends; returns why.
///
/// A registration's ack follows the rules of its service: a provider that
/// has its ack enforces the rules from its first call. Taking the rules
/// from the push queue and sending them happen under the rules gate in both
/// loops, so whichever loop takes them has sent them before the ack goes.
async fn read_loop(
    pushing: &Pushing<'_, impl ToNode>,
    heartbeats: Heartbeats,
    credentials: Option<&Credentials>,
    inbound: &mut (impl Stream<Item = Result<NodeMessage, String>> + Unpin),
) -> String {
    let Pushing { registry, id, tx, .. } = *pushing;
    loop {
        let message = match tokio::time::timeout(heartbeats.timeout, inbound.next()).await {
            // The server itself was not running for part of that time:
            // read what the node sent meanwhile before judging it.
            Err(_) if !registry.may_expire(heartbeats.timeout) => continue,
            Err(_) => {
                registry.metrics.sessions_expired.fetch_add(1, Ordering::Relaxed);
                info!(session = id, timeout = ?heartbeats.timeout, "no heartbeat; expiring session");
                return format!("no message within {:?}", heartbeats.timeout);
            }
            Ok(None) => return "closed by node".to_owned(),
            Ok(Some(Err(e))) => {
                // Usually the node died or its connection dropped; a
                // malformed frame is told to the node before it closes.
                info!(session = id, error = %e, "stream error");
                tx.try_send(Outgoing::from(service_map::error(0, "protocol", e.clone())));
                return e;
            }
            Ok(Some(Ok(message))) => message,
        };
        let request_id = message.request_id;
        let mut registered = None;
        let result = match message.body {
            Some(node_message::Body::Register(r)) => match (r.service, r.instance) {
                (Some(key), Some(instance)) => {
                    let key = ServiceKey::from(&key);
                    match credentials.zip(registry.app_of(id)) {
                        Some((c, app)) if !c.may_provide(&app, &key) => Err(service_map::RequestError::Forbidden(
                            format!("app {app:?} may not provide {key}"),
                        )),
                        _ => {
                            registered = Some(key.clone());
                            registry.register(id, key, instance)
                        }
                    }
                }
                _ => Err(service_map::RequestError::Invalid(
                    "Register needs a service and an instance".into(),
                )),
            },
            Some(node_message::Body::Unregister(u)) => match u.service {
                Some(key) => registry.unregister(id, &ServiceKey::from(&key), &u.host, u.port),
                None => Err(service_map::RequestError::Invalid("Unregister needs a service".into())),
            },
            Some(node_message::Body::Subscribe(s)) => match s.service {
                Some(key) => {
                    let key = ServiceKey::from(&key);
                    match credentials.zip(registry.app_of(id)) {
                        Some((c, app)) if !c.may_consume(&app, &key) => Err(service_map::RequestError::Forbidden(
                            format!("app {app:?} may not consume {key}"),
                        )),
                        _ => {
                            let known =
                                (!s.known_epoch.is_empty()).then_some((s.known_epoch.as_str(), s.known_revision));
                            registry.subscribe(id, key, known)
                        }
                    }
                }
                None => Err(service_map::RequestError::Invalid("Subscribe needs a service".into())),
            },
            Some(node_message::Body::Unsubscribe(u)) => {
                if let Some(key) = u.service {
                    registry.unsubscribe(id, &ServiceKey::from(&key));
                }
                Ok(())
            }
            Some(node_message::Body::Heartbeat(hb)) => {
                let echo = ServerMessage {
                    request_id,
                    body: Some(server_message::Body::Heartbeat(hb)),
                };
                if tx.send(Outgoing::from(echo), heartbeats.timeout).await.is_err() {
                    return "node went away or stopped reading".to_owned();
                }
                continue;
            }
            Some(node_message::Body::Hello(_)) => Err(service_map::RequestError::Invalid("Hello sent twice".into())),
            None => Err(service_map::RequestError::Invalid(
                "empty message (unknown kind?)".into(),
            )),
        };
        let _gate = match (&result, &registered) {
            (Ok(()), Some(key)) => {
                let gate = pushing.rules_gate.lock().await;
                if pushing.push.take_rules_of(key) && !pushing.send_rules(key).await {
                    return "node went away".to_owned();
                }
                Some(gate)
            }
            _ => None,
        };
        let answer = match result {
            Ok(()) if request_id == 0 => continue,
            Ok(()) => service_map::ack(request_id),
            Err(e) => {
                registry.metrics.refused_requests.fetch_add(1, Ordering::Relaxed);
                debug!(session = id, error = %e, "request refused");
                service_map::error(request_id, e.kind(), e.to_string())
            }
        };
        if tx.send(Outgoing::from(answer), heartbeats.timeout).await.is_err() {
            return "node went away".to_owned();
        }
    }
}

/// Sends the node what it lacks of each dirty service, as it becomes ready.
async fn push_loop(pushing: &Pushing<'_, impl ToNode>) -> String {
    let Pushing { registry, push, tx, .. } = *pushing;
    loop {
        let work = push.next().await;
        if work.rules {
            let _gate = pushing.rules_gate.lock().await;
            for key in push.take_rules() {
                if !pushing.send_rules(&key).await {
                    return "node went away".to_owned();
                }
            }
        }
        for due in work.due {
            // Usually exactly the delta flushed just now; otherwise the
            // registry says what is missing.
            let (messages, revision) = match due.next_delta() {
                Some(delta) => (vec![Outgoing::Delta(delta.clone())], delta.to_revision),
                None => registry.catch_up(&due.key, due.sent),
            };
            for message in messages {
                let metrics = &registry.metrics;
                metrics.pushed_messages.fetch_add(1, Ordering::Relaxed);
                metrics.pushed_bytes.fetch_add(message.len() as u64, Ordering::Relaxed);
                if let Outgoing::Message(m) = &message
                    && matches!(m.body, Some(server_message::Body::Snapshot(_)))
                {
                    metrics.pushed_snapshots.fetch_add(1, Ordering::Relaxed);
                }
                if tx.send(message, pushing.send_timeout).await.is_err() {
                    return "node went away or stopped reading".to_owned();
                }
            }
            push.sent(&due, revision);
            registry.pushed();
        }
    }
}
