//! The ConfigServer: a registry daemon that keeps a long-lived stream with
//! every provider and consumer, holds the live map
//! `service -> providers, consumers`, and pushes address-list deltas to
//! subscribers as providers join, leave or die.
//!
//! # Layout
//!
//! - [`registry`]: the map, revisions, coalesced deltas and their history.
//! - [`session`]: one node's gRPC stream (Hello, requests, heartbeats, pushes).
//! - [`admin`]: the admin HTTP API (services, health, metrics).
//! - [`server`]: a running server ([`ConfigServer`]) with one shutdown.
//! - [`config`]: flags, environment and TOML file of the binary.
//! - [`metrics`]: counters for `/metrics`.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod session;

pub use registry::{Registry, RegistryConfig};
pub use server::{ConfigServer, ServerConfig};
