//! The owner's side of peer replication: what this server's own sessions
//! hold (their providers and subscriptions), sent to every peer as net
//! changes batched in the coalescing window, as a full copy when a peer
//! link (re)connects, and summed up in a digest for anti-entropy.
//!
//! Only with peers: a server without them tracks nothing here.

use std::collections::{HashMap, HashSet};
use std::hash::Hasher;

use bytes::Bytes;
use prost::Message;
use rpc_core::ServiceKey;
use rpc_core::registry::Addr;
use tern_proto::peer::{self, PeerMessage, peer_message};
use tern_proto::registry::Instance;
use tokio::sync::broadcast;

use super::map::{Batch, NodeInfo, Outbound, Registry, SessionId, State, Summary};

/// Batches a peer link may fall behind by before it resyncs with a full copy.
const BATCHES_BUFFERED: usize = 1024;

/// What a peer link starts from: a full copy, then the batches after it.
#[derive(Debug)]
pub struct Replication {
    pub summary: Summary,
    /// A `PeerMessage` carrying `Full`.
    pub full: Bytes,
    pub batches: broadcast::Receiver<Batch>,
}

impl Outbound {
    fn new(node: String) -> Outbound {
        Outbound {
            node,
            dirty_providers: HashSet::new(),
            dirty_consumers: HashSet::new(),
            sent: HashMap::new(),
            summary: Summary::default(),
            batches: broadcast::channel(BATCHES_BUFFERED).0,
        }
    }

    pub(super) fn note_provider(&mut self, key: &ServiceKey, addr: &Addr) {
        self.dirty_providers.insert((key.clone(), addr.clone()));
    }

    pub(super) fn note_consumer(&mut self, key: &ServiceKey, id: SessionId) {
        self.dirty_consumers.insert((key.clone(), id));
    }

    fn is_dirty(&self) -> bool {
        !self.dirty_providers.is_empty() || !self.dirty_consumers.is_empty()
    }

    /// Records that a provider (`consumer` false) or consumer entry with
    /// identity `id` now hashes to `hash` (`None`: gone); whether that is
    /// a change.
    fn record(&mut self, consumer: bool, id: u64, hash: Option<u64>) -> bool {
        let old = match hash {
            Some(hash) => self.sent.insert(id, hash),
            None => self.sent.remove(&id),
        };
        if old == hash {
            return false;
        }
        self.summary.hash ^= old.unwrap_or(0) ^ hash.unwrap_or(0);
        let count = if consumer {
            &mut self.summary.consumers
        } else {
            &mut self.summary.providers
        };
        match (old, hash) {
            (None, Some(_)) => *count += 1,
            (Some(_), None) => *count -= 1,
            _ => {}
        }
        true
    }
}

impl Registry {
    /// Starts tracking what this server owns, to replicate it to peers as
    /// `node` (its member address). Before the first session, once.
    pub fn enable_replication(&self, node: String) {
        let mut state = self.lock();
        debug_assert!(state.sessions.is_empty(), "replication enabled after sessions opened");
        state.outbound = Some(Outbound::new(node));
    }

    /// Whether this server replicates to peers.
    pub fn replicates(&self) -> bool {
        self.lock().outbound.is_some()
    }

    /// Makes one batch of what this server's sessions changed since the
    /// last (if anything did) and hands it to every peer link.
    pub fn replicate(&self) {
        let mut state = self.lock();
        make_batch(&mut state);
    }

    /// A full copy of what this server owns and the batches that will
    /// follow it, for a peer link that (re)connects; `None` without peers.
    pub fn replication(&self) -> Option<Replication> {
        let mut guard = self.lock();
        make_batch(&mut guard);
        let state = &*guard;
        let outbound = state.outbound.as_ref()?;
        let mut full = peer::Full {
            owner: outbound.node.clone(),
            seq: outbound.summary.seq,
            sessions: state.sessions.len() as u64,
            ..peer::Full::default()
        };
        for (key, entry) in &state.services {
            for (instance, holder) in entry.providers.values() {
                if state.sessions.contains_key(holder) {
                    full.providers.push(provider_message(key, instance, *holder));
                }
            }
            for (id, node) in &entry.consumers {
                full.consumers.push(consumer_message(key, *id, node));
            }
        }
        let mut summary = outbound.summary;
        summary.sessions = full.sessions;
        let batches = outbound.batches.subscribe();
        // Encoded once the registry is free again.
        drop(guard);
        Some(Replication {
            summary,
            full: encode(peer_message::Body::Full(full)),
            batches,
        })
    }
}

/// Turns the owned entries noted dirty into one `Changes` batch (those
/// whose state differs from what was last sent) and broadcasts it.
fn make_batch(state: &mut State) {
    let Some(mut outbound) = state.outbound.take() else {
        return;
    };
    if outbound.is_dirty() {
        let mut changes = peer::Changes {
            owner: outbound.node.clone(),
            ..peer::Changes::default()
        };
        for (key, addr) in std::mem::take(&mut outbound.dirty_providers) {
            let held = state
                .services
                .get(&key)
                .and_then(|e| e.providers.get(&addr))
                .filter(|(_, holder)| state.sessions.contains_key(holder));
            let id = identity_hash(b'P', &key, addr.as_str().as_bytes());
            match held {
                Some((instance, holder)) => {
                    if outbound.record(false, id, Some(provider_hash(&key, instance))) {
                        changes.providers.push(provider_message(&key, instance, *holder));
                    }
                }
                None => {
                    if outbound.record(false, id, None) {
                        changes.providers_gone.push(peer::ProviderGone {
                            service: Some((&key).into()),
                            addr: addr.to_string(),
                        });
                    }
                }
            }
        }
        for (key, session) in std::mem::take(&mut outbound.dirty_consumers) {
            let node = state.services.get(&key).and_then(|e| e.consumers.get(&session));
            let id = identity_hash(b'C', &key, &session.to_be_bytes());
            let hash = node.map(|node| consumer_hash(&key, session, node));
            if outbound.record(true, id, hash) {
                match node {
                    Some(node) => changes.consumers.push(consumer_message(&key, session, node)),
                    None => changes.consumers_gone.push(peer::ConsumerGone {
                        service: Some((&key).into()),
                        session,
                    }),
                }
            }
        }
        let empty = changes.providers.is_empty()
            && changes.providers_gone.is_empty()
            && changes.consumers.is_empty()
            && changes.consumers_gone.is_empty();
        if !empty {
            outbound.summary.seq += 1;
            outbound.summary.sessions = state.sessions.len() as u64;
            changes.seq = outbound.summary.seq;
            changes.sent_at_ms = unix_ms();
            let batch = Batch {
                summary: outbound.summary,
                encoded: encode(peer_message::Body::Changes(changes)),
            };
            // No receivers: no peer link is up; each sends a full copy when it is.
            let _ = outbound.batches.send(batch);
        }
    }
    state.outbound = Some(outbound);
}

fn encode(body: peer_message::Body) -> Bytes {
    PeerMessage { body: Some(body) }.encode_to_vec().into()
}

pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(super) fn provider_message(key: &ServiceKey, instance: &Instance, session: SessionId) -> peer::Provider {
    peer::Provider {
        service: Some(key.into()),
        instance: Some(instance.clone()),
        session,
    }
}

pub(super) fn consumer_message(key: &ServiceKey, session: SessionId, node: &NodeInfo) -> peer::Consumer {
    peer::Consumer {
        service: Some(key.into()),
        session,
        app: node.app.clone(),
        host: node.host.clone(),
        zone: node.zone.clone(),
        role: node.role,
    }
}

/// A hash the same on every server (FNV-1a, then a finalizer that spreads
/// its bits, so that XORs of many do not cancel by pattern).
struct StableHasher(fnv::FnvHasher);

impl StableHasher {
    fn new(tag: u8) -> StableHasher {
        let mut h = fnv::FnvHasher::default();
        h.write_u8(tag);
        StableHasher(h)
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.write_u64(bytes.len() as u64);
        self.0.write(bytes);
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.write_u64(v);
        self
    }

    fn key(&mut self, key: &ServiceKey) -> &mut Self {
        self.bytes(key.interface.as_bytes())
            .bytes(key.version.as_bytes())
            .bytes(key.group.as_bytes())
    }

    fn finish(&self) -> u64 {
        // splitmix64's finalizer.
        let mut z = self.0.finish();
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn identity_hash(tag: u8, key: &ServiceKey, id: &[u8]) -> u64 {
    StableHasher::new(tag).key(key).bytes(id).finish()
}

/// The hash of one provider entry: its service and every field of the
/// instance (metadata in key order).
pub(crate) fn provider_hash(key: &ServiceKey, i: &Instance) -> u64 {
    let mut h = StableHasher::new(b'P');
    h.key(key)
        .bytes(i.host.as_bytes())
        .u64(u64::from(i.port))
        .u64(u64::from(i.weight))
        .bytes(i.zone.as_bytes())
        .bytes(i.app.as_bytes())
        .bytes(i.protocol.as_bytes())
        .u64(i.start_time_ms as u64);
    let mut metadata: Vec<_> = i.metadata.iter().collect();
    metadata.sort();
    h.u64(metadata.len() as u64);
    for (k, v) in metadata {
        h.bytes(k.as_bytes()).bytes(v.as_bytes());
    }
    h.finish()
}

/// The hash of one consumer entry.
pub(crate) fn consumer_hash(key: &ServiceKey, session: u64, node: &NodeInfo) -> u64 {
    StableHasher::new(b'C')
        .key(key)
        .u64(session)
        .bytes(node.app.as_bytes())
        .bytes(node.host.as_bytes())
        .bytes(node.zone.as_bytes())
        .u64(node.role as u64)
        .finish()
}
