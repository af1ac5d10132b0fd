//! The control stream's native framing: the `registry.proto` messages over
//! plain TCP, on the ConfigServer's registry port beside gRPC.
//!
//! Why a second transport for the same messages: a gRPC stream costs each
//! node's connection an HTTP/2 stack on the server (write buffer, read
//! buffer, HPACK tables, codec buffers: ~37 KiB of RSS per node) and every
//! push a DATA frame with the wake-ups of h2's connection task on both
//! ends. A node's stream carries messages of tens of bytes; a length prefix
//! is all it needs. gRPC stays for clients that want it (any gRPC tool or
//! language); the SDKs speak this framing by default.
//!
//! ```text
//! node -> server   preface: C7 54 43 01   ("\xC7TC", version 1)
//! both ways        frame:   u32 length (big-endian) | protobuf message
//! ```
//!
//! Node frames are `NodeMessage`s, server frames `ServerMessage`s. The
//! server tells the two transports apart by the first byte (HTTP/2's
//! preface starts with `P`). A length over the receiver's limit, a body
//! that does not decode, or EOF inside a frame ends that connection.

use bytes::{Buf, BufMut, BytesMut};
use prost::encoding::WireType;
use prost::{DecodeError, Message};
use tern_proto::registry::{Delta, ServerMessage, Snapshot, server_message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::codec::{Decoder, FramedRead};
use tracing::debug;

/// First bytes a node sends on a natively framed stream.
pub const PREFACE: [u8; 4] = [0xC7, b'T', b'C', 1];

/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;

/// Largest server message a node accepts: a snapshot of a very large
/// service (tens of thousands of providers) fits.
pub const MAX_SERVER_FRAME: usize = 64 * 1024 * 1024;

/// The most a decoder reserves ahead of bytes it has not received.
const RESERVE_STEP: usize = 64 * 1024;

/// Appends `message` as one frame.
pub fn put_frame(dst: &mut BytesMut, message: &impl Message) {
    let len = message.encoded_len();
    dst.reserve(LEN_BYTES + len);
    dst.put_u32(len as u32);
    message.encode(dst).expect("BytesMut grows to fit the message");
}

/// Appends an already-encoded message as one frame.
pub fn put_encoded_frame(dst: &mut BytesMut, encoded: &[u8]) {
    dst.reserve(LEN_BYTES + encoded.len());
    dst.put_u32(encoded.len() as u32);
    dst.put_slice(encoded);
}

/// A writer gathers queued frames into one write up to this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// After a batch, a write buffer larger than this is let go rather than
/// kept for the next (a large snapshot must not stay resident in every
/// stream that once carried one).
pub const KEEP_WRITE_BUFFER: usize = 4 * 1024;

/// The messages of a natively framed stream, each decoded by `decode`
/// (`what` names the message in errors), or why the stream broke.
/// `capacity` is the read buffer to start with; it grows for larger frames.
pub fn read_messages<M>(
    read: impl AsyncRead,
    max_frame: usize,
    capacity: usize,
    what: &'static str,
    decode: fn(BytesMut) -> Result<M, DecodeError>,
) -> impl Stream<Item = Result<M, String>> {
    FramedRead::with_capacity(read, FrameDecoder::new(max_frame), capacity).map(move |frame| {
        let frame = frame.map_err(|e| e.to_string())?;
        decode(frame).map_err(|e| format!("malformed {what}: {e}"))
    })
}

/// Decodes a `ServerMessage` as prost does, but with each list of
/// instances it carries (a snapshot's providers, a delta's added and
/// updated) allocated at its full length first. Decoded plainly, such a
/// list grows by doubling and copies its 160-byte entries about twice
/// over: a tenth of a subscriber's CPU when a storm's deltas of hundreds
/// of instances arrive. The lengths come from a scan of the frame's field
/// headers; the capacity is only what decoding would allocate anyway.
pub fn decode_server_message(frame: BytesMut) -> Result<ServerMessage, DecodeError> {
    decode_server_frame(&frame)
}

/// [`decode_server_message`] of a frame body in place.
pub fn decode_server_frame(frame: &[u8]) -> Result<ServerMessage, DecodeError> {
    let mut message = ServerMessage {
        request_id: 0,
        body: presized_body(frame),
    };
    // From a slice: prost's reads from a `BytesMut` update its whole
    // cursor at every step.
    message.merge(frame)?;
    Ok(message)
}

/// The messages of a natively framed stream, read and decoded in place:
/// each frame is decoded straight from the read buffer, which is then
/// advanced past it (no frame is split off into a buffer of its own, as
/// [`read_messages`] does for the server). What a node reads its server's
/// pushes with.
#[derive(Debug)]
pub struct MessageReader<R> {
    read: R,
    buf: BytesMut,
    decoder: FrameDecoder,
    what: &'static str,
    /// Bytes of the frame last handed out, let go of at the next read.
    handed_out: usize,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    /// `capacity`: the read buffer to start with; it grows for larger
    /// frames. `what` names the message in errors.
    pub fn new(read: R, max_frame: usize, capacity: usize, what: &'static str) -> MessageReader<R> {
        MessageReader {
            read,
            buf: BytesMut::with_capacity(capacity),
            decoder: FrameDecoder::new(max_frame),
            what,
            handed_out: 0,
        }
    }

    /// Changes the largest frame accepted from here on (a peer is read
    /// with a small limit until it has said who it is).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.decoder = FrameDecoder::new(max_frame);
    }

    /// The next message, decoded by `decode`; `None` at a clean end of the
    /// stream; why the stream broke otherwise (it must not be read again).
    /// Cancel-safe: bytes read stay in the buffer for the next call.
    pub async fn next<M>(&mut self, decode: fn(&[u8]) -> Result<M, DecodeError>) -> Option<Result<M, String>> {
        let what = self.what;
        match self.next_frame().await? {
            Ok(frame) => Some(decode(frame).map_err(|e| format!("malformed {what}: {e}"))),
            Err(e) => Some(Err(e)),
        }
    }

    /// The next frame's body, in place in the read buffer (let go of at
    /// the next call); `None` and errors as [`MessageReader::next`].
    /// Cancel-safe.
    pub async fn next_frame(&mut self) -> Option<Result<&[u8], String>> {
        if self.handed_out > 0 {
            self.buf.advance(std::mem::take(&mut self.handed_out));
            self.decoder.let_go_of_large(&mut self.buf);
        }
        loop {
            match self.decoder.complete_frame(&mut self.buf) {
                Err(e) => return Some(Err(e.to_string())),
                Ok(Some(len)) => {
                    self.handed_out = LEN_BYTES + len;
                    return Some(Ok(&self.buf[LEN_BYTES..LEN_BYTES + len]));
                }
                Ok(None) => {}
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(READ_MORE);
            }
            match self.read.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return None,
                Ok(0) => {
                    return Some(Err(format!(
                        "connection closed inside a control frame ({} bytes of it received)",
                        self.buf.len()
                    )));
                }
                Ok(_) => {}
                Err(e) => return Some(Err(e.to_string())),
            }
        }
    }
}

/// Room a reader with a full buffer makes before reading again.
const READ_MORE: usize = 4 * 1024;

/// An empty body of the kind a `ServerMessage` frame carries, with its
/// instance lists allocated at the lengths the frame gives them; `None`
/// for any other body, or bytes that do not scan (decoding then reports
/// them).
fn presized_body(frame: &[u8]) -> Option<server_message::Body> {
    const SNAPSHOT: u32 = 3;
    const SNAPSHOT_PROVIDERS: u32 = 4;
    const DELTA: u32 = 4;
    const DELTA_ADDED: u32 = 5;
    const DELTA_UPDATED: u32 = 7;
    // How many fields of `body` have tag `a`, and how many tag `b`.
    let count = |body: &[u8], a: u32, b: u32| -> Option<(usize, usize)> {
        let (mut n_a, mut n_b) = (0, 0);
        for field in fields(body) {
            let tag = field?.tag();
            n_a += usize::from(tag == a);
            n_b += usize::from(tag == b);
        }
        Some((n_a, n_b))
    };
    // The body that decoding keeps is the last one; a repeated occurrence
    // of the same one adds to it.
    let (mut last, mut providers, mut added, mut updated) = (None, 0, 0, 0);
    for field in fields(frame) {
        let field = field?;
        let (tag, body) = (field.tag(), field.body());
        match tag {
            SNAPSHOT => {
                providers += count(body, SNAPSHOT_PROVIDERS, SNAPSHOT_PROVIDERS)?.0;
                last = Some(SNAPSHOT);
            }
            DELTA => {
                let (a, u) = count(body, DELTA_ADDED, DELTA_UPDATED)?;
                (added, updated) = (added + a, updated + u);
                last = Some(DELTA);
            }
            // Another body of the oneof (Welcome, Ack, Error, ...).
            2..=8 => last = None,
            _ => {} // the request id, or a field this version does not know
        }
    }
    Some(match last? {
        SNAPSHOT => server_message::Body::Snapshot(Snapshot {
            providers: Vec::with_capacity(providers),
            ..Snapshot::default()
        }),
        _ => server_message::Body::Delta(Delta {
            added: Vec::with_capacity(added),
            updated: Vec::with_capacity(updated),
            ..Delta::default()
        }),
    })
}

/// One field of an encoded message, as a scan reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field<'a> {
    /// A varint's tag and value.
    Varint(u32, u64),
    /// A length-delimited field's tag and bytes.
    Bytes(u32, &'a [u8]),
    /// A fixed-width field's tag (its value skipped).
    Fixed(u32),
}

impl<'a> Field<'a> {
    pub(super) fn tag(&self) -> u32 {
        match *self {
            Field::Varint(tag, _) | Field::Bytes(tag, _) | Field::Fixed(tag) => tag,
        }
    }

    /// A length-delimited field's bytes; empty for other wire types.
    fn body(&self) -> &'a [u8] {
        match *self {
            Field::Bytes(_, body) => body,
            _ => &[],
        }
    }
}

/// The fields of an encoded message; a `None` where the bytes stop
/// scanning ends the iteration.
fn fields(mut bytes: &[u8]) -> impl Iterator<Item = Option<Field<'_>>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let field = scan_field(&mut bytes);
        if field.is_none() {
            bytes = &[];
        }
        Some(field)
    })
}

/// Reads one field of `bytes` and moves past it; `None` for a group or
/// bytes that do not scan (a bad key, a length past the end).
pub(super) fn scan_field<'a>(bytes: &mut &'a [u8]) -> Option<Field<'a>> {
    let (tag, wire_type) = prost::encoding::decode_key(bytes).ok()?;
    let skip = match wire_type {
        WireType::Varint => return Some(Field::Varint(tag, prost::encoding::decode_varint(bytes).ok()?)),
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => usize::try_from(prost::encoding::decode_varint(bytes).ok()?).ok()?,
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    let body = bytes.get(..skip)?;
    *bytes = &bytes[skip..];
    Some(if wire_type == WireType::LengthDelimited {
        Field::Bytes(tag, body)
    } else {
        Field::Fixed(tag)
    })
}

/// Drains `messages` into `socket` after what `buf` already holds (a
/// preface), many frames per write, each appended by `put`. Ends when the
/// senders are gone (then shuts the socket's write side) or a write fails.
pub async fn write_frames<T>(
    mut messages: mpsc::Receiver<T>,
    mut socket: impl AsyncWrite + Unpin,
    mut buf: BytesMut,
    put: impl Fn(&T, &mut BytesMut),
) {
    while let Some(message) = messages.recv().await {
        put(&message, &mut buf);
        // Let the tasks that are ready queue their frames first, so one
        // write carries them all: a node registering many instances at
        // once would otherwise hand each to the writer alone (the woken
        // writer runs next on this thread) and pay a syscall per frame.
        tokio::task::yield_now().await;
        while buf.len() < WRITE_BATCH {
            let Ok(message) = messages.try_recv() else { break };
            put(&message, &mut buf);
        }
        // Flushing: TLS holds what it took until then (plain TCP: a no-op).
        let written = async {
            socket.write_all(&buf).await?;
            socket.flush().await
        };
        if let Err(e) = written.await {
            debug!(error = %e, "control stream write failed");
            return;
        }
        buf.clear();
        if buf.capacity() > KEEP_WRITE_BUFFER {
            buf = BytesMut::new();
        }
    }
    let _ = socket.shutdown().await;
}

/// Splits a byte stream into frame bodies, checking each length against
/// `max_frame` before reserving room for it.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder { max_frame }
    }

    /// The body length of the frame at the front of `src` if all of it has
    /// arrived; if not, room is reserved for more of it.
    fn complete_frame(&self, src: &mut BytesMut) -> Result<Option<usize>, std::io::Error> {
        if src.len() < LEN_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes(src[..LEN_BYTES].try_into().expect("four bytes")) as usize;
        if len > self.max_frame {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("control frame length {len} exceeds the limit {}", self.max_frame),
            ));
        }
        if src.len() < LEN_BYTES + len {
            // Room for what is announced, a step at a time: eight bytes
            // claiming a megabyte do not get a megabyte before it comes.
            src.reserve((LEN_BYTES + len - src.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        Ok(Some(len))
    }

    /// Once a large frame has been taken, its buffer is not kept resident
    /// for the rest of the stream.
    fn let_go_of_large(&self, src: &mut BytesMut) {
        if src.is_empty() && src.capacity() > RESERVE_STEP {
            *src = BytesMut::with_capacity(512);
        }
    }
}

impl Decoder for FrameDecoder {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        let Some(len) = self.complete_frame(src)? else {
            return Ok(None);
        };
        src.advance(LEN_BYTES);
        let frame = src.split_to(len);
        self.let_go_of_large(src);
        Ok(Some(frame))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed inside a control frame ({} bytes of it received)",
                    src.len()
                ),
            )),
        }
    }
}

#[cfg(test)]
#[path = "framing_tests.rs"]
mod tests;
