//! What a service links to publish itself.
//!
//! A [`Provider`] serves one or more generated services (`XxxServer`) on an
//! address, with the data plane's dispatch modes, limits and graceful
//! shutdown. Given a ConfigServer ([`ProviderBuilder::registry`]) it
//! registers its services once the listener is bound and, on
//! [`Provider::shutdown`], stops in an order that loses no call:
//!
//! 1. unregister, so consumers stop picking this provider;
//! 2. wait `unregister_grace` (bounded) while consumers receive the removal;
//! 3. stop accepting; keep serving requests already on their way until
//!    consumers close their connections or go quiet (`drain_quiet`);
//! 4. finish in-flight calls (within the grace period) and exit.
//!
//! With a ConfigServer the provider also enforces the governance rules it
//! pushes for each served service (access lists, service tokens, QPS limits;
//! see `rpc_core::governance`) and keeps enforcing the last ones it received
//! while the ConfigServer is away.
//!
//! ```no_run
//! # use rpc_core::{Request, Service, Status, codegen::Bytes, server::BoxFuture};
//! # struct GreeterServer;
//! # impl Service for GreeterServer {
//! #     fn interface(&self) -> &'static str { "demo.Greeter" }
//! #     fn methods(&self) -> &'static [&'static str] { &[] }
//! #     fn call(&self, m: &str, _: Request<Bytes>) -> BoxFuture<Bytes> { rpc_core::codegen::method_not_found("demo.Greeter", m) }
//! # }
//! # async fn run() -> Result<(), provider_sdk::ProviderError> {
//! use provider_sdk::Provider;
//!
//! let provider = Provider::builder()
//!     .app("greeter")
//!     .bind("127.0.0.1:20880")
//!     .service_with(GreeterServer, "1.0.0", "")
//!     .start()
//!     .await?;
//! println!("serving on {}", provider.local_addr());
//! provider.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`builder`]: [`ProviderBuilder`] (address, services, registry, what is
//!   registered) and [`ProviderError`].
//! - [`provider`]: [`Provider`], a running provider and its shutdown.
//! - `rules`: the pushed governance rules as the server checks each call.

pub mod builder;
pub mod provider;
mod rules;

pub use builder::{ProviderBuilder, ProviderError};
pub use provider::Provider;
