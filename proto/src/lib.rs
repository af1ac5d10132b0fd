//! Protocol buffer types shared across the workspace.
//!
//! - [`rpc`]: bodies of data-plane frames (consumer -> provider calls). The
//!   binary frame header around them lives in `rpc-core`'s `frame` module.

/// Bodies of data-plane frames.
pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/tern.rpc.rs"));
}
