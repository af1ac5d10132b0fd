//! [`Reference`]: the invoker behind a typed client. Each call takes the
//! members its routes allow, picks one with the balancer, and on failure
//! does what the reference's [`Cluster`] mode says: try another provider
//! (within the deadline and the retry budget), fail, answer empty, queue
//! the call for a retry in the background (Failback's bounded queue, at the
//! end of this file), fork, or broadcast.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rpc_core::balance::{Candidate, LoadBalance, PickContext};
use rpc_core::frame::RequestHead;
use rpc_core::governance::{ATTACH_APP, ATTACH_TOKEN, ConsumerPolicy};
use rpc_core::{CallOptions, Error, Invoker, RetryBudget, ServiceKey};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::directory::{Directory, Member};
use crate::{Cluster, MethodConfig};

/// The invoker behind a typed client: provider choice, deadline, retries.
#[derive(Debug, Clone)]
pub struct Reference {
    pub(crate) inner: Arc<ReferenceInner>,
}

#[derive(Debug)]
pub(crate) struct ReferenceInner {
    pub(crate) key: ServiceKey,
    /// This consumer's app name, sent with every call.
    pub(crate) app: String,
    pub(crate) timeout: Duration,
    pub(crate) retries: usize,
    pub(crate) directory: Directory,
    pub(crate) balancer: Box<dyn LoadBalance>,
    pub(crate) warmup: Duration,
    pub(crate) hash_attachment: Option<String>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) idempotent: HashSet<String>,
    pub(crate) retry_budget: Option<Arc<RetryBudget>>,
    pub(crate) cluster: Cluster,
    pub(crate) methods: HashMap<String, MethodConfig>,
    pub(crate) failback: OnceLock<FailbackQueue>,
    pub(crate) circuit_breaker: Option<u32>,
}

impl Reference {
    /// Revision of the governance rules this reference applies (0: none yet).
    pub fn rules_revision(&self) -> u64 {
        self.inner.directory.policy().revision
    }

    pub fn service(&self) -> &ServiceKey {
        &self.inner.key
    }

    /// Provider addresses the reference currently calls.
    pub fn providers(&self) -> Vec<SocketAddr> {
        self.inner
            .directory
            .members()
            .iter()
            .map(|m| m.endpoint.addr())
            .collect()
    }

    /// Calls waiting for an answer, over all providers of this reference.
    pub fn in_flight(&self) -> usize {
        self.inner
            .directory
            .members()
            .iter()
            .map(|m| m.endpoint.in_flight())
            .sum()
    }

    /// Waits until the provider list satisfies `ready` (e.g. non-empty), at
    /// most `timeout`; returns whether it did.
    pub async fn wait_for_providers(&self, timeout: Duration, ready: impl Fn(&[SocketAddr]) -> bool) -> bool {
        self.wait_until(timeout, |r| ready(&r.providers())).await
    }

    /// Waits until this reference applies governance rules of at least
    /// `revision` (pushed, compiled and in use for the next call); false
    /// if `timeout` passes first.
    pub async fn wait_for_rules(&self, revision: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |r| r.rules_revision() >= revision).await
    }

    /// Waits, re-checking after every directory change, until `ready`.
    async fn wait_until(&self, timeout: Duration, ready: impl Fn(&Reference) -> bool) -> bool {
        let mut changes = self.inner.directory.changes();
        let wait = async {
            loop {
                if ready(self) {
                    return;
                }
                if changes.changed().await.is_err() {
                    // A fixed list never changes.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl Invoker for Reference {
    async fn invoke(&self, method: &'static str, payload: Bytes, options: &CallOptions) -> Result<Bytes, Error> {
        let inner = &*self.inner;
        let config = inner.methods.get(method);
        let cluster = config.and_then(|c| c.cluster).unwrap_or(inner.cluster);
        let retries = config.and_then(|c| c.retries).unwrap_or(inner.retries);
        let timeout = options
            .timeout
            .or(config.and_then(|c| c.timeout))
            .unwrap_or(inner.timeout);
        let policy = inner.directory.policy();
        let members = inner.directory.route(method, &policy);
        let call = Call {
            method,
            payload: &payload,
            attachments: &options.attachments,
            policy,
            timeout,
            deadline: Instant::now() + timeout,
        };
        if members.is_empty() {
            return Err(Error::NoProvider(inner.key.to_string()));
        }
        match cluster {
            Cluster::Failover => self.failover(&members, &call, retries).await,
            Cluster::Failfast => self.failover(&members, &call, 0).await,
            Cluster::Failsafe => match self.failover(&members, &call, 0).await {
                Ok(reply) => Ok(reply),
                Err(e) => {
                    warn!(service = %inner.key, method, error = %e, "call failed; failsafe returns an empty reply");
                    Ok(Bytes::new())
                }
            },
            Cluster::Failback => match self.failover(&members, &call, 0).await {
                Ok(reply) => Ok(reply),
                Err(e) => self.fail_back(method, &payload, &options.attachments, e),
            },
            Cluster::Forking { parallel } => self.fan_out(&members, &call, parallel.max(1), true).await,
            Cluster::Broadcast => self.fan_out(&members, &call, members.len(), false).await,
        }
    }
}

/// One call, as the cluster strategies see it.
pub(crate) struct Call<'a> {
    pub(crate) method: &'static str,
    pub(crate) payload: &'a Bytes,
    pub(crate) attachments: &'a HashMap<String, String>,
    /// The rules in force when the call started (token, routes).
    pub(crate) policy: Arc<ConsumerPolicy>,
    pub(crate) timeout: Duration,
    pub(crate) deadline: Instant,
}

impl Reference {
    fn pick_context<'a>(&self, attachments: &'a HashMap<String, String>) -> PickContext<'a> {
        let inner = &*self.inner;
        PickContext {
            hash_key: inner
                .hash_attachment
                .as_ref()
                .and_then(|name| attachments.get(name))
                .map(String::as_bytes),
            now_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            warmup: inner.warmup,
        }
    }

    /// The balancer's choice among members not in `tried`; providers that
    /// refuse connections are set aside until their next reconnect attempt
    /// is due (unless nothing else is left).
    fn pick(&self, members: &[Member], tried: &[usize], ctx: &PickContext<'_>) -> Option<usize> {
        let untried: Vec<usize> = (0..members.len()).filter(|i| !tried.contains(i)).collect();
        let available: Vec<usize> = untried
            .iter()
            .copied()
            .filter(|&i| !members[i].endpoint.is_backing_off())
            .collect();
        let untried = if available.is_empty() { untried } else { available };
        if untried.is_empty() {
            return None;
        }
        let candidates: Vec<Candidate<'_>> = untried
            .iter()
            .map(|&i| Candidate {
                addr: members[i].endpoint.addr(),
                weight: members[i].weight,
                start_time_ms: members[i].start_time_ms,
                load: members[i].endpoint.load(),
            })
            .collect();
        Some(untried[self.inner.balancer.pick(&candidates, ctx)])
    }

    /// Failover: each try goes to a provider not yet tried for this call;
    /// only retryable errors are retried (a timeout only for idempotent
    /// methods), within the call's deadline and the retry budget.
    pub(crate) async fn failover(&self, members: &[Member], call: &Call<'_>, retries: usize) -> Result<Bytes, Error> {
        let inner = &*self.inner;
        let tries = 1 + retries.min(members.len() - 1);
        let ctx = self.pick_context(call.attachments);
        let idempotent = inner.idempotent.contains(call.method);
        if let Some(budget) = &inner.retry_budget {
            budget.record_call();
        }
        let mut tried: Vec<usize> = Vec::with_capacity(tries);
        let mut last_error = Error::NoProvider(inner.key.to_string());
        for attempt in 0..tries {
            if attempt > 0 && inner.retry_budget.as_ref().is_some_and(|b| !b.try_retry()) {
                debug!(service = %inner.key, method = call.method, "retry budget spent; not retrying");
                return Err(last_error);
            }
            let Some(chosen) = self.pick(members, &tried, &ctx) else {
                break;
            };
            tried.push(chosen);
            let result = try_member(inner, &members[chosen], call).await;
            let timed_out = matches!(result, Err(Error::Timeout(_)));
            let deadline_left = Instant::now() < call.deadline;
            match result {
                Err(e) if attempt + 1 < tries && (e.is_retryable() || (timed_out && idempotent && deadline_left)) => {
                    debug!(service = %inner.key, method = call.method, provider = %members[chosen].endpoint.addr(), error = %e, "retrying on another provider");
                    last_error = e;
                }
                // The try's own limit, or the whole call's deadline.
                Err(Error::Timeout(t)) => return Err(Error::Timeout(if deadline_left { t } else { call.timeout })),
                other => return other,
            }
        }
        Err(last_error)
    }

    /// Forking (`first_wins`): `n` providers at once, the first success
    /// wins and the rest are cancelled. Broadcast: every provider; an error
    /// if any fails, else the last answer.
    async fn fan_out(&self, members: &[Member], call: &Call<'_>, n: usize, first_wins: bool) -> Result<Bytes, Error> {
        let ctx = self.pick_context(call.attachments);
        let mut chosen = Vec::with_capacity(n);
        while chosen.len() < n.min(members.len()) {
            let Some(i) = self.pick(members, &chosen, &ctx) else {
                break;
            };
            chosen.push(i);
        }
        // Owned by this call: dropping the set cancels what is still running.
        let mut calls = JoinSet::new();
        for i in chosen {
            let (inner, member) = (self.inner.clone(), members[i].clone());
            let (method, payload, attachments) = (call.method, call.payload.clone(), call.attachments.clone());
            let (policy, timeout, deadline) = (call.policy.clone(), call.timeout, call.deadline);
            calls.spawn(async move {
                let call = Call {
                    method,
                    payload: &payload,
                    attachments: &attachments,
                    policy,
                    timeout,
                    deadline,
                };
                try_member(&inner, &member, &call).await
            });
        }
        let mut first_error = None;
        let mut last_reply = None;
        while let Some(joined) = calls.join_next().await {
            match joined.unwrap_or_else(|e| Err(Error::Internal(format!("call task failed: {e}")))) {
                Ok(reply) if first_wins => return Ok(reply),
                Ok(reply) => last_reply = Some(reply),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match (first_error, last_reply) {
            (Some(e), _) => Err(e),
            (None, Some(reply)) => Ok(reply),
            (None, None) => Err(Error::NoProvider(self.inner.key.to_string())),
        }
    }

    /// Failback: queue the failed call for background retries and answer
    /// with an empty reply now; a full queue returns the error instead.
    fn fail_back(
        &self,
        method: &'static str,
        payload: &Bytes,
        attachments: &HashMap<String, String>,
        error: Error,
    ) -> Result<Bytes, Error> {
        let inner = &*self.inner;
        let queue = inner
            .failback
            .get_or_init(|| FailbackQueue::start(Arc::downgrade(&self.inner)));
        let item = FailedCall {
            method,
            payload: payload.clone(),
            attachments: attachments.clone(),
        };
        match queue.tx.try_send(item) {
            Ok(()) => {
                warn!(service = %inner.key, method, %error, "call failed; queued for retry in the background");
                Ok(Bytes::new())
            }
            Err(_) => Err(error),
        }
    }
}

/// One try on one provider, timed for the balancers. Connecting counts
/// against the deadline; `attempt_timeout` limits the try.
async fn try_member(inner: &ReferenceInner, member: &Member, call: &Call<'_>) -> Result<Bytes, Error> {
    let left = call.deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout(call.timeout));
    }
    let limit = inner.attempt_timeout.map_or(left, |t| t.min(left));
    let try_deadline = Instant::now() + limit;
    let endpoint = &member.endpoint;
    let timer = endpoint.load().start();
    // Who is calling, and the service token if the rules gave us one.
    let app = inner.app.as_str();
    let extra = match call.policy.token_for(call.method) {
        Some(token) => [(ATTACH_APP, app), (ATTACH_TOKEN, token)],
        None => [(ATTACH_APP, app), ("", "")],
    };
    let extra = if extra[1].0.is_empty() { &extra[..1] } else { &extra[..] };
    let head = RequestHead {
        service: &inner.key,
        method: call.method,
        timeout_ms: 0,
        attachments: call.attachments,
        extra,
    };
    let result = match tokio::time::timeout(limit, endpoint.connection()).await {
        Err(_) => Err(Error::Timeout(limit)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(conn)) => {
            let remaining = try_deadline.saturating_duration_since(Instant::now());
            conn.call(head, call.payload, remaining.max(Duration::from_millis(1)))
                .await
        }
    };
    match &result {
        // The provider answered, or was too slow: its latency counts.
        Ok(_) | Err(Error::Provider(_) | Error::BadRequest(_) | Error::MethodNotFound(_) | Error::Timeout(_)) => {
            timer.finish()
        }
        Err(_) => drop(timer),
    }
    if let Some(threshold) = inner.circuit_breaker {
        let sick = matches!(
            result,
            Err(Error::Connect { .. } | Error::ConnectionClosed { .. } | Error::Timeout(_) | Error::Internal(_))
        );
        endpoint.record_outcome(!sick, threshold);
    }
    result
}

// === Failback ===

/// A call failback will retry.
#[derive(Debug)]
struct FailedCall {
    pub(crate) method: &'static str,
    pub(crate) payload: Bytes,
    pub(crate) attachments: HashMap<String, String>,
}

/// Failback's bounded queue and the task that retries it, owned by the
/// reference (the task holds only a weak reference back).
#[derive(Debug)]
pub(crate) struct FailbackQueue {
    tx: mpsc::Sender<FailedCall>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

/// Failed calls kept for retry at most.
const FAILBACK_QUEUE: usize = 1024;
/// Background tries per failed call.
const FAILBACK_TRIES: u32 = 3;

impl FailbackQueue {
    fn start(reference: Weak<ReferenceInner>) -> FailbackQueue {
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
