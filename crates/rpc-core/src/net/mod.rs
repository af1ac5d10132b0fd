//! A connection's byte stream, plain TCP or TLS over it, and its two
//! halves.
//!
//! Every port (a provider's data plane, the registry, the ConfigServer's
//! peers and admin API) runs over a [`Stream`]. Plain TCP splits into
//! tokio's owned halves, as before TLS existed: the hot path pays one
//! `match`. A TLS stream's halves share it behind a lock held only for a
//! poll; its writes are buffered by rustls, so a writer flushes after
//! writing (a no-op on plain TCP).
//!
//! - [`tls`]: certificates and keys from files, the server and client
//!   configurations, and the app a client certificate names.

pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub use tls::{ClientTls, ServerTls, ServerTlsFiles, TlsError};

type Tls = tokio_rustls::TlsStream<TcpStream>;

/// One connection: plain TCP, or TLS over TCP with what the handshake
/// verified about the peer.
#[derive(Debug)]
pub struct Stream {
    kind: Kind,
    /// A byte read ahead by [`Stream::peek_byte`] on a TLS stream (plain
    /// TCP peeks without taking it).
    first: Option<u8>,
    /// The app the peer's verified certificate names.
    peer_app: Option<Arc<str>>,
}

#[derive(Debug)]
enum Kind {
    Plain(TcpStream),
    Tls(Box<Tls>),
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Stream {
        Stream {
            kind: Kind::Plain(tcp),
            first: None,
            peer_app: None,
        }
    }
}

impl Stream {
    fn tls(stream: Tls, peer_app: Option<Arc<str>>) -> Stream {
        Stream {
            kind: Kind::Tls(Box::new(stream)),
            first: None,
            peer_app,
        }
    }

    /// Whether this stream is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.kind, Kind::Tls(_))
    }

    /// The app named by the certificate the peer presented and the server
    /// verified (mTLS); `None` on plain TCP or without a client certificate.
    pub fn peer_app(&self) -> Option<&Arc<str>> {
        self.peer_app.as_ref()
    }

    fn tcp(&self) -> &TcpStream {
        match &self.kind {
            Kind::Plain(tcp) => tcp,
            Kind::Tls(tls) => tls.get_ref().0,
        }
    }

    /// The peer's address.
    ///
    /// # Errors
    ///
    /// The socket's error.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    /// This end's address.
    ///
    /// # Errors
    ///
    /// The socket's error.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    /// The first byte the peer sends, left in the stream to be read again;
    /// `None` if the peer closed before sending one.
    ///
    /// # Errors
    ///
    /// The read failed.
    pub async fn peek_byte(&mut self) -> io::Result<Option<u8>> {
        if let Some(byte) = self.first {
            return Ok(Some(byte));
        }
        let mut one = [0u8; 1];
        let n = match &mut self.kind {
            Kind::Plain(tcp) => tcp.peek(&mut one).await?,
            Kind::Tls(tls) => {
                let n = tls.read(&mut one).await?;
                if n == 1 {
                    self.first = Some(one[0]);
                }
                n
            }
        };
        Ok((n == 1).then_some(one[0]))
    }

    /// The read and write halves, each usable from its own task.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self.kind {
            Kind::Plain(tcp) => {
                let (read, write) = tcp.into_split();
                (ReadHalf(ReadKind::Plain(read)), WriteHalf(WriteKind::Plain(write)))
            }
            Kind::Tls(tls) => {
                let shared = Arc::new(Mutex::new(tls));
                (
                    ReadHalf(ReadKind::Tls {
                        first: self.first,
                        shared: shared.clone(),
                    }),
                    WriteHalf(WriteKind::Tls(shared)),
                )
            }
        }
    }
}

fn lock(shared: &Mutex<Box<Tls>>) -> MutexGuard<'_, Box<Tls>> {
    // A poll that panicked leaves a stream that is only read or written.
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Hands out the byte read ahead, if any; whether it did.
fn take_first(first: &mut Option<u8>, buf: &mut ReadBuf<'_>) -> bool {
    match first.take() {
        Some(byte) if buf.remaining() > 0 => {
            buf.put_slice(&[byte]);
            true
        }
        other => {
            *first = other;
            false
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if take_first(&mut this.first, buf) {
            return Poll::Ready(Ok(()));
        }
        match &mut this.kind {
            Kind::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Kind::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.kind {
            Kind::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Kind::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.kind {
            Kind::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Kind::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.kind {
            Kind::Plain(tcp) => tcp.is_write_vectored(),
            Kind::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.kind {
            Kind::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Kind::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.kind {
            Kind::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Kind::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The read half of a [`Stream`].
#[derive(Debug)]
pub struct ReadHalf(ReadKind);

#[derive(Debug)]
enum ReadKind {
    Plain(OwnedReadHalf),
    Tls {
        first: Option<u8>,
        shared: Arc<Mutex<Box<Tls>>>,
    },
}

impl AsyncRead for ReadHalf {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            ReadKind::Plain(read) => Pin::new(read).poll_read(cx, buf),
            ReadKind::Tls { first, shared } => {
                if take_first(first, buf) {
                    return Poll::Ready(Ok(()));
                }
                Pin::new(lock(shared).as_mut()).poll_read(cx, buf)
            }
        }
    }
}

/// The write half of a [`Stream`]. Besides `AsyncWrite` (flush after
/// writing: TLS buffers), it can be written without a task of its own
/// ([`WriteHalf::try_write`], [`WriteHalf::writable`]), as a ConfigServer
/// writes a push into many sessions from one task.
#[derive(Debug)]
pub struct WriteHalf(WriteKind);

#[derive(Debug)]
enum WriteKind {
    Plain(OwnedWriteHalf),
    Tls(Arc<Mutex<Box<Tls>>>),
}

impl WriteHalf {
    /// Writes what the socket takes now, without waiting: `WouldBlock` if
    /// nothing. On TLS, bytes taken may still wait in the TLS buffer (see
    /// [`WriteHalf::has_unsent`]).
    ///
    /// # Errors
    ///
    /// `WouldBlock`, or the socket's error.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            WriteKind::Plain(write) => write.try_write(buf),
            WriteKind::Tls(shared) => {
                let mut tls = lock(shared);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                // Older bytes go first; new ones wait until they are out.
                match Pin::new(tls.as_mut()).poll_flush(&mut cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => return Err(io::ErrorKind::WouldBlock.into()),
                }
                let n = match Pin::new(tls.as_mut()).poll_write(&mut cx, buf) {
                    Poll::Ready(written) => written?,
                    Poll::Pending => return Err(io::ErrorKind::WouldBlock.into()),
                };
                if let Poll::Ready(Err(e)) = Pin::new(tls.as_mut()).poll_flush(&mut cx) {
                    return Err(e);
                }
                Ok(n)
            }
        }
    }

    /// Whether bytes taken by [`WriteHalf::try_write`] still wait to be
    /// sent (TLS only): the writer waits on [`WriteHalf::writable`] then.
    pub fn has_unsent(&self) -> bool {
        match &self.0 {
            WriteKind::Plain(_) => false,
            WriteKind::Tls(shared) => lock(shared).get_ref().1.wants_write(),
        }
    }

    /// Waits until the socket takes bytes (on TLS: until what waited in the
    /// TLS buffer is sent).
    ///
    /// # Errors
    ///
    /// The socket's error.
    pub async fn writable(&self) -> io::Result<()> {
        match &self.0 {
            WriteKind::Plain(write) => write.writable().await,
            WriteKind::Tls(shared) => std::future::poll_fn(|cx| Pin::new(lock(shared).as_mut()).poll_flush(cx)).await,
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.0 {
            WriteKind::Plain(write) => Pin::new(write).poll_write(cx, buf),
            WriteKind::Tls(shared) => Pin::new(lock(shared).as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.0 {
            WriteKind::Plain(write) => Pin::new(write).poll_write_vectored(cx, bufs),
            WriteKind::Tls(shared) => Pin::new(lock(shared).as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            WriteKind::Plain(write) => write.is_write_vectored(),
            WriteKind::Tls(_) => true,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            WriteKind::Plain(write) => Pin::new(write).poll_flush(cx),
            WriteKind::Tls(shared) => Pin::new(lock(shared).as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            WriteKind::Plain(write) => Pin::new(write).poll_shutdown(cx),
            WriteKind::Tls(shared) => Pin::new(lock(shared).as_mut()).poll_shutdown(cx),
        }
    }
}
