//! The service map: the live map `service -> providers, consumers`, its
//! revisions, the bounded history of recent deltas, and what each session
//! must be pushed.
//!
//! How a change travels from a node's Register to its subscribers' sockets
//! is told, step by step, in [`crate::flusher`].
//!
//! - [`map`]: the map and the requests that change it ([`Registry`]).
//! - [`validate`]: what an instance must be to be registered.
//! - [`answer`]: how a request is answered ([`RequestError`], [`ack`], [`error`]).
//! - [`pending`]: the net change of a service since its last flush (coalescing).
//! - [`flush`]: pending changes become revisions, deltas encoded once, and pushes.
//! - [`catch_up`]: deltas from the history, or a snapshot, for a subscriber.
//! - [`push_queue`]: one session's due services, rules and last-sent revisions.
//! - [`rules`]: governance rules pushed to providers and subscribers.
//! - [`replication`]: what this server owns, batched for its peers, with a digest.
//! - [`replicas`]: peers' data held here, merged into the map; orphans of peers gone.
//! - [`views`]: read-only views for the admin API.
//! - [`stall`]: a server that was not running judges no node by that time.

mod answer;
mod catch_up;
mod flush;
mod map;
mod pending;
mod push_queue;
mod replicas;
mod replication;
mod rules;
pub mod stall;
mod validate;
mod views;

pub use answer::{RequestError, ack, error};
pub use flush::Pushes;
pub use map::{Batch, Summary};
pub use map::{NodeInfo, Registry, RegistryConfig, SessionId};
pub use push_queue::{Due, PushQueue, Work};
pub use replicas::{MAX_PEER_NAME, ReplicaLink, ReplicaView};
pub use replication::Replication;
pub use views::ServiceDetail;

#[cfg(test)]
mod replication_tests;
#[cfg(test)]
mod tests;
