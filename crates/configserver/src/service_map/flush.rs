//! Flushing: each dirty service's pending change becomes a new revision
//! and one [`Delta`], encoded once ([`PushedDelta`]) and kept in the
//! service's bounded history; then the pushes to its subscribers
//! ([`Pushes`]), made outside the registry lock.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prost::Message;
use rpc_core::ServiceKey;
use tern_proto::registry::{Delta, ServerMessage, server_message};
use tracing::debug;

use super::map::{Registry, State, remove_if_unused};
use super::push_queue::PushQueue;
use crate::outgoing::PushedDelta;

impl Registry {
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
    pub(super) fn push_flushed(&self, flushed: impl IntoIterator<Item = Flushed>) -> Marked {
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
    pub(super) fn flush_service(&self, state: &mut State, key: &ServiceKey) -> Option<Flushed> {
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
}

/// A service's change just flushed, and the push queues of its subscribers.
#[derive(Debug)]
pub(super) struct Flushed {
    pub(super) key: ServiceKey,
    pub(super) delta: Arc<PushedDelta>,
    pub(super) subscribers: Vec<Arc<PushQueue>>,
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
pub(super) struct Marked {
    /// Deltas handed to transports by the flusher.
    pub(super) delivered: usize,
    /// Sessions whose task must push.
    pub(super) marked: usize,
}
