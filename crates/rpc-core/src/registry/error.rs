//! What can go wrong in a registry session: a request's error, for callers,
//! and why a stream could not be opened or ended, for the session's task.

use std::time::Duration;

/// A request refused by the ConfigServer (the message names the bad value),
/// or not answered in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("configserver refused ({kind}): {message}")]
    Refused { kind: String, message: String },
    #[error("configserver did not answer within {0:?}")]
    Timeout(Duration),
    #[error("registry session stopped")]
    Stopped,
}

/// Why a stream to a ConfigServer could not be opened, or why it ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    /// Nothing answered at the address.
    #[error("connect: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("connect: no answer within {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed: a certificate not trusted, or none.
    #[error("TLS handshake: {0}")]
    Tls(String),
    #[cfg(feature = "grpc")]
    #[error("bad configserver address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    /// The server turned this node away (a bad credential): retrying
    /// cannot fix it.
    #[error("refused: {message} ({kind})")]
    Refused { kind: String, message: String },
    #[cfg(feature = "grpc")]
    #[error("no answer to the session request: {0}")]
    SessionRequest(String),
    #[error("no Welcome within {0:?}")]
    NoWelcome(Duration),
    #[error("closed before Welcome")]
    ClosedBeforeWelcome,
    #[error("expected Welcome, got {0}")]
    NotWelcome(String),
    /// A read failed or a frame did not decode.
    #[error("stream error: {0}")]
    Broken(String),
    #[error("closed by configserver")]
    Closed,
    #[error("configserver silent for {0:?}")]
    Silent(Duration),
    /// The writer is gone: the socket's write side failed.
    #[error("stream closed")]
    WriteClosed,
    #[error("session handle dropped")]
    HandleDropped,
}

impl StreamError {
    /// Whether no server was reached at all (said quietly: expected while
    /// a ConfigServer restarts).
    pub(super) fn is_unreachable(&self) -> bool {
        matches!(self, StreamError::Connect(_) | StreamError::ConnectTimeout(_))
    }
}
