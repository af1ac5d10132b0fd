use std::collections::HashMap;

use rpc_core::ConnectionConfig;
use rpc_core::governance::Rule;

use super::*;

fn instance(port: u16) -> Instance {
    Instance {
        host: "127.0.0.1".into(),
        port: port.into(),
        weight: 100,
        start_time_ms: 1_000,
        ..Instance::default()
    }
}

fn labelled(port: u16, zone: &str, label: (&str, &str)) -> Instance {
    Instance {
        zone: zone.into(),
        metadata: HashMap::from([(label.0.to_owned(), label.1.to_owned())]),
        ..instance(port)
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn policy(rules: &[(&str, &str)], me: &ConsumerIdentity) -> ConsumerPolicy {
    let set = RuleSet {
        revision: 1,
        rules: rules
            .iter()
            .map(|(name, json)| ((*name).to_owned(), Rule::from_json(json).unwrap()))
            .collect(),
    };
    ConsumerPolicy::new(&set, me)
}

/// Applies `update`; the new endpoints' ports, sorted.
fn apply(members: &mut Members, update: &Update<'_>, policy: &ConsumerPolicy) -> Vec<u16> {
    let mut fresh = Vec::new();
    let mut endpoint = |a| Arc::new(Endpoint::new(a, ConnectionConfig::default()));
    members.apply(update, policy, &mut endpoint, &mut fresh);
    let mut ports: Vec<u16> = fresh.iter().map(|e| e.addr().port()).collect();
    ports.sort_unstable();
    ports
}

/// The members' ports, sorted, and checks that the index agrees with them.
fn ports(members: &Members) -> Vec<u16> {
    assert_eq!(members.index.len(), members.list.len());
    for (i, m) in members.list.iter().enumerate() {
        assert_eq!(members.index[&m.endpoint.addr()], i, "index of {}", m.endpoint.addr());
    }
    let mut ports: Vec<u16> = members.list.iter().map(|m| m.endpoint.addr().port()).collect();
    ports.sort_unstable();
    ports
}

#[test]
fn a_reset_then_a_delta_apply_to_the_members_in_place() {
    let none = ConsumerPolicy::default();
    let mut members = Members::default();
    let fresh = apply(
        &mut members,
        &Update::Reset(&[instance(1), instance(2), instance(3)]),
        &none,
    );
    assert_eq!(fresh, [1, 2, 3], "every provider of the first list is connected");
    assert_eq!(ports(&members), [1, 2, 3]);
    let kept = members
        .list
        .iter()
        .find(|m| m.endpoint.addr() == addr(3))
        .unwrap()
        .endpoint
        .clone();

    let mut heavier = instance(3);
    heavier.weight = 250;
    let removed = ["127.0.0.1:1", "127.0.0.1:9"];
    let update = Update::Change {
        added: &[instance(4)],
        updated: std::slice::from_ref(&heavier),
        removed: &removed,
    };
    let fresh = apply(&mut members, &update, &none);
    assert_eq!(fresh, [4], "only the new provider is connected");
    assert_eq!(ports(&members), [2, 3, 4], "an unknown removed address is ignored");
    let three = members.list.iter().find(|m| m.endpoint.addr() == addr(3)).unwrap();
    assert_eq!(three.weight, 250, "an update takes the new registration");
    assert!(Arc::ptr_eq(&three.endpoint, &kept), "and keeps its endpoint");

    // A reset keeps the endpoints of providers that stay.
    let fresh = apply(&mut members, &Update::Reset(&[instance(3), instance(5)]), &none);
    assert_eq!(fresh, [5]);
    assert_eq!(ports(&members), [3, 5]);
    let three = members.list.iter().find(|m| m.endpoint.addr() == addr(3)).unwrap();
    assert!(Arc::ptr_eq(&three.endpoint, &kept));
}

#[test]
fn a_partial_snapshot_adds_and_replaces_without_duplicates() {
    let none = ConsumerPolicy::default();
    let mut members = Members::default();
    apply(&mut members, &Update::Reset(&[instance(1), instance(2)]), &none);
    let update = Update::Change {
        added: &[instance(2), instance(3)],
        updated: &[],
        removed: &[],
    };
    assert_eq!(apply(&mut members, &update, &none), [3]);
    assert_eq!(ports(&members), [1, 2, 3]);
}

#[test]
fn an_address_named_twice_in_a_reset_is_one_member() {
    let none = ConsumerPolicy::default();
    let mut members = Members::default();
    let mut again = instance(1);
    again.weight = 9;
    assert_eq!(
        apply(&mut members, &Update::Reset(&[instance(1), instance(2), again]), &none),
        [1, 2]
    );
    assert_eq!(ports(&members), [1, 2]);
    assert_eq!(
        members
            .list
            .iter()
            .find(|m| m.endpoint.addr() == addr(1))
            .unwrap()
            .weight,
        9
    );
}

#[test]
fn calls_holding_the_old_members_keep_them_whole() {
    let none = ConsumerPolicy::default();
    let mut members = Members::default();
    apply(&mut members, &Update::Reset(&[instance(1), instance(2)]), &none);
    let held = members.list.clone();
    let removed = ["127.0.0.1:1"];
    let update = Update::Change {
        added: &[],
        updated: &[],
        removed: &removed,
    };
    apply(&mut members, &update, &none);
    assert_eq!(held.len(), 2, "a call's view does not change under it");
    assert_eq!(ports(&members), [2]);
}

#[test]
fn weight_overrides_apply_to_new_members_and_on_a_rules_change() {
    let me = ConsumerIdentity::default();
    let mut members = Members::default();
    let heavy = policy(
        &[(
            "w",
            r#"{"kind":"weight","overrides":[{"address":"127.0.0.1:2","weight":7}]}"#,
        )],
        &me,
    );
    apply(&mut members, &Update::Reset(&[instance(1), instance(2)]), &heavy);
    let weight = |members: &Members, port| {
        members
            .list
            .iter()
            .find(|m| m.endpoint.addr() == addr(port))
            .unwrap()
            .weight
    };
    assert_eq!((weight(&members, 1), weight(&members, 2)), (100, 7));

    let host = policy(
        &[(
            "w",
            r#"{"kind":"weight","overrides":[{"address":"127.0.0.1","weight":3}]}"#,
        )],
        &me,
    );
    members.reweigh(&host);
    assert_eq!(
        (weight(&members, 1), weight(&members, 2)),
        (3, 3),
        "a host override covers each of its ports"
    );
    members.reweigh(&ConsumerPolicy::default());
    assert_eq!(
        (weight(&members, 1), weight(&members, 2)),
        (100, 100),
        "no rule: the registered weight"
    );
}

fn directory(instances: &[Instance], zone: &str) -> Directory {
    let mut members = Members::default();
    apply(&mut members, &Update::Reset(instances), &ConsumerPolicy::default());
    let mut directory = Directory::fixed(Vec::new());
    directory.members = Arc::new(RwLock::new(members));
    directory.zone = zone.to_owned();
    directory
}

fn routed(directory: &Directory, policy: &ConsumerPolicy) -> Vec<u16> {
    let mut ports: Vec<u16> = directory
        .route("SayHello", policy)
        .iter()
        .map(|m| m.endpoint.addr().port())
        .collect();
    ports.sort_unstable();
    ports
}

#[test]
fn routes_narrow_the_members_to_those_they_select() {
    let providers = [
        labelled(1, "a", ("env", "gray")),
        labelled(2, "a", ("env", "prod")),
        labelled(3, "b", ("env", "prod")),
    ];
    let directory = directory(&providers, "a");
    let gray = ConsumerIdentity {
        labels: HashMap::from([("env".to_owned(), "gray".to_owned())]),
        ..ConsumerIdentity::default()
    };
    let route = r#"{"kind":"route","when":{"labels":{"env":"gray"}},"then":{"env":"gray"}}"#;
    assert_eq!(
        routed(&directory, &policy(&[("r", route)], &gray)),
        [1],
        "a gray consumer calls gray providers"
    );
    let plain = ConsumerIdentity::default();
    assert_eq!(
        routed(&directory, &policy(&[("r", route)], &plain)),
        [1, 2, 3],
        "the route does not apply to others"
    );

    let nowhere = r#"{"kind":"route","when":{"labels":{"env":"gray"}},"then":{"env":"none"}}"#;
    assert_eq!(
        routed(&directory, &policy(&[("r", nowhere)], &gray)),
        [1, 2, 3],
        "a route that selects nobody is ignored"
    );
    let forced = r#"{"kind":"route","when":{"labels":{"env":"gray"}},"then":{"env":"none"},"force":true}"#;
    assert!(
        routed(&directory, &policy(&[("r", forced)], &gray)).is_empty(),
        "unless forced"
    );
}

#[test]
fn zone_affinity_keeps_calls_in_the_consumers_zone() {
    let providers = [
        labelled(1, "a", ("env", "prod")),
        labelled(2, "a", ("env", "prod")),
        labelled(3, "b", ("env", "prod")),
    ];
    let me = ConsumerIdentity {
        zone: "a".into(),
        ..ConsumerIdentity::default()
    };
    let affinity = policy(&[("z", r#"{"kind":"zone_affinity","min_healthy_share":0.5}"#)], &me);
    assert_eq!(routed(&directory(&providers, "a"), &affinity), [1, 2]);
    assert_eq!(
        routed(&directory(&providers, "c"), &affinity),
        [1, 2, 3],
        "no provider in the zone: all of them"
    );
}
