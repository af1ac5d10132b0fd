//! One multiplexed client connection to a provider.
//!
//! Many calls share one TCP connection. Each call takes a request id and a
//! pending slot (`request id -> oneshot`), queues its encoded frame for the
//! writer task and waits for the reader task to complete the slot.
//!
//! - **Batching.** Calls encode their frames straight into the connection's
//!   shared write buffer (see `outbox`); the writer task writes everything
//!   buffered with one syscall. Under load this is where throughput comes
//!   from.
//! - **Deadlines.** Every call has one. A call that times out, or whose future
//!   is dropped, frees its slot at once; a late answer finds no slot and is
//!   dropped.
//! - **Failure.** When the connection closes (EOF, reset, bad frame, missed
//!   heartbeats) every pending call fails at once with
//!   [`Error::ConnectionClosed`], which is retryable.
//! - **Heartbeats.** When nothing has been read for `heartbeat_interval` the
//!   writer sends a ping; when nothing has been read for `heartbeat_timeout`
//!   the reader closes the connection.
//! - **Bounds.** The write buffer holds about `write_buffer` bytes (callers
//!   wait for room, inside their deadline); at most `max_in_flight` calls are
//!   pending (beyond that a call fails with [`Error::TooManyInFlight`]).
//!
//! Tasks: the reader and writer are owned by the connection; when the last
//! [`Connection`] clone is dropped both stop and the socket closes.
//! Shared state is behind a `std::sync::Mutex` that is never held across an
//! `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tern_proto::rpc::ResponseBody;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, trace};

use crate::backoff::Backoff;
use crate::codec::{FrameCodec, FrameReader};
use crate::frame::{self, Frame, Kind, RequestHead};
use crate::net::{ClientTls, ReadHalf, Stream, WriteHalf};
use crate::outbox::Outbox;
use crate::{Code, Error};

/// Settings of a client connection.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub connect_timeout: Duration,
    /// Largest frame body accepted from the provider.
    pub max_frame_len: usize,
    /// Most calls pending at once on one connection.
    pub max_in_flight: usize,
    /// Bytes buffered for the writer before callers wait.
    pub write_buffer: usize,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Delays between reconnect attempts (see [`crate::Endpoint`]).
    pub backoff: Backoff,
    /// TLS to the provider (`None`: plain TCP). The handshake counts
    /// toward `connect_timeout`.
    pub tls: Option<ClientTls>,
}

impl Default for ConnectionConfig {
    fn default() -> ConnectionConfig {
        ConnectionConfig {
            connect_timeout: Duration::from_secs(3),
            max_frame_len: frame::DEFAULT_MAX_FRAME_LEN,
            max_in_flight: 65_536,
            write_buffer: 1024 * 1024,
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            backoff: Backoff::default(),
            tls: None,
        }
    }
}

/// A handle to a multiplexed connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    /// Stops the reader and writer when the last handle goes.
    _stop: DropGuard,
}

#[derive(Debug)]
struct Shared {
    peer: SocketAddr,
    next_id: AtomicU64,
    max_in_flight: usize,
    pending: Mutex<Pending>,
    outbox: Outbox,
    closed: CancellationToken,
    /// Milliseconds since `epoch` at which the last frame was read.
    last_read_ms: AtomicU64,
    epoch: Instant,
}

#[derive(Debug, Default)]
struct Pending {
    calls: HashMap<u64, oneshot::Sender<Frame>>,
    /// Set once, when the connection closes: why.
    closed: Option<String>,
}

// === impl Connection ===

impl Connection {
    /// Connects to `addr` and starts the reader and writer tasks.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] if the TCP connection (and the TLS handshake,
    /// with `tls`) cannot be made within `connect_timeout`.
    pub async fn connect(addr: SocketAddr, config: &ConnectionConfig) -> Result<Connection, Error> {
        let connect_err = |reason: String| Error::Connect { addr, reason };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| connect_err(e.to_string()))?;
            tcp.set_nodelay(true).map_err(|e| connect_err(e.to_string()))?;
            match &config.tls {
                None => Ok(Stream::from(tcp)),
                Some(tls) => tls
                    .connect(tcp, &addr.ip().to_string())
                    .await
                    .map_err(|e| connect_err(format!("TLS: {e}"))),
            }
        };
        let stream = tokio::time::timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| connect_err(format!("no answer within {:?}", config.connect_timeout)))??;
        Ok(Connection::from_stream(stream, addr, config))
    }

    fn from_stream(stream: Stream, peer: SocketAddr, config: &ConnectionConfig) -> Connection {
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(Shared {
            peer,
            next_id: AtomicU64::new(1),
            max_in_flight: config.max_in_flight,
            pending: Mutex::new(Pending::default()),
            outbox: Outbox::new(config.write_buffer),
            closed: CancellationToken::new(),
            last_read_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        tokio::spawn(read_loop(shared.clone(), rd, config.clone()));
        tokio::spawn(write_loop(shared.clone(), wr, config.clone()));
        debug!(%peer, "connected");
        let stop = shared.closed.clone().drop_guard();
        Connection {
            inner: Arc::new(Inner { shared, _stop: stop }),
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.inner.shared.peer
    }

    /// Calls that are waiting for an answer.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.pending.lock().expect("pending lock").calls.len()
    }

    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed.is_cancelled()
    }

    /// Resolves when the connection has closed.
    pub async fn closed(&self) {
        self.inner.shared.closed.cancelled().await
    }

    /// Sends one request and waits up to `timeout` for its answer.
    ///
    /// # Errors
    ///
    /// The provider's status as the matching [`Error`], [`Error::Timeout`],
    /// [`Error::ConnectionClosed`] or [`Error::TooManyInFlight`].
    pub async fn call(&self, head: RequestHead<'_>, payload: &[u8], timeout: Duration) -> Result<Bytes, Error> {
        let shared = &self.inner.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = shared.pending.lock().expect("pending lock");
            if let Some(reason) = &pending.closed {
                return Err(shared.closed_error(reason));
            }
            if pending.calls.len() >= shared.max_in_flight {
                return Err(Error::TooManyInFlight {
                    addr: shared.peer,
                    in_flight: pending.calls.len(),
                });
            }
            pending.calls.insert(id, tx);
        }
        let mut slot = Slot { shared, id: Some(id) };
        let deadline = Instant::now() + timeout;

        let exchange = async {
            // The provider is told the time left when the frame is encoded,
            // after any wait for room in the write buffer.
            let encode = |buf: &mut BytesMut| {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout_ms = left.as_millis().clamp(1, u32::MAX as u128) as u32;
                frame::encode_request(buf, id, &RequestHead { timeout_ms, ..head }, payload)
            };
            if shared.outbox.push(encode).await.is_err() {
                return Err(shared.closed_error_now());
            }
            rx.await.map_err(|_| shared.closed_error_now())
        };
        let frame = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(frame)) => {
                slot.id = None; // the reader already took the slot
                frame
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Timeout(timeout)),
        };
        drop(slot);
        let body = ResponseBody::decode(frame.body)
            .map_err(|e| Error::Protocol(format!("cannot decode response body from {}: {e}", shared.peer)))?;
        if frame.header.status == Code::Ok as u8 {
            Ok(body.payload)
        } else {
            Err(Error::from_wire(frame.header.status, body.message, timeout))
        }
    }
}

/// Frees a pending slot when a call ends without its answer (timeout, error,
/// or the call future dropped).
struct Slot<'a> {
    shared: &'a Shared,
    id: Option<u64>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.pending.lock().expect("pending lock").calls.remove(&id);
        }
    }
}

// === impl Shared ===

impl Shared {
    fn closed_error(&self, reason: &str) -> Error {
        Error::ConnectionClosed {
            addr: self.peer,
            reason: reason.to_owned(),
        }
    }

    fn closed_error_now(&self) -> Error {
        let pending = self.pending.lock().expect("pending lock");
        self.closed_error(pending.closed.as_deref().unwrap_or("closed"))
    }

    /// Marks the connection closed and fails every pending call.
    fn close(&self, reason: String) {
        let calls = {
            let mut pending = self.pending.lock().expect("pending lock");
            if pending.closed.is_none() {
                debug!(peer = %self.peer, %reason, failed_calls = pending.calls.len(), "connection closed");
                pending.closed = Some(reason);
            }
            std::mem::take(&mut pending.calls)
        };
        // Dropping the senders wakes every waiting call with an error.
        drop(calls);
        self.outbox.close();
        self.closed.cancel();
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_read_ms.load(Ordering::Relaxed)))
    }
}

// === tasks ===

async fn read_loop(shared: Arc<Shared>, rd: ReadHalf, config: ConnectionConfig) {
    let mut frames = FrameReader::new(rd, FrameCodec::new(config.max_frame_len));
    let reason = loop {
        let next = tokio::select! {
            _ = shared.closed.cancelled() => break "closed by client".to_owned(),
            next = tokio::time::timeout(config.heartbeat_timeout, frames.next()) => next,
        };
        let frame = match next {
            Err(_) => {
                break format!(
                    "no frame from provider in {:?} (heartbeat timeout)",
                    config.heartbeat_timeout
                );
            }
            Ok(None) => break "closed by provider".to_owned(),
            Ok(Some(Err(e))) => break format!("bad frame from provider: {e}"),
            Ok(Some(Ok(frame))) => frame,
        };
        shared
            .last_read_ms
            .store(shared.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        match frame.header.kind {
            Kind::Response => {
                let id = frame.header.request_id;
                let slot = shared.pending.lock().expect("pending lock").calls.remove(&id);
                match slot {
                    // The caller may be gone in between; nothing to do then.
                    Some(tx) => drop(tx.send(frame)),
                    None => trace!(peer = %shared.peer, id, "late or unknown answer dropped"),
                }
            }
            Kind::Heartbeat => {}
            Kind::Request => break "provider sent a request frame".to_owned(),
        }
    };
    shared.close(reason);
}

async fn write_loop(shared: Arc<Shared>, mut wr: WriteHalf, config: ConnectionConfig) {
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_id = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = shared.closed.cancelled() => break,
            more = shared.outbox.take(&mut out) => {
                if !more {
                    break;
                }
            }
            _ = tick.tick() => {
                if shared.idle_for() < config.heartbeat_interval {
                    continue;
                }
                ping_id += 1;
                frame::encode_heartbeat(&mut out, ping_id, false);
            }
        }
        let written = tokio::select! {
            _ = shared.closed.cancelled() => break,
            written = async { wr.write_all(&out).await?; wr.flush().await } => written,
        };
        if let Err(e) = written {
            shared.close(format!("write failed: {e}"));
            break;
        }
        out.clear();
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    #[tokio::test]
    async fn connect_to_closed_port_is_a_retryable_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = Connection::connect(addr, &ConnectionConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert!(err.is_retryable());
    }
}
