//! The ConfigServer: a registry daemon that keeps a long-lived stream with
//! every provider and consumer, holds the live map
//! `service -> providers, consumers`, and pushes address-list deltas to
//! subscribers as providers join, leave or die.
//!
//! # Layout
//!
//! - [`service_map`]: the live map, revisions, coalesced deltas, their history and each session's push queue.
//! - [`flusher`]: the flusher task, and the whole delta-push path from a Register to a subscriber's socket.
//! - [`node_session`]: one node's session (Hello, requests, heartbeats, pushes), whatever its transport.
//! - [`port`]: the registry port: one listener for both transports, and its connection limit.
//! - [`native`]: the natively framed transport (length-prefixed frames over TCP, the SDKs' default).
//! - [`session_outbox`]: a native session's write side, which the flusher writes deltas into directly.
//! - [`grpc`]: the gRPC transport, with a codec that writes a delta encoded once.
//! - [`outgoing`]: what a session sends a node; a delta is encoded once for all its subscribers.
//! - [`peer`]: the cluster: members, replication links to peers, peers' links here, orphans.
//! - [`governance`]: validated rule writes, and their push through the service map.
//! - [`store`]: the durable rule store (SQLite, PostgreSQL, MySQL: cargo features) and its audit log.
//! - [`auth`]: optional app credentials and the admin token.
//! - [`admin`]: the admin HTTP API (services, rules, health, metrics).
//! - [`tls_listener`]: the admin port's listener under TLS.
//! - [`admin_client`]: `configserver rules ...`, the admin API from the command line ([`admin_client::AdminClient`]).
//! - [`server`]: a running server ([`ConfigServer`]) with one shutdown.
//! - [`config`]: the binary's flags, environment and TOML file.
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
pub mod peer;
pub mod port;
pub mod server;
pub mod service_map;
pub mod session_outbox;
pub mod store;
pub mod tls_listener;

pub use server::{ConfigServer, ConfigServerConfig};
pub use service_map::{Registry, RegistryConfig};
