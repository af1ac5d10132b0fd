//! A ConfigServer cluster for the end-to-end tests: servers as child
//! processes on fixed loopback ports, their nodes, a follower that records
//! every moment a provider was missing from its list, a fake address
//! server and a fake peer.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use consumer_sdk::Reference;
use prost::Message;
use rpc_core::ServiceKey;
use rpc_core::registry::{RegistrySession, Role, SessionConfig, Update, framing};
use tern_e2e::demo::GreeterClient;
use tern_proto::peer::{self, PeerMessage, PeerReply, peer_message, peer_reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{FAST_HEARTBEAT, LIMIT, Node, free_port, http, http_get};

/// Peer settings that make the tests quick: digests every 200 ms, a gone
/// peer's data kept whole for 2 s.
pub const FAST_PEERS: [&str; 4] = ["--peer-digest-ms", "200", "--peer-grace-ms", "2000"];

/// Polls `check` every 20 ms until it holds, at most [`LIMIT`].
pub async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) -> Duration {
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < LIMIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One ConfigServer of a test cluster.
pub struct Server {
    pub node: Option<Node>,
    /// Its registry port, where nodes connect.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Its member address (the registry port, or a proxy in front of it).
    pub member: String,
    pub flags: Vec<String>,
}

impl Server {
    pub fn start(addr: SocketAddr, flags: Vec<String>) -> Server {
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (node, started, admin) = Node::configserver(&addr.to_string(), &args);
        assert_eq!(started, addr);
        let member = flags
            .iter()
            .position(|f| f == "--advertise")
            .map_or_else(|| addr.to_string(), |at| flags[at + 1].clone());
        Server {
            node: Some(node),
            addr,
            admin,
            member,
            flags,
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut node) = self.node.take() {
            node.kill_hard();
        }
    }

    /// Starts it again, empty, on the same ports and flags (a new admin port).
    pub fn restart(&mut self) {
        self.kill();
        let again = Server::start(self.addr, self.flags.clone());
        *self = again;
    }

    pub async fn ready(&self) -> bool {
        matches!(http(self.admin, "GET", "/readyz", "").await, Ok((200, _)))
    }

    /// `(address, server)` of each provider of demo.Greeter 1.0.0 it lists.
    pub async fn greeter_providers(&self) -> BTreeSet<(String, String)> {
        let Ok((200, body)) = http(self.admin, "GET", "/api/services/demo.Greeter:1.0.0", "").await else {
            return BTreeSet::new();
        };
        let json: serde_json::Value = serde_json::from_str(&body).expect("service JSON");
        json["providers"]
            .as_array()
            .expect("providers")
            .iter()
            .map(|p| {
                (
                    p["address"].as_str().unwrap().to_owned(),
                    p["server"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Its epoch, from `/api/cluster`.
    pub async fn epoch(&self) -> String {
        let body = http_get(self.admin, "/api/cluster").await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["members"][0]["epoch"]
            .as_str()
            .expect("this server's epoch")
            .to_owned()
    }

    pub async fn greeter_addresses(&self) -> BTreeSet<String> {
        self.greeter_providers().await.into_iter().map(|(a, _)| a).collect()
    }
}

/// `n` ConfigServers on fixed loopback ports, each listing all as peers,
/// with fast heartbeats and `extra` flags; ready.
pub async fn cluster(n: usize, extra: &[&str]) -> Vec<Server> {
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let members = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let servers: Vec<Server> = addrs
        .iter()
        .map(|addr| Server::start(*addr, flags(&members, extra)))
        .collect();
    for s in &servers {
        eventually("every server is ready", || s.ready()).await;
    }
    servers
}

pub fn flags(members: &str, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = FAST_HEARTBEAT.iter().map(|f| f.to_string()).collect();
    // FAST_PEERS, unless `extra` sets one of them itself.
    for pair in FAST_PEERS.chunks(2) {
        if !extra.contains(&pair[0]) {
            flags.extend(pair.iter().map(|f| f.to_string()));
        }
    }
    flags.extend(["--peers".to_owned(), members.to_owned()]);
    flags.extend(extra.iter().map(|f| f.to_string()));
    flags
}

/// A provider process of demo.Greeter on `servers` (its first, then the rest).
pub fn provider(servers: &[&Server], name: &str) -> (Node, SocketAddr) {
    let list = servers.iter().map(|s| s.addr.to_string()).collect::<Vec<_>>().join(",");
    let node = Node::spawn(&["provider", "--registry", &list, "--name", name]);
    let addr = node.first_line[1].parse().expect("provider address");
    (node, addr)
}

/// A consumer of demo.Greeter whose session goes to `servers` in turn.
pub fn consumer_on(servers: &[&Server]) -> GreeterClient<Reference> {
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let consumer = consumer_sdk::Consumer::new(consumer_sdk::ConsumerConfig::with_registry("test-consumer", addrs));
    consumer
        .reference::<GreeterClient<_>>()
        .version("1.0.0")
        .timeout(Duration::from_secs(2))
        .retries(2)
        .build()
        .unwrap()
}

pub async fn wait_providers(client: &GreeterClient<Reference>, what: &str, want: &[SocketAddr]) {
    let ok = client
        .invoker()
        .wait_for_providers(LIMIT, |p| want.iter().all(|w| p.contains(w)))
        .await;
    assert!(
        ok,
        "timed out waiting until {what}; providers: {:?}",
        client.invoker().providers()
    );
}

pub fn greeter_key() -> ServiceKey {
    ServiceKey::new("demo.Greeter", "1.0.0", "")
}

/// A session following demo.Greeter on `servers` that records, after every
/// change once `want` were all seen, any moment one of them was missing.
pub struct Watch {
    pub session: RegistrySession,
    pub _follower: rpc_core::registry::Follower,
    pub seen: Arc<Mutex<BTreeSet<String>>>,
    pub missing: Arc<Mutex<Vec<BTreeSet<String>>>>,
}

impl Watch {
    pub fn start(servers: &[&Server], want: &[SocketAddr]) -> Watch {
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
        let mut config = SessionConfig::new(addrs, "test-watch", Role::Consumer);
        config.backoff.max = Duration::from_millis(200);
        let session = RegistrySession::start(config);
        let want: BTreeSet<String> = want.iter().map(ToString::to_string).collect();
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let missing = Arc::new(Mutex::new(Vec::new()));
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (held, gaps) = (seen.clone(), missing.clone());
        let follower = session.follow(&greeter_key(), move |update| {
            let mut held = held.lock().unwrap();
            match update {
                Update::Reset(list) => {
                    *held = list.iter().map(|i| format!("{}:{}", i.host, i.port)).collect();
                }
                Update::Change {
                    added,
                    updated,
                    removed,
                } => {
                    for i in added.iter().chain(updated.iter()) {
                        held.insert(format!("{}:{}", i.host, i.port));
                    }
                    for r in *removed {
                        held.remove(*r);
                    }
                }
            }
            let all = want.is_subset(&held);
            if all {
                armed.store(true, std::sync::atomic::Ordering::SeqCst);
            } else if armed.load(std::sync::atomic::Ordering::SeqCst) {
                gaps.lock().unwrap().push(held.clone());
            }
        });
        Watch {
            session,
            _follower: follower,
            seen,
            missing,
        }
    }

    pub fn holds(&self, want: &[SocketAddr]) -> bool {
        let seen = self.seen.lock().unwrap();
        want.iter().all(|w| seen.contains(&w.to_string()))
    }

    pub fn gaps(&self) -> Vec<BTreeSet<String>> {
        self.missing.lock().unwrap().clone()
    }
}

/// An address server answering `list` to every GET: its URL, and the task
/// serving it (abort it to take the address server down).
pub async fn address_server(list: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/servers", listener.local_addr().unwrap());
    let serving = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{list}", list.len());
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    (url, serving)
}

/// Opens a peer link to `server` as `node`: `(reader, writer)` after Hello.
pub async fn fake_peer(server: SocketAddr, version: u32, node: &str) -> TcpStream {
    let mut socket = TcpStream::connect(server).await.unwrap();
    let mut out = BytesMut::new();
    out.extend_from_slice(&[0xC7, b'T', b'P', 1]);
    let hello = peer::Hello {
        protocol_version: version,
        node: node.into(),
        epoch: "fake".into(),
        ..peer::Hello::default()
    };
    framing::put_frame(
        &mut out,
        &PeerMessage {
            body: Some(peer_message::Body::Hello(hello)),
        },
    );
    socket.write_all(&out).await.unwrap();
    socket
}

/// The next reply on a peer link; `None` once it is closed.
pub async fn next_reply(socket: &mut TcpStream) -> Option<peer_reply::Body> {
    let mut len = [0u8; 4];
    tokio::time::timeout(LIMIT, socket.read_exact(&mut len))
        .await
        .unwrap()
        .ok()?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    socket.read_exact(&mut body).await.ok()?;
    PeerReply::decode(body.as_slice()).unwrap().body
}

pub fn expect_error(reply: Option<peer_reply::Body>, kind: &str, text: &str) {
    match reply {
        Some(peer_reply::Body::Error(e)) => {
            assert_eq!(e.kind, kind, "{}", e.message);
            assert!(e.message.contains(text), "{:?} does not name {text:?}", e.message);
        }
        other => panic!("expected a {kind} error, got {other:?}"),
    }
}
