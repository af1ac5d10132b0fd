//! Coalescing: the net change of one service since its last flush. A
//! provider added and removed within one window never reaches a subscriber.

use std::collections::{BTreeMap, BTreeSet};

use rpc_core::registry::Addr;
use tern_proto::registry::Instance;

/// Net change since the last flush.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) added: BTreeMap<Addr, Instance>,
    pub(super) updated: BTreeMap<Addr, Instance>,
    pub(super) removed: BTreeSet<Addr>,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }

    pub(super) fn add(&mut self, addr: &Addr, instance: Instance, existed_at_flush: bool) {
        self.removed.remove(addr);
        if existed_at_flush {
            self.updated.insert(addr.clone(), instance);
        } else {
            self.added.insert(addr.clone(), instance);
        }
    }

    pub(super) fn remove(&mut self, addr: &Addr) {
        self.updated.remove(addr);
        // Added and removed within one window: the subscribers never hear of it.
        if self.added.remove(addr).is_none() {
            self.removed.insert(addr.clone());
        }
    }
}
