//! A node for end-to-end tests and the demo: a ConfigServer, or a provider of
//! `demo.Echo` and `demo.Greeter`.
//!
//! - `tern-node configserver [configserver flags]`: the ConfigServer, same
//!   code as the `configserver` binary.
//! - `tern-node provider [--bind ADDR] [--registry ADDR,...] [--name NAME]
//!   [--app APP] [--zone ZONE] [--label K=V]... [--token TOKEN]
//!   [--tls-cert FILE --tls-key FILE --tls-ca FILE [--tls-verify-clients]]`:
//!   prints `listening <addr>` once serving (and registered, with a
//!   registry), and `begin <id>` when a call with a non-zero `delay_ms` starts
//!   waiting, so a test can act while calls are in flight. Stops gracefully
//!   on SIGINT or SIGTERM (unregister, drain, finish in-flight calls).

use std::time::Duration;

use clap::{Parser, Subcommand};
use provider_sdk::Provider;
use rpc_core::net::tls::ServerTlsFiles;
use rpc_core::net::{ClientTls, ServerTls};
use rpc_core::registry::{Role, SessionConfig};
use rpc_core::{Request, Status};
use tern_e2e::demo::{Echo, EchoReply, EchoRequest, EchoServer, Greeter, GreeterServer, HelloReply, HelloRequest};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(name = "tern-node")]
struct Cli {
    #[command(subcommand)]
    role: NodeRole,
}

#[derive(Debug, Subcommand)]
enum NodeRole {
    /// Run the ConfigServer.
    Configserver(Box<configserver::config::Cli>),
    /// Run a provider of demo.Echo and demo.Greeter.
    Provider(Box<ProviderArgs>),
}

#[derive(Debug, clap::Args)]
struct ProviderArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: String,
    /// ConfigServer addresses; none = no registry.
    #[arg(long, value_delimiter = ',')]
    registry: Vec<String>,
    /// Name returned in HelloReply.served_by (default: the address).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "1.0.0")]
    version: String,
    #[arg(long, default_value_t = 300)]
    unregister_grace_ms: u64,
    /// Application name reported to the ConfigServer.
    #[arg(long, default_value = "tern-node")]
    app: String,
    #[arg(long, default_value = "")]
    zone: String,
    /// Instance metadata (`key=value`), matched by route rules.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The app's credential, when the ConfigServer requires one.
    #[arg(long, default_value = "")]
    token: String,
    /// TLS: this provider's certificate (its CN is its app), served on its
    /// port and presented to the ConfigServer.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// The CA the ConfigServer's certificate comes from (and, with
    /// --tls-verify-clients, the consumers').
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<std::path::PathBuf>,
    /// mTLS on the provider's port: consumers must present a certificate
    /// from --tls-ca.
    #[arg(long, requires = "tls_cert")]
    tls_verify_clients: bool,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {text:?} is not key=value"))
}

struct Service {
    name: String,
}

impl Echo for Service {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<EchoReply, Status> {
        let request = request.into_inner();
        if request.delay_ms > 0 {
            println!("begin {}", request.id);
            tokio::time::sleep(Duration::from_millis(request.delay_ms.into())).await;
        }
        Ok(EchoReply {
            id: request.id,
            payload: request.payload,
        })
    }
}

impl Greeter for Service {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<HelloReply, Status> {
        Ok(HelloReply {
            message: format!("hello, {}", request.get_ref().name),
            served_by: self.name.clone(),
        })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.role {
        NodeRole::Configserver(args) => Ok(configserver::config::run(*args)?),
        NodeRole::Provider(args) => tokio::runtime::Runtime::new()?.block_on(provider(*args)),
    }
}

async fn provider(args: ProviderArgs) -> Result<(), Box<dyn std::error::Error>> {
    let listener = std::net::TcpListener::bind(&args.bind)?;
    let addr = listener.local_addr()?;
    let name = args.name.unwrap_or_else(|| addr.to_string());
    let mut builder = Provider::builder()
        .app(args.app.clone())
        .zone(args.zone)
        .listener(listener)
        .unregister_grace(Duration::from_millis(args.unregister_grace_ms))
        .service_with(EchoServer::new(Service { name: name.clone() }), &args.version, "")
        .service_with(GreeterServer::new(Service { name }), &args.version, "");
    for (key, value) in args.labels {
        builder = builder.metadata(key, value);
    }
    if let (Some(cert), Some(key), Some(ca)) = (args.tls_cert, args.tls_key, args.tls_ca) {
        builder = builder
            .tls(ServerTls::new(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_verify_clients.then(|| ca.clone()),
            })?)
            .registry_tls(ClientTls::with_identity(ca, cert, key)?);
    }
    if !args.registry.is_empty() {
        let mut session = SessionConfig::new(args.registry, args.app, Role::Provider);
        session.token = args.token;
        builder = builder.registry(session);
    }
    // Handlers first: a signal right after the ready line must not kill us.
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let provider = builder.start().await?;
    println!("listening {}", provider.local_addr());
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    provider.shutdown().await;
    println!("stopped");
    Ok(())
}
