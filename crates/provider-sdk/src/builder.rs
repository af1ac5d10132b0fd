//! [`ProviderBuilder`]: where a provider listens, what it serves, and what
//! it registers with the ConfigServer; [`ProviderError`]: why it could not
//! start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rpc_core::net::{ClientTls, ServerTls};
use rpc_core::registry::{RegistryError, RegistrySession, Role, SessionConfig};
use rpc_core::server::{Dispatch, Server, ServerConfig, Service};
use rpc_core::{InvalidServiceKey, ServiceKey};
use tern_proto::registry::Instance;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::Provider;
use crate::rules::Rules;

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
    pub(crate) app: String,
    pub(crate) bind: String,
    pub(crate) listener: Option<std::net::TcpListener>,
    pub(crate) config: ServerConfig,
    pub(crate) server: Server,
    pub(crate) keys: Vec<ServiceKey>,
    pub(crate) registry: Option<SessionConfig>,
    pub(crate) advertise: Option<String>,
    pub(crate) weight: u32,
    pub(crate) zone: String,
    pub(crate) metadata: HashMap<String, String>,
    pub(crate) unregister_grace: Duration,
    pub(crate) registry_tls: Option<ClientTls>,
}

impl ProviderBuilder {
    /// Registers the services with the ConfigServers at `servers`
    /// (`host:port`), with the session's default settings; the app, host
    /// and zone are the provider's own. As a consumer does with
    /// `ConsumerConfig::with_registry`.
    pub fn with_registry(self, servers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let app = self.app.clone();
        self.registry(SessionConfig::new(servers, app, Role::Provider))
    }

    /// Registers the services with a ConfigServer, with these session
    /// settings (its app, role and host are the provider's own).
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

    /// TLS on this provider's port (plain TCP by default). With a client
    /// CA (mTLS), every consumer must present a certificate from it, and
    /// the app it names is the caller's app for access rules. Set after
    /// [`Self::server_config`], which replaces it.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// TLS to the ConfigServers; with a certificate naming this provider's
    /// app where they verify clients (mTLS).
    pub fn registry_tls(mut self, tls: ClientTls) -> Self {
        self.registry_tls = Some(tls);
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
            if let Some(tls) = &self.registry_tls {
                config.tls = Some(tls.clone());
            }
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
