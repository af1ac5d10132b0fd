//! [`ReferenceBuilder`]: a reference's settings (version, group, deadline,
//! retries, balancer, cluster mode, per-method settings) and where its
//! providers come from.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rpc_core::balance::{self, LoadBalance};
use rpc_core::{RetryBudget, ServiceKey, Stub};

use crate::directory::{DEFAULT_WEIGHT, Directory, Member};
use crate::reference::ReferenceInner;
use crate::{Cluster, Consumer, ConsumerError, MethodConfig, Reference};

/// Builds a reference; see [`Consumer::reference`].
#[derive(Debug)]
pub struct ReferenceBuilder<S> {
    pub(crate) consumer: Consumer,
    pub(crate) version: String,
    pub(crate) group: String,
    pub(crate) timeout: Duration,
    pub(crate) retries: usize,
    pub(crate) providers: Vec<SocketAddr>,
    pub(crate) balance: Balance,
    pub(crate) warmup: Duration,
    pub(crate) hash_attachment: Option<String>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) idempotent: HashSet<String>,
    pub(crate) retry_budget: Option<Arc<RetryBudget>>,
    pub(crate) cluster: Cluster,
    pub(crate) methods: HashMap<String, MethodConfig>,
    pub(crate) circuit_breaker: Option<u32>,
    pub(crate) _stub: PhantomData<fn() -> S>,
}

/// Which load balancer a reference uses; see `rpc_core::balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balance {
    Random,
    RoundRobin,
    LeastActive,
    /// By the value of the attachment named with
    /// [`ReferenceBuilder::hash_attachment`].
    ConsistentHash,
    ShortestResponse,
    /// Power of two choices over peak-EWMA latency x in-flight calls: the
    /// default, because it reacts to slow and overloaded providers at once.
    #[default]
    P2c,
}

impl Balance {
    pub(crate) fn build(self) -> Box<dyn LoadBalance> {
        match self {
            Balance::Random => Box::new(balance::Random::new()),
            Balance::RoundRobin => Box::new(balance::RoundRobin::new()),
            Balance::LeastActive => Box::new(balance::LeastActive::new()),
            Balance::ConsistentHash => Box::new(balance::ConsistentHash::new()),
            Balance::ShortestResponse => Box::new(balance::ShortestResponse::new()),
            Balance::P2c => Box::new(balance::P2c::new()),
        }
    }
}

impl<S: Stub<Invoker = Reference>> ReferenceBuilder<S> {
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// Deadline of each call (retries included).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Other providers tried after a retryable failure (0 = fail fast).
    pub fn retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// The load balancer (default [`Balance::P2c`]).
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// How long a new provider's weight ramps up (default 10 minutes; zero
    /// turns warm-up off).
    pub fn warmup(mut self, warmup: Duration) -> Self {
        self.warmup = warmup;
        self
    }

    /// The attachment whose value is the key of [`Balance::ConsistentHash`].
    pub fn hash_attachment(mut self, name: impl Into<String>) -> Self {
        self.hash_attachment = Some(name.into());
        self
    }

    /// Limit of each try (default: none, the call's deadline only). With it,
    /// a try that times out on an idempotent method is retried elsewhere
    /// while the call's deadline allows.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Methods (as named in the .proto file) safe to run twice: a timeout on
    /// them may be retried on another provider. Others are never retried
    /// after a timeout, since the provider may still be running them.
    pub fn idempotent(mut self, methods: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.idempotent.extend(methods.into_iter().map(Into::into));
        self
    }

    /// The retry budget (default: retries may add 20% of the calls over
    /// 10 s, plus one per second); `None` = unlimited.
    pub fn retry_budget(mut self, budget: Option<RetryBudget>) -> Self {
        self.retry_budget = budget.map(Arc::new);
        self
    }

    /// What to do when a call fails (default [`Cluster::Failover`]).
    pub fn cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = cluster;
        self
    }

    /// Consecutive-failure circuit breaking (default off): a provider that
    /// fails this many calls in a row (connection lost, timeout, internal
    /// error) is set aside for a growing ejection period, then probed.
    pub fn circuit_breaker(mut self, consecutive_failures: Option<u32>) -> Self {
        self.circuit_breaker = consecutive_failures;
        self
    }

    /// Settings for one method (named as in the .proto file).
    pub fn method(mut self, name: impl Into<String>, config: MethodConfig) -> Self {
        self.methods.insert(name.into(), config);
        self
    }

    /// Calls these providers directly, without a registry.
    pub fn direct(mut self, providers: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.providers = providers.into_iter().collect();
        self
    }

    /// # Errors
    ///
    /// An invalid version or group, no providers and no registry, a zero
    /// timeout.
    pub fn build(self) -> Result<S, ConsumerError> {
        let key = ServiceKey::new(S::INTERFACE, self.version, self.group);
        key.validate()?;
        if self.timeout.is_zero() {
            return Err(ConsumerError::ZeroTimeout {
                service: key.to_string(),
            });
        }
        let directory = if !self.providers.is_empty() {
            let members = self
                .providers
                .iter()
                .map(|&a| Member {
                    endpoint: self.consumer.endpoint(a),
                    weight: DEFAULT_WEIGHT,
                    start_time_ms: 0,
                    instance: None,
                })
                .collect();
            Directory::fixed(members)
        } else if let Some(registry) = self.consumer.registry() {
            Directory::follow(&self.consumer, registry, key.clone())
        } else {
            return Err(ConsumerError::NoProviders {
                service: key.to_string(),
            });
        };
        Ok(S::from_invoker(Reference {
            inner: Arc::new(ReferenceInner {
                app: self.consumer.config().app.clone(),
                key,
                timeout: self.timeout,
                retries: self.retries,
                directory,
                balancer: self.balance.build(),
                warmup: self.warmup,
                hash_attachment: self.hash_attachment,
                attempt_timeout: self.attempt_timeout,
                idempotent: self.idempotent,
                retry_budget: self.retry_budget,
                cluster: self.cluster,
                methods: self.methods,
                failback: OnceLock::new(),
                circuit_breaker: self.circuit_breaker,
            }),
        }))
    }
}
