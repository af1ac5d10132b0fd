//! Arbitrary bytes, split into arbitrary reads, through the control
//! stream's native framing and the `NodeMessage` decoder, as a ConfigServer
//! reads a node: no panic, no frame longer than the limit. Each frame also
//! goes through a node's `ServerMessage` decoder, which presizes instance
//! lists: it must agree with prost's plain decoding.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use rpc_core::registry::framing::{FrameDecoder, decode_server_message};
use tern_proto::registry::{NodeMessage, ServerMessage};
use tokio_util::codec::Decoder;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size, so splits vary too.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX);
                    assert_eq!(
                        decode_server_message(frame.clone()).ok(),
                        ServerMessage::decode(&frame[..]).ok()
                    );
                    let _ = NodeMessage::decode(frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.decode_eof(&mut buf);
});
