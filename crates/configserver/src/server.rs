//! A running ConfigServer: the registry port (native framing and gRPC), the admin HTTP API,
//! the push flusher, the startup grace timer and the rule store follower,
//! with one shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rpc_core::net::tls::ServerTlsFiles;
use rpc_core::net::{ClientTls, ServerTls, TlsError};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::AdminState;
use crate::auth::Credentials;
use crate::governance::Governance;
use crate::grpc::RegistryEndpoint;
use crate::node_session::{Heartbeats, RegistryService};
use crate::peer::{Cluster, ClusterConfig, ClusterError};
use crate::service_map::{Registry, RegistryConfig};
use crate::store::{RuleStore, StoreError};

/// Settings of a [`ConfigServer`].
#[derive(Debug, Clone)]
pub struct ConfigServerConfig {
    /// Where nodes connect (native framing or gRPC, on one port).
    pub listen: SocketAddr,
    /// Where the admin HTTP API listens.
    pub admin_listen: SocketAddr,
    /// How often nodes heartbeat.
    pub heartbeat_interval: Duration,
    /// A node silent this long is expired.
    pub heartbeat_timeout: Duration,
    /// Longest a change waits after a flush (see [`crate::flusher`]); changes that
    /// wait together go out as one delta per service.
    pub coalesce: Duration,
    /// Largest control message accepted.
    pub max_message_bytes: usize,
    /// Connections the registry port holds at once (at least 1); `None`:
    /// as many as the open-file limit leaves room for, at most
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: Option<usize>,
    pub registry: RegistryConfig,
    /// Rule store URL (`sqlite://...`, `postgres://...`, `mysql://...`);
    /// `None`: an in-memory SQLite database (rules last until the server stops).
    pub store: Option<String>,
    /// How often the store is checked for rules written by other servers.
    pub rules_poll: Duration,
    /// App credentials and admin token; `None`: access control off. With
    /// credentials an admin token is required (the server will not start
    /// without one).
    pub credentials: Option<Credentials>,
    /// With an admin token, the service listings and metrics are open to
    /// anyone all the same.
    pub admin_open_reads: bool,
    /// Peers, if this server is one of a cluster (none by default).
    pub cluster: ClusterConfig,
    /// TLS on every port (`None`: plain TCP). With a client CA, nodes and
    /// peers must present a certificate from it on the registry port
    /// (mTLS); the admin port asks for none (it has its token).
    pub tls: Option<ServerTlsFiles>,
}

impl Default for ConfigServerConfig {
    fn default() -> ConfigServerConfig {
        ConfigServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 9600)),
            // Loopback: the admin API is reached from this machine unless
            // it is bound elsewhere on purpose.
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9601)),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(3),
            coalesce: Duration::from_millis(5),
            max_message_bytes: 1024 * 1024,
            max_connections: None,
            registry: RegistryConfig::default(),
            store: None,
            rules_poll: Duration::from_secs(1),
            credentials: None,
            admin_open_reads: false,
            cluster: ClusterConfig::default(),
            tls: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("heartbeat timeout {timeout:?} must be longer than the interval {interval:?}")]
    Heartbeats { interval: Duration, timeout: Duration },
    #[error("max connections {0} must be between 1 and {max}", max = tokio::sync::Semaphore::MAX_PERMITS)]
    MaxConnections(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "the credentials have no admin token: with access control on, the admin API needs one (add admin-token = \"...\" to the credentials file)"
    )]
    NoAdminToken,
    #[error("TLS: {0} (the server did not start)")]
    Tls(#[from] TlsError),
    #[error("TLS needs both --tls-cert and --tls-key")]
    TlsIncomplete,
    #[error(
        "TLS in a cluster needs --tls-client-ca: the CA the other members' certificates are checked against (they connect with theirs)"
    )]
    ClusterTlsNeedsCa,
}

/// A running ConfigServer.
#[derive(Debug)]
pub struct ConfigServer {
    /// The registry port's TLS and the admin port's, reloaded together.
    tls: Vec<ServerTls>,
    registry: Arc<Registry>,
    governance: Arc<Governance>,
    cluster: Option<Arc<Cluster>>,
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl ConfigServer {
    /// Binds both listeners and starts serving.
    ///
    /// # Errors
    ///
    /// An address that cannot be bound, inconsistent heartbeat settings, or
    /// a limit of no connections.
    pub async fn start(config: ConfigServerConfig) -> Result<ConfigServer, StartError> {
        if config.heartbeat_timeout <= config.heartbeat_interval {
            return Err(StartError::Heartbeats {
                interval: config.heartbeat_interval,
                timeout: config.heartbeat_timeout,
            });
        }
        if config.credentials.as_ref().is_some_and(|c| c.admin_token.is_none()) {
            return Err(StartError::NoAdminToken);
        }
        let max_connections = connection_limit(config.max_connections)?;
        let (registry_tls, admin_tls) = match &config.tls {
            None => (None, None),
            Some(files) if files.cert.as_os_str().is_empty() || files.key.as_os_str().is_empty() => {
                return Err(StartError::TlsIncomplete);
            }
            Some(files) => {
                let admin = ServerTlsFiles {
                    client_ca: None,
                    ..files.clone()
                };
                (Some(ServerTls::new(files.clone())?), Some(ServerTls::new(admin)?))
            }
        };
        let mut config = config;
        if let Some(files) = &config.tls
            && config.cluster.enabled()
            && config.cluster.tls.is_none()
        {
            let ca = files.client_ca.as_ref().ok_or(StartError::ClusterTlsNeedsCa)?;
            config.cluster.tls = Some(ClientTls::with_identity(ca, &files.cert, &files.key)?);
        }
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let registry_port = bind(config.listen).await?;
        let admin = bind(config.admin_listen).await?;
        let local_addr = registry_port.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;

        let registry = Arc::new(Registry::new(config.registry.clone()));
        // Rules are loaded before the first node can connect, so that its
        // first registration or subscription already gets them.
        let store = RuleStore::open(config.store.as_deref().unwrap_or(IN_MEMORY_STORE)).await?;
        let governance = Arc::new(Governance::start(store, registry.clone()).await?);
        let credentials = config.credentials.clone().map(Arc::new);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let heartbeats = Heartbeats {
            interval: config.heartbeat_interval,
            timeout: config.heartbeat_timeout,
        };

        let cluster = if config.cluster.enabled() {
            let token = credentials.as_ref().and_then(|c| c.admin_token.clone());
            Some(Cluster::start(
                config.cluster.clone(),
                local_addr,
                admin_addr,
                registry.clone(),
                governance.clone(),
                heartbeats,
                token,
                shutdown.clone(),
                tracker.clone(),
            )?)
        } else {
            None
        };
        let service = RegistryService::new(
            registry.clone(),
            heartbeats,
            credentials.clone(),
            shutdown.clone(),
            tracker.clone(),
        );
        // One port, two transports: the accept loop serves natively framed
        // sessions itself and hands the rest to the gRPC server.
        let (to_grpc, grpc_incoming) = mpsc::channel(crate::port::GRPC_HANDOFF);
        let handlers = crate::port::Handlers {
            sessions: service.clone(),
            max_message_bytes: config.max_message_bytes,
            grpc: to_grpc,
            peers: cluster.clone(),
            tls: registry_tls.clone(),
        };
        tracker.spawn(crate::port::accept(
            registry_port,
            handlers,
            crate::port::ConnectionLimit::new(max_connections, registry.clone()),
            shutdown.clone(),
            tracker.clone(),
        ));
        let grpc_service = RegistryEndpoint::new(service, config.max_message_bytes);
        let token = shutdown.clone();
        tracker.spawn(async move {
            let served = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(crate::port::GRPC_STREAMS))
                .add_service(grpc_service)
                .serve_with_incoming_shutdown(ReceiverStream::new(grpc_incoming), token.cancelled_owned())
                .await;
            if let Err(e) = served {
                error!(error = %e, "registry endpoint failed");
            }
        });

        let token = shutdown.clone();
        let router = crate::admin::router(AdminState {
            registry: registry.clone(),
            governance: governance.clone(),
            credentials: credentials.unwrap_or_default(),
            open_reads: config.admin_open_reads,
            cluster: cluster.clone(),
            node: cluster
                .as_ref()
                .map_or_else(|| local_addr.to_string(), |c| c.node().to_owned()),
        });
        let tls_for_admin = admin_tls.clone();
        tracker.spawn(async move {
            let served = match tls_for_admin {
                None => {
                    axum::serve(admin, router)
                        .with_graceful_shutdown(token.cancelled_owned())
                        .await
                }
                Some(tls) => {
                    axum::serve(crate::tls_listener::TlsListener::new(admin, tls), router)
                        .with_graceful_shutdown(token.cancelled_owned())
                        .await
                }
            };
            if let Err(e) = served {
                error!(error = %e, "admin endpoint failed");
            }
        });

        tracker.spawn(crate::flusher::flusher(
            registry.clone(),
            config.coalesce,
            shutdown.clone(),
        ));
        tracker.spawn(governance.clone().follow(config.rules_poll, shutdown.clone()));
        tracker.spawn(crate::service_map::stall::watch(registry.clone(), shutdown.clone()));
        // Complete snapshots once the startup grace is over and, in a
        // cluster, the peers' data is here.
        let (grace_registry, grace, token) = (registry.clone(), config.registry.startup_grace, shutdown.clone());
        let synced = cluster.clone();
        tracker.spawn(async move {
            let over = async {
                tokio::time::sleep(grace).await;
                if let Some(cluster) = synced {
                    cluster.ready().await;
                }
            };
            tokio::select! {
                _ = over => grace_registry.end_grace(),
                _ = token.cancelled() => {}
            }
        });
        info!(%local_addr, %admin_addr, epoch = registry.epoch(), tls = registry_tls.is_some(), mtls = registry_tls.as_ref().is_some_and(ServerTls::verifies_clients), "configserver started");
        Ok(ConfigServer {
            tls: registry_tls.into_iter().chain(admin_tls).collect(),
            registry,
            governance,
            cluster,
            local_addr,
            admin_addr,
            shutdown,
            tracker,
        })
    }

    /// Reads the TLS certificate and key files again (on SIGHUP): new
    /// connections get the new certificate, open ones keep theirs. A file
    /// that fails to load leaves the old one in use, and says so.
    pub fn reload_tls(&self) {
        for tls in &self.tls {
            match tls.reload() {
                Ok(()) => info!(cert = %tls.files().cert.display(), "TLS certificate reloaded"),
                Err(e) => error!(error = %e, "TLS reload failed; the previous certificate stays in use"),
            }
        }
    }

    /// The registry port's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The cluster this server is a member of, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The rules: writes, reads and history.
    pub fn governance(&self) -> &Arc<Governance> {
        &self.governance
    }

    /// Stops serving: sessions end (nodes reconnect elsewhere), listeners close.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .is_err()
        {
            error!("tasks still running 10 s after shutdown");
        }
        self.governance.store().close().await;
        info!("configserver stopped");
    }
}

impl Drop for ConfigServer {
    /// Dropped without [`ConfigServer::shutdown`]: stop serving anyway
    /// (the tasks end on their own).
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Files the server keeps open besides its nodes' connections: its
/// listeners, the rule store's, logs, and the gRPC server's handoff.
const OTHER_FILES: u64 = 256;

/// The registry port's connection limit when none is set.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;

/// The connection limit to serve with: `configured`, or as many as the
/// open-file limit leaves room for (at most [`DEFAULT_MAX_CONNECTIONS`]).
/// The process's soft limit on open files is raised to its hard limit
/// first (as Go programs do at start): the usual soft limit, 1,024, would
/// stop accepts far below any useful number of nodes. A configured limit
/// past what the files allow is served with a warning: past the files,
/// accepts fail and nodes wait instead of being turned away.
fn connection_limit(configured: Option<usize>) -> Result<usize, StartError> {
    let room = open_files().map(|files| usize::try_from(files.saturating_sub(OTHER_FILES)).unwrap_or(usize::MAX));
    let max = match configured {
        Some(max) if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&max) => {
            return Err(StartError::MaxConnections(max));
        }
        Some(max) => {
            if let Some(room) = room.filter(|&room| room < max) {
                warn!(
                    max_connections = max,
                    room,
                    "the open-file limit leaves room for fewer connections than --max-connections: past them accepts fail; raise the limit (ulimit -n, LimitNOFILE=) or lower --max-connections"
                );
            }
            max
        }
        None => room.map_or(DEFAULT_MAX_CONNECTIONS, |room| room.clamp(1, DEFAULT_MAX_CONNECTIONS)),
    };
    info!(max_connections = max, "registry port connection limit");
    Ok(max)
}

/// The soft limit on open files, raised to the hard limit; `None`: none.
fn open_files() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The store used when none is configured: rules live as long as the server.
pub const IN_MEMORY_STORE: &str = "sqlite::memory:";
