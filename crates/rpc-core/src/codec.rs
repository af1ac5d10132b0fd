//! Splits a byte stream into [`Frame`]s.
//!
//! The decoder validates the header (magic, version, kind, flags) and checks
//! the body length against `max_frame_len` *before* reserving any memory, so a
//! peer claiming a 4 GiB body costs nothing but the connection. `Ok(None)`
//! means more bytes are needed; `Err` means the stream is corrupt and the
//! connection must close. EOF in the middle of a frame is an error.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{DEFAULT_MAX_FRAME_LEN, FLAG_ACK, Frame, HEADER_LEN, Header, Kind, MAGIC, VERSION};

/// Why a stream could not be decoded. Each variant names the bad value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("bad magic {0:#06x}, expected {expected:#06x}", expected = u16::from_be_bytes(MAGIC))]
    BadMagic(u16),
    #[error("unsupported protocol version {0}, expected {VERSION}")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("unknown flags {0:#04x}")]
    BadFlags(u8),
    #[error("frame length {len} exceeds max_frame_len {max}")]
    TooLong { len: usize, max: usize },
    #[error("connection closed in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    #[error("io error: {0}")]
    Io(#[from] io::Error),
}

/// Tokio-util codec for data-plane frames.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl FrameCodec {
    pub fn new(max_frame_len: usize) -> FrameCodec {
        FrameCodec { max_frame_len }
    }

    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Reads and validates the header at the front of `src`, which must hold
    /// at least [`HEADER_LEN`] bytes.
    fn check_header(&self, src: &[u8]) -> Result<Header, FrameError> {
        let magic = u16::from_be_bytes([src[0], src[1]]);
        if [src[0], src[1]] != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if src[2] != VERSION {
            return Err(FrameError::BadVersion(src[2]));
        }
        let kind = Kind::from_u8(src[3]).ok_or(FrameError::BadKind(src[3]))?;
        let flags = src[5];
        if flags & !FLAG_ACK != 0 {
            return Err(FrameError::BadFlags(flags));
        }
        let request_id = u64::from_be_bytes(src[6..14].try_into().expect("8 bytes"));
        let body_len = u32::from_be_bytes(src[14..18].try_into().expect("4 bytes"));
        if body_len as usize > self.max_frame_len {
            return Err(FrameError::TooLong {
                len: body_len as usize,
                max: self.max_frame_len,
            });
        }
        Ok(Header {
            kind,
            status: src[4],
            flags,
            request_id,
            body_len,
        })
    }
}

impl Default for FrameCodec {
    fn default() -> FrameCodec {
        FrameCodec::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        // Check the magic as soon as two bytes are in, so garbage is refused
        // without waiting for a whole header.
        if src.len() >= 2 && src[..2] != MAGIC {
            return Err(FrameError::BadMagic(u16::from_be_bytes([src[0], src[1]])));
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = self.check_header(src)?;
        let total = HEADER_LEN + header.body_len as usize;
        if src.len() < total {
            // Safe to reserve: the length was checked against the maximum.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(header.body_len as usize).freeze();
        Ok(Some(Frame { header, body }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(src.len())),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if frame.body.len() > self.max_frame_len {
            return Err(FrameError::TooLong {
                len: frame.body.len(),
                max: self.max_frame_len,
            });
        }
        frame.encode(dst);
        Ok(())
    }
}

/// Reads frames from a byte stream with a [`FrameCodec`].
///
/// [`FrameReader::next`] is cancel-safe: dropping it mid-read loses no
/// bytes, so it can sit in a `select!` beside a shutdown signal.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    codec: FrameCodec,
    buf: BytesMut,
}

/// Bytes read per syscall at least; the buffer grows to this when low.
const READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, codec: FrameCodec) -> FrameReader<R> {
        FrameReader {
            io,
            codec,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Whether [`FrameReader::next`] would return without reading from the
    /// stream (a whole frame, or a bad header, is buffered). A server uses it
    /// to flush its answers once per batch of requests.
    pub fn has_buffered_frame(&self) -> bool {
        let buf = &self.buf[..];
        if buf.len() < HEADER_LEN {
            return buf.len() >= 2 && buf[..2] != MAGIC;
        }
        let body_len = u32::from_be_bytes(buf[14..18].try_into().expect("4 bytes")) as usize;
        buf.len() >= HEADER_LEN + body_len || body_len > self.codec.max_frame_len
    }

    /// The next frame; `None` at a clean EOF (between frames).
    pub async fn next(&mut self) -> Option<Result<Frame, FrameError>> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Some(Ok(frame)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return None,
                Ok(0) => return Some(Err(FrameError::Truncated(self.buf.len()))),
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes};
    use proptest::prelude::*;

    fn header_bytes(kind: u8, flags: u8, body_len: u32) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_slice(&MAGIC);
        buf.put_u8(VERSION);
        buf.put_u8(kind);
        buf.put_u8(0);
        buf.put_u8(flags);
        buf.put_u64(42);
        buf.put_u32(body_len);
        buf
    }

    #[test]
    fn four_gib_length_is_refused_without_allocating() {
        let mut buf = header_bytes(1, 0, u32::MAX);
        let before = buf.capacity();
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert_eq!(err.to_string(), "frame length 4294967295 exceeds max_frame_len 8388608");
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn wrong_magic_is_refused_after_two_bytes() {
        let mut buf = BytesMut::from(&b"GE"[..]);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert_eq!(err.to_string(), "bad magic 0x4745, expected 0x7e52");
    }

    #[test]
    fn bad_version_kind_and_flags_name_the_value() {
        let mut buf = header_bytes(9, 0, 0);
        assert_eq!(
            FrameCodec::default().decode(&mut buf).unwrap_err().to_string(),
            "unknown frame kind 9"
        );
        let mut buf = header_bytes(1, 0x80, 0);
        assert_eq!(
            FrameCodec::default().decode(&mut buf).unwrap_err().to_string(),
            "unknown flags 0x80"
        );
        let mut buf = header_bytes(1, 0, 0);
        buf[2] = 7;
        assert_eq!(
            FrameCodec::default().decode(&mut buf).unwrap_err().to_string(),
            "unsupported protocol version 7, expected 1"
        );
    }

    #[test]
    fn truncated_frame_at_eof_is_an_error() {
        let mut buf = header_bytes(1, 0, 10);
        buf.put_slice(b"abc");
        let mut codec = FrameCodec::default();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        let err = codec.decode_eof(&mut buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "connection closed in the middle of a frame (21 bytes buffered)"
        );
    }

    #[test]
    fn configured_maximum_applies() {
        let mut buf = header_bytes(1, 0, 1025);
        assert!(matches!(
            FrameCodec::new(1024).decode(&mut buf),
            Err(FrameError::TooLong { len: 1025, max: 1024 })
        ));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, never make it reserve more
        /// than a frame within the limit, and anything it yields is valid.
        #[test]
        fn decoder_survives_arbitrary_input(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut codec = FrameCodec::new(4096);
            let mut buf = BytesMut::new();
            'outer: for chunk in chunks {
                buf.extend_from_slice(&chunk);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(frame)) => prop_assert!(frame.body.len() <= 4096),
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
                prop_assert!(buf.capacity() <= 2 * (4096 + HEADER_LEN + 512));
            }
        }

        /// Valid frames split at arbitrary points come out whole and in order.
        #[test]
        fn frames_survive_arbitrary_splits(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 1..6),
            split in 1usize..50,
        ) {
            let mut wire = BytesMut::new();
            for (i, body) in bodies.iter().enumerate() {
                let header = Header { kind: Kind::Request, status: 0, flags: 0, request_id: i as u64, body_len: body.len() as u32 };
                Frame { header, body: Bytes::from(body.clone()) }.encode(&mut wire);
            }
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in wire.chunks(split) {
                buf.extend_from_slice(piece);
                while let Some(frame) = codec.decode(&mut buf).unwrap() {
                    out.push(frame);
                }
            }
            prop_assert_eq!(out.len(), bodies.len());
            for (i, frame) in out.iter().enumerate() {
                prop_assert_eq!(frame.header.request_id, i as u64);
                prop_assert_eq!(&frame.body[..], &bodies[i][..]);
            }
        }
    }
}
