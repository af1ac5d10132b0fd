//! A provider's `host:port`: its identity within a service, and the key of
//! every provider map (a node's [`ProviderList`](super::ProviderList), the
//! ConfigServer's registry).

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use compact_str::CompactString;

/// `host:port`, with brackets around an IPv6 host.
///
/// Up to 24 bytes (every IPv4 address with its port, most host names) it
/// is held inline, without an allocation of its own. A subscriber makes one
/// for every provider a pushed list or delta names, and walks thousands of
/// them in order when a list is compared or rebuilt: inline, comparing two
/// of them reads no other memory.
///
/// It borrows as `str`, so maps keyed by it are looked up with a `&str`:
/// `list.providers.get("10.0.0.7:20880")`. It compares, orders and hashes
/// as that text does.
#[derive(Clone, Default)]
pub struct Addr(CompactString);

impl Addr {
    /// The address of `host` and `port`.
    pub fn new(host: &str, port: u32) -> Addr {
        let mut digits = itoa::Buffer::new();
        let port = digits.format(port);
        let ipv6 = host.contains(':');
        // Exactly: a capacity over 24 bytes would put it on the heap.
        let len = host.len() + 1 + port.len() + if ipv6 { 2 } else { 0 };
        let mut addr = CompactString::with_capacity(len);
        if ipv6 {
            addr.push('[');
            addr.push_str(host);
            addr.push(']');
        } else {
            addr.push_str(host);
        }
        addr.push(':');
        addr.push_str(port);
        Addr(addr)
    }

    // Inlined into callers in other crates: the comparisons of a map
    // search or an ordered walk are mostly this.
    #[inline]
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for Addr {
    #[inline]
    fn eq(&self, other: &Addr) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Addr {}

impl PartialOrd for Addr {
    #[inline]
    fn partial_cmp(&self, other: &Addr) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Addr {
    #[inline]
    fn cmp(&self, other: &Addr) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for Addr {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Deref for Addr {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Addr {
    #[inline]
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Addr {
    #[inline]
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Taken as given (an address read off the wire).
impl From<&str> for Addr {
    fn from(addr: &str) -> Addr {
        Addr(addr.into())
    }
}

impl From<String> for Addr {
    fn from(addr: String) -> Addr {
        Addr(addr.into())
    }
}

impl From<Addr> for String {
    fn from(addr: Addr) -> String {
        addr.0.into_string()
    }
}

/// As its text.
impl serde::Serialize for Addr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Addr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Addr, D::Error> {
        String::deserialize(deserializer).map(Addr::from)
    }
}

impl PartialEq<str> for Addr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Addr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Addr {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::Addr;

    #[test]
    fn addresses_bracket_ipv6_hosts_only() {
        assert_eq!(Addr::new("10.0.0.7", 20880), "10.0.0.7:20880");
        assert_eq!(Addr::new("provider.local", 0), "provider.local:0");
        assert_eq!(Addr::new("::1", 4_294_967_295), "[::1]:4294967295");
        let long = "a-provider-host-name-longer-than-any-inline-string.example";
        assert_eq!(Addr::new(long, 1), format!("{long}:1"));
        // 24 bytes: still inline.
        assert!(!Addr::new("100.100.100.100", 65535).0.is_heap_allocated());
        assert!(!Addr::new("provider-117.local", 20880).0.is_heap_allocated());
    }

    proptest! {
        /// Maps keyed by `Addr` keep the order, and answer the lookups, of
        /// maps keyed by the same text as `String`.
        #[test]
        fn orders_and_looks_up_as_its_text(hosts in proptest::collection::vec("[a-z0-9.:-]{0,40}", 0..40), port in any::<u32>()) {
            let by_addr: BTreeMap<Addr, usize> = hosts.iter().enumerate().map(|(i, h)| (Addr::new(h, port), i)).collect();
            let by_text: BTreeMap<String, usize> = by_addr.iter().map(|(a, &i)| (a.to_string(), i)).collect();
            prop_assert!(by_addr.keys().map(|a| a.as_str()).eq(by_text.keys().map(String::as_str)));
            for text in by_text.keys() {
                prop_assert_eq!(by_addr.get(text.as_str()), by_text.get(text));
            }
        }
    }
}
