//! [`RegistrySession`], the handle both SDKs hold: it changes the desired
//! state (what this node registers and subscribes to, replayed on every
//! new stream) and sends requests through the session's task; and
//! [`Follower`], a follower's hold on a list.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tern_proto::registry::{self as pb, Instance, node_message};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

use super::convert::instance_addr;
use super::desired::{Audience, Command, Desired, Listener, Subscribed, subscribe_message};
use super::error::RegistryError;
use super::list::{ProviderList, Update};
use super::task::SessionTask;
use super::{Addr, SessionConfig, cache};
use crate::ServiceKey;
use crate::governance::RuleSet;

/// Handle to the session task; cheap to clone. The task stops when the last
/// handle is dropped (the ConfigServer then removes this node's instances at
/// once) or on [`RegistrySession::shutdown`].
#[derive(Debug, Clone)]
pub struct RegistrySession {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SessionConfig,
    commands: mpsc::Sender<Command>,
    desired: Arc<Mutex<Desired>>,
    /// Bumped, under the `desired` lock, whenever a subscription is added
    /// or removed or changes what it keeps: the session's task keeps the
    /// last subscription a message was for while this stays the same.
    lists_changed: Arc<AtomicU64>,
    /// Why the last server refused the session, if it did (cleared on connect).
    refusal: Arc<Mutex<Option<String>>>,
    connected: watch::Receiver<Option<String>>,
    stop: CancellationToken,
    _stop_guard: DropGuard,
}

/// A follower of a list ([`RegistrySession::follow`]): while it is held,
/// the list stays subscribed and its changes are handed to the follower's
/// function. Dropping it stops them.
#[derive(Debug)]
pub struct Follower {
    id: u64,
    audience: Weak<Mutex<Audience>>,
    list: watch::Receiver<Arc<ProviderList>>,
}

impl Follower {
    /// The revision of the list as last applied (0 before the first).
    pub fn revision(&self) -> u64 {
        self.list.borrow().revision
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(audience) = self.audience.upgrade() {
            let mut audience = audience.lock().expect("audience lock");
            audience
                .listeners
                .retain(|l| !matches!(l, Listener::Updates(id, _) if *id == self.id));
        }
    }
}

// === impl RegistrySession ===

impl RegistrySession {
    /// Starts the session task (it connects in the background).
    pub fn start(config: SessionConfig) -> RegistrySession {
        let (commands, command_rx) = mpsc::channel(256);
        let (connected_tx, connected) = watch::channel(None);
        let stop = CancellationToken::new();
        let mut desired = Desired::default();
        if let Some(path) = &config.cache_file {
            let cached = cache::load(path);
            desired.caching = true;
            desired.cached = cached.lists;
            desired.rules = cached
                .rules
                .into_iter()
                .map(|(key, set)| (key, watch::channel(Arc::new(set)).0))
                .collect();
        }
        let desired = Arc::new(Mutex::new(desired));
        let lists_changed = Arc::new(AtomicU64::new(0));
        let refusal = Arc::new(Mutex::new(None));
        let task = SessionTask {
            config: config.clone(),
            desired: desired.clone(),
            lists_changed: lists_changed.clone(),
            refusal: refusal.clone(),
            connected: connected_tx,
            stop: stop.clone(),
            rng: SmallRng::from_os_rng(),
        };
        tokio::spawn(task.run(command_rx));
        RegistrySession {
            inner: Arc::new(Inner {
                config,
                commands,
                desired,
                lists_changed,
                refusal,
                connected,
                _stop_guard: stop.clone().drop_guard(),
                stop,
            }),
        }
    }

    /// The epoch of the ConfigServer while connected, `None` while not.
    pub fn connected(&self) -> watch::Receiver<Option<String>> {
        self.inner.connected.clone()
    }

    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// Why the ConfigServer refused this node's session (e.g. a wrong
    /// token), if its last answer was a refusal.
    pub fn refusal(&self) -> Option<String> {
        self.inner.refusal.lock().expect("refusal lock").clone()
    }

    /// Registers a provider instance: now if connected (waiting for the
    /// server's answer), and again after every reconnect.
    ///
    /// # Errors
    ///
    /// The server refused it (it is then forgotten), or did not answer.
    pub async fn register(&self, key: &ServiceKey, instance: Instance) -> Result<(), RegistryError> {
        let addr = instance_addr(&instance);
        let connected = {
            let mut desired = self.desired();
            desired
                .registrations
                .insert((key.clone(), addr.clone()), instance.clone());
            desired.connected
        };
        let message = node_message::Body::Register(pb::Register {
            service: Some(key.into()),
            instance: Some(instance),
        });
        let result = self.request(message, connected).await;
        if let Err(RegistryError::Refused { .. }) = &result {
            self.desired().registrations.remove(&(key.clone(), addr));
        }
        result
    }

    /// Withdraws a registration.
    ///
    /// # Errors
    ///
    /// The server did not answer in time.
    pub async fn unregister(&self, key: &ServiceKey, host: &str, port: u16) -> Result<(), RegistryError> {
        let connected = {
            let mut desired = self.desired();
            desired
                .registrations
                .remove(&(key.clone(), Addr::new(host, port.into())));
            desired.connected
        };
        let message = node_message::Body::Unregister(pb::Unregister {
            service: Some(key.into()),
            host: host.to_owned(),
            port: port.into(),
        });
        match self.request(message, connected).await {
            // Already gone on the server (e.g. it restarted): that is the goal.
            Err(RegistryError::Refused { kind, .. }) if kind == "not_found" => Ok(()),
            other => other,
        }
    }

    /// The live provider list of `key`, kept whole. Starts from the cached
    /// list, if any. When every receiver of it (and every [`Follower`]) is
    /// dropped, the session unsubscribes (at its next heartbeat).
    ///
    /// A consumer that only needs the changes uses [`RegistrySession::follow`],
    /// which costs no copy of the list. If `key` was followed only, its
    /// list is fetched afresh (a new snapshot, within milliseconds while
    /// connected) and is empty until then.
    pub fn subscribe(&self, key: &ServiceKey) -> watch::Receiver<Arc<ProviderList>> {
        self.subscribe_keeping(key, None)
    }

    /// Like [`RegistrySession::subscribe`], and `on_change` is called with
    /// the list each time a pushed snapshot or delta has been applied to it
    /// (the first snapshot included), as Dubbo tells its `NotifyListener`.
    /// It runs on the session's task, before the next message is read, while
    /// the list's `watch` is locked: it must be quick, must not block, must
    /// not call the session (nor read this list's receiver, nor drop or ask
    /// a [`Follower`] of the same service) and must not panic. It is called as long as the
    /// list is subscribed, i.e. while some receiver of it is held.
    pub fn subscribe_with(
        &self,
        key: &ServiceKey,
        on_change: impl Fn(&ProviderList) + Send + Sync + 'static,
    ) -> watch::Receiver<Arc<ProviderList>> {
        self.subscribe_keeping(key, Some(Listener::List(Arc::new(on_change))))
    }

    /// Follows the providers of `key` by their changes: `on_update` is
    /// handed each pushed change as it came ([`Update::Reset`] with the
    /// whole list first, then [`Update::Change`]s), and the session keeps
    /// no copy of the list (only where it stands, to resume after a
    /// reconnect), unless a cache file or another subscriber wants it.
    ///
    /// If the list is held already (kept whole, or loaded from the cache
    /// file), `on_update` is called with it at once, before this returns;
    /// if `key` is subscribed without its list being kept, a fresh snapshot
    /// is fetched, and `on_update` starts from it. `on_update` runs on the
    /// session's task under the same rules as [`RegistrySession::subscribe_with`]'s.
    pub fn follow(&self, key: &ServiceKey, on_update: impl Fn(&Update<'_>) + Send + Sync + 'static) -> Follower {
        let mut desired = self.desired();
        let id = desired.next_follower;
        desired.next_follower += 1;
        let listener = Listener::Updates(id, Arc::new(on_update));
        let existed = desired.subscriptions.contains_key(key);
        let (tx, audience) = self.subscription(&mut desired, key);
        let mut refetch = false;
        tx.send_if_modified(|list| {
            let mut audience = audience.lock().expect("audience lock");
            if let Listener::Updates(_, on_update) = &listener {
                if audience.keeps_list && (!list.epoch.is_empty() || !list.providers.is_empty()) {
                    on_update(&Update::Reset(&list.as_reset()));
                } else if existed && !list.epoch.is_empty() {
                    // Held only as a revision: start everyone over.
                    refetch = true;
                    Arc::make_mut(list).epoch.clear();
                }
            }
            audience.listeners.push(listener);
            false
        });
        if refetch {
            self.resubscribe(&mut desired, key);
        }
        Follower {
            id,
            audience: Arc::downgrade(&audience),
            list: tx.subscribe(),
        }
    }

    /// The governance rules of `key` as last pushed (empty until the first
    /// push). The server sends them for every service this node registers
    /// or subscribes to; they are kept while the ConfigServer is away.
    pub fn rules(&self, key: &ServiceKey) -> watch::Receiver<Arc<RuleSet>> {
        let mut desired = self.desired();
        desired
            .rules
            .entry(key.clone())
            .or_insert_with(|| watch::channel(Arc::default()).0)
            .subscribe()
    }

    /// Closes the stream; the ConfigServer drops this node's instances and
    /// subscriptions at once.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        // Wakes the task, which looks for the stop at every command; if the
        // queue is full, the commands in it wake it.
        let _ = self.inner.commands.try_send(Command {
            message: None,
            reply: None,
        });
    }

    fn desired(&self) -> std::sync::MutexGuard<'_, Desired> {
        self.inner.desired.lock().expect("registry desired lock")
    }

    /// A subscription whose list is kept whole, with `listener` added.
    fn subscribe_keeping(&self, key: &ServiceKey, listener: Option<Listener>) -> watch::Receiver<Arc<ProviderList>> {
        let mut desired = self.desired();
        let (tx, audience) = self.subscription(&mut desired, key);
        // In the list's watch lock, then the audience's, as the task applies
        // a change: no change lands between the switch and the refetch.
        let mut refetch = false;
        tx.send_if_modified(|list| {
            let mut audience = audience.lock().expect("audience lock");
            if !audience.keeps_list {
                audience.keeps_list = true;
                // Only its revision was held: fetch the whole list (with
                // no epoch, a snapshot is on its way already).
                refetch = !list.epoch.is_empty();
                if refetch {
                    Arc::make_mut(list).epoch.clear();
                }
            }
            audience.listeners.extend(listener);
            refetch
        });
        if refetch {
            self.resubscribe(&mut desired, key);
        }
        tx.subscribe()
    }

    /// The subscription of `key`, made (and sent, if connected) if there
    /// is none: its list's sender and audience.
    fn subscription(
        &self,
        desired: &mut Desired,
        key: &ServiceKey,
    ) -> (watch::Sender<Arc<ProviderList>>, Arc<Mutex<Audience>>) {
        if let Some(existing) = desired.subscriptions.get(key) {
            return (existing.tx.clone(), existing.audience.clone());
        }
        let initial = desired.cached.remove(key).unwrap_or_default();
        let known = initial.resume_point();
        let (tx, _) = watch::channel(Arc::new(initial));
        let audience = Arc::new(Mutex::new(Audience {
            listeners: Vec::new(),
            keeps_list: desired.caching,
        }));
        let subscribed = Subscribed {
            tx: tx.clone(),
            audience: audience.clone(),
        };
        desired.subscriptions.insert(key.clone(), subscribed);
        self.inner.lists_changed.fetch_add(1, Ordering::AcqRel);
        self.send_subscribe(desired, key, known);
        (tx, audience)
    }

    /// Asks again for `key`'s whole list (a complete snapshot).
    fn resubscribe(&self, desired: &mut Desired, key: &ServiceKey) {
        debug!(service = %key, "fetching the whole list afresh");
        self.inner.lists_changed.fetch_add(1, Ordering::AcqRel);
        self.send_subscribe(desired, key, None);
    }

    /// Sends a subscribe now if connected; otherwise the replay on connect does.
    fn send_subscribe(&self, desired: &mut Desired, key: &ServiceKey, known: Option<(String, u64)>) {
        if desired.connected {
            let command = Command {
                message: Some(subscribe_message(key, known)),
                reply: None,
            };
            if self.inner.commands.try_send(command).is_err() {
                desired.unsent.push(key.clone());
            }
        }
    }

    async fn request(&self, message: node_message::Body, connected: bool) -> Result<(), RegistryError> {
        if self.inner.stop.is_cancelled() {
            return Err(RegistryError::Stopped);
        }
        if !connected {
            return Ok(()); // sent by the replay on connect
        }
        let (reply, answer) = oneshot::channel();
        let timeout = self.inner.config.request_timeout;
        let exchange = async {
            self.inner
                .commands
                .send(Command {
                    message: Some(message),
                    reply: Some(reply),
                })
                .await
                .map_err(|_| RegistryError::Stopped)?;
            answer.await.map_err(|_| RegistryError::Stopped)?
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RegistryError::Timeout(timeout))?
    }
}
