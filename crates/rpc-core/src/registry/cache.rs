//! The last known provider lists and rules on disk
//! ([`SessionConfig::cache_file`](super::SessionConfig::cache_file)), so a
//! node restarted while every ConfigServer is down still finds its
//! providers and keeps its rules.
//!
//! One `ProviderCache` message (registry.proto), written to a temporary
//! file and renamed over the last one, at most once per heartbeat interval
//! and when a stream ends. An unreadable or corrupt file is logged and
//! ignored: the node then starts as if it had none.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use tern_proto::registry::{self as pb, Instance, ProviderCache, Snapshot};
use tracing::{info, warn};

use super::ProviderList;
use super::convert::instance_addr;
use crate::ServiceKey;
use crate::governance::{Rule, RuleSet};

/// What a cache file holds: lists and rules by service.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Cached {
    pub(super) lists: HashMap<ServiceKey, ProviderList>,
    pub(super) rules: HashMap<ServiceKey, RuleSet>,
}

/// A pushed rule set. A rule this version does not understand (a kind added
/// by a newer server) is skipped with a warning rather than discarding the
/// whole set.
pub(super) fn parse_rules(revision: u64, json: &str) -> Result<RuleSet, serde_json::Error> {
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(json)?;
    let rules = raw
        .into_iter()
        .filter_map(|(name, value)| match serde_json::from_value::<Rule>(value) {
            Ok(rule) => Some((name, rule)),
            Err(e) => {
                warn!(rule = %name, error = %e, "skipping a rule this node does not understand");
                None
            }
        })
        .collect();
    Ok(RuleSet { revision, rules })
}

/// The cache file's bytes for these lists and rules.
pub(super) fn encode<'a>(
    lists: impl Iterator<Item = (&'a ServiceKey, &'a ProviderList)>,
    rules: impl Iterator<Item = (&'a ServiceKey, &'a RuleSet)>,
) -> Vec<u8> {
    let cache = ProviderCache {
        rules: rules
            .map(|(key, set)| pb::Rules {
                service: Some(key.into()),
                revision: set.revision,
                rules_json: serde_json::to_string(&set.rules).expect("rules serialize"),
            })
            .collect(),
        services: lists
            .map(|(key, list)| Snapshot {
                service: Some(key.into()),
                epoch: list.epoch.clone(),
                revision: list.revision,
                providers: list.providers.values().map(|i| Instance::clone(i)).collect(),
                partial: !list.complete,
            })
            .collect(),
    };
    cache.encode_to_vec()
}

/// What `bytes` (a cache file's) hold.
///
/// # Errors
///
/// The bytes are not a `ProviderCache`.
pub(super) fn decode(bytes: &[u8]) -> Result<Cached, prost::DecodeError> {
    let cache = ProviderCache::decode(bytes)?;
    let lists = cache
        .services
        .into_iter()
        .filter_map(|s| {
            let key = ServiceKey::from(s.service.as_ref()?);
            let providers = s
                .providers
                .into_iter()
                .map(|i| (instance_addr(&i), Arc::new(i)))
                .collect();
            let list = ProviderList {
                epoch: s.epoch,
                revision: s.revision,
                providers,
                complete: !s.partial,
            };
            Some((key, list))
        })
        .collect();
    let rules = cache
        .rules
        .into_iter()
        .filter_map(|r| {
            let key = ServiceKey::from(r.service.as_ref()?);
            parse_rules(r.revision, &r.rules_json).ok().map(|set| (key, set))
        })
        .collect();
    Ok(Cached { lists, rules })
}

/// Reads the cache file; nothing if there is none or it cannot be read.
pub(super) fn load(path: &Path) -> Cached {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Cached::default(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read provider cache");
            return Cached::default();
        }
    };
    match decode(&bytes) {
        Ok(cached) => {
            info!(path = %path.display(), services = cached.lists.len(), rules = cached.rules.len(), "loaded provider cache");
            cached
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "provider cache is corrupt; ignoring it");
            Cached::default()
        }
    }
}

/// Writes `bytes` as the cache file: to a temporary file of this process's
/// own (so two processes sharing a cache path never write one temporary
/// file), readable by its owner only (it holds service tokens), synced to
/// disk, then renamed over the last one, so a crash never leaves half a
/// file.
pub(super) async fn save(path: &Path, bytes: Vec<u8>) {
    let path = path.to_path_buf();
    let written = tokio::task::spawn_blocking(move || write_private(&path, &bytes).map_err(|e| (path, e))).await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err((path, e))) => warn!(path = %path.display(), error = %e, "cannot save provider cache"),
        Err(e) => warn!(error = %e, "saving the provider cache failed"),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.{:x}.tmp", std::process::id(), rand::random::<u32>()));
    let tmp = path.with_file_name(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let done = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
