//! The data-plane frame: an 18-byte fixed header, then a protobuf body.
//!
//! ```text
//! offset size field
//!  0      2   magic        0x7E 0x52
//!  2      1   version      1
//!  3      1   kind         1 = Request, 2 = Response, 3 = Heartbeat
//!  4      1   status       a `Code` in Responses; 0 otherwise
//!  5      1   flags        bit 0 = ACK (a Heartbeat's reply); other bits 0
//!  6      8   request id   big-endian u64, chosen by the caller
//! 14      4   body length  big-endian u32
//! 18      n   body         RequestBody / ResponseBody (protobuf); empty for Heartbeat
//! ```
//!
//! Bodies are written by hand-rolled encoders here so that a call needs one
//! buffer and no intermediate message struct; they produce exactly what the
//! prost types in `tern_proto::rpc` decode (a property test checks it).

use std::collections::HashMap;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::{Code, ServiceKey};

pub const MAGIC: [u8; 2] = [0x7E, 0x52];
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 18;
/// Default upper bound of a frame's body; see [`crate::codec::FrameCodec`].
pub const DEFAULT_MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

pub const FLAG_ACK: u8 = 0b0000_0001;

/// What a frame carries (header byte 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Response = 2,
    Heartbeat = 3,
}

impl Kind {
    pub fn from_u8(value: u8) -> Option<Kind> {
        match value {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            3 => Some(Kind::Heartbeat),
            _ => None,
        }
    }
}

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub status: u8,
    pub flags: u8,
    pub request_id: u64,
    pub body_len: u32,
}

impl Header {
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_slice(&MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(self.kind as u8);
        dst.put_u8(self.status);
        dst.put_u8(self.flags);
        dst.put_u64(self.request_id);
        dst.put_u32(self.body_len);
    }
}

/// A decoded frame. `body` shares the read buffer (no copy).
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("header", &self.header)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Frame {
    /// Encodes a frame with an arbitrary body (tests and tools).
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + self.body.len());
        self.header.encode(dst);
        dst.put_slice(&self.body);
    }
}

// === Encoders ===

/// Fields of a request that are not the payload.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub service: &'a ServiceKey,
    pub method: &'a str,
    pub timeout_ms: u32,
    pub attachments: &'a HashMap<String, String>,
    /// Attachments the SDK adds (the caller's app, a service token): encoded
    /// after `attachments`, so that on a repeated key they win.
    pub extra: &'a [(&'a str, &'a str)],
}

/// Appends a complete Request frame to `dst`.
pub fn encode_request(dst: &mut BytesMut, request_id: u64, head: &RequestHead<'_>, payload: &[u8]) {
    let key = head.service;
    let attachments_len: usize = head
        .attachments
        .iter()
        .map(|(k, v)| map_entry_len(6, k, v))
        .sum::<usize>()
        + head.extra.iter().map(|(k, v)| map_entry_len(6, k, v)).sum::<usize>();
    let body_len = str_len(1, &key.interface)
        + str_len(2, &key.version)
        + str_len(3, &key.group)
        + str_len(4, head.method)
        + if head.timeout_ms == 0 {
            0
        } else {
            key_len(5) + encoded_len_varint(head.timeout_ms.into())
        }
        + attachments_len
        + str_len(7, payload);
    dst.reserve(HEADER_LEN + body_len);
    let start = dst.len();
    let buf = dst;
    Header {
        kind: Kind::Request,
        status: 0,
        flags: 0,
        request_id,
        body_len: body_len as u32,
    }
    .encode(buf);
    put_str(1, key.interface.as_bytes(), buf);
    put_str(2, key.version.as_bytes(), buf);
    put_str(3, key.group.as_bytes(), buf);
    put_str(4, head.method.as_bytes(), buf);
    if head.timeout_ms != 0 {
        encode_key(5, WireType::Varint, buf);
        encode_varint(head.timeout_ms.into(), buf);
    }
    for (k, v) in head.attachments {
        put_map_entry(6, k, v, buf);
    }
    for (k, v) in head.extra {
        put_map_entry(6, k, v, buf);
    }
    put_str(7, payload, buf);
    debug_assert_eq!(buf.len() - start, HEADER_LEN + body_len);
}

/// Appends a complete Response frame to `dst`: `Ok` with a payload, or a
/// failure status with a message.
pub fn encode_response(dst: &mut BytesMut, request_id: u64, status: Code, message: &str, payload: &[u8]) {
    let body_len = str_len(1, message) + str_len(3, payload);
    dst.reserve(HEADER_LEN + body_len);
    let buf = dst;
    Header {
        kind: Kind::Response,
        status: status as u8,
        flags: 0,
        request_id,
        body_len: body_len as u32,
    }
    .encode(buf);
    put_str(1, message.as_bytes(), buf);
    put_str(3, payload, buf);
}

/// Appends a Heartbeat (a ping, or with `ack` its reply) to `dst`.
pub fn encode_heartbeat(dst: &mut BytesMut, request_id: u64, ack: bool) {
    Header {
        kind: Kind::Heartbeat,
        status: 0,
        flags: if ack { FLAG_ACK } else { 0 },
        request_id,
        body_len: 0,
    }
    .encode(dst);
}

/// Length of a length-delimited field; 0 when empty (proto3 omits defaults).
fn str_len(tag: u32, value: impl AsRef<[u8]>) -> usize {
    let len = value.as_ref().len();
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

fn put_str(tag: u32, value: &[u8], buf: &mut BytesMut) {
    if value.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

fn map_entry_len(tag: u32, k: &str, v: &str) -> usize {
    let inner = str_len(1, k) + str_len(2, v);
    key_len(tag) + encoded_len_varint(inner as u64) + inner
}

fn put_map_entry(tag: u32, k: &str, v: &str, buf: &mut BytesMut) {
    let inner = str_len(1, k) + str_len(2, v);
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(inner as u64, buf);
    put_str(1, k.as_bytes(), buf);
    put_str(2, v.as_bytes(), buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::FrameCodec;
    use proptest::prelude::*;
    use prost::Message;
    use tern_proto::rpc::{RequestBody, ResponseBody};
    use tokio_util::codec::Decoder;

    fn decode_one(encode: impl FnOnce(&mut BytesMut)) -> Frame {
        let mut buf = BytesMut::new();
        encode(&mut buf);
        let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        frame
    }

    proptest! {
        #[test]
        fn request_encoder_matches_prost(
            interface in "[a-z.]{1,20}", version in "[0-9.]{0,5}", group in "[a-z]{0,5}",
            method in "[A-Za-z]{1,12}", timeout_ms in any::<u32>(),
            attachments in proptest::collection::hash_map("[a-z]{0,4}", "[a-z0-9]{0,6}", 0..4),
            payload in proptest::collection::vec(any::<u8>(), 0..300), id in any::<u64>(),
        ) {
            let key = ServiceKey::new(interface.clone(), version.clone(), group.clone());
            let head = RequestHead { service: &key, method: &method, timeout_ms, attachments: &attachments, extra: &[] };
            let frame = decode_one(|b| encode_request(b, id, &head, &payload));
            prop_assert_eq!(frame.header.kind, Kind::Request);
            prop_assert_eq!(frame.header.request_id, id);
            let body = RequestBody::decode(frame.body).unwrap();
            prop_assert_eq!(body, RequestBody {
                interface, version, group, method, timeout_ms, attachments, payload: payload.into(),
            });
        }

        #[test]
        fn response_encoder_matches_prost(
            message in ".{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..300),
            id in any::<u64>(),
        ) {
            let frame = decode_one(|b| encode_response(b, id, Code::Busy, &message, &payload));
            prop_assert_eq!(frame.header.status, Code::Busy as u8);
            let body = ResponseBody::decode(frame.body).unwrap();
            prop_assert_eq!(body.message, message);
            prop_assert_eq!(&body.payload[..], &payload[..]);
        }
    }

    /// The example in docs/PROTOCOL.md, byte for byte.
    #[test]
    fn documented_example_matches_the_encoder() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md")).unwrap();
        let example = doc.split("```text\n").nth(1).unwrap().split("```").next().unwrap();
        let hex: String = example
            .lines()
            .flat_map(|line| line.split("  ").next())
            .flat_map(|bytes| bytes.split_whitespace())
            .collect();
        let expected: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();

        let key = ServiceKey::new("demo.Greeter", "1.0.0", "");
        let head = RequestHead {
            service: &key,
            method: "SayHello",
            timeout_ms: 500,
            attachments: &HashMap::new(),
            extra: &[],
        };
        let mut wire = BytesMut::new();
        encode_request(&mut wire, 1, &head, &[0x0a, 0x05, b'w', b'o', b'r', b'l', b'd']);
        assert_eq!(&wire[..], &expected[..]);
    }

    #[test]
    fn heartbeat_is_a_bare_header() {
        let mut bytes = BytesMut::new();
        encode_heartbeat(&mut bytes, 7, true);
        assert_eq!(bytes.len(), HEADER_LEN);
        let frame = decode_one(|b| b.extend_from_slice(&bytes));
        assert_eq!(frame.header.kind, Kind::Heartbeat);
        assert_eq!(frame.header.flags, FLAG_ACK);
    }
}
