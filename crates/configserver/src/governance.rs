//! Governance rules: validated writes to the durable [`RuleStore`], and the
//! registry's copy that is pushed to nodes.
//!
//! A write goes to the store first (with its audit row); the registry is
//! then brought up to the store's latest revision, which pushes every
//! changed service's rules to the sessions that provide or consume it.
//! The same reload runs on a timer, so ConfigServers sharing one store
//! (PostgreSQL or MySQL) pick up each other's writes within `poll`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rpc_core::ServiceKey;
use rpc_core::governance::{InvalidRule, Rule, RuleSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::service_map::Registry;
use crate::store::{AuditEntry, RuleStore, StoreError, StoredRule};

/// A refused or failed rule operation.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("invalid service key: {0}")]
    Service(String),
    #[error("invalid rule name {0:?}: use 1 to 128 letters, digits, '.', '_' or '-'")]
    Name(String),
    #[error("invalid rule: {0}")]
    Invalid(#[from] InvalidRule),
    #[error("no rule {name:?} for {service}")]
    NotFound { service: String, name: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The rule store plus the registry it feeds.
#[derive(Debug)]
pub struct Governance {
    store: RuleStore,
    registry: Arc<Registry>,
    /// Revision of the store last applied to the registry, and per service.
    /// Reloads take turns through this lock.
    applied: tokio::sync::Mutex<Applied>,
    /// The store revision of this server's last rule write (peers are told).
    written: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Applied {
    revision: u64,
    services: HashMap<String, u64>,
}

impl Governance {
    /// Loads every stored rule into the registry.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub async fn start(store: RuleStore, registry: Arc<Registry>) -> Result<Governance, StoreError> {
        let governance = Governance {
            store,
            registry,
            applied: tokio::sync::Mutex::default(),
            written: tokio::sync::watch::Sender::new(0),
        };
        let changed = governance.reload().await?;
        info!(services = changed, "rules loaded");
        Ok(governance)
    }

    pub fn store(&self) -> &RuleStore {
        &self.store
    }

    /// The revision of each rule write made through this server, as it is
    /// made (the cluster tells its peers).
    pub fn writes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.written.subscribe()
    }

    fn wrote(&self, revision: u64) {
        self.written.send_replace(revision);
    }

    /// Validates and stores a rule, then pushes it. A token rule without a
    /// token gets a random one. Returns the stored rule.
    ///
    /// # Errors
    ///
    /// A bad service key, name or rule (naming the field and value), or a
    /// store failure; nothing is stored then.
    pub async fn put(&self, service: &str, name: &str, json: &str, actor: &str) -> Result<StoredRule, RuleError> {
        let key = parse_key(service)?;
        check_name(name)?;
        let mut rule = Rule::from_json(json)?;
        match &mut rule {
            Rule::Token(token) if token.token.is_empty() => {
                token.token = format!("{:032x}", rand::random::<u128>());
            }
            Rule::Route(route) => {
                // A route that selects none of the providers registered now
                // would cut its consumers off (or, unforced, do nothing).
                if let Some(detail) = self.registry.detail(&key)
                    && let providers = detail.providers
                    && !providers.is_empty()
                    && !providers
                        .iter()
                        .any(|(p, _)| route.then.iter().all(|(k, v)| p.metadata.get(k) == Some(v)))
                {
                    return Err(RuleError::Invalid(InvalidRule {
                        field: "then".into(),
                        reason: format!(
                            "{:?} matches none of the {} providers of {key}",
                            route.then,
                            providers.len()
                        ),
                    }));
                }
            }
            _ => {}
        }
        let body = serde_json::to_string(&rule).expect("rules serialize");
        let key_text = key.to_string();
        if let Some(revision) = self.store.put(&key_text, name, &body, actor).await? {
            self.wrote(revision);
        }
        self.reload().await?;
        self.get(&key_text, name).await
    }

    /// Deletes a rule, then pushes the service's remaining rules.
    ///
    /// # Errors
    ///
    /// No such rule, or a store failure.
    pub async fn delete(&self, service: &str, name: &str, actor: &str) -> Result<u64, RuleError> {
        let key = parse_key(service)?;
        let key_text = key.to_string();
        match self.store.delete(&key_text, name, actor).await? {
            Some(revision) => {
                self.wrote(revision);
                self.reload().await?;
                Ok(revision)
            }
            None => Err(RuleError::NotFound {
                service: key_text,
                name: name.to_owned(),
            }),
        }
    }

    /// One stored rule.
    ///
    /// # Errors
    ///
    /// No such rule, or a store failure.
    pub async fn get(&self, service: &str, name: &str) -> Result<StoredRule, RuleError> {
        let key = parse_key(service)?.to_string();
        self.list(Some(&key))
            .await?
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(|| RuleError::NotFound {
                service: key,
                name: name.to_owned(),
            })
    }

    /// Every stored rule, or those of one service.
    ///
    /// # Errors
    ///
    /// A bad service key, or a store failure.
    pub async fn list(&self, service: Option<&str>) -> Result<Vec<StoredRule>, RuleError> {
        let key = service.map(parse_key).transpose()?.map(|k| k.to_string());
        let mut rules = self.store.all().await?;
        if let Some(key) = key {
            rules.retain(|r| r.service == key);
        }
        Ok(rules)
    }

    /// Audited changes, newest first.
    ///
    /// # Errors
    ///
    /// A bad service key, or a store failure.
    pub async fn history(
        &self,
        service: Option<&str>,
        name: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, RuleError> {
        let key = service.map(parse_key).transpose()?.map(|k| k.to_string());
        Ok(self.store.history(key.as_deref(), name, limit).await?)
    }

    /// Brings the registry up to the store's latest revision; returns how
    /// many services' rules changed.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub async fn reload(&self) -> Result<usize, StoreError> {
        let mut applied = self.applied.lock().await;
        let latest = self.store.latest_revision().await?;
        if latest == applied.revision {
            return Ok(0);
        }
        let revisions = self.store.service_revisions().await?;
        let mut by_service: BTreeMap<String, BTreeMap<String, Rule>> = BTreeMap::new();
        for stored in self.store.all().await? {
            match serde_json::from_str::<Rule>(&stored.body) {
                Ok(rule) => {
                    by_service.entry(stored.service).or_default().insert(stored.name, rule);
                }
                // Written by a newer server, or edited by hand.
                Err(e) => {
                    warn!(service = %stored.service, rule = %stored.name, error = %e, "skipping unreadable stored rule")
                }
            }
        }
        let mut changed = 0;
        for (service, revision) in revisions {
            if applied.services.get(&service) == Some(&revision) {
                continue;
            }
            let Ok(key) = service.parse::<ServiceKey>() else {
                warn!(%service, "skipping rules of an invalid service key in the store");
                continue;
            };
            let rules = by_service.remove(&service).unwrap_or_default();
            debug!(%service, revision, rules = rules.len(), "rules changed");
            let set = (!rules.is_empty()).then(|| Arc::new(RuleSet { revision, rules }));
            self.registry.set_rules(&key, set);
            applied.services.insert(service, revision);
            changed += 1;
        }
        applied.revision = latest;
        self.registry
            .metrics
            .rule_changes
            .fetch_add(changed as u64, Ordering::Relaxed);
        Ok(changed)
    }

    /// Reloads every `poll` until `shutdown`, for writes made by other
    /// ConfigServers sharing the store.
    pub async fn follow(self: Arc<Self>, poll: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.reload().await {
                warn!(error = %e, "cannot read the rule store; nodes keep the rules they have");
            }
        }
    }
}

fn parse_key(service: &str) -> Result<ServiceKey, RuleError> {
    service.parse().map_err(|e| RuleError::Service(format!("{e}")))
}

fn check_name(name: &str) -> Result<(), RuleError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RuleError::Name(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RegistryConfig;
    use crate::store::tests::stores;

    fn new_registry() -> Arc<Registry> {
        Arc::new(Registry::new(RegistryConfig::default()))
    }

    /// The same suite on every configured backend (SQLite always).
    #[tokio::test]
    async fn rules_are_validated_stored_audited_and_reloaded_on_every_backend() {
        let dir = tempdir();
        for (url, store) in stores(&dir).await {
            let registry = new_registry();
            let governance = Governance::start(store.clone(), registry.clone()).await.unwrap();
            let key: ServiceKey = "demo.Greeter:1.0".parse().unwrap();

            // Valid writes get increasing revisions and land in the registry.
            let first = governance
                .put(
                    "demo.Greeter:1.0",
                    "no-batch",
                    r#"{"kind":"access","deny_apps":["batch"]}"#,
                    "alice",
                )
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let second = governance
                .put("demo.Greeter:1.0", "limit", r#"{"kind":"qps_limit","qps":100}"#, "bob")
                .await
                .unwrap();
            assert!(second.revision > first.revision, "{url}");
            let held = registry.rules(&key).expect("rules in the registry");
            assert_eq!(held.rules.len(), 2, "{url}");
            assert_eq!(held.revision, second.revision, "{url}");

            // Bad rules are refused by field and value, and nothing is stored.
            let before = governance.history(None, None, 100).await.unwrap().len();
            for (json, named) in [
                (r#"{"kind":"qps_limit","qps":0}"#, "qps"),
                (r#"{"kind":"access","allow_ips":["300.1.1.1"]}"#, "300.1.1.1"),
                (r#"{"kind":"nope"}"#, "nope"),
                ("{not json", "malformed"),
            ] {
                let err = governance
                    .put("demo.Greeter:1.0", "bad", json, "eve")
                    .await
                    .unwrap_err();
                assert!(err.to_string().contains(named), "{url}: {err}");
            }
            let err = governance
                .put("demo Greeter", "x", r#"{"kind":"qps_limit","qps":1}"#, "eve")
                .await
                .unwrap_err();
            assert!(err.to_string().contains("demo Greeter"), "{url}: {err}");
            let err = governance
                .put("demo.Greeter:1.0", "a b", r#"{"kind":"qps_limit","qps":1}"#, "eve")
                .await
                .unwrap_err();
            assert!(err.to_string().contains("a b"), "{url}: {err}");
            assert_eq!(
                governance.history(None, None, 100).await.unwrap().len(),
                before,
                "{url}"
            );
            assert!(governance.get("demo.Greeter:1.0", "bad").await.is_err(), "{url}");

            // A token rule without a token gets one.
            let token = governance
                .put("demo.Greeter:1.0", "token", r#"{"kind":"token"}"#, "alice")
                .await
                .unwrap();
            assert!(token.body.contains("\"token\":\""), "{url}: {}", token.body);

            // Update and delete are audited with before and after.
            governance
                .put("demo.Greeter:1.0", "limit", r#"{"kind":"qps_limit","qps":50}"#, "carol")
                .await
                .unwrap();
            governance.delete("demo.Greeter:1.0", "no-batch", "dave").await.unwrap();
            let history = governance
                .history(Some("demo.Greeter:1.0"), Some("limit"), 10)
                .await
                .unwrap();
            assert_eq!(history.len(), 2, "{url}");
            assert_eq!(history[0].actor, "carol", "{url}");
            assert!(history[0].before.as_deref().unwrap().contains("100"), "{url}");
            assert!(history[0].after.as_deref().unwrap().contains("50"), "{url}");
            let deleted = &governance.history(None, Some("no-batch"), 10).await.unwrap()[0];
            assert_eq!(
                (deleted.actor.as_str(), deleted.after.as_deref()),
                ("dave", None),
                "{url}"
            );
            let err = governance
                .delete("demo.Greeter:1.0", "no-batch", "dave")
                .await
                .unwrap_err();
            assert!(matches!(err, RuleError::NotFound { .. }), "{url}: {err}");

            // A second server on the same store (another process in
            // production) sees the rules, and later writes via reload.
            let other_registry = new_registry();
            let other = Governance::start(RuleStore::open(&url).await.unwrap(), other_registry.clone())
                .await
                .unwrap();
            assert_eq!(other_registry.rules(&key).unwrap().rules.len(), 2, "{url}");
            governance.delete("demo.Greeter:1.0", "limit", "dave").await.unwrap();
            assert_eq!(other.reload().await.unwrap(), 1, "{url}");
            assert_eq!(other_registry.rules(&key).unwrap().rules.len(), 1, "{url}");
            store.close().await;
        }
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "configserver-rules-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
