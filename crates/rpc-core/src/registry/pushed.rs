//! A pushed delta read in place: what a subscriber does with every delta
//! the ConfigServer sends it, hundreds of entries each in a storm.
//!
//! Decoded as a generated message, a delta costs an allocation per removed
//! address, and each added instance goes through prost's generic field
//! loop and a scratch string per text field. Read here, a removed address
//! is a `&str` into the frame (no copy), and an instance is decoded in one
//! pass over its bytes ([`Instance::decode_fast`]), its strings copied
//! straight into their inline storage. Anything unusual about a frame (a
//! field of the wrong wire type, a body repeated, another body after the
//! delta) makes [`PushedDelta::read`] return `None`, and the frame is then
//! decoded whole by prost, which applies the wire format's every rule and
//! names what is wrong.

use prost::Message;
use tern_proto::registry::{self as pb, Delta, Instance};

use super::framing::{Field, scan_field};
use super::list::Update;

/// `ServerMessage` fields.
const REQUEST_ID: u32 = 1;
const DELTA: u32 = 4;
/// The bodies of `ServerMessage`'s oneof.
const BODIES: std::ops::RangeInclusive<u32> = 2..=8;

/// `Delta` fields.
const SERVICE: u32 = 1;
const FROM_REVISION: u32 = 3;
const TO_REVISION: u32 = 4;
const ADDED: u32 = 5;
const REMOVED: u32 = 6;
const UPDATED: u32 = 7;

/// A delta as a node applies it; its removed addresses borrowed from the
/// frame (or from a decoded `Delta`).
#[derive(Debug, Default, PartialEq)]
pub struct PushedDelta<'a> {
    pub service: Option<pb::ServiceKey>,
    pub from_revision: u64,
    pub to_revision: u64,
    pub added: Vec<Instance>,
    pub updated: Vec<Instance>,
    /// `host:port` of providers that left.
    pub removed: Vec<&'a str>,
}

impl<'a> PushedDelta<'a> {
    /// Reads `frame`, an encoded `ServerMessage`, if it carries a delta and
    /// nothing unusual (see the module docs); `None` otherwise.
    pub fn read(mut frame: &'a [u8]) -> Option<PushedDelta<'a>> {
        let mut body = None;
        while !frame.is_empty() {
            match scan_field(&mut frame)? {
                Field::Varint(REQUEST_ID, _) => {}
                Field::Bytes(DELTA, delta) if body.is_none() => body = Some(delta),
                field if field.tag() == REQUEST_ID || BODIES.contains(&field.tag()) => return None,
                _ => {} // a field this version does not know
            }
        }
        PushedDelta::read_body(body?)
    }

    fn read_body(body: &'a [u8]) -> Option<PushedDelta<'a>> {
        let (mut added, mut removed, mut updated) = (0, 0, 0);
        let mut scan = body;
        while !scan.is_empty() {
            if let Field::Bytes(tag, _) = scan_field(&mut scan)? {
                added += usize::from(tag == ADDED);
                removed += usize::from(tag == REMOVED);
                updated += usize::from(tag == UPDATED);
            }
        }
        let mut delta = PushedDelta {
            added: Vec::with_capacity(added),
            removed: Vec::with_capacity(removed),
            updated: Vec::with_capacity(updated),
            ..PushedDelta::default()
        };
        let mut body = body;
        while !body.is_empty() {
            match scan_field(&mut body)? {
                Field::Bytes(SERVICE, key) if delta.service.is_none() => {
                    delta.service = Some(pb::ServiceKey::decode(key).ok()?);
                }
                Field::Varint(FROM_REVISION, n) => delta.from_revision = n,
                Field::Varint(TO_REVISION, n) => delta.to_revision = n,
                Field::Bytes(ADDED, instance) => delta.added.push(Instance::decode_fast(instance)?),
                Field::Bytes(UPDATED, instance) => delta.updated.push(Instance::decode_fast(instance)?),
                Field::Bytes(REMOVED, addr) => delta.removed.push(std::str::from_utf8(addr).ok()?),
                // A known field twice (a message merged) or of another wire type.
                field if (1..=7).contains(&field.tag()) && field.tag() != 2 => return None,
                _ => {} // reserved, or a field this version does not know
            }
        }
        Some(delta)
    }

    /// The delta of a decoded message (the gRPC transport's).
    pub fn from_message(delta: &'a mut Delta) -> PushedDelta<'a> {
        PushedDelta {
            service: delta.service.take(),
            from_revision: delta.from_revision,
            to_revision: delta.to_revision,
            added: std::mem::take(&mut delta.added),
            updated: std::mem::take(&mut delta.updated),
            removed: delta.removed.iter().map(String::as_str).collect(),
        }
    }

    /// As followers are handed it.
    pub fn update(&self) -> Update<'_> {
        Update::Change {
            added: &self.added,
            updated: &self.updated,
            removed: &self.removed,
        }
    }
}

#[cfg(test)]
#[path = "pushed_tests.rs"]
mod tests;
