//! The node side of the control plane, shared by both SDKs: one long-lived
//! stream to a ConfigServer, re-established after failures, carrying this
//! node's registrations and subscriptions and the server's pushes.
//!
//! - [`RegistrySession`] keeps the *desired* state (what this node registers
//!   and subscribes to) and replays it on every new stream, so a restarted
//!   ConfigServer gets everything back.
//! - A pushed change is handed on as it came ([`Update`]): a consumer's
//!   directory follows a service with [`RegistrySession::follow`] and applies
//!   each change to its members. Who wants the whole list gets it as a
//!   [`tokio::sync::watch`] of the latest [`ProviderList`]
//!   ([`RegistrySession::subscribe`]). While the ConfigServer is away the
//!   lists stay as they were.
//! - Lists can be saved to a file ([`SessionConfig::cache_file`]) so a node
//!   restarted while the ConfigServer is down still finds its providers.
//!
//! # Layout
//!
//! - [`config`]: [`SessionConfig`], [`Role`], [`Transport`].
//! - [`address_server`]: the ConfigServers of a cluster, fetched from an address server URL.
//! - `handle`: [`RegistrySession`] and [`Follower`].
//! - `desired`: what this node wants the registry to hold, shared with the task.
//! - `task`: the session's task (replay, pushes, requests, heartbeats).
//! - `stream`: opening a stream over either transport, up to the Welcome.
//! - `reconnect`: which server next, and how long to wait first.
//! - `list`: [`ProviderList`], [`Update`] and how a push applies.
//! - [`pushed`]: a pushed delta read in place from its frame.
//! - `cache`: the last known lists and rules on disk.
//! - [`error`]: [`RegistryError`] for callers; why a stream ended, for the task.
//! - [`framing`]: the native transport's frames; [`convert`]: protobuf <-> rpc-core types.
//! - [`Addr`]: a provider's `host:port`, held inline.

mod addr;
pub mod address_server;
mod cache;
pub mod config;
pub mod convert;
mod desired;
pub mod error;
pub mod framing;
mod handle;
mod list;
pub mod pushed;
mod reconnect;
mod stream;
mod task;

pub use addr::Addr;
pub use config::{Role, SessionConfig, Transport};
pub use error::RegistryError;
pub use handle::{Follower, RegistrySession};
pub use list::{ProviderList, Update};
