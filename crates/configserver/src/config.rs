//! Command line, environment and TOML configuration of the binary.
//!
//! Precedence: flags, then `CONFIGSERVER_*` environment variables, then the
//! file given with `--config`, then built-in defaults. The file uses the flag
//! names, e.g.:
//!
//! ```toml
//! listen = "0.0.0.0:9600"
//! admin-listen = "127.0.0.1:9601"
//! heartbeat-interval-ms = 1000
//! heartbeat-timeout-ms = 3000
//! data-dir = "/var/lib/configserver"
//! # store = "postgres://configserver@db.internal/configserver"
//! # credentials = "/etc/configserver/credentials.toml"
//! # A cluster: every member listed (this server among them), or an address server.
//! # peers = "10.0.0.1:9600,10.0.0.2:9600,10.0.0.3:9600"
//! # advertise = "10.0.0.1:9600"
//! ```
//!
//! `configserver rules ...` instead talks to a running server's admin API
//! (see [`crate::admin_client`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::server::ConfigServerConfig;

/// The registry daemon: live service map, pushed address deltas, admin API.
#[derive(Debug, clap::Parser)]
#[command(name = "configserver", version)]
pub struct Cli {
    /// TOML file with any of the settings below (flag names as keys).
    #[arg(long, short, env = "CONFIGSERVER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Lists, reads, writes and deletes governance rules on a running server.
    Rules(crate::admin_client::RulesCli),
}

/// Every setting is optional here; unset ones come from the file or defaults.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Address nodes connect to (gRPC) [default: 0.0.0.0:9600].
    #[arg(long, env = "CONFIGSERVER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the admin HTTP API [default: 127.0.0.1:9601, this
    /// machine only].
    #[arg(long, env = "CONFIGSERVER_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// How often nodes send heartbeats [default: 1000].
    #[arg(long, env = "CONFIGSERVER_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// A node silent this long is expired [default: 3000].
    #[arg(long, env = "CONFIGSERVER_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Longest a change is held after a flush (until its pushes are out,
    /// then, while changes come fast enough to be merged, 16x as long as
    /// the pushes took); changes held together go out as one delta
    /// [default: 5].
    #[arg(long, env = "CONFIGSERVER_COALESCE_MS")]
    pub coalesce_ms: Option<u64>,
    /// Deltas kept per service for reconnecting or lagging nodes [default: 64].
    #[arg(long, env = "CONFIGSERVER_HISTORY_LEN")]
    pub history_len: Option<usize>,
    /// After a start, snapshots are partial for this long while providers
    /// re-register [default: 5000].
    #[arg(long, env = "CONFIGSERVER_STARTUP_GRACE_MS")]
    pub startup_grace_ms: Option<u64>,
    /// Largest control message accepted, in bytes [default: 1048576].
    #[arg(long, env = "CONFIGSERVER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest provider instance accepted, in bytes [default: 16384].
    #[arg(long, env = "CONFIGSERVER_MAX_INSTANCE_BYTES")]
    pub max_instance_bytes: Option<usize>,
    /// Connections the registry port holds at once; one more is closed as
    /// soon as it is accepted [default: as many as the open-file limit
    /// leaves room for, at most 100000].
    #[arg(long, env = "CONFIGSERVER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Where the default SQLite rule store lives [default: ./configserver-data].
    #[arg(long, env = "CONFIGSERVER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Rule store URL: sqlite://FILE, postgres://... or mysql://... (several
    /// servers may share one) [default: rules.db in the data dir].
    #[arg(long, env = "CONFIGSERVER_STORE")]
    pub store: Option<String>,
    /// How often the store is checked for rules other servers wrote [default: 1000].
    #[arg(long, env = "CONFIGSERVER_RULES_POLL_MS")]
    pub rules_poll_ms: Option<u64>,
    /// App credentials and admin token (TOML); access control is off without it.
    #[arg(long, env = "CONFIGSERVER_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// With credentials, let anyone read the service listings, the
    /// cluster and the metrics (by default they need the admin token).
    #[arg(long, env = "CONFIGSERVER_ADMIN_OPEN_READS", num_args = 0..=1, default_missing_value = "true")]
    pub admin_open_reads: Option<bool>,
    /// This server's member address in a cluster: its registry port as
    /// the members list names it [default: the listen address].
    #[arg(long, env = "CONFIGSERVER_ADVERTISE")]
    pub advertise: Option<String>,
    /// The cluster's members, host:port of each registry port, comma
    /// separated (this server may be among them); no peers by default.
    #[arg(long, env = "CONFIGSERVER_PEERS", value_delimiter = ',')]
    #[serde(default, deserialize_with = "comma_list")]
    pub peers: Option<Vec<String>>,
    /// Or an address server that lists the members, one host:port a line
    /// (http://host:port/path; any member's /api/cluster/servers works).
    #[arg(long, env = "CONFIGSERVER_ADDRESS_SERVER")]
    pub address_server: Option<String>,
    /// How long a gone peer's data is kept whole while its nodes move
    /// [default: the heartbeat timeout plus 5000].
    #[arg(long, env = "CONFIGSERVER_PEER_GRACE_MS")]
    pub peer_grace_ms: Option<u64>,
    /// How often peers compare digests of what they replicate [default: 2000].
    #[arg(long, env = "CONFIGSERVER_PEER_DIGEST_MS")]
    pub peer_digest_ms: Option<u64>,
    /// Longest a starting member waits for its peers' data before it is
    /// ready anyway [default: 10000].
    #[arg(long, env = "CONFIGSERVER_PEER_SYNC_TIMEOUT_MS")]
    pub peer_sync_timeout_ms: Option<u64>,
    /// TLS on every port: this server's certificate chain (PEM), reloaded
    /// with its key on SIGHUP. Plain TCP without it.
    #[arg(long, env = "CONFIGSERVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CONFIGSERVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// mTLS on the registry port: every node (and peer) must present a
    /// certificate this CA issued, whose subject CN is its app; peers'
    /// certificates are checked against it too.
    #[arg(long, env = "CONFIGSERVER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Test hook: drop this many batches received from peers unseen.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub test_drop_peer_batches: Option<usize>,
}

/// A TOML list of members: `"a:1,b:2"` or `["a:1", "b:2"]`.
fn comma_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match List::deserialize(d)? {
        List::One(s) => s
            .split(',')
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect(),
        List::Many(v) => v,
    }))
}

impl Settings {
    /// Settings from a TOML file.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or a key or value is wrong (named in the error).
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// `self` where set, else `fallback`.
    pub fn or(self, fallback: Settings) -> Settings {
        Settings {
            listen: self.listen.or(fallback.listen),
            admin_listen: self.admin_listen.or(fallback.admin_listen),
            heartbeat_interval_ms: self.heartbeat_interval_ms.or(fallback.heartbeat_interval_ms),
            heartbeat_timeout_ms: self.heartbeat_timeout_ms.or(fallback.heartbeat_timeout_ms),
            coalesce_ms: self.coalesce_ms.or(fallback.coalesce_ms),
            history_len: self.history_len.or(fallback.history_len),
            startup_grace_ms: self.startup_grace_ms.or(fallback.startup_grace_ms),
            max_message_bytes: self.max_message_bytes.or(fallback.max_message_bytes),
            max_instance_bytes: self.max_instance_bytes.or(fallback.max_instance_bytes),
            max_connections: self.max_connections.or(fallback.max_connections),
            data_dir: self.data_dir.or(fallback.data_dir),
            store: self.store.or(fallback.store),
            rules_poll_ms: self.rules_poll_ms.or(fallback.rules_poll_ms),
            credentials: self.credentials.or(fallback.credentials),
            admin_open_reads: self.admin_open_reads.or(fallback.admin_open_reads),
            advertise: self.advertise.or(fallback.advertise),
            peers: self.peers.or(fallback.peers),
            address_server: self.address_server.or(fallback.address_server),
            peer_grace_ms: self.peer_grace_ms.or(fallback.peer_grace_ms),
            peer_digest_ms: self.peer_digest_ms.or(fallback.peer_digest_ms),
            peer_sync_timeout_ms: self.peer_sync_timeout_ms.or(fallback.peer_sync_timeout_ms),
            tls_cert: self.tls_cert.or(fallback.tls_cert),
            tls_key: self.tls_key.or(fallback.tls_key),
            tls_client_ca: self.tls_client_ca.or(fallback.tls_client_ca),
            test_drop_peer_batches: self.test_drop_peer_batches.or(fallback.test_drop_peer_batches),
        }
    }

    /// The server configuration: these settings over the defaults. The
    /// store and credentials are left to [`Cli::resolve`].
    pub fn into_config(self) -> ConfigServerConfig {
        let mut config = ConfigServerConfig::default();
        let ms = Duration::from_millis;
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.admin_listen {
            config.admin_listen = v;
        }
        if let Some(v) = self.heartbeat_interval_ms {
            config.heartbeat_interval = ms(v);
        }
        if let Some(v) = self.heartbeat_timeout_ms {
            config.heartbeat_timeout = ms(v);
        }
        if let Some(v) = self.coalesce_ms {
            config.coalesce = ms(v);
        }
        if let Some(v) = self.history_len {
            config.registry.history_len = v;
        }
        if let Some(v) = self.startup_grace_ms {
            config.registry.startup_grace = ms(v);
        }
        if let Some(v) = self.max_message_bytes {
            config.max_message_bytes = v;
        }
        if let Some(v) = self.max_instance_bytes {
            config.registry.max_instance_bytes = v;
        }
        if let Some(v) = self.max_connections {
            config.max_connections = Some(v);
        }
        if let Some(v) = self.rules_poll_ms {
            config.rules_poll = ms(v.max(10));
        }
        config.admin_open_reads = self.admin_open_reads.unwrap_or(false);
        let cluster = &mut config.cluster;
        cluster.advertise = self.advertise;
        cluster.peers = self.peers.unwrap_or_default();
        cluster.address_server = self.address_server;
        cluster.grace = self.peer_grace_ms.map(ms);
        if let Some(v) = self.peer_digest_ms {
            cluster.digest_interval = ms(v.max(10));
        }
        if let Some(v) = self.peer_sync_timeout_ms {
            cluster.sync_timeout = ms(v);
        }
        cluster.drop_changes = self.test_drop_peer_batches.unwrap_or(0);
        config.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(rpc_core::net::tls::ServerTlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            // A file with one of them: ConfigServer::start names what is missing.
            (cert, key) => (cert.is_some() || key.is_some() || self.tls_client_ca.is_some()).then(|| {
                rpc_core::net::tls::ServerTlsFiles {
                    cert: cert.unwrap_or_default(),
                    key: key.unwrap_or_default(),
                    client_ca: self.tls_client_ca,
                }
            }),
        };
        config
    }
}

impl Cli {
    /// Flags and environment over the file over the defaults.
    ///
    /// # Errors
    ///
    /// A bad configuration file.
    pub fn resolve(self) -> anyhow::Result<ConfigServerConfig> {
        let file = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        let settings = self.settings.or(file);
        let (store, data_dir, credentials) = (
            settings.store.clone(),
            settings.data_dir.clone(),
            settings.credentials.clone(),
        );
        let mut config = settings.into_config();
        config.store = Some(match store {
            Some(url) => url,
            None => {
                let dir = data_dir.unwrap_or_else(|| PathBuf::from("configserver-data"));
                std::fs::create_dir_all(&dir).with_context(|| format!("creating data dir {}", dir.display()))?;
                let dir = dir
                    .canonicalize()
                    .with_context(|| format!("data dir {}", dir.display()))?;
                format!("sqlite://{}?mode=rwc", dir.join("rules.db").display())
            }
        });
        if let Some(path) = credentials {
            config.credentials = Some(crate::auth::Credentials::from_file(&path)?);
        }
        Ok(config)
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
///
/// # Errors
///
/// Bad configuration, or an address that cannot be bound.
pub fn main() -> anyhow::Result<()> {
    use clap::Parser;
    // Logs to stderr: stdout carries the ready line alone.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    run(Cli::parse())
}

/// Runs the daemon with parsed arguments until SIGINT or SIGTERM.
///
/// # Errors
///
/// Bad configuration, or an address that cannot be bound.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Rules(rules)) = cli.command {
        return crate::admin_client::run(rules);
    }
    let config = cli.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        // Handlers first: a signal right after the ready line must not kill us.
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        let mut hup = signal(SignalKind::hangup())?;
        let server = crate::ConfigServer::start(config).await?;
        println!(
            "configserver listening {} admin {}",
            server.local_addr(),
            server.admin_addr()
        );
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = hup.recv() => server.reload_tls(),
            }
        }
        tracing::info!("signal received; shutting down");
        server.shutdown().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let file: Settings =
            toml::from_str("heartbeat-interval-ms = 500\nheartbeat-timeout-ms = 2000\nhistory-len = 8").unwrap();
        let flags = Settings {
            heartbeat_timeout_ms: Some(4000),
            ..Settings::default()
        };
        let config = flags.or(file).into_config();
        assert_eq!(config.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(config.heartbeat_timeout, Duration::from_millis(4000));
        assert_eq!(config.registry.history_len, 8);
        assert_eq!(config.coalesce, ConfigServerConfig::default().coalesce);
    }

    #[test]
    fn peers_come_from_a_flag_or_a_file_as_a_list_or_comma_separated() {
        use clap::Parser;
        let cli = Cli::parse_from([
            "configserver",
            "--peers",
            "10.0.0.1:9600,10.0.0.2:9600",
            "--peer-grace-ms",
            "7000",
        ]);
        let config = cli.settings.into_config();
        assert_eq!(config.cluster.peers, ["10.0.0.1:9600", "10.0.0.2:9600"]);
        assert_eq!(config.cluster.grace, Some(Duration::from_secs(7)));
        for text in [
            "peers = \"10.0.0.1:9600, 10.0.0.2:9600\"",
            "peers = [\"10.0.0.1:9600\", \"10.0.0.2:9600\"]",
        ] {
            let file: Settings = toml::from_str(text).unwrap();
            assert_eq!(
                file.into_config().cluster.peers,
                ["10.0.0.1:9600", "10.0.0.2:9600"],
                "{text}"
            );
        }
        assert!(
            !Settings::default().into_config().cluster.enabled(),
            "a lone server by default"
        );
    }

    #[test]
    fn the_admin_api_listens_on_loopback_unless_told_otherwise() {
        let config = Settings::default().into_config();
        assert!(config.admin_listen.ip().is_loopback(), "{}", config.admin_listen);
        assert!(!config.admin_open_reads);
        use clap::Parser;
        let cli = Cli::parse_from(["configserver", "--admin-open-reads"]);
        assert!(cli.settings.into_config().admin_open_reads);
    }

    #[test]
    fn unknown_file_key_is_named() {
        let err = toml::from_str::<Settings>("heartbeat-intervl-ms = 5").unwrap_err();
        assert!(err.to_string().contains("heartbeat-intervl-ms"), "{err}");
    }
}
