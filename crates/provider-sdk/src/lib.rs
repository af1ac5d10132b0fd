//! What a service links to publish itself.
//!
//! A [`Provider`] serves one or more generated services (`XxxServer`) on an
//! address, with the data plane's dispatch modes, limits and graceful
//! shutdown.
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

use std::net::SocketAddr;

use rpc_core::server::{Dispatch, Server, ServerConfig, Service};
use rpc_core::{InvalidServiceKey, ServiceKey};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

/// Why a provider could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    InvalidService(#[from] InvalidServiceKey),
    #[error("provider {app:?} has no service to serve")]
    NoService { app: String },
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
}

impl ProviderBuilder {
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
        let mut server = self.server;
        // Settings may have been given after the services; apply them now.
        server.set_config(self.config);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = stop_rx.await;
        }));
        info!(app = %self.app, addr = %local_addr, services = ?self.keys.iter().map(ToString::to_string).collect::<Vec<_>>(), "provider started");
        Ok(Provider {
            app: self.app,
            local_addr,
            keys: self.keys,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// A running provider. Dropping it starts a graceful shutdown without
/// waiting for it; [`Provider::shutdown`] waits.
#[derive(Debug)]
pub struct Provider {
    app: String,
    local_addr: SocketAddr,
    keys: Vec<ServiceKey>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
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

    /// Stops accepting, finishes in-flight calls (within the grace period)
    /// and returns when the server has stopped.
    pub async fn shutdown(mut self) {
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
