//! Errors: the status codes carried on the wire and the error type callers see.
//!
//! A provider answers a failed call with a [`Code`] in the frame header and a
//! message in the body. Handlers produce that pair as a [`Status`]; callers
//! receive it, or a local failure (connect, timeout, lost connection), as an
//! [`Error`]. The cluster layer asks [`Error::is_retryable`] whether another
//! provider may be tried.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Status code in the header of a Response frame (byte 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    ServiceNotFound = 1,
    MethodNotFound = 2,
    BadRequest = 3,
    Timeout = 4,
    Busy = 5,
    Forbidden = 6,
    Unauthenticated = 7,
    RateLimited = 8,
    ProviderError = 9,
    Internal = 10,
}

impl Code {
    /// Decodes a status byte; `None` for a value this version does not know.
    pub fn from_u8(value: u8) -> Option<Code> {
        Some(match value {
            0 => Code::Ok,
            1 => Code::ServiceNotFound,
            2 => Code::MethodNotFound,
            3 => Code::BadRequest,
            4 => Code::Timeout,
            5 => Code::Busy,
            6 => Code::Forbidden,
            7 => Code::Unauthenticated,
            8 => Code::RateLimited,
            9 => Code::ProviderError,
            10 => Code::Internal,
            _ => return None,
        })
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A failed call as a provider reports it: a code and a message.
///
/// Service handlers return `Err(Status)`; the framework sends it to the
/// caller, who sees it as the matching [`Error`] variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    code: Code,
    message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    /// The handler failed for a reason of its own (the usual choice).
    pub fn provider(message: impl Into<String>) -> Status {
        Status::new(Code::ProviderError, message)
    }

    /// The request was well-formed on the wire but its content is invalid.
    pub fn bad_request(message: impl Into<String>) -> Status {
        Status::new(Code::BadRequest, message)
    }

    pub fn busy(message: impl Into<String>) -> Status {
        Status::new(Code::Busy, message)
    }

    pub fn internal(message: impl Into<String>) -> Status {
        Status::new(Code::Internal, message)
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Status {}

/// Everything that can go wrong with a call, as the caller sees it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // === Reported by the provider ===
    #[error("service not found: {0}")]
    ServiceNotFound(String),
    #[error("method not found: {0}")]
    MethodNotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("provider busy: {0}")]
    Busy(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("rate limited: {0}")]
    RateLimited(String),
    #[error("provider error: {0}")]
    Provider(String),
    #[error("internal error: {0}")]
    Internal(String),

    // === Local ===
    /// The deadline passed before an answer arrived (locally or at the provider).
    #[error("call timed out after {0:?}")]
    Timeout(Duration),
    /// No connection could be made to the provider.
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The connection closed while the call was pending.
    #[error("connection to {addr} closed: {reason}")]
    ConnectionClosed { addr: SocketAddr, reason: String },
    /// Too many calls are already in flight on the connection.
    #[error("{in_flight} calls in flight to {addr}, the limit")]
    TooManyInFlight { addr: SocketAddr, in_flight: usize },
    /// No provider is known for the service.
    #[error("no provider for {0}")]
    NoProvider(String),
    /// The peer sent bytes that are not a valid frame or message.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether trying the call again (on another provider) may succeed and is
    /// safe: the request was not executed, or the provider refused it up front.
    ///
    /// A [`Error::Timeout`] is not retryable here: the provider may still run
    /// the call. The cluster layer retries timeouts only for methods marked
    /// idempotent.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Busy(_)
                | Error::RateLimited(_)
                | Error::Connect { .. }
                | Error::ConnectionClosed { .. }
                | Error::TooManyInFlight { .. }
        )
    }

    /// The wire status code matching this error.
    pub fn code(&self) -> Code {
        match self {
            Error::ServiceNotFound(_) => Code::ServiceNotFound,
            Error::MethodNotFound(_) => Code::MethodNotFound,
            Error::BadRequest(_) => Code::BadRequest,
            Error::Busy(_) | Error::TooManyInFlight { .. } => Code::Busy,
            Error::Forbidden(_) => Code::Forbidden,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::RateLimited(_) => Code::RateLimited,
            Error::Provider(_) => Code::ProviderError,
            Error::Timeout(_) => Code::Timeout,
            Error::Internal(_)
            | Error::Connect { .. }
            | Error::ConnectionClosed { .. }
            | Error::NoProvider(_)
            | Error::Protocol(_) => Code::Internal,
        }
    }

    /// Builds the error for a non-Ok status received from a provider.
    /// `timeout` is the call's own deadline, reported for [`Code::Timeout`].
    pub(crate) fn from_wire(status: u8, message: String, timeout: Duration) -> Error {
        match Code::from_u8(status) {
            Some(code) => Status::new(code, message).into_error(timeout),
            None => Error::Internal(format!("unknown status code {status}: {message}")),
        }
    }
}

impl Status {
    fn into_error(self, timeout: Duration) -> Error {
        let m = self.message;
        match self.code {
            Code::ServiceNotFound => Error::ServiceNotFound(m),
            Code::MethodNotFound => Error::MethodNotFound(m),
            Code::BadRequest => Error::BadRequest(m),
            Code::Timeout => Error::Timeout(timeout),
            Code::Busy => Error::Busy(m),
            Code::Forbidden => Error::Forbidden(m),
            Code::Unauthenticated => Error::Unauthenticated(m),
            Code::RateLimited => Error::RateLimited(m),
            Code::ProviderError => Error::Provider(m),
            Code::Ok | Code::Internal => Error::Internal(m),
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        status.into_error(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_byte() {
        for byte in 0..=255u8 {
            if let Some(code) = Code::from_u8(byte) {
                assert_eq!(code as u8, byte);
            }
        }
        assert_eq!(Code::from_u8(11), None);
    }

    #[test]
    fn refusals_are_retryable_and_executions_are_not() {
        let retryable = |code| Error::from(Status::new(code, "x")).is_retryable();
        assert!(retryable(Code::Busy));
        assert!(retryable(Code::RateLimited));
        assert!(!retryable(Code::ProviderError));
        assert!(!retryable(Code::Timeout));
        assert!(!retryable(Code::Forbidden));
    }

    #[test]
    fn wire_status_maps_to_matching_variant() {
        let err = Error::from_wire(2, "demo.Echo/Nope".into(), Duration::from_secs(1));
        assert!(matches!(err, Error::MethodNotFound(ref m) if m == "demo.Echo/Nope"));
        assert_eq!(err.code(), Code::MethodNotFound);
        let unknown = Error::from_wire(200, "?".into(), Duration::ZERO);
        assert!(unknown.to_string().contains("unknown status code 200"));
    }
}
