//! Replication between two registries, without sockets: what one server's
//! sessions own reaches the other's map through full copies and batches,
//! digests find a lost batch, the node's own session wins over a peer's
//! copy, another owner's data is refused whole, and an orphan's dead
//! providers go.

use std::time::Duration;

use prost::Message;
use rpc_core::ServiceKey;
use rpc_core::registry::Addr;
use tern_proto::peer::{self, PeerMessage, peer_message};
use tern_proto::registry::Instance;

use super::*;

fn instance(port: u32) -> Instance {
    Instance {
        host: "127.0.0.1".into(),
        port,
        weight: 100,
        ..Instance::default()
    }
}

fn key() -> ServiceKey {
    ServiceKey::new("demo.Greeter", "1.0.0", "")
}

fn server(node: &str) -> Registry {
    let registry = Registry::new(RegistryConfig {
        startup_grace: Duration::ZERO,
        ..RegistryConfig::default()
    });
    registry.enable_replication(node.to_owned());
    registry
}

fn node(app: &str) -> NodeInfo {
    NodeInfo {
        app: app.into(),
        host: "10.0.0.9".into(),
        ..NodeInfo::default()
    }
}

fn decoded(bytes: &[u8]) -> peer_message::Body {
    PeerMessage::decode(bytes).unwrap().body.unwrap()
}

fn full_of(registry: &Registry) -> (peer::Full, tokio::sync::broadcast::Receiver<Batch>) {
    let replication = registry.replication().unwrap();
    match decoded(&replication.full) {
        peer_message::Body::Full(full) => (full, replication.batches),
        other => panic!("expected Full, got {other:?}"),
    }
}

fn changes_of(batch: &Batch) -> peer::Changes {
    match decoded(&batch.encoded) {
        peer_message::Body::Changes(changes) => changes,
        other => panic!("expected Changes, got {other:?}"),
    }
}

/// `(address, server)` of each provider `registry` lists for the key.
fn providers(registry: &Registry) -> Vec<(String, Option<String>)> {
    let mut list: Vec<_> = registry
        .detail(&key())
        .map(|d| d.providers)
        .unwrap_or_default()
        .into_iter()
        .map(|(i, server)| (format!("{}:{}", i.host, i.port), server))
        .collect();
    list.sort();
    list
}

/// Whether the registry's flusher wake-up was due (taking it).
fn drain_changed(registry: &Registry) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::ZERO, registry.changed.notified())
            .await
            .is_ok()
    })
}

fn digest_of(summary: &Summary, owner: &str) -> peer::Digest {
    peer::Digest {
        owner: owner.into(),
        seq: summary.seq,
        providers: summary.providers,
        consumers: summary.consumers,
        hash: summary.hash,
        sessions: summary.sessions,
    }
}

#[test]
fn a_peers_providers_and_consumers_reach_the_map_by_full_copy_then_batches() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (session, _) = a.open_session(node("greeter"));
    a.register(session, key(), instance(1)).unwrap();
    a.subscribe(session, key(), None).unwrap();
    let (full, mut batches) = full_of(&a);
    assert_eq!((full.providers.len(), full.consumers.len()), (1, 1));

    let replica = b.open_replica("a:9600", a.epoch(), "a-admin");
    b.apply_full(replica, full).unwrap();
    assert_eq!(providers(&b), [("127.0.0.1:1".to_owned(), Some("a:9600".to_owned()))]);
    let consumers = b.detail(&key()).unwrap().consumers;
    assert_eq!(consumers.len(), 1);
    assert_eq!(
        (consumers[0].0.app.as_str(), consumers[0].1.as_deref()),
        ("greeter", Some("a:9600"))
    );

    // A second provider and the first one's removal: one batch each.
    a.register(session, key(), instance(2)).unwrap();
    a.replicate();
    a.unregister(session, &key(), "127.0.0.1", 1).unwrap();
    a.replicate();
    for _ in 0..2 {
        let batch = batches.try_recv().unwrap();
        assert!(b.apply_changes(replica, changes_of(&batch)).unwrap(), "in sequence");
    }
    assert_eq!(providers(&b), [("127.0.0.1:2".to_owned(), Some("a:9600".to_owned()))]);

    // The session ends: its provider and its subscription go.
    a.close_session(session, "test");
    a.replicate();
    let changes = changes_of(&batches.try_recv().unwrap());
    assert_eq!((changes.providers_gone.len(), changes.consumers_gone.len()), (1, 1));
    b.apply_changes(replica, changes).unwrap();
    assert!(providers(&b).is_empty());
    assert!(b.detail(&key()).is_none_or(|d| d.consumers.is_empty()));
}

#[test]
fn nothing_changed_makes_no_batch_and_an_add_then_remove_in_one_window_makes_none() {
    let a = server("a:9600");
    let (_, mut batches) = full_of(&a);
    let (session, _) = a.open_session(node("greeter"));
    a.replicate();
    assert!(batches.try_recv().is_err(), "an empty batch was sent");
    a.register(session, key(), instance(1)).unwrap();
    a.unregister(session, &key(), "127.0.0.1", 1).unwrap();
    a.replicate();
    assert!(batches.try_recv().is_err(), "a change that cancelled out was sent");
}

#[test]
fn a_digest_matches_the_copy_and_finds_a_lost_batch() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (session, _) = a.open_session(node("greeter"));
    a.register(session, key(), instance(1)).unwrap();
    let replication = a.replication().unwrap();
    let peer_message::Body::Full(full) = decoded(&replication.full) else {
        panic!("expected Full")
    };
    let replica = b.open_replica("a:9600", a.epoch(), "");
    b.apply_full(replica, full).unwrap();
    assert_eq!(
        b.check_digest(replica, &digest_of(&replication.summary, "a:9600"))
            .unwrap(),
        None
    );

    let mut batches = replication.batches;
    a.register(session, key(), instance(2)).unwrap();
    a.replicate();
    let lost = batches.try_recv().unwrap();
    // Lost where only the digest can see it: counted, not applied.
    b.skip_changes(replica, lost.summary.seq);
    let why = b
        .check_digest(replica, &digest_of(&lost.summary, "a:9600"))
        .unwrap()
        .expect("the digest must differ");
    assert!(why.contains("1 providers and 0 consumers here"), "{why}");

    // A digest of another point of the sequence is not compared.
    let mut later = digest_of(&lost.summary, "a:9600");
    later.seq += 1;
    assert_eq!(b.check_digest(replica, &later).unwrap(), None);

    // The full copy it then asks for repairs it.
    let (full, _) = full_of(&a);
    b.apply_full(replica, full).unwrap();
    assert_eq!(
        b.check_digest(replica, &digest_of(&lost.summary, "a:9600")).unwrap(),
        None
    );
    assert_eq!(providers(&b).len(), 2);
}

#[test]
fn a_gap_in_the_sequence_is_reported() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (full, mut batches) = full_of(&a);
    let replica = b.open_replica("a:9600", a.epoch(), "");
    b.apply_full(replica, full).unwrap();
    let (session, _) = a.open_session(node("greeter"));
    for port in 1..=2 {
        a.register(session, key(), instance(port)).unwrap();
        a.replicate();
    }
    let _first = batches.try_recv().unwrap();
    let second = batches.try_recv().unwrap();
    assert!(
        !b.apply_changes(replica, changes_of(&second)).unwrap(),
        "a gap went unseen"
    );
}

#[test]
fn the_nodes_own_session_wins_over_a_peers_copy_and_gives_way_back_to_it() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (on_a, _) = a.open_session(node("greeter"));
    a.register(on_a, key(), instance(1)).unwrap();
    let replica = b.open_replica("a:9600", a.epoch(), "");
    b.apply_full(replica, full_of(&a).0).unwrap();

    // The provider moved to b before a expired its old session.
    let (_, mut batches) = full_of(&b);
    let (on_b, _) = b.open_session(node("greeter"));
    b.apply_full(replica, full_of(&a).0).unwrap();
    drain_changed(&b);
    b.register(on_b, key(), instance(1)).unwrap();
    assert_eq!(providers(&b), [("127.0.0.1:1".to_owned(), None)]);
    // Nothing changed for b's subscribers, but b's peers must hear that
    // b holds it now: the flusher is woken and the batch names it.
    assert!(drain_changed(&b), "the flusher was not woken to replicate the takeover");
    b.replicate();
    assert_eq!(changes_of(&batches.try_recv().unwrap()).providers.len(), 1);
    // a's copy, sent again, does not take it back.
    b.apply_full(replica, full_of(&a).0).unwrap();
    assert_eq!(providers(&b), [("127.0.0.1:1".to_owned(), None)]);
    // The session on b ends while a still lists it: a's copy holds it,
    // and the provider never left the list.
    b.close_session(on_b, "test");
    assert_eq!(providers(&b), [("127.0.0.1:1".to_owned(), Some("a:9600".to_owned()))]);
}

#[test]
fn data_of_another_owner_or_an_invalid_entry_is_refused_whole() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (session, _) = a.open_session(node("greeter"));
    a.register(session, key(), instance(1)).unwrap();
    let replica = b.open_replica("a:9600", a.epoch(), "");

    let (mut full, _) = full_of(&a);
    full.owner = "c:9600".into();
    let e = b.apply_full(replica, full).unwrap_err();
    assert!(e.to_string().contains("\"c:9600\""), "{e}");
    assert!(providers(&b).is_empty());

    let (mut full, _) = full_of(&a);
    let mut bad = full.providers[0].clone();
    bad.instance.as_mut().unwrap().port = 0;
    full.providers.push(bad);
    let e = b.apply_full(replica, full).unwrap_err();
    assert!(e.to_string().contains("invalid port 0"), "{e}");
    assert!(providers(&b).is_empty(), "part of a refused message was applied");

    let changes = peer::Changes {
        owner: "a:9600".into(),
        seq: 1,
        providers_gone: vec![peer::ProviderGone {
            service: Some((&key()).into()),
            addr: "not an address".into(),
        }],
        ..peer::Changes::default()
    };
    let e = b.apply_changes(replica, changes).unwrap_err();
    assert!(e.to_string().contains("not an address"), "{e}");
}

#[test]
fn an_orphan_keeps_its_providers_until_found_dead_and_a_restarted_peer_gets_a_new_copy() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (session, _) = a.open_session(node("greeter"));
    a.register(session, key(), instance(1)).unwrap();
    a.register(session, key(), instance(2)).unwrap();
    let replica = b.open_replica("a:9600", a.epoch(), "");
    b.apply_full(replica, full_of(&a).0).unwrap();

    b.close_replica(replica);
    assert!(
        b.orphans_due(Duration::from_secs(60)).is_empty(),
        "due before its grace"
    );
    assert_eq!(
        providers(&b).len(),
        2,
        "an orphan's providers must stay through the grace"
    );
    // The peer comes back as a new run: a new copy; the old one stays an orphan.
    let restarted = b.open_replica("a:9600", "another-epoch", "");
    assert_ne!(restarted, replica);
    let due = b.orphans_due(Duration::ZERO);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].1.len(), 2);
    // One answered its probe, one did not.
    b.settle_orphan(replica.id, &[(key(), Addr::new("127.0.0.1", 2))]);
    assert_eq!(providers(&b), [("127.0.0.1:1".to_owned(), Some("a:9600".to_owned()))]);
    b.settle_orphan(replica.id, &[(key(), Addr::new("127.0.0.1", 1))]);
    assert!(providers(&b).is_empty());
    assert!(
        b.replicas().iter().all(|r| r.epoch != a.epoch()),
        "the emptied orphan stayed"
    );
}

#[test]
fn subscribers_here_are_pushed_a_peers_changes() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (subscriber, push) = b.open_session(node("web"));
    b.subscribe(subscriber, key(), None).unwrap();
    b.flush();
    let replica = b.open_replica("a:9600", a.epoch(), "");
    let (session, _) = a.open_session(node("greeter"));
    a.register(session, key(), instance(1)).unwrap();
    b.apply_full(replica, full_of(&a).0).unwrap();
    assert_eq!(b.flush(), 1, "the subscriber was not pushed the peer's provider");
    drop(push);
}

#[test]
fn a_provider_that_moved_here_and_left_is_not_taken_back_by_the_dead_peers_copy() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (on_a, _) = a.open_session(node("greeter"));
    a.register(on_a, key(), instance(1)).unwrap();
    let replica = b.open_replica("a:9600", a.epoch(), "");
    b.apply_full(replica, full_of(&a).0).unwrap();
    // a dies; the provider moves to b, then unregisters (it goes offline
    // with its port still open).
    b.close_replica(replica);
    let (on_b, _) = b.open_session(node("greeter"));
    b.register(on_b, key(), instance(1)).unwrap();
    b.unregister(on_b, &key(), "127.0.0.1", 1).unwrap();
    assert!(providers(&b).is_empty(), "the dead peer's copy took the provider back");
    // Past the grace, the orphan holds nothing and goes.
    assert!(b.orphans_due(Duration::ZERO).is_empty());
    assert!(b.replicas().is_empty());
}

#[test]
fn a_removal_names_a_provider_registered_by_host_name() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (on_a, _) = a.open_session(node("greeter"));
    let named = Instance {
        host: "greeter-1.internal".into(),
        ..instance(7)
    };
    a.register(on_a, key(), named).unwrap();
    let (full, mut batches) = full_of(&a);
    let replica = b.open_replica("a:9600", a.epoch(), "");
    b.apply_full(replica, full).unwrap();
    assert_eq!(providers(&b).len(), 1);
    a.unregister(on_a, &key(), "greeter-1.internal", 7).unwrap();
    a.replicate();
    assert!(
        b.apply_changes(replica, changes_of(&batches.try_recv().unwrap()))
            .unwrap()
    );
    assert!(
        providers(&b).is_empty(),
        "the removal of a host-named provider was not applied"
    );
}

#[test]
fn an_older_link_of_a_peer_can_neither_apply_nor_orphan_the_copy_its_successor_feeds() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let old = b.open_replica("a:9600", a.epoch(), "");
    let new = b.open_replica("a:9600", a.epoch(), "");
    assert_eq!(old.id, new.id, "the same run of the peer has one copy");
    let (on_a, _) = a.open_session(node("greeter"));
    a.register(on_a, key(), instance(1)).unwrap();
    let e = b.apply_full(old, full_of(&a).0).unwrap_err();
    assert!(e.to_string().contains("replaced by a newer one"), "{e}");
    b.apply_full(new, full_of(&a).0).unwrap();
    b.close_replica(old);
    assert!(b.replicas()[0].connected, "the old link's end orphaned the live copy");
    b.close_replica(new);
    assert!(!b.replicas()[0].connected);
}

#[test]
fn a_full_copy_makes_the_copys_summary_right_again_after_claims_were_dropped() {
    let (a, b) = (server("a:9600"), server("b:9600"));
    let (on_a, _) = a.open_session(node("greeter"));
    a.register(on_a, key(), instance(1)).unwrap();
    let replica = b.open_replica("a:9600", a.epoch(), "");
    b.apply_full(replica, full_of(&a).0).unwrap();
    // Cut off past the grace while the provider moved to b: the orphan
    // lets its claim go.
    b.close_replica(replica);
    let (on_b, _) = b.open_session(node("greeter"));
    b.register(on_b, key(), instance(1)).unwrap();
    assert!(b.orphans_due(Duration::ZERO).is_empty());
    // The link comes back (same run): a's full copy and digest agree.
    let again = b.open_replica("a:9600", a.epoch(), "");
    let replication = a.replication().unwrap();
    let peer_message::Body::Full(full) = decoded(&replication.full) else {
        panic!("expected Full")
    };
    b.apply_full(again, full).unwrap();
    assert_eq!(
        b.check_digest(again, &digest_of(&replication.summary, "a:9600"))
            .unwrap(),
        None
    );
}
