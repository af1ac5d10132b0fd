//! Helpers for end-to-end tests: child processes of `tern-node` (a
//! ConfigServer or a provider), signals, a tiny HTTP GET, a cuttable TCP
//! proxy, a registry-fed consumer of demo.Greeter and a load of calls on it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use consumer_sdk::{Consumer, ConsumerConfig, Reference, ReferenceBuilder};
use rpc_core::registry::{Role, SessionConfig};
use tern_e2e::demo::{GreeterClient, HelloRequest};
pub use tern_e2e::{Process, Signal};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub mod cluster;

/// A `tern-node` child process; killed (SIGKILL) when dropped.
pub struct Node {
    pub process: Process,
    /// The words of the first line it printed.
    pub first_line: Vec<String>,
}

impl Node {
    pub fn spawn<S: AsRef<str>>(args: &[S]) -> Node {
        Node::spawn_wrapped(&[], args)
    }

    /// `tern-node args` run through `wrapper` (e.g. `ip netns exec NAME`,
    /// which execs it in place: the child's pid is tern-node's).
    pub fn spawn_wrapped<S: AsRef<str>>(wrapper: &[&str], args: &[S]) -> Node {
        let binary = env!("CARGO_BIN_EXE_tern-node");
        let (program, before) = match wrapper.split_first() {
            Some((program, rest)) => (*program, [rest, &[binary]].concat()),
            None => (binary, Vec::new()),
        };
        let mut command = Command::new(program);
        command
            .args(before)
            .args(args.iter().map(AsRef::as_ref))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
            .stderr(Stdio::inherit());
        let (process, first_line) = Process::spawn_ready(&mut command).expect("tern-node starts and prints a line");
        Node { process, first_line }
    }

    /// A ConfigServer: `(node, registry addr, admin addr)`. Its rules live
    /// in memory unless `extra` names a store or data dir.
    pub fn configserver(listen: &str, extra: &[&str]) -> (Node, SocketAddr, SocketAddr) {
        let mut args = vec!["configserver", "--listen", listen, "--admin-listen", "127.0.0.1:0"];
        if !extra.iter().any(|a| *a == "--store" || *a == "--data-dir") {
            args.extend_from_slice(&["--store", "sqlite::memory:"]);
        }
        args.extend_from_slice(extra);
        let node = Node::spawn(&args);
        // "configserver listening <addr> admin <addr>"
        let addr = node.first_line[2].parse().expect("registry address");
        let admin = node.first_line[4].parse().expect("admin address");
        (node, addr, admin)
    }

    /// A provider of demo.Echo and demo.Greeter (version 1.0.0) registered
    /// with `registry`: `(node, its address)`.
    pub fn provider(registry: SocketAddr, name: &str) -> (Node, SocketAddr) {
        Node::provider_with(registry, name, &[])
    }

    /// A provider like [`Node::provider`] with more flags (`--app`,
    /// `--zone`, `--label`, `--token`).
    pub fn provider_with(registry: SocketAddr, name: &str, extra: &[&str]) -> (Node, SocketAddr) {
        let registry = registry.to_string();
        let mut args = vec!["provider", "--registry", &registry, "--name", name];
        args.extend_from_slice(extra);
        let node = Node::spawn(&args);
        let addr = node.first_line[1].parse().expect("provider address");
        (node, addr)
    }

    /// Runs `tern-node ARGS` to its end (bounded); its exit status and stderr.
    pub fn run_to_end(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tern-node"));
        command.args(args).env("RUST_LOG", "error").stderr(Stdio::piped());
        let mut process = Process::spawn(&mut command).expect("tern-node starts");
        let mut stderr = process.take_stderr().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let status = process.wait_exit(limit).expect("tern-node ends in time");
        (status, reader.join().unwrap())
    }

    /// The next line it printed (after the first), blocking.
    pub fn next_line(&mut self) -> String {
        self.process.next_line().expect("readable stdout").expect("a line")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn signal(&self, signal: Signal) {
        self.process.signal(signal).expect("signal delivered");
    }

    /// SIGKILL and reap.
    pub fn kill_hard(&mut self) {
        self.process.kill_hard().expect("killed");
    }

    /// Waits (blocking, bounded) for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.process.wait_exit(limit).expect("process ends in time")
    }
}

/// A free loopback port (bound, then released).
/// Says loudly that (part of) a test did not run: straight to the
/// terminal, past the test harness's output capture.
pub fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0; the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    Ok(http(addr, "GET", path, "").await?.1)
}

/// One HTTP/1.0 request; `(status code, body)`.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http_with(addr, method, path, body, "").await
}

/// Like [`http`], with extra header lines (each ending in `\r\n`).
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: test\r\n{headers}Content-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Reads one counter from a Prometheus text page.
pub fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}

/// A TCP proxy to `upstream` that the test can cut (dropping every
/// connection and refusing new ones) and restore.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let (up2, gen_rx) = (up.clone(), generation.subscribe());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = gen_rx.clone();
                cut.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, up, generation }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

// === consumers and load ===

/// Bound on any single wait.
pub const LIMIT: Duration = Duration::from_secs(15);

/// A ConfigServer's flags for fast failure detection: heartbeats every
/// 500 ms, a silent session expired after 1.5 s, no startup grace.
pub const FAST_HEARTBEAT: [&str; 6] = [
    "--startup-grace-ms",
    "0",
    "--heartbeat-interval-ms",
    "500",
    "--heartbeat-timeout-ms",
    "1500",
];

/// A reference to demo.Greeter 1.0.0 fed by the ConfigServer at `registry`.
pub fn greeter(registry: SocketAddr) -> ReferenceBuilder<GreeterClient<Reference>> {
    let consumer = Consumer::new(ConsumerConfig {
        app: "test-consumer".into(),
        registry: Some(SessionConfig::new(
            [registry.to_string()],
            "test-consumer",
            Role::Consumer,
        )),
        ..ConsumerConfig::default()
    });
    consumer.reference::<GreeterClient<_>>().version("1.0.0")
}

pub fn consumer(registry: SocketAddr, retries: usize) -> GreeterClient<Reference> {
    greeter(registry)
        .timeout(Duration::from_secs(2))
        .retries(retries)
        .build()
        .unwrap()
}

pub async fn wait_for(
    client: &GreeterClient<Reference>,
    what: &str,
    ready: impl Fn(&[SocketAddr]) -> bool,
) -> Duration {
    let start = Instant::now();
    let ok = client.invoker().wait_for_providers(LIMIT, ready).await;
    assert!(
        ok,
        "timed out waiting until {what}; providers: {:?}",
        client.invoker().providers()
    );
    start.elapsed()
}

/// Calls back to back from `callers` tasks until stopped; counts calls and failures.
pub struct Load {
    calls: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Load {
    pub fn start(client: &GreeterClient<Reference>, callers: usize) -> Load {
        let (calls, failed, stop) = (Arc::default(), Arc::default(), Arc::new(AtomicBool::new(false)));
        let mut tasks = JoinSet::new();
        for _ in 0..callers {
            let (client, calls, failed, stop): (_, Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicBool>) =
                (client.clone(), Arc::clone(&calls), Arc::clone(&failed), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = client.say_hello(HelloRequest { name: "load".into() }).await {
                        eprintln!("call failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            });
        }
        Load {
            calls,
            failed,
            stop,
            tasks,
        }
    }

    /// Waits until `n` more calls have completed.
    pub async fn run_for_calls(&self, n: u64) {
        let target = self.calls.load(Ordering::Relaxed) + n;
        let start = Instant::now();
        while self.calls.load(Ordering::Relaxed) < target {
            assert!(start.elapsed() < LIMIT, "load stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        (self.calls.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

// === network partitions ===

/// Runs `ip args`; the error says which command failed and why.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e} (install iproute2)", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A network namespace joined to this one by a veth pair, with addresses of
/// its own (10.231.N.1 here, 10.231.N.2 inside); only the test's own
/// processes are on either end. Deleted, with its veth pair, when dropped,
/// whatever the outcome of the test.
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl Netns {
    pub fn create() -> Result<Netns, String> {
        Netns::remove_stale();
        // Names unique per test process; interface names stay under 16 bytes.
        let id = std::process::id();
        let subnet = id % 200 + 20;
        let netns = Netns {
            name: format!("tern-fault-{id}"),
            host_if: format!("tfh{id}"),
            ns_if: format!("tfn{id}"),
            host_ip: format!("10.231.{subnet}.1"),
            ns_ip: format!("10.231.{subnet}.2"),
        };
        ip(&["netns", "add", &netns.name])?;
        // From here on, dropping `netns` removes what was made.
        ip(&[
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &netns.ns_if,
        ])?;
        ip(&["link", "set", &netns.ns_if, "netns", &netns.name])?;
        ip(&["addr", "add", &format!("{}/24", netns.host_ip), "dev", &netns.host_if])?;
        ip(&["link", "set", &netns.host_if, "up"])?;
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        netns.exec(&["ip", "addr", "add", &format!("{}/24", netns.ns_ip), "dev", &netns.ns_if])?;
        netns.exec(&["ip", "link", "set", &netns.ns_if, "up"])?;
        Ok(netns)
    }

    /// Deletes namespaces left by test processes that died without
    /// unwinding (SIGKILL), so that a rerun starts clean.
    fn remove_stale() {
        let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(pid) = name.strip_prefix("tern-fault-") else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", name]);
                let _ = ip(&["link", "del", &format!("tfh{pid}")]);
            }
        }
    }

    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    fn exec(&self, command: &[&str]) -> Result<(), String> {
        ip(&[&["netns", "exec", &self.name][..], command].concat())
    }

    /// Takes the namespace's end of the link down (a partition: packets
    /// are dropped, nothing is refused or reset) or up again.
    pub fn set_link(&self, up: bool) {
        self.exec(&["ip", "link", "set", &self.ns_if, if up { "up" } else { "down" }])
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleaning up: {e}");
        }
        // Normally gone with the namespace; this covers a half-made one.
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
