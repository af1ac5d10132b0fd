//! Arbitrary bytes, split into arbitrary reads, through the frame decoder:
//! no panic, no frame longer than the limit, no buffer beyond a frame's size.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rpc_core::codec::FrameCodec;
use tokio_util::codec::Decoder;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size, so splits vary too.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).max(1);
    let mut codec = FrameCodec::new(MAX);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => assert!(frame.body.len() <= MAX),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= 2 * (MAX + rpc_core::frame::HEADER_LEN + rest.len()));
    }
    let _ = codec.decode_eof(&mut buf);
});
