//! The ConfigServer: a registry daemon that keeps a long-lived stream with
//! every provider and consumer, holds the live map
//! `service -> providers, consumers`, and pushes address-list deltas to
//! subscribers as providers join, leave or die.
//!
//! # Layout
//!
//! - [`registry`]: the map, revisions, coalesced deltas and their history.
//! - [`node_session`]: one node's gRPC stream (Hello, requests, heartbeats, pushes).
//! - [`native`] and [`grpc`]: the two transports of that stream, on one
//!   port: length-prefixed frames over TCP (the SDKs' default) and gRPC.
//! - [`outgoing`]: what a session sends; a delta is encoded once for all
//!   its subscribers.
//! - [`session_outbox`]: a native session's write side, which the flusher writes
//!   pushed deltas into directly.
//! - [`governance`]: validated rule writes, and their push through the registry.
//! - [`store`]: the durable rule store (SQLite, PostgreSQL, MySQL) and its audit log.
//! - [`auth`]: optional app credentials and the admin token.
//! - [`admin`]: the admin HTTP API (services, rules, health, metrics).
//! - [`admin_client`]: `configserver rules ...`, the admin API from the command line.
//! - [`server`]: a running server ([`ConfigServer`]) with one shutdown.
//! - [`config`]: flags, environment and TOML file of the binary.
//! - [`metrics`]: counters for `/metrics`.

pub mod admin;
pub mod admin_client;
pub mod auth;
pub mod config;
pub mod flusher;
pub mod governance;
pub mod grpc;
pub mod metrics;
pub mod native;
pub mod node_session;
pub mod outgoing;
pub mod port;
pub mod server;
pub mod service_map;
pub mod session_outbox;
pub mod store;

pub use server::{ConfigServer, ConfigServerConfig};
pub use service_map::{Registry, RegistryConfig};
