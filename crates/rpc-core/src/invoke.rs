//! The seam between generated client stubs and whatever carries the call.
//!
//! A generated client (`GreeterClient<I>`) encodes the request message and
//! hands an [`Invoker`] the method name and payload; the invoker picks a
//! provider, applies the deadline, retries, and returns the reply payload.
//! consumer-sdk's `Reference` is the usual invoker.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::Error;

/// Per-call settings that override the invoker's defaults.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Deadline for this call; `None` uses the reference's timeout.
    pub timeout: Option<Duration>,
    /// Key/value pairs sent with the call.
    pub attachments: HashMap<String, String>,
}

impl CallOptions {
    pub fn timeout(mut self, timeout: Duration) -> CallOptions {
        self.timeout = Some(timeout);
        self
    }

    pub fn attachment(mut self, key: impl Into<String>, value: impl Into<String>) -> CallOptions {
        self.attachments.insert(key.into(), value.into());
        self
    }
}

/// Carries one encoded call to a provider and brings back the reply payload.
pub trait Invoker: Send + Sync {
    fn invoke(
        &self,
        method: &'static str,
        payload: Bytes,
        options: &CallOptions,
    ) -> impl Future<Output = Result<Bytes, Error>> + Send;
}

/// Implemented by generated clients: lets an SDK build a typed client for a
/// service from an invoker, knowing the service's interface name.
pub trait Stub {
    type Invoker;
    /// Fully qualified interface name from the .proto file, e.g. `demo.Greeter`.
    const INTERFACE: &'static str;
    fn from_invoker(invoker: Self::Invoker) -> Self;
}
