//! Timing how long a change takes to reach every subscriber.
//!
//! Each subscriber exposes what it currently holds as a
//! `watch::Receiver<T>`; [`Watchers`] sets a numbered goal, runs the change,
//! and records when each subscriber's view first satisfies the goal. The
//! registry bench (this framework's sessions) and the peers bench
//! (ZooKeeper and etcd watchers too) time their changes the same way.
//!
//! The clock starts only once every watcher has seen the new goal: waking
//! a thousand watcher tasks is the bench's own work and must not overlap
//! the change it times.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rpc_core::registry::ProviderList;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// Bound on any one convergence.
const LIMIT: Duration = Duration::from_secs(60);

/// A subscriber's current set of provider addresses (`host:port`).
pub trait Addresses: Send + Sync + 'static {
    fn has(&self, address: &str) -> bool;

    /// Exactly `want`, nothing more. Both sides are sorted by address, so
    /// this walks them side by side: checking a 2,000-provider view after
    /// every push of a storm must not make the checker the bottleneck.
    fn is(&self, want: &BTreeSet<String>) -> bool;
}

impl Addresses for Arc<ProviderList> {
    fn has(&self, address: &str) -> bool {
        self.providers.contains_key(address)
    }
    fn is(&self, want: &BTreeSet<String>) -> bool {
        self.providers.len() == want.len() && self.providers.keys().eq(want.iter())
    }
}

impl Addresses for Arc<BTreeSet<String>> {
    fn has(&self, address: &str) -> bool {
        self.contains(address)
    }
    fn is(&self, want: &BTreeSet<String>) -> bool {
        **self == *want
    }
}

/// The time at which each subscriber reached the current goal.
#[derive(Default)]
struct Progress {
    /// When the change was started; `None` while watchers are being armed.
    goal_set_at: Option<Instant>,
    /// Watchers that have seen the current goal.
    armed: usize,
    reached: Vec<Duration>,
    /// How many watchers the waiter waits for: only the last one wakes it
    /// (a wake-up per watcher would be the bench's own load on the run).
    total: usize,
}

/// Watches each receiver; every time a view changes, `check` decides
/// whether that subscriber has reached the current goal.
pub struct Watchers {
    progress: Arc<Mutex<Progress>>,
    goal: Arc<watch::Sender<u64>>,
    notify: Arc<Notify>,
    _tasks: JoinSet<()>,
}

impl Watchers {
    pub fn start<T: Send + Sync + 'static>(
        receivers: Vec<watch::Receiver<T>>,
        check: impl Fn(u64, &T) -> bool + Send + Sync + 'static,
    ) -> Watchers {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let (goal, _) = watch::channel(0u64);
        let goal = Arc::new(goal);
        let notify = Arc::new(Notify::new());
        let check = Arc::new(check);
        let mut tasks = JoinSet::new();
        for mut rx in receivers {
            let (progress, notify, check, mut goal_rx) =
                (progress.clone(), notify.clone(), check.clone(), goal.subscribe());
            tasks.spawn(async move {
                let (mut armed_for, mut done_for) = (0u64, 0u64);
                loop {
                    let goal = *goal_rx.borrow_and_update();
                    if goal != armed_for {
                        armed_for = goal;
                        let mut progress = progress.lock().expect("progress");
                        progress.armed += 1;
                        if progress.armed >= progress.total {
                            notify.notify_one();
                        }
                    }
                    if goal != done_for && check(goal, &rx.borrow_and_update()) {
                        done_for = goal;
                        let mut progress = progress.lock().expect("progress");
                        // Already there before the change started: zero.
                        let at = progress.goal_set_at.map_or(Duration::ZERO, |at| at.elapsed());
                        progress.reached.push(at);
                        if progress.reached.len() >= progress.total {
                            notify.notify_one();
                        }
                    }
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return },
                        changed = goal_rx.changed() => if changed.is_err() { return },
                    }
                }
            });
        }
        Watchers {
            progress,
            goal,
            notify,
            _tasks: tasks,
        }
    }

    /// Sets a new goal, runs `act`, and returns the time until all `total`
    /// watchers reached the goal.
    pub async fn time<F: Future<Output = anyhow::Result<()>>>(
        &self,
        goal: u64,
        total: usize,
        act: F,
    ) -> anyhow::Result<Duration> {
        let each = self.time_each(goal, total, act).await?;
        Ok(each.last().copied().unwrap_or_default())
    }

    /// Like [`Watchers::time`], but returns when each watcher reached the
    /// goal, in order (the last is the convergence time).
    pub async fn time_each<F: Future<Output = anyhow::Result<()>>>(
        &self,
        goal: u64,
        total: usize,
        act: F,
    ) -> anyhow::Result<Vec<Duration>> {
        {
            let mut progress = self.progress.lock().expect("progress");
            progress.reached.clear();
            progress.armed = 0;
            progress.goal_set_at = None;
            progress.total = total;
        }
        self.goal.send_replace(goal);
        self.until(total, |p| p.armed, "watchers saw the goal").await?;
        self.progress.lock().expect("progress").goal_set_at = Some(Instant::now());
        act.await?;
        self.until(total, |p| p.reached.len(), "subscribers converged").await?;
        let mut progress = self.progress.lock().expect("progress");
        progress.goal_set_at = None;
        Ok(std::mem::take(&mut progress.reached))
    }

    /// Waits (bounded) until `count` of the progress reaches `total`.
    async fn until(&self, total: usize, count: impl Fn(&Progress) -> usize, what: &str) -> anyhow::Result<()> {
        let now = || count(&self.progress.lock().expect("progress"));
        let wait = async {
            while now() < total {
                self.notify.notified().await;
            }
        };
        tokio::time::timeout(LIMIT, wait)
            .await
            .with_context(|| format!("only {} of {total} {what} within {LIMIT:?}", now()))
    }
}
