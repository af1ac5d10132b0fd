//! One link: this server's own connection to one peer, carrying what this
//! server owns. It sends the peer preface and `Hello`, waits for
//! `Welcome`, sends a full copy, then every batch of changes as it is made,
//! a digest every digest interval, heartbeats, and an announcement of
//! every rule write. The peer answers heartbeats, and `NeedFull` when its
//! copy does not match, which is answered with a new full copy. A link
//! that breaks or goes silent for the heartbeat timeout is made again
//! after a backoff (at once when the peer is seen connecting here).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use prost::Message;
use rpc_core::net::{Stream, WriteHalf};
use rpc_core::registry::framing::{self, MessageReader};
use tern_proto::peer::{self, PeerMessage, PeerReply, peer_message, peer_reply};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Cluster, LinkStatus, PREFACE, PROTOCOL_VERSION};
use crate::service_map::{Replication, Summary};

/// First wait before a link is tried again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Largest reply a peer may send (a `Welcome`, `NeedFull`, `Error`).
const MAX_REPLY: usize = 64 * 1024;

/// Keeps the link to `node` up until `stop`.
pub(crate) async fn run(
    cluster: Arc<Cluster>,
    node: String,
    stop: CancellationToken,
    kick: Arc<Notify>,
    status: Arc<Mutex<LinkStatus>>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let ended = tokio::select! {
            ended = serve(&cluster, &node, &status) => ended,
            _ = stop.cancelled() => return,
        };
        {
            let mut status = status.lock().expect("link status lock");
            let was_up = status.connected;
            status.connected = false;
            status.attempts += 1;
            status.since = Some(std::time::Instant::now());
            match &ended {
                Ok(()) => status.last_error = None,
                Err(e) => status.last_error = Some(e.clone()),
            }
            if was_up {
                info!(peer = %node, reason = ?ended.as_ref().err(), "cluster: link to peer ended");
                backoff = FIRST_BACKOFF;
            } else {
                debug!(peer = %node, error = ?ended.as_ref().err(), "cluster: cannot reach peer");
            }
        }
        cluster.progressed();
        let jitter = rand::random_range(0.5..1.0);
        tokio::select! {
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            _ = kick.notified() => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection of the link, until it breaks; why it did.
async fn serve(cluster: &Cluster, node: &str, status: &Mutex<LinkStatus>) -> Result<(), String> {
    let timeout = cluster.heartbeats().timeout;
    let connect = async {
        let tcp = TcpStream::connect(node).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &cluster.config.tls {
            None => Ok(Stream::from(tcp)),
            Some(tls) => tls
                .connect(tcp, rpc_core::net::tls::host_of(node))
                .await
                .map_err(|e| format!("TLS handshake: {e}")),
        }
    };
    let socket = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("connect: no answer within {timeout:?}"))??;
    let (read, mut write) = socket.into_split();
    let mut replies = MessageReader::new(read, MAX_REPLY, 1024, "PeerReply");
    let registry = cluster.registry();
    let hello = peer_message::Body::Hello(peer::Hello {
        protocol_version: PROTOCOL_VERSION,
        node: cluster.node().to_owned(),
        epoch: registry.epoch().to_owned(),
        token: cluster.token().unwrap_or_default().to_owned(),
        admin: cluster.admin().to_owned(),
    });
    let mut out = BytesMut::new();
    out.extend_from_slice(&PREFACE);
    framing::put_frame(&mut out, &PeerMessage { body: Some(hello) });
    send(&mut write, &mut out, timeout).await?;
    match tokio::time::timeout(timeout, replies.next(|b: &[u8]| PeerReply::decode(b))).await {
        Err(_) => return Err(format!("no Welcome within {timeout:?}")),
        Ok(None) => return Err("closed before its Welcome".into()),
        Ok(Some(Err(e))) => return Err(e),
        Ok(Some(Ok(PeerReply {
            body: Some(peer_reply::Body::Welcome(welcome)),
        }))) => {
            if welcome.node != node {
                debug!(peer = node, names_itself = %welcome.node, "cluster: peer names itself otherwise");
            }
        }
        Ok(Some(Ok(PeerReply {
            body: Some(peer_reply::Body::Error(e)),
        }))) => {
            warn!(peer = node, kind = %e.kind, message = %e.message, "cluster: peer refused this server");
            return Err(format!("refused ({}): {}", e.kind, e.message));
        }
        Ok(Some(Ok(other))) => return Err(format!("expected Welcome, got {other:?}")),
    }
    let Some(mut replication) = registry.replication() else {
        return Err("replication is off".into());
    };
    let mut sent = send_full(&mut write, &mut out, &replication, timeout, status).await?;
    {
        let mut status = status.lock().expect("link status lock");
        status.connected = true;
        status.since = Some(std::time::Instant::now());
        status.last_error = None;
        status.attempts = 0;
    }
    info!(
        peer = node,
        providers = sent.providers,
        consumers = sent.consumers,
        "cluster: link to peer up"
    );
    let mut rules = cluster.governance().writes();
    rules.mark_unchanged();
    let mut digest = tokio::time::interval(cluster.config().digest_interval);
    digest.reset();
    let mut heartbeat = tokio::time::interval(cluster.heartbeats().interval);
    heartbeat.reset();
    let mut heartbeat_seq = 0;
    let silence = tokio::time::sleep(timeout);
    tokio::pin!(silence);
    loop {
        tokio::select! {
            batch = replication.batches.recv() => match batch {
                Ok(batch) => {
                    if batch.summary.seq <= sent.seq {
                        continue;
                    }
                    framing::put_encoded_frame(&mut out, &batch.encoded);
                    send(&mut write, &mut out, timeout).await?;
                    sent = batch.summary;
                    let mut status = status.lock().expect("link status lock");
                    status.batches += 1;
                    status.bytes += batch.encoded.len() as u64;
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    debug!(peer = node, missed, "cluster: link fell behind; sending a full copy");
                    replication = registry.replication().ok_or("replication is off")?;
                    sent = send_full(&mut write, &mut out, &replication, timeout, status).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            _ = digest.tick() => {
                let body = peer_message::Body::Digest(peer::Digest {
                    owner: cluster.node().to_owned(),
                    seq: sent.seq,
                    providers: sent.providers,
                    consumers: sent.consumers,
                    hash: sent.hash,
                    sessions: sent.sessions,
                });
                framing::put_frame(&mut out, &PeerMessage { body: Some(body) });
                send(&mut write, &mut out, timeout).await?;
            }
            _ = heartbeat.tick() => {
                heartbeat_seq += 1;
                let body = peer_message::Body::Heartbeat(peer::Heartbeat { seq: heartbeat_seq });
                framing::put_frame(&mut out, &PeerMessage { body: Some(body) });
                send(&mut write, &mut out, timeout).await?;
            }
            changed = rules.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let revision = *rules.borrow_and_update();
                let body = peer_message::Body::RulesChanged(peer::RulesChanged { revision });
                framing::put_frame(&mut out, &PeerMessage { body: Some(body) });
                send(&mut write, &mut out, timeout).await?;
            }
            reply = replies.next(|b: &[u8]| PeerReply::decode(b)) => {
                silence.as_mut().reset(tokio::time::Instant::now() + timeout);
                match reply {
                    None => return Err("closed by peer".into()),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(PeerReply { body: Some(peer_reply::Body::NeedFull(need)) })) => {
                        info!(peer = node, reason = %need.reason, "cluster: peer's copy differs; sending a full copy");
                        replication = registry.replication().ok_or("replication is off")?;
                        sent = send_full(&mut write, &mut out, &replication, timeout, status).await?;
                    }
                    Some(Ok(PeerReply { body: Some(peer_reply::Body::Error(e)) })) => {
                        warn!(peer = node, kind = %e.kind, message = %e.message, "cluster: peer closed the link");
                        return Err(format!("peer said ({}): {}", e.kind, e.message));
                    }
                    Some(Ok(_)) => {}
                }
            }
            _ = &mut silence => return Err(format!("peer silent for {timeout:?}")),
        }
    }
}

/// Sends `replication`'s full copy; where the link stands after it.
async fn send_full(
    write: &mut WriteHalf,
    out: &mut BytesMut,
    replication: &Replication,
    timeout: Duration,
    status: &Mutex<LinkStatus>,
) -> Result<Summary, String> {
    framing::put_encoded_frame(out, &replication.full);
    send(write, out, timeout).await?;
    let mut status = status.lock().expect("link status lock");
    status.fulls += 1;
    status.bytes += replication.full.len() as u64;
    Ok(replication.summary)
}

/// Writes out what `out` holds, within `timeout`.
async fn send(write: &mut WriteHalf, out: &mut BytesMut, timeout: Duration) -> Result<(), String> {
    let written = tokio::time::timeout(timeout, async {
        write.write_all(out).await?;
        write.flush().await
    })
    .await;
    out.clear();
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!("peer took nothing for {timeout:?}")),
    }
}
