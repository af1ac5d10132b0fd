//! [`Provider`]: a running provider, and its shutdown that loses no call
//! (see the crate docs for its order).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rpc_core::ServiceKey;
use rpc_core::registry::RegistrySession;
use rpc_core::server::{Server, ServerConfig};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

use crate::ProviderBuilder;

/// A running provider. Dropping it starts a graceful shutdown without
/// waiting for it; [`Provider::shutdown`] waits.
#[derive(Debug)]
pub struct Provider {
    pub(crate) app: String,
    pub(crate) local_addr: SocketAddr,
    /// The host registered for consumers.
    pub(crate) host: String,
    pub(crate) keys: Vec<ServiceKey>,
    pub(crate) registry: Option<RegistrySession>,
    pub(crate) unregister_grace: Duration,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) task: Option<JoinHandle<()>>,
    /// Recompile the rules of each service as they are pushed.
    pub(crate) _rule_watchers: JoinSet<()>,
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
            registry_tls: None,
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
