//! The write side of a natively framed session.
//!
//! Bytes go to the socket at once, from whichever task has them, when
//! nothing is waiting ahead of them; otherwise they wait in order, and the
//! session's task writes them as the socket drains. Two tasks write here:
//! the session's own (acks, heartbeat echoes, snapshots, rules) and the
//! flusher, which hands each up-to-date subscriber its delta itself
//! ([`Deliver`]). A push to a thousand subscribers is then a thousand
//! writes from one task, not a thousand session tasks woken to pass the
//! same bytes through a queue to their sockets (Redis answers its clients
//! the same way, writing before it sleeps).
//!
//! The outbox is bounded: past [`PENDING_LIMIT`] bytes waiting, senders
//! wait for room (each with its deadline) and the flusher leaves its pushes
//! to the session's task, so a node that stops reading holds at most that
//! much here, and its session ends when a send's deadline passes.

use std::io;
use std::pin::pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rpc_core::net::WriteHalf;
use rpc_core::registry::framing;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::node_session::{self, Gone};
use crate::outgoing::{Deliver, Outgoing, PushedDelta};

/// Bytes waiting beyond which the outbox takes no more for now.
pub const PENDING_LIMIT: usize = 64 * 1024;

/// Why a send was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The socket failed or the outbox was closed.
    Closed,
    /// Still full when the deadline passed: the node is not reading.
    Full,
}

/// The bytes on their way to one natively framed node, and its socket's
/// write half. Not the node side's `rpc_core` outbox: this one is the
/// ConfigServer's, one per session.
#[derive(Debug)]
pub struct SessionOutbox {
    socket: WriteHalf,
    state: Mutex<State>,
    /// Wakes [`SessionOutbox::drain`]: bytes are waiting.
    waiting: Notify,
    /// Wakes senders waiting for room.
    room: Notify,
    /// Cancelled when the outbox closes: ends a drain waiting on a socket
    /// that will not take bytes.
    closing: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    /// Taken but not yet written, in order.
    buf: BytesMut,
    /// The socket failed or the session ended: nothing more is taken.
    closed: bool,
}

enum Offer {
    Taken,
    Full,
    Closed,
}

impl SessionOutbox {
    /// An empty outbox over `socket`.
    pub fn new(socket: WriteHalf) -> SessionOutbox {
        SessionOutbox {
            socket,
            state: Mutex::new(State::default()),
            waiting: Notify::new(),
            room: Notify::new(),
            closing: CancellationToken::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("outbox lock")
    }

    /// Appends a frame with `put`, unless the outbox is full or closed.
    /// With `now`, writes what the socket takes at once if nothing was
    /// waiting; otherwise (or for what is left) [`SessionOutbox::drain`] writes it.
    fn offer(&self, now: bool, put: impl FnOnce(&mut BytesMut)) -> Offer {
        let mut state = self.lock();
        if state.closed {
            return Offer::Closed;
        }
        if state.buf.len() >= PENDING_LIMIT {
            return Offer::Full;
        }
        let idle = state.buf.is_empty();
        put(&mut state.buf);
        // Not idle: `drain` was woken when the first bytes came.
        if idle && !(now && self.write_some(&mut state)) {
            self.waiting.notify_one();
        }
        Offer::Taken
    }

    /// Writes what the socket takes of the waiting bytes; whether none are
    /// left, none waiting in TLS's buffer either (or the socket failed, and
    /// none will be written).
    fn write_some(&self, state: &mut State) -> bool {
        while !state.buf.is_empty() {
            match self.socket.try_write(&state.buf) {
                Ok(0) => return self.fail(state, io::ErrorKind::WriteZero.into()),
                Ok(n) => state.buf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(state, e),
            }
        }
        // A large snapshot's buffer does not stay resident in every
        // session that once sent one.
        if state.buf.capacity() > framing::KEEP_WRITE_BUFFER {
            state.buf = BytesMut::new();
        }
        !self.socket.has_unsent()
    }

    fn fail(&self, state: &mut State, e: io::Error) -> bool {
        debug!(error = %e, "control stream write failed");
        state.closed = true;
        state.buf = BytesMut::new();
        self.room.notify_waiters();
        self.closing.cancel();
        true
    }

    /// Queues `message`, waiting up to `timeout` for room. The session's
    /// task sends this way, and its [`SessionOutbox::drain`] writes what it sent
    /// once it yields: the acks of a batch of requests go out in one write.
    pub async fn send(&self, message: &Outgoing, timeout: Duration) -> Result<(), Refused> {
        let mut deadline = None;
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            match self.offer(false, |buf| message.put_frame(buf)) {
                Offer::Taken => return Ok(()),
                Offer::Closed => return Err(Refused::Closed),
                Offer::Full => {}
            }
            let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(Refused::Full);
            }
        }
    }

    /// Queues `message` if there is room now.
    pub fn try_send(&self, message: &Outgoing) -> Result<(), Refused> {
        match self.offer(false, |buf| message.put_frame(buf)) {
            Offer::Taken => Ok(()),
            Offer::Full => Err(Refused::Full),
            Offer::Closed => Err(Refused::Closed),
        }
    }

    /// Writes waiting bytes as the socket drains, until it fails or the
    /// outbox is closed. The session's task runs this beside the session.
    pub async fn drain(&self) {
        loop {
            let waiting = self.waiting.notified();
            let (closed, idle) = {
                let state = self.lock();
                (state.closed, state.buf.is_empty() && !self.socket.has_unsent())
            };
            if closed {
                return;
            }
            if idle {
                tokio::select! {
                    _ = waiting => {}
                    _ = self.closing.cancelled() => return,
                }
            } else if !self.write_when_writable().await {
                return;
            }
        }
    }

    /// Waits until the socket takes bytes, writes what it takes, and wakes
    /// senders if there is room; `false` once the socket failed.
    async fn write_when_writable(&self) -> bool {
        let writable = tokio::select! {
            writable = self.socket.writable() => writable,
            _ = self.closing.cancelled() => return false,
        };
        let mut state = self.lock();
        if let Err(e) = writable {
            self.fail(&mut state, e);
            return false;
        }
        self.write_some(&mut state);
        if state.buf.len() < PENDING_LIMIT {
            self.room.notify_waiters();
        }
        !state.closed
    }

    /// Writes everything waiting (the last messages of a session), then
    /// closes the outbox. Bound it with a timeout: a node that does not
    /// read never lets it finish.
    pub async fn finish(&self) {
        loop {
            let idle = self.lock().buf.is_empty() && !self.socket.has_unsent();
            if idle || !self.write_when_writable().await {
                break;
            }
        }
        self.close();
    }

    /// Takes nothing more; what is waiting is dropped.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.buf = BytesMut::new();
        drop(state);
        self.room.notify_waiters();
        self.closing.cancel();
    }
}

impl Deliver for SessionOutbox {
    fn deliver(&self, delta: &PushedDelta) -> bool {
        matches!(
            self.offer(true, |buf| framing::put_encoded_frame(buf, &delta.encoded)),
            Offer::Taken
        )
    }
}

/// A native session's way to its node; the flusher writes into it too.
/// (Not imported by name: its methods would shadow the outbox's own.)
impl node_session::ToNode for Arc<SessionOutbox> {
    async fn send(&self, message: Outgoing, timeout: Duration) -> Result<(), Gone> {
        SessionOutbox::send(self, &message, timeout).await.map_err(|_| Gone)
    }

    fn try_send(&self, message: Outgoing) {
        let _ = SessionOutbox::try_send(self, &message);
    }

    fn direct(&self) -> Option<Weak<dyn Deliver>> {
        Some(Arc::downgrade(self) as Weak<dyn Deliver>)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rpc_core::net::{ReadHalf, Stream};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// An outbox on one end of a loopback connection (with that end's read
    /// half, to hold), and the other end.
    async fn pair() -> (Arc<SessionOutbox>, ReadHalf, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, write) = Stream::from(server).into_split();
        (Arc::new(SessionOutbox::new(write)), read, node)
    }

    fn delta(body: &'static [u8]) -> PushedDelta {
        PushedDelta {
            from_revision: 1,
            to_revision: 2,
            entries: 1,
            encoded: Bytes::from_static(body),
        }
    }

    async fn read_exactly(node: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(Duration::from_secs(10), node.read_exact(&mut got))
            .await
            .expect("bytes arrive")
            .unwrap();
        got
    }

    #[tokio::test]
    async fn a_delivered_delta_is_written_at_once_and_a_sent_message_when_drained() {
        let (outbox, _read, mut node) = pair().await;
        // Nothing drains this outbox: the delta must be on the wire anyway.
        assert!(outbox.deliver(&delta(b"abc")));
        assert_eq!(read_exactly(&mut node, 7).await, [0, 0, 0, 3, b'a', b'b', b'c']);

        // The session's own messages wait for its drain, in order, behind
        // nothing else; a delta offered meanwhile queues behind them.
        let hello = Outgoing::from(crate::service_map::ack(7));
        outbox.send(&hello, Duration::from_secs(1)).await.unwrap();
        assert!(outbox.deliver(&delta(b"d")));
        let drain = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.drain().await }
        });
        let mut expected = BytesMut::new();
        hello.put_frame(&mut expected);
        framing::put_encoded_frame(&mut expected, b"d");
        assert_eq!(read_exactly(&mut node, expected.len()).await, expected[..]);
        outbox.close();
        drain.await.unwrap();
        assert!(!outbox.deliver(&delta(b"late")), "a closed outbox takes nothing");
        assert_eq!(outbox.try_send(&hello), Err(Refused::Closed));
    }

    #[tokio::test]
    async fn a_node_that_stops_reading_fills_the_outbox_and_is_refused_at_the_deadline() {
        let (outbox, _read, _node) = pair().await;
        let drain = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.drain().await }
        });
        let message = Outgoing::from(crate::service_map::error(0, "probe", "x".repeat(1024)));
        // The kernel's buffers take a few MiB; past them the outbox fills.
        // Bounded: 64 MiB of messages at most.
        let mut refused = None;
        for _ in 0..64 * 1024 {
            if let Err(e) = outbox.send(&message, Duration::from_millis(50)).await {
                refused = Some(e);
                break;
            }
        }
        assert_eq!(refused, Some(Refused::Full));
        let waiting = outbox.lock().buf.len();
        assert!(
            (PENDING_LIMIT..PENDING_LIMIT + 2 * 1024).contains(&waiting),
            "at most one message over the limit waits: {waiting}"
        );
        assert!(
            !outbox.deliver(&delta(b"d")),
            "the flusher leaves it to the session's task"
        );
        outbox.close();
        drain.await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_connection_refuses_sends() {
        let (outbox, _read, node) = pair().await;
        drop(node);
        let message = Outgoing::from(crate::service_map::ack(1));
        let drain = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.drain().await }
        });
        // The first writes may still be taken by the kernel; the reset that
        // answers them closes the outbox. Bounded in count and time.
        let mut result = Ok(());
        for _ in 0..1000 {
            result = outbox.send(&message, Duration::from_millis(100)).await;
            if result.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(result, Err(Refused::Closed));
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .expect("drain ends once the socket failed")
            .unwrap();
    }
}
