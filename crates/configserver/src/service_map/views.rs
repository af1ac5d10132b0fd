//! Read-only views of the map for the admin API and metrics.

use rpc_core::ServiceKey;
use tern_proto::registry::Instance;

use super::map::{NodeInfo, Registry};

impl Registry {
    /// `(service, revision, providers, consumers)` of every service.
    pub fn overview(&self) -> Vec<(ServiceKey, u64, usize, usize)> {
        let state = self.lock();
        let mut services: Vec<_> = state
            .services
            .iter()
            .filter(|(_, e)| !e.providers.is_empty() || !e.consumers.is_empty())
            .map(|(k, e)| (k.clone(), e.revision, e.providers.len(), e.consumers.len()))
            .collect();
        services.sort();
        services
    }

    /// Providers and consumers of one service.
    pub fn detail(&self, key: &ServiceKey) -> Option<(u64, Vec<Instance>, Vec<NodeInfo>)> {
        let state = self.lock();
        let entry = state.services.get(key)?;
        Some((
            entry.revision,
            entry.providers.values().map(|(i, _)| i.clone()).collect(),
            entry.consumers.values().cloned().collect(),
        ))
    }

    /// `(sessions, services, providers, subscriptions)` now.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let state = self.lock();
        let providers = state.services.values().map(|e| e.providers.len()).sum();
        let subscriptions = state.services.values().map(|e| e.subscribers.len()).sum();
        (state.sessions.len(), state.services.len(), providers, subscriptions)
    }
}
