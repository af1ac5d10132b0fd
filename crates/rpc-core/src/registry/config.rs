//! A node's settings for its registry session: which ConfigServers, who it
//! is, how its stream is carried.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tern_proto::registry as pb;

use crate::Backoff;

/// What this node is to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Provider,
    Consumer,
    Both,
}

impl Role {
    pub(super) fn to_pb(self) -> i32 {
        match self {
            Role::Provider => pb::Role::Provider as i32,
            Role::Consumer => pb::Role::Consumer as i32,
            Role::Both => pb::Role::Both as i32,
        }
    }
}

/// Settings of a [`RegistrySession`].
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// ConfigServer addresses (`host:port`), tried in turn.
    pub servers: Vec<String>,
    /// Or an address server that lists them, one `host:port` a line
    /// (`http://host:port/path`; any ConfigServer's
    /// `/api/cluster/servers` is one). Fetched at start and every
    /// [`SessionConfig::address_refresh`]; the session starts on a random
    /// member and keeps the last list while the address server is down.
    /// `servers`, if any, are used until the first list comes.
    pub address_server: Option<String>,
    /// How often the address server is asked again.
    pub address_refresh: Duration,
    pub app: String,
    pub role: Role,
    /// This node's host as others should reach it.
    pub host: String,
    pub zone: String,
    pub labels: HashMap<String, String>,
    pub connect_timeout: Duration,
    /// How long a register/unregister waits for the server's answer.
    pub request_timeout: Duration,
    /// Delays between reconnect attempts.
    pub backoff: Backoff,
    /// Where to keep the last known provider lists, if anywhere.
    pub cache_file: Option<PathBuf>,
    /// This app's credential, when the ConfigServer requires one.
    pub token: String,
    /// How the stream is carried (both reach the same port).
    pub transport: Transport,
    /// TLS to the ConfigServers (`None`: plain TCP), on either transport.
    /// With a client certificate, the ConfigServer takes this node's app
    /// from it when it verifies clients (mTLS).
    pub tls: Option<crate::net::ClientTls>,
}

/// How a node's control stream is carried to the ConfigServer. Both carry
/// the same messages and reach the same port; see [`framing`](super::framing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// Length-prefixed messages over TCP: a few KiB per node on the server.
    #[default]
    Native,
    /// One gRPC bidirectional stream (`tern.registry.Registry/Session`);
    /// needs the `grpc` feature.
    #[cfg(feature = "grpc")]
    Grpc,
}

impl SessionConfig {
    /// Servers from the address server at `url` (see
    /// [`SessionConfig::address_server`]).
    pub fn from_address_server(url: impl Into<String>, app: impl Into<String>, role: Role) -> SessionConfig {
        SessionConfig {
            address_server: Some(url.into()),
            ..SessionConfig::new(Vec::<String>::new(), app, role)
        }
    }

    pub fn new(
        servers: impl IntoIterator<Item = impl Into<String>>,
        app: impl Into<String>,
        role: Role,
    ) -> SessionConfig {
        SessionConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            address_server: None,
            address_refresh: Duration::from_secs(30),
            app: app.into(),
            role,
            host: "127.0.0.1".to_owned(),
            zone: String::new(),
            labels: HashMap::new(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_secs(2),
            },
            cache_file: None,
            token: String::new(),
            transport: Transport::default(),
            tls: None,
        }
    }
}
