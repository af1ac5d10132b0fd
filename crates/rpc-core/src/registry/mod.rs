//! The registry session shared by both SDKs: one long-lived stream to a
//! ConfigServer, re-established after failures, carrying this node's
//! registrations and subscriptions.
//!
//! - [`RegistrySession`] keeps the *desired* state (what this node registers
//!   and subscribes to) and replays it on every new stream, so a restarted
//!   ConfigServer gets everything back.
//! - Each subscription is a [`tokio::sync::watch`] of the latest
//!   [`ProviderList`]: always the newest list, never a backlog. While the
//!   ConfigServer is away the lists stay as they were.
//! - Lists can be saved to a file ([`SessionConfig::cache_file`]) so a node
//!   restarted while the ConfigServer is down still finds its providers.

mod addr;
pub mod convert;
pub mod framing;
mod session;

pub use addr::Addr;
pub use session::{ProviderList, RegistryError, RegistrySession, Role, SessionConfig, Transport};
