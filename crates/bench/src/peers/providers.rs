//! The providers' side of `bench peers`: one provider session per system
//! kind (`ProviderSession`), registering and removing providers as that
//! system's registries do, and the one-thread runtime they all run on.

use std::sync::Arc;

use anyhow::Context;
use rpc_core::registry::RegistrySession;
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use zookeeper_client as zk;

use super::etcd::{EtcdProvider, etcd_key};
use super::zookeeper::{url_encode, zk_dir};
use super::{provider_url, tern_key};
use crate::etcd;
use crate::registry;

pub(super) enum ProviderSession {
    Tern(RegistrySession),
    Zookeeper(zk::Client),
    Etcd(EtcdProvider),
}

impl ProviderSession {
    pub(super) async fn register(&self, service: &str, port: u16) -> anyhow::Result<()> {
        match self {
            ProviderSession::Tern(session) => {
                session
                    .register(&tern_key(service), registry::instance(port.into()))
                    .await?;
            }
            ProviderSession::Zookeeper(client) => {
                let options = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
                let path = format!("{}/{}", zk_dir(service), url_encode(&provider_url(service, port)));
                client.create(&path, b"", &options).await?;
            }
            ProviderSession::Etcd(provider) => {
                let request = etcd::PutRequest {
                    key: etcd_key(service, port).into_bytes(),
                    value: provider_url(service, port).into_bytes(),
                    lease: provider.lease,
                };
                provider.kv.clone().put(request).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn unregister(&self, service: &str, port: u16) -> anyhow::Result<()> {
        match self {
            ProviderSession::Tern(session) => session.unregister(&tern_key(service), "127.0.0.1", port).await?,
            ProviderSession::Zookeeper(client) => {
                let path = format!("{}/{}", zk_dir(service), url_encode(&provider_url(service, port)));
                client.delete(&path, None).await?;
            }
            ProviderSession::Etcd(provider) => {
                let request = etcd::DeleteRangeRequest {
                    key: etcd_key(service, port).into_bytes(),
                    range_end: Vec::new(),
                };
                provider.kv.clone().delete_range(request).await?;
            }
        }
        Ok(())
    }
}

/// The runtime the providers' clients run on, one thread of its own, as
/// they would run in processes of their own: on the subscribers' runtime, a
/// storm's requests (and their acks) waited behind a hundred subscribers'
/// tasks applying its first changes, and the last was acknowledged 13-19
/// ms after the storm began (4-8 ms here). Every system's provider
/// sessions run here; a probe's request is made from the bench's task.
pub(super) struct ProvidersRuntime(Option<tokio::runtime::Runtime>);

impl ProvidersRuntime {
    pub(super) fn start() -> anyhow::Result<ProvidersRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("providers")
            .enable_all()
            .build()
            .context("starting the providers' runtime")?;
        Ok(ProvidersRuntime(Some(runtime)))
    }

    pub(super) fn handle(&self) -> &Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for ProvidersRuntime {
    fn drop(&mut self) {
        // Dropped inside the bench's own runtime, where a runtime may not
        // wait for its tasks.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// One system's provider sessions, run by the providers' runtime.
pub(super) struct Providers {
    pub(super) sessions: Arc<Vec<ProviderSession>>,
    pub(super) runtime: Handle,
}

impl Providers {
    /// The session probe `p` registers through.
    pub(super) fn for_probe(&self, p: usize) -> &ProviderSession {
        &self.sessions[p % self.sessions.len()]
    }
}

/// Registers `ports` of `service` over the providers' sessions, all at once.
pub(super) async fn register_all(providers: &Providers, service: &str, ports: &[u16]) -> anyhow::Result<()> {
    change_all(providers, service, ports, true).await
}

/// Registers (or removes) a provider on each of `ports` at once, each from a
/// task of its own on the providers' runtime.
pub(super) async fn change_all(
    providers: &Providers,
    service: &str,
    ports: &[u16],
    register: bool,
) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    for &port in ports {
        let (sessions, service) = (providers.sessions.clone(), service.to_owned());
        tasks.spawn_on(
            async move {
                // By port: a provider leaves through the session it joined on
                // (this framework's ConfigServer lets only that session remove
                // it).
                let session = &sessions[usize::from(port) % sessions.len()];
                if register {
                    session.register(&service, port).await
                } else {
                    session.unregister(&service, port).await
                }
            },
            &providers.runtime,
        );
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}
