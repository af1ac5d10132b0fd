//! Generates this framework's stubs and tonic's for the same bench.Echo
//! service, into one module, so both are measured on identical messages.

fn main() -> std::io::Result<()> {
    rpc_build::Builder::new()
        .also_generate(tonic_prost_build::configure().service_generator())
        .compile(&["proto/bench.proto"], &["proto"])
}
