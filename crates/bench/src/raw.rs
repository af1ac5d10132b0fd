//! The practical ceiling: a raw length-prefixed echo over tokio TCP.
//!
//! Frame: `u32 length | u64 id | payload` (big-endian), echoed back as is.
//! The server parses whole frames out of each read and writes them back in
//! one write; the client multiplexes calls over one connection with the same
//! shape as a real RPC client (a writer task batching queued frames, a reader
//! task completing pending calls by id), minus any RPC protocol.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const PREFIX: usize = 12;

pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let mut whole = 0;
                while buf.len() >= whole + PREFIX {
                    let len = u32::from_be_bytes(buf[whole..whole + 4].try_into().expect("4 bytes")) as usize;
                    if buf.len() < whole + PREFIX + len {
                        break;
                    }
                    whole += PREFIX + len;
                }
                let out = buf.split_to(whole);
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                if buf.capacity() < 16 * 1024 {
                    buf.reserve(64 * 1024);
                }
            }
        });
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>>;

/// A multiplexing client of the raw echo server.
#[derive(Debug, Clone)]
pub struct RawClient {
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<RawClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Bytes>(4096);
        let pending: Pending = Arc::default();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(512);
            let mut buf = BytesMut::with_capacity(64 * 1024);
            while rx.recv_many(&mut batch, 512).await > 0 {
                for frame in batch.drain(..) {
                    buf.extend_from_slice(&frame);
                }
                if wr.write_all(&buf).await.is_err() {
                    return;
                }
                buf.clear();
            }
        });
        let reader_pending = pending.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                while buf.len() >= PREFIX {
                    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                    if buf.len() < PREFIX + len {
                        break;
                    }
                    let id = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
                    buf.advance(PREFIX);
                    let payload = buf.split_to(len).freeze();
                    if let Some(tx) = reader_pending.lock().expect("pending").remove(&id) {
                        let _ = tx.send(payload);
                    }
                }
                if buf.capacity() - buf.len() < 16 * 1024 {
                    buf.reserve(64 * 1024);
                }
            }
            reader_pending.lock().expect("pending").clear();
        });
        Ok(RawClient {
            tx,
            pending,
            next_id: Arc::default(),
        })
    }

    pub async fn call(&self, payload: &[u8]) -> anyhow::Result<Bytes> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, tx);
        let mut frame = BytesMut::with_capacity(PREFIX + payload.len());
        frame.put_u32(payload.len() as u32);
        frame.put_u64(id);
        frame.put_slice(payload);
        self.tx.send(frame.freeze()).await?;
        Ok(rx.await?)
    }
}
