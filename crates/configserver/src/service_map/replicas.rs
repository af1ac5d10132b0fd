//! Copies of peers' data: for every other ConfigServer of the cluster,
//! the providers and subscriptions of the sessions connected to it, as its
//! link streams them ([`crate::peer`]). They enter the live map beside
//! this server's own, so that every subscriber here sees every provider of
//! the cluster.
//!
//! Who holds a provider when several claim its address: this server's own
//! session first (the node is connected here now), then the copy of a peer
//! whose link is up, then the last claim made. When the holder lets go,
//! another claim takes its place, so a node that moves between servers is
//! never missing meanwhile.
//!
//! A peer whose link ends leaves its copy *orphaned*: kept whole for the
//! peer grace period (its nodes reconnect to other servers and register
//! again there, taking their instances over), then what is still held
//! only by the orphan is checked (see [`crate::peer`]) and removed if dead.
//! A peer that restarts (a new epoch) gets a fresh copy; the old one is an
//! orphan like any other.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rpc_core::ServiceKey;
use rpc_core::registry::Addr;
use rpc_core::registry::convert::instance_addr;
use tern_proto::peer;
use tern_proto::registry::Instance;
use tracing::{debug, info};

use super::answer::RequestError;
use super::map::{NodeInfo, Registry, Replica, SessionId, State, Summary, remove_if_unused, remove_provider};
use super::replication::{consumer_hash, provider_hash};

/// Longest app, host or zone of a peer's consumer entry.
const MAX_FIELD: usize = 1024;

/// A replica as the admin API shows it.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub node: String,
    pub epoch: String,
    pub admin: String,
    pub connected: bool,
    pub synced: bool,
    pub orphaned_for: Option<Duration>,
    pub seq: u64,
    pub sessions: u64,
    pub providers: u64,
    pub consumers: u64,
    pub last_lag_ms: Option<i64>,
    pub last_applied_ago: Option<Duration>,
}

/// One link's hold on a peer's copy: what the link applies through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaLink {
    pub id: SessionId,
    link: u64,
}

/// Longest member address, epoch or admin address a peer may name.
pub const MAX_PEER_NAME: usize = 256;

/// A provider, or a consumer, as a peer sent it: checked before anything
/// of its message is applied.
enum Entry {
    Provider(ServiceKey, Instance),
    Consumer(ServiceKey, u64, NodeInfo),
}

impl Registry {
    /// A peer's link is up: the replica its data goes to. The same run of
    /// the same peer (its epoch) finds its copy again; a new run gets a new
    /// one, and the copy of the old run is orphaned.
    pub fn open_replica(&self, node: &str, epoch: &str, admin: &str) -> ReplicaLink {
        let mut state = self.lock();
        let now = Instant::now();
        state.replica_links += 1;
        let link = state.replica_links;
        let mut found = None;
        for (id, replica) in &mut state.replicas {
            if replica.node != node {
                continue;
            }
            if replica.epoch == epoch {
                found = Some(*id);
            } else if replica.orphaned.is_none() {
                info!(peer = node, old_epoch = %replica.epoch, new_epoch = epoch, "peer restarted; its earlier copy is orphaned");
                replica.orphaned = Some(now);
            }
        }
        if let Some(id) = found {
            let replica = state.replicas.get_mut(&id).expect("found above");
            replica.orphaned = None;
            replica.synced = false;
            replica.link = link;
            replica.admin = admin.to_owned();
            return ReplicaLink { id, link };
        }
        state.next_session += 1;
        let id = state.next_session;
        state.replicas.insert(
            id,
            Replica {
                node: node.to_owned(),
                epoch: epoch.to_owned(),
                admin: admin.to_owned(),
                orphaned: None,
                link,
                synced: false,
                summary: Summary::default(),
                providers: HashMap::new(),
                consumers: HashMap::new(),
                last_lag_ms: None,
                last_applied: None,
            },
        );
        ReplicaLink { id, link }
    }

    /// A peer's link ended: its copy is orphaned from now (unless a newer
    /// link of the peer feeds it).
    pub fn close_replica(&self, link: ReplicaLink) {
        let mut state = self.lock();
        if let Some(replica) = state.replicas.get_mut(&link.id)
            && replica.link == link.link
            && replica.orphaned.is_none()
        {
            replica.orphaned = Some(Instant::now());
            replica.synced = false;
        }
    }

    /// Replaces a peer's copy with `full`.
    ///
    /// # Errors
    ///
    /// An entry that is not valid, or names an owner other than the peer:
    /// nothing is applied.
    pub fn apply_full(&self, link: ReplicaLink, full: peer::Full) -> Result<(), RequestError> {
        let id = link.id;
        let mut entries = Vec::with_capacity(full.providers.len() + full.consumers.len());
        for p in full.providers {
            entries.push(self.checked_provider(p)?);
        }
        for c in full.consumers {
            entries.push(checked_consumer(c)?);
        }
        let mut state = self.lock();
        let replica = linked(&mut state, link)?;
        check_owner(replica, &full.owner)?;
        // What the full copy leaves out goes; the rest is claimed again.
        let mut listed_providers = std::collections::HashSet::new();
        let mut listed_consumers = std::collections::HashSet::new();
        for entry in &entries {
            match entry {
                Entry::Provider(key, instance) => {
                    listed_providers.insert((key.clone(), instance_addr(instance)));
                }
                Entry::Consumer(key, session, _) => {
                    listed_consumers.insert((key.clone(), *session));
                }
            }
        }
        let stale_providers: Vec<_> = replica
            .providers
            .keys()
            .filter(|k| !listed_providers.contains(*k))
            .cloned()
            .collect();
        let stale_consumers: Vec<_> = replica
            .consumers
            .keys()
            .filter(|k| !listed_consumers.contains(*k))
            .cloned()
            .collect();
        for (key, addr) in stale_providers {
            unclaim(&mut state, id, &key, &addr);
        }
        for (key, session) in stale_consumers {
            drop_consumer(&mut state, id, &key, session);
        }
        let changed = apply(&mut state, id, entries);
        let replica = state.replicas.get_mut(&id).expect("checked above");
        // Summed up again from what it holds now: the copy is the owner's
        // whole data, whatever was dropped from it before.
        replica.summary = summarize(replica);
        replica.summary.seq = full.seq;
        replica.summary.sessions = full.sessions;
        replica.synced = true;
        replica.last_applied = Some(Instant::now());
        debug!(peer = %replica.node, seq = full.seq, providers = replica.providers.len(), consumers = replica.consumers.len(), "peer's full copy applied");
        drop(state);
        if changed {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Applies one batch of a peer's changes; `false`: it did not follow
    /// the last one applied (something was lost: ask for a full copy).
    ///
    /// # Errors
    ///
    /// As [`Registry::apply_full`]: nothing is applied.
    pub fn apply_changes(&self, link: ReplicaLink, changes: peer::Changes) -> Result<bool, RequestError> {
        let id = link.id;
        let mut entries = Vec::with_capacity(changes.providers.len() + changes.consumers.len());
        for p in changes.providers {
            entries.push(self.checked_provider(p)?);
        }
        for c in changes.consumers {
            entries.push(checked_consumer(c)?);
        }
        let mut gone_providers = Vec::with_capacity(changes.providers_gone.len());
        for g in changes.providers_gone {
            let key = checked_key(g.service)?;
            // As the owner wrote it (`host:port`, the instance's own
            // text), so that it names the very entry it claimed.
            let addr = g
                .addr
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty() && host.len() <= 253)
                .and_then(|(host, port)| Some(Addr::new(host, port.parse::<u16>().ok()?.into())))
                .ok_or_else(|| {
                    RequestError::Invalid(format!("peer sent a removed provider with bad address {:?}", g.addr))
                })?;
            gone_providers.push((key, addr));
        }
        let mut gone_consumers = Vec::with_capacity(changes.consumers_gone.len());
        for g in changes.consumers_gone {
            gone_consumers.push((checked_key(g.service)?, g.session));
        }
        let mut state = self.lock();
        let replica = linked(&mut state, link)?;
        check_owner(replica, &changes.owner)?;
        let in_sequence = changes.seq == replica.summary.seq + 1;
        replica.summary.seq = changes.seq;
        replica.last_lag_ms = Some(super::replication::unix_ms() - changes.sent_at_ms);
        replica.last_applied = Some(Instant::now());
        let mut changed = apply(&mut state, id, entries);
        for (key, addr) in gone_providers {
            changed |= unclaim(&mut state, id, &key, &addr);
        }
        for (key, session) in gone_consumers {
            drop_consumer(&mut state, id, &key, session);
        }
        drop(state);
        if changed {
            self.changed.notify_one();
        }
        Ok(in_sequence)
    }

    /// Counts a batch as applied without applying it: the test hook that
    /// loses a replication message where only anti-entropy can see it.
    pub fn skip_changes(&self, link: ReplicaLink, seq: u64) {
        if let Ok(replica) = linked(&mut self.lock(), link) {
            replica.summary.seq = seq;
        }
    }

    /// Compares a peer's digest with its copy here; why they differ, if
    /// they do. A digest of another point in the peer's sequence than the
    /// copy's is not compared (gaps are caught by [`Registry::apply_changes`]).
    pub fn check_digest(&self, link: ReplicaLink, digest: &peer::Digest) -> Result<Option<String>, RequestError> {
        let mut state = self.lock();
        let replica = linked(&mut state, link)?;
        check_owner(replica, &digest.owner)?;
        let held = replica.summary;
        if held.seq != digest.seq {
            return Ok(None);
        }
        let mismatch =
            held.hash != digest.hash || held.providers != digest.providers || held.consumers != digest.consumers;
        Ok(mismatch.then(|| {
            format!(
                "at seq {}: {} providers and {} consumers here (hash {:016x}), {} and {} there (hash {:016x})",
                digest.seq, held.providers, held.consumers, held.hash, digest.providers, digest.consumers, digest.hash
            )
        }))
    }

    /// Whether every peer in `nodes` has a connected copy here with a full
    /// copy applied.
    pub fn synced_with(&self, node: &str) -> bool {
        self.lock()
            .replicas
            .values()
            .any(|r| r.node == node && r.orphaned.is_none() && r.synced)
    }

    /// Orphans orphaned for `grace` or longer: what each still holds alone
    /// (to be checked), after dropping their consumers and the claims
    /// others hold.
    pub fn orphans_due(&self, grace: Duration) -> Vec<(SessionId, Vec<(ServiceKey, Instance)>)> {
        let mut state = self.lock();
        let now = Instant::now();
        let due: Vec<SessionId> = state
            .replicas
            .iter()
            .filter(|(_, r)| r.orphaned.is_some_and(|at| now.duration_since(at) >= grace))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in due {
            let consumers: Vec<_> = state.replicas[&id].consumers.keys().cloned().collect();
            for (key, session) in consumers {
                drop_consumer(&mut state, id, &key, session);
            }
            let claims: Vec<_> = state.replicas[&id].providers.keys().cloned().collect();
            let mut held = Vec::new();
            for (key, addr) in claims {
                let holder = state.services.get(&key).and_then(|e| e.providers.get(&addr));
                match holder {
                    Some((instance, h)) if *h == id => held.push((key, instance.clone())),
                    // Someone else holds it: this claim is let go.
                    _ => {
                        unclaim(&mut state, id, &key, &addr);
                    }
                }
            }
            if held.is_empty() {
                let replica = state.replicas.remove(&id).expect("listed above");
                info!(peer = %replica.node, epoch = %replica.epoch, "peer's orphaned copy removed: every node re-registered elsewhere");
            } else {
                if let Some(r) = state.replicas.get_mut(&id) {
                    // Checked again a grace period later if some stay.
                    r.orphaned = Some(now);
                }
                out.push((id, held));
            }
        }
        out
    }

    /// Removes from an orphan the providers found dead; the orphan goes
    /// once it holds nothing.
    pub fn settle_orphan(&self, id: SessionId, dead: &[(ServiceKey, Addr)]) {
        let mut state = self.lock();
        if state.replicas.get(&id).is_none_or(|r| r.orphaned.is_none()) {
            // Its link came back while the probes ran: the peer's own
            // data says what is alive.
            return;
        }
        let mut changed = false;
        for (key, addr) in dead {
            changed |= unclaim(&mut state, id, key, addr);
        }
        if state
            .replicas
            .get(&id)
            .is_some_and(|r| r.providers.is_empty() && r.orphaned.is_some())
        {
            let replica = state.replicas.remove(&id).expect("checked");
            info!(peer = %replica.node, epoch = %replica.epoch, removed = dead.len(), "peer's orphaned copy removed");
        }
        drop(state);
        if changed {
            self.changed.notify_one();
        }
    }

    /// Every peer copy held, for the admin API.
    pub fn replicas(&self) -> Vec<ReplicaView> {
        let state = self.lock();
        let mut views: Vec<_> = state
            .replicas
            .values()
            .map(|r| ReplicaView {
                node: r.node.clone(),
                epoch: r.epoch.clone(),
                admin: r.admin.clone(),
                connected: r.orphaned.is_none(),
                synced: r.synced,
                orphaned_for: r.orphaned.map(|at| at.elapsed()),
                seq: r.summary.seq,
                sessions: r.summary.sessions,
                providers: r.providers.len() as u64,
                consumers: r.consumers.len() as u64,
                last_lag_ms: r.last_lag_ms,
                last_applied_ago: r.last_applied.map(|at| at.elapsed()),
            })
            .collect();
        views.sort_by(|a, b| (&a.node, &a.epoch).cmp(&(&b.node, &b.epoch)));
        views
    }

    fn checked_provider(&self, p: peer::Provider) -> Result<Entry, RequestError> {
        let key = checked_key(p.service)?;
        let instance = p
            .instance
            .ok_or_else(|| RequestError::Invalid(format!("peer sent a provider of {key} without an instance")))?;
        self.validate_instance(&key, &instance)?;
        Ok(Entry::Provider(key, instance))
    }
}

fn checked_key(key: Option<tern_proto::registry::ServiceKey>) -> Result<ServiceKey, RequestError> {
    let key =
        ServiceKey::from(&key.ok_or_else(|| RequestError::Invalid("peer sent an entry without a service".into()))?);
    key.validate().map_err(|e| RequestError::Invalid(e.to_string()))?;
    Ok(key)
}

fn checked_consumer(c: peer::Consumer) -> Result<Entry, RequestError> {
    let key = checked_key(c.service)?;
    for (field, value) in [("app", &c.app), ("host", &c.host), ("zone", &c.zone)] {
        if value.len() > MAX_FIELD {
            return Err(RequestError::TooLarge(format!(
                "peer sent a consumer of {key} whose {field} is {} bytes, more than {MAX_FIELD}",
                value.len()
            )));
        }
    }
    let node = NodeInfo {
        app: c.app,
        role: c.role,
        host: c.host,
        zone: c.zone,
        peer: None,
    };
    Ok(Entry::Consumer(key, c.session, node))
}

fn check_owner(replica: &Replica, owner: &str) -> Result<(), RequestError> {
    if owner != replica.node {
        return Err(RequestError::Forbidden(format!(
            "peer {} sent data of owner {owner:?}: a server sends only what it owns",
            replica.node
        )));
    }
    Ok(())
}

/// The copy `link` feeds, if that link still does.
fn linked(state: &mut State, link: ReplicaLink) -> Result<&mut Replica, RequestError> {
    state
        .replicas
        .get_mut(&link.id)
        .filter(|r| r.link == link.link)
        .ok_or_else(|| RequestError::NotFound("this link was replaced by a newer one of the same peer".into()))
}

/// A copy's counts and hash, from what it holds.
fn summarize(replica: &Replica) -> Summary {
    let mut summary = Summary {
        providers: replica.providers.len() as u64,
        consumers: replica.consumers.len() as u64,
        ..replica.summary
    };
    summary.hash = replica.providers.values().map(|(_, h)| *h).fold(0, |a, h| a ^ h);
    for ((key, session), node) in &replica.consumers {
        summary.hash ^= consumer_hash(key, *session, node);
    }
    summary
}

/// Claims every entry for replica `id`; whether the live map changed.
fn apply(state: &mut State, id: SessionId, entries: Vec<Entry>) -> bool {
    let mut changed = false;
    for entry in entries {
        match entry {
            Entry::Provider(key, instance) => changed |= claim(state, id, key, instance),
            Entry::Consumer(key, session, node) => {
                let hash = consumer_hash(&key, session, &node);
                let replica = state.replicas.get_mut(&id).expect("caller checked");
                let old = replica.consumers.insert((key.clone(), session), node.clone());
                let old_hash = old.as_ref().map(|o| consumer_hash(&key, session, o));
                replica.summary.hash ^= old_hash.unwrap_or(0) ^ hash;
                if old.is_none() {
                    replica.summary.consumers += 1;
                }
                state.service(&key).remote_consumers.insert((id, session), node);
            }
        }
    }
    changed
}

/// Replica `id` claims `instance`; it holds it unless one of this
/// server's sessions does. Whether the live map changed.
fn claim(state: &mut State, id: SessionId, key: ServiceKey, instance: Instance) -> bool {
    let addr = instance_addr(&instance);
    let hash = provider_hash(&key, &instance);
    let replica = state.replicas.get_mut(&id).expect("caller checked");
    let old = replica
        .providers
        .insert((key.clone(), addr.clone()), (instance.clone(), hash));
    replica.summary.hash ^= old.as_ref().map_or(0, |(_, h)| *h) ^ hash;
    if old.is_none() {
        replica.summary.providers += 1;
    }
    let holder = state
        .services
        .get(&key)
        .and_then(|e| e.providers.get(&addr))
        .map(|(held, h)| (*h, *held == instance));
    match holder {
        Some((h, _)) if state.sessions.contains_key(&h) => false,
        Some((h, true)) if h == id => false,
        _ => {
            state.put_provider(&key, addr, instance, id);
            true
        }
    }
}

/// Replica `id` no longer claims `addr`; whether the live map changed.
fn unclaim(state: &mut State, id: SessionId, key: &ServiceKey, addr: &Addr) -> bool {
    let Some(replica) = state.replicas.get_mut(&id) else {
        return false;
    };
    let Some((_, hash)) = replica.providers.remove(&(key.clone(), addr.clone())) else {
        return false;
    };
    replica.summary.hash ^= hash;
    replica.summary.providers -= 1;
    let changed = remove_provider(state, key, addr, id);
    remove_if_unused(state, key);
    changed
}

fn drop_consumer(state: &mut State, id: SessionId, key: &ServiceKey, session: u64) {
    if let Some(replica) = state.replicas.get_mut(&id)
        && let Some(old) = replica.consumers.remove(&(key.clone(), session))
    {
        replica.summary.hash ^= consumer_hash(key, session, &old);
        replica.summary.consumers -= 1;
    }
    if let Some(entry) = state.services.get_mut(key) {
        entry.remote_consumers.remove(&(id, session));
    }
    remove_if_unused(state, key);
}
