//! Benchmarks of this framework against peers measured in the same run.
//!
//! - `bench rpc`: the data plane against tonic and a raw TCP echo (see
//!   [`rpc`]).
//! - `bench registry`: the ConfigServer under many sessions (see
//!   [`registry`]).
//! - `bench failover`: consumer fault tolerance (see [`failover`]).
//! - `bench rules`: a governance rule change until every node enforces it
//!   (see [`rules`]).
//! - `bench peers`: the ConfigServer against ZooKeeper and etcd on the same
//!   discovery workload (see [`peers`]).
//! - `bench cluster`: three ConfigServers replicating to each other:
//!   cross-server push, a storm, a server killed under load (see
//!   [`cluster`]).
//!
//! Each system under test runs in its own process (`bench serve ...`,
//! started by the driver); the driver process generates the load.

mod cluster;
mod convergence;
mod failover;
mod load;
mod peers;
mod plot;
mod proc_stats;
mod raw;
mod registry;
mod rpc;
mod rules;
mod systems;
mod tls;
mod wire;

use clap::{Parser, Subcommand};

/// Generated messages and stubs (this framework's and tonic's).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/bench.rs"));
}

/// The part of etcd's v3 API that `bench peers` uses (tonic client).
pub mod etcd {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

#[derive(Debug, Parser)]
#[command(name = "bench", about = "Benchmarks against peers, measured in the same run")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Data plane: this framework vs tonic vs raw TCP.
    Rpc(rpc::RpcArgs),
    /// Consumer fault tolerance: kills, joins, graceful stops, a slow provider.
    Failover(failover::FailoverArgs),
    /// ConfigServer: registration rate, push latency, storm, memory.
    Registry(registry::RegistryArgs),
    /// Governance: a rule change until every node enforces it.
    Rules(rules::RulesArgs),
    /// ConfigServer vs ZooKeeper vs etcd: push latency, storm, bytes, CPU, memory.
    Peers(peers::PeersArgs),
    /// A cluster of three ConfigServers: cross-server push, storm, a server killed under load.
    Cluster(cluster::ClusterArgs),
    /// Runs one system's echo server (started by the driver).
    #[command(hide = true)]
    Serve(systems::ServeArgs),
    /// Runs the ConfigServer (started by the driver; same code as the binary).
    #[command(hide = true)]
    ServeConfigserver(Box<configserver::config::Cli>),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // zookeeper-client warns about each session it closes on purpose.
                "warn,zookeeper_client=error".into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::ServeConfigserver(args) = cli.command {
        return configserver::config::run(*args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Rpc(args) => runtime.block_on(rpc::run(args)),
        Command::Registry(args) => runtime.block_on(registry::run(args)),
        Command::Rules(args) => runtime.block_on(rules::run(args)),
        Command::Peers(args) => runtime.block_on(peers::run(args)),
        Command::Cluster(args) => runtime.block_on(cluster::run(args)),
        Command::Failover(args) => runtime.block_on(failover::run(args)),
        Command::Serve(args) => runtime.block_on(systems::serve(args)),
        Command::ServeConfigserver(_) => unreachable!("handled above"),
    }
}
