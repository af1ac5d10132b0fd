//! The native transport of a node's stream: length-prefixed frames over
//! TCP (the SDKs' default; see [`rpc_core::registry::framing`]).
//!
//! A natively framed session costs one task, a read buffer that starts at
//! a few hundred bytes, and a [`SessionOutbox`] whose buffer is empty while
//! the socket keeps up. The connection comes from the registry port
//! ([`crate::port`]), which told it apart by its first byte.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;

use rpc_core::net::Stream;
use rpc_core::registry::framing;
use tern_proto::registry::NodeMessage;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

use crate::node_session::RegistryService;
use crate::peer::Cluster;
use crate::session_outbox::SessionOutbox;

/// Read buffer a native session starts with; it grows for larger frames.
const READ_BUFFER: usize = 256;

/// Serves one natively framed session: checks the preface, then runs the
/// session over the frames while its outbox is written as the socket
/// drains.
pub(crate) async fn serve(
    service: &RegistryService,
    peers: Option<&Arc<Cluster>>,
    socket: Stream,
    peer: SocketAddr,
    max_message_bytes: usize,
) {
    let timeout = service.heartbeats().timeout;
    let verified_app = socket.peer_app().cloned();
    let (mut read, write) = socket.into_split();
    let mut preface = [0u8; framing::PREFACE.len()];
    match tokio::time::timeout(timeout, read.read_exact(&mut preface)).await {
        Ok(Ok(_)) if preface == framing::PREFACE => {}
        // Another ConfigServer of the cluster (any version: a peer of
        // another is told so). Boxed: its state would otherwise be part of
        // every node session's task.
        Ok(Ok(_)) if preface[..3] == crate::peer::PREFACE[..3] => {
            let link = crate::peer::inbound::serve(peers, read, write, peer, timeout);
            return Box::pin(link).await;
        }
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
    let outbox = Arc::new(SessionOutbox::new(write));
    let session = service.run(inbound, outbox.clone(), Some(peer), verified_app);
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
