//! A server that was not running (SIGSTOP, a VM paused, a machine that
//! swapped) must not judge its nodes by time it did not see. When it runs
//! again, its timers fire before it has read the heartbeats that waited in
//! its sockets meanwhile; expiring on them would drop every live node at
//! once and push their removals.
//!
//! A watchdog ([`watch`]) ticks every [`TICK`]. A tick that comes more than
//! [`STALL`] late means the process was stopped or starved: the server is
//! "awake" again from that moment, and treats it like a restart for the
//! startup grace: snapshots are partial, and a session that ends meanwhile
//! (its node gave up on the stalled server and reconnects) leaves its
//! instances listed until its node registers them again or the grace ends. A session is expired for silence only
//! when the server has been awake for the whole heartbeat timeout and the
//! watchdog is not overdue ([`Registry::may_expire`]), so a session whose
//! timer fires first after a stall waits for the watchdog's verdict.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::map::Registry;

/// How often the watchdog ticks.
pub const TICK: Duration = Duration::from_millis(100);

/// A tick this late means the server was not running.
pub const STALL: Duration = Duration::from_millis(1000);

impl Registry {
    /// Milliseconds since the registry was made.
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether a session silent for `timeout` may be expired now: the server
    /// has been running all that time, as far as the watchdog can tell.
    pub fn may_expire(&self, timeout: Duration) -> bool {
        let now = self.now_ms();
        let last_tick = self.last_tick_ms.load(Ordering::Relaxed);
        let awake_since = self.awake_since_ms.load(Ordering::Relaxed);
        let overdue = now.saturating_sub(last_tick) > STALL.as_millis() as u64;
        let awake_long_enough = now.saturating_sub(awake_since) >= timeout.as_millis() as u64;
        !overdue && awake_long_enough
    }

    /// The watchdog saw the server run again after a stall of `gap`.
    fn woke_up(&self, gap: Duration) {
        self.awake_since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.metrics.stalls.fetch_add(1, Ordering::Relaxed);
        let grace = self.config.startup_grace;
        if !grace.is_zero() {
            self.grace_over.store(false, Ordering::Relaxed);
            self.after_stall.store(true, Ordering::Relaxed);
        }
        warn!(
            stalled = ?gap,
            ?grace,
            "configserver was not running (stopped or starved): no session is expired for that time, and snapshots are partial for the startup grace, as after a start"
        );
    }
}

/// Ticks until `shutdown`, telling the registry when the server ran again
/// after a stall, and ending the grace that then starts.
pub async fn watch(registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut last = tokio::time::Instant::now();
    let mut grace_ends = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        let gap = now - last;
        last = now;
        registry.last_tick_ms.store(registry.now_ms(), Ordering::Relaxed);
        if gap > STALL + TICK {
            registry.woke_up(gap);
            let grace = registry.config.startup_grace;
            grace_ends = (!grace.is_zero()).then(|| now + grace);
        }
        if grace_ends.is_some_and(|at| now >= at) {
            grace_ends = None;
            registry.end_grace();
        }
    }
}
