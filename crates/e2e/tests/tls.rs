//! TLS end to end: a ConfigServer, a provider (both real processes) and a
//! consumer with mTLS; and the clients that must be turned away: one
//! without a certificate, one with a certificate from another CA, one whose
//! certificate names another app. Certificates are made fresh by each test.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{FAST_HEARTBEAT, LIMIT, Node, wait_for};
use consumer_sdk::{Consumer, ConsumerConfig, Reference};
use provider_sdk::{Provider, ProviderError};
use rpc_core::net::{ClientTls, ServerTls, ServerTlsFiles};
use rpc_core::registry::{Role, SessionConfig};
use rpc_core::{Code, Request, Status};
use tern_e2e::certs::{Ca, Issued};
use tern_e2e::demo::{Greeter, GreeterClient, GreeterServer, HelloReply, HelloRequest};

/// A directory of its own for one test's certificates.
fn cert_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-tls-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A ConfigServer with mTLS against `ca`: `(node, registry, admin)`.
fn configserver(ca: &Ca) -> (Node, std::net::SocketAddr, std::net::SocketAddr) {
    let server = ca.issue("configserver");
    let (cert, key, client_ca) = (path(&server.cert), path(&server.key), path(&ca.cert));
    let mut flags = vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &client_ca];
    flags.extend_from_slice(&FAST_HEARTBEAT);
    Node::configserver("127.0.0.1:0", &flags)
}

fn path(p: &std::path::Path) -> String {
    p.to_str().expect("UTF-8 temp path").to_owned()
}

fn consumer(registry: std::net::SocketAddr, app: &str, tls: ClientTls) -> Consumer {
    Consumer::new(
        ConsumerConfig {
            app: app.into(),
            registry: Some(SessionConfig::new([registry.to_string()], app, Role::Consumer)),
            ..ConsumerConfig::default()
        }
        .tls(tls),
    )
}

fn greeter(consumer: &Consumer) -> GreeterClient<Reference> {
    consumer
        .reference::<GreeterClient<_>>()
        .version("1.0.0")
        .timeout(Duration::from_secs(3))
        .retries(0)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configserver_provider_and_consumer_work_over_mtls_and_a_call_cannot_claim_another_app() {
    let dir = cert_dir("works");
    let ca = Ca::new(&dir, "good");
    let (_configserver, registry, admin) = configserver(&ca);

    let provider = ca.issue("greeter-app");
    let (cert, key, ca_file) = (path(&provider.cert), path(&provider.key), path(&ca.cert));
    let (_provider, provider_addr) = Node::provider_with(
        registry,
        "p1",
        &[
            "--app",
            "greeter-app",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca_file,
            "--tls-verify-clients",
        ],
    );

    // A consumer whose certificate names its app: listed, called, answered.
    let mine = ca.issue("web");
    let web = consumer(
        registry,
        "web",
        ClientTls::with_identity(&ca.cert, &mine.cert, &mine.key).unwrap(),
    );
    let client = greeter(&web);
    wait_for(&client, "the TLS provider is listed", |list| list == [provider_addr]).await;
    let reply = client
        .say_hello(HelloRequest { name: "tls".into() })
        .await
        .expect("a call over mTLS");
    assert_eq!(reply.message, "hello, tls");

    // The registry's gRPC transport goes over the same TLS.
    let grpc = rpc_core::registry::RegistrySession::start(SessionConfig {
        tls: Some(ClientTls::with_identity(&ca.cert, &mine.cert, &mine.key).unwrap()),
        transport: rpc_core::registry::Transport::Grpc,
        ..SessionConfig::new([registry.to_string()], "web", Role::Consumer)
    });
    let mut connected = grpc.connected();
    tokio::time::timeout(LIMIT, connected.wait_for(Option::is_some))
        .await
        .expect("a gRPC session over mTLS is welcomed")
        .unwrap();
    grpc.shutdown();

    // The admin port serves TLS too (no client certificate asked).
    let tls = ClientTls::new(&ca.cert).unwrap();
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut stream = tls.connect(tcp, "127.0.0.1").await.expect("admin TLS handshake");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(LIMIT, stream.read_to_string(&mut answer))
        .await
        .expect("admin answers")
        .ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A process holding a certificate for "web" that writes another app
    // name into its calls (here: its whole configuration says "checkout")
    // is refused on the data plane, whatever it claims.
    let claims_other = Consumer::new(
        ConsumerConfig {
            app: "checkout".into(),
            ..ConsumerConfig::default()
        }
        .tls(ClientTls::with_identity(&ca.cert, &mine.cert, &mine.key).unwrap()),
    );
    let direct = claims_other
        .reference::<GreeterClient<_>>()
        .version("1.0.0")
        .retries(0)
        .direct([provider_addr])
        .build()
        .unwrap();
    let refused = direct
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .expect_err("a call claiming another app than its certificate");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    assert!(
        refused.to_string().contains("\"checkout\"") && refused.to_string().contains("\"web\""),
        "names both apps: {refused}"
    );

    // And at the registry: a consumer session saying it is "checkout" with
    // web's certificate is refused, naming both.
    let session = rpc_core::registry::RegistrySession::start(SessionConfig {
        tls: Some(ClientTls::with_identity(&ca.cert, &mine.cert, &mine.key).unwrap()),
        ..SessionConfig::new([registry.to_string()], "checkout", Role::Consumer)
    });
    let why = refusal(&session).await;
    assert!(
        why.contains("certificate names app \"web\"") && why.contains("\"checkout\""),
        "{why}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits (bounded) for the session's refusal.
async fn refusal(session: &rpc_core::registry::RegistrySession) -> String {
    let mut connected = session.connected();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(why) = session.refusal() {
            return why;
        }
        // Every attempt ends in a refusal or a connection; a change of
        // `connected` or the next attempt's refusal wakes this loop.
        let woke = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                _ = connected.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        })
        .await;
        assert!(
            woke.is_ok(),
            "no refusal within {LIMIT:?}; connected: {:?}",
            *connected.borrow()
        );
        assert!(connected.borrow().is_none(), "the session was accepted");
    }
}

struct Hello;

impl Greeter for Hello {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<HelloReply, Status> {
        Ok(HelloReply {
            message: format!("hello, {}", request.get_ref().name),
            served_by: "in-process".into(),
        })
    }
}

/// Starts an in-process provider whose registry session uses `tls`; the
/// error `start` gives.
async fn provider_start_error(registry: std::net::SocketAddr, app: &str, tls: ClientTls) -> String {
    let started = Provider::builder()
        .app(app)
        .bind("127.0.0.1:0")
        .service_with(GreeterServer::new(Hello), "1.0.0", "")
        .with_registry([registry.to_string()])
        .registry_tls(tls)
        .start()
        .await;
    match started {
        Err(ProviderError::Refused { reason }) => reason,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a provider with {app}'s certificate was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_with_another_cas_or_naming_another_app_a_node_is_refused_with_a_clear_error() {
    let dir = cert_dir("refused");
    let ca = Ca::new(&dir, "good");
    let other_ca = Ca::new(&dir, "other");
    let (_configserver, registry, _) = configserver(&ca);

    let no_cert = provider_start_error(registry, "greeter-app", ClientTls::new(&ca.cert).unwrap()).await;
    assert!(
        no_cert.contains("TLS") && no_cert.contains("CertificateRequired"),
        "{no_cert}"
    );

    let foreign: Issued = other_ca.issue("greeter-app");
    let other = provider_start_error(
        registry,
        "greeter-app",
        ClientTls::with_identity(&ca.cert, &foreign.cert, &foreign.key).unwrap(),
    )
    .await;
    assert!(other.contains("TLS") && other.contains("UnknownCA"), "{other}");

    let web = ca.issue("web");
    let impostor = provider_start_error(
        registry,
        "greeter-app",
        ClientTls::with_identity(&ca.cert, &web.cert, &web.key).unwrap(),
    )
    .await;
    assert!(
        impostor.contains("certificate names app \"web\"") && impostor.contains("\"greeter-app\""),
        "{impostor}"
    );

    // A server this node's CA did not issue is refused by the node.
    let (_stranger, stranger_addr, _) = configserver(&other_ca);
    let mine = ca.issue("greeter-app");
    let stranger = provider_start_error(
        stranger_addr,
        "greeter-app",
        ClientTls::with_identity(&ca.cert, &mine.cert, &mine.key).unwrap(),
    )
    .await;
    assert!(
        stranger.contains("TLS") && stranger.contains("UnknownIssuer"),
        "{stranger}"
    );

    // The data plane: a consumer with no certificate cannot call a
    // provider that verifies clients.
    let provider_cert = ca.issue("greeter-app");
    let provider = Provider::builder()
        .app("greeter-app")
        .bind("127.0.0.1:0")
        .service_with(GreeterServer::new(Hello), "1.0.0", "")
        .tls(
            ServerTls::new(ServerTlsFiles {
                cert: provider_cert.cert.clone(),
                key: provider_cert.key.clone(),
                client_ca: Some(ca.cert.clone()),
            })
            .unwrap(),
        )
        .start()
        .await
        .unwrap();
    let anonymous = Consumer::new(ConsumerConfig::default().tls(ClientTls::new(&ca.cert).unwrap()));
    let client = anonymous
        .reference::<GreeterClient<_>>()
        .version("1.0.0")
        .retries(0)
        .direct([provider.local_addr()])
        .build()
        .unwrap();
    let failed = client
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .expect_err("no certificate, no call");
    assert!(failed.to_string().contains("CertificateRequired"), "{failed}");
    provider.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether a TLS handshake with `addr`, trusting `ca`, succeeds.
async fn handshake(addr: std::net::SocketAddr, ca: &std::path::Path) -> Result<(), String> {
    let tls = ClientTls::new(ca).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tls.connect(tcp, "127.0.0.1").await.map(drop).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_the_rules_cli_reaches_an_https_admin_port() {
    let dir = cert_dir("reload");
    let (old_ca, new_ca) = (Ca::new(&dir, "old"), Ca::new(&dir, "new"));
    let (live_cert, live_key) = (dir.join("live.crt"), dir.join("live.key"));
    let install = |issued: &Issued| {
        std::fs::copy(&issued.cert, &live_cert).unwrap();
        std::fs::copy(&issued.key, &live_key).unwrap();
    };
    install(&old_ca.issue("configserver"));
    let (cert, key) = (path(&live_cert), path(&live_key));
    let (node, registry, admin) = Node::configserver("127.0.0.1:0", &["--tls-cert", &cert, "--tls-key", &key]);
    handshake(registry, &old_ca.cert).await.expect("the first certificate");
    let refused = handshake(registry, &new_ca.cert)
        .await
        .expect_err("not yet the new one");
    assert!(refused.contains("UnknownIssuer"), "{refused}");

    install(&new_ca.issue("configserver"));
    node.signal(tern_e2e::Signal::HUP);
    // The reload runs on the server's signal task: new handshakes switch
    // over once it has run (bounded wait).
    let deadline = tokio::time::Instant::now() + LIMIT;
    while handshake(registry, &new_ca.cert).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is not served after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        handshake(registry, &old_ca.cert).await.is_err(),
        "the old certificate is gone"
    );
    assert!(
        handshake(admin, &new_ca.cert).await.is_ok(),
        "the admin port reloads too"
    );

    // The rules CLI over https, with the CA of the admin port's certificate.
    let url = format!("https://127.0.0.1:{}", admin.port());
    let ca = path(&new_ca.cert);
    let (status, stderr) = Node::run_to_end(
        &["configserver", "rules", "--admin", &url, "--admin-ca", &ca, "list"],
        LIMIT,
    );
    assert!(status.success(), "rules list over https: {stderr}");
    let (status, stderr) = Node::run_to_end(&["configserver", "rules", "--admin", &url, "list"], LIMIT);
    assert!(!status.success() && stderr.contains("--admin-ca"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
