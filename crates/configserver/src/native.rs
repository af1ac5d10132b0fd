//! The registry port: one listener for both transports of a node's stream.
//!
//! Each accepted connection is told apart by its first byte: the native
//! framing's preface (see [`rpc_core::registry::framing`]) is served here,
//! anything else (HTTP/2's preface starts with `P`) is handed to the gRPC
//! server. A natively framed session costs one task, a read buffer that
//! starts at a few hundred bytes, and an outbox (`outbox.rs`) whose buffer
//! is empty while the socket keeps up.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use rpc_core::registry::framing;
use tern_proto::registry::NodeMessage;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::outbox::Outbox;
use crate::session::{RegistryService, Tx};

/// Connections accepted but not yet taken by the gRPC server; at the bound
/// the accept loop's sorting tasks wait.
pub const GRPC_HANDOFF: usize = 128;

/// Read buffer a native session starts with; it grows for larger frames.
const READ_BUFFER: usize = 256;

/// Accepts connections on the registry port until `shutdown`, serving
/// native sessions and passing the rest to `grpc`. Every connection's task
/// is in `tracker`.
pub async fn accept(
    listener: TcpListener,
    service: RegistryService,
    max_message_bytes: usize,
    grpc: mpsc::Sender<std::io::Result<TcpStream>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: pause instead of spinning.
                    warn!(error = %e, "registry port: accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let (service, grpc, shutdown) = (service.clone(), grpc.clone(), shutdown.clone());
        tracker.spawn(async move {
            let mut first = [0u8; 1];
            let timeout = service.heartbeats().timeout;
            let peeked = tokio::select! {
                _ = shutdown.cancelled() => return,
                peeked = tokio::time::timeout(timeout, socket.peek(&mut first)) => peeked,
            };
            match peeked {
                Ok(Ok(1)) if first[0] == framing::PREFACE[0] => {
                    service.native_session(socket, peer, max_message_bytes).await;
                }
                Ok(Ok(1)) => {
                    let _ = grpc.send(Ok(socket)).await;
                }
                Ok(Ok(_)) => debug!(%peer, "registry port: closed before sending anything"),
                Ok(Err(e)) => debug!(%peer, error = %e, "registry port: read failed"),
                Err(_) => debug!(%peer, ?timeout, "registry port: nothing sent; closing"),
            }
        });
    }
}

/// Serves one natively framed session: checks the preface, then runs the
/// session over the frames while its outbox is written as the socket
/// drains.
pub(crate) async fn serve(service: &RegistryService, socket: TcpStream, peer: SocketAddr, max_message_bytes: usize) {
    let timeout = service.heartbeats().timeout;
    let (mut read, write) = socket.into_split();
    let mut preface = [0u8; framing::PREFACE.len()];
    match tokio::time::timeout(timeout, read.read_exact(&mut preface)).await {
        Ok(Ok(_)) if preface == framing::PREFACE => {}
        Ok(Ok(_)) => {
            warn!(%peer, preface = ?preface, expected = ?framing::PREFACE, "refusing connection: unknown control preface (unsupported version?)");
            return;
        }
        Ok(Err(e)) => return debug!(%peer, error = %e, "closed inside the preface"),
        Err(_) => return debug!(%peer, ?timeout, "no preface; closing"),
    }
    let inbound = pin!(framing::read_messages(
        read,
        max_message_bytes,
        READ_BUFFER,
        "NodeMessage",
        <NodeMessage as prost::Message>::decode
    ));
    let outbox = Arc::new(Outbox::new(write));
    let session = service.run(inbound, Tx::Native(outbox.clone()), Some(peer));
    let drain = outbox.drain();
    tokio::pin!(session, drain);
    let mut drained = false;
    loop {
        tokio::select! {
            _ = &mut session => break,
            // The socket failed: the session's next send fails and it ends.
            _ = &mut drain, if !drained => drained = true,
        }
    }
    // What the session sent last (an Error naming why it ended) goes out
    // if the node still reads.
    let _ = tokio::time::timeout(timeout, outbox.finish()).await;
    outbox.close();
}
