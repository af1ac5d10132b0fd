//! Counters for `GET /metrics` (Prometheus text format).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_opened: AtomicU64,
    pub sessions_closed: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub registrations: AtomicU64,
    pub refused_requests: AtomicU64,
    pub pushed_messages: AtomicU64,
    pub pushed_bytes: AtomicU64,
    pub pushed_snapshots: AtomicU64,
    pub pushed_direct: AtomicU64,
    pub pushed_rules: AtomicU64,
    pub rule_changes: AtomicU64,
    /// Connections open on the registry port (a gauge).
    pub connections_open: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Full copies asked of peers because a digest did not match.
    pub peer_repairs: AtomicU64,
    /// Times the server found it had not been running (stopped or starved).
    pub stalls: AtomicU64,
}

impl Metrics {
    /// Renders the counters plus the current gauges.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let counters = [
            (
                "configserver_pushed_rules_total",
                "Rule sets pushed to nodes",
                &self.pushed_rules,
            ),
            (
                "configserver_rule_changes_total",
                "Rule changes applied (local writes and ones read from a shared store)",
                &self.rule_changes,
            ),
            (
                "configserver_peer_repairs_total",
                "Full copies asked of peers because a digest did not match (anti-entropy)",
                &self.peer_repairs,
            ),
            (
                "configserver_stalls_total",
                "Times the server found it had not been running for over a second (stopped or starved); no node is expired for that time",
                &self.stalls,
            ),
            (
                "configserver_sessions_opened_total",
                "Sessions opened",
                &self.sessions_opened,
            ),
            (
                "configserver_connections_refused_total",
                "Connections to the registry port closed at once: as many as --max-connections were open",
                &self.connections_refused,
            ),
            (
                "configserver_sessions_closed_total",
                "Sessions closed (any reason)",
                &self.sessions_closed,
            ),
            (
                "configserver_sessions_expired_total",
                "Sessions expired after missed heartbeats",
                &self.sessions_expired,
            ),
            (
                "configserver_registrations_total",
                "Provider registrations accepted",
                &self.registrations,
            ),
            (
                "configserver_refused_requests_total",
                "Node requests refused with an error",
                &self.refused_requests,
            ),
            (
                "configserver_pushed_messages_total",
                "Snapshots and deltas pushed",
                &self.pushed_messages,
            ),
            (
                "configserver_pushed_bytes_total",
                "Encoded bytes of pushed snapshots and deltas",
                &self.pushed_bytes,
            ),
            (
                "configserver_pushed_snapshots_total",
                "Snapshots pushed",
                &self.pushed_snapshots,
            ),
            (
                "configserver_pushed_direct_total",
                "Deltas the flusher wrote to a native session's connection itself (included in pushed messages)",
                &self.pushed_direct,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}
