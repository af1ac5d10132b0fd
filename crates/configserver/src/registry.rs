//! The live map `service -> providers, consumers`, its revisions and the
//! bounded history of recent deltas.
//!
//! # How a change travels
//!
//! 1. A session registers, unregisters, or goes away. The change lands in the
//!    service's *pending* set and the service is marked dirty;
//!    [`Registry::changed`] wakes the flusher.
//! 2. The flusher waits the coalescing window, then [`Registry::flush`]es:
//!    each dirty service with a net change gets a new revision and one
//!    [`Delta`] (kept in a bounded history), and each subscriber session is
//!    marked dirty for that service.
//! 3. Each session's push task asks [`Registry::catch_up`] for what its node
//!    lacks: the deltas since the revision it was last sent, or one fresh
//!    snapshot when the history no longer covers it or the node is far behind.
//!
//! A subscriber that reads slowly therefore never builds a backlog: it holds
//! at most one "dirty" mark per service, and catches up with deltas or one
//! snapshot when it is ready.
//!
//! Governance rules travel the same way: [`Registry::set_rules`] marks every
//! session that provides or subscribes to the service, and each session's
//! push task sends it the current [`RuleSet`] (the latest, never a backlog).
//!
//! All state sits behind one `std::sync::Mutex`, never held across an
//! `.await`. Lock order: the registry, then a session's [`PushQueue`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use prost::Message;
use rpc_core::ServiceKey;
use rpc_core::governance::RuleSet;
use rpc_core::registry::Addr;
use rpc_core::registry::convert::instance_addr;
use tern_proto::registry::{self as pb, Delta, Instance, ServerMessage, Snapshot, server_message};
use tokio::sync::Notify;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::outgoing::{Deliver, Outgoing, PushedDelta};

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

/// A refused request. The message names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Duplicate(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
}

impl RequestError {
    /// The `Error.kind` sent to the node.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::Invalid(_) => "invalid",
            RequestError::Duplicate(_) => "duplicate",
            RequestError::TooLarge(_) => "too_large",
            RequestError::NotFound(_) => "not_found",
            RequestError::Forbidden(_) => "forbidden",
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

/// Services a session must be sent, and what it was last sent of each.
#[derive(Debug, Default)]
pub struct PushQueue {
    state: Mutex<PushState>,
    notify: Notify,
    /// The session's transport, if it takes deltas from the flusher
    /// directly (see [`PushQueue::attach`]).
    direct: OnceLock<Weak<dyn Deliver>>,
}

#[derive(Debug, Default)]
struct PushState {
    /// Each with the delta that made it dirty, when exactly one did: a
    /// session that holds the revision before it sends it without asking
    /// the registry (whose lock a thousand sessions would queue on).
    dirty: BTreeMap<ServiceKey, Option<Arc<PushedDelta>>>,
    sent: HashMap<ServiceKey, Sent>,
    /// Services whose rules the session must be sent.
    rules: BTreeSet<ServiceKey>,
    /// Last generation handed out; it only goes up, across unsubscribes
    /// too, so a push in flight is never taken for one after a reset.
    generation: u64,
    /// Services handed to the session's task by [`PushQueue::next`] and not
    /// yet reported [`PushQueue::sent`]: the flusher leaves them to it,
    /// since what it is sending is not recorded yet.
    in_flight: BTreeSet<ServiceKey>,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    /// Revision last sent; `None` = send a snapshot.
    revision: Option<u64>,
    /// Bumped whenever `revision` is reset from outside the push task (a
    /// new subscription, the end of the startup grace), so a push that was
    /// in flight meanwhile cannot overwrite the reset.
    generation: u64,
}

/// What a session's push task must send next.
#[derive(Debug, Default)]
pub struct Work {
    pub due: Vec<Due>,
    /// Some service's rules must be sent: [`PushQueue::take_rules`] takes
    /// them (under the session's rules gate, see `node_session.rs`).
    pub rules: bool,
}

/// A service due to be pushed to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub key: ServiceKey,
    /// Revision last sent; `None` = the session needs a snapshot.
    pub sent: Option<u64>,
    generation: u64,
    /// The one delta that made it dirty, if one did.
    hint: Option<Arc<PushedDelta>>,
}

impl Due {
    /// The delta that brings the session up to date by itself, if the
    /// session holds the revision it starts from.
    pub fn next_delta(&self) -> Option<&Arc<PushedDelta>> {
        self.hint.as_ref().filter(|d| Some(d.from_revision) == self.sent)
    }
}

impl PushQueue {
    /// From now on, a flushed delta the session is up to date for is
    /// handed to `direct` by the flusher, not sent by the session's task.
    /// Weak: a session's transport lives as long as its connection.
    pub fn attach(&self, direct: Weak<dyn Deliver>) {
        let _ = self.direct.set(direct);
    }

    /// Hands `delta` (just flushed) to the session's transport if the
    /// session holds the revision it starts from and nothing else of `key`
    /// is due or being sent by the session's task; otherwise marks `key`
    /// for that task. Whether it was handed over.
    fn push_delta(&self, key: &ServiceKey, delta: &Arc<PushedDelta>) -> bool {
        if let Some(direct) = self.direct.get().and_then(Weak::upgrade) {
            // Under the push lock: a reset or a push by the session's task
            // cannot come between the check and the write, and the session
            // records a revision only after its bytes are in the outbox,
            // so these bytes follow whatever brought it there.
            let mut state = self.state.lock().expect("push lock");
            if !state.dirty.contains_key(key)
                && !state.in_flight.contains(key)
                && let Some(sent) = state.sent.get_mut(key)
                && sent.revision == Some(delta.from_revision)
                && direct.deliver(delta)
            {
                sent.revision = Some(delta.to_revision);
                return true;
            }
        }
        self.mark_delta(key, delta);
        false
    }

    /// Marks `key` dirty; with `reset`, the next push is a snapshot.
    fn mark(&self, key: &ServiceKey, reset: Option<Option<u64>>) {
        self.mark_with(key, reset, None);
    }

    /// Marks `key` dirty by `delta`, flushed just now.
    fn mark_delta(&self, key: &ServiceKey, delta: &Arc<PushedDelta>) {
        self.mark_with(key, None, Some(delta.clone()));
    }

    fn mark_with(&self, key: &ServiceKey, reset: Option<Option<u64>>, hint: Option<Arc<PushedDelta>>) {
        let mut state = self.state.lock().expect("push lock");
        if let Some(revision) = reset {
            state.generation += 1;
            let generation = state.generation;
            state.sent.insert(key.clone(), Sent { revision, generation });
        }
        match state.dirty.entry(key.clone()) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(hint);
            }
            // Dirty already: more than one change (or a reset) is due, and
            // only the registry knows what to send.
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                slot.insert(None);
            }
        }
        drop(state);
        self.notify.notify_one();
    }

    fn mark_rules(&self, key: &ServiceKey) {
        self.state.lock().expect("push lock").rules.insert(key.clone());
        self.notify.notify_one();
    }

    fn forget(&self, key: &ServiceKey) {
        let mut state = self.state.lock().expect("push lock");
        state.sent.remove(key);
        state.dirty.remove(key);
    }

    /// Services whose rules must be sent, taken.
    pub fn take_rules(&self) -> Vec<ServiceKey> {
        std::mem::take(&mut self.state.lock().expect("push lock").rules)
            .into_iter()
            .collect()
    }

    /// Takes `key`'s rules if they must be sent; whether they had to be.
    pub fn take_rules_of(&self, key: &ServiceKey) -> bool {
        self.state.lock().expect("push lock").rules.remove(key)
    }

    /// Waits until some subscribed service is dirty or has new rules, then
    /// takes the dirty services (the rules stay for [`PushQueue::take_rules`]).
    pub async fn next(&self) -> Work {
        loop {
            {
                let mut state = self.state.lock().expect("push lock");
                let rules = !state.rules.is_empty();
                let dirty = std::mem::take(&mut state.dirty);
                let state = &mut *state;
                let due: Vec<Due> = dirty
                    .into_iter()
                    .filter_map(|(key, hint)| {
                        let sent = *state.sent.get(&key)?;
                        state.in_flight.insert(key.clone());
                        Some(Due {
                            key,
                            sent: sent.revision,
                            generation: sent.generation,
                            hint,
                        })
                    })
                    .collect();
                if !due.is_empty() || rules {
                    return Work { due, rules };
                }
            }
            self.notify.notified().await;
        }
    }

    /// Records that `due` was pushed up to `revision`, unless the service
    /// was reset (or unsubscribed) meanwhile.
    pub fn sent(&self, due: &Due, revision: u64) {
        let mut state = self.state.lock().expect("push lock");
        state.in_flight.remove(&due.key);
        if let Some(sent) = state.sent.get_mut(&due.key)
            && sent.generation == due.generation
            && sent.revision.is_none_or(|held| held < revision)
        {
            sent.revision = Some(revision);
        }
    }
}

#[derive(Debug)]
struct SessionEntry {
    node: NodeInfo,
    registered: BTreeSet<(ServiceKey, Addr)>,
    subscribed: BTreeSet<ServiceKey>,
    push: Arc<PushQueue>,
}

#[derive(Debug, Default)]
struct ServiceEntry {
    providers: BTreeMap<Addr, (Instance, SessionId)>,
    consumers: BTreeMap<SessionId, NodeInfo>,
    subscribers: BTreeSet<SessionId>,
    revision: u64,
    history: VecDeque<Arc<PushedDelta>>,
    pending: Pending,
}

/// Net change since the last flush.
#[derive(Debug, Default)]
struct Pending {
    added: BTreeMap<Addr, Instance>,
    updated: BTreeMap<Addr, Instance>,
    removed: BTreeSet<Addr>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }

    fn add(&mut self, addr: &Addr, instance: Instance, existed_at_flush: bool) {
        self.removed.remove(addr);
        if existed_at_flush {
            self.updated.insert(addr.clone(), instance);
        } else {
            self.added.insert(addr.clone(), instance);
        }
    }

    fn remove(&mut self, addr: &Addr) {
        self.updated.remove(addr);
        // Added and removed within one window: the subscribers never hear of it.
        if self.added.remove(addr).is_none() {
            self.removed.insert(addr.clone());
        }
    }
}

#[derive(Debug, Default)]
struct State {
    services: HashMap<ServiceKey, ServiceEntry>,
    /// Governance rules by service (set by the rule store).
    rules: HashMap<ServiceKey, Arc<RuleSet>>,
    sessions: HashMap<SessionId, SessionEntry>,
    dirty: BTreeSet<ServiceKey>,
    /// Changes made since the last flush (one per registration, removal or
    /// instance of a closed session).
    pending_changes: usize,
    next_session: SessionId,
    /// Where a (re)created service's revisions start: above every revision
    /// of every service removed so far. A node may still hold a revision of
    /// a removed service; revisions restarting at 0 would let it resume (or
    /// a delta flushed for the old one apply) on the new service's numbers.
    revision_floor: u64,
}

impl State {
    /// Notes a change of `key` for the next flush.
    fn mark_dirty(&mut self, key: &ServiceKey) {
        self.dirty.insert(key.clone());
        self.pending_changes += 1;
    }

    /// The entry of `key`, created (its revisions above the floor) if absent.
    fn service(&mut self, key: &ServiceKey) -> &mut ServiceEntry {
        let floor = self.revision_floor;
        self.services.entry(key.clone()).or_insert_with(|| ServiceEntry {
            revision: floor,
            ..ServiceEntry::default()
        })
    }
}

/// The registry of one ConfigServer.
#[derive(Debug)]
pub struct Registry {
    state: Mutex<State>,
    config: RegistryConfig,
    epoch: String,
    started: Instant,
    grace_over: AtomicBool,
    /// Woken on every change; the flusher waits on it.
    pub changed: Notify,
    /// Pushes of the last flush not yet sent (approximately: see
    /// [`Registry::pushed`]); the flusher holds the next flush while some are.
    outstanding: AtomicUsize,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
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
                node,
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
        for (key, addr) in &session.registered {
            changed |= remove_provider(&mut state, key, addr, id);
        }
        for key in &session.subscribed {
            if let Some(entry) = state.services.get_mut(key) {
                entry.subscribers.remove(&id);
                entry.consumers.remove(&id);
            }
            remove_if_unused(&mut state, key);
        }
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
            Some((_, owner)) if owner != id => {
                let same_node = state
                    .sessions
                    .get(&owner)
                    .is_some_and(|o| o.node.app == node.app && o.node.host == node.host);
                if !same_node {
                    return Err(RequestError::Duplicate(format!(
                        "{key} provider {addr} is already registered by session {owner}"
                    )));
                }
                // The same node on a new stream (its old one not expired
                // yet): the new session takes the instance over.
                if let Some(old) = state.sessions.get_mut(&owner) {
                    old.registered.remove(&(key.clone(), addr.clone()));
                }
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
            if let Some((_, owner)) = state.services.get_mut(&key).and_then(|e| e.providers.get_mut(&addr)) {
                *owner = id;
            }
            if let Some(session) = state.sessions.get_mut(&id) {
                session.registered.insert((key, addr));
            }
            return Ok(());
        }
        let entry = state.service(&key);
        let existed_at_flush = entry.providers.contains_key(&addr) && !entry.pending.added.contains_key(&addr)
            || entry.pending.removed.contains(&addr);
        entry.pending.add(&addr, instance.clone(), existed_at_flush);
        entry.providers.insert(addr.clone(), (instance, id));
        state.mark_dirty(&key);
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
        entry.consumers.insert(id, node);
        let resume = known.and_then(|(epoch, revision)| {
            let covered = epoch == self.epoch
                && revision <= entry.revision
                && (revision == entry.revision || entry.history.front().is_some_and(|d| d.from_revision <= revision));
            covered.then_some(revision)
        });
        push.mark(&key, Some(resume));
        drop(state);
        debug!(session = id, service = %key, resume = ?resume, "subscribed");
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
            entry.consumers.remove(&id);
        }
        remove_if_unused(&mut state, key);
    }

    /// Turns pending changes into revisions and deltas and pushes them to
    /// the subscribers of each changed service; how many were pushed to.
    pub fn flush(&self) -> usize {
        let pushes = self.take_flush();
        self.push(pushes)
    }

    /// Turns pending changes into revisions and deltas; the pushes to make,
    /// to be made with [`Registry::push`] (in parts, from several tasks,
    /// if there are many: see [`Pushes::split`]).
    pub fn take_flush(&self) -> Pushes {
        let mut state = self.lock();
        let dirty = std::mem::take(&mut state.dirty);
        let changes = std::mem::take(&mut state.pending_changes);
        let mut flushed = Vec::new();
        for key in dirty {
            flushed.extend(self.flush_service(&mut state, &key));
            remove_if_unused(&mut state, &key);
        }
        drop(state);
        let pushes = Pushes { flushed, changes };
        // Counted before the marks wake anyone: a session may report its
        // push before `push` returns.
        let marking = pushes.len();
        self.outstanding.store(marking, Ordering::Relaxed);
        if marking == 0 {
            self.drained.notify_one();
        }
        pushes
    }

    /// Makes (a part of) the pushes of a flush; how many were made.
    pub fn push(&self, pushes: Pushes) -> usize {
        let marked = self.push_flushed(pushes.flushed);
        self.pushed_n(marked.delivered);
        let notified = marked.marked + marked.delivered;
        if notified > 0 {
            debug!(delivered = marked.delivered, marked = marked.marked, "flushed changes");
        }
        notified
    }

    /// A session sent what one mark asked for. Counts are approximate (a
    /// mark for a reset or an older flush is counted too): the flusher's
    /// hold ends early or at its window, never later.
    pub fn pushed(&self) {
        self.pushed_n(1);
    }

    fn pushed_n(&self, pushes: usize) {
        if pushes == 0 {
            return;
        }
        let before = self
            .outstanding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(pushes)));
        if matches!(before, Ok(n) if n > 0 && n <= pushes) {
            self.drained.notify_one();
        }
    }

    /// Pushes each flushed service's delta to its subscribers: handed to
    /// the transport at once where it can take it
    /// ([`PushQueue::push_delta`]), marked for the session's task
    /// otherwise. Called without the registry lock: a woken session's first
    /// step may be to take that lock, and a thousand of them woken while the
    /// flusher still holds it would queue up on it.
    fn push_flushed(&self, flushed: impl IntoIterator<Item = Flushed>) -> Marked {
        let mut marked = Marked::default();
        for Flushed {
            key,
            delta,
            subscribers,
        } in flushed
        {
            let mut delivered = 0;
            for push in &subscribers {
                if push.push_delta(&key, &delta) {
                    delivered += 1;
                } else {
                    marked.marked += 1;
                }
            }
            marked.delivered += delivered;
            let delivered = delivered as u64;
            self.metrics.pushed_messages.fetch_add(delivered, Ordering::Relaxed);
            self.metrics.pushed_direct.fetch_add(delivered, Ordering::Relaxed);
            self.metrics
                .pushed_bytes
                .fetch_add(delivered * delta.encoded.len() as u64, Ordering::Relaxed);
        }
        marked
    }

    /// Whether the pushes of the last flush are all sent.
    pub fn is_drained(&self) -> bool {
        self.outstanding.load(Ordering::Relaxed) == 0
    }

    /// Flushes one service's pending change, if any: a new revision, one
    /// delta in the history. Returns the push queues of its subscribers,
    /// to be pushed once the registry lock is released (see
    /// [`Registry::push_flushed`]).
    fn flush_service(&self, state: &mut State, key: &ServiceKey) -> Option<Flushed> {
        let entry = state.services.get_mut(key)?;
        if entry.pending.is_empty() {
            return None;
        }
        let pending = std::mem::take(&mut entry.pending);
        let delta = Delta {
            service: Some(key.into()),
            from_revision: entry.revision,
            to_revision: entry.revision + 1,
            added: pending.added.into_values().collect(),
            removed: pending.removed.into_iter().map(String::from).collect(),
            updated: pending.updated.into_values().collect(),
        };
        // Encoded once here; every subscriber is sent these bytes.
        let pushed = PushedDelta {
            from_revision: delta.from_revision,
            to_revision: delta.to_revision,
            entries: delta.added.len() + delta.removed.len() + delta.updated.len(),
            encoded: ServerMessage {
                request_id: 0,
                body: Some(server_message::Body::Delta(delta)),
            }
            .encode_to_vec()
            .into(),
        };
        entry.revision += 1;
        let pushed = Arc::new(pushed);
        entry.history.push_back(pushed.clone());
        while entry.history.len() > self.config.history_len {
            entry.history.pop_front();
        }
        let subscribers = &state.services[key].subscribers;
        Some(Flushed {
            key: key.clone(),
            delta: pushed,
            subscribers: subscribers
                .iter()
                .filter_map(|id| state.sessions.get(id).map(|session| session.push.clone()))
                .collect(),
        })
    }

    /// What a subscriber that was last sent `sent` of `key` needs now:
    /// deltas, a snapshot, or nothing. Returns the messages and the revision
    /// they bring the subscriber to.
    pub fn catch_up(&self, key: &ServiceKey, sent: Option<u64>) -> (Vec<Outgoing>, u64) {
        let mut state = self.lock();
        let partial = !self.grace_over.load(Ordering::Relaxed);
        // Deltas come from the history: flushed changes only. Changes still
        // pending wait for the flusher, which marks this session again, so
        // a push never cuts a coalescing window short.
        if let (Some(sent), Some(entry)) = (sent, state.services.get(key)) {
            if sent == entry.revision {
                return (Vec::new(), sent);
            }
            let behind = (entry.revision - sent.min(entry.revision)) as usize;
            let first = entry.history.front().map_or(u64::MAX, |d| d.from_revision);
            let needed = || entry.history.iter().filter(|d| d.from_revision >= sent);
            let cheaper = behind <= self.config.max_catch_up_deltas
                || needed().map(|d| d.entries).sum::<usize>() <= entry.providers.len();
            if sent < entry.revision && first <= sent && cheaper {
                let deltas = needed().map(|d| Outgoing::Delta(d.clone())).collect();
                return (deltas, entry.revision);
            }
        }
        // A snapshot must show a flushed revision: one that showed a pending
        // change under the old revision could never be corrected if the
        // change cancelled out before the flush. So flush first.
        let due = self.flush_service(&mut state, key);
        let (providers, revision) = match state.services.get(key) {
            Some(entry) => (
                entry.providers.values().map(|(i, _)| i.clone()).collect(),
                entry.revision,
            ),
            None => (Vec::new(), 0),
        };
        drop(state);
        self.push_flushed(due);
        (
            vec![self.snapshot_message(key, revision, providers, partial).into()],
            revision,
        )
    }

    fn snapshot_message(
        &self,
        key: &ServiceKey,
        revision: u64,
        providers: Vec<Instance>,
        partial: bool,
    ) -> ServerMessage {
        ServerMessage {
            request_id: 0,
            body: Some(server_message::Body::Snapshot(Snapshot {
                service: Some(key.into()),
                epoch: self.epoch.clone(),
                revision,
                providers,
                partial,
            })),
        }
    }

    /// Replaces the rules of `key` (`None`: it has none) and marks every
    /// session that provides or subscribes to it.
    pub fn set_rules(&self, key: &ServiceKey, rules: Option<Arc<RuleSet>>) {
        let mut state = self.lock();
        match rules {
            Some(rules) => state.rules.insert(key.clone(), rules),
            None => state.rules.remove(key),
        };
        let Some(entry) = state.services.get(key) else {
            return;
        };
        let mut marked = 0usize;
        let owners = entry.providers.values().map(|(_, owner)| owner);
        let interested: BTreeSet<SessionId> = entry.subscribers.iter().chain(owners).copied().collect();
        for id in interested {
            if let Some(session) = state.sessions.get(&id) {
                session.push.mark_rules(key);
                marked += 1;
            }
        }
        debug!(service = %key, sessions = marked, "rules changed");
    }

    /// The rules of `key` for session `id`: all of them for a session that
    /// provides the service, without service tokens its access rules refuse
    /// for any other node.
    pub fn rules_for(&self, id: SessionId, key: &ServiceKey) -> Option<ServerMessage> {
        let (rules, provides, node) = {
            let state = self.lock();
            let session = state.sessions.get(&id)?;
            let provides = session.registered.iter().any(|(k, _)| k == key);
            (state.rules.get(key).cloned(), provides, session.node.clone())
        };
        let rules = rules.unwrap_or_default();
        let rules = if provides {
            rules
        } else {
            let ip = node
                .peer
                .map(|p| p.ip().to_canonical())
                .or_else(|| node.host.parse().ok());
            Arc::new(rules.redacted_for(&node.app, ip))
        };
        Some(ServerMessage {
            request_id: 0,
            body: Some(server_message::Body::Rules(pb::Rules {
                service: Some(key.into()),
                revision: rules.revision,
                rules_json: serde_json::to_string(&rules.rules).expect("rules serialize"),
            })),
        })
    }

    /// The rules of `key` as the registry holds them.
    pub fn rules(&self, key: &ServiceKey) -> Option<Arc<RuleSet>> {
        self.lock().rules.get(key).cloned()
    }

    /// Whether the startup grace period is still running.
    pub fn in_grace(&self) -> bool {
        !self.grace_over.load(Ordering::Relaxed)
    }

    /// When the startup grace period ends: every subscriber gets a complete
    /// snapshot, so removals the grace period held back now apply.
    pub fn end_grace(&self) {
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

    /// `(service, revision, providers, consumers)` of every service.
    pub fn overview(&self) -> Vec<(ServiceKey, u64, usize, usize)> {
        let state = self.lock();
        let mut services: Vec<_> = state
            .services
            .iter()
            .filter(|(_, e)| !e.providers.is_empty() || !e.consumers.is_empty())
            .map(|(k, e)| (k.clone(), e.revision, e.providers.len(), e.consumers.len()))
            .collect();
        services.sort();
        services
    }

    /// Providers and consumers of one service.
    pub fn detail(&self, key: &ServiceKey) -> Option<(u64, Vec<Instance>, Vec<NodeInfo>)> {
        let state = self.lock();
        let entry = state.services.get(key)?;
        Some((
            entry.revision,
            entry.providers.values().map(|(i, _)| i.clone()).collect(),
            entry.consumers.values().cloned().collect(),
        ))
    }

    /// `(sessions, services, providers, subscriptions)` now.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let state = self.lock();
        let providers = state.services.values().map(|e| e.providers.len()).sum();
        let subscriptions = state.services.values().map(|e| e.subscribers.len()).sum();
        (state.sessions.len(), state.services.len(), providers, subscriptions)
    }

    fn validate_instance(&self, key: &ServiceKey, instance: &Instance) -> Result<(), RequestError> {
        let size = instance.encoded_len();
        if size > self.config.max_instance_bytes {
            return Err(RequestError::TooLarge(format!(
                "{key} instance is {size} bytes, more than {}",
                self.config.max_instance_bytes
            )));
        }
        let host = &instance.host;
        let host_ok = host.parse::<std::net::IpAddr>().is_ok()
            || (!host.is_empty()
                && host.len() <= 253
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && !host.starts_with(['.', '-']));
        if !host_ok {
            return Err(RequestError::Invalid(format!(
                "{key} instance has invalid host {host:?}"
            )));
        }
        if instance.port == 0 || instance.port > u32::from(u16::MAX) {
            return Err(RequestError::Invalid(format!(
                "{key} instance {host} has invalid port {}",
                instance.port
            )));
        }
        if instance.weight > self.config.max_weight {
            return Err(RequestError::Invalid(format!(
                "{key} instance {host}:{} has weight {}, more than {}",
                instance.port, instance.weight, self.config.max_weight
            )));
        }
        Ok(())
    }
}

/// Drops a service nobody provides, subscribes to or is changing. A node
/// that later resumes it from an old revision gets a snapshot.
fn remove_if_unused(state: &mut State, key: &ServiceKey) {
    if state.services.get(key).is_some_and(|e| {
        e.providers.is_empty() && e.subscribers.is_empty() && e.consumers.is_empty() && e.pending.is_empty()
    }) && !state.dirty.contains(key)
        && let Some(entry) = state.services.remove(key)
    {
        state.revision_floor = state.revision_floor.max(entry.revision + 1);
    }
}

/// Removes `addr` from `key` if `owner` holds it; true if something changed.
fn remove_provider(state: &mut State, key: &ServiceKey, addr: &Addr, owner: SessionId) -> bool {
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
    true
}

/// A service's change just flushed, and the push queues of its subscribers.
#[derive(Debug)]
struct Flushed {
    key: ServiceKey,
    delta: Arc<PushedDelta>,
    subscribers: Vec<Arc<PushQueue>>,
}

/// The pushes of one flush, not made yet: each flushed delta and the
/// subscribers it goes to.
#[derive(Debug, Default)]
pub struct Pushes {
    flushed: Vec<Flushed>,
    /// The changes this flush turned into deltas.
    changes: usize,
}

impl Pushes {
    /// The changes this flush turned into deltas (0 in a part of a split).
    pub fn changes(&self) -> usize {
        self.changes
    }

    /// Subscribers to push to, over all services.
    pub fn len(&self) -> usize {
        self.flushed.iter().map(|f| f.subscribers.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// At most `parts` parts of about equal size (each service's
    /// subscribers are shared out in runs), to be pushed concurrently.
    pub fn split(self, parts: usize) -> Vec<Pushes> {
        let parts = parts.clamp(1, self.len().max(1));
        let mut split: Vec<Pushes> = (0..parts).map(|_| Pushes::default()).collect();
        // Runs are dealt round, across services too: many services with a
        // subscriber or two each spread over every part.
        let mut next = 0;
        for Flushed {
            key,
            delta,
            subscribers,
        } in self.flushed
        {
            let run = subscribers.len().div_ceil(parts).max(1);
            for chunk in subscribers.chunks(run) {
                split[next % parts].flushed.push(Flushed {
                    key: key.clone(),
                    delta: delta.clone(),
                    subscribers: chunk.to_vec(),
                });
                next += 1;
            }
        }
        split.retain(|part| !part.flushed.is_empty());
        split
    }
}

/// What [`Registry::push_flushed`] did.
#[derive(Debug, Default)]
struct Marked {
    /// Deltas handed to transports by the flusher.
    delivered: usize,
    /// Sessions whose task must push.
    marked: usize,
}

/// The request-level answers sent to a node.
pub fn ack(request_id: u64) -> ServerMessage {
    ServerMessage {
        request_id,
        body: Some(server_message::Body::Ack(pb::Ack {})),
    }
}

pub fn error(request_id: u64, kind: &str, message: String) -> ServerMessage {
    ServerMessage {
        request_id,
        body: Some(server_message::Body::Error(pb::Error {
            kind: kind.to_owned(),
            message,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(port: u32) -> Instance {
        Instance {
            host: "127.0.0.1".into(),
            port,
            weight: 100,
            ..Instance::default()
        }
    }

    fn registry() -> Registry {
        Registry::new(RegistryConfig {
            startup_grace: Duration::ZERO,
            history_len: 4,
            ..RegistryConfig::default()
        })
    }

    fn key() -> ServiceKey {
        ServiceKey::new("demo.Greeter", "1.0.0", "")
    }

    /// What `push` says is due next (waiting for it).
    fn next_due(push: &PushQueue) -> Vec<Due> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(push.next()).due
    }

    /// What `push` has due right now, without waiting.
    fn due_now(push: &PushQueue) -> Vec<Due> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            tokio::select! {
                biased;
                work = push.next() => work.due,
                () = std::future::ready(()) => Vec::new(),
            }
        })
    }

    /// [`Registry::catch_up`], as the node decodes it.
    fn decoded_catch_up(registry: &Registry, key: &ServiceKey, sent: Option<u64>) -> (Vec<ServerMessage>, u64) {
        let (out, revision) = registry.catch_up(key, sent);
        (out.iter().map(Outgoing::to_message).collect(), revision)
    }

    fn delta_of(messages: &[ServerMessage]) -> Vec<&Delta> {
        messages
            .iter()
            .filter_map(|m| match &m.body {
                Some(server_message::Body::Delta(d)) => Some(d),
                _ => None,
            })
            .collect()
    }

    fn snapshot_of(messages: &[ServerMessage]) -> Option<&Snapshot> {
        messages.iter().find_map(|m| match &m.body {
            Some(server_message::Body::Snapshot(s)) => Some(s),
            _ => None,
        })
    }

    /// A provider session with `instance(1)` of `key()` flushed, and a
    /// session that then subscribed to `key()`.
    fn subscribed_after_one_flush(registry: &Registry) -> (SessionId, SessionId, Arc<PushQueue>) {
        let (provider, _) = registry.open_session(NodeInfo::default());
        let (consumer, push) = registry.open_session(NodeInfo::default());
        registry.register(provider, key(), instance(1)).unwrap();
        registry.flush();
        registry.subscribe(consumer, key(), None).unwrap();
        (provider, consumer, push)
    }

    #[test]
    fn subscriber_gets_snapshot_then_one_delta_per_flush() {
        let registry = registry();
        let (provider, _, push) = subscribed_after_one_flush(&registry);
        let (messages, rev) = decoded_catch_up(&registry, &key(), None);
        assert_eq!(snapshot_of(&messages).unwrap().providers.len(), 1);
        assert_eq!(rev, 1);
        let _ = push;

        registry.register(provider, key(), instance(2)).unwrap();
        registry.register(provider, key(), instance(3)).unwrap();
        registry.flush();
        let (messages, rev) = decoded_catch_up(&registry, &key(), Some(1));
        let deltas = delta_of(&messages);
        assert_eq!(deltas.len(), 1, "two registrations in one window coalesce");
        assert_eq!(deltas[0].added.len(), 2);
        assert_eq!((deltas[0].from_revision, deltas[0].to_revision, rev), (1, 2, 2));
    }

    #[test]
    fn a_session_up_to_date_is_handed_the_flushed_delta_itself() {
        let registry = registry();
        let (provider, _) = registry.open_session(NodeInfo::default());
        let (consumer, push) = registry.open_session(NodeInfo::default());
        registry.subscribe(consumer, key(), None).unwrap();
        let due = next_due(&push);
        assert!(due[0].next_delta().is_none(), "a snapshot is due first");
        let (_, revision) = registry.catch_up(&key(), due[0].sent);
        push.sent(&due[0], revision);

        // One flush: the queue carries that delta, the same the registry
        // would hand out.
        registry.register(provider, key(), instance(1)).unwrap();
        registry.flush();
        let due = next_due(&push);
        let hinted = due[0].next_delta().expect("the flushed delta").clone();
        let (from_registry, _) = registry.catch_up(&key(), due[0].sent);
        assert!(matches!(&from_registry[..], [Outgoing::Delta(d)] if **d == *hinted));
        push.sent(&due[0], hinted.to_revision);

        // Two flushes before the session looked: no single delta will do.
        registry.register(provider, key(), instance(2)).unwrap();
        registry.flush();
        registry.register(provider, key(), instance(3)).unwrap();
        registry.flush();
        let due = next_due(&push);
        assert!(due[0].next_delta().is_none());
        let (messages, revision) = decoded_catch_up(&registry, &key(), due[0].sent);
        assert_eq!((delta_of(&messages).len(), revision), (2, 3));
    }

    /// A transport that takes deltas while `open`, recording them.
    #[derive(Debug, Default)]
    struct Recorder {
        open: AtomicBool,
        taken: Mutex<Vec<(u64, u64)>>,
    }

    impl Deliver for Recorder {
        fn deliver(&self, delta: &PushedDelta) -> bool {
            let open = self.open.load(Ordering::Relaxed);
            if open {
                let mut taken = self.taken.lock().unwrap();
                taken.push((delta.from_revision, delta.to_revision));
            }
            open
        }
    }

    /// A provider session, and a subscriber of `key()` whose push queue is
    /// attached to an open [`Recorder`].
    fn subscriber_with_transport(registry: &Registry) -> (SessionId, Arc<PushQueue>, Arc<Recorder>) {
        let (provider, _) = registry.open_session(NodeInfo::default());
        let (consumer, push) = registry.open_session(NodeInfo::default());
        let transport = Arc::new(Recorder::default());
        transport.open.store(true, Ordering::Relaxed);
        let direct: Weak<dyn Deliver> = Arc::downgrade(&transport) as Weak<Recorder>;
        push.attach(direct);
        registry.subscribe(consumer, key(), None).unwrap();
        (provider, push, transport)
    }

    #[test]
    fn the_flusher_writes_a_delta_to_an_up_to_date_session_and_leaves_the_rest_to_its_task() {
        let registry = registry();
        let (provider, push, transport) = subscriber_with_transport(&registry);

        // The snapshot is still due: the flusher must not write ahead of it.
        registry.register(provider, key(), instance(1)).unwrap();
        registry.flush();
        assert!(transport.taken.lock().unwrap().is_empty());
        let due = next_due(&push);
        let (_, revision) = registry.catch_up(&key(), due[0].sent);
        push.sent(&due[0], revision);

        // Up to date: the next delta goes straight to the transport, and
        // nothing is left for the session's task.
        let before = registry.metrics.pushed_direct.load(Ordering::Relaxed);
        registry.register(provider, key(), instance(2)).unwrap();
        assert_eq!(registry.flush(), 1);
        assert_eq!(*transport.taken.lock().unwrap(), [(revision, revision + 1)]);
        assert_eq!(registry.metrics.pushed_direct.load(Ordering::Relaxed), before + 1);
        assert!(registry.is_drained(), "a direct write counts as pushed");
        assert!(due_now(&push).is_empty(), "nothing left for the session's task");
        registry.register(provider, key(), instance(3)).unwrap();
        registry.flush();
        assert_eq!(
            transport.taken.lock().unwrap().len(),
            2,
            "and so on, revision after revision"
        );

        // A transport that cannot take it now: the session's task is asked
        // instead, and sends it from where the session is.
        transport.open.store(false, Ordering::Relaxed);
        registry.register(provider, key(), instance(4)).unwrap();
        registry.flush();
        let due = next_due(&push);
        let delta = due[0].next_delta().expect("the delta, for the session's task");
        assert_eq!(delta.from_revision, revision + 2);
        assert!(!registry.is_drained(), "until the session reports it sent");
        push.sent(&due[0], delta.to_revision);
        registry.pushed();
        assert!(registry.is_drained());

        // Once the transport is gone (its connection closed), the queue is
        // marked as for any session.
        drop(transport);
        registry.register(provider, key(), instance(5)).unwrap();
        registry.flush();
        assert_eq!(next_due(&push).len(), 1);
    }

    #[test]
    fn the_flusher_leaves_a_service_to_the_session_task_that_is_sending_it() {
        let registry = registry();
        let (provider, push, transport) = subscriber_with_transport(&registry);
        let due = next_due(&push);
        let (_, revision) = registry.catch_up(&key(), due[0].sent);
        push.sent(&due[0], revision);

        // The session's task has taken the service (a change marked it) and
        // is sending; a flush meanwhile must not write past it.
        registry.register(provider, key(), instance(1)).unwrap();
        transport.open.store(false, Ordering::Relaxed);
        registry.flush();
        transport.open.store(true, Ordering::Relaxed);
        let taken = next_due(&push);
        registry.register(provider, key(), instance(2)).unwrap();
        registry.flush();
        assert!(transport.taken.lock().unwrap().is_empty(), "left to the session's task");
        let sending = taken[0].next_delta().expect("its delta").to_revision;
        push.sent(&taken[0], sending);
        // What the flush marked follows, from the revision now recorded.
        let due = next_due(&push);
        assert_eq!(due[0].sent, Some(sending));
        let delta = due[0].next_delta().expect("the next delta");
        assert_eq!((delta.from_revision, delta.to_revision), (sending, sending + 1));
        push.sent(&due[0], delta.to_revision);
        // And a report of an older push never moves the record back.
        push.sent(&taken[0], sending);
        registry.register(provider, key(), instance(3)).unwrap();
        registry.flush();
        assert_eq!(*transport.taken.lock().unwrap(), [(sending + 1, sending + 2)]);
    }

    #[test]
    fn pushes_split_into_parts_cover_every_subscriber_once() {
        let registry = registry();
        let (provider, _) = registry.open_session(NodeInfo::default());
        let other = ServiceKey::new("demo.Other", "1.0.0", "");
        let mut queues = Vec::new();
        for _ in 0..5 {
            let (consumer, push) = registry.open_session(NodeInfo::default());
            registry.subscribe(consumer, key(), None).unwrap();
            registry.subscribe(consumer, other.clone(), None).unwrap();
            queues.push(push);
        }
        registry.register(provider, key(), instance(1)).unwrap();
        registry.register(provider, other.clone(), instance(2)).unwrap();
        let pushes = registry.take_flush();
        assert_eq!(pushes.len(), 10);
        let parts = pushes.split(3);
        assert_eq!(parts.iter().map(Pushes::len).collect::<Vec<_>>(), [4, 4, 2]);
        let made: usize = parts.into_iter().map(|part| registry.push(part)).sum();
        assert_eq!(made, 10);
        for push in &queues {
            let mut due: Vec<_> = next_due(push).into_iter().map(|d| d.key).collect();
            due.sort();
            assert_eq!(due, [key(), other.clone()], "each subscriber marked for both services");
        }
        assert_eq!(Pushes::default().split(4).len(), 0);

        // Services with a subscriber each are dealt over every part.
        let (consumer, _push) = registry.open_session(NodeInfo::default());
        let keys: Vec<ServiceKey> = (0..4)
            .map(|i| ServiceKey::new(format!("demo.S{i}"), "1.0.0", ""))
            .collect();
        for k in &keys {
            registry.subscribe(consumer, k.clone(), None).unwrap();
            registry.register(provider, k.clone(), instance(3)).unwrap();
        }
        let parts = registry.take_flush().split(2);
        assert_eq!(parts.iter().map(Pushes::len).collect::<Vec<_>>(), [2, 2]);
    }

    #[test]
    fn a_recreated_service_never_resumes_a_revision_of_the_removed_one() {
        let registry = registry();
        let (provider, consumer, push) = subscribed_after_one_flush(&registry);
        let (_, held) = registry.catch_up(&key(), None);

        // Everyone leaves: the service is gone. Then it comes back.
        registry.unsubscribe(consumer, &key());
        registry.unregister(provider, &key(), "127.0.0.1", 1).unwrap();
        registry.flush();
        assert!(registry.detail(&key()).is_none(), "the unused service was removed");
        for port in [2, 3] {
            registry.register(provider, key(), instance(port)).unwrap();
            registry.flush();
        }

        // The node still holds revision `held` of the old service: it must
        // get a snapshot, not the new service's deltas from that number.
        registry
            .subscribe(consumer, key(), Some((registry.epoch(), held)))
            .unwrap();
        let due = next_due(&push);
        assert_eq!(due[0].sent, None, "a snapshot is due");
        let (messages, _) = decoded_catch_up(&registry, &key(), due[0].sent);
        let ports: Vec<u32> = snapshot_of(&messages)
            .unwrap()
            .providers
            .iter()
            .map(|i| i.port)
            .collect();
        assert_eq!(ports, [2, 3]);
    }

    #[test]
    fn a_push_in_flight_across_unsubscribe_and_subscribe_does_not_cancel_the_snapshot() {
        let registry = registry();
        let (consumer, push) = registry.open_session(NodeInfo::default());
        registry.subscribe(consumer, key(), None).unwrap();
        let in_flight = next_due(&push);
        // While that snapshot is being sent, the node unsubscribes and
        // subscribes again: it must get a fresh snapshot.
        registry.unsubscribe(consumer, &key());
        registry.subscribe(consumer, key(), None).unwrap();
        push.sent(&in_flight[0], 0);
        let due = next_due(&push);
        assert_eq!(due[0].sent, None, "the new subscription still gets its snapshot");
    }

    #[test]
    fn add_then_remove_within_a_window_is_no_change() {
        let registry = registry();
        let (provider, _) = registry.open_session(NodeInfo::default());
        registry.register(provider, key(), instance(1)).unwrap();
        registry.unregister(provider, &key(), "127.0.0.1", 1).unwrap();
        registry.flush();
        assert_eq!(decoded_catch_up(&registry, &key(), Some(0)).1, 0);
    }

    fn node(app: &str) -> NodeInfo {
        NodeInfo {
            app: app.into(),
            host: "10.0.0.1".into(),
            ..NodeInfo::default()
        }
    }

    #[test]
    fn closing_a_session_removes_its_instances() {
        let registry = registry();
        let (provider, _) = registry.open_session(NodeInfo::default());
        let (consumer, _) = registry.open_session(NodeInfo::default());
        registry.subscribe(consumer, key(), None).unwrap();
        registry.register(provider, key(), instance(1)).unwrap();
        registry.flush();
        registry.close_session(provider, "test");
        registry.flush();
        let (messages, _) = decoded_catch_up(&registry, &key(), Some(1));
        assert_eq!(delta_of(&messages)[0].removed, vec!["127.0.0.1:1".to_owned()]);
    }

    #[test]
    fn lagging_subscriber_past_history_gets_one_snapshot() {
        let registry = registry();
        let (provider, _) = registry.open_session(NodeInfo::default());
        for port in 1..=10 {
            registry.register(provider, key(), instance(port)).unwrap();
            registry.flush();
        }
        let (messages, rev) = decoded_catch_up(&registry, &key(), Some(2));
        assert_eq!(messages.len(), 1);
        assert_eq!(snapshot_of(&messages).unwrap().providers.len(), 10);
        assert_eq!(rev, 10);
        // Within the history: the missing deltas only.
        let (messages, _) = decoded_catch_up(&registry, &key(), Some(8));
        assert_eq!(delta_of(&messages).len(), 2);
    }

    #[test]
    fn resubscribe_with_known_revision_resumes_from_history() {
        let registry = registry();
        let (provider, _) = registry.open_session(NodeInfo::default());
        let (consumer, push) = registry.open_session(NodeInfo::default());
        registry.register(provider, key(), instance(1)).unwrap();
        registry.flush();
        registry.register(provider, key(), instance(2)).unwrap();
        registry.flush();
        let epoch = registry.epoch().to_owned();
        registry.subscribe(consumer, key(), Some((&epoch, 1))).unwrap();
        let due = next_due(&push);
        assert_eq!(
            due.iter().map(|d| (d.key.clone(), d.sent)).collect::<Vec<_>>(),
            vec![(key(), Some(1))]
        );
        registry.subscribe(consumer, key(), Some(("another-epoch", 1))).unwrap();
        let due = next_due(&push);
        assert_eq!(
            due.iter().map(|d| (d.key.clone(), d.sent)).collect::<Vec<_>>(),
            vec![(key(), None)]
        );
    }

    #[test]
    fn bad_registrations_name_the_value_and_store_nothing() {
        let registry = registry();
        let (a, _) = registry.open_session(node("a"));
        let (b, _) = registry.open_session(node("b"));
        let err = registry
            .register(a, ServiceKey::new("bad key", "", ""), instance(1))
            .unwrap_err();
        assert!(err.to_string().contains(r#"interface "bad key" contains ' '"#), "{err}");
        let err = registry
            .register(
                a,
                key(),
                Instance {
                    port: 70000,
                    ..instance(1)
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("invalid port 70000"), "{err}");
        let err = registry
            .register(
                a,
                key(),
                Instance {
                    host: "no host!".into(),
                    ..instance(1)
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains(r#"invalid host "no host!""#), "{err}");
        let err = registry
            .register(
                a,
                key(),
                Instance {
                    weight: 20_000,
                    ..instance(1)
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("weight 20000"), "{err}");
        let mut huge = instance(1);
        huge.metadata.insert("blob".into(), "x".repeat(100_000));
        let err = registry.register(a, key(), huge).unwrap_err();
        assert_eq!(err.kind(), "too_large");
        assert!(registry.overview().is_empty(), "nothing stored");

        registry.register(a, key(), instance(1)).unwrap();
        let err = registry.register(b, key(), instance(1)).unwrap_err();
        assert_eq!(err.kind(), "duplicate");
        assert!(
            err.to_string().contains("127.0.0.1:1 is already registered by session"),
            "{err}"
        );
    }

    #[test]
    fn the_same_node_on_a_new_stream_takes_its_instance_over() {
        let registry = registry();
        let (old, _) = registry.open_session(node("a"));
        let (consumer, _) = registry.open_session(node("c"));
        registry.subscribe(consumer, key(), None).unwrap();
        registry.register(old, key(), instance(1)).unwrap();
        registry.flush();
        let (new, _) = registry.open_session(node("a"));
        registry.register(new, key(), instance(1)).unwrap();
        // The old stream expiring later must not remove the instance.
        registry.close_session(old, "expired");
        registry.flush();
        assert_eq!(registry.detail(&key()).unwrap().1.len(), 1);
        assert_eq!(
            decoded_catch_up(&registry, &key(), Some(1)).1,
            1,
            "no change was pushed"
        );
    }

    #[test]
    fn a_snapshot_never_shows_an_unflushed_change_under_an_old_revision() {
        let registry = registry();
        let (provider, _) = registry.open_session(NodeInfo::default());
        let (consumer, _) = registry.open_session(NodeInfo::default());
        registry.subscribe(consumer, key(), None).unwrap();
        registry.register(provider, key(), instance(1)).unwrap();
        // Snapshot requested before the flusher ran.
        let (messages, revision) = decoded_catch_up(&registry, &key(), None);
        assert_eq!((snapshot_of(&messages).unwrap().providers.len(), revision), (1, 1));
        registry.unregister(provider, &key(), "127.0.0.1", 1).unwrap();
        registry.flush();
        let (messages, _) = decoded_catch_up(&registry, &key(), Some(1));
        assert_eq!(delta_of(&messages)[0].removed, vec!["127.0.0.1:1".to_owned()]);
    }

    #[test]
    fn grace_period_snapshots_are_partial_until_it_ends() {
        let registry = Registry::new(RegistryConfig::default());
        let (consumer, push) = registry.open_session(NodeInfo::default());
        registry.subscribe(consumer, key(), None).unwrap();
        assert!(
            snapshot_of(&decoded_catch_up(&registry, &key(), None).0)
                .unwrap()
                .partial
        );
        let due = next_due(&push);
        registry.end_grace();
        // The push that was in flight when the grace ended must not hide the reset.
        push.sent(&due[0], 0);
        let due = next_due(&push);
        assert_eq!((due[0].key.clone(), due[0].sent), (key(), None));
        assert!(
            !snapshot_of(&decoded_catch_up(&registry, &key(), None).0)
                .unwrap()
                .partial
        );
    }

    mod properties {
        use std::collections::BTreeSet;

        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        enum Op {
            Register {
                session: usize,
                port: u32,
                weight: u32,
            },
            Unregister {
                session: usize,
                port: u32,
            },
            Close {
                session: usize,
            },
            Flush,
            CatchUp,
            /// The consumer session's push task takes what is due.
            Push,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..3usize, 1..6u32, 0..3u32).prop_map(|(session, port, weight)| Op::Register {
                    session,
                    port,
                    weight
                }),
                (0..3usize, 1..6u32).prop_map(|(session, port)| Op::Unregister { session, port }),
                (0..3usize).prop_map(|session| Op::Close { session }),
                Just(Op::Flush),
                Just(Op::CatchUp),
                Just(Op::Push),
            ]
        }

        /// What a subscriber holds after applying pushes as a node does.
        #[derive(Default)]
        struct Subscriber {
            revision: Option<u64>,
            providers: BTreeMap<Addr, u32>,
        }

        impl Subscriber {
            fn apply(&mut self, registry: &Registry) {
                self.receive(decoded_catch_up(registry, &key(), self.revision));
            }

            /// As a session's push task does: what its queue says is due,
            /// the flushed delta itself when that is enough.
            fn push(&mut self, registry: &Registry, push: &PushQueue, rt: &tokio::runtime::Runtime) {
                let Ok(work) = rt.block_on(async { tokio::time::timeout(Duration::ZERO, push.next()).await }) else {
                    return; // nothing due
                };
                for due in work.due {
                    let (out, revision) = match due.next_delta() {
                        Some(delta) => (vec![Outgoing::Delta(delta.clone())], delta.to_revision),
                        None => registry.catch_up(&due.key, due.sent),
                    };
                    self.receive((out.iter().map(Outgoing::to_message).collect(), revision));
                    push.sent(&due, revision);
                }
            }

            fn receive(&mut self, (messages, revision): (Vec<ServerMessage>, u64)) {
                for message in messages {
                    match message.body {
                        Some(server_message::Body::Snapshot(s)) => {
                            self.providers = s.providers.iter().map(|i| (instance_addr(i), i.weight)).collect();
                            self.revision = Some(s.revision);
                        }
                        Some(server_message::Body::Delta(d)) => {
                            assert_eq!(Some(d.from_revision), self.revision, "deltas arrive in order");
                            for addr in &d.removed {
                                self.providers.remove(addr.as_str());
                            }
                            for i in d.added.iter().chain(&d.updated) {
                                self.providers.insert(instance_addr(i), i.weight);
                            }
                            self.revision = Some(d.to_revision);
                        }
                        other => panic!("unexpected push {other:?}"),
                    }
                }
                assert_eq!(
                    self.revision.unwrap_or(0),
                    revision,
                    "caught up to the returned revision"
                );
                self.revision = Some(revision);
            }
        }

        proptest! {
            /// Whatever happens, a subscriber that applies every snapshot
            /// and delta it is sent ends up with exactly the providers the
            /// registry holds (ports by weight).
            #[test]
            fn subscribers_converge_on_the_registry(ops in proptest::collection::vec(op(), 1..60)) {
                let registry = Registry::new(RegistryConfig {
                    startup_grace: Duration::ZERO,
                    history_len: 3,
                    max_catch_up_deltas: 2,
                    ..RegistryConfig::default()
                });
                let mut sessions: Vec<SessionId> = (0..3).map(|i| registry.open_session(node(&format!("p{i}"))).0).collect();
                let (consumer, _) = registry.open_session(node("consumer"));
                registry.subscribe(consumer, key(), None).unwrap();
                let mut subscriber = Subscriber::default();
                let (pushed_to, push) = registry.open_session(node("pushed-to"));
                registry.subscribe(pushed_to, key(), None).unwrap();
                let mut pushed = Subscriber::default();
                let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
                for op in ops {
                    match op {
                        Op::Register { session, port, weight } => {
                            let instance = Instance { weight, ..instance(port) };
                            // A port held by another node is refused; that is fine.
                            let _ = registry.register(sessions[session], key(), instance);
                        }
                        Op::Unregister { session, port } => {
                            let _ = registry.unregister(sessions[session], &key(), "127.0.0.1", port);
                        }
                        Op::Close { session } => {
                            registry.close_session(sessions[session], "test");
                            sessions[session] = registry.open_session(node(&format!("p{session}"))).0;
                        }
                        Op::Flush => {
                            registry.flush();
                        }
                        Op::CatchUp => subscriber.apply(&registry),
                        Op::Push => pushed.push(&registry, &push, &rt),
                    }
                }
                registry.flush();
                subscriber.apply(&registry);
                pushed.push(&registry, &push, &rt);
                let held: BTreeSet<Addr> = registry.detail(&key()).map(|(_, p, _)| p.iter().map(instance_addr).collect()).unwrap_or_default();
                let seen: BTreeSet<Addr> = subscriber.providers.keys().cloned().collect();
                prop_assert_eq!(seen, held);
                let weights: BTreeMap<Addr, u32> = registry.detail(&key()).map(|(_, p, _)| p.iter().map(|i| (instance_addr(i), i.weight)).collect()).unwrap_or_default();
                prop_assert_eq!(&subscriber.providers, &weights);
                prop_assert_eq!(&pushed.providers, &weights, "through the push queue");
            }
        }
    }
}
