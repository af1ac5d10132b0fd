//! Timing how long a change takes to reach every subscriber.
//!
//! Each subscriber keeps its own view, a set of addresses, as a consumer's
//! directory does, and has an [`Observer`], which its client calls with
//! that view every time it changes: this framework's subscribers right
//! after applying a pushed change handed on by the SDK ([`follow`], over
//! [`RegistrySession::follow`]), the ZooKeeper and etcd subscribers of
//! `bench peers` right after they applied a watch event. [`Arrivals`] sets a numbered
//! goal, runs the change, and records when each view first satisfies the
//! goal. The registry bench and the peers bench time their changes the
//! same way.
//!
//! The observation runs on the task that applied the change, with no task
//! of the bench's own in between: a thousand watcher tasks woken per change
//! would be the bench's work, on the same two cores as the systems it
//! measures, and part of every sample of every system.
//!
//! For the same reason a check looks at a view in two ways ([`Look`]). On
//! the client's task, after every change, it takes the quick look: for a
//! whole set, its size and both ends, in a few steps. Once every
//! subscriber has been counted, each view is looked at exactly (for a set,
//! a walk of all of it, outside the timed span) and must be the very view
//! that was counted: no change applied to it since. A run in which one is
//! not fails. The exact walk of a 2,000-provider view whose memory has gone
//! cold costs ~60 us, a hundred of them per storm ~6 ms of CPU on the two
//! cores the systems share; in the timed span that was a fifth of this
//! framework's storm.
//!
//! [`RegistrySession::follow`]: rpc_core::registry::RegistrySession::follow

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rpc_core::ServiceKey;
use rpc_core::registry::{Addr, Follower, ProviderList, RegistrySession, Update};
use tokio::sync::{Notify, watch};

/// Bound on any one convergence.
const LIMIT: Duration = Duration::from_secs(60);

/// A subscriber's current set of provider addresses (`host:port`).
pub trait Addresses: Send + Sync + 'static {
    fn has(&self, address: &str) -> bool;

    /// Exactly `want`, nothing more: a walk of the whole view.
    fn is(&self, want: &AddressSet) -> bool;

    /// As many addresses as `want`, and the same first and last ones: in a
    /// few steps, whatever the size.
    fn may_be(&self, want: &AddressSet) -> bool;
}

/// How closely a check looks at a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// On the client's task, after every change it applies (a dozen per
    /// subscriber in a storm): must cost next to nothing, must hold
    /// whenever the goal does, and should hold on the way to it only in a
    /// view a correct client never shows. For a storm's set, its size and
    /// ends are enough because a storm removes the lowest addresses and
    /// adds above the highest (ports of five digits, so text order is
    /// number order): on the way, a view lacks some of the new ones or
    /// still holds some of the old. A workload that replaced addresses
    /// in the middle would need a closer quick look; with this one, a
    /// correct system's run would fail its verification.
    Quick,
    /// Once per subscriber, after all were counted: the goal itself.
    Exact,
}

impl AddressSet {
    /// Whether `view` is this set, as closely as `look` looks.
    pub fn seen_in(&self, view: &dyn Addresses, look: Look) -> bool {
        match look {
            Look::Quick => view.may_be(self),
            Look::Exact => view.is(self),
        }
    }
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

/// Whether the sorted `view` (of `len` addresses) has as many addresses
/// as `want` and the same ends, in a few steps (see [`Look::Quick`] for
/// when that rules out a view still on its way).
fn same_ends<'a>(len: usize, view: impl DoubleEndedIterator<Item = &'a str> + Clone, want: &AddressSet) -> bool {
    let want = &want.0;
    len == want.len()
        && view.clone().next() == want.first().map(String::as_str)
        && view.clone().next_back() == want.last().map(String::as_str)
}

/// Whether the sorted `view` (of `len` addresses) is exactly `want`.
fn same_set<'a>(len: usize, view: impl Iterator<Item = &'a str>, want: &AddressSet) -> bool {
    len == want.0.len() && view.eq(want.0.iter().map(String::as_str))
}

impl Addresses for ProviderList {
    fn has(&self, address: &str) -> bool {
        self.providers.contains_key(address)
    }
    fn is(&self, want: &AddressSet) -> bool {
        same_set(self.providers.len(), self.providers.keys().map(Addr::as_str), want)
    }
    fn may_be(&self, want: &AddressSet) -> bool {
        same_ends(self.providers.len(), self.providers.keys().map(Addr::as_str), want)
    }
}

impl Addresses for BTreeSet<Addr> {
    fn has(&self, address: &str) -> bool {
        self.contains(address)
    }
    fn is(&self, want: &AddressSet) -> bool {
        same_set(self.len(), self.iter().map(Addr::as_str), want)
    }
    fn may_be(&self, want: &AddressSet) -> bool {
        same_ends(self.len(), self.iter().map(Addr::as_str), want)
    }
}

/// A subscriber of this framework as a consumer's directory is one: it
/// follows `key` through `session` ([`RegistrySession::follow`]) and
/// applies each pushed change to a set of addresses of its own, in place
/// (as the ZooKeeper and etcd subscribers apply their events), publishing
/// it before telling `observer`. The follower must be held.
pub fn follow(
    session: &RegistrySession,
    key: &ServiceKey,
    observer: Observer,
) -> (Follower, watch::Receiver<Arc<BTreeSet<Addr>>>) {
    let (view, rx) = watch::channel(Arc::new(BTreeSet::new()));
    let follower = session.follow(key, move |update| {
        view.send_modify(|view| {
            // Shared with no one between borrows: `make_mut` does not copy.
            let addresses = Arc::make_mut(view);
            match update {
                Update::Reset(instances) => {
                    addresses.clear();
                    addresses.extend(instances.iter().map(|i| Addr::new(&i.host, i.port)));
                }
                Update::Change {
                    added,
                    updated,
                    removed,
                } => {
                    for addr in *removed {
                        addresses.remove(*addr);
                    }
                    addresses.extend(added.iter().chain(*updated).map(|i| Addr::new(&i.host, i.port)));
                }
            }
        });
        observer.saw(&**view.borrow());
    });
    (follower, rx)
}

impl Addresses for BTreeSet<String> {
    fn has(&self, address: &str) -> bool {
        self.contains(address)
    }
    fn is(&self, want: &AddressSet) -> bool {
        same_set(self.len(), self.iter().map(String::as_str), want)
    }
    fn may_be(&self, want: &AddressSet) -> bool {
        same_ends(self.len(), self.iter().map(String::as_str), want)
    }
}

type Check = dyn Fn(u64, &dyn Addresses, Look) -> bool + Send + Sync;

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
    seen: Arc<Mutex<Seen>>,
}

/// What one observer has seen. Behind a lock of its own: the sweep of
/// [`Arrivals::time_each`] and the client may count the same subscriber
/// at once.
#[derive(Default)]
struct Seen {
    /// The last goal this subscriber was counted for.
    counted: u64,
    /// Changes its client has applied.
    changes: u64,
    /// `changes` when it was last counted.
    changes_when_counted: u64,
    /// Counted by the sweep, not by its client.
    swept: bool,
}

impl Observer {
    /// The subscriber's client applied a change and its view is now
    /// `view`: counts it if it reached the current goal for the first time.
    ///
    /// The client publishes each view (to the watch the bench reads it
    /// from) before it calls this, and calls this for every view it
    /// publishes: the verification after a goal relies on both.
    pub fn saw(&self, view: &dyn Addresses) {
        let goal = self.shared.goal.load(Ordering::Acquire);
        let mut seen = self.seen.lock().expect("seen");
        seen.changes += 1;
        if goal == 0 {
            return;
        }
        if seen.counted == goal {
            // The sweep may have counted this very view, published just
            // before this call: its change is then the first since, and
            // the count is taken over. Any other change after a count is
            // what verification catches.
            if seen.swept
                && seen.changes == seen.changes_when_counted + 1
                && (self.shared.check)(goal, view, Look::Quick)
            {
                seen.changes_when_counted = seen.changes;
                seen.swept = false;
            }
            return;
        }
        if (self.shared.check)(goal, view, Look::Quick) {
            self.count(seen, goal, false);
        }
    }

    /// The sweep: counts `view`, the subscriber's view as the bench reads
    /// it, if it already holds the current goal by the quick look.
    fn sweep(&self, view: &dyn Addresses) {
        let goal = self.shared.goal.load(Ordering::Acquire);
        let seen = self.seen.lock().expect("seen");
        if goal != 0 && seen.counted != goal && (self.shared.check)(goal, view, Look::Quick) {
            self.count(seen, goal, true);
        }
    }

    /// Counts the subscriber as at `goal` as of its last change, and
    /// records its arrival.
    fn count(&self, mut seen: std::sync::MutexGuard<'_, Seen>, goal: u64, swept: bool) {
        seen.counted = goal;
        seen.changes_when_counted = seen.changes;
        seen.swept = swept;
        drop(seen);
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

    /// Whether the subscriber's view as `read` reads it now is exactly
    /// the goal it was counted for, and the very view that was counted;
    /// why not. The change count is read before and after the view, so a
    /// change made meanwhile is caught once its client has called
    /// [`Observer::saw`] for it.
    fn verify(&self, goal: u64, read: impl FnOnce() -> Arc<dyn Addresses>) -> Result<(), &'static str> {
        let changes = || {
            let seen = self.seen.lock().expect("seen");
            (seen.changes, seen.changes_when_counted)
        };
        let (before, counted_at) = changes();
        let view = read();
        let exact = (self.shared.check)(goal, &*view, Look::Exact);
        let (after, _) = changes();
        if before != counted_at || after != counted_at {
            return Err("its client applied another change after it was counted");
        }
        if !exact {
            return Err("it was counted by its size and ends, but does not hold the set exactly");
        }
        Ok(())
    }
}

/// The observers of a set of subscribers and the goals they are timed for.
pub struct Arrivals {
    shared: Arc<Shared>,
    observers: Vec<Observer>,
}

impl Arrivals {
    /// `check(goal, view, look)`: whether `view` satisfies `goal`, as
    /// closely as `look` looks.
    pub fn new(check: impl Fn(u64, &dyn Addresses, Look) -> bool + Send + Sync + 'static) -> Arrivals {
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
            seen: Arc::default(),
        };
        self.observers.push(observer.clone());
        observer
    }

    /// Sets a new goal (never one used before), runs `act`, and returns the
    /// time until every subscriber's view reached it. `views` are the
    /// subscribers' current views, one per observer: those that already
    /// pass the goal's quick look count as zero. Once every subscriber was
    /// counted, each view is verified exactly: an error names the first
    /// that does not hold the goal, or that changed after it was counted.
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
            observer.sweep(&*view);
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
        let reached = {
            let mut progress = self.shared.lock();
            progress.goal_set_at = None;
            self.shared.goal.store(0, Ordering::Release);
            std::mem::take(&mut progress.reached)
        };
        for (i, (observer, view)) in self.observers.iter().zip(views).enumerate() {
            observer
                .verify(goal, || Arc::clone(&view.borrow()) as Arc<dyn Addresses>)
                .map_err(|why| anyhow::anyhow!("subscriber {i} was counted as reaching goal {goal}, but {why}"))?;
        }
        Ok(reached)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: impl IntoIterator<Item = u16>) -> BTreeSet<String> {
        ports.into_iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    /// 10..20 with 15 swapped for 150, which sorts between the same ends:
    /// the set's size and ends, not the set.
    fn impostor() -> BTreeSet<String> {
        set((10..20).filter(|&p| p != 15).chain([150]))
    }

    /// Times goal 1 (exactly 10..20) for one subscriber that starts out at
    /// `initial`, published before the timing starts but not yet seen by
    /// its observer if `unseen`, and whose client then publishes each view
    /// of `apply` in turn.
    async fn time_one(
        initial: BTreeSet<String>,
        unseen: bool,
        apply: Vec<BTreeSet<String>>,
    ) -> anyhow::Result<Vec<Duration>> {
        let want: AddressSet = set(10..20).into_iter().collect();
        let mut arrivals = Arrivals::new(move |_, view, look| want.seen_in(view, look));
        let observer = arrivals.observer();
        let initial = Arc::new(initial);
        let (tx, rx) = watch::channel(initial.clone());
        if !unseen {
            observer.saw(&*initial);
        }
        arrivals
            .time_each(1, std::slice::from_ref(&rx), async move {
                if unseen {
                    // The client's call for the view the sweep just read.
                    observer.saw(&*initial);
                }
                for view in apply {
                    let view = Arc::new(view);
                    tx.send_replace(view.clone());
                    observer.saw(&*view);
                }
                Ok(())
            })
            .await
    }

    #[tokio::test]
    async fn a_view_reaching_the_set_is_counted_and_verified() {
        let reached = time_one(set(0..0), false, vec![set(10..15), set(10..20)])
            .await
            .unwrap();
        assert_eq!(reached.len(), 1);
    }

    #[tokio::test]
    async fn a_view_holding_the_set_before_the_change_counts_as_zero() {
        let reached = time_one(set(10..20), false, vec![]).await.unwrap();
        assert_eq!(reached, vec![Duration::ZERO]);
    }

    #[tokio::test]
    async fn the_sweep_and_the_clients_call_for_the_same_view_count_it_once() {
        // The client published the view, the sweep counted it, then the
        // client's own call for it came: one arrival, and verified.
        let reached = time_one(set(10..20), true, vec![]).await.unwrap();
        assert_eq!(reached, vec![Duration::ZERO]);
    }

    #[tokio::test]
    async fn a_view_with_the_sets_size_and_ends_but_not_its_middle_fails_the_run() {
        let want: AddressSet = set(10..20).into_iter().collect();
        assert!(impostor().may_be(&want) && !impostor().is(&want));
        let err = time_one(set(0..0), false, vec![impostor()]).await.unwrap_err();
        assert!(format!("{err}").contains("does not hold the set exactly"), "{err}");
    }

    #[tokio::test]
    async fn a_view_counted_by_its_size_and_ends_and_put_right_later_fails_the_run() {
        // The count was of the impostor; the set that follows is exact, but
        // the time recorded is not its.
        let err = time_one(set(0..0), false, vec![impostor(), set(10..20)])
            .await
            .unwrap_err();
        assert!(
            format!("{err}").contains("another change after it was counted"),
            "{err}"
        );
    }
}
