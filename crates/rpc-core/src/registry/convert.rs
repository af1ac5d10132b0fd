//! Conversions between the registry's protobuf types and rpc-core's.

use tern_proto::registry as pb;

use crate::ServiceKey;

impl From<&pb::ServiceKey> for ServiceKey {
    fn from(key: &pb::ServiceKey) -> ServiceKey {
        ServiceKey::new(key.interface.clone(), key.version.clone(), key.group.clone())
    }
}

/// Takes the parts over (a pushed message's key, looked up once and then dropped).
impl From<pb::ServiceKey> for ServiceKey {
    fn from(key: pb::ServiceKey) -> ServiceKey {
        ServiceKey::new(key.interface, key.version, key.group)
    }
}

impl From<&ServiceKey> for pb::ServiceKey {
    fn from(key: &ServiceKey) -> pb::ServiceKey {
        pb::ServiceKey {
            interface: key.interface.clone(),
            version: key.version.clone(),
            group: key.group.clone(),
        }
    }
}

/// `host:port` of an instance: its identity within a service.
pub fn instance_addr(instance: &pb::Instance) -> String {
    addr_of(&instance.host, instance.port)
}

/// `host:port`, with brackets around an IPv6 host.
///
/// Built without `format!`: a subscriber makes one for every instance a
/// delta adds, and a storm's delta adds hundreds.
pub fn addr_of(host: &str, port: u32) -> String {
    let mut digits = itoa::Buffer::new();
    let port = digits.format(port);
    let mut addr = String::with_capacity(host.len() + port.len() + 3);
    if host.contains(':') {
        addr.push('[');
        addr.push_str(host);
        addr.push(']');
    } else {
        addr.push_str(host);
    }
    addr.push(':');
    addr.push_str(port);
    addr
}

#[cfg(test)]
mod tests {
    use super::addr_of;

    #[test]
    fn addresses_bracket_ipv6_hosts_only() {
        assert_eq!(addr_of("10.0.0.7", 20880), "10.0.0.7:20880");
        assert_eq!(addr_of("provider.local", 0), "provider.local:0");
        assert_eq!(addr_of("::1", 4_294_967_295), "[::1]:4294967295");
    }
}
