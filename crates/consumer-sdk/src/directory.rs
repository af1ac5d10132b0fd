//! A reference's live provider list: fixed (direct mode), or following the
//! ConfigServer's pushes change by change.
//!
//! A followed directory is handed each pushed [`Update`] by the registry
//! session ([`RegistrySession::follow`]) and applies it to its members in
//! place: a removed provider's member goes, an added one gets an endpoint
//! (shared with the consumer's other references) and a connection opened
//! at once, an updated one keeps its endpoint. Nothing rebuilds or diffs
//! the whole list. Calls read the members as one `Arc`, so a change never
//! waits for a call and a call never sees half a change. Removed providers'
//! connections close once no call uses them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use rpc_core::Endpoint;
use rpc_core::ServiceKey;
use rpc_core::governance::{ConsumerIdentity, ConsumerPolicy, RuleSet};
use rpc_core::registry::Addr;
use rpc_core::registry::{Follower, RegistrySession, Update};
use tern_proto::registry::Instance;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};

use crate::Consumer;

/// Weight of a provider given without one (direct mode).
pub(crate) const DEFAULT_WEIGHT: u32 = 100;

/// Batches of new endpoints waiting to be connected; past this, a batch is
/// left to connect on its first call.
const WARM_QUEUE: usize = 16;

/// A provider in a [`Directory`]: its endpoint and what the balancer weighs.
#[derive(Debug, Clone)]
pub struct Member {
    pub endpoint: Arc<Endpoint>,
    pub weight: u32,
    /// Unix ms (0 = unknown: no warm-up).
    pub start_time_ms: i64,
    /// The registration (zone, metadata for routes); `None` in direct mode.
    pub instance: Option<Arc<Instance>>,
}

/// The members and where each one is.
#[derive(Debug, Default)]
struct Members {
    /// What calls read.
    list: Arc<Vec<Member>>,
    /// Position of each member in `list`.
    index: HashMap<SocketAddr, usize>,
}

impl Members {
    fn new(list: Vec<Member>) -> Members {
        let index = list.iter().enumerate().map(|(i, m)| (m.endpoint.addr(), i)).collect();
        Members {
            list: Arc::new(list),
            index,
        }
    }

    /// Applies a pushed change. `endpoint` makes the endpoint of a new
    /// provider (pushed onto `fresh`, to be connected); `policy` gives
    /// weight overrides.
    fn apply(
        &mut self,
        update: &Update<'_>,
        policy: &ConsumerPolicy,
        endpoint: &mut dyn FnMut(SocketAddr) -> Arc<Endpoint>,
        fresh: &mut Vec<Arc<Endpoint>>,
    ) {
        match update {
            Update::Reset(instances) => {
                let mut held: HashMap<SocketAddr, Arc<Endpoint>> = self
                    .list
                    .iter()
                    .map(|m| (m.endpoint.addr(), m.endpoint.clone()))
                    .collect();
                let mut list: Vec<Member> = Vec::with_capacity(instances.len());
                let mut index: HashMap<SocketAddr, usize> = HashMap::with_capacity(instances.len());
                for instance in *instances {
                    let Some(addr) = socket_addr(instance) else { continue };
                    // An address named twice: the later registration wins.
                    if let Some(&i) = index.get(&addr) {
                        list[i] = member(list[i].endpoint.clone(), instance, policy);
                        continue;
                    }
                    let endpoint = held.remove(&addr).unwrap_or_else(|| {
                        let e = endpoint(addr);
                        fresh.push(e.clone());
                        e
                    });
                    index.insert(addr, list.len());
                    list.push(member(endpoint, instance, policy));
                }
                *self = Members {
                    list: Arc::new(list),
                    index,
                };
            }
            Update::Change {
                added,
                updated,
                removed,
            } => {
                let list = Arc::make_mut(&mut self.list);
                for addr in *removed {
                    let Ok(addr) = addr.parse::<SocketAddr>() else { continue };
                    if let Some(i) = self.index.remove(&addr) {
                        list.swap_remove(i);
                        if let Some(moved) = list.get(i) {
                            self.index.insert(moved.endpoint.addr(), i);
                        }
                    }
                }
                for instance in added.iter().chain(*updated) {
                    let Some(addr) = socket_addr(instance) else { continue };
                    match self.index.get(&addr) {
                        Some(&i) => {
                            let endpoint = list[i].endpoint.clone();
                            list[i] = member(endpoint, instance, policy);
                        }
                        None => {
                            let e = endpoint(addr);
                            fresh.push(e.clone());
                            self.index.insert(addr, list.len());
                            list.push(member(e, instance, policy));
                        }
                    }
                }
            }
        }
    }

    /// Weights again, after the rules changed.
    fn reweigh(&mut self, policy: &ConsumerPolicy) {
        for m in Arc::make_mut(&mut self.list) {
            if let Some(instance) = &m.instance {
                m.weight = policy.weight_of(m.endpoint.addr()).unwrap_or(instance.weight);
            }
        }
    }
}

/// The member for `instance` under `policy`'s weight overrides.
fn member(endpoint: Arc<Endpoint>, instance: &Instance, policy: &ConsumerPolicy) -> Member {
    Member {
        weight: policy.weight_of(endpoint.addr()).unwrap_or(instance.weight),
        start_time_ms: instance.start_time_ms,
        instance: Some(Arc::new(instance.clone())),
        endpoint,
    }
}

/// An instance's address as a socket address; `None` (logged) for a host
/// that is not an IP address.
fn socket_addr(instance: &Instance) -> Option<SocketAddr> {
    let addr = Addr::new(&instance.host, instance.port);
    match addr.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            warn!(%addr, "provider address is not ip:port; skipped");
            None
        }
    }
}

/// The live provider list of a reference: fixed (direct mode) or following
/// the ConfigServer's pushes. Removed providers' endpoints are dropped; their
/// connections close once no call uses them.
#[derive(Debug)]
pub struct Directory {
    members: Arc<RwLock<Members>>,
    /// The service's governance rules as this consumer applies them.
    policy: Arc<RwLock<Arc<ConsumerPolicy>>>,
    /// This consumer's zone, for zone affinity.
    zone: String,
    /// Bumped on every change (for waiters).
    version: watch::Receiver<u64>,
    /// Stops the pushes when the directory goes.
    _follower: Option<Follower>,
    /// Applies rules and connects new providers; stopped when the directory goes.
    _task: Option<AbortOnDropHandle<()>>,
}

impl Directory {
    /// A fixed list of members (direct mode).
    pub(crate) fn fixed(members: Vec<Member>) -> Directory {
        let (_, version) = watch::channel(0);
        Directory {
            members: Arc::new(RwLock::new(Members::new(members))),
            policy: Arc::default(),
            zone: String::new(),
            version,
            _follower: None,
            _task: None,
        }
    }

    /// A directory that follows `key`'s providers and rules through the
    /// consumer's registry session.
    pub(crate) fn follow(consumer: &Consumer, registry: &RegistrySession, key: ServiceKey) -> Directory {
        let config = registry.config();
        let me = ConsumerIdentity {
            app: consumer.config().app.clone(),
            zone: config.zone.clone(),
            labels: config.labels.clone(),
        };
        let mut rules = registry.rules(&key);
        let policy = Arc::new(RwLock::new(Arc::new(ConsumerPolicy::new(
            &rules.borrow_and_update(),
            &me,
        ))));
        let members = Arc::new(RwLock::new(Members::default()));
        let (version_tx, version) = watch::channel(0u64);
        let version_tx = Arc::new(version_tx);
        let (warm_tx, mut warm_rx) = mpsc::channel::<Vec<Arc<Endpoint>>>(WARM_QUEUE);

        let follower = {
            let (members, policy, version_tx, key) = (members.clone(), policy.clone(), version_tx.clone(), key.clone());
            let consumer = consumer.clone();
            registry.follow(&key.clone(), move |update| {
                let mut fresh = Vec::new();
                {
                    // The policy read under the members' lock, as the rules
                    // task writes both: a rule change is never lost for a
                    // member added at the same moment.
                    let mut members = members.write().expect("directory lock");
                    let policy = policy.read().expect("policy lock").clone();
                    members.apply(update, &policy, &mut |addr| consumer.endpoint(addr), &mut fresh);
                    debug!(service = %key, providers = members.list.len(), "directory updated");
                }
                version_tx.send_modify(|v| *v += 1);
                if !fresh.is_empty() {
                    // Full: these connect on their first call instead.
                    let _ = warm_tx.try_send(fresh);
                }
            })
        };

        let zone = me.zone.clone();
        let task = {
            let (members, policy, key) = (members.clone(), policy.clone(), key.clone());
            tokio::spawn(async move {
                let mut rules_open = true;
                // Connections being opened to new providers; attempts not
                // done by the next batch are dropped with this set.
                let mut warming = JoinSet::new();
                loop {
                    tokio::select! {
                        batch = warm_rx.recv() => {
                            let Some(batch) = batch else { break };
                            warming = JoinSet::new();
                            for endpoint in batch {
                                warming.spawn(async move {
                                    let _ = endpoint.connection().await;
                                });
                            }
                        }
                        changed = rules.changed(), if rules_open => match changed {
                            Ok(()) => {
                                let set: Arc<RuleSet> = rules.borrow_and_update().clone();
                                debug!(service = %key, revision = set.revision, rules = set.rules.len(), "applying rules");
                                let next = Arc::new(ConsumerPolicy::new(&set, &me));
                                let mut members = members.write().expect("directory lock");
                                *policy.write().expect("policy lock") = next.clone();
                                members.reweigh(&next);
                                drop(members);
                                version_tx.send_modify(|v| *v += 1);
                            }
                            Err(_) => rules_open = false,
                        },
                        Some(_) = warming.join_next(), if !warming.is_empty() => {}
                    }
                }
            })
        };
        Directory {
            members,
            policy,
            zone,
            version,
            _follower: Some(follower),
            _task: Some(AbortOnDropHandle::new(task)),
        }
    }

    /// The providers now.
    pub fn members(&self) -> Arc<Vec<Member>> {
        self.members.read().expect("directory lock").list.clone()
    }

    /// The rules now, as this consumer applies them.
    pub fn policy(&self) -> Arc<ConsumerPolicy> {
        self.policy.read().expect("policy lock").clone()
    }

    /// The members a call of `method` may go to under the routing rules:
    /// condition routes that apply to this consumer, then zone affinity
    /// (in-zone providers while at least the rule's share of them is not
    /// set aside). A route that matches no provider is ignored unless it
    /// is `force`d.
    pub fn route(&self, method: &str, policy: &ConsumerPolicy) -> Arc<Vec<Member>> {
        let members = self.members();
        if !policy.narrows(method) {
            return members;
        }
        let mut chosen: Vec<Member> = members.to_vec();
        for route in policy.routes.iter().filter(|r| r.applies_to(method)) {
            let selected: Vec<Member> = chosen
                .iter()
                .filter(|m| m.instance.as_ref().is_some_and(|i| route.selects(&i.metadata)))
                .cloned()
                .collect();
            if !selected.is_empty() || route.force {
                chosen = selected;
            }
        }
        if let Some(share) = policy.zone_affinity
            && !self.zone.is_empty()
        {
            let in_zone: Vec<Member> = chosen
                .iter()
                .filter(|m| m.instance.as_ref().is_some_and(|i| i.zone == self.zone))
                .cloned()
                .collect();
            let healthy = in_zone.iter().filter(|m| !m.endpoint.is_backing_off()).count();
            if healthy > 0 && healthy as f64 >= share * in_zone.len() as f64 {
                chosen = in_zone;
            }
        }
        Arc::new(chosen)
    }

    /// Bumped on every change of the members or the rules.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.version.clone()
    }
}

#[cfg(test)]
#[path = "directory_tests.rs"]
mod tests;
