//! A subscribed provider list and the changes pushed to it.
//!
//! The ConfigServer sends a subscriber a snapshot of the list, then deltas
//! (see docs/PROTOCOL.md). A node hands each one on as an [`Update`], the
//! change itself (linkerd's `Update`, tower's `Change`): a consumer's
//! directory applies it to its members without a full list in between.
//! A [`ProviderList`] holds the whole list for those who ask for it
//! (`RegistrySession::subscribe`, a cache file); otherwise it holds only
//! where the subscriber stands (epoch, revision), which is what resuming
//! after a reconnect needs.

use std::collections::BTreeMap;
use std::sync::Arc;

use tern_proto::registry::Instance;

use super::Addr;
use super::convert::instance_addr;

/// The providers of one service as this node knows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderList {
    /// Epoch of the ConfigServer the list came from ("" = none yet, or a
    /// fresh snapshot was asked for).
    pub epoch: String,
    pub revision: u64,
    /// By `host:port` (look up with a `&str`). Instances are shared between
    /// successive lists, so an update costs the changed entries, not a copy
    /// of every instance. Empty unless the list is kept whole (see the
    /// module docs).
    pub providers: BTreeMap<Addr, Arc<Instance>>,
    /// False while the list rests on a partial snapshot (a restarted server
    /// still hearing from providers): it is then never resumed by revision,
    /// only replaced by the next complete snapshot.
    pub complete: bool,
}

/// One pushed change to a provider list, handed to followers as it came.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Update<'a> {
    /// The whole list: what was held before and is not here is gone.
    Reset(&'a [Instance]),
    /// `removed` (by `host:port`) left; `added` joined; `updated` changed
    /// their registration. Both `added` and `updated` replace an entry of
    /// the same address if one is held (after a partial snapshot, which
    /// comes as a change with nothing removed, some may be).
    Change {
        added: &'a [Instance],
        updated: &'a [Instance],
        removed: &'a [&'a str],
    },
}

/// How a pushed delta relates to the list held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// It starts where the list is: apply it.
    Apply,
    /// Nothing to do: it is already applied, or a fresh snapshot is on its
    /// way (the list's epoch was cleared to ask for one).
    Skip,
    /// The list is behind it (a revision was missed) or it comes from
    /// another server: ask for a snapshot.
    Behind,
}

impl ProviderList {
    /// Where a node holding this list can resume: its epoch and revision,
    /// if it is a complete list from a server.
    pub(super) fn resume_point(&self) -> Option<(String, u64)> {
        (self.complete && !self.epoch.is_empty()).then(|| (self.epoch.clone(), self.revision))
    }

    /// Whether a delta from `from` to `to`, pushed by the server of
    /// `epoch`, follows on from this list.
    pub(super) fn step(&self, epoch: &str, from: u64, to: u64) -> Step {
        if self.epoch.is_empty() {
            return Step::Skip;
        }
        let same_epoch = self.epoch == epoch;
        if same_epoch && self.revision == from {
            Step::Apply
        } else if same_epoch && to <= self.revision {
            Step::Skip
        } else {
            Step::Behind
        }
    }

    /// Applies a snapshot; `keep` = keep its providers. A partial snapshot
    /// adds to what is held instead of replacing it.
    pub(super) fn apply_snapshot(
        &mut self,
        epoch: String,
        revision: u64,
        partial: bool,
        providers: &[Instance],
        keep: bool,
    ) {
        if !partial {
            self.providers.clear();
        }
        self.epoch = epoch;
        self.revision = revision;
        self.complete = !partial;
        if keep {
            for instance in providers {
                self.providers
                    .insert(instance_addr(instance), Arc::new(instance.clone()));
            }
        }
    }

    /// Applies a delta that [`ProviderList::step`] said to apply.
    pub(super) fn apply_delta(&mut self, to: u64, update: &Update<'_>, keep: bool) {
        self.revision = to;
        if !keep {
            return;
        }
        if let Update::Change {
            added,
            updated,
            removed,
        } = update
        {
            for addr in *removed {
                self.providers.remove(*addr);
            }
            for instance in added.iter().chain(*updated) {
                self.providers
                    .insert(instance_addr(instance), Arc::new(instance.clone()));
            }
        }
    }

    /// The update that brings a follower to this list (which is kept whole).
    pub(super) fn as_reset(&self) -> Vec<Instance> {
        self.providers.values().map(|i| Instance::clone(i)).collect()
    }
}

#[cfg(test)]
#[path = "list_tests.rs"]
mod tests;
