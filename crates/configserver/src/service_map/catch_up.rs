//! Catching up: what a subscriber that was last sent some revision needs
//! now: the deltas since then from the history, or one fresh snapshot when
//! the history no longer covers it or the node is far behind.

use std::sync::atomic::Ordering;

use rpc_core::ServiceKey;
use tern_proto::registry::{Instance, ServerMessage, Snapshot, server_message};

use super::map::Registry;
use crate::outgoing::Outgoing;

impl Registry {
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
}
