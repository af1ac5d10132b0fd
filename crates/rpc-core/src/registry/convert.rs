//! Conversions between the registry's protobuf types and rpc-core's.

use tern_proto::registry as pb;

use super::Addr;
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
pub fn instance_addr(instance: &pb::Instance) -> Addr {
    Addr::new(&instance.host, instance.port)
}
