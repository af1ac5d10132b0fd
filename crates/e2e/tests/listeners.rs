//! End-to-end tests of what a node is told of a subscribed list: list
//! listeners (`subscribe_with`) get the whole list after each change,
//! followers (`follow`, what a consumer's directory uses) the change
//! itself, starting from the whole list. A ConfigServer runs as a
//! `tern-node` child process; the sessions run here.

mod common;

use std::collections::BTreeSet;
use std::sync::Mutex;

use common::{LIMIT, Node};
use rpc_core::ServiceKey;
use rpc_core::registry::{ProviderList, RegistrySession, Role, SessionConfig, Update};
use tern_proto::registry as pb;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_listener_is_told_each_pushed_list_in_order() {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let key = rpc_core::ServiceKey::new("demo.Listened", "1.0.0", "");
    let provider = RegistrySession::start(SessionConfig::new([registry.to_string()], "p", Role::Provider));
    let consumer = RegistrySession::start(SessionConfig::new([registry.to_string()], "c", Role::Consumer));
    let (told, mut heard) = mpsc::channel(16);
    let _list = consumer.subscribe_with(&key, move |list: &ProviderList| {
        let mut addresses: Vec<String> = list.providers.keys().map(|addr| addr.to_string()).collect();
        addresses.sort();
        let _ = told.try_send(addresses);
    });
    assert_eq!(told_next(&mut heard).await, Vec::<String>::new(), "the first snapshot");
    for port in [4101, 4102] {
        let instance = pb::Instance {
            host: "127.0.0.1".into(),
            port,
            weight: 100,
            ..Default::default()
        };
        provider.register(&key, instance).await.unwrap();
    }
    let mut seen = told_next(&mut heard).await;
    if seen.len() == 1 {
        // The two registrations may come as one delta or two.
        seen = told_next(&mut heard).await;
    }
    assert_eq!(seen, ["127.0.0.1:4101", "127.0.0.1:4102"]);
    provider.unregister(&key, "127.0.0.1", 4101).await.unwrap();
    assert_eq!(told_next(&mut heard).await, ["127.0.0.1:4102"]);
}

/// The session's task keeps the subscription the last push was for; a
/// listener added after that must still be told the next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_added_to_a_list_already_pushed_is_told_the_next_change() {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let key = rpc_core::ServiceKey::new("demo.Listened", "1.0.0", "");
    let provider = RegistrySession::start(SessionConfig::new([registry.to_string()], "p", Role::Provider));
    let consumer = RegistrySession::start(SessionConfig::new([registry.to_string()], "c", Role::Consumer));
    let instance = |port| pb::Instance {
        host: "127.0.0.1".into(),
        port,
        weight: 100,
        ..Default::default()
    };
    let mut list = consumer.subscribe(&key);
    provider.register(&key, instance(4201)).await.unwrap();
    tokio::time::timeout(LIMIT, list.wait_for(|l| l.providers.contains_key("127.0.0.1:4201")))
        .await
        .expect("the first provider pushed within the limit")
        .expect("the list is kept");

    let (told, mut heard) = mpsc::channel(16);
    let _listened = consumer.subscribe_with(&key, move |list: &ProviderList| {
        let _ = told.try_send(list.providers.keys().map(|addr| addr.to_string()).collect());
    });
    provider.register(&key, instance(4202)).await.unwrap();
    assert_eq!(told_next(&mut heard).await, ["127.0.0.1:4201", "127.0.0.1:4202"]);
}

async fn told_next(heard: &mut mpsc::Receiver<Vec<String>>) -> Vec<String> {
    tokio::time::timeout(LIMIT, heard.recv())
        .await
        .expect("the listener is told within the limit")
        .expect("the listener is kept")
}

/// A follower's own view, rebuilt from the updates it is handed, and a
/// channel that hears it after each one.
fn follower_view(told: mpsc::Sender<Vec<String>>) -> impl Fn(&Update<'_>) + Send + Sync + 'static {
    let view = Mutex::new(BTreeSet::new());
    move |update: &Update<'_>| {
        let mut view = view.lock().unwrap();
        match update {
            Update::Reset(instances) => {
                view.clear();
                view.extend(instances.iter().map(|i| format!("{}:{}", i.host, i.port)));
            }
            Update::Change {
                added,
                updated,
                removed,
            } => {
                for addr in *removed {
                    view.remove(*addr);
                }
                view.extend(added.iter().chain(*updated).map(|i| format!("{}:{}", i.host, i.port)));
            }
        }
        let _ = told.try_send(view.iter().cloned().collect());
    }
}

/// Waits until `session` has a stream to a ConfigServer: a registration
/// made before that returns at once and goes out with the replay.
async fn connected(session: &RegistrySession) {
    let mut connected = session.connected();
    tokio::time::timeout(LIMIT, connected.wait_for(Option::is_some))
        .await
        .expect("the session connects within the limit")
        .expect("the session is running");
}

fn instance(port: u32) -> pb::Instance {
    pb::Instance {
        host: "127.0.0.1".into(),
        port,
        weight: 100,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_is_handed_the_whole_list_then_each_change() {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let key = ServiceKey::new("demo.Followed", "1.0.0", "");
    let provider = RegistrySession::start(SessionConfig::new([registry.to_string()], "p", Role::Provider));
    let consumer = RegistrySession::start(SessionConfig::new([registry.to_string()], "c", Role::Consumer));
    connected(&provider).await;
    provider.register(&key, instance(4301)).await.unwrap();

    let (told, mut heard) = mpsc::channel(16);
    let follower = consumer.follow(&key, follower_view(told));
    assert_eq!(told_next(&mut heard).await, ["127.0.0.1:4301"], "the whole list first");
    provider.register(&key, instance(4302)).await.unwrap();
    assert_eq!(told_next(&mut heard).await, ["127.0.0.1:4301", "127.0.0.1:4302"]);
    provider.unregister(&key, "127.0.0.1", 4301).await.unwrap();
    assert_eq!(told_next(&mut heard).await, ["127.0.0.1:4302"]);
    assert!(follower.revision() > 0, "the follower knows where the list stands");
}

/// A second follower of a list held only as a revision starts from a
/// fresh snapshot, and so does a subscriber that asks for the whole list;
/// the first follower goes on from there without losing a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_and_subscribers_that_join_later_start_from_the_whole_list() {
    let (_cs, registry, _) = Node::configserver("127.0.0.1:0", &["--startup-grace-ms", "0"]);
    let key = ServiceKey::new("demo.Followed", "1.0.0", "");
    let provider = RegistrySession::start(SessionConfig::new([registry.to_string()], "p", Role::Provider));
    let consumer = RegistrySession::start(SessionConfig::new([registry.to_string()], "c", Role::Consumer));
    let (told_first, mut first) = mpsc::channel(16);
    let _first = consumer.follow(&key, follower_view(told_first));
    assert_eq!(told_next(&mut first).await, Vec::<String>::new(), "the first snapshot");
    connected(&provider).await;
    provider.register(&key, instance(4401)).await.unwrap();
    assert_eq!(told_next(&mut first).await, ["127.0.0.1:4401"]);

    let (told_second, mut second) = mpsc::channel(16);
    let _second = consumer.follow(&key, follower_view(told_second));
    assert_eq!(
        told_next(&mut second).await,
        ["127.0.0.1:4401"],
        "the joiner starts from the whole list"
    );
    assert_eq!(
        told_next(&mut first).await,
        ["127.0.0.1:4401"],
        "which the first is handed too"
    );

    let mut whole = consumer.subscribe(&key);
    let kept = tokio::time::timeout(LIMIT, whole.wait_for(|l| l.providers.contains_key("127.0.0.1:4401")))
        .await
        .expect("the whole list fetched within the limit")
        .expect("the list is kept")
        .clone();
    assert_eq!(kept.providers.len(), 1);

    provider.register(&key, instance(4402)).await.unwrap();
    let both = ["127.0.0.1:4401", "127.0.0.1:4402"];
    // The whole-list fetch may hand the followers one more reset first.
    for heard in [&mut first, &mut second] {
        let mut seen = told_next(heard).await;
        if seen.len() == 1 {
            seen = told_next(heard).await;
        }
        assert_eq!(seen, both);
    }
    tokio::time::timeout(LIMIT, whole.wait_for(|l| l.providers.len() == 2))
        .await
        .expect("the kept list follows within the limit")
        .unwrap();
}
