//! The admin port's listener under TLS: handshakes run beside the accept
//! loop (a client that stalls in its handshake holds only its own), at
//! most [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`].

use std::net::SocketAddr;
use std::time::Duration;

use rpc_core::net::{ServerTls, Stream};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// Handshakes under way at once; past it, accepting waits.
pub const MAX_HANDSHAKES: usize = 64;

/// Longest a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP listener whose connections come out with TLS done.
#[derive(Debug)]
pub struct TlsListener {
    tcp: TcpListener,
    tls: ServerTls,
    handshakes: JoinSet<Option<(Stream, SocketAddr)>>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, tls: ServerTls) -> TlsListener {
        TlsListener {
            tcp,
            tls,
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Stream, SocketAddr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_HANDSHAKES => match accepted {
                    Ok((tcp, from)) => {
                        let _ = tcp.set_nodelay(true);
                        let tls = self.tls.clone();
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                                Ok(Ok(stream)) => Some((stream, from)),
                                Ok(Err(e)) => {
                                    debug!(%from, error = %e, "admin port: TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    debug!(%from, "admin port: TLS handshake unfinished; closing");
                                    None
                                }
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors, usually: pause instead of spinning.
                        warn!(error = %e, "admin port: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}
