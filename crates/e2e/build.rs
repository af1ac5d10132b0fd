//! Generates the stubs of the demo services (proto/demo) used by the examples
//! and the end-to-end tests.

fn main() -> std::io::Result<()> {
    rpc_build::compile_protos(&["proto/demo.proto"], &["proto"])
}
