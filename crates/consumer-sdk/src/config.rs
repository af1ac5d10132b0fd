//! A consumer's settings, and why a reference could not be built.

use std::time::Duration;

use rpc_core::net::ClientTls;
use rpc_core::registry::{Role, SessionConfig};
use rpc_core::{ConnectionConfig, InvalidServiceKey};

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

impl ConsumerConfig {
    /// A consumer named `app` that finds its providers through the
    /// ConfigServers at `servers` (`host:port`); the other settings are the
    /// defaults, and the session's own ([`SessionConfig`]) can be changed
    /// through [`ConsumerConfig::registry`].
    pub fn with_registry(
        app: impl Into<String>,
        servers: impl IntoIterator<Item = impl Into<String>>,
    ) -> ConsumerConfig {
        let app = app.into();
        ConsumerConfig {
            registry: Some(SessionConfig::new(servers, app.clone(), Role::Consumer)),
            app,
            ..ConsumerConfig::default()
        }
    }
}

impl ConsumerConfig {
    /// TLS to the providers and to the ConfigServers alike: the CA their
    /// certificates come from, and (for mTLS) a certificate naming this
    /// consumer's app ([`ClientTls::with_identity`]).
    #[must_use]
    pub fn tls(mut self, tls: ClientTls) -> ConsumerConfig {
        self.connection.tls = Some(tls.clone());
        if let Some(registry) = &mut self.registry {
            registry.tls = Some(tls);
        }
        self
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
