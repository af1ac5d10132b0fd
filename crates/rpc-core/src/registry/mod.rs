//! The registry session shared by both SDKs: one long-lived stream to a
//! ConfigServer, re-established after failures, carrying this node's
//! registrations and subscriptions.

pub mod convert;
