//! What a session sends a node: messages encoded as they are written, and
//! deltas encoded once, when their change was flushed, for every subscriber.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use prost::Message;
use rpc_core::registry::framing;
use tern_proto::registry::ServerMessage;

/// One flushed change of a service, encoded as the `ServerMessage` that
/// carries it.
#[derive(Debug, PartialEq, Eq)]
pub struct PushedDelta {
    pub from_revision: u64,
    pub to_revision: u64,
    /// Instances added, removed or updated.
    pub entries: usize,
    pub encoded: Bytes,
}

/// A session's transport that can take a flushed delta at once, from the
/// flusher's task, without waking the session's (see `session_outbox.rs`).
pub trait Deliver: Send + Sync + std::fmt::Debug {
    /// Takes `delta` for the node: written now, or queued behind bytes
    /// already waiting. `false`: not now (full or closed); the session's
    /// task must send it.
    fn deliver(&self, delta: &PushedDelta) -> bool;
}

/// A message on its way to a node.
#[derive(Debug)]
pub enum Outgoing {
    /// Encoded when it is written. Boxed: the queue towards each node holds
    /// 32 slots from its start, and they stay pointer-sized.
    Message(Box<ServerMessage>),
    /// Encoded already, shared by every subscriber it goes to.
    Delta(Arc<PushedDelta>),
}

impl Outgoing {
    /// Bytes of the encoded message (before the transport's framing).
    pub fn len(&self) -> usize {
        match self {
            Outgoing::Message(message) => message.encoded_len(),
            Outgoing::Delta(delta) => delta.encoded.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message as the node will decode it.
    ///
    /// # Panics
    ///
    /// Never for a delta this server encoded.
    pub fn to_message(&self) -> ServerMessage {
        match self {
            Outgoing::Message(message) => (**message).clone(),
            Outgoing::Delta(delta) => ServerMessage::decode(delta.encoded.clone()).expect("a delta we encoded"),
        }
    }

    /// Appends this as one frame of the native framing.
    pub fn put_frame(&self, dst: &mut BytesMut) {
        match self {
            Outgoing::Message(message) => framing::put_frame(dst, &**message),
            Outgoing::Delta(delta) => framing::put_encoded_frame(dst, &delta.encoded),
        }
    }
}

impl From<ServerMessage> for Outgoing {
    fn from(message: ServerMessage) -> Outgoing {
        Outgoing::Message(Box::new(message))
    }
}
