//! What a registered instance must be: its size, host, port and weight
//! checked before it enters the map.

use prost::Message;
use rpc_core::ServiceKey;
use tern_proto::registry::Instance;

use super::answer::RequestError;
use super::map::Registry;

impl Registry {
    pub(super) fn validate_instance(&self, key: &ServiceKey, instance: &Instance) -> Result<(), RequestError> {
        let size = instance.encoded_len();
        if size > self.config.max_instance_bytes {
            return Err(RequestError::TooLarge(format!(
                "{key} instance is {size} bytes, more than {}",
                self.config.max_instance_bytes
            )));
        }
        let host = &instance.host;
        let host_ok = host.parse::<std::net::IpAddr>().is_ok()
            || (!host.is_empty()
                && host.len() <= 253
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && !host.starts_with(['.', '-']));
        if !host_ok {
            return Err(RequestError::Invalid(format!(
                "{key} instance has invalid host {host:?}"
            )));
        }
        if instance.port == 0 || instance.port > u32::from(u16::MAX) {
            return Err(RequestError::Invalid(format!(
                "{key} instance {host} has invalid port {}",
                instance.port
            )));
        }
        if instance.weight > self.config.max_weight {
            return Err(RequestError::Invalid(format!(
                "{key} instance {host}:{} has weight {}, more than {}",
                instance.port, instance.weight, self.config.max_weight
            )));
        }
        Ok(())
    }
}
