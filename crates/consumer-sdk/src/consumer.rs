//! [`Consumer`]: the calling side of an application, holding one endpoint
//! per provider address (shared by its references) and, with a registry,
//! one session with the ConfigServer.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use rpc_core::registry::RegistrySession;
use rpc_core::{Endpoint, RetryBudget, Stub, balance};

use crate::{Balance, Cluster, ConsumerConfig, Reference, ReferenceBuilder};

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

    pub(crate) fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
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
