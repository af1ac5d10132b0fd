//! How a node's request is answered: an `Ack`, or an `Error` whose kind
//! says why it was refused ([`RequestError`]).

use tern_proto::registry::{self as pb, ServerMessage, server_message};

/// A refused request. The message names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Duplicate(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
}

impl RequestError {
    /// The `Error.kind` sent to the node.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::Invalid(_) => "invalid",
            RequestError::Duplicate(_) => "duplicate",
            RequestError::TooLarge(_) => "too_large",
            RequestError::NotFound(_) => "not_found",
            RequestError::Forbidden(_) => "forbidden",
        }
    }
}

/// The request-level answers sent to a node.
pub fn ack(request_id: u64) -> ServerMessage {
    ServerMessage {
        request_id,
        body: Some(server_message::Body::Ack(pb::Ack {})),
    }
}

pub fn error(request_id: u64, kind: &str, message: String) -> ServerMessage {
    ServerMessage {
        request_id,
        body: Some(server_message::Body::Error(pb::Error {
            kind: kind.to_owned(),
            message,
        })),
    }
}
