//! The flusher, and the one place that tells the delta-push path whole:
//! how a provider's registration becomes bytes on each subscriber's socket.
//!
//! # From a node's Register to a subscriber's socket
//!
//! 1. **Session read.** The provider's session reads a `Register` message
//!    off its stream: natively framed ([`crate::native`]) or gRPC
//!    ([`crate::grpc::SessionCodec`]), both run by one session loop
//!    ([`crate::node_session::RegistryService`]), which checks the app may
//!    provide the service ([`crate::auth::Credentials::may_provide`]).
//! 2. **Registry change.** [`Registry::register`] validates the instance
//!    and puts it in the live map ([`crate::service_map`]); so do
//!    unregistering and a session's end ([`Registry::close_session`]).
//! 3. **Pending, coalescing.** The change lands in the service's pending
//!    set (`service_map/pending.rs`: an add and a remove within one window
//!    cancel out), the service is marked dirty, and [`Registry::changed`]
//!    wakes the [`flusher`] below, which paces the flushes of a burst.
//! 4. **Flush.** [`Registry::take_flush`] gives each dirty service with a
//!    net change a new revision and one `Delta`, kept in the service's
//!    bounded history for subscribers that lag or reconnect
//!    ([`Registry::catch_up`]).
//! 5. **Encode once.** That delta is encoded there, once, as the
//!    `ServerMessage` that carries it: a [`PushedDelta`]
//!    ([`crate::outgoing`]), whose bytes every subscriber is sent.
//! 6. **Per-session queue or outbox.** [`Registry::push`] (shared out over
//!    the workers by [`push`] below) hands the delta to each subscriber:
//!    straight into its transport when the session is up to date and the
//!    transport takes it ([`crate::outgoing::Deliver`], implemented by
//!    [`SessionOutbox`]); otherwise it marks the session's
//!    [`PushQueue`], and the session's push task sends what the node lacks
//!    ([`PushQueue::next`], [`Due::next_delta`], or [`Registry::catch_up`]).
//! 7. **Writer.** A native session's [`SessionOutbox`] writes the bytes at
//!    once if nothing waits ahead of them, else queues them in order for
//!    [`SessionOutbox::drain`]; a gRPC session's queue is drained by tonic,
//!    whose [`crate::grpc::SessionCodec`] copies the encoded bytes.
//! 8. **Socket.** The bytes reach the subscriber's socket, framed by
//!    [`rpc_core::registry::framing`] (native) or by gRPC.
//!
//! A subscriber that reads slowly never builds a backlog on the way: its
//! queue holds at most one mark per service, and its outbox at most
//! [`crate::session_outbox::PENDING_LIMIT`] bytes.
//!
//! [`PushedDelta`]: crate::outgoing::PushedDelta
//! [`SessionOutbox`]: crate::session_outbox::SessionOutbox
//! [`SessionOutbox::drain`]: crate::session_outbox::SessionOutbox::drain
//! [`PushQueue`]: crate::service_map::PushQueue
//! [`PushQueue::next`]: crate::service_map::PushQueue::next
//! [`Due::next_delta`]: crate::service_map::Due::next_delta

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::service_map::{Pushes, Registry};

/// Flushes a change at once when the registry is idle. After a flush,
/// waits until its pushes are out; then, while changes come often enough
/// that holding them merges some (a burst), holds them for
/// [`HOLD_PER_ROUND`] times as long as the pushes took, never past the
/// coalescing window, and they go out as one delta per service. In a
/// burst, push rounds take at most about a seventeenth of the time, and the
/// registrations of a storm keep the rest. A lone change waits for
/// nothing, however long the last push round was: a round to a thousand
/// subscribers takes milliseconds, and holding each of a series of
/// changes a few milliseconds apart for it would merge none of them, only
/// add the hold to every push.
pub async fn flusher(registry: Arc<Registry>, window: Duration, shutdown: CancellationToken) {
    let replicates = registry.replicates();
    let mut last_flush: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = registry.changed.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let flushed_at = tokio::time::Instant::now();
        let since_last = last_flush.map(|at| flushed_at - at);
        last_flush = Some(flushed_at);
        let pushes = registry.take_flush();
        if replicates {
            // The same window's changes of this server's own sessions, to
            // every peer (see `crate::peer`).
            registry.replicate();
        }
        let changes = pushes.changes();
        if push(&registry, pushes).await == 0 {
            continue;
        }
        // Changes made meanwhile leave a stored wake-up: the next turn
        // flushes them together.
        let window_ends = flushed_at + window;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(window_ends) => break,
                _ = registry.drained.notified() => if registry.is_drained() {
                    let now = tokio::time::Instant::now();
                    let pace = Pace {
                        round: now.saturating_duration_since(flushed_at),
                        window_left: window_ends.saturating_duration_since(now),
                        changes,
                        since_last,
                    };
                    if let Some(hold) = pace.hold() {
                        tokio::select! {
                            _ = tokio::time::sleep(hold) => {}
                            _ = shutdown.cancelled() => return,
                        }
                    }
                    break;
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// What the flusher knows when a flush's pushes are out.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// How long the pushes took.
    round: Duration,
    /// Until the coalescing window of the flush ends.
    window_left: Duration,
    /// The changes the flush carried.
    changes: usize,
    /// Since the flush before it, if there was one.
    since_last: Option<Duration>,
}

impl Pace {
    /// How long to hold further changes: [`HOLD_PER_ROUND`] times the
    /// round, within the window, if at the pace of the last flush (its
    /// changes over the time since the one before) at least one more
    /// change would come in meanwhile. Not for a round too cheap to
    /// matter (timers tick in milliseconds: a shorter hold would round up
    /// to one).
    fn hold(self) -> Option<Duration> {
        let hold = (self.round * HOLD_PER_ROUND).min(self.window_left);
        let since_last = self.since_last?;
        let merges = hold.as_secs_f64() * self.changes as f64 >= since_last.as_secs_f64();
        (hold >= MIN_HOLD && merges).then_some(hold)
    }
}

/// Makes the pushes of a flush; how many were made. Many are shared out
/// over the runtime's worker threads: each write to a subscriber's socket
/// also wakes the thread that reads it, and those wake-ups, made one after
/// another from a single thread, would be the round's critical path.
async fn push(registry: &Arc<Registry>, pushes: Pushes) -> usize {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    if pushes.len() < PARALLEL_PUSH_MIN || workers < 2 {
        return registry.push(pushes);
    }
    // Every part in a task of its own (none run here): a task spawned
    // last sits in this worker's next-task slot, which others cannot steal
    // from, so the parts before it are what the other workers take.
    let mut parts = JoinSet::new();
    for part in pushes.split(workers) {
        let registry = registry.clone();
        parts.spawn(async move { registry.push(part) });
    }
    let mut pushed = 0;
    while let Some(part) = parts.join_next().await {
        match part {
            Ok(made) => pushed += made,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {} // aborted: only when this future is dropped
        }
    }
    pushed
}

/// Fewer pushes than this are made by the flusher alone.
const PARALLEL_PUSH_MIN: usize = 256;

/// In a burst, after a push round, the flusher holds changes this many
/// times as long as the round took (within the coalescing window).
///
/// Sixteen rather than four: a storm of 400 changes then reaches each of
/// 100 subscribers as fewer deltas (each a wake-up, a read and a write on
/// both sides), and converged in 14 ms rather than 17 (medians of 15 runs
/// each, alternating, 2026-12-06); a lone change is not held at all, and
/// no hold passes the coalescing window.
const HOLD_PER_ROUND: u32 = 16;

/// A shorter hold is skipped.
const MIN_HOLD: Duration = Duration::from_millis(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(round_ms: u64, changes: usize, since_last_ms: Option<u64>) -> Pace {
        Pace {
            round: Duration::from_millis(round_ms),
            window_left: Duration::from_millis(5).saturating_sub(Duration::from_millis(round_ms)),
            changes,
            since_last: since_last_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn changes_are_held_only_when_holding_would_merge_some() {
        // A storm: changes every fraction of a millisecond.
        assert_eq!(pace(1, 3, Some(1)).hold(), Some(Duration::from_millis(4)));
        // The window bounds the hold.
        assert_eq!(pace(2, 40, Some(3)).hold(), Some(Duration::from_millis(3)));
        // One change every 6 ms, each pushed to many subscribers in 3 ms:
        // the 2 ms left of the window would merge none.
        assert_eq!(pace(3, 1, Some(6)).hold(), None);
        // The first change after a quiet spell, and the very first flush.
        assert_eq!(pace(1, 1, Some(10_000)).hold(), None);
        assert_eq!(pace(1, 1, None).hold(), None);
        // A round too cheap to matter.
        assert_eq!(pace(0, 5, Some(1)).hold(), None);
    }
}
