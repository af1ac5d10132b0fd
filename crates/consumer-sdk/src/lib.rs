//! What a client links to call services.
//!
//! A [`Consumer`] holds the connections to providers (one multiplexed
//! connection per provider address, shared by every reference). A
//! [`Reference`] is the invoker behind a generated client: it picks a provider
//! for each call, applies the deadline, and tries another provider when the
//! error says that is safe ([`rpc_core::Error::is_retryable`]).
//!
//! Providers come from the ConfigServer (give [`ConsumerConfig::registry`]):
//! the reference subscribes to its service and a [`Directory`] follows the
//! pushed list, opening connections to new providers and letting go of
//! removed ones. Or from a static list ([`ReferenceBuilder::direct`], the
//! no-registry mode).
//!
//! ```no_run
//! # use rpc_core::{Invoker, Stub};
//! # #[derive(Clone)] struct GreeterClient<I>(I);
//! # impl<I> Stub for GreeterClient<I> { type Invoker = I; const INTERFACE: &'static str = "demo.Greeter"; fn from_invoker(i: I) -> Self { GreeterClient(i) } }
//! # fn run() -> Result<(), consumer_sdk::ConsumerError> {
//! use consumer_sdk::{Consumer, ConsumerConfig};
//! use std::time::{Duration, SystemTime, UNIX_EPOCH};
//!
//! let consumer = Consumer::new(ConsumerConfig::default());
//! let greeter = consumer
//!     .reference::<GreeterClient<_>>()
//!     .version("1.0.0")
//!     .timeout(Duration::from_millis(500))
//!     .direct(["127.0.0.1:20880".parse().unwrap()])
//!     .build()?;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rpc_core::balance::{self, Candidate, LoadBalance, PickContext};
use rpc_core::frame::RequestHead;
use rpc_core::governance::{ATTACH_APP, ATTACH_TOKEN, ConsumerIdentity, ConsumerPolicy, RuleSet};
use rpc_core::registry::{ProviderList, RegistrySession, SessionConfig};
use rpc_core::{
    CallOptions, ConnectionConfig, Endpoint, Error, InvalidServiceKey, Invoker, RetryBudget, ServiceKey, Stub,
};
use tern_proto::registry::Instance;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Settings shared by every reference of a consumer.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The application name this consumer reports.
    pub app: String,
    pub connection: ConnectionConfig,
    /// Deadline of a call when neither the reference nor the call sets one.
    pub default_timeout: Duration,
    /// Extra providers tried after a retryable failure.
    pub default_retries: usize,
    /// The ConfigServer session; `None` = direct mode only.
    pub registry: Option<SessionConfig>,
}

impl Default for ConsumerConfig {
    fn default() -> ConsumerConfig {
        ConsumerConfig {
            app: "app".to_owned(),
            connection: ConnectionConfig::default(),
            default_timeout: Duration::from_secs(3),
            default_retries: 2,
            registry: None,
        }
    }
}

/// Why a reference could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    #[error(transparent)]
    InvalidService(#[from] InvalidServiceKey),
    #[error("reference to {service}: no provider address given and no registry configured")]
    NoProviders { service: String },
    #[error("reference to {service}: timeout must be more than zero")]
    ZeroTimeout { service: String },
}

/// The calling side of an application; cheap to clone.
#[derive(Debug, Clone)]
pub struct Consumer {
    inner: Arc<ConsumerInner>,
}

#[derive(Debug)]
struct ConsumerInner {
    config: ConsumerConfig,
    registry: Option<RegistrySession>,
    /// One endpoint per provider address, shared by references; entries die
    /// with the last reference that uses them.
    endpoints: Mutex<HashMap<SocketAddr, Weak<Endpoint>>>,
}

impl Consumer {
    /// A consumer; with [`ConsumerConfig::registry`] set it starts its
    /// ConfigServer session (so it must run inside a tokio runtime).
    pub fn new(config: ConsumerConfig) -> Consumer {
        let registry = config.registry.clone().map(RegistrySession::start);
        Consumer {
            inner: Arc::new(ConsumerInner {
                registry,
                config,
                endpoints: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &ConsumerConfig {
        &self.inner.config
    }

    /// The ConfigServer session, if configured.
    pub fn registry(&self) -> Option<&RegistrySession> {
        self.inner.registry.as_ref()
    }

    /// Starts building a typed client `S` (a generated `XxxClient<_>`).
    pub fn reference<S: Stub<Invoker = Reference>>(&self) -> ReferenceBuilder<S> {
        ReferenceBuilder {
            consumer: self.clone(),
            version: String::new(),
            group: String::new(),
            timeout: self.inner.config.default_timeout,
            retries: self.inner.config.default_retries,
            providers: Vec::new(),
            balance: Balance::default(),
            warmup: balance::DEFAULT_WARMUP,
            hash_attachment: None,
            attempt_timeout: None,
            idempotent: HashSet::new(),
            retry_budget: Some(Arc::new(RetryBudget::default())),
            cluster: Cluster::default(),
            methods: HashMap::new(),
            circuit_breaker: None,
            _stub: PhantomData,
        }
    }

    fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        let mut endpoints = self.inner.endpoints.lock().expect("endpoints lock");
        if let Some(endpoint) = endpoints.get(&addr).and_then(Weak::upgrade) {
            return endpoint;
        }
        endpoints.retain(|_, e| e.strong_count() > 0);
        let endpoint = Arc::new(Endpoint::new(addr, self.inner.config.connection.clone()));
        endpoints.insert(addr, Arc::downgrade(&endpoint));
        endpoint
    }
}

/// Builds a reference; see [`Consumer::reference`].
#[derive(Debug)]
pub struct ReferenceBuilder<S> {
    consumer: Consumer,
    version: String,
    group: String,
    timeout: Duration,
    retries: usize,
    providers: Vec<SocketAddr>,
    balance: Balance,
    warmup: Duration,
    hash_attachment: Option<String>,
    attempt_timeout: Option<Duration>,
    idempotent: HashSet<String>,
    retry_budget: Option<Arc<RetryBudget>>,
    cluster: Cluster,
    methods: HashMap<String, MethodConfig>,
    circuit_breaker: Option<u32>,
    _stub: PhantomData<fn() -> S>,
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
    fn build(self) -> Box<dyn LoadBalance> {
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
            let feeds = (registry.subscribe(&key), registry.rules(&key));
            Directory::follow(self.consumer.clone(), feeds, key.clone())
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

/// Weight of a provider given without one (direct mode).
const DEFAULT_WEIGHT: u32 = 100;

/// A provider in a [`Directory`]: its endpoint and what the balancer weighs.
#[derive(Debug, Clone)]
pub struct Member {
    pub endpoint: Arc<Endpoint>,
    pub weight: u32,
    /// Unix ms (0 = unknown: no warm-up).
    pub start_time_ms: i64,
    /// The registration (zone, metadata for routes); `None` in direct mode.
    pub instance: Option<Arc<Instance>>,
}

/// The members for `list` under `policy`'s weight overrides: the endpoints
/// in `current` that stay, plus new ones (also returned on their own, to be
/// connected).
fn next_members(
    consumer: &Consumer,
    key: &ServiceKey,
    list: &ProviderList,
    policy: &ConsumerPolicy,
    current: &[Member],
) -> (Vec<Member>, Vec<Arc<Endpoint>>) {
    let held: HashMap<SocketAddr, &Arc<Endpoint>> = current.iter().map(|m| (m.endpoint.addr(), &m.endpoint)).collect();
    let mut next = Vec::with_capacity(list.providers.len());
    let mut fresh = Vec::new();
    for (addr, instance) in &list.providers {
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            warn!(service = %key, %addr, host = %instance.host, "provider address is not ip:port; skipped");
            continue;
        };
        let endpoint = match held.get(&addr) {
            Some(endpoint) => Arc::clone(endpoint),
            None => {
                let endpoint = consumer.endpoint(addr);
                fresh.push(endpoint.clone());
                endpoint
            }
        };
        next.push(Member {
            endpoint,
            weight: policy.weight_of(addr).unwrap_or(instance.weight),
            start_time_ms: instance.start_time_ms,
            instance: Some(instance.clone()),
        });
    }
    (next, fresh)
}

/// The invoker behind a typed client: provider choice, deadline, retries.
#[derive(Debug, Clone)]
pub struct Reference {
    inner: Arc<ReferenceInner>,
}

#[derive(Debug)]
struct ReferenceInner {
    key: ServiceKey,
    /// This consumer's app name, sent with every call.
    app: String,
    timeout: Duration,
    retries: usize,
    directory: Directory,
    balancer: Box<dyn LoadBalance>,
    warmup: Duration,
    hash_attachment: Option<String>,
    attempt_timeout: Option<Duration>,
    idempotent: HashSet<String>,
    retry_budget: Option<Arc<RetryBudget>>,
    cluster: Cluster,
    methods: HashMap<String, MethodConfig>,
    failback: OnceLock<FailbackQueue>,
    circuit_breaker: Option<u32>,
}

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

/// The live provider list of a reference: fixed (direct mode) or following
/// the ConfigServer's pushes. Removed providers' endpoints are dropped; their
/// connections close once no call uses them.
#[derive(Debug)]
pub struct Directory {
    endpoints: Arc<RwLock<Arc<Vec<Member>>>>,
    /// The service's governance rules as this consumer applies them.
    policy: Arc<RwLock<Arc<ConsumerPolicy>>>,
    /// This consumer's zone, for zone affinity.
    zone: String,
    /// Bumped on every change (for waiters).
    version: watch::Receiver<u64>,
    /// Stops the follower task when the directory goes.
    _follower: Option<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Directory {
    fn fixed(members: Vec<Member>) -> Directory {
        let (_, version) = watch::channel(0);
        Directory {
            endpoints: Arc::new(RwLock::new(Arc::new(members))),
            policy: Arc::default(),
            zone: String::new(),
            version,
            _follower: None,
        }
    }

    fn follow(
        consumer: Consumer,
        (mut lists, mut rules): (watch::Receiver<Arc<ProviderList>>, watch::Receiver<Arc<RuleSet>>),
        key: ServiceKey,
    ) -> Directory {
        let registry = consumer.registry().map(RegistrySession::config);
        let me = ConsumerIdentity {
            app: consumer.config().app.clone(),
            zone: registry.map(|c| c.zone.clone()).unwrap_or_default(),
            labels: registry.map(|c| c.labels.clone()).unwrap_or_default(),
        };
        // What is held already (e.g. loaded from the cache file) is usable at once.
        let initial = lists.borrow_and_update().clone();
        let policy = Arc::new(ConsumerPolicy::new(&rules.borrow_and_update(), &me));
        let (endpoints, mut fresh) = next_members(&consumer, &key, &initial, &policy, &[]);
        let endpoints = Arc::new(RwLock::new(Arc::new(endpoints)));
        let policy = Arc::new(RwLock::new(policy));
        let (version_tx, version) = watch::channel(0u64);
        let (shared, shared_policy) = (endpoints.clone(), policy.clone());
        let zone = me.zone.clone();
        let task = tokio::spawn(async move {
            let mut rules_open = true;
            loop {
                // Open connections to new providers now; attempts not done
                // by the next change are dropped with this set.
                let mut warming = JoinSet::new();
                for endpoint in fresh.drain(..) {
                    warming.spawn(async move {
                        let _ = endpoint.connection().await;
                    });
                }
                tokio::select! {
                    changed = lists.changed() => if changed.is_err() { break },
                    changed = rules.changed(), if rules_open => match changed {
                        Ok(()) => {
                            let set = rules.borrow_and_update().clone();
                            debug!(service = %key, revision = set.revision, rules = set.rules.len(), "applying rules");
                            *shared_policy.write().expect("policy lock") = Arc::new(ConsumerPolicy::new(&set, &me));
                        }
                        Err(_) => rules_open = false,
                    },
                }
                let list = lists.borrow_and_update().clone();
                let policy = shared_policy.read().expect("policy lock").clone();
                let current = shared.read().expect("directory lock").clone();
                let (next, new) = next_members(&consumer, &key, &list, &policy, &current);
                debug!(service = %key, providers = next.len(), revision = list.revision, "directory updated");
                *shared.write().expect("directory lock") = Arc::new(next);
                version_tx.send_modify(|v| *v += 1);
                fresh = new;
            }
        });
        Directory {
            endpoints,
            policy,
            zone,
            version,
            _follower: Some(AbortOnDrop(task.abort_handle())),
        }
    }

    /// The providers now.
    pub fn members(&self) -> Arc<Vec<Member>> {
        self.endpoints.read().expect("directory lock").clone()
    }

    /// The rules now, as this consumer applies them.
    pub fn policy(&self) -> Arc<ConsumerPolicy> {
        self.policy.read().expect("policy lock").clone()
    }

    /// The members a call of `method` may go to under the routing rules:
    /// condition routes that apply to this consumer, then zone affinity
    /// (in-zone providers while at least the rule's share of them is not
    /// set aside). A route that matches no provider is ignored unless it
    /// is `force`d.
    fn route(&self, method: &str, policy: &ConsumerPolicy) -> Arc<Vec<Member>> {
        let members = self.members();
        if !policy.narrows(method) {
            return members;
        }
        let mut chosen: Vec<Member> = members.to_vec();
        for route in policy.routes.iter().filter(|r| r.applies_to(method)) {
            let selected: Vec<Member> = chosen
                .iter()
                .filter(|m| m.instance.as_ref().is_some_and(|i| route.selects(&i.metadata)))
                .cloned()
                .collect();
            if !selected.is_empty() || route.force {
                chosen = selected;
            }
        }
        if let Some(share) = policy.zone_affinity
            && !self.zone.is_empty()
        {
            let in_zone: Vec<Member> = chosen
                .iter()
                .filter(|m| m.instance.as_ref().is_some_and(|i| i.zone == self.zone))
                .cloned()
                .collect();
            let healthy = in_zone.iter().filter(|m| !m.endpoint.is_backing_off()).count();
            if healthy > 0 && healthy as f64 >= share * in_zone.len() as f64 {
                chosen = in_zone;
            }
        }
        Arc::new(chosen)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.version.clone()
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
struct Call<'a> {
    method: &'static str,
    payload: &'a Bytes,
    attachments: &'a HashMap<String, String>,
    /// The rules in force when the call started (token, routes).
    policy: Arc<ConsumerPolicy>,
    timeout: Duration,
    deadline: Instant,
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
    async fn failover(&self, members: &[Member], call: &Call<'_>, retries: usize) -> Result<Bytes, Error> {
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

/// A call failback will retry.
#[derive(Debug)]
struct FailedCall {
    method: &'static str,
    payload: Bytes,
    attachments: HashMap<String, String>,
}

/// Failback's bounded queue and the task that retries it, owned by the
/// reference (the task holds only a weak reference back).
#[derive(Debug)]
struct FailbackQueue {
    tx: mpsc::Sender<FailedCall>,
    _task: AbortOnDrop,
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
            _task: AbortOnDrop(task.abort_handle()),
        }
    }
}
