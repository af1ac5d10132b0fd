//! What a service links to publish itself.
//!
//! A [`Provider`] serves one or more generated services (`XxxServer`) on an
//! address, with the data plane's dispatch modes, limits and graceful
//! shutdown. Given a ConfigServer ([`ProviderBuilder::registry`]) it
//! registers its services once the listener is bound and, on
//! [`Provider::shutdown`], stops in an order that loses no call:
//!
//! 1. unregister, so consumers stop picking this provider;
//! 2. wait `unregister_grace` (bounded) while consumers receive the removal;
//! 3. stop accepting; keep serving requests already on their way until
//!    consumers close their connections or go quiet (`drain_quiet`);
//! 4. finish in-flight calls (within the grace period) and exit.
//!
//! With a ConfigServer the provider also enforces the governance rules it
//! pushes for each served service (access lists, service tokens, QPS limits;
//! see `rpc_core::governance`) and keeps enforcing the last ones it received
//! while the ConfigServer is away.
//!
//! ```no_run
//! # use rpc_core::{Request, Service, Status, codegen::{Bytes, BoxFuture}};
//! # struct GreeterServer;
//! # impl Service for GreeterServer {
//! #     fn interface(&self) -> &'static str { "demo.Greeter" }
//! #     fn methods(&self) -> &'static [&'static str] { &[] }
//! #     fn call(&self, m: &str, _: Request<Bytes>) -> BoxFuture<Bytes> { rpc_core::codegen::method_not_found("demo.Greeter", m) }
//! # }
//! # async fn run() -> Result<(), provider_sdk::ProviderError> {
//! use provider_sdk::Provider;
//!
//! let provider = Provider::builder()
//!     .app("greeter")
//!     .bind("127.0.0.1:20880")
//!     .service_with(GreeterServer, "1.0.0", "")
//!     .start()
//!     .await?;
//! println!("serving on {}", provider.local_addr());
//! provider.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rpc_core::governance::{ProviderPolicy, RuleSet};

use rpc_core::registry::{RegistryError, RegistrySession, Role, SessionConfig};
use rpc_core::server::{Admission, Dispatch, Server, ServerConfig, Service};
use rpc_core::{InvalidServiceKey, ServiceKey, Status};
use tern_proto::registry::Instance;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

/// Why a provider could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    InvalidService(#[from] InvalidServiceKey),
    #[error("provider {app:?} has no service to serve")]
    NoService { app: String },
    #[error("registering {service}: {source}")]
    Registry { service: String, source: RegistryError },
    #[error("the configserver refused this provider's session: {reason}")]
    Refused { reason: String },
}

/// Builds a [`Provider`].
#[derive(Debug)]
pub struct ProviderBuilder {
    app: String,
    bind: String,
    listener: Option<std::net::TcpListener>,
    config: ServerConfig,
    server: Server,
    keys: Vec<ServiceKey>,
    registry: Option<SessionConfig>,
    advertise: Option<String>,
    weight: u32,
    zone: String,
    metadata: HashMap<String, String>,
    unregister_grace: Duration,
}

impl ProviderBuilder {
    /// Registers the services with a ConfigServer (role: provider).
    pub fn registry(mut self, config: SessionConfig) -> Self {
        self.registry = Some(config);
        self
    }

    /// Host consumers should connect to (default: the bound IP, or
    /// `127.0.0.1` when bound to all interfaces).
    pub fn advertise(mut self, host: impl Into<String>) -> Self {
        self.advertise = Some(host.into());
        self
    }

    /// Relative share of traffic (default 100).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// How long shutdown waits after unregistering before it stops accepting
    /// (default 300 ms: the ConfigServer's push plus the consumers' update).
    pub fn unregister_grace(mut self, grace: Duration) -> Self {
        self.unregister_grace = grace;
        self
    }

    /// The application name this provider reports.
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self
    }

    /// Address to listen on (default `0.0.0.0:20880`; port 0 picks a free one).
    pub fn bind(mut self, addr: impl Into<String>) -> Self {
        self.bind = addr.into();
        self
    }

    /// Serves on an already bound listener instead of binding [`Self::bind`]'s
    /// address (handy when the address must be known before the services).
    pub fn listener(mut self, listener: std::net::TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    pub fn dispatch(mut self, dispatch: Dispatch) -> Self {
        self.config.dispatch = dispatch;
        self
    }

    /// All server settings at once (dispatch, limits, grace period).
    pub fn server_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Serves `service` with an empty version and group.
    pub fn service(self, service: impl Service) -> Self {
        self.service_with(service, "", "")
    }

    /// Serves `service` under the given version and group.
    pub fn service_with(mut self, service: impl Service, version: &str, group: &str) -> Self {
        let key = self.server.add_service(version, group, service);
        self.keys.push(key);
        self
    }

    /// Validates the services, binds the address and starts serving.
    ///
    /// # Errors
    ///
    /// An invalid service key (naming the bad part), no service at all, or
    /// an address that cannot be bound.
    pub async fn start(self) -> Result<Provider, ProviderError> {
        if self.keys.is_empty() {
            return Err(ProviderError::NoService { app: self.app });
        }
        for key in &self.keys {
            key.validate()?;
        }
        let bind_err = |source| ProviderError::Bind {
            addr: self.bind.clone(),
            source,
        };
        let listener = match self.listener {
            Some(listener) => {
                listener.set_nonblocking(true).map_err(bind_err)?;
                TcpListener::from_std(listener).map_err(bind_err)?
            }
            None => TcpListener::bind(&self.bind).await.map_err(bind_err)?,
        };
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let host = self.advertise.clone().unwrap_or_else(|| {
            let ip = local_addr.ip();
            if ip.is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                ip.to_string()
            }
        });
        let mut server = self.server;
        // Settings may have been given after the services; apply them now.
        server.set_config(self.config);
        // The session starts before the first call can arrive, so that rules
        // it receives are enforced from the start.
        let session = self.registry.map(|mut config| {
            config.role = Role::Provider;
            config.app = self.app.clone();
            config.host = host.clone();
            if config.zone.is_empty() {
                config.zone = self.zone.clone();
            }
            RegistrySession::start(config)
        });
        let mut rule_watchers = JoinSet::new();
        if let Some(session) = &session {
            server.set_admission(Arc::new(Rules::follow(session, &self.keys, &mut rule_watchers)));
        }
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = stop_rx.await;
        }));
        let mut provider = Provider {
            app: self.app.clone(),
            local_addr,
            host,
            keys: self.keys.clone(),
            registry: None,
            unregister_grace: self.unregister_grace,
            stop: Some(stop_tx),
            task: Some(task),
            _rule_watchers: rule_watchers,
        };
        if let Some(session) = session {
            let connect_timeout = session.config().connect_timeout;
            // Register on a live stream when one comes up in time, so that a
            // refusal fails `start`; otherwise the registration is sent as
            // soon as the ConfigServer is reachable.
            let mut connected = session.connected();
            if tokio::time::timeout(connect_timeout, connected.wait_for(Option::is_some))
                .await
                .is_err()
            {
                // A refused credential will not fix itself: fail the start.
                if let Some(reason) = session.refusal() {
                    provider.registry = Some(session);
                    provider.shutdown().await;
                    return Err(ProviderError::Refused { reason });
                }
                warn!(app = %self.app, "configserver not reachable yet; registering when it is");
            }
            let started_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let instance = Instance {
                host: provider.host.as_str().into(),
                port: local_addr.port().into(),
                weight: self.weight,
                zone: self.zone.as_str().into(),
                app: self.app.as_str().into(),
                protocol: "tern".into(),
                start_time_ms: started_ms,
                metadata: self.metadata.clone(),
            };
            provider.registry = Some(session.clone());
            for key in &self.keys {
                match session.register(key, instance.clone()).await {
                    Ok(()) => {}
                    Err(e @ RegistryError::Refused { .. }) => {
                        provider.shutdown().await;
                        return Err(ProviderError::Registry {
                            service: key.to_string(),
                            source: e,
                        });
                    }
                    // Not answered: kept, and replayed when the session is up.
                    Err(e) => warn!(service = %key, error = %e, "registration not confirmed yet"),
                }
            }
        }
        info!(app = %self.app, addr = %local_addr, services = ?self.keys.iter().map(ToString::to_string).collect::<Vec<_>>(), "provider started");
        Ok(provider)
    }
}

/// A running provider. Dropping it starts a graceful shutdown without
/// waiting for it; [`Provider::shutdown`] waits.
#[derive(Debug)]
pub struct Provider {
    app: String,
    local_addr: SocketAddr,
    /// The host registered for consumers.
    host: String,
    keys: Vec<ServiceKey>,
    registry: Option<RegistrySession>,
    unregister_grace: Duration,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// Recompile the rules of each service as they are pushed.
    _rule_watchers: JoinSet<()>,
}

/// The governance rules of the served services, as the server checks them.
#[derive(Debug)]
struct Rules {
    policies: HashMap<ServiceKey, Arc<Followed>>,
}

/// One service's pushed rules and the policy compiled from them.
#[derive(Debug)]
struct Followed {
    key: ServiceKey,
    pushed: watch::Receiver<Arc<RuleSet>>,
    compiled: RwLock<(Arc<RuleSet>, Arc<ProviderPolicy>)>,
}

impl Followed {
    /// The policy of the rules last pushed. A call never sees older rules
    /// than the session holds: the rules of a registration arrive before
    /// its ack, so a provider enforces them from its first call.
    fn current(&self) -> Arc<ProviderPolicy> {
        let set = self.pushed.borrow().clone();
        {
            let compiled = self.compiled.read().expect("policy lock");
            if Arc::ptr_eq(&compiled.0, &set) {
                return compiled.1.clone();
            }
        }
        let mut compiled = self.compiled.write().expect("policy lock");
        if !Arc::ptr_eq(&compiled.0, &set) {
            // Token buckets carry over from the previous policy.
            let next = ProviderPolicy::new(&set, Some(&compiled.1));
            info!(service = %self.key, revision = set.revision, rules = set.rules.len(), "enforcing rules");
            *compiled = (set, Arc::new(next));
        }
        compiled.1.clone()
    }
}

impl Rules {
    /// Follows the pushed rules of `keys`. Calls compile new rules when they
    /// find them; the watchers in `tasks` compile them as soon as they are
    /// pushed, and stop with `tasks`.
    fn follow(session: &RegistrySession, keys: &[ServiceKey], tasks: &mut JoinSet<()>) -> Rules {
        let mut policies = HashMap::new();
        for key in keys {
            let mut pushed = session.rules(key);
            let set = pushed.borrow_and_update().clone();
            let initial = Arc::new(ProviderPolicy::new(&set, None));
            let followed = Arc::new(Followed {
                key: key.clone(),
                pushed: pushed.clone(),
                compiled: RwLock::new((set, initial)),
            });
            policies.insert(key.clone(), followed.clone());
            tasks.spawn(async move {
                while pushed.changed().await.is_ok() {
                    followed.current();
                }
            });
        }
        Rules { policies }
    }
}

impl Admission for Rules {
    fn admit(
        &self,
        service: &ServiceKey,
        method: &str,
        peer: Option<SocketAddr>,
        attachments: &HashMap<String, String>,
    ) -> Result<(), Status> {
        match self.policies.get(service) {
            Some(followed) => followed.current().admit(method, peer, attachments),
            None => Ok(()),
        }
    }
}

impl Provider {
    pub fn builder() -> ProviderBuilder {
        ProviderBuilder {
            app: "app".to_owned(),
            bind: "0.0.0.0:20880".to_owned(),
            listener: None,
            config: ServerConfig::default(),
            server: Server::new(ServerConfig::default()),
            keys: Vec::new(),
            registry: None,
            advertise: None,
            weight: 100,
            zone: String::new(),
            metadata: HashMap::new(),
            unregister_grace: Duration::from_millis(300),
        }
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn services(&self) -> &[ServiceKey] {
        &self.keys
    }

    /// The registry session, if the provider registers with a ConfigServer.
    pub fn registry(&self) -> Option<&RegistrySession> {
        self.registry.as_ref()
    }

    /// Stops without losing a call: unregister, let consumers see it, stop
    /// accepting, drain, finish in-flight calls (see the crate docs). Returns
    /// when the server has stopped.
    pub async fn shutdown(mut self) {
        if let Some(session) = self.registry.take() {
            let port = self.local_addr.port();
            for key in &self.keys {
                if let Err(e) = session.unregister(key, &self.host, port).await {
                    warn!(service = %key, error = %e, "unregister not confirmed");
                }
            }
            tokio::time::sleep(self.unregister_grace).await;
            session.shutdown();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        info!(app = %self.app, addr = %self.local_addr, "provider stopped");
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
