//! The gRPC endpoint of the `Registry` service, with a codec that writes a
//! delta encoded once for all its subscribers.
//!
//! It answers `/tern.registry.Registry/Session` as the code tonic generates
//! from `registry.proto` would (same path, same messages on the wire), but
//! its outbound items are [`Outgoing`]: either a message to encode, or a
//! [`PushedDelta`] whose bytes were encoded when the change was flushed. A
//! change pushed to 1,000 subscribers is then encoded once and copied 1,000
//! times, instead of cloned and encoded 1,000 times.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BufMut;
use prost::Message;
use tern_proto::registry::NodeMessage;
use tern_proto::registry::registry_server::SERVICE_NAME;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use crate::node_session::{Gone, RegistryService, ToNode};
use crate::outgoing::{Deliver, Outgoing};

/// Messages queued towards one node before the session waits for it to read.
const OUTBOUND_QUEUE: usize = 64;

/// gRPC buffers of one stream. tonic's default (8 KiB each way) is sized
/// for bulk transfers; a node's stream mostly carries messages of tens of
/// bytes, and a server holds thousands of streams. Bigger messages grow the
/// buffer as needed.
const STREAM_BUFFER: usize = 1024;

/// Encodes [`Outgoing`] items, decodes [`NodeMessage`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionCodec;

impl Codec for SessionCodec {
    type Encode = Outgoing;
    type Decode = NodeMessage;
    type Encoder = SessionCodec;
    type Decoder = SessionCodec;

    fn encoder(&mut self) -> SessionCodec {
        SessionCodec
    }

    fn decoder(&mut self) -> SessionCodec {
        SessionCodec
    }
}

impl Encoder for SessionCodec {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outgoing::Message(message) => message
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding a message: {e}"))),
            Outgoing::Delta(delta) => {
                dst.put_slice(&delta.encoded);
                Ok(())
            }
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, 32 * 1024)
    }
}

impl Decoder for SessionCodec {
    type Item = NodeMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<NodeMessage>, Status> {
        NodeMessage::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("malformed NodeMessage: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, 32 * 1024)
    }
}

/// Stream of messages to one node.
pub type OutboundStream = Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send + 'static>>;

/// A gRPC session's way to its node: a bounded queue that tonic drains
/// into the stream.
impl ToNode for mpsc::Sender<Outgoing> {
    async fn send(&self, message: Outgoing, timeout: Duration) -> Result<(), Gone> {
        self.send_timeout(message, timeout).await.map_err(|_| Gone)
    }

    fn try_send(&self, message: Outgoing) {
        let _ = mpsc::Sender::try_send(self, message);
    }

    /// None: a gRPC stream's items go through tonic, whose task must write them.
    fn direct(&self) -> Option<Weak<dyn Deliver>> {
        None
    }
}

/// Starts a node's session on a new gRPC stream; the stream of messages to it.
fn open_session(service: &RegistryService, request: Request<Streaming<NodeMessage>>) -> Response<OutboundStream> {
    let info = request.extensions().get::<crate::port::ConnectInfo>();
    let peer = info.and_then(|info| info.remote_addr);
    let verified_app = info.and_then(|info| info.app.clone());
    let inbound = request
        .into_inner()
        .map(|message| message.map_err(|status| format!("stream error: {}", status.message())));
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let session = service.clone();
    service.tracker().spawn(async move {
        session
            .until_shutdown(session.run(inbound, tx, peer, verified_app))
            .await
    });
    Response::new(Box::pin(ReceiverStream::new(rx).map(Ok)))
}

/// The `Registry` gRPC service, ready for `tonic::transport::Server`.
#[derive(Debug, Clone)]
pub struct RegistryEndpoint {
    service: Arc<RegistryService>,
    max_message_bytes: usize,
}

impl RegistryEndpoint {
    /// Serves `service`; a node's message over `max_message_bytes` ends its
    /// stream.
    pub fn new(service: RegistryService, max_message_bytes: usize) -> RegistryEndpoint {
        RegistryEndpoint {
            service: Arc::new(service),
            max_message_bytes,
        }
    }
}

impl NamedService for RegistryEndpoint {
    const NAME: &'static str = SERVICE_NAME;
}

/// The `Session` method.
struct SessionMethod(Arc<RegistryService>);

impl StreamingService<NodeMessage> for SessionMethod {
    type Response = Outgoing;
    type ResponseStream = OutboundStream;
    type Future = BoxFuture<Response<OutboundStream>, Status>;

    fn call(&mut self, request: Request<Streaming<NodeMessage>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { Ok(open_session(&service, request)) })
    }
}

impl<B> Service<http::Request<B>> for RegistryEndpoint
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path.strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE_NAME)) != Some("/Session") {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let method = SessionMethod(self.service.clone());
        let max = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc = Grpc::new(SessionCodec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.streaming(method, request).await)
        })
    }
}
