//! etcd as a registry: `/tern/<service>/providers/<host:port>` keys on the
//! lease of the provider's session (kept alive), and subscribers that read
//! the prefix once, then apply every event of a watch from the next revision.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::{REQUEST_LIMIT, address};
use crate::convergence::Observer;
use crate::etcd::{self, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient};

/// Failure detection of the etcd sessions: the leases' TTL (see the module
/// docs of `peers`).
const ETCD_LEASE_TTL_S: i64 = 3;

pub(super) async fn etcd_channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(REQUEST_LIMIT)
        .timeout(REQUEST_LIMIT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to etcd at {addr}"))
}

fn etcd_prefix(service: &str) -> String {
    format!("/tern/{service}/providers/")
}

pub(super) fn etcd_key(service: &str, port: u16) -> String {
    format!("{}{}", etcd_prefix(service), address(port))
}

/// The end of the key range holding every key that starts with `prefix`.
pub(super) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // The prefix is ASCII ending in '/': its last byte can be incremented.
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

/// A provider's etcd session: a lease kept alive, which its keys carry.
pub(super) struct EtcdProvider {
    pub(super) kv: KvClient<Channel>,
    pub(super) lease: i64,
    _keepalive: JoinSet<()>,
}

impl EtcdProvider {
    pub(super) async fn start(addr: SocketAddr) -> anyhow::Result<EtcdProvider> {
        let channel = etcd_channel(addr).await?;
        let mut leases = LeaseClient::new(channel.clone());
        let grant = leases
            .lease_grant(etcd::LeaseGrantRequest {
                ttl: ETCD_LEASE_TTL_S,
                id: 0,
            })
            .await?
            .into_inner();
        anyhow::ensure!(grant.error.is_empty(), "etcd refused a lease: {}", grant.error);
        let lease = grant.id;
        let (tx, rx) = mpsc::channel(1);
        // etcd answers the call (headers included) only once a first
        // keep-alive arrives: queue it before waiting for the answer.
        tx.send(etcd::LeaseKeepAliveRequest { id: lease }).await?;
        let mut answers = leases.lease_keep_alive(ReceiverStream::new(rx)).await?.into_inner();
        let mut keepalive = JoinSet::new();
        keepalive.spawn(async move {
            // Renew at a third of the TTL, as etcd's clients do; stops when
            // the provider is dropped (the task is aborted) or etcd hangs up.
            let period = Duration::from_millis(ETCD_LEASE_TTL_S as u64 * 1000 / 3);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tokio::select! {
                    _ = tick.tick() => if tx.send(etcd::LeaseKeepAliveRequest { id: lease }).await.is_err() { return },
                    answer = answers.message() => if !matches!(answer, Ok(Some(_))) { return },
                }
            }
        });
        Ok(EtcdProvider {
            kv: KvClient::new(channel),
            lease,
            _keepalive: keepalive,
        })
    }
}

/// The prefix's addresses and the revision they were read at.
pub(super) async fn etcd_read(channel: &Channel, service: &str) -> anyhow::Result<(BTreeSet<String>, i64)> {
    let prefix = etcd_prefix(service);
    let response = KvClient::new(channel.clone())
        .range(etcd::RangeRequest {
            key: prefix.clone().into_bytes(),
            range_end: prefix_end(&prefix),
            limit: 0,
            revision: 0,
        })
        .await?
        .into_inner();
    let revision = response.header.map_or(0, |h| h.revision);
    let addresses = response
        .kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(prefix.as_bytes()))
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Ok((addresses, revision))
}

/// An etcd subscriber: from the list read at `revision`, apply every watch
/// event after it. Ends when its task is aborted or the watch fails.
pub(super) async fn etcd_watch(
    channel: Channel,
    service: String,
    (addresses, revision): (BTreeSet<String>, i64),
    view: watch::Sender<Arc<BTreeSet<String>>>,
    observer: Observer,
) {
    let addresses = Arc::new(addresses);
    view.send_replace(addresses.clone());
    observer.saw(&*addresses);
    let prefix = etcd_prefix(&service);
    let create = etcd::WatchRequest {
        request_union: Some(etcd::watch_request::RequestUnion::CreateRequest(
            etcd::WatchCreateRequest {
                key: prefix.clone().into_bytes(),
                range_end: prefix_end(&prefix),
                start_revision: revision + 1,
            },
        )),
    };
    // The request stream stays open (`_requests`): etcd ends the watch when
    // the client closes its side.
    let (_requests, rx) = mpsc::channel::<etcd::WatchRequest>(1);
    let requests = tokio_stream::once(create).chain(ReceiverStream::new(rx));
    let mut stream = match WatchClient::new(channel).watch(requests).await {
        Ok(response) => response.into_inner(),
        Err(e) => {
            eprintln!("etcd subscriber: watching {prefix}: {e}");
            return;
        }
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return,
            Err(e) => {
                eprintln!("etcd subscriber: watch of {prefix} failed: {e}");
                return;
            }
        };
        if response.canceled {
            eprintln!(
                "etcd subscriber: watch of {prefix} canceled: {}",
                response.cancel_reason
            );
            return;
        }
        if response.events.is_empty() {
            continue;
        }
        // In place: the set is shared with no one between borrows, so
        // `make_mut` does not copy it (a copy per event would make the
        // bench, not etcd, the bottleneck of a storm).
        view.send_modify(|view| {
            let addresses = Arc::make_mut(view);
            for event in &response.events {
                let Some(kv) = &event.kv else { continue };
                let Some(addr) = kv.key.strip_prefix(prefix.as_bytes()) else {
                    continue;
                };
                let addr = String::from_utf8_lossy(addr).into_owned();
                if event.r#type == etcd::event::EventType::Delete as i32 {
                    addresses.remove(&addr);
                } else {
                    addresses.insert(addr);
                }
            }
        });
        observer.saw(&**view.borrow());
    }
}
