//! Direct service-to-service RPC with a live registry.
//!
//! This facade re-exports the parts a program links:
//!
//! - [`provider`] (`provider-sdk`): publish services;
//! - [`consumer`] (`consumer-sdk`): call them;
//! - [`core`] (`rpc-core`): the wire format, connections, balancers and the
//!   registry session both stand on.
//!
//! It depends on nothing else: the ConfigServer, the demo's stubs and the
//! end-to-end tests live in crates of their own (`configserver`, `tern-e2e`).
//! The README's quickstart is compiled and run as a doc test below.

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub use consumer_sdk as consumer;
pub use provider_sdk as provider;
pub use rpc_core as core;
