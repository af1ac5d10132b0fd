//! Compiles the .proto files with protox (pure Rust): no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["rpc.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
