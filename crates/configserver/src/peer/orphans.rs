//! What becomes of a gone peer's copy: kept whole for the grace period
//! (its nodes reconnect to other servers and register there, taking their
//! instances over), then each provider still held only by the orphan is
//! probed with a TCP connect to its address. One that answers stays, and
//! is probed again a grace period later: the peer may be cut off from
//! this server while it and its providers live on, and a registry must
//! not drop a live provider. One that does not answer is removed.

use std::sync::Arc;
use std::time::Duration;

use rpc_core::registry::convert::instance_addr;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::info;

use super::Cluster;

/// Probes made at once.
const PROBES_AT_ONCE: usize = 32;

/// How long a probe waits for a provider to accept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks orphans a few times per grace period, until shutdown.
pub(super) async fn check(cluster: Arc<Cluster>) {
    let every = (cluster.grace() / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cluster.shutdown_token().cancelled() => return,
        }
        let registry = cluster.registry();
        for (id, held) in registry.orphans_due(cluster.grace()) {
            let total = held.len();
            let mut dead = Vec::new();
            let mut probes = JoinSet::new();
            let mut held = held.into_iter();
            loop {
                while probes.len() < PROBES_AT_ONCE
                    && let Some((key, instance)) = held.next()
                {
                    probes.spawn(async move {
                        let addr = instance_addr(&instance);
                        let alive = probe(&instance.host, instance.port).await;
                        (key, addr, alive)
                    });
                }
                let Some(probed) = probes.join_next().await else {
                    break;
                };
                if let Ok((key, addr, false)) = probed {
                    dead.push((key, addr));
                }
            }
            info!(
                replica = id,
                held = total,
                dead = dead.len(),
                "cluster: a gone peer's remaining providers probed"
            );
            registry.settle_orphan(id, &dead);
        }
    }
}

/// Whether something accepts connections at `host:port`.
async fn probe(host: &str, port: u32) -> bool {
    let Ok(port) = u16::try_from(port) else {
        return false;
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}
