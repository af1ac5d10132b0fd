use std::time::Duration;

use tern_proto::registry::{Heartbeat, NodeMessage, node_message};

use super::*;

fn heartbeat(seq: u64) -> NodeMessage {
    NodeMessage {
        request_id: seq,
        body: Some(node_message::Body::Heartbeat(Heartbeat { seq })),
    }
}

#[test]
fn frames_round_trip_whatever_the_split() {
    let mut wire = BytesMut::new();
    for seq in 1..=3 {
        put_frame(&mut wire, &heartbeat(seq));
    }
    // Fed one byte at a time, the decoder yields exactly the three messages.
    let mut decoder = FrameDecoder::new(1024);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for byte in wire {
        buf.put_u8(byte);
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            got.push(NodeMessage::decode(frame).unwrap());
        }
    }
    assert_eq!(got, (1..=3).map(heartbeat).collect::<Vec<_>>());
}

/// Gives `wire` back in reads of at most `split` bytes.
struct Reads {
    chunks: std::collections::VecDeque<Vec<u8>>,
}

impl Reads {
    fn new(wire: &[u8], split: usize) -> Reads {
        Reads {
            chunks: wire.chunks(split).map(<[u8]>::to_vec).collect(),
        }
    }
}

impl AsyncRead for Reads {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(mut chunk) = self.chunks.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.chunks.push_front(chunk.split_off(n));
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// Records each write it is given.
#[derive(Default)]
struct Writes(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl AsyncWrite for Writes {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().push(buf.to_vec());
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

// One worker: a task woken there runs next (tokio's LIFO slot), so a
// writer woken by each send would write each frame alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn frames_sent_by_tasks_ready_together_go_out_in_one_write() {
    let writes = Writes::default();
    let seen = writes.0.clone();
    let (tx, rx) = mpsc::channel(64);
    let writer = tokio::spawn(write_frames(rx, writes, BytesMut::new(), |m, buf| put_frame(buf, m)));
    // A first frame, written alone: the writer then waits for the next.
    tx.send(heartbeat(0)).await.unwrap();
    let first_written = async {
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), first_written)
        .await
        .unwrap();
    // Spawned from a worker, so all ten are queued there before any runs.
    tokio::spawn(async move {
        let senders: Vec<_> = (1..=10)
            .map(|seq| {
                let tx = tx.clone();
                tokio::spawn(async move { tx.send(heartbeat(seq)).await.unwrap() })
            })
            .collect();
        for sender in senders {
            sender.await.unwrap();
        }
    })
    .await
    .unwrap();
    writer.await.unwrap();
    let writes = seen.lock().unwrap();
    let mut wire = BytesMut::from(&writes.concat()[..]);
    let mut decoder = FrameDecoder::new(1024);
    let mut seqs = Vec::new();
    while let Some(frame) = decoder.decode(&mut wire).unwrap() {
        seqs.push(NodeMessage::decode(frame).unwrap().request_id);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..=10).collect::<Vec<_>>(), "every frame written once");
    assert!(
        writes.len() <= 2,
        "{} writes for 11 frames: the first alone, then the ten together",
        writes.len()
    );
}

#[test]
fn an_oversized_length_is_refused_before_any_allocation() {
    let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF][..]);
    let err = FrameDecoder::new(1024).decode(&mut buf).unwrap_err();
    assert_eq!(
        err.to_string(),
        "control frame length 4294967295 exceeds the limit 1024"
    );
    assert!(buf.capacity() < 1024, "nothing reserved for the bogus frame");
}

#[test]
fn room_is_reserved_as_a_frame_arrives_and_let_go_after_it() {
    let mut decoder = FrameDecoder::new(4 * 1024 * 1024);
    let mut buf = BytesMut::new();
    buf.put_u32(1024 * 1024);
    assert!(decoder.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() <= LEN_BYTES + RESERVE_STEP, "{}", buf.capacity());
    buf.put_bytes(0, 1024 * 1024);
    assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().len(), 1024 * 1024);
    assert!(buf.capacity() < RESERVE_STEP, "the large buffer is let go");
}

#[test]
fn eof_inside_a_frame_is_an_error() {
    let mut buf = BytesMut::from(&[0, 0, 0, 10, 1, 2][..]);
    let err = FrameDecoder::new(1024).decode_eof(&mut buf).unwrap_err();
    assert!(err.to_string().contains("6 bytes of it received"), "{err}");
    assert!(
        FrameDecoder::new(1024)
            .decode_eof(&mut BytesMut::new())
            .unwrap()
            .is_none()
    );
}

fn instance(port: u32) -> tern_proto::registry::Instance {
    tern_proto::registry::Instance {
        host: "10.0.0.1".into(),
        port,
        app: "shop".into(),
        ..Default::default()
    }
}

#[test]
fn server_messages_decode_as_prost_decodes_them_with_their_lists_presized() {
    let delta = ServerMessage {
        request_id: 0,
        body: Some(server_message::Body::Delta(Delta {
            from_revision: 4,
            to_revision: 5,
            added: (1..=300).map(instance).collect(),
            removed: vec!["10.0.0.1:9".into()],
            updated: vec![instance(7)],
            ..Delta::default()
        })),
    };
    let snapshot = ServerMessage {
        request_id: 3,
        body: Some(server_message::Body::Snapshot(Snapshot {
            revision: 9,
            providers: (1..=2000).map(instance).collect(),
            ..Snapshot::default()
        })),
    };
    let ack = ServerMessage {
        request_id: 8,
        body: Some(server_message::Body::Ack(Default::default())),
    };
    for message in [delta, snapshot, ack] {
        let decoded = decode_server_message(BytesMut::from(&message.encode_to_vec()[..])).unwrap();
        assert_eq!(decoded, message);
        match decoded.body {
            Some(server_message::Body::Delta(d)) => assert_eq!(d.added.capacity(), 300),
            Some(server_message::Body::Snapshot(s)) => assert_eq!(s.providers.capacity(), 2000),
            _ => {}
        }
    }
}

proptest::proptest! {
    /// On any bytes, the presized decoding and prost's agree: the same
    /// message, or both an error.
    #[test]
    fn presized_decoding_agrees_with_prost_on_any_bytes(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
    ) {
        let ours = decode_server_message(BytesMut::from(&bytes[..]));
        let prost = ServerMessage::decode(&bytes[..]);
        proptest::prop_assert_eq!(ours.ok(), prost.ok());
    }

    /// The same on a delta or snapshot followed by arbitrary bytes
    /// (more fields, another body, or garbage).
    #[test]
    fn presized_decoding_agrees_with_prost_after_a_real_message(
        added in 0u32..40,
        snapshot in proptest::prelude::any::<bool>(),
        suffix in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
    ) {
        let body = if snapshot {
            server_message::Body::Snapshot(Snapshot { providers: (0..added).map(instance).collect(), ..Snapshot::default() })
        } else {
            server_message::Body::Delta(Delta { added: (0..added).map(instance).collect(), ..Delta::default() })
        };
        let mut bytes = ServerMessage { request_id: 1, body: Some(body) }.encode_to_vec();
        bytes.extend_from_slice(&suffix);
        let ours = decode_server_message(BytesMut::from(&bytes[..]));
        let prost = ServerMessage::decode(&bytes[..]);
        proptest::prop_assert_eq!(ours.ok(), prost.ok());
    }

    /// On any stream of bytes (real frames, garbage, a frame cut short)
    /// delivered in reads of any size, the in-place reader yields what
    /// the framed reader does: the same messages, then the same error
    /// or the same end.
    #[test]
    fn the_in_place_reader_reads_what_the_framed_reader_reads(
        frames in proptest::collection::vec(0u32..6, 0..6),
        garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48),
        cut in 0usize..8,
        split in 1usize..40,
    ) {
        let mut wire = BytesMut::new();
        for added in frames {
            let delta = Delta { added: (0..added).map(instance).collect(), ..Delta::default() };
            put_frame(&mut wire, &ServerMessage { request_id: 1, body: Some(server_message::Body::Delta(delta)) });
        }
        wire.extend_from_slice(&garbage);
        let wire = wire[..wire.len().saturating_sub(cut)].to_vec();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (ours, theirs) = runtime.block_on(async {
            const MAX: usize = 4096;
            let mut reader = MessageReader::new(Reads::new(&wire, split), MAX, 16, "ServerMessage");
            let mut ours = Vec::new();
            while let Some(item) = reader.next(decode_server_frame).await {
                let failed = item.is_err();
                ours.push(item);
                if failed {
                    break;
                }
            }
            let framed = read_messages(Reads::new(&wire, split), MAX, 16, "ServerMessage", decode_server_message);
            tokio::pin!(framed);
            let mut theirs = Vec::new();
            while let Some(item) = framed.next().await {
                let failed = item.is_err();
                theirs.push(item);
                if failed {
                    break;
                }
            }
            (ours, theirs)
        });
        proptest::prop_assert_eq!(ours, theirs);
    }

    /// Whatever the bytes and however they are split into reads, the
    /// decoder never panics, never yields a frame over the limit, and
    /// never holds more than one frame's worth beyond what it was fed.
    #[test]
    fn arbitrary_bytes_never_panic_or_overreach(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        split in 1usize..64,
    ) {
        const MAX: usize = 512;
        let mut decoder = FrameDecoder::new(MAX);
        let mut buf = BytesMut::new();
        'feed: for chunk in bytes.chunks(split) {
            buf.extend_from_slice(chunk);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        proptest::prop_assert!(frame.len() <= MAX);
                        let _ = NodeMessage::decode(frame);
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            proptest::prop_assert!(buf.capacity() <= 2 * (MAX + LEN_BYTES + bytes.len()));
        }
    }
}
