//! The systems under test: an echo server and a client for each.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use consumer_sdk::{Consumer, ConsumerConfig, Reference};
use provider_sdk::Provider;
use rpc_core::{Dispatch, Request, Status};

use crate::proto::{self, EchoReply, EchoRequest};
use crate::raw::{self, RawClient};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// This framework (provider-sdk / consumer-sdk).
    Tern,
    /// This framework over TLS, both ends with certificates (mTLS).
    TernTls,
    /// tonic (gRPC over HTTP/2).
    Tonic,
    /// Raw length-prefixed echo over tokio TCP.
    Raw,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Tern => "tern",
            System::TernTls => "tern-tls",
            System::Tonic => "tonic",
            System::Raw => "raw-tcp",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long, value_enum)]
    system: System,
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Dispatch mode of this framework's provider.
    #[arg(long, default_value = "all")]
    dispatch: String,
    /// Register with this ConfigServer (this framework only).
    #[arg(long)]
    registry: Option<String>,
    /// Name returned in `served_by`.
    #[arg(long, default_value = "")]
    name: String,
    /// Time each call takes (this framework only).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// TLS (tern-tls): the server's certificate, key, and the CA its
    /// clients' certificates come from.
    #[arg(long, requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
    #[arg(long)]
    tls_client_ca: Option<std::path::PathBuf>,
}

#[derive(Default)]
pub(crate) struct EchoService {
    name: String,
    delay: std::time::Duration,
}

impl EchoService {
    /// An echo service answering with `served_by: name`.
    pub(crate) fn named(name: impl Into<String>) -> EchoService {
        EchoService {
            name: name.into(),
            ..EchoService::default()
        }
    }
}

impl proto::Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<EchoReply, Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(EchoReply {
            payload: request.into_inner().payload,
            served_by: self.name.clone(),
        })
    }
}

#[tonic::async_trait]
impl proto::echo_server::Echo for EchoService {
    async fn echo(&self, request: tonic::Request<EchoRequest>) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply {
            payload: request.into_inner().payload,
            served_by: String::new(),
        }))
    }
}

/// Runs one system's echo server; prints `listening <addr>` when ready.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    match args.system {
        System::Tern | System::TernTls => {
            let dispatch: Dispatch = args.dispatch.parse().map_err(anyhow::Error::msg)?;
            let service = EchoService {
                name: args.name.clone(),
                delay: std::time::Duration::from_millis(args.delay_ms),
            };
            let mut builder = Provider::builder()
                .app("bench")
                .bind(args.addr.to_string())
                .dispatch(dispatch)
                .service(proto::EchoServer::new(service));
            if let (Some(cert), Some(key), Some(client_ca)) = (args.tls_cert, args.tls_key, args.tls_client_ca) {
                builder = builder.tls(rpc_core::net::ServerTls::new(rpc_core::net::ServerTlsFiles {
                    cert,
                    key,
                    client_ca: Some(client_ca),
                })?);
            }
            if let Some(registry) = args.registry {
                let session =
                    rpc_core::registry::SessionConfig::new([registry], "bench", rpc_core::registry::Role::Provider);
                builder = builder.registry(session);
            }
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let provider = builder.start().await?;
            println!("listening {}", provider.local_addr());
            term.recv().await;
            provider.shutdown().await;
        }
        System::Tonic => {
            let incoming = tonic::transport::server::TcpIncoming::bind(args.addr)?.with_nodelay(Some(true));
            println!("listening {}", incoming.local_addr()?);
            tonic::transport::Server::builder()
                .add_service(proto::echo_server::EchoServer::new(EchoService::default()))
                .serve_with_incoming(incoming)
                .await?;
        }
        System::Raw => {
            let listener = tokio::net::TcpListener::bind(args.addr).await?;
            println!("listening {}", listener.local_addr()?);
            raw::serve(listener).await?;
        }
    }
    Ok(())
}

/// Clients of one system, one per connection.
#[derive(Debug)]
pub enum Clients {
    Tern(Vec<proto::EchoClient<Reference>>),
    Tonic(Vec<proto::echo_client::EchoClient<tonic::transport::Channel>>),
    Raw(Vec<RawClient>),
}

impl Clients {
    /// `tls`: for [`System::TernTls`].
    pub async fn connect(
        system: System,
        addr: SocketAddr,
        connections: usize,
        tls: Option<&rpc_core::net::ClientTls>,
    ) -> anyhow::Result<Clients> {
        let connections = connections.max(1);
        Ok(match system {
            System::Tern | System::TernTls => {
                let mut clients = Vec::new();
                for _ in 0..connections {
                    // One consumer per connection: a consumer shares one
                    // connection per provider among its references.
                    let mut config = ConsumerConfig::default();
                    if let Some(tls) = tls {
                        // The app its certificate names (a call saying
                        // otherwise is refused).
                        config.app = "bench".into();
                        config = config.tls(tls.clone());
                    }
                    let client = Consumer::new(config)
                        .reference::<proto::EchoClient<_>>()
                        .direct([addr])
                        .build()?;
                    clients.push(client);
                }
                Clients::Tern(clients)
            }
            System::Tonic => {
                let mut clients = Vec::new();
                for _ in 0..connections {
                    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                        .tcp_nodelay(true)
                        .connect()
                        .await
                        .with_context(|| format!("connecting to tonic at {addr}"))?;
                    clients.push(proto::echo_client::EchoClient::new(channel));
                }
                Clients::Tonic(clients)
            }
            System::Raw => {
                let mut clients = Vec::new();
                for _ in 0..connections {
                    clients.push(RawClient::connect(addr).await?);
                }
                Clients::Raw(clients)
            }
        })
    }

    /// One echo call on connection `conn`; checks the echoed length.
    pub async fn call(&self, conn: usize, payload: &Bytes) -> anyhow::Result<()> {
        let echoed = match self {
            Clients::Tern(c) => {
                let request = EchoRequest {
                    payload: payload.clone(),
                };
                c[conn % c.len()].echo(request).await?.payload.len()
            }
            Clients::Tonic(c) => {
                let request = EchoRequest {
                    payload: payload.clone(),
                };
                let mut client = c[conn % c.len()].clone();
                client.echo(request).await?.into_inner().payload.len()
            }
            Clients::Raw(c) => c[conn % c.len()].call(payload).await?.len(),
        };
        anyhow::ensure!(echoed == payload.len(), "echoed {echoed} bytes of {}", payload.len());
        Ok(())
    }
}
