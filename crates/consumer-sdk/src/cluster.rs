//! What a reference does when a call fails ([`Cluster`]), per-method
//! settings, and Failback's bounded queue of calls retried in the
//! background.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::Reference;
use crate::reference::{Call, ReferenceInner};

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

/// A call failback will retry.
#[derive(Debug)]
pub(crate) struct FailedCall {
    pub(crate) method: &'static str,
    pub(crate) payload: Bytes,
    pub(crate) attachments: HashMap<String, String>,
}

/// Failback's bounded queue and the task that retries it, owned by the
/// reference (the task holds only a weak reference back).
#[derive(Debug)]
pub(crate) struct FailbackQueue {
    pub(crate) tx: mpsc::Sender<FailedCall>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

/// Failed calls kept for retry at most.
const FAILBACK_QUEUE: usize = 1024;
/// Background tries per failed call.
const FAILBACK_TRIES: u32 = 3;

impl FailbackQueue {
    pub(crate) fn start(reference: Weak<ReferenceInner>) -> FailbackQueue {
        let (tx, mut rx) = mpsc::channel::<FailedCall>(FAILBACK_QUEUE);
        let task = tokio::spawn(async move {
            while let Some(failed) = rx.recv().await {
                for attempt in 1..=FAILBACK_TRIES {
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                    let Some(inner) = reference.upgrade() else { return };
                    let reference = Reference { inner };
                    let policy = reference.inner.directory.policy();
                    let members = reference.inner.directory.route(failed.method, &policy);
                    let call = Call {
                        method: failed.method,
                        payload: &failed.payload,
                        attachments: &failed.attachments,
                        policy,
                        timeout: reference.inner.timeout,
                        deadline: Instant::now() + reference.inner.timeout,
                    };
                    if members.is_empty() {
                        continue;
                    }
                    match reference.failover(&members, &call, reference.inner.retries).await {
                        Ok(_) => {
                            debug!(service = %reference.inner.key, method = failed.method, attempt, "failback retry succeeded");
                            break;
                        }
                        Err(e) if attempt == FAILBACK_TRIES => {
                            warn!(service = %reference.inner.key, method = failed.method, error = %e, "failback gave up")
                        }
                        Err(_) => {}
                    }
                }
            }
        });
        FailbackQueue {
            tx,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }
}
