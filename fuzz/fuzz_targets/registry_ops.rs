//! Arbitrary control-plane requests against the registry: any sequence of
//! registrations (with arbitrary hosts, ports, weights, keys), removals,
//! subscriptions, session closes and flushes must never panic, and a
//! subscriber applying every push must end up with the registry's list.

#![no_main]

use std::collections::BTreeSet;
use std::time::Duration;

use configserver::outgoing::Outgoing;
use configserver::service_map::{NodeInfo, Registry, RegistryConfig};
use libfuzzer_sys::fuzz_target;
use rpc_core::ServiceKey;
use rpc_core::registry::Addr;
use rpc_core::registry::convert::instance_addr;
use tern_proto::registry::{Instance, server_message};

fuzz_target!(|data: &[u8]| {
    let registry = Registry::new(RegistryConfig {
        startup_grace: Duration::ZERO,
        history_len: 4,
        max_catch_up_deltas: 2,
        ..RegistryConfig::default()
    });
    let key = ServiceKey::new("demo.Fuzz", "1", "");
    let node = |i: u8| NodeInfo {
        app: format!("app{}", i % 3),
        host: "10.0.0.1".into(),
        ..NodeInfo::default()
    };
    let mut sessions: Vec<u64> = (0..3).map(|i| registry.open_session(node(i)).0).collect();
    let (subscriber, _) = registry.open_session(node(9));
    registry.subscribe(subscriber, key.clone(), None).unwrap();
    let mut held: BTreeSet<Addr> = BTreeSet::new();
    let mut revision = None;

    for op in data.chunks(4) {
        let [kind, a, b, c] = [
            op[0],
            *op.get(1).unwrap_or(&0),
            *op.get(2).unwrap_or(&0),
            *op.get(3).unwrap_or(&0),
        ];
        let session = sessions[usize::from(a) % 3];
        match kind % 6 {
            0 => {
                let instance = Instance {
                    host: if c % 7 == 0 {
                        "bad host".into()
                    } else {
                        "127.0.0.1".into()
                    },
                    port: u32::from(b) * if c % 11 == 0 { 1000 } else { 1 },
                    weight: u32::from(c) * 50,
                    ..Instance::default()
                };
                let key = if c % 13 == 0 {
                    ServiceKey::new("bad key", "", "")
                } else {
                    key.clone()
                };
                let _ = registry.register(session, key, instance);
            }
            1 => {
                let _ = registry.unregister(session, &key, "127.0.0.1", u32::from(b));
            }
            2 => {
                registry.close_session(session, "fuzz");
                sessions[usize::from(a) % 3] = registry.open_session(node(a)).0;
            }
            3 => {
                registry.flush();
            }
            4 => registry
                .subscribe(subscriber, key.clone(), None)
                .map(|_| revision = None)
                .unwrap(),
            _ => {
                let (messages, now) = registry.catch_up(&key, revision);
                for message in messages.iter().map(Outgoing::to_message) {
                    match message.body {
                        Some(server_message::Body::Snapshot(s)) => {
                            held = s.providers.iter().map(instance_addr).collect()
                        }
                        Some(server_message::Body::Delta(d)) => {
                            for addr in &d.removed {
                                held.remove(addr.as_str());
                            }
                            held.extend(d.added.iter().chain(&d.updated).map(instance_addr));
                        }
                        _ => {}
                    }
                }
                revision = Some(now);
            }
        }
    }
    registry.flush();
    let (messages, _) = registry.catch_up(&key, revision);
    for message in messages.iter().map(Outgoing::to_message) {
        match message.body {
            Some(server_message::Body::Snapshot(s)) => held = s.providers.iter().map(instance_addr).collect(),
            Some(server_message::Body::Delta(d)) => {
                for addr in &d.removed {
                    held.remove(addr.as_str());
                }
                held.extend(d.added.iter().chain(&d.updated).map(instance_addr));
            }
            _ => {}
        }
    }
    let truth: BTreeSet<Addr> = registry
        .detail(&key)
        .map(|(_, p, _)| p.iter().map(instance_addr).collect())
        .unwrap_or_default();
    assert_eq!(held, truth);
});
