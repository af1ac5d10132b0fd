//! Timing how long a change takes to reach every subscriber.
//!
//! Each subscriber has an [`Observer`], which its client calls with the
//! subscriber's view every time that view changes: this framework's SDK
//! through its list listener ([`RegistrySession::subscribe_with`], Dubbo's
//! `NotifyListener`), the ZooKeeper and etcd subscribers of `bench peers`
//! right after they applied a watch event. [`Arrivals`] sets a numbered
//! goal, runs the change, and records when each view first satisfies the
//! goal. The registry bench and the peers bench time their changes the
//! same way.
//!
//! The observation runs on the task that applied the change, with no task
//! of the bench's own in between: a thousand watcher tasks woken per change
//! would be the bench's work, on the same two cores as the systems it
//! measures, and part of every sample of every system.
//!
//! [`RegistrySession::subscribe_with`]: rpc_core::registry::RegistrySession::subscribe_with

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rpc_core::registry::{Addr, ProviderList};
use tokio::sync::{Notify, watch};

/// Bound on any one convergence.
const LIMIT: Duration = Duration::from_secs(60);

/// A subscriber's current set of provider addresses (`host:port`).
pub trait Addresses: Send + Sync + 'static {
    fn has(&self, address: &str) -> bool;

    /// Exactly `want`, nothing more. It is asked after every change a
    /// subscriber applies (a dozen per subscriber in a storm), so it must
    /// not make the checker the bottleneck: see [`same_set`].
    fn is(&self, want: &AddressSet) -> bool;
}

/// A set of addresses a view must hold exactly: sorted, in one vector, so
/// that the checker's side of a walk costs next to nothing beside the
/// view's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSet(Vec<String>);

impl FromIterator<String> for AddressSet {
    fn from_iter<I: IntoIterator<Item = String>>(addresses: I) -> AddressSet {
        let mut sorted: Vec<String> = addresses.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        AddressSet(sorted)
    }
}

/// Whether the sorted `view` (of `len` addresses) is exactly `want`: the
/// size and both ends first, which rule out a view still on its way in a
/// few steps, then a walk of both side by side.
fn same_set<'a>(len: usize, view: impl DoubleEndedIterator<Item = &'a str> + Clone, want: &AddressSet) -> bool {
    let want = &want.0;
    len == want.len()
        && view.clone().next() == want.first().map(String::as_str)
        && view.clone().next_back() == want.last().map(String::as_str)
        && view.eq(want.iter().map(String::as_str))
}

impl Addresses for ProviderList {
    fn has(&self, address: &str) -> bool {
        self.providers.contains_key(address)
    }
    fn is(&self, want: &AddressSet) -> bool {
        same_set(self.providers.len(), self.providers.keys().map(Addr::as_str), want)
    }
}

impl Addresses for BTreeSet<String> {
    fn has(&self, address: &str) -> bool {
        self.contains(address)
    }
    fn is(&self, want: &AddressSet) -> bool {
        same_set(self.len(), self.iter().map(String::as_str), want)
    }
}

type Check = dyn Fn(u64, &dyn Addresses) -> bool + Send + Sync;

/// The time at which each subscriber reached the current goal.
#[derive(Default)]
struct Progress {
    goal: u64,
    /// When the change was started; `None` while views that already
    /// satisfy the goal are being counted.
    goal_set_at: Option<Instant>,
    reached: Vec<Duration>,
    /// How many arrivals the waiter waits for: only the last one wakes it.
    total: usize,
}

struct Shared {
    /// The current goal (0: none), readable without the lock.
    goal: AtomicU64,
    progress: Mutex<Progress>,
    notify: Notify,
    check: Box<Check>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().expect("progress")
    }
}

/// One subscriber's observer; its client calls [`Observer::saw`].
#[derive(Clone)]
pub struct Observer {
    shared: Arc<Shared>,
    /// The last goal this subscriber was counted for.
    counted: Arc<AtomicU64>,
}

impl Observer {
    /// The subscriber's view changed (or is being looked at) and is now
    /// `view`: counts it if it reached the current goal for the first time.
    pub fn saw(&self, view: &dyn Addresses) {
        let goal = self.shared.goal.load(Ordering::Acquire);
        if goal == 0 || self.counted.load(Ordering::Relaxed) == goal || !(self.shared.check)(goal, view) {
            return;
        }
        if self.counted.swap(goal, Ordering::AcqRel) == goal {
            return; // counted meanwhile (by the sweep or by the client)
        }
        let mut progress = self.shared.lock();
        if progress.goal != goal {
            return; // a goal that has been left behind
        }
        // Already there before the change started: zero.
        let at = progress.goal_set_at.map_or(Duration::ZERO, |at| at.elapsed());
        progress.reached.push(at);
        if progress.reached.len() >= progress.total {
            self.shared.notify.notify_one();
        }
    }
}

/// The observers of a set of subscribers and the goals they are timed for.
pub struct Arrivals {
    shared: Arc<Shared>,
    observers: Vec<Observer>,
}

impl Arrivals {
    /// `check(goal, view)`: whether `view` satisfies `goal`.
    pub fn new(check: impl Fn(u64, &dyn Addresses) -> bool + Send + Sync + 'static) -> Arrivals {
        Arrivals {
            shared: Arc::new(Shared {
                goal: AtomicU64::new(0),
                progress: Mutex::new(Progress::default()),
                notify: Notify::new(),
                check: Box::new(check),
            }),
            observers: Vec::new(),
        }
    }

    /// The observer of the next subscriber (they are counted in the order
    /// made, matching the views given to [`Arrivals::time`]).
    pub fn observer(&mut self) -> Observer {
        let observer = Observer {
            shared: self.shared.clone(),
            counted: Arc::new(AtomicU64::new(0)),
        };
        self.observers.push(observer.clone());
        observer
    }

    /// Sets a new goal (never one used before), runs `act`, and returns the
    /// time until every subscriber's view reached it. `views` are the
    /// subscribers' current views, one per observer: those that already
    /// satisfy the goal count as zero.
    pub async fn time<T: Addresses, F: Future<Output = anyhow::Result<()>>>(
        &self,
        goal: u64,
        views: &[watch::Receiver<Arc<T>>],
        act: F,
    ) -> anyhow::Result<Duration> {
        let each = self.time_each(goal, views, act).await?;
        Ok(each.last().copied().unwrap_or_default())
    }

    /// Like [`Arrivals::time`], but returns when each subscriber reached the
    /// goal, in order (the last is the convergence time).
    pub async fn time_each<T: Addresses, F: Future<Output = anyhow::Result<()>>>(
        &self,
        goal: u64,
        views: &[watch::Receiver<Arc<T>>],
        act: F,
    ) -> anyhow::Result<Vec<Duration>> {
        anyhow::ensure!(
            views.len() == self.observers.len(),
            "{} views for {} observers",
            views.len(),
            self.observers.len()
        );
        let total = self.observers.len();
        {
            let mut progress = self.shared.lock();
            *progress = Progress {
                goal,
                goal_set_at: None,
                reached: Vec::with_capacity(total),
                total,
            };
            self.shared.goal.store(goal, Ordering::Release);
        }
        for (observer, view) in self.observers.iter().zip(views) {
            let view = Arc::clone(&view.borrow());
            observer.saw(&*view);
        }
        self.shared.lock().goal_set_at = Some(Instant::now());
        act.await?;
        let reached = || self.shared.lock().reached.len();
        let wait = async {
            while reached() < total {
                self.shared.notify.notified().await;
            }
        };
        tokio::time::timeout(LIMIT, wait).await.with_context(|| {
            format!(
                "only {} of {total} subscribers reached goal {goal} within {LIMIT:?}",
                reached()
            )
        })?;
        let mut progress = self.shared.lock();
        progress.goal_set_at = None;
        self.shared.goal.store(0, Ordering::Release);
        Ok(std::mem::take(&mut progress.reached))
    }
}
