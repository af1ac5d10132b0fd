//! Read-only views of the map for the admin API and metrics.

use rpc_core::ServiceKey;
use tern_proto::registry::Instance;

use super::map::{NodeInfo, Registry, SessionId, State};

/// One service's providers and consumers, each with the peer whose session
/// it is (`None`: one of this server's own).
#[derive(Debug, Clone)]
pub struct ServiceDetail {
    pub revision: u64,
    pub providers: Vec<(Instance, Option<String>)>,
    pub consumers: Vec<(NodeInfo, Option<String>)>,
}

impl Registry {
    /// `(service, revision, providers, consumers)` of every service, in
    /// the whole cluster.
    pub fn overview(&self) -> Vec<(ServiceKey, u64, usize, usize)> {
        let state = self.lock();
        let mut services: Vec<_> = state
            .services
            .iter()
            .map(|(k, e)| {
                (
                    k,
                    e.revision,
                    e.providers.len(),
                    e.consumers.len() + e.remote_consumers.len(),
                )
            })
            .filter(|(_, _, providers, consumers)| *providers > 0 || *consumers > 0)
            .map(|(k, revision, providers, consumers)| (k.clone(), revision, providers, consumers))
            .collect();
        services.sort();
        services
    }

    /// Providers and consumers of one service.
    pub fn detail(&self, key: &ServiceKey) -> Option<ServiceDetail> {
        let state = self.lock();
        let entry = state.services.get(key)?;
        let server = |id: &SessionId| peer_of(&state, *id);
        let mut consumers: Vec<_> = entry.consumers.values().map(|n| (NodeInfo::clone(n), None)).collect();
        consumers.extend(
            entry
                .remote_consumers
                .iter()
                .map(|((replica, _), n)| (n.clone(), server(replica))),
        );
        Some(ServiceDetail {
            revision: entry.revision,
            providers: entry.providers.values().map(|(i, h)| (i.clone(), server(h))).collect(),
            consumers,
        })
    }

    /// `(sessions, services, providers, subscriptions)` now.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let state = self.lock();
        let providers = state.services.values().map(|e| e.providers.len()).sum();
        let subscriptions = state.services.values().map(|e| e.subscribers.len()).sum();
        (state.sessions.len(), state.services.len(), providers, subscriptions)
    }

    /// `(sessions, providers)` of this server's own sessions.
    pub fn owned(&self) -> (usize, usize) {
        let state = self.lock();
        let providers = state.sessions.values().map(|s| s.registered.len()).sum();
        (state.sessions.len(), providers)
    }
}

/// The peer whose copy holder `id` is, if it is not a session of this server.
fn peer_of(state: &State, id: SessionId) -> Option<String> {
    state.replicas.get(&id).map(|r| r.node.clone())
}
