//! Generates this framework's stubs and tonic's for the same bench.Echo
//! service, into one module, so both are measured on identical messages;
//! and a tonic client for the part of etcd's API that `bench peers` uses
//! (compiled with protox: no protoc on the machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rpc_build::Builder::new()
        .also_generate(tonic_prost_build::configure().service_generator())
        .compile(&["proto/bench.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    let etcd = protox::compile(["etcd.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(etcd)?;
    Ok(())
}
