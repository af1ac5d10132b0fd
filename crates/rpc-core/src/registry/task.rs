//! The session's task: connects (in turn, with backoff), replays the
//! desired state, then reads the server's pushes and sends this node's
//! requests and heartbeats until the stream ends, and starts over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tern_proto::registry::{self as pb, NodeMessage, ServerMessage, Snapshot, node_message, server_message};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::SessionConfig;
use super::cache::{self, parse_rules};
use super::desired::{Audience, Command, Desired, Listener, subscribe_message};
use super::error::{RegistryError, StreamError};
use super::list::{ProviderList, Step, Update};
use super::pushed::PushedDelta;
use super::reconnect::{Attempt, Reconnect, Say};
use super::stream::{self, Incoming, Stream};
use crate::ServiceKey;

/// A node reads at most this many messages in a row before it looks at
/// its commands and timer (a server that never stops sending must not
/// starve its heartbeats).
const READS_IN_A_ROW: u32 = 64;

/// Heartbeats come every `interval` less up to this share of it.
const HEARTBEAT_JITTER: f64 = 0.2;

/// `interval` less a random part of it, up to `share` (0..1) of it.
fn jittered(interval: Duration, share: f64, rng: &mut SmallRng) -> Duration {
    interval.mul_f64(1.0 - rng.random_range(0.0..=share.clamp(0.0, 1.0)))
}

pub(super) struct SessionTask {
    pub(super) config: SessionConfig,
    pub(super) desired: Arc<Mutex<Desired>>,
    /// See the handle's.
    pub(super) lists_changed: Arc<AtomicU64>,
    pub(super) refusal: Arc<Mutex<Option<String>>>,
    pub(super) connected: watch::Sender<Option<String>>,
    pub(super) stop: CancellationToken,
    pub(super) rng: SmallRng,
}

/// A subscribed list, as a pushed message finds it.
struct Subscription {
    key: ServiceKey,
    tx: watch::Sender<Arc<ProviderList>>,
    audience: Arc<Mutex<Audience>>,
    /// `lists_changed` when it was looked up.
    looked_up: u64,
}

/// Requests sent and waiting for the server's answer, by request id.
type Pending = HashMap<u64, oneshot::Sender<Result<(), RegistryError>>>;

/// Tells every listener of `audience` of a change: followers the change,
/// list listeners the list after it.
fn tell(audience: &Audience, list: &ProviderList, update: &Update<'_>) {
    for listener in &audience.listeners {
        match listener {
            Listener::List(on_change) => on_change(list),
            Listener::Updates(_, on_update) => on_update(update),
        }
    }
}

impl SessionTask {
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut reconnect = Reconnect::new(self.config.servers.clone(), self.config.backoff);
        let mut listed = self.config.address_server.as_deref().and_then(|url| {
            super::address_server::follow(url, &self.config, self.stop.clone())
                .inspect_err(|e| warn!(error = %e, "address server ignored; using the configured servers"))
                .ok()
        });
        loop {
            if let Some((servers, _task)) = &mut listed {
                let list = servers.borrow_and_update().clone();
                if !list.is_empty() && list != reconnect.servers() {
                    debug!(servers = ?list, "configserver list from the address server");
                    reconnect.set_servers(list, &mut self.rng);
                }
                if reconnect.servers().is_empty() {
                    // Nothing to try before the address server's first answer.
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = servers.changed() => {}
                    }
                    continue;
                }
            }
            let Some(server) = reconnect.next_server() else {
                warn!("no configserver address configured; registry session idle");
                self.stop.cancelled().await;
                return;
            };
            let stop = self.stop.clone();
            let connected = tokio::select! {
                _ = stop.cancelled() => return,
                connected = stream::connect(&self.config, &server) => connected,
            };
            let attempt = match connected {
                Ok((stream, welcome)) => match self.serve(&server, stream, welcome, &mut commands).await {
                    Some(ended) => Attempt::Ended(ended),
                    None => return, // stopped
                },
                Err(failed) => Attempt::Failed(failed),
            };
            self.connected.send_replace(None);
            if self.stop.is_cancelled() || commands.is_closed() {
                return; // every handle is gone
            }
            let (say, delay) = reconnect.after(&attempt, &mut self.rng);
            let failures = reconnect.failures();
            match (&attempt, say) {
                (Attempt::Ended(reason), _) => warn!(%server, %reason, "configserver stream ended; reconnecting"),
                (Attempt::Failed(reason @ StreamError::Refused { .. }), _) => {
                    warn!(%server, %reason, "configserver refused this node's session; check its app name and token");
                    *self.refusal.lock().expect("refusal lock") = Some(reason.to_string());
                }
                (Attempt::Failed(reason @ StreamError::Tls(_)), _) => {
                    warn!(%server, %reason, "TLS with the configserver failed; check the certificates and the CA");
                    *self.refusal.lock().expect("refusal lock") = Some(reason.to_string());
                }
                (Attempt::Failed(reason), _) if reason.is_unreachable() => {
                    debug!(%server, %reason, failures, "cannot reach configserver");
                }
                // Something answered but never welcomed us: a server at its
                // connection limit (it closes at once), one of another
                // version or transport, or not a ConfigServer.
                (Attempt::Failed(reason), Say::Warn) => {
                    warn!(%server, %reason, failures, transport = ?self.config.transport, "configserver did not open a session: is it full (--max-connections), or not a ConfigServer that speaks this transport?");
                }
                (Attempt::Failed(reason), Say::Debug) => {
                    debug!(%server, %reason, failures, "configserver did not open a session");
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// A welcomed stream: replay, then serve until it ends, or until the
    /// session is stopped (`None`).
    ///
    /// The loop reads first: a push is what wakes a node most often, and
    /// its task then polls nothing before the socket. The session's stop
    /// is not polled on every wake either: `RegistrySession::shutdown`
    /// wakes the task with an empty command, and every command received
    /// checks for it.
    async fn serve(
        &self,
        server: &str,
        stream: Stream,
        welcome: pb::Welcome,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Option<StreamError> {
        let Stream {
            out,
            mut inbound,
            _writer,
        } = stream;
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(100).into());
        let timeout = Duration::from_millis(welcome.heartbeat_timeout_ms.max(300).into());
        info!(%server, session = %welcome.session_id, epoch = %welcome.epoch, "registry session established");

        // Replay the desired state, then report connected.
        for body in self.replay() {
            let message = NodeMessage {
                request_id: 0,
                body: Some(body),
            };
            if out.send(message).await.is_err() {
                return Some(StreamError::WriteClosed);
            }
        }
        self.refusal.lock().expect("refusal lock").take();
        self.connected.send_replace(Some(welcome.epoch.clone()));

        let mut pending = Pending::new();
        // The subscription the last pushed list was for: a push is most
        // often for the same service as the one before.
        let mut last = None;
        let mut next_request = 1u64;
        // Jittered, so that nodes that (re)connected together do not beat
        // together: a ConfigServer's load stays level instead of a burst of
        // every node's heartbeat once per interval.
        let mut rng = SmallRng::from_os_rng();
        let mut next_beat = Instant::now() + jittered(interval, 0.9, &mut rng);
        let mut seq = 0u64;
        // One timer for both the next heartbeat and the silence check,
        // moved only when it fires: resetting a timer for every message
        // would cost a timer-wheel update per push.
        let mut heard = Instant::now();
        let timer = tokio::time::sleep_until(next_beat.min(heard + timeout));
        tokio::pin!(timer);
        // Messages read in a row: past a bound, commands and the timer are
        // looked at before the socket is read again.
        let mut streak = 0u32;
        let mut stopped = false;
        let ended = loop {
            tokio::select! {
                biased;
                message = inbound.next(), if streak < READS_IN_A_ROW => {
                    streak += 1;
                    match message {
                        None => break StreamError::Closed,
                        Some(Err(e)) => break e,
                        Some(Ok(incoming)) => {
                            heard = Instant::now();
                            match self.on_incoming(incoming, &welcome.epoch, &mut pending, &mut last) {
                                Err(e) => break e,
                                Ok(Some(resync)) => {
                                    let _ = out.send(NodeMessage { request_id: 0, body: Some(resync) }).await;
                                }
                                Ok(None) => {}
                            }
                        }
                    }
                }
                command = commands.recv() => {
                    streak = 0;
                    let Some(command) = command else { break StreamError::HandleDropped };
                    if self.stop.is_cancelled() {
                        stopped = true;
                        break StreamError::HandleDropped;
                    }
                    let Some(message) = command.message else { continue };
                    let request_id = if command.reply.is_some() { next_request += 1; next_request } else { 0 };
                    if let Some(reply) = command.reply {
                        pending.insert(request_id, reply);
                    }
                    if out.send(NodeMessage { request_id, body: Some(message) }).await.is_err() {
                        break StreamError::WriteClosed;
                    }
                }
                _ = &mut timer => {
                    streak = 0;
                    if self.stop.is_cancelled() {
                        // Its wake-up was lost to a full queue that has
                        // since drained (each command looks for it too).
                        stopped = true;
                        break StreamError::HandleDropped;
                    }
                    let now = Instant::now();
                    if now.saturating_duration_since(heard) >= timeout {
                        break StreamError::Silent(timeout);
                    }
                    if now >= next_beat {
                        next_beat = now + jittered(interval, HEARTBEAT_JITTER, &mut rng);
                        seq += 1;
                        let beat = NodeMessage { request_id: 0, body: Some(node_message::Body::Heartbeat(pb::Heartbeat { seq })) };
                        // A full queue means the server is not reading; the
                        // silence check ends the stream if it stays that way.
                        if let Err(mpsc::error::TrySendError::Closed(_)) = out.try_send(beat) {
                            break StreamError::WriteClosed;
                        }
                        let abandoned = self.take_abandoned();
                        if !abandoned.is_empty() {
                            // An unsubscribed list is not kept alive here either.
                            last = None;
                        }
                        for body in self.take_unsent().into_iter().chain(abandoned) {
                            if out.send(NodeMessage { request_id: 0, body: Some(body) }).await.is_err() {
                                break;
                            }
                        }
                        self.save_cache().await;
                    }
                    timer.as_mut().reset(next_beat.min(heard + timeout));
                }
                // Reached only when the socket was skipped and nothing else
                // is ready: read it again.
                _ = std::future::ready(()), if streak >= READS_IN_A_ROW => streak = 0,
            }
        };
        self.desired().connected = false;
        self.save_cache().await;
        if stopped {
            return None; // requests in flight get `Stopped` as their replies drop
        }
        // Requests in flight will be sent again by the next replay.
        for (_, reply) in pending {
            let _ = reply.send(Ok(()));
        }
        Some(ended)
    }

    fn desired(&self) -> std::sync::MutexGuard<'_, Desired> {
        self.desired.lock().expect("registry desired lock")
    }

    /// Subscriptions nobody watches any more, as Unsubscribe messages.
    fn take_abandoned(&self) -> Vec<node_message::Body> {
        let mut desired = self.desired();
        let abandoned: Vec<ServiceKey> = desired
            .subscriptions
            .iter()
            .filter(|(_, s)| s.tx.receiver_count() == 0)
            .map(|(key, _)| key.clone())
            .collect();
        abandoned
            .into_iter()
            .map(|key| {
                desired.subscriptions.remove(&key);
                self.lists_changed.fetch_add(1, Ordering::AcqRel);
                debug!(service = %key, "no one watches the list any more; unsubscribing");
                node_message::Body::Unsubscribe(pb::Unsubscribe {
                    service: Some((&key).into()),
                })
            })
            .collect()
    }

    /// Subscriptions that could not be queued when they were made.
    fn take_unsent(&self) -> Vec<node_message::Body> {
        let mut desired = self.desired();
        let unsent = std::mem::take(&mut desired.unsent);
        unsent
            .iter()
            .filter_map(|key| {
                let subscribed = desired.subscriptions.get(key)?;
                Some(subscribe_message(key, subscribed.tx.borrow().resume_point()))
            })
            .collect()
    }

    /// The desired state as messages. From here on changes go out as
    /// commands: `connected` is set in the same critical section.
    fn replay(&self) -> Vec<node_message::Body> {
        let mut desired = self.desired();
        desired.connected = true;
        desired.unsent.clear();
        let registrations = desired.registrations.iter().map(|((key, _), instance)| {
            node_message::Body::Register(pb::Register {
                service: Some(key.into()),
                instance: Some(instance.clone()),
            })
        });
        let subscriptions = desired
            .subscriptions
            .iter()
            .map(|(key, s)| subscribe_message(key, s.tx.borrow().resume_point()));
        registrations.chain(subscriptions).collect()
    }

    /// Applies one message from the server: a delta read in place if it is
    /// one, else the message decoded. Returns a message to send back when a
    /// list fell out of step and must be re-fetched.
    ///
    /// # Errors
    ///
    /// A frame that does not decode: the stream must end.
    fn on_incoming(
        &self,
        incoming: Incoming<'_>,
        epoch: &str,
        pending: &mut Pending,
        last: &mut Option<Subscription>,
    ) -> Result<Option<node_message::Body>, StreamError> {
        if let Incoming::Frame(frame) = incoming
            && let Some(delta) = PushedDelta::read(frame)
        {
            return Ok(self.on_delta(delta, epoch, last));
        }
        Ok(self.on_message(incoming.decode()?, epoch, pending, last))
    }

    /// A pushed delta, applied to its subscription if there is one.
    fn on_delta(
        &self,
        mut delta: PushedDelta<'_>,
        epoch: &str,
        last: &mut Option<Subscription>,
    ) -> Option<node_message::Body> {
        let subscription = self.subscription(delta.service.take(), last)?;
        self.apply_delta(subscription, &delta, epoch)
    }

    /// Applies one decoded server message; returns a message to send back
    /// when a list fell out of step and must be re-fetched.
    fn on_message(
        &self,
        message: ServerMessage,
        epoch: &str,
        pending: &mut Pending,
        last: &mut Option<Subscription>,
    ) -> Option<node_message::Body> {
        let request_id = message.request_id;
        let mut answer = |result| {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(result);
            }
        };
        match message.body {
            Some(server_message::Body::Snapshot(mut snapshot)) => {
                if let Some(subscription) = self.subscription(snapshot.service.take(), last) {
                    self.apply_snapshot(subscription, snapshot);
                }
                None
            }
            Some(server_message::Body::Delta(mut delta)) => {
                self.on_delta(PushedDelta::from_message(&mut delta), epoch, last)
            }
            Some(server_message::Body::Rules(rules)) => {
                self.apply_rules(rules);
                None
            }
            Some(server_message::Body::Ack(_)) => {
                answer(Ok(()));
                None
            }
            Some(server_message::Body::Error(e)) => {
                if request_id == 0 {
                    warn!(kind = %e.kind, message = %e.message, "configserver refused a request");
                }
                answer(Err(RegistryError::Refused {
                    kind: e.kind,
                    message: e.message,
                }));
                None
            }
            _ => None,
        }
    }

    /// The subscription of a pushed message's `key`: `last`, if it is for
    /// that key and no subscription changed since it was looked up (no
    /// lock, no hashing, no copies), else looked up into `last`.
    fn subscription<'a>(
        &self,
        key: Option<pb::ServiceKey>,
        last: &'a mut Option<Subscription>,
    ) -> Option<&'a Subscription> {
        let key = key?;
        let changed = self.lists_changed.load(Ordering::Acquire);
        let same = |s: &Subscription| {
            s.looked_up == changed
                && s.key.interface == key.interface
                && s.key.version == key.version
                && s.key.group == key.group
        };
        if !last.as_ref().is_some_and(same) {
            let key = ServiceKey::from(key);
            let desired = self.desired();
            // Read again under the lock: what is read below is as of it.
            let looked_up = self.lists_changed.load(Ordering::Acquire);
            *last = desired.subscriptions.get(&key).map(|s| Subscription {
                tx: s.tx.clone(),
                audience: s.audience.clone(),
                key,
                looked_up,
            });
        }
        last.as_ref()
    }

    /// Notes that a list changed since the cache file was written.
    fn mark_cache_dirty(&self) {
        if self.config.cache_file.is_some() {
            self.desired().cache_dirty = true;
        }
    }

    fn apply_snapshot(&self, subscription: &Subscription, snapshot: Snapshot) {
        let Subscription { key, tx, audience, .. } = subscription;
        let Snapshot {
            epoch,
            revision,
            providers,
            partial,
            ..
        } = snapshot;
        // A partial snapshot (the server restarted and is still hearing
        // from providers) adds to what was held instead of replacing it.
        let update = if partial {
            Update::Change {
                added: &providers,
                updated: &[],
                removed: &[],
            }
        } else {
            Update::Reset(&providers)
        };
        tx.send_modify(|list| {
            let audience = audience.lock().expect("audience lock");
            let list = Arc::make_mut(list);
            list.apply_snapshot(epoch, revision, partial, &providers, audience.keeps_list);
            debug!(service = %key, revision, providers = providers.len(), partial, "snapshot");
            tell(&audience, list, &update);
        });
        self.mark_cache_dirty();
    }

    fn apply_delta(
        &self,
        subscription: &Subscription,
        delta: &PushedDelta<'_>,
        epoch: &str,
    ) -> Option<node_message::Body> {
        let Subscription { key, tx, audience, .. } = subscription;
        let update = delta.update();
        let mut step = Step::Skip;
        tx.send_if_modified(|list| {
            step = list.step(epoch, delta.from_revision, delta.to_revision);
            if step != Step::Apply {
                return false;
            }
            let audience = audience.lock().expect("audience lock");
            let list = Arc::make_mut(list);
            list.apply_delta(delta.to_revision, &update, audience.keeps_list);
            debug!(service = %key, revision = list.revision, added = delta.added.len(), removed = delta.removed.len(), "delta");
            tell(&audience, list, &update);
            true
        });
        match step {
            Step::Apply => {
                self.mark_cache_dirty();
                None
            }
            Step::Skip => None,
            Step::Behind => {
                warn!(service = %key, held = tx.borrow().revision, from = delta.from_revision, "delta out of step; asking for a snapshot");
                Some(subscribe_message(key, None))
            }
        }
    }

    fn apply_rules(&self, message: pb::Rules) {
        let Some(key) = message.service.as_ref().map(ServiceKey::from) else {
            return;
        };
        let set = match parse_rules(message.revision, &message.rules_json) {
            Ok(set) => set,
            Err(e) => {
                warn!(service = %key, error = %e, "unreadable rules pushed; keeping the previous ones");
                return;
            }
        };
        debug!(service = %key, revision = set.revision, rules = set.rules.len(), "rules");
        let mut desired = self.desired();
        let tx = desired
            .rules
            .entry(key)
            .or_insert_with(|| watch::channel(Arc::default()).0);
        tx.send_replace(Arc::new(set));
        desired.cache_dirty = true;
    }

    /// Writes the lists to the cache file if they changed since the last
    /// write (called at most once per heartbeat interval, and at stream end).
    async fn save_cache(&self) {
        let Some(path) = &self.config.cache_file else { return };
        let bytes = {
            let mut desired = self.desired();
            if !std::mem::take(&mut desired.cache_dirty) {
                return;
            }
            let lists: Vec<(ServiceKey, Arc<ProviderList>)> = desired
                .subscriptions
                .iter()
                .map(|(key, s)| (key.clone(), s.tx.borrow().clone()))
                .collect();
            let rules: Vec<(ServiceKey, Arc<_>)> = desired
                .rules
                .iter()
                .map(|(key, tx)| (key.clone(), tx.borrow().clone()))
                .collect();
            drop(desired);
            cache::encode(
                lists.iter().map(|(k, l)| (k, &**l)),
                rules.iter().map(|(k, r)| (k, &**r)),
            )
        };
        cache::save(path, bytes).await;
    }
}
