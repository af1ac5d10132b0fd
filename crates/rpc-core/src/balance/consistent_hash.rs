//! Consistent hashing: each provider owns `replicas` points (160 by
//! default) on a 64-bit ring; a call goes to the owner of the first point at
//! or after its key's hash. When one of N providers leaves, only the keys it
//! owned move (about 1/N); every other key stays where it was.
//!
//! The key is chosen per method: an argument field or an attachment, given
//! as bytes in [`PickContext::hash_key`]. Without a key, the pick is random.

use std::net::SocketAddr;
use std::sync::Mutex;

use super::{Candidate, LoadBalance, PickContext, Random};

pub const DEFAULT_REPLICAS: usize = 160;

/// A candidate set's signature and its sorted ring points.
type Ring = (u64, Vec<(u64, SocketAddr)>);

#[derive(Debug)]
pub struct ConsistentHash {
    replicas: usize,
    /// The ring of the last candidate set.
    ring: Mutex<Option<Ring>>,
    fallback: Random,
}

impl ConsistentHash {
    pub fn new() -> ConsistentHash {
        ConsistentHash::with_replicas(DEFAULT_REPLICAS)
    }

    pub fn with_replicas(replicas: usize) -> ConsistentHash {
        ConsistentHash {
            replicas: replicas.max(1),
            ring: Mutex::new(None),
            fallback: Random::new(),
        }
    }

    fn build(&self, candidates: &[Candidate<'_>]) -> Vec<(u64, SocketAddr)> {
        let mut ring = Vec::with_capacity(candidates.len() * self.replicas);
        for c in candidates {
            for i in 0..self.replicas {
                ring.push((hash(format!("{}#{i}", c.addr).as_bytes()), c.addr));
            }
        }
        ring.sort_unstable();
        ring
    }
}

impl Default for ConsistentHash {
    fn default() -> ConsistentHash {
        ConsistentHash::new()
    }
}

impl LoadBalance for ConsistentHash {
    fn pick(&self, candidates: &[Candidate<'_>], ctx: &PickContext<'_>) -> usize {
        let Some(key) = ctx.hash_key else {
            return self.fallback.pick(candidates, ctx);
        };
        let mut addrs: Vec<SocketAddr> = candidates.iter().map(|c| c.addr).collect();
        addrs.sort_unstable();
        let signature = hash(format!("{addrs:?}").as_bytes());
        let mut ring = self.ring.lock().expect("ring lock");
        if ring.as_ref().is_none_or(|(s, _)| *s != signature) {
            *ring = Some((signature, self.build(candidates)));
        }
        let (_, points) = ring.as_ref().expect("built above");
        let h = hash(key);
        let at = points.partition_point(|(p, _)| *p < h) % points.len();
        let owner = points[at].1;
        candidates
            .iter()
            .position(|c| c.addr == owner)
            .expect("ring built from these candidates")
    }
}

/// FNV-1a, then the murmur3 finalizer for a well-spread 64-bit value.
/// Stable across runs and platforms (unlike `DefaultHasher`).
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn owners(balancer: &ConsistentHash, list: &[Candidate<'_>], keys: usize) -> Vec<SocketAddr> {
        (0..keys)
            .map(|k| {
                let key = format!("user-{k}");
                let ctx = PickContext {
                    hash_key: Some(key.as_bytes()),
                    ..PickContext::default()
                };
                list[balancer.pick(list, &ctx)].addr
            })
            .collect()
    }

    #[test]
    fn removing_one_of_n_moves_only_its_keys() {
        let n = 10;
        let loads = loads(n);
        let all = candidates(&[100; 10], &loads);
        let balancer = ConsistentHash::new();
        let before = owners(&balancer, &all, 100_000);
        let removed = all[3].addr;
        let remaining: Vec<_> = all.iter().copied().filter(|c| c.addr != removed).collect();
        let after = owners(&balancer, &remaining, 100_000);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        for (b, a) in before.iter().zip(&after) {
            if *b != removed {
                assert_eq!(b, a, "a key not on the removed provider moved");
            }
        }
        let moved_share = moved as f64 / 100_000.0;
        assert!(moved_share <= 1.5 / n as f64, "{moved_share:.4} of keys moved");
        assert!(
            moved_share > 0.5 / n as f64,
            "{moved_share:.4}: the removed provider held too few keys"
        );
    }

    #[test]
    fn same_key_same_provider() {
        let loads = loads(5);
        let list = candidates(&[100; 5], &loads);
        let balancer = ConsistentHash::new();
        assert_eq!(owners(&balancer, &list, 1000), owners(&balancer, &list, 1000));
    }
}
