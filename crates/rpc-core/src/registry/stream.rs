//! Opening a control stream to one ConfigServer, over either transport,
//! up to the server's Welcome.

#[cfg(feature = "grpc")]
use std::pin::Pin;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
#[cfg(feature = "grpc")]
use tern_proto::registry::registry_client::RegistryClient;
use tern_proto::registry::{self as pb, Hello, NodeMessage, ServerMessage, node_message, server_message};
use tokio::sync::mpsc;
#[cfg(feature = "grpc")]
use tokio_stream::StreamExt;
use tokio_util::task::AbortOnDropHandle;

use super::error::StreamError;
use super::{SessionConfig, Transport, framing};

/// Read buffer a natively framed stream starts with (tokio-util's default).
const READ_BUFFER: usize = 8 * 1024;

/// Messages to the server a stream holds before a sender waits.
const OUTBOUND_QUEUE: usize = 256;

/// One open control stream.
pub(super) struct Stream {
    /// Messages to the server, in order.
    pub(super) out: mpsc::Sender<NodeMessage>,
    pub(super) inbound: Inbound,
    /// Writes `out` to the socket (native framing; gRPC has its own task).
    pub(super) _writer: Option<AbortOnDropHandle<()>>,
}

/// The server's messages on a stream.
pub(super) enum Inbound {
    Native(framing::MessageReader<crate::net::ReadHalf>),
    #[cfg(feature = "grpc")]
    Grpc(Pin<Box<dyn tokio_stream::Stream<Item = Result<ServerMessage, StreamError>> + Send>>),
}

/// One message from the server: a native frame still in the read buffer
/// (a delta is read in place from it), or a message gRPC decoded.
pub(super) enum Incoming<'a> {
    Frame(&'a [u8]),
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    Message(ServerMessage),
}

impl Incoming<'_> {
    /// The message, decoded.
    ///
    /// # Errors
    ///
    /// A frame that is not a `ServerMessage`.
    pub(super) fn decode(self) -> Result<ServerMessage, StreamError> {
        match self {
            Incoming::Frame(frame) => framing::decode_server_frame(frame)
                .map_err(|e| StreamError::Broken(format!("malformed ServerMessage: {e}"))),
            Incoming::Message(message) => Ok(message),
        }
    }
}

impl Inbound {
    /// The next message; `None` when the server closed the stream.
    /// Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<Result<Incoming<'_>, StreamError>> {
        match self {
            Inbound::Native(reader) => reader
                .next_frame()
                .await
                .map(|frame| frame.map(Incoming::Frame).map_err(StreamError::Broken)),
            #[cfg(feature = "grpc")]
            Inbound::Grpc(messages) => messages.next().await.map(|m| m.map(Incoming::Message)),
        }
    }
}

/// Opens a stream to `server` and sends `hello` on it.
async fn open(config: &SessionConfig, server: &str, hello: NodeMessage) -> Result<Stream, StreamError> {
    let (out, out_rx) = mpsc::channel::<NodeMessage>(OUTBOUND_QUEUE);
    out.try_send(hello).expect("fresh channel has room");
    let timeout = config.connect_timeout;
    match config.transport {
        Transport::Native => {
            let socket = tokio::time::timeout(timeout, dial(server, config.tls.as_ref()))
                .await
                .map_err(|_| StreamError::ConnectTimeout(timeout))??;
            let (read, write) = socket.into_split();
            let inbound = framing::MessageReader::new(read, framing::MAX_SERVER_FRAME, READ_BUFFER, "ServerMessage");
            let mut preface = BytesMut::with_capacity(512);
            preface.put_slice(&framing::PREFACE);
            let writer = framing::write_frames(out_rx, write, preface, |m, buf| framing::put_frame(buf, m));
            Ok(Stream {
                out,
                inbound: Inbound::Native(inbound),
                _writer: Some(AbortOnDropHandle::new(tokio::spawn(writer))),
            })
        }
        #[cfg(feature = "grpc")]
        Transport::Grpc => {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
                .map_err(|e| StreamError::BadAddress {
                    addr: server.to_owned(),
                    reason: e.to_string(),
                })?
                .connect_timeout(timeout)
                .tcp_nodelay(true);
            let channel = match &config.tls {
                None => endpoint.connect().await,
                // The same TLS as the native transport: the server decrypts
                // first and tells the two apart after.
                Some(tls) => {
                    let dialer = Dialer {
                        server: server.to_owned(),
                        tls: tls.clone(),
                        timeout,
                    };
                    endpoint.connect_with_connector(dialer).await
                }
            }
            .map_err(|e| StreamError::Connect(e.into()))?;
            let mut client = RegistryClient::new(channel);
            let response = tokio::time::timeout(
                timeout,
                client.session(tokio_stream::wrappers::ReceiverStream::new(out_rx)),
            )
            .await
            .map_err(|_| StreamError::SessionRequest(format!("none within {timeout:?}")))?
            .map_err(|status| StreamError::SessionRequest(status.to_string()))?;
            let inbound = response
                .into_inner()
                .map(|message| message.map_err(|status| StreamError::Broken(status.to_string())));
            Ok(Stream {
                out,
                inbound: Inbound::Grpc(Box::pin(inbound)),
                _writer: None,
            })
        }
    }
}

/// A connection to `server`, with TLS if `tls`.
async fn dial(server: &str, tls: Option<&crate::net::ClientTls>) -> Result<crate::net::Stream, StreamError> {
    let tcp = tokio::net::TcpStream::connect(server)
        .await
        .map_err(|e| StreamError::Connect(e.into()))?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(tcp.into()),
        Some(tls) => tls
            .connect(tcp, crate::net::tls::host_of(server))
            .await
            .map_err(|e| StreamError::Tls(e.to_string())),
    }
}

/// Dials a ConfigServer with TLS for tonic.
#[cfg(feature = "grpc")]
#[derive(Clone)]
struct Dialer {
    server: String,
    tls: crate::net::ClientTls,
    timeout: Duration,
}

#[cfg(feature = "grpc")]
impl tower_service::Service<tonic::codegen::http::Uri> for Dialer {
    type Response = hyper_util::rt::TokioIo<crate::net::Stream>;
    type Error = StreamError;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, StreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), StreamError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let stream = tokio::time::timeout(this.timeout, dial(&this.server, Some(&this.tls)))
                .await
                .map_err(|_| StreamError::ConnectTimeout(this.timeout))??;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// Connects to `server` and waits for its Welcome.
///
/// # Errors
///
/// It never got as far as that: why.
pub(super) async fn connect(config: &SessionConfig, server: &str) -> Result<(Stream, pb::Welcome), StreamError> {
    let hello = Hello {
        app: config.app.clone(),
        role: config.role.to_pb(),
        host: config.host.clone(),
        zone: config.zone.clone(),
        labels: config.labels.clone(),
        token: config.token.clone(),
    };
    let hello = NodeMessage {
        request_id: 0,
        body: Some(node_message::Body::Hello(hello)),
    };
    let mut stream = open(config, server, hello).await?;
    let timeout: Duration = config.connect_timeout;
    let first = tokio::time::timeout(timeout, async {
        let incoming = stream.inbound.next().await?;
        Some(incoming.and_then(Incoming::decode))
    });
    let welcome = match first.await {
        Ok(Some(Ok(ServerMessage {
            body: Some(server_message::Body::Welcome(welcome)),
            ..
        }))) => welcome,
        Ok(Some(Ok(ServerMessage {
            body: Some(server_message::Body::Error(e)),
            ..
        }))) => {
            return Err(StreamError::Refused {
                kind: e.kind,
                message: e.message,
            });
        }
        Err(_) => return Err(StreamError::NoWelcome(timeout)),
        Ok(None) => return Err(StreamError::ClosedBeforeWelcome),
        // Under TLS 1.3 a server that refuses this node's certificate (or
        // its lack of one) says so after the client's side of the
        // handshake is done: on the first read.
        Ok(Some(Err(StreamError::Broken(e)))) if config.tls.is_some() => {
            return Err(StreamError::Tls(format!(
                "the server ended the connection before its Welcome: {e}"
            )));
        }
        Ok(Some(Err(e))) => return Err(e),
        Ok(Some(Ok(other))) => return Err(StreamError::NotWelcome(format!("{other:?}"))),
    };
    Ok((stream, welcome))
}
