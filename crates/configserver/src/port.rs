//! The registry port: one listener for both transports of a node's stream.
//!
//! With TLS on, each connection's handshake comes first (the node's
//! verified app, under mTLS, goes with the connection to its session).
//! Each accepted connection is then told apart by its first byte: the native
//! framing's preface (see [`rpc_core::registry::framing`]) starts a native
//! session ([`crate::native`]) on the connection's own task; anything else
//! (HTTP/2's preface starts with `P`) is handed to the gRPC server
//! ([`crate::grpc`]).
//!
//! At most [`ConnectionLimit`] connections are open on the port at once;
//! one past it is closed as soon as it is accepted (and counted), so that
//! a flood of nodes costs no file descriptors beyond the bound, and a node
//! that is turned away tries its next ConfigServer at once rather than
//! waiting in the listen backlog. Every connection holding a place is
//! bounded in time: a native one by its session's heartbeats, a gRPC one
//! by [`Held`]'s read deadline; and a gRPC connection carries at most
//! [`GRPC_STREAMS`] sessions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use rpc_core::net::{ServerTls, Stream};
use rpc_core::registry::framing;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::node_session::RegistryService;
use crate::peer::Cluster;
use crate::service_map::Registry;

/// Connections accepted but not yet taken by the gRPC server; at the bound
/// the accept loop's sorting tasks wait.
pub const GRPC_HANDOFF: usize = 128;

/// Streams (sessions) one gRPC connection may carry at once. The SDKs open
/// one per connection; a few allow one that is ending beside its successor.
pub const GRPC_STREAMS: u32 = 4;

/// How many connections the registry port holds at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    registry: Arc<Registry>,
}

impl ConnectionLimit {
    /// At most `max` at once; counted in `registry`'s metrics.
    pub fn new(max: usize, registry: Arc<Registry>) -> ConnectionLimit {
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            registry,
        }
    }

    /// A slot for one more connection, if one is free.
    fn take(&self) -> Option<Slot> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.registry.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            _permit: permit,
            registry: self.registry.clone(),
        })
    }
}

/// One connection's place under the [`ConnectionLimit`], given back when
/// the connection ends.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    registry: Arc<Registry>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection handed to the gRPC server, holding its slot for as long
/// as the server keeps it. Its reads fail once nothing has come for the
/// heartbeat timeout: a live session heartbeats well within it, and hyper
/// would keep an idle HTTP/2 connection (or one that never finished its
/// handshake) open, and its place taken, for as long as the peer does.
#[derive(Debug)]
pub struct Held {
    stream: Stream,
    _slot: Slot,
    idle_limit: Duration,
    /// When reads fail unless bytes come first.
    silent_until: Pin<Box<tokio::time::Sleep>>,
}

impl Held {
    fn new(stream: Stream, slot: Slot, idle_limit: Duration) -> Held {
        Held {
            stream,
            _slot: slot,
            idle_limit,
            silent_until: Box::pin(tokio::time::sleep(idle_limit)),
        }
    }
}

impl AsyncRead for Held {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + this.idle_limit;
                    this.silent_until.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.silent_until.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nothing received for {:?}", this.idle_limit),
                ))),
                Poll::Pending => Poll::Pending,
            },
            failed => failed,
        }
    }
}

impl AsyncWrite for Held {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What a gRPC session learns of its connection (in the request's
/// extensions).
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The app its verified client certificate names (mTLS).
    pub app: Option<Arc<str>>,
}

impl Connected for Held {
    type ConnectInfo = ConnectInfo;

    fn connect_info(&self) -> ConnectInfo {
        ConnectInfo {
            remote_addr: self.stream.peer_addr().ok(),
            app: self.stream.peer_app().cloned(),
        }
    }
}

/// How often a port at its limit, or out of file descriptors, says so in
/// the log.
const WARNING_EVERY: Duration = Duration::from_secs(10);

/// A warning given at most every [`WARNING_EVERY`], with how many times
/// it was due since the last.
#[derive(Debug, Default)]
struct Warning {
    last: Option<Instant>,
    due: u64,
}

impl Warning {
    /// Counts one more; the count since the last warning, if one is due now.
    fn due(&mut self) -> Option<u64> {
        self.due += 1;
        if self.last.is_some_and(|at| at.elapsed() < WARNING_EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.due))
    }
}

/// Where the registry port hands each connection it accepts.
#[derive(Debug, Clone)]
pub struct Handlers {
    /// Natively framed node sessions.
    pub sessions: RegistryService,
    /// Largest node message accepted.
    pub max_message_bytes: usize,
    /// Everything else (HTTP/2) goes to the gRPC server.
    pub grpc: mpsc::Sender<std::io::Result<Held>>,
    /// Links of other ConfigServers (`None`: this server has no peers, and
    /// refuses them).
    pub peers: Option<Arc<Cluster>>,
    /// TLS on every connection, before it is told apart (`None`: plain).
    pub tls: Option<ServerTls>,
}

/// Accepts connections on the registry port until `shutdown`, serving
/// native sessions and peers' links and passing the rest to gRPC, at most
/// `limit` at once. Every connection's task is in `tracker`.
pub async fn accept(
    listener: TcpListener,
    handlers: Handlers,
    limit: ConnectionLimit,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (mut full, mut failing) = (Warning::default(), Warning::default());
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: pause instead of spinning.
                    if let Some(times) = failing.due() {
                        warn!(error = %e, times, "registry port: accept failed (out of file descriptors? the open-file limit is logged at start)");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            },
        };
        let Some(slot) = limit.take() else {
            limit
                .registry
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            if let Some(refused) = full.due() {
                warn!(%peer, refused, "registry port: {} connections open, the most --max-connections allows: closing new ones at once", limit.max);
            }
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (handlers, shutdown) = (handlers.clone(), shutdown.clone());
        tracker.spawn(async move {
            let timeout = handlers.sessions.heartbeats().timeout;
            // The handshake and the first byte, within one heartbeat timeout.
            let deadline = tokio::time::Instant::now() + timeout;
            let mut socket = match &handlers.tls {
                None => Stream::from(socket),
                Some(tls) => {
                    let handshake = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        handshake = tokio::time::timeout_at(deadline, tls.accept(socket)) => handshake,
                    };
                    match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return warn!(%peer, error = %e, "registry port: TLS handshake failed"),
                        Err(_) => return debug!(%peer, ?timeout, "registry port: TLS handshake unfinished; closing"),
                    }
                }
            };
            let peeked = tokio::select! {
                _ = shutdown.cancelled() => return,
                peeked = tokio::time::timeout_at(deadline, socket.peek_byte()) => peeked,
            };
            match peeked {
                Ok(Ok(Some(first))) if first == framing::PREFACE[0] => {
                    let service = &handlers.sessions;
                    let serve = crate::native::serve(
                        service,
                        handlers.peers.as_ref(),
                        socket,
                        peer,
                        handlers.max_message_bytes,
                    );
                    service.until_shutdown(serve).await;
                    drop(slot);
                }
                Ok(Ok(Some(_))) => {
                    let _ = handlers.grpc.send(Ok(Held::new(socket, slot, timeout))).await;
                }
                Ok(Ok(None)) => debug!(%peer, "registry port: closed before sending anything"),
                Ok(Err(e)) => debug!(%peer, error = %e, "registry port: read failed"),
                Err(_) => debug!(%peer, ?timeout, "registry port: nothing sent; closing"),
            }
        });
    }
}
