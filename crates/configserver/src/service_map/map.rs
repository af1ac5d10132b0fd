//! The live map itself: sessions, services, and each service's providers,
//! consumers and subscribers, as the sessions' requests change it
//! (register, unregister, subscribe, unsubscribe, close); with peers, the
//! copies of their data that hold providers beside the sessions
//! ([`Replica`], changed by `replicas.rs`) and what this server replicates
//! ([`Outbound`], by `replication.rs`).
//!
//! All state sits behind one `std::sync::Mutex` ([`Registry::lock`]), never
//! held across an `.await`. Lock order: the registry, then a session's
//! [`PushQueue`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rpc_core::ServiceKey;
use rpc_core::governance::RuleSet;
use rpc_core::registry::Addr;
use rpc_core::registry::convert::instance_addr;
use tern_proto::registry::Instance;
use tokio::sync::Notify;
use tracing::{debug, info};

use super::answer::RequestError;
use super::pending::Pending;
use super::push_queue::PushQueue;
use crate::metrics::Metrics;
use crate::outgoing::PushedDelta;

/// Session identifier, unique within one server run.
pub type SessionId = u64;

/// Limits and timings of the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Deltas kept per service for nodes that reconnect or lag.
    pub history_len: usize,
    /// A node further behind than this many deltas gets a snapshot instead,
    /// unless those deltas carry fewer entries than the snapshot would (a
    /// storm's deltas to a large list).
    pub max_catch_up_deltas: usize,
    /// After a start, snapshots are partial for this long (see
    /// `Snapshot.partial`): providers are still re-registering.
    pub startup_grace: Duration,
    /// Largest encoded instance accepted.
    pub max_instance_bytes: usize,
    /// Most instances one session may register, and most subscriptions.
    pub max_per_session: usize,
    /// Highest weight accepted.
    pub max_weight: u32,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            history_len: 64,
            max_catch_up_deltas: 8,
            startup_grace: Duration::from_secs(5),
            max_instance_bytes: 16 * 1024,
            max_per_session: 10_000,
            max_weight: 10_000,
        }
    }
}

/// What a node said about itself in Hello.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub app: String,
    pub role: i32,
    pub host: String,
    pub zone: String,
    pub peer: Option<SocketAddr>,
}

#[derive(Debug)]
pub(super) struct SessionEntry {
    /// Shared with every subscription of the session (never copied).
    pub(super) node: Arc<NodeInfo>,
    pub(super) registered: BTreeSet<(ServiceKey, Addr)>,
    pub(super) subscribed: BTreeSet<ServiceKey>,
    pub(super) push: Arc<PushQueue>,
}

/// A session that ended after a stall, and what it still holds.
#[derive(Debug)]
pub(super) struct Lingering {
    pub(super) node: Arc<NodeInfo>,
    pub(super) registered: BTreeSet<(ServiceKey, Addr)>,
}

#[derive(Debug, Default)]
pub(super) struct ServiceEntry {
    /// Each provider and who holds it: one of this server's sessions, or
    /// the replica of a peer's data (see [`super::replicas`]).
    pub(super) providers: BTreeMap<Addr, (Instance, SessionId)>,
    /// This server's sessions that subscribe.
    pub(super) consumers: BTreeMap<SessionId, Arc<NodeInfo>>,
    /// Peers' sessions that subscribe: by replica, then the session's id
    /// on its own server.
    pub(super) remote_consumers: BTreeMap<(SessionId, u64), NodeInfo>,
    pub(super) subscribers: BTreeSet<SessionId>,
    pub(super) revision: u64,
    pub(super) history: VecDeque<Arc<PushedDelta>>,
    pub(super) pending: Pending,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) services: HashMap<ServiceKey, ServiceEntry>,
    /// Governance rules by service (set by the rule store).
    pub(super) rules: HashMap<ServiceKey, Arc<RuleSet>>,
    pub(super) sessions: HashMap<SessionId, SessionEntry>,
    pub(super) dirty: BTreeSet<ServiceKey>,
    /// Changes made since the last flush (one per registration, removal or
    /// instance of a closed session).
    pub(super) pending_changes: usize,
    pub(super) next_session: SessionId,
    /// Where a (re)created service's revisions start: above every revision
    /// of every service removed so far. A node may still hold a revision of
    /// a removed service; revisions restarting at 0 would let it resume (or
    /// a delta flushed for the old one apply) on the new service's numbers.
    pub(super) revision_floor: u64,
    /// Copies of peers' data, by the id each is held under as a holder of
    /// providers (ids of the same series as sessions').
    pub(super) replicas: HashMap<SessionId, Replica>,
    /// Links of peers opened so far (each feeds its copy under its number).
    pub(super) replica_links: u64,
    /// Sessions of this server that held an instance before another
    /// session of the same node took it over, with what they registered,
    /// newest last: when the new holder lets go while an earlier one still
    /// lives, the earlier one holds it again. A session that says it is
    /// the same node can take an instance over, not take it away.
    pub(super) handed_over: HashMap<(ServiceKey, Addr), Vec<(SessionId, Instance)>>,
    /// Sessions that ended in the grace after a stall of this server
    /// (`stall.rs`), whose instances stay listed until the grace ends or
    /// the node registers them again: its nodes gave up on the stalled
    /// server and reconnect, as after a restart.
    pub(super) lingering: HashMap<SessionId, Lingering>,
    /// What this server owns, as it is replicated to peers; `None` when
    /// the server has no peers (nothing is tracked).
    pub(super) outbound: Option<Outbound>,
}

impl State {
    /// Notes a change of `key` for the next flush.
    pub(super) fn mark_dirty(&mut self, key: &ServiceKey) {
        self.dirty.insert(key.clone());
        self.pending_changes += 1;
    }

    /// Notes that this server's own provider `addr` of `key` changed, for
    /// the next batch to peers.
    pub(super) fn note_owned_provider(&mut self, key: &ServiceKey, addr: &Addr) {
        if let Some(outbound) = &mut self.outbound {
            outbound.note_provider(key, addr);
        }
    }

    /// Notes that this server's session `id` subscribed to `key` or stopped.
    pub(super) fn note_owned_consumer(&mut self, key: &ServiceKey, id: SessionId) {
        if let Some(outbound) = &mut self.outbound {
            outbound.note_consumer(key, id);
        }
    }

    /// Puts `instance` in `key`'s providers, held by `holder` (a session,
    /// or a replica), as a change for the next flush.
    pub(super) fn put_provider(&mut self, key: &ServiceKey, addr: Addr, instance: Instance, holder: SessionId) {
        let entry = self.service(key);
        let existed_at_flush = entry.providers.contains_key(&addr) && !entry.pending.added.contains_key(&addr)
            || entry.pending.removed.contains(&addr);
        entry.pending.add(&addr, instance.clone(), existed_at_flush);
        entry.providers.insert(addr, (instance, holder));
        self.mark_dirty(key);
    }

    /// The entry of `key`, created (its revisions above the floor) if absent.
    pub(super) fn service(&mut self, key: &ServiceKey) -> &mut ServiceEntry {
        let floor = self.revision_floor;
        self.services.entry(key.clone()).or_insert_with(|| ServiceEntry {
            revision: floor,
            ..ServiceEntry::default()
        })
    }
}

// === peers' copies and this server's replication (operations in
// `replicas.rs` and `replication.rs`) ===

/// One peer's data as this server holds it.
#[derive(Debug)]
pub(crate) struct Replica {
    pub(super) node: String,
    pub(super) epoch: String,
    pub(super) admin: String,
    /// Since when its link is down; `None` while it is up.
    pub(super) orphaned: Option<Instant>,
    /// Which of the peer's links feeds it now: an older link of the same
    /// run (still ending) may neither apply nor orphan it.
    pub(super) link: u64,
    /// A full copy has been applied since the link came up.
    pub(super) synced: bool,
    /// As applied: what the peer's digests are compared with.
    pub(super) summary: Summary,
    pub(super) providers: HashMap<(ServiceKey, Addr), (Instance, u64)>,
    pub(super) consumers: HashMap<(ServiceKey, u64), NodeInfo>,
    /// Between the peer making its last batch and this server applying it.
    pub(super) last_lag_ms: Option<i64>,
    pub(super) last_applied: Option<Instant>,
}

/// What this server owns, as replicated so far.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// This server's member address: the owner named in what it sends.
    pub(super) node: String,
    pub(super) dirty_providers: HashSet<(ServiceKey, Addr)>,
    pub(super) dirty_consumers: HashSet<(ServiceKey, SessionId)>,
    /// The hash of each entry as last batched, by a hash of its identity.
    pub(super) sent: HashMap<u64, u64>,
    pub(super) summary: Summary,
    pub(super) batches: tokio::sync::broadcast::Sender<Batch>,
}

/// The owner's data as of one batch, summed up (what a `Digest` says).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub seq: u64,
    /// XOR of the hash of every entry ([`provider_hash`], [`consumer_hash`]).
    pub hash: u64,
    pub providers: u64,
    pub consumers: u64,
    /// The owner's sessions when the batch was made.
    pub sessions: u64,
}

/// One batch of changes, encoded once for every peer link.
#[derive(Debug, Clone)]
pub struct Batch {
    pub summary: Summary,
    /// A `PeerMessage` carrying `Changes`.
    pub encoded: Bytes,
}

/// The registry of one ConfigServer.
#[derive(Debug)]
pub struct Registry {
    pub(super) state: Mutex<State>,
    pub(super) config: RegistryConfig,
    pub(super) epoch: String,
    pub(super) started: Instant,
    pub(super) grace_over: AtomicBool,
    /// The stall watchdog's last tick, and since when the server has run
    /// without a stall (milliseconds since `started`; see `stall.rs`).
    pub(super) last_tick_ms: AtomicU64,
    pub(super) awake_since_ms: AtomicU64,
    /// In the grace that follows a stall: ending sessions linger.
    pub(super) after_stall: AtomicBool,
    /// Woken on every change; the flusher waits on it.
    pub changed: Notify,
    /// Pushes of the last flush not yet sent (approximately: see
    /// [`Registry::pushed`]); the flusher holds the next flush while some are.
    pub(super) outstanding: AtomicUsize,
    /// Woken when `outstanding` reaches zero.
    pub drained: Notify,
    pub metrics: Metrics,
}

// === impl Registry ===

impl Registry {
    pub fn new(config: RegistryConfig) -> Registry {
        let epoch = format!("{:016x}", rand::random::<u64>());
        Registry {
            state: Mutex::new(State::default()),
            grace_over: AtomicBool::new(config.startup_grace.is_zero()),
            config,
            epoch,
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            awake_since_ms: AtomicU64::new(0),
            after_stall: AtomicBool::new(false),
            changed: Notify::new(),
            outstanding: AtomicUsize::new(0),
            drained: Notify::new(),
            metrics: Metrics::default(),
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("registry lock")
    }

    pub fn open_session(&self, node: NodeInfo) -> (SessionId, Arc<PushQueue>) {
        let mut state = self.lock();
        state.next_session += 1;
        let id = state.next_session;
        let push = Arc::new(PushQueue::default());
        info!(session = id, app = %node.app, host = %node.host, peer = ?node.peer, "session opened");
        state.sessions.insert(
            id,
            SessionEntry {
                node: Arc::new(node),
                registered: BTreeSet::new(),
                subscribed: BTreeSet::new(),
                push: push.clone(),
            },
        );
        self.metrics.sessions_opened.fetch_add(1, Ordering::Relaxed);
        (id, push)
    }

    /// The app a session said it is in its Hello.
    pub fn app_of(&self, id: SessionId) -> Option<String> {
        self.lock().sessions.get(&id).map(|s| s.node.app.clone())
    }

    /// Removes a session's instances, subscriptions and consumer entries.
    pub fn close_session(&self, id: SessionId, reason: &str) {
        let mut state = self.lock();
        let Some(session) = state.sessions.remove(&id) else {
            return;
        };
        let mut changed = false;
        let linger = self.after_stall.load(Ordering::Relaxed) && !session.registered.is_empty();
        if linger {
            // Its instances stay until the grace ends or the node is back.
            state.lingering.insert(
                id,
                Lingering {
                    node: session.node.clone(),
                    registered: session.registered.clone(),
                },
            );
        } else {
            for (key, addr) in &session.registered {
                forget_handover(&mut state, key, addr, id);
                changed |= remove_provider(&mut state, key, addr, id);
            }
        }
        for key in &session.subscribed {
            if let Some(entry) = state.services.get_mut(key) {
                entry.subscribers.remove(&id);
                entry.consumers.remove(&id);
            }
            state.note_owned_consumer(key, id);
            remove_if_unused(&mut state, key);
        }
        changed |= state.outbound.is_some() && !session.subscribed.is_empty();
        drop(state);
        info!(
            session = id,
            app = %session.node.app,
            instances = session.registered.len(),
            subscriptions = session.subscribed.len(),
            reason,
            "session closed"
        );
        self.metrics.sessions_closed.fetch_add(1, Ordering::Relaxed);
        if changed {
            self.changed.notify_one();
        }
    }

    /// Validates and stores a provider instance.
    ///
    /// # Errors
    ///
    /// A bad service key, host, port or weight, an instance over the size
    /// limit, an address another session holds, or too many registrations.
    pub fn register(&self, id: SessionId, key: ServiceKey, mut instance: Instance) -> Result<(), RequestError> {
        key.validate().map_err(|e| RequestError::Invalid(e.to_string()))?;
        self.validate_instance(&key, &instance)?;
        if instance.protocol.is_empty() {
            instance.protocol = "tern".into();
        }
        let addr = instance_addr(&instance);
        let mut state = self.lock();
        let session = state
            .sessions
            .get(&id)
            .ok_or_else(|| RequestError::NotFound(format!("session {id}")))?;
        if instance.app.is_empty() {
            instance.app = session.node.app.as_str().into();
        }
        if session.registered.len() >= self.config.max_per_session
            && !session.registered.contains(&(key.clone(), addr.clone()))
        {
            return Err(RequestError::TooLarge(format!(
                "session {id} already registers {} instances, the limit",
                session.registered.len()
            )));
        }
        let node = session.node.clone();
        let holder = state
            .services
            .get(&key)
            .and_then(|e| e.providers.get(&addr))
            .map(|(i, owner)| (i.clone(), *owner));
        let unchanged = holder.as_ref().is_some_and(|(existing, _)| *existing == instance);
        match holder {
            // A peer's copy gives way to the node itself: it is connected
            // here now (it moved, or its old server died).
            Some((_, owner)) if state.replicas.contains_key(&owner) => {
                debug!(session = id, replica = owner, service = %key, %addr, "instance taken over from a peer's copy");
            }
            Some((_, owner)) if owner != id => {
                let same_node = state
                    .sessions
                    .get(&owner)
                    .map(|o| &o.node)
                    .or_else(|| state.lingering.get(&owner).map(|l| &l.node))
                    .is_some_and(|o| o.app == node.app && o.host == node.host);
                if !same_node {
                    return Err(RequestError::Duplicate(format!(
                        "{key} provider {addr} is already registered by session {owner}"
                    )));
                }
                // The same node on a new stream (its old one not expired
                // yet): the new session takes the instance over; the old
                // one keeps its claim, and holds it again if the new one
                // goes first.
                let existing = holder.as_ref().map(|(i, _)| i.clone()).expect("matched Some");
                let earlier = state.handed_over.entry((key.clone(), addr.clone())).or_default();
                earlier.retain(|(s, _)| *s != owner && *s != id);
                earlier.push((owner, existing));
                debug!(session = id, previous = owner, service = %key, %addr, "instance handed over to the node's new session");
            }
            _ => {}
        }
        if let Some(session) = state.sessions.get(&id)
            && !session.registered.iter().any(|(k, _)| *k == key)
        {
            session.push.mark_rules(&key);
        }
        if unchanged {
            let from_replica = holder.as_ref().is_some_and(|(_, o)| state.replicas.contains_key(o));
            if let Some((_, owner)) = state.services.get_mut(&key).and_then(|e| e.providers.get_mut(&addr)) {
                *owner = id;
            }
            state.note_owned_provider(&key, &addr);
            if let Some(session) = state.sessions.get_mut(&id) {
                session.registered.insert((key, addr));
            }
            drop(state);
            if from_replica {
                // Nothing changes for subscribers here, but the peers
                // must learn that this server holds it now.
                self.changed.notify_one();
            }
            return Ok(());
        }
        state.note_owned_provider(&key, &addr);
        state.put_provider(&key, addr.clone(), instance, id);
        if let Some(session) = state.sessions.get_mut(&id) {
            session.registered.insert((key.clone(), addr.clone()));
        }
        drop(state);
        debug!(session = id, service = %key, %addr, "registered");
        self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
        Ok(())
    }

    /// # Errors
    ///
    /// [`RequestError::NotFound`] if this session does not hold that instance.
    pub fn unregister(&self, id: SessionId, key: &ServiceKey, host: &str, port: u32) -> Result<(), RequestError> {
        let addr = Addr::new(host, port);
        let mut state = self.lock();
        let held = state
            .sessions
            .get_mut(&id)
            .is_some_and(|s| s.registered.remove(&(key.clone(), addr.clone())));
        if !held {
            return Err(RequestError::NotFound(format!(
                "{key} provider {addr} is not registered by this session"
            )));
        }
        let holds = state
            .services
            .get(key)
            .and_then(|e| e.providers.get(&addr))
            .is_some_and(|(_, holder)| *holder == id);
        if holds {
            // The node asked for its removal: no earlier session of it
            // holds the instance again.
            state.handed_over.remove(&(key.clone(), addr.clone()));
        } else {
            forget_handover(&mut state, key, &addr, id);
        }
        remove_provider(&mut state, key, &addr, id);
        drop(state);
        debug!(session = id, service = %key, %addr, "unregistered");
        self.changed.notify_one();
        Ok(())
    }

    /// Subscribes a session to a service and schedules what it must be sent:
    /// the deltas since `known` (epoch, revision) if the history covers
    /// them, else a snapshot.
    ///
    /// # Errors
    ///
    /// A bad service key, or too many subscriptions.
    pub fn subscribe(&self, id: SessionId, key: ServiceKey, known: Option<(&str, u64)>) -> Result<(), RequestError> {
        key.validate().map_err(|e| RequestError::Invalid(e.to_string()))?;
        let mut state = self.lock();
        let session = state
            .sessions
            .get_mut(&id)
            .ok_or_else(|| RequestError::NotFound(format!("session {id}")))?;
        if session.subscribed.len() >= self.config.max_per_session && !session.subscribed.contains(&key) {
            return Err(RequestError::TooLarge(format!(
                "session {id} already has {} subscriptions, the limit",
                session.subscribed.len()
            )));
        }
        if session.subscribed.insert(key.clone()) {
            session.push.mark_rules(&key);
        }
        let (node, push) = (session.node.clone(), session.push.clone());
        let entry = state.service(&key);
        entry.subscribers.insert(id);
        let new_consumer = entry.consumers.insert(id, node).is_none();
        let resume = known.and_then(|(epoch, revision)| {
            let covered = epoch == self.epoch
                && revision <= entry.revision
                && (revision == entry.revision || entry.history.front().is_some_and(|d| d.from_revision <= revision));
            covered.then_some(revision)
        });
        let replicate = new_consumer && state.outbound.is_some();
        if replicate {
            state.note_owned_consumer(&key, id);
        }
        push.mark(&key, Some(resume));
        drop(state);
        debug!(session = id, service = %key, resume = ?resume, "subscribed");
        if replicate {
            self.changed.notify_one();
        }
        Ok(())
    }

    pub fn unsubscribe(&self, id: SessionId, key: &ServiceKey) {
        let mut state = self.lock();
        if let Some(session) = state.sessions.get_mut(&id) {
            session.subscribed.remove(key);
            session.push.forget(key);
        }
        if let Some(entry) = state.services.get_mut(key) {
            entry.subscribers.remove(&id);
            if entry.consumers.remove(&id).is_some() && state.outbound.is_some() {
                state.note_owned_consumer(key, id);
                self.changed.notify_one();
            }
        }
        remove_if_unused(&mut state, key);
    }

    /// Whether the startup grace period is still running.
    pub fn in_grace(&self) -> bool {
        !self.grace_over.load(Ordering::Relaxed)
    }

    /// When the startup grace period ends: every subscriber gets a complete
    /// snapshot, so removals the grace period held back now apply.
    pub fn end_grace(&self) {
        let lingered = self.after_stall.swap(false, Ordering::Relaxed);
        if lingered {
            self.let_go_of_lingering();
        }
        if self.grace_over.swap(true, Ordering::Relaxed) {
            return;
        }
        let state = self.lock();
        for session in state.sessions.values() {
            for key in &session.subscribed {
                session.push.mark(key, Some(None));
            }
        }
        info!(after = ?self.started.elapsed(), "startup grace period over; sending complete snapshots");
    }
}

impl Registry {
    /// The grace after a stall is over: what sessions that ended in it
    /// still hold goes (their nodes registered what lives elsewhere).
    fn let_go_of_lingering(&self) {
        let mut state = self.lock();
        let lingering = std::mem::take(&mut state.lingering);
        let mut changed = false;
        for (id, l) in &lingering {
            for (key, addr) in &l.registered {
                forget_handover(&mut state, key, addr, *id);
                changed |= remove_provider(&mut state, key, addr, *id);
            }
        }
        drop(state);
        if !lingering.is_empty() {
            info!(
                sessions = lingering.len(),
                "grace after the stall over: instances of sessions that did not come back removed"
            );
        }
        if changed {
            self.changed.notify_one();
        }
    }
}

/// Drops a service nobody provides, subscribes to or is changing. A node
/// that later resumes it from an old revision gets a snapshot.
pub(super) fn remove_if_unused(state: &mut State, key: &ServiceKey) {
    if state.services.get(key).is_some_and(|e| {
        e.providers.is_empty()
            && e.subscribers.is_empty()
            && e.consumers.is_empty()
            && e.remote_consumers.is_empty()
            && e.pending.is_empty()
    }) && !state.dirty.contains(key)
        && let Some(entry) = state.services.remove(key)
    {
        state.revision_floor = state.revision_floor.max(entry.revision + 1);
    }
}

/// Removes `addr` from `key` if `owner` holds it; true if something
/// changed. A peer's copy that also lists it (a node that moved between
/// servers) then holds it.
pub(super) fn remove_provider(state: &mut State, key: &ServiceKey, addr: &Addr, owner: SessionId) -> bool {
    let Some(entry) = state.services.get_mut(key) else {
        return false;
    };
    match entry.providers.get(addr) {
        Some((_, holder)) if *holder == owner => {}
        _ => return false,
    }
    entry.providers.remove(addr);
    entry.pending.remove(addr);
    state.mark_dirty(key);
    // A session's (it may be closing, no longer listed), not a replica's.
    if !state.replicas.contains_key(&owner) {
        state.note_owned_provider(key, addr);
    }
    if let Some((session, instance)) = earlier_holder(state, key, addr) {
        state.put_provider(key, addr.clone(), instance, session);
        return true;
    }
    if let Some((replica, instance)) = other_claim(state, key, addr, owner) {
        state.put_provider(key, addr.clone(), instance, replica);
    }
    true
}

/// The latest earlier holder of `addr` of `key` (see
/// [`State::handed_over`]) that still lives and still registers it.
fn earlier_holder(state: &mut State, key: &ServiceKey, addr: &Addr) -> Option<(SessionId, Instance)> {
    let wanted = (key.clone(), addr.clone());
    let earlier = state.handed_over.get_mut(&wanted)?;
    let found = loop {
        let Some((session, instance)) = earlier.pop() else {
            break None;
        };
        let still = state
            .sessions
            .get(&session)
            .is_some_and(|s| s.registered.contains(&wanted));
        if still {
            break Some((session, instance));
        }
    };
    if earlier.is_empty() {
        state.handed_over.remove(&wanted);
    }
    found
}

/// Session `id` no longer claims `addr` of `key` as an earlier holder.
fn forget_handover(state: &mut State, key: &ServiceKey, addr: &Addr, id: SessionId) {
    if state.handed_over.is_empty() {
        return;
    }
    let wanted = (key.clone(), addr.clone());
    if let Some(earlier) = state.handed_over.get_mut(&wanted) {
        earlier.retain(|(s, _)| *s != id);
        if earlier.is_empty() {
            state.handed_over.remove(&wanted);
        }
    }
}

/// A connected peer's claim on `addr` of `key`, to hold it when `except`
/// lets go. An orphan's claim never takes a provider back: its peer is
/// gone, and the provider may have been unregistered since it moved.
pub(super) fn other_claim(
    state: &State,
    key: &ServiceKey,
    addr: &Addr,
    except: SessionId,
) -> Option<(SessionId, Instance)> {
    if state.replicas.is_empty() {
        return None;
    }
    let wanted = (key.clone(), addr.clone());
    state
        .replicas
        .iter()
        .filter(|(id, _)| **id != except)
        .filter(|(_, r)| r.orphaned.is_none())
        .filter_map(|(id, r)| r.providers.get(&wanted).map(|(i, _)| (*id, i)))
        .min_by_key(|(id, _)| *id)
        .map(|(id, i)| (id, i.clone()))
}
