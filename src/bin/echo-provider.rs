//! A provider of `demo.Echo` and `demo.Greeter` for end-to-end tests and
//! experiments.
//!
//! Usage: `echo-provider [BIND_ADDR]` (default `127.0.0.1:0`). Prints
//! `listening <addr>` once serving, and `begin <id>` when a call with a
//! non-zero `delay_ms` starts waiting, so a test can act while calls are in
//! flight. Stops gracefully on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use rpc_core::{Request, Status};
use tern::demo::{
    Echo, EchoReply, EchoRequest, EchoServer, Greeter, GreeterServer, HelloReply, HelloRequest,
};
use tern::provider::Provider;
use tokio::signal::unix::{SignalKind, signal};

struct Service {
    addr: SocketAddr,
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
            served_by: self.addr.to_string(),
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let bind = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = std::net::TcpListener::bind(&bind)?;
    let addr = listener.local_addr()?;
    let provider = Provider::builder()
        .app("echo-provider")
        .listener(listener)
        .service(EchoServer::new(Service { addr }))
        .service(GreeterServer::new(Service { addr }))
        .start()
        .await?;
    println!("listening {}", provider.local_addr());
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    provider.shutdown().await;
    Ok(())
}
