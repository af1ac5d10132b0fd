//! Helpers called by code that `rpc-build` generates. Not for direct use; the
//! names may change with the generator.

pub use bytes::Bytes;
use prost::Message;

use crate::server::Request;
use crate::{CallOptions, Error, Invoker, Status};

pub use crate::server::BoxFuture;
/// Encodes `request`, invokes `method` and decodes the reply.
pub async fn unary<I, Req, Resp>(
    invoker: &I,
    method: &'static str,
    request: &Req,
    options: &CallOptions,
) -> Result<Resp, Error>
where
    I: Invoker,
    Req: Message,
    Resp: Message + Default,
{
    let payload = Bytes::from(request.encode_to_vec());
    let reply = invoker.invoke(method, payload, options).await?;
    Resp::decode(reply).map_err(|e| Error::Protocol(format!("cannot decode reply of {method}: {e}")))
}

/// Decodes the payload of an incoming request into the method's input type.
pub fn decode_request<T: Message + Default>(request: Request<Bytes>) -> Result<Request<T>, Status> {
    request
        .try_map(|payload| T::decode(payload).map_err(|e| Status::bad_request(format!("cannot decode request: {e}"))))
}

/// Encodes a reply message.
pub fn encode_reply<T: Message>(reply: &T) -> Bytes {
    Bytes::from(reply.encode_to_vec())
}

/// The answer to a method name the service does not declare.
pub fn method_not_found(interface: &str, method: &str) -> BoxFuture<Bytes> {
    let status = Status::new(crate::Code::MethodNotFound, format!("{interface}/{method}"));
    Box::pin(std::future::ready(Err(status)))
}
