//! Protocol buffer types shared across the workspace.
//!
//! - [`rpc`]: bodies of data-plane frames (consumer -> provider calls). The
//!   binary frame header around them lives in `rpc-core`'s `frame` module.
//! - [`registry`]: the control-plane stream between nodes and the
//!   ConfigServer (tonic client and server included).
//! - [`peer`]: replication between the ConfigServers of a cluster.

/// Bodies of data-plane frames.
pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/tern.rpc.rs"));
}

mod instance;

/// The control plane.
pub mod registry {
    pub use crate::instance::{CompactString, Instance};

    include!(concat!(env!("OUT_DIR"), "/tern.registry.rs"));
}

/// Replication between ConfigServers.
pub mod peer {
    include!(concat!(env!("OUT_DIR"), "/tern.peer.rs"));
}
