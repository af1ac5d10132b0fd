//! What a node wants the registry to hold, shared by the handle and the
//! session's task: registrations, subscriptions with who is told of their
//! changes, the last rules, and the commands the handle sends the task.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tern_proto::registry::{self as pb, Instance, node_message};
use tokio::sync::{oneshot, watch};

use super::Addr;
use super::error::RegistryError;
use super::list::{ProviderList, Update};
use crate::ServiceKey;
use crate::governance::RuleSet;

/// Told of each change of a subscribed list, on the session's task.
#[derive(Clone)]
pub(super) enum Listener {
    /// The whole list after the change ([`RegistrySession::subscribe_with`]).
    List(Arc<dyn Fn(&ProviderList) + Send + Sync>),
    /// The change itself ([`RegistrySession::follow`]); `u64` tells
    /// followers apart, to remove one.
    Updates(u64, Arc<dyn Fn(&Update<'_>) + Send + Sync>),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listener::List(_) => f.write_str("Listener::List"),
            Listener::Updates(id, _) => write!(f, "Listener::Updates({id})"),
        }
    }
}

/// Who is told of a list's changes, and whether the whole list is kept.
/// Locked by the task while it applies a change, inside the list's watch
/// lock: a follower joins either before a change (and is told of it) or
/// after it (and starts from the list that includes it).
#[derive(Debug, Default)]
pub(super) struct Audience {
    pub(super) listeners: Vec<Listener>,
    /// The list's providers are kept (someone reads the whole list, or a
    /// cache file is written); otherwise only its epoch and revision.
    pub(super) keeps_list: bool,
}

/// One subscription of the desired state.
#[derive(Debug)]
pub(super) struct Subscribed {
    pub(super) tx: watch::Sender<Arc<ProviderList>>,
    pub(super) audience: Arc<Mutex<Audience>>,
}

/// What this node wants the registry to hold.
#[derive(Debug, Default)]
pub(super) struct Desired {
    pub(super) registrations: BTreeMap<(ServiceKey, Addr), Instance>,
    pub(super) subscriptions: HashMap<ServiceKey, Subscribed>,
    /// The last rules received per service; kept across reconnects.
    pub(super) rules: HashMap<ServiceKey, watch::Sender<Arc<RuleSet>>>,
    /// Lists loaded from the cache file, used as subscriptions start.
    pub(super) cached: HashMap<ServiceKey, ProviderList>,
    /// Set, under this lock, when the desired state is replayed on a new
    /// stream: a change made while it is false goes out with the next
    /// replay, a change made while it is true goes out as a command.
    pub(super) connected: bool,
    /// Subscriptions that found the command queue full; sent by the task.
    pub(super) unsent: Vec<ServiceKey>,
    /// A list changed since the cache file was written.
    pub(super) cache_dirty: bool,
    /// Whether lists are written to a cache file (then always kept whole).
    pub(super) caching: bool,
    /// The id of the next follower.
    pub(super) next_follower: u64,
}

#[derive(Debug)]
pub(super) struct Command {
    /// `None`: only wakes the task to notice that the session was stopped.
    pub(super) message: Option<node_message::Body>,
    pub(super) reply: Option<oneshot::Sender<Result<(), RegistryError>>>,
}

/// The subscribe message for `key`, resuming from `known` if given.
pub(super) fn subscribe_message(key: &ServiceKey, known: Option<(String, u64)>) -> node_message::Body {
    let (known_epoch, known_revision) = known.unwrap_or_default();
    node_message::Body::Subscribe(pb::Subscribe {
        service: Some(key.into()),
        known_epoch,
        known_revision,
    })
}
