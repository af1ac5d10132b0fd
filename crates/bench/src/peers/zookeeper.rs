//! ZooKeeper as Dubbo uses it: `/dubbo/<service>/providers/<URL-encoded
//! provider URL>` ephemeral nodes of the provider's session, and
//! subscribers that re-read every child each time their watch fires.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use zookeeper_client as zk;

use super::REQUEST_LIMIT;
use crate::convergence::Observer;

/// Failure detection of the ZooKeeper sessions (see the module docs of
/// `peers`).
const ZK_SESSION_TIMEOUT: Duration = Duration::from_secs(4);

pub(super) async fn zk_connect(addr: SocketAddr) -> anyhow::Result<zk::Client> {
    let cluster = addr.to_string();
    let connect = zk::Client::connector()
        .with_session_timeout(ZK_SESSION_TIMEOUT)
        .connect(&cluster);
    Ok(tokio::time::timeout(REQUEST_LIMIT, connect)
        .await
        .with_context(|| format!("connecting to ZooKeeper at {addr}"))??)
}

pub(super) fn zk_dir(service: &str) -> String {
    format!("/dubbo/{service}/providers")
}

/// Percent-encodes everything but unreserved characters, as Dubbo's
/// `URL.encode` (Java's `URLEncoder`) does for node names.
pub(super) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `host:port` of a node name made by [`url_encode`]`(`[`provider_url`](super::provider_url)`)`.
pub(super) fn zk_node_address(node: &str) -> Option<String> {
    let rest = node.split_once("%3A%2F%2F")?.1;
    let authority = rest.split_once("%2F")?.0;
    Some(authority.replace("%3A", ":"))
}

/// A Dubbo-style subscriber: read the children with a watch, publish them,
/// wait for the watch, read again. Ends when its task is aborted or the
/// session fails.
pub(super) async fn zk_watch(
    client: zk::Client,
    dir: String,
    view: watch::Sender<Arc<BTreeSet<String>>>,
    observer: Observer,
) {
    loop {
        let (children, _, watcher) = match client.get_and_watch_children(&dir).await {
            Ok(read) => read,
            Err(e) => {
                eprintln!("zookeeper subscriber: reading {dir}: {e}");
                return;
            }
        };
        let children: Arc<BTreeSet<String>> = Arc::new(children.iter().filter_map(|c| zk_node_address(c)).collect());
        view.send_replace(children.clone());
        observer.saw(&*children);
        watcher.changed().await;
    }
}

/// Creates the persistent parents of `service`'s provider directory.
pub(super) async fn zk_prepare(addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    let client = zk_connect(addr).await?;
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    client.mkdir(&zk_dir(service), &options).await?;
    Ok(())
}
