use proptest::prelude::*;
use tern_proto::registry::{ServerMessage, server_message};

use super::*;

fn instance(port: u32) -> Instance {
    Instance {
        host: "10.0.0.1".into(),
        port,
        weight: 100,
        app: "app".into(),
        protocol: "tern".into(),
        start_time_ms: 1_700_000_000_000,
        ..Instance::default()
    }
}

fn delta(added: Vec<Instance>, removed: Vec<String>, updated: Vec<Instance>) -> Delta {
    Delta {
        service: Some(pb::ServiceKey {
            interface: "demo.Greeter".into(),
            version: "1.0.0".into(),
            group: String::new(),
        }),
        from_revision: 7,
        to_revision: 9,
        added,
        removed,
        updated,
    }
}

fn frame(delta: Delta) -> Vec<u8> {
    ServerMessage {
        request_id: 0,
        body: Some(server_message::Body::Delta(delta)),
    }
    .encode_to_vec()
}

/// What prost decodes `frame` to, as a pushed delta, if it is one.
fn as_prost_reads_it(frame: &[u8]) -> Option<Delta> {
    match ServerMessage::decode(frame).ok()?.body? {
        server_message::Body::Delta(delta) => Some(delta),
        _ => None,
    }
}

#[test]
fn a_delta_is_read_in_place_as_prost_decodes_it() {
    let sent = delta(
        vec![instance(1), instance(2)],
        vec!["10.0.0.1:3".into(), "10.0.0.1:4".into()],
        vec![instance(5)],
    );
    let bytes = frame(sent.clone());
    let read = PushedDelta::read(&bytes).expect("a plain delta is read in place");
    let mut decoded = as_prost_reads_it(&bytes).unwrap();
    assert_eq!(read, PushedDelta::from_message(&mut decoded));
    assert_eq!(read.removed, ["10.0.0.1:3", "10.0.0.1:4"]);
    let frame_range = bytes.as_ptr_range();
    assert!(
        read.removed.iter().all(|addr| frame_range.contains(&addr.as_ptr())),
        "removed addresses point into the frame"
    );
}

#[test]
fn other_messages_and_unusual_frames_are_left_to_prost() {
    let snapshot = ServerMessage {
        request_id: 0,
        body: Some(server_message::Body::Snapshot(pb::Snapshot::default())),
    };
    assert_eq!(PushedDelta::read(&snapshot.encode_to_vec()), None);
    // Two deltas in one frame: prost merges them, so it decodes this one.
    let two = [
        frame(delta(vec![instance(1)], vec![], vec![])),
        frame(delta(vec![], vec!["a:1".into()], vec![])),
    ]
    .concat();
    assert_eq!(PushedDelta::read(&two), None);
    // A removed address that is not UTF-8.
    let mut bad = frame(delta(vec![], vec!["10.0.0.1:3".into()], vec![]));
    let at = bad.windows(3).position(|w| w == b"10.").unwrap();
    bad[at] = 0xff;
    assert_eq!(PushedDelta::read(&bad), None);
    assert!(ServerMessage::decode(&bad[..]).is_err(), "and prost says why");
}

fn instances() -> impl Strategy<Value = Vec<Instance>> {
    proptest::collection::vec((any::<u32>(), "[a-z0-9.]{0,30}", any::<u32>()), 0..4).prop_map(|v| {
        v.into_iter()
            .map(|(port, host, weight)| Instance {
                host: host.into(),
                port,
                weight,
                ..Instance::default()
            })
            .collect()
    })
}

proptest! {
    /// Whatever a delta holds, it is read as prost decodes it.
    #[test]
    fn any_delta_is_read_as_prost_decodes_it(
        added in instances(),
        updated in instances(),
        removed in proptest::collection::vec(".{0,30}", 0..4),
    ) {
        let bytes = frame(delta(added, removed, updated));
        let read = PushedDelta::read(&bytes).expect("a delta the server could send is read in place");
        let mut decoded = as_prost_reads_it(&bytes).unwrap();
        prop_assert_eq!(read, PushedDelta::from_message(&mut decoded));
    }

    /// Any bytes, after a valid delta or alone: what is read in place is
    /// what prost decodes.
    #[test]
    fn any_bytes_read_in_place_are_what_prost_decodes(
        bytes in proptest::collection::vec(any::<u8>(), 0..96),
        added in instances(),
    ) {
        let valid = frame(delta(added, vec!["10.0.0.1:1".into()], vec![]));
        for input in [bytes.clone(), [valid, bytes].concat()] {
            if let Some(read) = PushedDelta::read(&input) {
                let decoded = as_prost_reads_it(&input);
                prop_assert!(decoded.is_some(), "{:?}: read in place, but prost: {:?}", input, ServerMessage::decode(&input[..]));
                let mut decoded = decoded.unwrap();
                prop_assert_eq!(read, PushedDelta::from_message(&mut decoded));
            }
        }
    }
}
