//! Protocol buffer types shared across the workspace.
//!
//! - [`rpc`]: bodies of data-plane frames (consumer -> provider calls). The
//!   binary frame header around them lives in `rpc-core`'s `frame` module.
//! - [`registry`]: the control-plane stream between nodes and the
//!   ConfigServer (tonic client and server included).

/// Bodies of data-plane frames.
pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/tern.rpc.rs"));
}

/// The control plane.
pub mod registry {
    include!(concat!(env!("OUT_DIR"), "/tern.registry.rs"));
}
