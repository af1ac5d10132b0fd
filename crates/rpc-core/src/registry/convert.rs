//! Conversions between the registry's protobuf types and rpc-core's.

use tern_proto::registry as pb;

use crate::ServiceKey;

impl From<&pb::ServiceKey> for ServiceKey {
    fn from(key: &pb::ServiceKey) -> ServiceKey {
        ServiceKey::new(key.interface.clone(), key.version.clone(), key.group.clone())
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
pub fn addr_of(host: &str, port: u32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
