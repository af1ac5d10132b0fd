//! A ConfigServer cluster, with real processes: three (or two)
//! `configserver`s replicating to each other, providers and consumers
//! spread over them.
//!
//! - A provider registered on one server is seen and called by consumers
//!   on the others, both ways; the admin API names the server of each.
//! - A rule written through one server is enforced by the nodes of
//!   another at once (the store poll is an hour here).
//! - One server killed with SIGKILL under load: no call fails, no live
//!   provider is ever missing from a list a node follows, the killed
//!   server's nodes register again elsewhere.
//! - A server restarted empty says it is not ready (`/readyz` 503,
//!   naming the peer) while its peer's data cannot reach it, and is ready
//!   with that data once it can.
//! - A replication batch lost where only anti-entropy can see it (the
//!   test hook `--test-drop-peer-batches`) is repaired by the next digest.
//! - A partition between two servers: in a network namespace the test
//!   makes (one server and its providers inside, the veth link taken
//!   down; `SKIPPED` where namespaces cannot be made), each side keeps
//!   serving what it knows and changes meanwhile, and both converge to
//!   the same view when it heals; and, with the peer links cut through a
//!   proxy while every provider stays reachable, a partition longer than
//!   the grace period drops no live provider (the probe keeps it) and
//!   drops a dead one.
//! - Servers that take their members from an address server replicate;
//!   an address server that goes down does not keep a node from moving
//!   to another server when its own dies.
//! - A peer that speaks another protocol version, is not a member, or
//!   sends data of another owner: a clear error, the link closed, nothing
//!   applied.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::cluster::*;
use common::{FAST_HEARTBEAT, LIMIT, Load, Netns, Node, Proxy, free_port, http, http_get, metric};
use rpc_core::registry::{RegistrySession, Role, SessionConfig, framing};
use tern_e2e::demo::HelloRequest;
use tern_proto::peer::{self, PeerMessage, peer_message, peer_reply};
use tokio::io::AsyncWriteExt;

/// Hard limit on one whole test.
const TEST_LIMIT: Duration = Duration::from_secs(90);

async fn within<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .unwrap_or_else(|_| panic!("test still running after its limit of {TEST_LIMIT:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_on_one_server_is_called_by_consumers_on_the_others_both_ways() {
    within(async {
        let servers = cluster(3, &[]).await;
        let [a, b, c] = [&servers[0], &servers[1], &servers[2]];
        let (_p1, p1) = provider(&[a], "p1");
        for (name, on) in [("b", b), ("c", c)] {
            let client = consumer_on(&[on]);
            wait_providers(&client, &format!("a consumer on {name} has the provider on a"), &[p1]).await;
            let reply = client.say_hello(HelloRequest { name: "x".into() }).await.unwrap();
            assert_eq!(reply.served_by, "p1");
        }
        let (_p3, p3) = provider(&[c], "p3");
        let on_a = consumer_on(&[a]);
        wait_providers(&on_a, "a consumer on a has both", &[p1, p3]).await;
        // Every server lists both, each with the server it is connected to.
        let want: BTreeSet<(String, String)> =
            [(p1.to_string(), a.member.clone()), (p3.to_string(), c.member.clone())].into();
        for s in &servers {
            eventually("the admin API lists the cluster's providers", || async {
                s.greeter_providers().await == want
            })
            .await;
        }
        // Consumers too: the one on a is listed by b, served by a.
        let body = http_get(b.admin, "/api/services/demo.Greeter:1.0.0").await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let consumers = json["consumers"].as_array().unwrap();
        assert!(
            consumers.iter().any(|c| c["server"] == a.member.as_str()),
            "b does not list a's consumer: {body}"
        );
        let servers_text = http_get(a.admin, "/api/cluster/servers").await.unwrap();
        let listed: BTreeSet<&str> = servers_text.lines().collect();
        assert_eq!(listed, servers.iter().map(|s| s.member.as_str()).collect());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_written_through_one_server_is_enforced_by_the_nodes_of_another_at_once() {
    within(async {
        let dir = std::env::temp_dir().join(format!("tern-cluster-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = format!("sqlite://{}?mode=rwc", dir.join("rules.db").display());
        // The store is polled once an hour: only the peers' announcement
        // can bring the rule to b in time.
        let servers = cluster(2, &["--store", &store, "--rules-poll-ms", "3600000"]).await;
        let (a, b) = (&servers[0], &servers[1]);
        let (_p, p) = provider(&[b], "p");
        let client = consumer_on(&[b]);
        wait_providers(&client, "the consumer has the provider", &[p]).await;
        client.say_hello(HelloRequest { name: "x".into() }).await.unwrap();
        let deny = r#"{"kind": "access", "deny_apps": ["test-consumer"]}"#;
        let (status, body) = http(a.admin, "PUT", "/api/rule?service=demo.Greeter:1.0.0&name=deny", deny)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let written = Instant::now();
        let took = eventually("b's provider refuses the denied consumer", || async {
            client.say_hello(HelloRequest { name: "x".into() }).await.is_err()
        })
        .await;
        assert!(
            took < Duration::from_secs(2),
            "the rule took {took:?} (written {:?} ago)",
            written.elapsed()
        );
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_server_under_load_fails_no_call_and_loses_no_provider() {
    within(async {
        let mut servers = cluster(3, &[]).await;
        let (p1, p2);
        let (_n1, _n2);
        {
            let [a, b, c] = [&servers[0], &servers[1], &servers[2]];
            (_n1, p1) = provider(&[a, b, c], "p1");
            (_n2, p2) = provider(&[b, c, a], "p2");
        }
        let want = [p1, p2];
        let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
        let watches = [Watch::start(&[a, b, c], &want), Watch::start(&[c, a, b], &want)];
        let clients = [consumer_on(&[a, b, c]), consumer_on(&[c, a, b])];
        for client in &clients {
            wait_providers(client, "both providers", &want).await;
        }
        for w in &watches {
            eventually("each watch holds both", || async { w.holds(&want) }).await;
        }
        let loads: Vec<Load> = clients.iter().map(|c| Load::start(c, 4)).collect();
        for load in &loads {
            load.run_for_calls(200).await;
        }
        let killed_member = servers[0].member.clone();
        let killed_at = Instant::now();
        servers[0].kill();
        // The killed server's nodes connect elsewhere and register again:
        // p1 is held by a live server's session, not a's copy.
        let (b, c) = (&servers[1], &servers[2]);
        eventually("p1 registered again on b or c", || async {
            b.greeter_providers()
                .await
                .iter()
                .any(|(addr, server)| *addr == p1.to_string() && *server != killed_member)
        })
        .await;
        let rehomed = killed_at.elapsed();
        // Past the grace period, a's copy is gone from b and c.
        for s in [b, c] {
            eventually("the dead server's copy is gone", || async {
                let cluster = http_get(s.admin, "/api/cluster").await.unwrap_or_default();
                let json: serde_json::Value = serde_json::from_str(&cluster).unwrap_or_default();
                json["members"].as_array().is_some_and(|m| {
                    m.iter()
                        .filter(|m| m["node"] == killed_member.as_str())
                        .all(|m| m["copies"].as_array().is_some_and(|c| c.is_empty()))
                })
            })
            .await;
        }
        for load in &loads {
            load.run_for_calls(200).await;
        }
        for s in [b, c] {
            assert_eq!(
                s.greeter_addresses().await,
                want.iter().map(ToString::to_string).collect()
            );
        }
        let mut failed = 0;
        for load in loads {
            failed += load.finish().await.1;
        }
        assert_eq!(failed, 0, "calls failed while a server died");
        for w in &watches {
            assert!(
                w.gaps().is_empty(),
                "a live provider went missing from a list: {:?}",
                w.gaps()
            );
            assert!(w.holds(&want));
            w.session.shutdown();
        }
        eprintln!("re-registered on another server {rehomed:?} after the kill");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_empty_is_not_ready_until_it_has_its_peers_data() {
    within(async {
        // b's member address is a proxy, so that a's link to b (which
        // carries a's data) can be held back while b's own link to a works.
        let addrs = [
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        ];
        let proxy_b = Proxy::start(addrs[1]).await;
        let members = format!("{},{}", addrs[0], proxy_b.addr);
        let advertise = proxy_b.addr.to_string();
        let mut servers = vec![
            Server::start(addrs[0], flags(&members, &[])),
            Server::start(addrs[1], flags(&members, &["--advertise", &advertise])),
        ];
        for s in &servers {
            eventually("ready", || s.ready()).await;
        }
        let (_p, p) = provider(&[&servers[0]], "p");
        eventually("b lists a's provider", || async {
            servers[1].greeter_addresses().await.contains(&p.to_string())
        })
        .await;

        proxy_b.cut();
        servers[1].restart();
        let b = &servers[1];
        let (status, body) = http(b.admin, "GET", "/readyz", "").await.unwrap();
        assert_eq!(status, 503, "ready without a's data: {body}");
        assert!(
            body.contains(&addrs[0].to_string()),
            "503 does not name the peer it waits for: {body}"
        );
        assert!(!b.greeter_addresses().await.contains(&p.to_string()));

        proxy_b.restore();
        eventually("the restarted server is ready", || b.ready()).await;
        assert!(
            b.greeter_addresses().await.contains(&p.to_string()),
            "ready without its peer's providers"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replication_batch_is_repaired_by_anti_entropy() {
    within(async {
        let servers = cluster(2, &["--test-drop-peer-batches", "1"]).await;
        let (a, b) = (&servers[0], &servers[1]);
        let (_p, p) = provider(&[a], "p");
        // Its two services are registered in one batch or two: whichever
        // batch was lost, b lists both only once it is repaired.
        eventually("b lists the provider of both services", || async {
            let Ok(body) = http_get(b.admin, "/api/services").await else {
                return false;
            };
            let services: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            services
                .as_array()
                .is_some_and(|s| s.iter().filter(|s| s["providers"] == 1).count() == 2)
        })
        .await;
        let on_b = consumer_on(&[b]);
        wait_providers(&on_b, "the consumer on b has the provider despite the lost batch", &[p]).await;
        let metrics = http_get(b.admin, "/metrics").await.unwrap();
        assert!(
            metric(&metrics, "configserver_peer_repairs_total") >= 1,
            "repaired otherwise than by a digest"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_longer_than_the_grace_keeps_live_providers_drops_dead_ones_and_heals() {
    within(async {
        // Each server's member address is a proxy in front of it: cutting
        // both cuts the servers from each other, not from their nodes.
        let addrs = [
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        ];
        let proxies = [Proxy::start(addrs[0]).await, Proxy::start(addrs[1]).await];
        let members = format!("{},{}", proxies[0].addr, proxies[1].addr);
        let servers: Vec<Server> = (0..2)
            .map(|i| {
                let advertise = proxies[i].addr.to_string();
                Server::start(addrs[i], flags(&members, &["--advertise", &advertise]))
            })
            .collect();
        for s in &servers {
            eventually("ready", || s.ready()).await;
        }
        let (a, b) = (&servers[0], &servers[1]);
        let (_p1, p1) = provider(&[a], "p1");
        let (mut p2_node, p2) = provider(&[a], "p2");
        let watch_b = Watch::start(&[b], &[p1, p2]);
        eventually("b's watch has a's providers", || async { watch_b.holds(&[p1, p2]) }).await;

        for proxy in &proxies {
            proxy.cut();
        }
        // Longer than the grace period: b probes a's providers and keeps
        // the live ones. Meanwhile one provider on a stops and one starts.
        p2_node.kill_hard();
        let (_p3, p3) = provider(&[a], "p3");
        eventually("a sees the change", || async {
            a.greeter_addresses().await == [p1.to_string(), p3.to_string()].into()
        })
        .await;
        // The probe ran once the dead provider is gone from b's view.
        eventually("b has probed a's copy and dropped the dead provider", || async {
            !b.greeter_addresses().await.contains(&p2.to_string())
        })
        .await;
        assert!(
            b.greeter_addresses().await.contains(&p1.to_string()),
            "b dropped a live provider of a during the partition"
        );
        assert!(
            watch_b.gaps().iter().all(|held| held.contains(&p1.to_string())),
            "{:?}",
            watch_b.gaps()
        );

        for proxy in &proxies {
            proxy.restore();
        }
        let want: BTreeSet<String> = [p1.to_string(), p3.to_string()].into();
        for s in [a, b] {
            eventually("both sides converge", || async { s.greeter_addresses().await == want }).await;
        }
        assert_eq!(a.greeter_providers().await, b.greeter_providers().await);
        watch_b.session.shutdown();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_partition_between_two_servers_keeps_both_serving_and_heals_to_one_view() {
    // Server b and its providers in a network namespace the test makes;
    // server a and its nodes here. Taking the veth link down cuts a from b
    // while each still reaches its own nodes.
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(why) => {
            common::skipped(&format!(
                "cluster partition test: cannot make a network namespace here: {why}"
            ));
            return;
        }
    };
    within(async {
        let a_addr = SocketAddr::new(netns.host_ip.parse().unwrap(), free_port());
        let b_addr = SocketAddr::new(netns.ns_ip.parse().unwrap(), free_port());
        let members = format!("{a_addr},{b_addr}");
        // The partition stays shorter than the grace period: what a peer
        // cut off has is kept whole meanwhile.
        let a = Server::start(a_addr, flags(&members, &["--peer-grace-ms", "10000"]));
        let b_flags = flags(&members, &["--peer-grace-ms", "10000"]);
        let mut args: Vec<String> = [
            "configserver",
            "--listen",
            &b_addr.to_string(),
            "--admin-listen",
            &format!("{}:0", netns.ns_ip),
            "--store",
            "sqlite::memory:",
        ]
        .iter()
        .map(|f| f.to_string())
        .collect();
        args.extend(b_flags);
        let b_node = Node::spawn_wrapped(&netns.wrapper(), &args);
        let b = Server {
            addr: b_addr,
            admin: b_node.first_line[4].parse().unwrap(),
            member: b_addr.to_string(),
            flags: Vec::new(),
            node: Some(b_node),
        };
        for s in [&a, &b] {
            eventually("ready", || s.ready()).await;
        }
        let in_b = |name: &str| {
            let (registry, bind) = (b_addr.to_string(), format!("{}:0", netns.ns_ip));
            let node = Node::spawn_wrapped(
                &netns.wrapper(),
                &["provider", "--bind", &bind, "--registry", &registry, "--name", name],
            );
            let addr: SocketAddr = node.first_line[1].parse().unwrap();
            (node, addr)
        };
        let (_a1, a1) = provider(&[&a], "a1");
        let (_b1, b1) = in_b("b1");
        let watch_a = Watch::start(&[&a], &[a1, b1]);
        eventually("a's watch has both", || async { watch_a.holds(&[a1, b1]) }).await;
        eventually("b lists both", || async { b.greeter_addresses().await.len() == 2 }).await;

        netns.set_link(false);
        // Each side changes meanwhile.
        let (_a2, a2) = provider(&[&a], "a2");
        let (_b2, b2) = in_b("b2");
        eventually("a lists its new provider", || async {
            a.greeter_addresses().await.contains(&a2.to_string())
        })
        .await;
        // Once a has seen b's link end, it still lists b's provider.
        eventually("a sees b's link end", || async {
            let Ok(body) = http_get(a.admin, "/api/cluster").await else {
                return false;
            };
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            json["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["node"] == b_addr.to_string().as_str() && m["copies"][0]["connected"] == false)
            })
        })
        .await;
        assert!(
            a.greeter_addresses().await.contains(&b1.to_string()),
            "a dropped b's provider during the partition"
        );
        netns.set_link(true);

        let want: BTreeSet<String> = [a1, a2, b1, b2].iter().map(ToString::to_string).collect();
        for s in [&a, &b] {
            eventually("both sides converge", || async { s.greeter_addresses().await == want }).await;
        }
        assert_eq!(a.greeter_providers().await, b.greeter_providers().await);
        assert!(
            watch_a.gaps().is_empty(),
            "a live provider left a's list: {:?}",
            watch_a.gaps()
        );
        watch_a.session.shutdown();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_moves_to_another_server_while_the_address_server_is_down() {
    within(async {
        let mut servers = cluster(2, &[]).await;
        // The address server: any member's list, served here so it can go down.
        let list = http_get(servers[0].admin, "/api/cluster/servers").await.unwrap();
        assert_eq!(list.lines().count(), 2, "{list}");
        let (url, serving) = address_server(list).await;
        let mut config = SessionConfig::from_address_server(&url, "test-mover", Role::Consumer);
        config.backoff.max = Duration::from_millis(200);
        config.address_refresh = Duration::from_millis(100);
        let session = RegistrySession::start(config);
        let mut connected = session.connected();
        let first = tokio::time::timeout(LIMIT, connected.wait_for(Option::is_some))
            .await
            .expect("connected through the address server's list")
            .unwrap()
            .clone()
            .unwrap();
        serving.abort();
        let _ = serving.await;
        // `connected` names the server's epoch.
        let mut epochs = Vec::new();
        for s in &servers {
            epochs.push(s.epoch().await);
        }
        let dying = epochs
            .iter()
            .position(|e| *e == first)
            .expect("connected to one of the two");
        let other = 1 - dying;
        servers[dying].kill();
        let moved = tokio::time::timeout(
            LIMIT,
            connected.wait_for(|c| c.as_deref() == Some(epochs[other].as_str())),
        )
        .await;
        assert!(
            moved.is_ok(),
            "the node did not move to {} with the address server down",
            servers[other].addr
        );
        session.shutdown();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_take_their_members_from_an_address_server_replicate() {
    within(async {
        let addrs = [
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        ];
        let (url, _serving) = address_server(format!("# members\n{}\n{}\n", addrs[0], addrs[1])).await;
        let servers: Vec<Server> = addrs
            .iter()
            .map(|addr| {
                let mut flags: Vec<String> = FAST_HEARTBEAT
                    .iter()
                    .chain(&FAST_PEERS)
                    .map(|f| f.to_string())
                    .collect();
                flags.extend(["--address-server".to_owned(), url.clone()]);
                Server::start(*addr, flags)
            })
            .collect();
        for s in &servers {
            eventually("ready", || s.ready()).await;
        }
        let (_p, p) = provider(&[&servers[0]], "p");
        let on_b = consumer_on(&[&servers[1]]);
        wait_providers(&on_b, "a consumer on b has the provider on a", &[p]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_peer_gets_a_clear_error_and_nothing_of_it_is_applied() {
    within(async {
        // A server whose other member is the test, at an address nobody serves.
        let fake = format!("127.0.0.1:{}", free_port());
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let server = Server::start(addr, flags(&format!("{addr},{fake}"), &["--peer-sync-timeout-ms", "0"]));

        let mut old = fake_peer(addr, 0, &fake).await;
        expect_error(next_reply(&mut old).await, "version", "version 0");
        assert!(next_reply(&mut old).await.is_none(), "the link stayed open");

        let mut stranger = fake_peer(addr, 1, "127.0.0.1:1").await;
        expect_error(
            next_reply(&mut stranger).await,
            "unknown_member",
            "\"127.0.0.1:1\" is not a member",
        );
        assert!(next_reply(&mut stranger).await.is_none());

        // A member sending what another owns.
        let mut member = fake_peer(addr, 1, &fake).await;
        assert!(matches!(
            next_reply(&mut member).await,
            Some(peer_reply::Body::Welcome(_))
        ));
        let instance = tern_proto::registry::Instance {
            host: "127.0.0.1".into(),
            port: 7777,
            weight: 100,
            ..Default::default()
        };
        let full = peer::Full {
            owner: "127.0.0.1:2".into(),
            seq: 1,
            providers: vec![peer::Provider {
                service: Some((&greeter_key()).into()),
                instance: Some(instance),
                session: 1,
            }],
            ..peer::Full::default()
        };
        let mut out = BytesMut::new();
        framing::put_frame(
            &mut out,
            &PeerMessage {
                body: Some(peer_message::Body::Full(full)),
            },
        );
        member.write_all(&out).await.unwrap();
        expect_error(next_reply(&mut member).await, "not_owner", "\"127.0.0.1:2\"");
        assert!(next_reply(&mut member).await.is_none());
        assert!(
            server.greeter_addresses().await.is_empty(),
            "a refused message was applied"
        );
        // The server serves on.
        assert!(server.ready().await);
    })
    .await;
}
