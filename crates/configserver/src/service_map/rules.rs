//! Rule distribution: governance rules travel like address changes.
//! [`Registry::set_rules`] marks every session that provides or subscribes
//! to the service, and each session's push task sends it the current
//! [`RuleSet`] (the latest, never a backlog), redacted for consumers.

use std::collections::BTreeSet;
use std::sync::Arc;

use rpc_core::ServiceKey;
use rpc_core::governance::RuleSet;
use tern_proto::registry::{self as pb, ServerMessage, server_message};
use tracing::debug;

use super::map::{Registry, SessionId};

impl Registry {
    /// Replaces the rules of `key` (`None`: it has none) and marks every
    /// session that provides or subscribes to it.
    pub fn set_rules(&self, key: &ServiceKey, rules: Option<Arc<RuleSet>>) {
        let mut state = self.lock();
        match rules {
            Some(rules) => state.rules.insert(key.clone(), rules),
            None => state.rules.remove(key),
        };
        let Some(entry) = state.services.get(key) else {
            return;
        };
        let mut marked = 0usize;
        let owners = entry.providers.values().map(|(_, owner)| owner);
        let interested: BTreeSet<SessionId> = entry.subscribers.iter().chain(owners).copied().collect();
        for id in interested {
            if let Some(session) = state.sessions.get(&id) {
                session.push.mark_rules(key);
                marked += 1;
            }
        }
        debug!(service = %key, sessions = marked, "rules changed");
    }

    /// The rules of `key` for session `id`: all of them for a session that
    /// provides the service, without service tokens its access rules refuse
    /// for any other node.
    pub fn rules_for(&self, id: SessionId, key: &ServiceKey) -> Option<ServerMessage> {
        let (rules, provides, node) = {
            let state = self.lock();
            let session = state.sessions.get(&id)?;
            let provides = session.registered.iter().any(|(k, _)| k == key);
            (state.rules.get(key).cloned(), provides, session.node.clone())
        };
        let rules = rules.unwrap_or_default();
        let rules = if provides {
            rules
        } else {
            let ip = node
                .peer
                .map(|p| p.ip().to_canonical())
                .or_else(|| node.host.parse().ok());
            Arc::new(rules.redacted_for(&node.app, ip))
        };
        Some(ServerMessage {
            request_id: 0,
            body: Some(server_message::Body::Rules(pb::Rules {
                service: Some(key.into()),
                revision: rules.revision,
                rules_json: serde_json::to_string(&rules.rules).expect("rules serialize"),
            })),
        })
    }

    /// The rules of `key` as the registry holds them.
    pub fn rules(&self, key: &ServiceKey) -> Option<Arc<RuleSet>> {
        self.lock().rules.get(key).cloned()
    }
}
