//! What a client links to call services.
//!
//! A [`Consumer`] holds the connections to providers (one multiplexed
//! connection per provider address, shared by every reference). A
//! [`Reference`] is the invoker behind a generated client: it picks a provider
//! for each call, applies the deadline, and tries another provider when the
//! error says that is safe ([`rpc_core::Error::is_retryable`]).
//!
//! Providers come from the ConfigServer (give [`ConsumerConfig::registry`],
//! e.g. [`ConsumerConfig::with_registry`]): the reference follows its
//! service and a [`Directory`] applies each pushed change, opening
//! connections to new providers and letting go of removed ones. Or from a
//! static list ([`ReferenceBuilder::direct`], the no-registry mode).
//!
//! ```no_run
//! # use rpc_core::{Invoker, Stub};
//! # #[derive(Clone)] struct GreeterClient<I>(I);
//! # impl<I> Stub for GreeterClient<I> { type Invoker = I; const INTERFACE: &'static str = "demo.Greeter"; fn from_invoker(i: I) -> Self { GreeterClient(i) } }
//! # fn run() -> Result<(), consumer_sdk::ConsumerError> {
//! use consumer_sdk::{Consumer, ConsumerConfig};
//! use std::time::{Duration, SystemTime, UNIX_EPOCH};
//!
//! let consumer = Consumer::new(ConsumerConfig::default());
//! let greeter = consumer
//!     .reference::<GreeterClient<_>>()
//!     .version("1.0.0")
//!     .timeout(Duration::from_millis(500))
//!     .direct(["127.0.0.1:20880".parse().unwrap()])
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`ConsumerConfig`] and [`ConsumerError`].
//! - [`consumer`]: [`Consumer`], endpoints shared by its references.
//! - [`builder`]: [`ReferenceBuilder`] and [`Balance`].
//! - [`reference`]: [`Reference`], the invoker: routes, balancer, cluster modes.
//! - [`cluster`]: [`Cluster`], [`MethodConfig`], Failback's queue.
//! - [`directory`]: [`Directory`], the live members fed by pushed changes.

pub mod builder;
pub mod cluster;
pub mod config;
pub mod consumer;
pub mod directory;
pub mod reference;

pub use builder::{Balance, ReferenceBuilder};
pub use cluster::{Cluster, MethodConfig};
pub use config::{ConsumerConfig, ConsumerError};
pub use consumer::Consumer;
pub use directory::{Directory, Member};
pub use reference::Reference;
