//! Injected time: every deadline and timestamp comes from a [`Clock`] passed in, so tests
//! can drive time without sleeping and commands carry their time into the pure state machine.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::meta::Nanos;

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time in nanoseconds since the Unix epoch.
    fn now_nanos(&self) -> Nanos;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_nanos(&self) -> Nanos {
        // A clock before 1970 is a broken host; 0 is a harmless timestamp for it.
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as Nanos).unwrap_or(0)
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: Nanos) -> Self {
        ManualClock(AtomicI64::new(start))
    }

    pub fn advance(&self, by: Nanos) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> Nanos {
        self.0.load(Ordering::SeqCst)
    }
}
