//! What a reference does when a call fails ([`Cluster`]), and per-method
//! settings ([`MethodConfig`]).

use std::time::Duration;

/// What a reference does when a call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Cluster {
    /// Try other providers, up to `retries`, for retryable errors (default).
    #[default]
    Failover,
    /// One try; the error goes straight to the caller.
    Failfast,
    /// One try; on error, log it and answer with an empty (default) reply.
    Failsafe,
    /// One try; on error, answer with an empty reply and retry the call in
    /// the background (bounded queue; when full, the error is returned).
    Failback,
    /// `parallel` providers at once; the first success wins.
    Forking { parallel: usize },
    /// Every provider; an error if any fails.
    Broadcast,
}

/// Settings for one method, overriding the reference's.
#[derive(Debug, Clone, Copy, Default)]
pub struct MethodConfig {
    pub timeout: Option<Duration>,
    pub retries: Option<usize>,
    pub cluster: Option<Cluster>,
}
