//! Compiles the .proto files with protox (pure Rust): no protoc on the machine.
//! The registry service gets tonic client and server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["rpc.proto", "registry.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure().bytes(".tern.rpc").compile_fds(fds)?;
    Ok(())
}
