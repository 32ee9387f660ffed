//! Faults that cannot be served, and handler threads that stop: a clear,
//! reported outcome instead of a thread left waiting or a silent
//! wake-and-refault loop.
//!
//! A page whose fetch or install keeps failing (a source's `EIO`, a
//! hugetlbfs pool exhausted under `MAP_NORESERVE`, `ENOSPC`) is retried a
//! bounded number of times with growing pauses. If it still fails, the
//! failure is recorded here, naming the page and the cause, and the
//! [`FaultFailure::event_fd`] becomes readable: the VMM watches it and stops
//! the VM with that error. The faulting thread is woken (after a pause) so
//! that nothing blocks for good (a VMM thread reading the page must be able
//! to return); touched again, the page gets one attempt and the same pause,
//! so a failing page costs about ten attempts a second, not a CPU. A handler thread
//! that stops while guest memory is still registered is reported the same
//! way.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

/// The pause before retry `n` (1-based) of a failing fetch or install:
/// 1, 2, 4, 8 ms... (capped at 64 ms).
pub(crate) fn backoff(n: u32) -> Duration {
    Duration::from_millis(1 << n.saturating_sub(1).min(6))
}

/// How long a thread waits before it is woken on a page that could not be
/// served (and reported).
pub(crate) const GIVE_UP_PAUSE: Duration = Duration::from_millis(100);

/// Failures logged in full; later ones are counted only.
const LOGGED: u64 = 8;

/// What went wrong with fault handling, for the VMM to act on.
#[derive(Debug)]
pub struct FaultFailure {
    first: Mutex<Option<String>>,
    count: AtomicU64,
    event: EventFd,
}

impl FaultFailure {
    pub(crate) fn new() -> Result<Self> {
        Ok(FaultFailure {
            first: Mutex::new(None),
            count: AtomicU64::new(0),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Eventfd)?,
        })
    }

    /// Records a failure and signals the event.
    pub(crate) fn report(&self, what: String) {
        if self.count.fetch_add(1, Ordering::Relaxed) < LOGGED {
            log::error!("guest memory: {what}");
        }
        self.first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(what);
        if let Err(e) = self.event.write(1) {
            log::error!("guest memory: signalling a fault failure: {e}");
        }
    }

    /// The first failure, if any: which page or thread, and why.
    pub fn message(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Failures recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Resets the event; returns how many failures it had signalled.
    pub fn acknowledge(&self) -> u64 {
        self.event.read().unwrap_or(0)
    }

    /// An eventfd that becomes readable at each failure (non-blocking;
    /// reading it resets it).
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(1));
        assert_eq!(backoff(4), Duration::from_millis(8));
        assert_eq!(backoff(100), Duration::from_millis(64));
    }

    #[test]
    fn the_first_failure_is_kept_and_signalled() {
        let f = FaultFailure::new().unwrap();
        assert_eq!(f.message(), None);
        f.report("page A: EIO".into());
        f.report("page B: EIO".into());
        assert_eq!(f.message().as_deref(), Some("page A: EIO"));
        assert_eq!(f.count(), 2);
        assert_eq!(f.event.read().unwrap(), 2);
    }
}
