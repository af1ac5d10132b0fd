//! The cluster: this ConfigServer's peers, and replication with them.
//!
//! Every ConfigServer of a cluster is a peer and accepts any node. Each
//! owns the providers and subscriptions of the sessions connected to it
//! and streams what it owns to every other member over one connection of
//! its own to each ([`link`]): a full copy when the link comes up, then
//! the net changes of each coalescing window (the same batches for every
//! peer, encoded once), heartbeats, and a digest every
//! [`ClusterConfig::digest_interval`] that the receiver compares with its
//! copy, asking for a full copy on a mismatch (anti-entropy). The
//! receiving side ([`inbound`]) merges each peer's copy into the live map
//! ([`crate::service_map`]), so every server serves reads and pushes from
//! the whole cluster's view.
//!
//! - Membership: a static list (`--peers`), or an address server's list
//!   fetched every [`ClusterConfig::address_refresh`]; a server names
//!   itself in either and leaves itself out. A peer is accepted only if it
//!   is a member; with credentials, only with the admin token.
//! - Ready: a starting server is ready (`/readyz`) and sends complete
//!   snapshots once every member it can reach has sent it a full copy, or
//!   after [`ClusterConfig::sync_timeout`].
//! - A peer gone: its copy stays whole for [`ClusterConfig::grace`]
//!   while its nodes move to other servers; then what no one else holds
//!   is probed ([`orphans`]): a provider that answers on its address stays
//!   (the peer is cut off, not dead), one that does not is removed.
//! - Rules: a rule written through any server is announced to its peers
//!   at once, which reload from the shared store.

pub mod inbound;
pub mod link;
mod orphans;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rpc_core::registry::address_server::AddressServer;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::governance::Governance;
use crate::node_session::Heartbeats;
use crate::service_map::Registry;

/// First bytes a peer sends on the registry port (the nodes' preface with
/// `P` for `C`); the last is [`PROTOCOL_VERSION`].
pub const PREFACE: [u8; 4] = [0xC7, b'T', b'P', PROTOCOL_VERSION as u8];

/// The peer protocol spoken; a peer speaking another is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest peer message accepted (a full copy of a server with many
/// sessions).
pub const MAX_PEER_FRAME: usize = 256 * 1024 * 1024;

/// How this server joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This server's member address: its registry port as the members
    /// list names it (`None`: the listen address, if it names a host).
    pub advertise: Option<String>,
    /// The members (this server may be among them).
    pub peers: Vec<String>,
    /// Or an address server's URL that lists them.
    pub address_server: Option<String>,
    /// How often the address server is asked again.
    pub address_refresh: Duration,
    /// How long a gone peer's copy is kept whole (`None`: the heartbeat
    /// timeout plus five seconds for its nodes to reconnect elsewhere).
    pub grace: Option<Duration>,
    /// How often each link sends a digest of what it replicates.
    pub digest_interval: Duration,
    /// Longest a starting server waits for its peers' full copies before
    /// it is ready anyway.
    pub sync_timeout: Duration,
    /// Test hook: batches of changes received from peers that are dropped
    /// unseen (as if lost), to show anti-entropy repairing them.
    pub drop_changes: usize,
    /// TLS on the links to peers (`None`: plain TCP): the CA their
    /// certificates come from, and this server's own certificate for
    /// peers that verify clients.
    pub tls: Option<rpc_core::net::ClientTls>,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            advertise: None,
            peers: Vec::new(),
            address_server: None,
            address_refresh: Duration::from_secs(10),
            grace: None,
            digest_interval: Duration::from_secs(2),
            sync_timeout: Duration::from_secs(10),
            drop_changes: 0,
            tls: None,
        }
    }
}

impl ClusterConfig {
    /// Whether this server has peers at all.
    pub fn enabled(&self) -> bool {
        !self.peers.is_empty() || self.address_server.is_some()
    }
}

/// Why the cluster settings cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("the listen address {0} names no host: set --advertise to this server's member address")]
    NoAdvertise(std::net::SocketAddr),
    #[error("member {0:?} is not host:port")]
    BadMember(String),
    #[error(transparent)]
    AddressServer(#[from] rpc_core::registry::address_server::AddressServerError),
}

/// A link's state, as `/api/cluster` shows it.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    pub connected: bool,
    pub since: Option<Instant>,
    pub attempts: u64,
    pub last_error: Option<String>,
    /// Batches sent since the link came up, and full copies.
    pub batches: u64,
    pub fulls: u64,
    pub bytes: u64,
}

/// One member's outbound link, while it is a member.
#[derive(Debug)]
struct Member {
    stop: CancellationToken,
    kick: Arc<Notify>,
    status: Arc<Mutex<LinkStatus>>,
}

/// This server's cluster: its members, the links to them and readiness.
#[derive(Debug)]
pub struct Cluster {
    node: String,
    admin: String,
    config: ClusterConfig,
    grace: Duration,
    registry: Arc<Registry>,
    governance: Arc<Governance>,
    heartbeats: Heartbeats,
    /// The admin token, required of peers when credentials are on.
    token: Option<String>,
    members: Mutex<BTreeMap<String, Member>>,
    /// The members are known: a static list, or the address server answered.
    members_known: AtomicBool,
    ready: AtomicBool,
    /// Woken when a peer's full copy is applied or a link fails: readiness
    /// is looked at again.
    progress: Notify,
    drop_changes: AtomicUsize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Cluster {
    /// Starts the links to `config`'s members (fetched from the address
    /// server if it names one), the membership refresh and the orphans'
    /// checks.
    ///
    /// # Errors
    ///
    /// No member address for this server, a member that is not
    /// `host:port`, or a bad address server URL.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: ClusterConfig,
        listen: std::net::SocketAddr,
        admin: std::net::SocketAddr,
        registry: Arc<Registry>,
        governance: Arc<Governance>,
        heartbeats: Heartbeats,
        token: Option<String>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let node = match &config.advertise {
            Some(node) => node.clone(),
            None if !listen.ip().is_unspecified() => listen.to_string(),
            None => return Err(ClusterError::NoAdvertise(listen)),
        };
        for member in config.peers.iter().chain([&node]) {
            check_member(member)?;
        }
        let address_server = config.address_server.as_deref().map(AddressServer::parse).transpose()?;
        let grace = config.grace.unwrap_or(heartbeats.timeout + Duration::from_secs(5));
        registry.enable_replication(node.clone());
        let cluster = Arc::new(Cluster {
            node,
            admin: admin.to_string(),
            drop_changes: AtomicUsize::new(config.drop_changes),
            config,
            grace,
            registry,
            governance,
            heartbeats,
            token,
            members: Mutex::new(BTreeMap::new()),
            members_known: AtomicBool::new(address_server.is_none()),
            ready: AtomicBool::new(false),
            progress: Notify::new(),
            shutdown,
            tracker,
        });
        cluster.set_members(cluster.config.peers.clone());
        info!(node = %cluster.node, members = ?cluster.member_names(), ?grace, "cluster: replicating to peers");
        if let Some(address_server) = address_server {
            cluster
                .tracker
                .spawn(cluster.clone().follow_address_server(address_server));
        }
        cluster.tracker.spawn(orphans::check(cluster.clone()));
        cluster.tracker.spawn(cluster.clone().become_ready());
        Ok(cluster)
    }

    /// This server's member address.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub(crate) fn heartbeats(&self) -> Heartbeats {
        self.heartbeats
    }

    /// The other members, by name.
    pub fn member_names(&self) -> Vec<String> {
        self.members.lock().expect("members lock").keys().cloned().collect()
    }

    /// Whether `node` is a member (other than this server).
    pub fn is_member(&self, node: &str) -> bool {
        self.members.lock().expect("members lock").contains_key(node)
    }

    /// Each other member's link.
    pub fn links(&self) -> Vec<(String, LinkStatus)> {
        self.members
            .lock()
            .expect("members lock")
            .iter()
            .map(|(name, m)| (name.clone(), m.status.lock().expect("link status lock").clone()))
            .collect()
    }

    /// The members live now: this server, and every member whose link is up
    /// or whose own link here is.
    pub fn live_members(&self) -> Vec<String> {
        let connected_here: BTreeSet<String> = self
            .registry
            .replicas()
            .into_iter()
            .filter(|r| r.connected)
            .map(|r| r.node)
            .collect();
        let mut live: Vec<String> = self
            .links()
            .into_iter()
            .filter(|(name, status)| status.connected || connected_here.contains(name))
            .map(|(name, _)| name)
            .collect();
        live.push(self.node.clone());
        live.sort();
        live
    }

    /// Whether this server has its peers' data (see the module docs).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Waits until [`Cluster::is_ready`].
    pub async fn ready(&self) {
        loop {
            let progressed = self.progress.notified();
            if self.is_ready() {
                return;
            }
            progressed.await;
        }
    }

    /// The members this server has no full copy from yet, though it can
    /// reach them.
    pub fn waiting_for(&self) -> Vec<String> {
        if !self.members_known.load(Ordering::Acquire) {
            return vec![format!(
                "the address server {}",
                self.config.address_server.as_deref().unwrap_or("")
            )];
        }
        self.members
            .lock()
            .expect("members lock")
            .iter()
            .filter(|(name, m)| {
                let status = m.status.lock().expect("link status lock");
                // Nothing listens there (or nothing answers): the member
                // is down, and it has nothing to give. A member that
                // answered but did not take the link is waited for.
                let unreachable = !status.connected
                    && status.attempts > 0
                    && status.last_error.as_deref().is_some_and(|e| e.starts_with("connect:"));
                !unreachable && !self.registry.synced_with(name)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Ready once every reachable member has sent its full copy, or after
    /// the sync timeout.
    async fn become_ready(self: Arc<Self>) {
        let deadline = tokio::time::Instant::now() + self.config.sync_timeout;
        loop {
            let progressed = self.progress.notified();
            let waiting = self.waiting_for();
            if waiting.is_empty() {
                info!("cluster: every reachable peer's data is here; ready");
                break;
            }
            tokio::select! {
                _ = progressed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(?waiting, timeout = ?self.config.sync_timeout, "cluster: ready without these peers' data");
                    break;
                }
                _ = self.shutdown.cancelled() => return,
            }
        }
        self.ready.store(true, Ordering::Release);
        self.progress.notify_waiters();
    }

    /// Something readiness depends on changed.
    pub(crate) fn progressed(&self) {
        self.progress.notify_waiters();
    }

    /// `node` connected here: if this server's link to it is waiting to
    /// retry, it tries now (the peer has just started).
    pub(crate) fn peer_seen(&self, node: &str) {
        if let Some(member) = self.members.lock().expect("members lock").get(node) {
            member.kick.notify_one();
        }
    }

    /// Whether to drop the next batch received (the test hook).
    pub(crate) fn drop_next_changes(&self) -> bool {
        self.drop_changes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    pub(crate) fn governance(&self) -> &Arc<Governance> {
        &self.governance
    }

    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub(crate) fn admin(&self) -> &str {
        &self.admin
    }

    pub(crate) fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Makes `names` the members: links start to new ones and stop to
    /// those gone. This server's own name is left out.
    fn set_members(self: &Arc<Self>, names: Vec<String>) {
        let wanted: BTreeSet<String> = names.into_iter().filter(|n| *n != self.node).collect();
        let mut members = self.members.lock().expect("members lock");
        members.retain(|name, member| {
            let keep = wanted.contains(name);
            if !keep {
                info!(peer = %name, "cluster: member left");
                member.stop.cancel();
            }
            keep
        });
        for name in wanted {
            if members.contains_key(&name) {
                continue;
            }
            let member = Member {
                stop: self.shutdown.child_token(),
                kick: Arc::new(Notify::new()),
                status: Arc::new(Mutex::new(LinkStatus::default())),
            };
            self.tracker.spawn(link::run(
                self.clone(),
                name.clone(),
                member.stop.clone(),
                member.kick.clone(),
                member.status.clone(),
            ));
            members.insert(name, member);
        }
    }

    /// Keeps the members those the address server lists; its last list
    /// stays while it cannot be reached.
    async fn follow_address_server(self: Arc<Self>, address_server: AddressServer) {
        loop {
            match address_server.fetch(self.heartbeats.timeout).await {
                Ok(list) => {
                    if let Some(bad) = list.iter().find(|m| check_member(m).is_err()) {
                        warn!(member = %bad, "address server listed a bad member; list ignored");
                    } else {
                        self.set_members(list);
                        self.members_known.store(true, Ordering::Release);
                        self.progressed();
                    }
                }
                Err(e) => warn!(error = %e, "cluster: cannot fetch the members; keeping the last list"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.address_refresh) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }
}

fn check_member(member: &str) -> Result<(), ClusterError> {
    rpc_core::registry::address_server::parse_list(member)
        .ok()
        .filter(|list| list.len() == 1)
        .map(|_| ())
        .ok_or_else(|| ClusterError::BadMember(member.to_owned()))
}
