//! Cleaning ahead: one background task that frees segments before a put has to wait for it.
//!
//! When the free segments fall below the high watermark (checked after a rotation or a
//! prepared segment used a free one, and after a delete in a sealed segment), or a delete
//! leaves a sealed segment nearly empty, one task is started on the caller's tokio runtime.
//! It cleans one victim at a time, each under the `clean_lock` (so a put that found no free
//! segment can step in between two victims), following the crash-safe steps of `cleaner`,
//! while a victim qualifies for the free space left (see [`Watermarks`]). At most one such
//! task runs per store.
//!
//! The task holds the store weakly (a strong reference only for one victim at a time) and
//! stops at its next check once the store is closed, dropped or cleaning ahead is turned off.
//! It checks before each block it moves and before the commit write of a victim, so a store
//! that stops it leaves at most duplicates behind (crash step 1-2 of `cleaner`), never a
//! half-freed segment. `BlockStore::close` waits for it; dropping the store waits for it too
//! where blocking is possible (outside a runtime, or on a multi-thread runtime; not on a
//! current-thread runtime, where the task cannot be running while the store is dropped).
//! Once closed or dropped, the store starts no device write at all, so a task that resumes
//! later fails its next write instead of writing into a device opened again meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::StoreError;
use super::imp::Inner;

/// How long dropping a store waits for a running background pass to stop.
const DROP_WAIT: Duration = Duration::from_secs(5);

/// Free-segment watermarks of cleaning ahead: what a victim must be, by the free segments left.
///
/// - any number free: segments at least 90% dead. They cost almost nothing to clean (at most
///   one byte moved per nine freed), and freeing them while the device is idle means a later
///   large write never waits for them, nor shares the device with their cleaning.
/// - below `high` = 3/4 of the segments (at least 4, at most all): also segments at least half
///   dead (at most one byte moved per byte freed).
/// - below `low` = 1/4 of the segments (at least 3): also segments a quarter dead (the rule of
///   `clean()`), as space is getting short.
///
/// Segments are large (256 MiB by default: the NFS benchmark's 6 GiB device has 23) and
/// devices can be small (tests: 3-20 segments), hence fractions of the segment count with
/// small absolute minimums; on a 3-segment store both watermarks cover every segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Watermarks {
    pub low: usize,
    pub high: usize,
}

impl Watermarks {
    pub(super) fn new(nsegs: u32) -> Self {
        let n = nsegs as usize;
        let low = (n / 4).max(3).min(n);
        let high = (n * 3 / 4).max(4).max(low).min(n);
        Watermarks { low, high }
    }
}

#[derive(Debug)]
struct Flags {
    /// Cleaning ahead is wanted (`BlockStore::set_background_cleaning`).
    enabled: bool,
    /// The store is closing or dropped: no new task, and a running one stops.
    stopped: bool,
    /// A task exists (it clears this itself when it ends, or its guard does).
    running: bool,
    /// Someone asked for a pass while the task ran: it looks for victims once more before ending.
    again: bool,
}

/// The control block shared by the store and its task.
pub(super) struct Ahead {
    flags: Mutex<Flags>,
    /// Signalled when the task ends (for the async wait of `close`).
    ended: Notify,
    /// Signalled when the task ends (for the blocking wait of `drop`).
    ended_cv: Condvar,
    /// The store is closed or dropped: no more device writes at all (checked right before each
    /// one, so a task resumed after the store was dropped on a current-thread runtime cannot
    /// write into a device that a new store has opened meanwhile).
    closed: AtomicBool,
}

impl Ahead {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Ahead {
            flags: Mutex::new(Flags { enabled: true, stopped: false, running: false, again: false }),
            ended: Notify::new(),
            ended_cv: Condvar::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// The flags. No critical section panics or awaits, so a poisoned lock still holds
    /// consistent flags.
    fn flags(&self) -> MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn set_enabled(&self, on: bool) {
        self.flags().enabled = on;
    }

    /// The task should stop at its next check.
    pub(super) fn stopping(&self) -> bool {
        let f = self.flags();
        f.stopped || !f.enabled
    }

    /// Start the task unless one runs (then it is asked to look again), cleaning ahead is off
    /// or the store is stopping, or there is no tokio runtime to run it on.
    pub(super) fn start(self: &Arc<Self>, me: &Weak<Inner>) {
        let mut f = self.flags();
        if f.stopped || !f.enabled {
            return;
        }
        if f.running {
            f.again = true;
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        (f.running, f.again) = (true, false);
        drop(f);
        // Built before the spawn: if the runtime drops the future unpolled, the guard still ends the run.
        let guard = Running { ahead: Arc::clone(self), armed: true };
        rt.spawn(run(me.clone(), guard));
    }

    /// Called by the task when it found nothing more to do: true if it was asked to look
    /// again meanwhile (then it goes on), else it is marked ended in the same critical section,
    /// so no request falls between its last look and its end.
    fn end_unless_again(&self) -> bool {
        let mut f = self.flags();
        if f.again && !f.stopped && f.enabled {
            f.again = false;
            return true;
        }
        self.mark_ended(&mut f);
        false
    }

    fn mark_ended(&self, f: &mut Flags) {
        if f.running {
            f.running = false;
            self.ended.notify_waiters();
            self.ended_cv.notify_all();
        }
    }

    /// No device write may start any more.
    pub(super) fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// From now on every device write of the store fails (`DeviceError::Stopped`).
    pub(super) fn close_writes(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Stop cleaning ahead for good and wait until the task (if any) has ended.
    pub(super) async fn stop_and_wait(&self) {
        self.flags().stopped = true;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.flags().running {
                return;
            }
            ended.await;
        }
    }

    /// Stop cleaning ahead for good; wait (bounded) for a running task to end where this
    /// thread may block: outside any runtime, or on a multi-thread runtime (the task runs on
    /// another worker meanwhile). On a current-thread runtime the task is parked at an await
    /// while this runs and checks the stop flag before its next write.
    pub(super) fn stop_blocking(&self) {
        self.close_writes();
        let mut f = self.flags();
        f.stopped = true;
        if !f.running {
            return;
        }
        drop(f);
        let wait = || {
            let f = self.flags();
            let (f, timeout) =
                self.ended_cv.wait_timeout_while(f, DROP_WAIT, |f| f.running).unwrap_or_else(PoisonError::into_inner);
            if timeout.timed_out() && f.running {
                tracing::warn!(
                    wait_secs = DROP_WAIT.as_secs(),
                    "block store dropped while cleaning ahead had not stopped; call close() before reopening the device"
                );
            }
        };
        match tokio::runtime::Handle::try_current() {
            Err(_) => wait(),
            Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            Ok(_) => {}
        }
    }
}

/// The store's side of cleaning ahead.
impl Inner {
    /// Start cleaning ahead if free segments are below the high watermark (the task itself
    /// decides what qualifies); a running task is asked to look once more instead.
    pub(super) fn clean_ahead_if_low(&self) {
        if self.st_read().free_segments() < self.marks.high {
            self.ahead.start(&self.me);
        }
    }

    /// Turn cleaning ahead on or off (a running pass stops at its next check when off).
    pub(crate) fn set_background_cleaning(&self, on: bool) {
        self.ahead.set_enabled(on);
    }

    /// Stop cleaning ahead for good, wait for a running pass, flush, then refuse writes.
    pub(crate) async fn close(&self) -> Result<(), StoreError> {
        self.ahead.stop_and_wait().await;
        let r = self.flush().await;
        self.ahead.close_writes();
        r
    }

    /// The store handle is dropped: stop cleaning ahead (waiting for it where possible).
    pub(crate) fn stop_background(&self) {
        self.ahead.stop_blocking();
    }
}

/// The running task's hold on the flags: marks the task ended when dropped (panic, or the
/// runtime dropping the task) unless the task already ended itself.
struct Running {
    ahead: Arc<Ahead>,
    armed: bool,
}

impl Running {
    /// See [`Ahead::end_unless_again`]; once ended, dropping the guard changes nothing (a
    /// new task may already be running by then).
    fn end_unless_again(&mut self) -> bool {
        let again = self.ahead.end_unless_again();
        self.armed = again;
        again
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.armed {
            self.ahead.mark_ended(&mut self.ahead.flags());
        }
    }
}

async fn run(me: Weak<Inner>, mut guard: Running) {
    loop {
        // The store is held only for one pass; once it is dropped the task ends.
        let Some(inner) = me.upgrade() else { break };
        if guard.ahead.stopping() {
            break;
        }
        if let Err(e) = super::cleaner::clean_ahead(&inner).await {
            if !inner.ahead.closed() {
                tracing::warn!(error = %e, "cleaning ahead failed; puts clean on demand");
            }
            break;
        }
        drop(inner);
        if !guard.end_unless_again() {
            return;
        }
    }
    // Ended by `guard`'s drop.
}

#[cfg(test)]
mod tests {
    use super::Watermarks;

    #[test]
    fn watermarks_fit_small_and_large_stores() {
        let w = |n| {
            let m = Watermarks::new(n);
            (m.low, m.high)
        };
        assert_eq!(w(3), (3, 3), "tiny store: every segment");
        assert_eq!(w(7), (3, 5));
        assert_eq!(w(23), (5, 17), "the NFS benchmark's 6 GiB device of 256 MiB segments");
        assert_eq!(w(4000), (1000, 3000));
        for n in 3..500 {
            let m = Watermarks::new(n);
            assert!(m.low <= m.high && m.high <= n as usize, "nsegs={n} {m:?}");
        }
    }
}
