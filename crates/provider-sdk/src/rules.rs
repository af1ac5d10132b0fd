//! The governance rules of the served services as the server checks each
//! call: compiled once per pushed revision, enforced from the last pushed
//! set while the ConfigServer is away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use rpc_core::governance::{ProviderPolicy, RuleSet};

use rpc_core::registry::RegistrySession;
use rpc_core::server::Admission;
use rpc_core::{ServiceKey, Status};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

/// The governance rules of the served services, as the server checks them.
#[derive(Debug)]
pub(crate) struct Rules {
    policies: HashMap<ServiceKey, Arc<Followed>>,
}

/// One service's pushed rules and the policy compiled from them.
#[derive(Debug)]
struct Followed {
    key: ServiceKey,
    pushed: watch::Receiver<Arc<RuleSet>>,
    compiled: RwLock<(Arc<RuleSet>, Arc<ProviderPolicy>)>,
}

impl Followed {
    /// The policy of the rules last pushed. A call never sees older rules
    /// than the session holds: the rules of a registration arrive before
    /// its ack, so a provider enforces them from its first call.
    fn current(&self) -> Arc<ProviderPolicy> {
        let set = self.pushed.borrow().clone();
        {
            let compiled = self.compiled.read().expect("policy lock");
            if Arc::ptr_eq(&compiled.0, &set) {
                return compiled.1.clone();
            }
        }
        let mut compiled = self.compiled.write().expect("policy lock");
        if !Arc::ptr_eq(&compiled.0, &set) {
            // Token buckets carry over from the previous policy.
            let next = ProviderPolicy::new(&set, Some(&compiled.1));
            info!(service = %self.key, revision = set.revision, rules = set.rules.len(), "enforcing rules");
            *compiled = (set, Arc::new(next));
        }
        compiled.1.clone()
    }
}

impl Rules {
    /// Follows the pushed rules of `keys`. Calls compile new rules when they
    /// find them; the watchers in `tasks` compile them as soon as they are
    /// pushed, and stop with `tasks`.
    pub(crate) fn follow(session: &RegistrySession, keys: &[ServiceKey], tasks: &mut JoinSet<()>) -> Rules {
        let mut policies = HashMap::new();
        for key in keys {
            let mut pushed = session.rules(key);
            let set = pushed.borrow_and_update().clone();
            let initial = Arc::new(ProviderPolicy::new(&set, None));
            let followed = Arc::new(Followed {
                key: key.clone(),
                pushed: pushed.clone(),
                compiled: RwLock::new((set, initial)),
            });
            policies.insert(key.clone(), followed.clone());
            tasks.spawn(async move {
                while pushed.changed().await.is_ok() {
                    followed.current();
                }
            });
        }
        Rules { policies }
    }
}

impl Admission for Rules {
    fn admit(
        &self,
        service: &ServiceKey,
        method: &str,
        peer: Option<SocketAddr>,
        attachments: &HashMap<String, String>,
    ) -> Result<(), Status> {
        match self.policies.get(service) {
            Some(followed) => followed.current().admit(method, peer, attachments),
            None => Ok(()),
        }
    }
}
