//! A connection's shared write buffer.
//!
//! Callers (client side) and handlers (server side) encode their frames
//! straight into one buffer under a short lock; the connection's writer task
//! swaps the whole buffer out and writes it with one syscall. No per-frame
//! allocation, no per-frame channel hop, and the batching comes for free:
//! whatever was encoded while the previous write was in progress goes out in
//! the next one.
//!
//! Bound: once the buffer holds `high_water` bytes, pushers wait until the
//! writer has taken it (so a peer that stops reading holds back callers,
//! within their deadlines, rather than growing memory). A frame is never
//! split, so the buffer may exceed `high_water` by one frame.
//!
//! The lock is a `std::sync::Mutex`, never held across an `.await`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::net::WriteHalf;

/// The writer went away; nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer when the buffer stops being empty.
    ready: Notify,
    /// Wakes pushers waiting for room.
    room: Notify,
    high_water: usize,
    /// The buffer holds `high_water` bytes or more (kept under the lock;
    /// read without it by [`Outbox::room`]'s quick look).
    full: AtomicBool,
}

#[derive(Debug)]
struct State {
    buf: BytesMut,
    closed: bool,
}

impl Outbox {
    pub(crate) fn new(high_water: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                buf: BytesMut::with_capacity(64 * 1024),
                closed: false,
            }),
            ready: Notify::new(),
            room: Notify::new(),
            high_water: high_water.max(1),
            full: AtomicBool::new(false),
        }
    }

    /// Encodes one frame with `encode` into the buffer, waiting for room
    /// first if the buffer is full.
    pub(crate) async fn push(&self, encode: impl FnOnce(&mut BytesMut)) -> Result<(), Closed> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Register before checking, so a wake between check and await is kept.
            room.as_mut().enable();
            {
                let mut state = self.state.lock().expect("outbox lock");
                if state.closed {
                    return Err(Closed);
                }
                if state.buf.len() < self.high_water {
                    let was_empty = state.buf.is_empty();
                    encode(&mut state.buf);
                    if state.buf.len() >= self.high_water {
                        self.full.store(true, Ordering::Release);
                    }
                    drop(state);
                    if was_empty {
                        self.ready.notify_one();
                    }
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Waits for frames, then swaps them into `out` (which must be empty).
    /// Returns false once the outbox is closed and drained.
    /// Waits until a push would not wait (or the outbox closed): a reader
    /// that calls this before taking more requests stops reading while its
    /// answers are not being written.
    pub(crate) async fn room(&self) -> Result<(), Closed> {
        // The common case costs one load: not full.
        if !self.full.load(Ordering::Acquire) {
            return Ok(());
        }
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let state = self.state.lock().expect("outbox lock");
                if state.closed {
                    return Err(Closed);
                }
                if state.buf.len() < self.high_water {
                    return Ok(());
                }
            }
            room.await;
        }
    }

    pub(crate) async fn take(&self, out: &mut BytesMut) -> bool {
        debug_assert!(out.is_empty());
        loop {
            {
                let mut state = self.state.lock().expect("outbox lock");
                if !state.buf.is_empty() {
                    std::mem::swap(&mut state.buf, out);
                    self.full.store(false, Ordering::Release);
                    drop(state);
                    self.room.notify_waiters();
                    return true;
                }
                if state.closed {
                    return false;
                }
            }
            // `notify_one` keeps a permit if we are not waiting yet.
            self.ready.notified().await;
            // Let tasks woken by the last read add their frames first, so
            // one write carries them all.
            tokio::task::yield_now().await;
        }
    }

    /// Refuses further frames; the writer drains what is buffered and stops.
    pub(crate) fn close(&self) {
        self.state.lock().expect("outbox lock").closed = true;
        self.ready.notify_one();
        self.room.notify_waiters();
    }
}

/// Writes all of `bytes`, failing if the socket takes nothing for `stall`
/// (a peer that stopped reading).
async fn write_making_progress(wr: &mut WriteHalf, mut bytes: &[u8], stall: Duration) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match tokio::time::timeout(stall, wr.write(bytes)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => bytes = &bytes[n..],
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(stalled(stall)),
        }
    }
    // TLS holds what it took until flushed (plain TCP: nothing to do).
    tokio::time::timeout(stall, wr.flush())
        .await
        .map_err(|_| stalled(stall))?
}

fn stalled(stall: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the peer took no answer bytes for {stall:?}"),
    )
}

/// A provider connection's writer: writes what the outbox holds until it
/// closes or `force`; on a failed write, or one that made no progress for
/// `stall`, closes the outbox (handlers waiting for room give up) and
/// drops the connection.
pub(crate) async fn write_loop(
    mut wr: WriteHalf,
    outbox: Arc<Outbox>,
    force: CancellationToken,
    peer: SocketAddr,
    stall: Duration,
) {
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let more = tokio::select! {
            _ = force.cancelled() => break,
            more = outbox.take(&mut out) => more,
        };
        if !more {
            break;
        }
        let written = tokio::select! {
            _ = force.cancelled() => break,
            written = write_making_progress(&mut wr, &out, stall) => written,
        };
        if let Err(e) = written {
            debug!(%peer, error = %e, "write failed; dropping connection");
            outbox.close();
            break;
        }
        out.clear();
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use std::sync::Arc;

    #[tokio::test]
    async fn frames_pushed_before_a_take_come_out_together_in_order() {
        let outbox = Outbox::new(1024);
        outbox.push(|b| b.put_slice(b"one ")).await.unwrap();
        outbox.push(|b| b.put_slice(b"two")).await.unwrap();
        let mut out = BytesMut::new();
        assert!(outbox.take(&mut out).await);
        assert_eq!(&out[..], b"one two");
    }

    #[tokio::test]
    async fn full_outbox_makes_pushers_wait_for_the_writer() {
        let outbox = Arc::new(Outbox::new(4));
        outbox.push(|b| b.put_slice(b"12345")).await.unwrap();
        let pusher = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(|b| b.put_slice(b"6")).await }
        });
        tokio::task::yield_now().await;
        assert!(
            !pusher.is_finished(),
            "pusher waits while the buffer is over high water"
        );
        let mut out = BytesMut::new();
        assert!(outbox.take(&mut out).await);
        assert_eq!(&out[..], b"12345");
        pusher.await.unwrap().unwrap();
        out.clear();
        assert!(outbox.take(&mut out).await);
        assert_eq!(&out[..], b"6");
    }

    #[tokio::test]
    async fn close_drains_then_ends_and_refuses_pushes() {
        let outbox = Outbox::new(64);
        outbox.push(|b| b.put_slice(b"last")).await.unwrap();
        outbox.close();
        assert_eq!(outbox.push(|b| b.put_slice(b"x")).await, Err(Closed));
        let mut out = BytesMut::new();
        assert!(outbox.take(&mut out).await);
        out.clear();
        assert!(!outbox.take(&mut out).await);
    }

    #[tokio::test]
    async fn a_write_the_peer_takes_nothing_of_for_the_stall_limit_closes_the_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, from) = listener.accept().await.unwrap();
        let (_read, write) = crate::net::Stream::from(ours).into_split();
        let outbox = Arc::new(Outbox::new(64 * 1024 * 1024));
        // More than the socket buffers of both ends hold; the peer never reads.
        outbox.push(|b| b.put_bytes(0, 32 * 1024 * 1024)).await.unwrap();
        let stall = std::time::Duration::from_millis(200);
        let writer = tokio::spawn(write_loop(write, outbox.clone(), CancellationToken::new(), from, stall));
        tokio::time::timeout(std::time::Duration::from_secs(10), writer)
            .await
            .expect("the writer gives up once nothing moves for the stall limit")
            .unwrap();
        assert_eq!(
            outbox.push(|b| b.put_slice(b"x")).await,
            Err(Closed),
            "the outbox is closed: handlers waiting for room give up"
        );
        drop(peer);
    }
}
