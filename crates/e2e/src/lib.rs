//! End-to-end support: what the demo, the end-to-end tests and the
//! benchmarks share, kept out of the `tern` facade that applications link.
//!
//! # Layout
//!
//! - [`demo`]: generated stubs of `proto/demo.proto` (`demo.Greeter`, `demo.Echo`).
//! - [`certs`]: test certificates made fresh in each run (rcgen).
//! - [`process`]: a child process owned by its handle ([`Process`]).
//! - `src/bin/tern-node.rs`: the test node binary (a ConfigServer or a demo provider).
//! - `tests/`: end-to-end tests across processes.

pub mod certs;
pub mod process;

pub use process::{Process, Signal};

/// Generated stubs of `proto/demo.proto`.
pub mod demo {
    include!(concat!(env!("OUT_DIR"), "/demo.rs"));
}
