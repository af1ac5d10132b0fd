//! Unit tests of `bench peers`: the peers' key and node names.

use super::etcd::prefix_end;
use super::provider_url;
use super::zookeeper::{url_encode, zk_node_address};

#[test]
fn zookeeper_node_names_round_trip_the_address() {
    let node = url_encode(&provider_url("bench.Probe", 40_001));
    assert!(!node.contains('/'), "{node}");
    assert_eq!(zk_node_address(&node).as_deref(), Some("127.0.0.1:40001"));
}

#[test]
fn prefix_end_covers_the_prefix() {
    assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
}
