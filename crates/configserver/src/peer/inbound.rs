//! A peer's link, as this server receives it: after the peer preface, a
//! `Hello` checked (protocol version, membership, token), then the peer's
//! full copies, batches and digests applied to its copy here
//! ([`crate::service_map`]'s replicas). A message that is not valid, or
//! that speaks for another owner than the sender, is answered with an
//! `Error` and closes the link, with nothing of it applied.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use prost::Message;
use rpc_core::net::{ReadHalf, WriteHalf};
use rpc_core::registry::framing::{self, MessageReader};
use tern_proto::peer::{self, PeerMessage, PeerReply, peer_message, peer_reply};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::{Cluster, MAX_PEER_FRAME, PROTOCOL_VERSION};
use crate::service_map::{MAX_PEER_NAME, RequestError};

/// Largest first message (`Hello`) accepted from a peer.
const MAX_HELLO: usize = 4 * 1024;

/// Serves one peer's link; the preface has been read. `cluster` is
/// `None` on a server without peers, which refuses every peer.
pub(crate) async fn serve(
    cluster: Option<&Arc<Cluster>>,
    read: ReadHalf,
    mut write: WriteHalf,
    from: SocketAddr,
    timeout: std::time::Duration,
) {
    // Small frames until the peer has said who it is.
    let mut messages = MessageReader::new(read, MAX_HELLO, 1024, "PeerMessage");
    let hello = match tokio::time::timeout(timeout, messages.next(|b: &[u8]| PeerMessage::decode(b))).await {
        Ok(Some(Ok(PeerMessage {
            body: Some(peer_message::Body::Hello(hello)),
        }))) => hello,
        Ok(Some(Ok(_))) => {
            return refuse(
                &mut write,
                from,
                "protocol",
                "the first message must be Hello".into(),
                timeout,
            )
            .await;
        }
        Ok(Some(Err(e))) => return refuse(&mut write, from, "protocol", e, timeout).await,
        Ok(None) => return,
        Err(_) => return debug!(%from, "peer sent no Hello; closing"),
    };
    for (field, value) in [("node", &hello.node), ("epoch", &hello.epoch), ("admin", &hello.admin)] {
        if value.len() > MAX_PEER_NAME {
            let why = format!("Hello's {field} is {} bytes, more than {MAX_PEER_NAME}", value.len());
            return refuse(&mut write, from, "invalid", why, timeout).await;
        }
    }
    let Some(cluster) = cluster else {
        let why = format!("{} is not a member: this server has no peers", hello.node);
        return refuse(&mut write, from, "unknown_member", why, timeout).await;
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let why = format!(
            "peer protocol version {} is not this server's {PROTOCOL_VERSION}",
            hello.protocol_version
        );
        return refuse(&mut write, from, "version", why, timeout).await;
    }
    if let Some(token) = cluster.token()
        && hello.token != token
    {
        let why = format!("{} did not present the cluster's token", hello.node);
        return refuse(&mut write, from, "unauthenticated", why, timeout).await;
    }
    if !cluster.is_member(&hello.node) {
        let why = format!(
            "{:?} is not a member of this cluster (members: {:?})",
            hello.node,
            cluster.member_names()
        );
        return refuse(&mut write, from, "unknown_member", why, timeout).await;
    }
    messages.set_max_frame(MAX_PEER_FRAME);
    let registry = cluster.registry().clone();
    let id = registry.open_replica(&hello.node, &hello.epoch, &hello.admin);
    cluster.peer_seen(&hello.node);
    info!(peer = %hello.node, %from, epoch = %hello.epoch, "cluster: peer's link accepted");
    let welcome = peer_reply::Body::Welcome(peer::Welcome {
        node: cluster.node().to_owned(),
        epoch: registry.epoch().to_owned(),
    });
    let mut out = BytesMut::new();
    let ended = async {
        reply(&mut write, &mut out, welcome, timeout).await?;
        loop {
            let message = match tokio::time::timeout(timeout, messages.next(|b: &[u8]| PeerMessage::decode(b))).await {
                Err(_) => return Err(format!("nothing from the peer for {timeout:?}")),
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => {
                    let _ = reply(&mut write, &mut out, error("protocol", e.clone()), timeout).await;
                    return Err(e);
                }
                Ok(Some(Ok(message))) => message,
            };
            let answer = match message.body {
                Some(peer_message::Body::Changes(changes)) => {
                    if cluster.drop_next_changes() {
                        info!(peer = %hello.node, seq = changes.seq, "cluster: test hook: batch dropped unseen");
                        registry.skip_changes(id, changes.seq);
                        continue;
                    }
                    match registry.apply_changes(id, changes) {
                        Ok(true) => continue,
                        Ok(false) => peer_reply::Body::NeedFull(peer::NeedFull {
                            reason: "a batch is missing".into(),
                        }),
                        Err(e) => return Err(refused(&mut write, &mut out, e, timeout).await),
                    }
                }
                Some(peer_message::Body::Full(full)) => match registry.apply_full(id, full) {
                    Ok(()) => {
                        cluster.progressed();
                        continue;
                    }
                    Err(e) => return Err(refused(&mut write, &mut out, e, timeout).await),
                },
                Some(peer_message::Body::Digest(digest)) => match registry.check_digest(id, &digest) {
                    Ok(None) => continue,
                    Ok(Some(reason)) => {
                        warn!(peer = %hello.node, %reason, "cluster: copy of the peer's data differs; asking for a full copy");
                        registry
                            .metrics
                            .peer_repairs
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        peer_reply::Body::NeedFull(peer::NeedFull { reason })
                    }
                    Err(e) => return Err(refused(&mut write, &mut out, e, timeout).await),
                },
                Some(peer_message::Body::Heartbeat(hb)) => {
                    if !cluster.is_member(&hello.node) {
                        let why = format!("{} is no longer a member of this cluster", hello.node);
                        let _ = reply(&mut write, &mut out, error("unknown_member", why.clone()), timeout).await;
                        return Err(why);
                    }
                    peer_reply::Body::Heartbeat(hb)
                }
                Some(peer_message::Body::RulesChanged(rules)) => {
                    debug!(peer = %hello.node, revision = rules.revision, "cluster: peer changed rules; reloading");
                    if let Err(e) = cluster.governance().reload().await {
                        warn!(error = %e, "cannot read the rule store; the store poll retries");
                    }
                    continue;
                }
                Some(peer_message::Body::Hello(_)) => {
                    let e = "Hello sent twice".to_owned();
                    let _ = reply(&mut write, &mut out, error("protocol", e.clone()), timeout).await;
                    return Err(e);
                }
                None => {
                    let e = "empty message (unknown kind?)".to_owned();
                    let _ = reply(&mut write, &mut out, error("protocol", e.clone()), timeout).await;
                    return Err(e);
                }
            };
            reply(&mut write, &mut out, answer, timeout).await?;
        }
    };
    let ended: Result<(), String> = tokio::select! {
        ended = ended => ended,
        _ = cluster.shutdown_token().cancelled() => Ok(()),
    };
    registry.close_replica(id);
    cluster.progressed();
    info!(peer = %hello.node, reason = ?ended.err(), "cluster: peer's link ended");
}

/// Answers `e` and gives the reason the link ends.
async fn refused(write: &mut WriteHalf, out: &mut BytesMut, e: RequestError, timeout: std::time::Duration) -> String {
    let kind = match &e {
        RequestError::Forbidden(_) => "not_owner",
        _ => "invalid",
    };
    let why = e.to_string();
    warn!(error = %why, "cluster: refusing a peer's message; nothing of it applied");
    let _ = reply(write, out, error(kind, why.clone()), timeout).await;
    why
}

async fn refuse(write: &mut WriteHalf, from: SocketAddr, kind: &str, why: String, timeout: std::time::Duration) {
    warn!(%from, kind, reason = %why, "cluster: refusing a peer");
    let _ = reply(write, &mut BytesMut::new(), error(kind, why), timeout).await;
}

fn error(kind: &str, message: String) -> peer_reply::Body {
    peer_reply::Body::Error(peer::Error {
        kind: kind.to_owned(),
        message,
    })
}

async fn reply(
    write: &mut WriteHalf,
    out: &mut BytesMut,
    body: peer_reply::Body,
    timeout: std::time::Duration,
) -> Result<(), String> {
    framing::put_frame(out, &PeerReply { body: Some(body) });
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
