use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rpc_core::ServiceKey;
use rpc_core::registry::Addr;
use rpc_core::registry::convert::instance_addr;
use tern_proto::registry::{Delta, Instance, ServerMessage, Snapshot, server_message};

use super::*;
use crate::outgoing::{Deliver, Outgoing, PushedDelta};

fn instance(port: u32) -> Instance {
    Instance {
        host: "127.0.0.1".into(),
        port,
        weight: 100,
        ..Instance::default()
    }
}

fn registry() -> Registry {
    Registry::new(RegistryConfig {
        startup_grace: Duration::ZERO,
        history_len: 4,
        ..RegistryConfig::default()
    })
}

fn key() -> ServiceKey {
    ServiceKey::new("demo.Greeter", "1.0.0", "")
}

/// What `push` says is due next (waiting for it).
fn next_due(push: &PushQueue) -> Vec<Due> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(push.next()).due
}

/// What `push` has due right now, without waiting.
fn due_now(push: &PushQueue) -> Vec<Due> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        tokio::select! {
            biased;
            work = push.next() => work.due,
            () = std::future::ready(()) => Vec::new(),
        }
    })
}

/// [`Registry::catch_up`], as the node decodes it.
fn decoded_catch_up(registry: &Registry, key: &ServiceKey, sent: Option<u64>) -> (Vec<ServerMessage>, u64) {
    let (out, revision) = registry.catch_up(key, sent);
    (out.iter().map(Outgoing::to_message).collect(), revision)
}

fn delta_of(messages: &[ServerMessage]) -> Vec<&Delta> {
    messages
        .iter()
        .filter_map(|m| match &m.body {
            Some(server_message::Body::Delta(d)) => Some(d),
            _ => None,
        })
        .collect()
}

fn snapshot_of(messages: &[ServerMessage]) -> Option<&Snapshot> {
    messages.iter().find_map(|m| match &m.body {
        Some(server_message::Body::Snapshot(s)) => Some(s),
        _ => None,
    })
}

/// A provider session with `instance(1)` of `key()` flushed, and a
/// session that then subscribed to `key()`.
fn subscribed_after_one_flush(registry: &Registry) -> (SessionId, SessionId, Arc<PushQueue>) {
    let (provider, _) = registry.open_session(NodeInfo::default());
    let (consumer, push) = registry.open_session(NodeInfo::default());
    registry.register(provider, key(), instance(1)).unwrap();
    registry.flush();
    registry.subscribe(consumer, key(), None).unwrap();
    (provider, consumer, push)
}

#[test]
fn subscriber_gets_snapshot_then_one_delta_per_flush() {
    let registry = registry();
    let (provider, _, push) = subscribed_after_one_flush(&registry);
    let (messages, rev) = decoded_catch_up(&registry, &key(), None);
    assert_eq!(snapshot_of(&messages).unwrap().providers.len(), 1);
    assert_eq!(rev, 1);
    let _ = push;

    registry.register(provider, key(), instance(2)).unwrap();
    registry.register(provider, key(), instance(3)).unwrap();
    registry.flush();
    let (messages, rev) = decoded_catch_up(&registry, &key(), Some(1));
    let deltas = delta_of(&messages);
    assert_eq!(deltas.len(), 1, "two registrations in one window coalesce");
    assert_eq!(deltas[0].added.len(), 2);
    assert_eq!((deltas[0].from_revision, deltas[0].to_revision, rev), (1, 2, 2));
}

#[test]
fn a_session_up_to_date_is_handed_the_flushed_delta_itself() {
    let registry = registry();
    let (provider, _) = registry.open_session(NodeInfo::default());
    let (consumer, push) = registry.open_session(NodeInfo::default());
    registry.subscribe(consumer, key(), None).unwrap();
    let due = next_due(&push);
    assert!(due[0].next_delta().is_none(), "a snapshot is due first");
    let (_, revision) = registry.catch_up(&key(), due[0].sent);
    push.sent(&due[0], revision);

    // One flush: the queue carries that delta, the same the registry
    // would hand out.
    registry.register(provider, key(), instance(1)).unwrap();
    registry.flush();
    let due = next_due(&push);
    let hinted = due[0].next_delta().expect("the flushed delta").clone();
    let (from_registry, _) = registry.catch_up(&key(), due[0].sent);
    assert!(matches!(&from_registry[..], [Outgoing::Delta(d)] if **d == *hinted));
    push.sent(&due[0], hinted.to_revision);

    // Two flushes before the session looked: no single delta will do.
    registry.register(provider, key(), instance(2)).unwrap();
    registry.flush();
    registry.register(provider, key(), instance(3)).unwrap();
    registry.flush();
    let due = next_due(&push);
    assert!(due[0].next_delta().is_none());
    let (messages, revision) = decoded_catch_up(&registry, &key(), due[0].sent);
    assert_eq!((delta_of(&messages).len(), revision), (2, 3));
}

/// A transport that takes deltas while `open`, recording them.
#[derive(Debug, Default)]
struct Recorder {
    open: AtomicBool,
    taken: Mutex<Vec<(u64, u64)>>,
}

impl Deliver for Recorder {
    fn deliver(&self, delta: &PushedDelta) -> bool {
        let open = self.open.load(Ordering::Relaxed);
        if open {
            let mut taken = self.taken.lock().unwrap();
            taken.push((delta.from_revision, delta.to_revision));
        }
        open
    }
}

/// A provider session, and a subscriber of `key()` whose push queue is
/// attached to an open [`Recorder`].
fn subscriber_with_transport(registry: &Registry) -> (SessionId, Arc<PushQueue>, Arc<Recorder>) {
    let (provider, _) = registry.open_session(NodeInfo::default());
    let (consumer, push) = registry.open_session(NodeInfo::default());
    let transport = Arc::new(Recorder::default());
    transport.open.store(true, Ordering::Relaxed);
    let direct: Weak<dyn Deliver> = Arc::downgrade(&transport) as Weak<Recorder>;
    push.attach(direct);
    registry.subscribe(consumer, key(), None).unwrap();
    (provider, push, transport)
}

#[test]
fn the_flusher_writes_a_delta_to_an_up_to_date_session_and_leaves_the_rest_to_its_task() {
    let registry = registry();
    let (provider, push, transport) = subscriber_with_transport(&registry);

    // The snapshot is still due: the flusher must not write ahead of it.
    registry.register(provider, key(), instance(1)).unwrap();
    registry.flush();
    assert!(transport.taken.lock().unwrap().is_empty());
    let due = next_due(&push);
    let (_, revision) = registry.catch_up(&key(), due[0].sent);
    push.sent(&due[0], revision);

    // Up to date: the next delta goes straight to the transport, and
    // nothing is left for the session's task.
    let before = registry.metrics.pushed_direct.load(Ordering::Relaxed);
    registry.register(provider, key(), instance(2)).unwrap();
    assert_eq!(registry.flush(), 1);
    assert_eq!(*transport.taken.lock().unwrap(), [(revision, revision + 1)]);
    assert_eq!(registry.metrics.pushed_direct.load(Ordering::Relaxed), before + 1);
    assert!(registry.is_drained(), "a direct write counts as pushed");
    assert!(due_now(&push).is_empty(), "nothing left for the session's task");
    registry.register(provider, key(), instance(3)).unwrap();
    registry.flush();
    assert_eq!(
        transport.taken.lock().unwrap().len(),
        2,
        "and so on, revision after revision"
    );

    // A transport that cannot take it now: the session's task is asked
    // instead, and sends it from where the session is.
    transport.open.store(false, Ordering::Relaxed);
    registry.register(provider, key(), instance(4)).unwrap();
    registry.flush();
    let due = next_due(&push);
    let delta = due[0].next_delta().expect("the delta, for the session's task");
    assert_eq!(delta.from_revision, revision + 2);
    assert!(!registry.is_drained(), "until the session reports it sent");
    push.sent(&due[0], delta.to_revision);
    registry.pushed();
    assert!(registry.is_drained());

    // Once the transport is gone (its connection closed), the queue is
    // marked as for any session.
    drop(transport);
    registry.register(provider, key(), instance(5)).unwrap();
    registry.flush();
    assert_eq!(next_due(&push).len(), 1);
}

#[test]
fn the_flusher_leaves_a_service_to_the_session_task_that_is_sending_it() {
    let registry = registry();
    let (provider, push, transport) = subscriber_with_transport(&registry);
    let due = next_due(&push);
    let (_, revision) = registry.catch_up(&key(), due[0].sent);
    push.sent(&due[0], revision);

    // The session's task has taken the service (a change marked it) and
    // is sending; a flush meanwhile must not write past it.
    registry.register(provider, key(), instance(1)).unwrap();
    transport.open.store(false, Ordering::Relaxed);
    registry.flush();
    transport.open.store(true, Ordering::Relaxed);
    let taken = next_due(&push);
    registry.register(provider, key(), instance(2)).unwrap();
    registry.flush();
    assert!(transport.taken.lock().unwrap().is_empty(), "left to the session's task");
    let sending = taken[0].next_delta().expect("its delta").to_revision;
    push.sent(&taken[0], sending);
    // What the flush marked follows, from the revision now recorded.
    let due = next_due(&push);
    assert_eq!(due[0].sent, Some(sending));
    let delta = due[0].next_delta().expect("the next delta");
    assert_eq!((delta.from_revision, delta.to_revision), (sending, sending + 1));
    push.sent(&due[0], delta.to_revision);
    // And a report of an older push never moves the record back.
    push.sent(&taken[0], sending);
    registry.register(provider, key(), instance(3)).unwrap();
    registry.flush();
    assert_eq!(*transport.taken.lock().unwrap(), [(sending + 1, sending + 2)]);
}

#[test]
fn pushes_split_into_parts_cover_every_subscriber_once() {
    let registry = registry();
    let (provider, _) = registry.open_session(NodeInfo::default());
    let other = ServiceKey::new("demo.Other", "1.0.0", "");
    let mut queues = Vec::new();
    for _ in 0..5 {
        let (consumer, push) = registry.open_session(NodeInfo::default());
        registry.subscribe(consumer, key(), None).unwrap();
        registry.subscribe(consumer, other.clone(), None).unwrap();
        queues.push(push);
    }
    registry.register(provider, key(), instance(1)).unwrap();
    registry.register(provider, other.clone(), instance(2)).unwrap();
    let pushes = registry.take_flush();
    assert_eq!(pushes.len(), 10);
    let parts = pushes.split(3);
    assert_eq!(parts.iter().map(Pushes::len).collect::<Vec<_>>(), [4, 4, 2]);
    let made: usize = parts.into_iter().map(|part| registry.push(part)).sum();
    assert_eq!(made, 10);
    for push in &queues {
        let mut due: Vec<_> = next_due(push).into_iter().map(|d| d.key).collect();
        due.sort();
        assert_eq!(due, [key(), other.clone()], "each subscriber marked for both services");
    }
    assert_eq!(Pushes::default().split(4).len(), 0);

    // Services with a subscriber each are dealt over every part.
    let (consumer, _push) = registry.open_session(NodeInfo::default());
    let keys: Vec<ServiceKey> = (0..4)
        .map(|i| ServiceKey::new(format!("demo.S{i}"), "1.0.0", ""))
        .collect();
    for k in &keys {
        registry.subscribe(consumer, k.clone(), None).unwrap();
        registry.register(provider, k.clone(), instance(3)).unwrap();
    }
    let parts = registry.take_flush().split(2);
    assert_eq!(parts.iter().map(Pushes::len).collect::<Vec<_>>(), [2, 2]);
}

#[test]
fn a_recreated_service_never_resumes_a_revision_of_the_removed_one() {
    let registry = registry();
    let (provider, consumer, push) = subscribed_after_one_flush(&registry);
    let (_, held) = registry.catch_up(&key(), None);

    // Everyone leaves: the service is gone. Then it comes back.
    registry.unsubscribe(consumer, &key());
    registry.unregister(provider, &key(), "127.0.0.1", 1).unwrap();
    registry.flush();
    assert!(registry.detail(&key()).is_none(), "the unused service was removed");
    for port in [2, 3] {
        registry.register(provider, key(), instance(port)).unwrap();
        registry.flush();
    }

    // The node still holds revision `held` of the old service: it must
    // get a snapshot, not the new service's deltas from that number.
    registry
        .subscribe(consumer, key(), Some((registry.epoch(), held)))
        .unwrap();
    let due = next_due(&push);
    assert_eq!(due[0].sent, None, "a snapshot is due");
    let (messages, _) = decoded_catch_up(&registry, &key(), due[0].sent);
    let ports: Vec<u32> = snapshot_of(&messages)
        .unwrap()
        .providers
        .iter()
        .map(|i| i.port)
        .collect();
    assert_eq!(ports, [2, 3]);
}

#[test]
fn a_push_in_flight_across_unsubscribe_and_subscribe_does_not_cancel_the_snapshot() {
    let registry = registry();
    let (consumer, push) = registry.open_session(NodeInfo::default());
    registry.subscribe(consumer, key(), None).unwrap();
    let in_flight = next_due(&push);
    // While that snapshot is being sent, the node unsubscribes and
    // subscribes again: it must get a fresh snapshot.
    registry.unsubscribe(consumer, &key());
    registry.subscribe(consumer, key(), None).unwrap();
    push.sent(&in_flight[0], 0);
    let due = next_due(&push);
    assert_eq!(due[0].sent, None, "the new subscription still gets its snapshot");
}

#[test]
fn add_then_remove_within_a_window_is_no_change() {
    let registry = registry();
    let (provider, _) = registry.open_session(NodeInfo::default());
    registry.register(provider, key(), instance(1)).unwrap();
    registry.unregister(provider, &key(), "127.0.0.1", 1).unwrap();
    registry.flush();
    assert_eq!(decoded_catch_up(&registry, &key(), Some(0)).1, 0);
}

fn node(app: &str) -> NodeInfo {
    NodeInfo {
        app: app.into(),
        host: "10.0.0.1".into(),
        ..NodeInfo::default()
    }
}

#[test]
fn closing_a_session_removes_its_instances() {
    let registry = registry();
    let (provider, _) = registry.open_session(NodeInfo::default());
    let (consumer, _) = registry.open_session(NodeInfo::default());
    registry.subscribe(consumer, key(), None).unwrap();
    registry.register(provider, key(), instance(1)).unwrap();
    registry.flush();
    registry.close_session(provider, "test");
    registry.flush();
    let (messages, _) = decoded_catch_up(&registry, &key(), Some(1));
    assert_eq!(delta_of(&messages)[0].removed, vec!["127.0.0.1:1".to_owned()]);
}

#[test]
fn lagging_subscriber_past_history_gets_one_snapshot() {
    let registry = registry();
    let (provider, _) = registry.open_session(NodeInfo::default());
    for port in 1..=10 {
        registry.register(provider, key(), instance(port)).unwrap();
        registry.flush();
    }
    let (messages, rev) = decoded_catch_up(&registry, &key(), Some(2));
    assert_eq!(messages.len(), 1);
    assert_eq!(snapshot_of(&messages).unwrap().providers.len(), 10);
    assert_eq!(rev, 10);
    // Within the history: the missing deltas only.
    let (messages, _) = decoded_catch_up(&registry, &key(), Some(8));
    assert_eq!(delta_of(&messages).len(), 2);
}

#[test]
fn resubscribe_with_known_revision_resumes_from_history() {
    let registry = registry();
    let (provider, _) = registry.open_session(NodeInfo::default());
    let (consumer, push) = registry.open_session(NodeInfo::default());
    registry.register(provider, key(), instance(1)).unwrap();
    registry.flush();
    registry.register(provider, key(), instance(2)).unwrap();
    registry.flush();
    let epoch = registry.epoch().to_owned();
    registry.subscribe(consumer, key(), Some((&epoch, 1))).unwrap();
    let due = next_due(&push);
    assert_eq!(
        due.iter().map(|d| (d.key.clone(), d.sent)).collect::<Vec<_>>(),
        vec![(key(), Some(1))]
    );
    registry.subscribe(consumer, key(), Some(("another-epoch", 1))).unwrap();
    let due = next_due(&push);
    assert_eq!(
        due.iter().map(|d| (d.key.clone(), d.sent)).collect::<Vec<_>>(),
        vec![(key(), None)]
    );
}

#[test]
fn bad_registrations_name_the_value_and_store_nothing() {
    let registry = registry();
    let (a, _) = registry.open_session(node("a"));
    let (b, _) = registry.open_session(node("b"));
    let err = registry
        .register(a, ServiceKey::new("bad key", "", ""), instance(1))
        .unwrap_err();
    assert!(err.to_string().contains(r#"interface "bad key" contains ' '"#), "{err}");
    let err = registry
        .register(
            a,
            key(),
            Instance {
                port: 70000,
                ..instance(1)
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("invalid port 70000"), "{err}");
    let err = registry
        .register(
            a,
            key(),
            Instance {
                host: "no host!".into(),
                ..instance(1)
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains(r#"invalid host "no host!""#), "{err}");
    let err = registry
        .register(
            a,
            key(),
            Instance {
                weight: 20_000,
                ..instance(1)
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("weight 20000"), "{err}");
    let mut huge = instance(1);
    huge.metadata.insert("blob".into(), "x".repeat(100_000));
    let err = registry.register(a, key(), huge).unwrap_err();
    assert_eq!(err.kind(), "too_large");
    assert!(registry.overview().is_empty(), "nothing stored");

    registry.register(a, key(), instance(1)).unwrap();
    let err = registry.register(b, key(), instance(1)).unwrap_err();
    assert_eq!(err.kind(), "duplicate");
    assert!(
        err.to_string().contains("127.0.0.1:1 is already registered by session"),
        "{err}"
    );
}

#[test]
fn the_same_node_on_a_new_stream_takes_its_instance_over() {
    let registry = registry();
    let (old, _) = registry.open_session(node("a"));
    let (consumer, _) = registry.open_session(node("c"));
    registry.subscribe(consumer, key(), None).unwrap();
    registry.register(old, key(), instance(1)).unwrap();
    registry.flush();
    let (new, _) = registry.open_session(node("a"));
    registry.register(new, key(), instance(1)).unwrap();
    // The old stream expiring later must not remove the instance.
    registry.close_session(old, "expired");
    registry.flush();
    assert_eq!(registry.detail(&key()).unwrap().providers.len(), 1);
    assert_eq!(
        decoded_catch_up(&registry, &key(), Some(1)).1,
        1,
        "no change was pushed"
    );
}

#[test]
fn a_snapshot_never_shows_an_unflushed_change_under_an_old_revision() {
    let registry = registry();
    let (provider, _) = registry.open_session(NodeInfo::default());
    let (consumer, _) = registry.open_session(NodeInfo::default());
    registry.subscribe(consumer, key(), None).unwrap();
    registry.register(provider, key(), instance(1)).unwrap();
    // Snapshot requested before the flusher ran.
    let (messages, revision) = decoded_catch_up(&registry, &key(), None);
    assert_eq!((snapshot_of(&messages).unwrap().providers.len(), revision), (1, 1));
    registry.unregister(provider, &key(), "127.0.0.1", 1).unwrap();
    registry.flush();
    let (messages, _) = decoded_catch_up(&registry, &key(), Some(1));
    assert_eq!(delta_of(&messages)[0].removed, vec!["127.0.0.1:1".to_owned()]);
}

#[test]
fn grace_period_snapshots_are_partial_until_it_ends() {
    let registry = Registry::new(RegistryConfig::default());
    let (consumer, push) = registry.open_session(NodeInfo::default());
    registry.subscribe(consumer, key(), None).unwrap();
    assert!(
        snapshot_of(&decoded_catch_up(&registry, &key(), None).0)
            .unwrap()
            .partial
    );
    let due = next_due(&push);
    registry.end_grace();
    // The push that was in flight when the grace ended must not hide the reset.
    push.sent(&due[0], 0);
    let due = next_due(&push);
    assert_eq!((due[0].key.clone(), due[0].sent), (key(), None));
    assert!(
        !snapshot_of(&decoded_catch_up(&registry, &key(), None).0)
            .unwrap()
            .partial
    );
}

mod properties {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Register {
            session: usize,
            port: u32,
            weight: u32,
        },
        Unregister {
            session: usize,
            port: u32,
        },
        Close {
            session: usize,
        },
        Flush,
        CatchUp,
        /// The consumer session's push task takes what is due.
        Push,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 1..6u32, 0..3u32).prop_map(|(session, port, weight)| Op::Register { session, port, weight }),
            (0..3usize, 1..6u32).prop_map(|(session, port)| Op::Unregister { session, port }),
            (0..3usize).prop_map(|session| Op::Close { session }),
            Just(Op::Flush),
            Just(Op::CatchUp),
            Just(Op::Push),
        ]
    }

    /// What a subscriber holds after applying pushes as a node does.
    #[derive(Default)]
    struct Subscriber {
        revision: Option<u64>,
        providers: BTreeMap<Addr, u32>,
    }

    impl Subscriber {
        fn apply(&mut self, registry: &Registry) {
            self.receive(decoded_catch_up(registry, &key(), self.revision));
        }

        /// As a session's push task does: what its queue says is due,
        /// the flushed delta itself when that is enough.
        fn push(&mut self, registry: &Registry, push: &PushQueue, rt: &tokio::runtime::Runtime) {
            let Ok(work) = rt.block_on(async { tokio::time::timeout(Duration::ZERO, push.next()).await }) else {
                return; // nothing due
            };
            for due in work.due {
                let (out, revision) = match due.next_delta() {
                    Some(delta) => (vec![Outgoing::Delta(delta.clone())], delta.to_revision),
                    None => registry.catch_up(&due.key, due.sent),
                };
                self.receive((out.iter().map(Outgoing::to_message).collect(), revision));
                push.sent(&due, revision);
            }
        }

        fn receive(&mut self, (messages, revision): (Vec<ServerMessage>, u64)) {
            for message in messages {
                match message.body {
                    Some(server_message::Body::Snapshot(s)) => {
                        self.providers = s.providers.iter().map(|i| (instance_addr(i), i.weight)).collect();
                        self.revision = Some(s.revision);
                    }
                    Some(server_message::Body::Delta(d)) => {
                        assert_eq!(Some(d.from_revision), self.revision, "deltas arrive in order");
                        for addr in &d.removed {
                            self.providers.remove(addr.as_str());
                        }
                        for i in d.added.iter().chain(&d.updated) {
                            self.providers.insert(instance_addr(i), i.weight);
                        }
                        self.revision = Some(d.to_revision);
                    }
                    other => panic!("unexpected push {other:?}"),
                }
            }
            assert_eq!(
                self.revision.unwrap_or(0),
                revision,
                "caught up to the returned revision"
            );
            self.revision = Some(revision);
        }
    }

    proptest! {
        /// Whatever happens, a subscriber that applies every snapshot
        /// and delta it is sent ends up with exactly the providers the
        /// registry holds (ports by weight).
        #[test]
        fn subscribers_converge_on_the_registry(ops in proptest::collection::vec(op(), 1..60)) {
            let registry = Registry::new(RegistryConfig {
                startup_grace: Duration::ZERO,
                history_len: 3,
                max_catch_up_deltas: 2,
                ..RegistryConfig::default()
            });
            let mut sessions: Vec<SessionId> = (0..3).map(|i| registry.open_session(node(&format!("p{i}"))).0).collect();
            let (consumer, _) = registry.open_session(node("consumer"));
            registry.subscribe(consumer, key(), None).unwrap();
            let mut subscriber = Subscriber::default();
            let (pushed_to, push) = registry.open_session(node("pushed-to"));
            registry.subscribe(pushed_to, key(), None).unwrap();
            let mut pushed = Subscriber::default();
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            for op in ops {
                match op {
                    Op::Register { session, port, weight } => {
                        let instance = Instance { weight, ..instance(port) };
                        // A port held by another node is refused; that is fine.
                        let _ = registry.register(sessions[session], key(), instance);
                    }
                    Op::Unregister { session, port } => {
                        let _ = registry.unregister(sessions[session], &key(), "127.0.0.1", port);
                    }
                    Op::Close { session } => {
                        registry.close_session(sessions[session], "test");
                        sessions[session] = registry.open_session(node(&format!("p{session}"))).0;
                    }
                    Op::Flush => {
                        registry.flush();
                    }
                    Op::CatchUp => subscriber.apply(&registry),
                    Op::Push => pushed.push(&registry, &push, &rt),
                }
            }
            registry.flush();
            subscriber.apply(&registry);
            pushed.push(&registry, &push, &rt);
            let held: BTreeSet<Addr> = registry.detail(&key()).map(|d| d.providers.iter().map(|(i, _)| instance_addr(i)).collect()).unwrap_or_default();
            let seen: BTreeSet<Addr> = subscriber.providers.keys().cloned().collect();
            prop_assert_eq!(seen, held);
            let weights: BTreeMap<Addr, u32> = registry.detail(&key()).map(|d| d.providers.iter().map(|(i, _)| (instance_addr(i), i.weight)).collect()).unwrap_or_default();
            prop_assert_eq!(&subscriber.providers, &weights);
            prop_assert_eq!(&pushed.providers, &weights, "through the push queue");
        }
    }
}
