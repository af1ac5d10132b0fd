//! Direct service-to-service RPC with a live registry.
//!
//! This facade re-exports the parts a program links:
//!
//! - [`provider`] (`provider-sdk`): publish services;
//! - [`consumer`] (`consumer-sdk`): call them;
//! - [`core`] (`rpc-core`): the data plane both stand on.
//!
//! [`demo`] holds the generated stubs of the services in `proto/demo`, used by
//! the examples and the end-to-end tests.
//!
//! The README's quickstart is compiled and run as a doc test below.

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub use consumer_sdk as consumer;
pub use provider_sdk as provider;
pub use rpc_core as core;

/// Generated stubs of `proto/demo/demo.proto`.
pub mod demo {
    include!(concat!(env!("OUT_DIR"), "/demo.rs"));
}
