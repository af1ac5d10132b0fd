//! Compiles the .proto files with protox (pure Rust): no protoc on the machine.
//! With the `grpc` feature the registry service gets tonic client and server
//! code; without it, messages only. `Instance` is
//! the one message not generated (see `src/instance.rs`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["rpc.proto", "registry.proto", "peer.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .bytes(".tern.rpc")
        // Written out by hand, with its text held inline: see src/instance.rs.
        .extern_path(".tern.registry.Instance", "crate::instance::Instance")
        .compile_fds(fds)?;
    Ok(())
}
