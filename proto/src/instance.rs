//! `tern.registry.Instance`, written out rather than generated.
//!
//! Its text fields are [`CompactString`]s: up to 24 bytes (a host, an app
//! name, a protocol, a zone) they are held inline, so decoding, cloning
//! and dropping an instance allocates nothing for them. A subscriber
//! decodes one for every provider a pushed list or delta names (hundreds in
//! a storm, each once per subscriber); the ConfigServer keeps every
//! registered one and copies it into each change it publishes. Generated,
//! each of those copies would allocate three strings, and free them again.
//!
//! The wire format is the message's in `registry.proto`, field for field;
//! the tests check it against a prost-generated twin.

use std::cell::RefCell;
use std::collections::HashMap;

use bytes::{Buf, BufMut};
pub use compact_str::CompactString;
use prost::DecodeError;
use prost::encoding::{
    DecodeContext, WireType, check_wire_type, decode_varint, encode_key, encode_varint, encoded_len_varint, hash_map,
    int64, key_len, skip_field, string, uint32,
};

/// One provider of one service.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct Instance {
    pub host: CompactString,
    pub port: u32,
    /// Relative share of traffic (default 100; 0 = none).
    pub weight: u32,
    pub zone: CompactString,
    pub app: CompactString,
    /// Data-plane protocol, "tern" for this framework.
    pub protocol: CompactString,
    /// When the provider process started, Unix milliseconds (drives warm-up).
    pub start_time_ms: i64,
    pub metadata: HashMap<String, String>,
}

impl prost::Message for Instance {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_str(1, &self.host, buf);
        if self.port != 0 {
            uint32::encode(2, &self.port, buf);
        }
        if self.weight != 0 {
            uint32::encode(3, &self.weight, buf);
        }
        encode_str(4, &self.zone, buf);
        encode_str(5, &self.app, buf);
        encode_str(6, &self.protocol, buf);
        if self.start_time_ms != 0 {
            int64::encode(7, &self.start_time_ms, buf);
        }
        hash_map::encode(
            string::encode,
            string::encoded_len,
            string::encode,
            string::encoded_len,
            8,
            &self.metadata,
            buf,
        );
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let field = |name: &'static str| {
            move |mut e: DecodeError| {
                e.push("Instance", name);
                e
            }
        };
        match tag {
            1 => merge_str(&mut self.host, wire_type, buf, ctx).map_err(field("host")),
            2 => uint32::merge(wire_type, &mut self.port, buf, ctx).map_err(field("port")),
            3 => uint32::merge(wire_type, &mut self.weight, buf, ctx).map_err(field("weight")),
            4 => merge_str(&mut self.zone, wire_type, buf, ctx).map_err(field("zone")),
            5 => merge_str(&mut self.app, wire_type, buf, ctx).map_err(field("app")),
            6 => merge_str(&mut self.protocol, wire_type, buf, ctx).map_err(field("protocol")),
            7 => int64::merge(wire_type, &mut self.start_time_ms, buf, ctx).map_err(field("start_time_ms")),
            // The wire type checked first, as prost's generated code does.
            8 => check_wire_type(WireType::LengthDelimited, wire_type)
                .and_then(|()| hash_map::merge(string::merge, string::merge, &mut self.metadata, buf, ctx))
                .map_err(field("metadata")),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        str_len(1, &self.host)
            + if self.port != 0 {
                uint32::encoded_len(2, &self.port)
            } else {
                0
            }
            + if self.weight != 0 {
                uint32::encoded_len(3, &self.weight)
            } else {
                0
            }
            + str_len(4, &self.zone)
            + str_len(5, &self.app)
            + str_len(6, &self.protocol)
            + if self.start_time_ms != 0 {
                int64::encoded_len(7, &self.start_time_ms)
            } else {
                0
            }
            + hash_map::encoded_len(string::encoded_len, string::encoded_len, 8, &self.metadata)
    }

    fn clear(&mut self) {
        *self = Instance::default();
    }
}

impl Instance {
    /// Decodes an instance from `bytes` (one encoded `Instance`, without a
    /// length prefix) in one pass over the slice, its strings copied
    /// straight from it: what a subscriber does for every provider a pushed
    /// delta names. `None` where the bytes are anything but well-formed
    /// fields of the right wire types (a length that overruns, a string
    /// that is not UTF-8, ...): decode with [`prost::Message::decode`]
    /// then, which says what is wrong. Where this returns an instance,
    /// prost's decoding returns the same one.
    pub fn decode_fast(mut bytes: &[u8]) -> Option<Instance> {
        let mut instance = Instance::default();
        while !bytes.is_empty() {
            let key = decode_varint(&mut bytes).ok()?;
            if key > u64::from(u32::MAX) {
                return None; // prost refuses such a key
            }
            let (tag, wire_type) = (key >> 3, key & 7);
            match (tag, wire_type) {
                (1 | 4 | 5 | 6, 2) => {
                    let text = take_str(&mut bytes)?;
                    let field = match tag {
                        1 => &mut instance.host,
                        4 => &mut instance.zone,
                        5 => &mut instance.app,
                        _ => &mut instance.protocol,
                    };
                    *field = CompactString::new(text);
                }
                (2, 0) => instance.port = decode_varint(&mut bytes).ok()? as u32,
                (3, 0) => instance.weight = decode_varint(&mut bytes).ok()? as u32,
                (7, 0) => instance.start_time_ms = decode_varint(&mut bytes).ok()? as i64,
                (8, 2) => hash_map::merge(
                    string::merge,
                    string::merge,
                    &mut instance.metadata,
                    &mut bytes,
                    DecodeContext::default(),
                )
                .ok()?,
                // A known field with another wire type: prost refuses it.
                (1..=8, _) => return None,
                (tag, _) => {
                    let tag = u32::try_from(tag).ok().filter(|&t| t > 0)?;
                    let wire_type = WireType::try_from(wire_type).ok()?;
                    skip_field(wire_type, tag, &mut bytes, DecodeContext::default()).ok()?;
                }
            }
        }
        Some(instance)
    }
}

/// A length-delimited UTF-8 string, borrowed from `bytes`.
fn take_str<'a>(bytes: &mut &'a [u8]) -> Option<&'a str> {
    let len = usize::try_from(decode_varint(bytes).ok()?).ok()?;
    let (text, rest) = (bytes.get(..len)?, bytes.get(len..)?);
    *bytes = rest;
    std::str::from_utf8(text).ok()
}

/// A string field, left out when empty (proto3).
fn encode_str(tag: u32, value: &str, buf: &mut impl BufMut) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value.as_bytes());
    }
}

fn str_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
    }
}

thread_local! {
    /// Where a string field is decoded before it is copied inline: reused,
    /// so decoding allocates nothing once it has grown to the longest field.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A longer scratch string is let go after use rather than kept.
const KEEP_SCRATCH: usize = 1024;

/// Decodes a string field into `value`. prost's own string decoding does
/// the reading and checking, so a bad field fails as it would for a
/// generated message, with prost's error.
fn merge_str(
    value: &mut CompactString,
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    SCRATCH.with_borrow_mut(|scratch| {
        let read = string::merge(wire_type, scratch, buf, ctx);
        // As prost leaves a generated message's string: cleared on an error.
        match read {
            Ok(()) => *value = CompactString::new(scratch.as_str()),
            Err(_) => value.clear(),
        }
        if scratch.capacity() > KEEP_SCRATCH {
            *scratch = String::new();
        }
        read
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use prost::Message;

    use super::Instance;

    /// What prost generates from `registry.proto` for the same message.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(string, tag = "1")]
        host: String,
        #[prost(uint32, tag = "2")]
        port: u32,
        #[prost(uint32, tag = "3")]
        weight: u32,
        #[prost(string, tag = "4")]
        zone: String,
        #[prost(string, tag = "5")]
        app: String,
        #[prost(string, tag = "6")]
        protocol: String,
        #[prost(int64, tag = "7")]
        start_time_ms: i64,
        #[prost(map = "string, string", tag = "8")]
        metadata: HashMap<String, String>,
    }

    fn same(ours: &Instance, generated: &Generated) -> bool {
        ours.host == generated.host
            && ours.port == generated.port
            && ours.weight == generated.weight
            && ours.zone == generated.zone
            && ours.app == generated.app
            && ours.protocol == generated.protocol
            && ours.start_time_ms == generated.start_time_ms
            && ours.metadata == generated.metadata
    }

    fn generated() -> impl Strategy<Value = Generated> {
        let text = || prop_oneof![Just(String::new()), "[a-z0-9.:-]{1,12}", ".{0,40}"];
        (
            (text(), any::<u32>(), any::<u32>(), text()),
            (text(), text(), any::<i64>()),
            proptest::collection::hash_map(".{0,8}", ".{0,8}", 0..3),
        )
            .prop_map(
                |((host, port, weight, zone), (app, protocol, start_time_ms), metadata)| Generated {
                    host,
                    port,
                    weight,
                    zone,
                    app,
                    protocol,
                    start_time_ms,
                    metadata,
                },
            )
    }

    /// The fields `registry.proto` gives `Instance` are the ones encoded and
    /// decoded here (and mirrored by `Generated`): a field added there
    /// fails this test until it is added to both.
    #[test]
    fn has_the_fields_of_the_proto() {
        use prost_types::field_descriptor_proto::{Label, Type};
        let files = protox::compile(["registry.proto"], ["."]).expect("registry.proto compiles");
        let instance = files
            .file
            .iter()
            .flat_map(|file| &file.message_type)
            .find(|message| message.name() == "Instance")
            .expect("registry.proto has Instance");
        let fields: Vec<(&str, i32, Type, Label)> = instance
            .field
            .iter()
            .map(|f| (f.name(), f.number(), f.r#type(), f.label()))
            .collect();
        let one = Label::Optional;
        assert_eq!(
            fields,
            [
                ("host", 1, Type::String, one),
                ("port", 2, Type::Uint32, one),
                ("weight", 3, Type::Uint32, one),
                ("zone", 4, Type::String, one),
                ("app", 5, Type::String, one),
                ("protocol", 6, Type::String, one),
                ("start_time_ms", 7, Type::Int64, one),
                ("metadata", 8, Type::Message, Label::Repeated),
            ]
        );
        let entry = instance
            .nested_type
            .iter()
            .find(|m| m.name() == "MetadataEntry")
            .expect("metadata is a map");
        let kinds: Vec<Type> = entry.field.iter().map(|f| f.r#type()).collect();
        assert_eq!(kinds, [Type::String, Type::String], "map<string, string>");
    }

    #[test]
    fn short_text_is_held_inline() {
        let instance = Instance {
            host: "10.200.300.400".into(),
            app: "order-service-provider".into(),
            protocol: "tern".into(),
            ..Instance::default()
        };
        let decoded = Instance::decode(&instance.encode_to_vec()[..]).unwrap();
        assert_eq!(decoded, instance);
        for text in [&decoded.host, &decoded.app, &decoded.protocol] {
            assert!(!text.is_heap_allocated(), "{text:?}");
        }
    }

    proptest! {
        /// Each encodes what the other decodes to the same values, and both
        /// encode the same bytes (map entries aside, whose order a hash map
        /// does not fix).
        #[test]
        fn matches_the_generated_message(generated in generated()) {
            let ours = Instance::decode(&generated.encode_to_vec()[..]).unwrap();
            prop_assert!(same(&ours, &generated), "{ours:?} vs {generated:?}");
            prop_assert_eq!(ours.encoded_len(), generated.encoded_len());
            let back = Generated::decode(&ours.encode_to_vec()[..]).unwrap();
            prop_assert_eq!(&back, &generated);
            if generated.metadata.len() < 2 {
                prop_assert_eq!(ours.encode_to_vec(), generated.encode_to_vec());
            }
        }

        /// The one-pass decoder decodes what prost decodes, to the same
        /// instance, and refuses what prost refuses.
        #[test]
        fn the_one_pass_decoder_agrees_with_prost(bytes in proptest::collection::vec(any::<u8>(), 0..64), valid in generated()) {
            let encoded = valid.encode_to_vec();
            let fast = Instance::decode_fast(&encoded).expect("a valid instance decodes in one pass");
            prop_assert!(same(&fast, &valid), "{fast:?} vs {valid:?}");
            for input in [bytes.clone(), [encoded, bytes].concat()] {
                match (Instance::decode_fast(&input), Instance::decode(&input[..])) {
                    (Some(fast), Ok(prost)) => prop_assert_eq!(fast, prost),
                    (Some(fast), Err(e)) => prop_assert!(false, "{input:?}: one pass {fast:?}, prost {e}"),
                    (None, _) => {} // decoded by prost then, whatever it says
                }
            }
        }

        /// Any bytes: both decode them, to the same values, or both refuse
        /// them with the same error. Unknown fields are skipped alike.
        #[test]
        fn decodes_any_bytes_as_the_generated_message(bytes in proptest::collection::vec(any::<u8>(), 0..64), valid in generated()) {
            for input in [bytes.clone(), [valid.encode_to_vec(), bytes].concat()] {
                match (Instance::decode(&input[..]), Generated::decode(&input[..])) {
                    (Ok(ours), Ok(generated)) => prop_assert!(same(&ours, &generated), "{ours:?} vs {generated:?}"),
                    // The same error, at the same field.
                    (Err(ours), Err(generated)) => prop_assert_eq!(
                        ours.to_string(),
                        generated.to_string().replace("Generated.", "Instance.")
                    ),
                    (ours, generated) => prop_assert!(false, "{input:?}: ours {ours:?}, generated {generated:?}"),
                }
            }
        }
    }
}
