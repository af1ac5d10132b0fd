//! One session's push queue: the services it must be sent, what it was last
//! sent of each, and the rules due. The flusher marks it (or hands a delta
//! straight to the session's transport); the session's push task takes
//! from it ([`PushQueue::next`]).
//!
//! A subscriber that reads slowly therefore never builds a backlog: it holds
//! at most one "dirty" mark per service, and catches up with deltas or one
//! snapshot when it is ready.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use rpc_core::ServiceKey;
use tokio::sync::Notify;

use crate::outgoing::{Deliver, PushedDelta};

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
    pub(super) fn push_delta(&self, key: &ServiceKey, delta: &Arc<PushedDelta>) -> bool {
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
    pub(super) fn mark(&self, key: &ServiceKey, reset: Option<Option<u64>>) {
        self.mark_with(key, reset, None);
    }

    /// Marks `key` dirty by `delta`, flushed just now.
    pub(super) fn mark_delta(&self, key: &ServiceKey, delta: &Arc<PushedDelta>) {
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

    pub(super) fn mark_rules(&self, key: &ServiceKey) {
        self.state.lock().expect("push lock").rules.insert(key.clone());
        self.notify.notify_one();
    }

    pub(super) fn forget(&self, key: &ServiceKey) {
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
