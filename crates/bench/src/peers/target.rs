//! A running system to measure (`Target`): this framework's ConfigServer
//! in a child process, or a peer `peers.sh` started, found by its pid file;
//! each system's provider sessions and subscribers are opened from here.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rpc_core::registry::{Addr, Follower, RegistrySession, Role};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::etcd::{EtcdProvider, etcd_channel, etcd_read, etcd_watch};
use super::providers::{ProviderSession, Providers};
use super::zookeeper::{zk_connect, zk_dir, zk_watch};
use super::{PeersArgs, System, tern_key};
use crate::convergence::{Arrivals, follow};
use crate::registry::{self, Server};

/// A running registry to measure: its address and server process.
pub(super) enum Target {
    Tern(Server),
    Zookeeper { addr: SocketAddr, pid: u32 },
    Etcd { addr: SocketAddr, pid: u32 },
}

impl Target {
    pub(super) async fn prepare(system: System, args: &PeersArgs) -> anyhow::Result<Target> {
        let not_running = |what: &str| {
            format!(
                "{what} is not running (looked for its pid under {}): start the peers with `crates/bench/peers.sh start` (it installs Debian's zookeeper and etcd-server if missing), or leave it out with --systems",
                args.peers_dir.display()
            )
        };
        Ok(match system {
            System::Tern => {
                let extra: Vec<String> = match args.coalesce_ms {
                    Some(ms) => vec!["--coalesce-ms".into(), ms.to_string()],
                    None => Vec::new(),
                };
                Target::Tern(Server::start_with(&extra)?)
            }
            System::Zookeeper => {
                let pid = peer_pid(&args.peers_dir, "zookeeper").with_context(|| not_running("ZooKeeper"))?;
                zk_connect(args.zookeeper)
                    .await
                    .with_context(|| not_running(&format!("ZooKeeper at {}", args.zookeeper)))?;
                Target::Zookeeper {
                    addr: args.zookeeper,
                    pid,
                }
            }
            System::Etcd => {
                let pid = peer_pid(&args.peers_dir, "etcd").with_context(|| not_running("etcd"))?;
                etcd_channel(args.etcd)
                    .await
                    .with_context(|| not_running(&format!("etcd at {}", args.etcd)))?;
                Target::Etcd { addr: args.etcd, pid }
            }
        })
    }

    pub(super) fn pid(&self) -> u32 {
        match self {
            Target::Tern(server) => server.pid(),
            Target::Zookeeper { pid, .. } | Target::Etcd { pid, .. } => *pid,
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Target::Tern(server) => server.addr,
            Target::Zookeeper { addr, .. } | Target::Etcd { addr, .. } => *addr,
        }
    }

    pub(super) fn port(&self) -> u16 {
        self.addr().port()
    }

    /// `n` provider sessions of `system` (this target's), opened on (and
    /// run by) `runtime`.
    pub(super) async fn providers(&self, system: System, n: usize, runtime: &Handle) -> anyhow::Result<Providers> {
        let addr = self.addr();
        let mut sessions = Vec::new();
        for i in 0..n.max(1) {
            let session = runtime.spawn(async move {
                anyhow::Ok(match system {
                    System::Tern => {
                        let session = registry::session(addr, &format!("provider-{i}"), Role::Provider);
                        registry::connected(std::slice::from_ref(&session)).await?;
                        ProviderSession::Tern(session)
                    }
                    System::Zookeeper => ProviderSession::Zookeeper(zk_connect(addr).await?),
                    System::Etcd => ProviderSession::Etcd(EtcdProvider::start(addr).await?),
                })
            });
            sessions.push(session.await??);
        }
        Ok(Providers {
            sessions: Arc::new(sessions),
            runtime: runtime.clone(),
        })
    }

    /// `n` subscribers of `service`, each with its own connection and an
    /// observer from `arrivals`. Their first lists may still be on their
    /// way: the goal of holding them is timed next.
    pub(super) async fn subscribers(
        &self,
        service: &str,
        n: usize,
        arrivals: &mut Arrivals,
    ) -> anyhow::Result<Subscribers> {
        let mut subs = Subscribers::default();
        match self {
            Target::Tern(server) => {
                let sessions: Vec<_> = (0..n)
                    .map(|i| registry::session(server.addr, &format!("consumer-{i}"), Role::Consumer))
                    .collect();
                registry::connected(&sessions).await?;
                let key = tern_key(service);
                for session in &sessions {
                    let (follower, view) = follow(session, &key, arrivals.observer());
                    subs.followers.push(follower);
                    subs.tern.push(view);
                }
                subs.sessions = sessions;
            }
            Target::Zookeeper { addr, .. } => {
                for _ in 0..n {
                    let client = zk_connect(*addr).await?;
                    let (tx, rx) = watch::channel(Arc::new(BTreeSet::new()));
                    subs.tasks
                        .spawn(zk_watch(client, zk_dir(service), tx, arrivals.observer()));
                    subs.sets.push(rx);
                }
            }
            Target::Etcd { addr, .. } => {
                for _ in 0..n {
                    let channel = etcd_channel(*addr).await?;
                    let (tx, rx) = watch::channel(Arc::new(BTreeSet::new()));
                    let first = etcd_read(&channel, service).await?;
                    subs.tasks
                        .spawn(etcd_watch(channel, service.to_owned(), first, tx, arrivals.observer()));
                    subs.sets.push(rx);
                }
            }
        }
        Ok(subs)
    }
}

/// The pid `peers.sh` wrote for `name`, if that process is alive.
fn peer_pid(dir: &Path, name: &str) -> anyhow::Result<u32> {
    let file = dir.join(name).join("pid");
    let pid: u32 = std::fs::read_to_string(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", file.display()))?;
    anyhow::ensure!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "{name} (pid {pid} from {}) has exited",
        file.display()
    );
    Ok(pid)
}

/// Subscribers of one system and their current views.
#[derive(Default)]
pub(super) struct Subscribers {
    sessions: Vec<RegistrySession>,
    tern: Vec<watch::Receiver<Arc<BTreeSet<Addr>>>>,
    /// Keep the tern subscribers' lists followed.
    followers: Vec<Follower>,
    sets: Vec<watch::Receiver<Arc<BTreeSet<String>>>>,
    /// The peers' watch loops; aborted when dropped.
    tasks: JoinSet<()>,
}

impl Subscribers {
    pub(super) fn len(&self) -> usize {
        self.tern.len() + self.sets.len()
    }

    /// Sets `goal`, runs `act`, and returns when each subscriber reached it.
    pub(super) async fn time_each(
        &self,
        arrivals: &Arrivals,
        goal: u64,
        act: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Vec<Duration>> {
        if self.tern.is_empty() {
            arrivals.time_each(goal, &self.sets, act).await
        } else {
            arrivals.time_each(goal, &self.tern, act).await
        }
    }

    pub(super) async fn time(
        &self,
        arrivals: &Arrivals,
        goal: u64,
        act: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Duration> {
        let each = self.time_each(arrivals, goal, act).await?;
        Ok(each.last().copied().unwrap_or_default())
    }
}
