//! Faults that cannot be served, and handler threads that stop: a clear,
//! reported outcome instead of a thread left waiting or a silent
//! wake-and-refault loop.
//!
//! A page whose fetch or install keeps failing (a source's `EIO`, a
//! hugetlbfs pool exhausted under `MAP_NORESERVE`, `ENOSPC`) is retried a
//! bounded number of times with growing pauses. If it still fails, it gets
//! one of two outcomes ([`Unservable`](super::Unservable)):
//!
//! - **Poison** (the default where the kernel has `UFFDIO_POISON`): the page
//!   gets a poison marker, the faulting thread is woken and takes `SIGBUS`
//!   (`BUS_MCEERR_AR` through KVM on a vCPU: the VMM injects a machine
//!   check). The page is recorded in its backing file's poisoned set, the
//!   VMM's own accesses of it are refused, and it is served again once the
//!   guest gives it back (a discard). The VM goes on: the page is counted
//!   here ([`FaultFailure::poisoned_count`]) and
//!   [`FaultFailure::poison_event_fd`] becomes readable, but
//!   [`FaultFailure::event_fd`] does not.
//! - **Report**: the failure is recorded here, naming the page and the
//!   cause, and the [`FaultFailure::event_fd`] becomes readable: the VMM
//!   watches it and stops the VM with that error. The faulting thread is
//!   woken (after a pause) so that nothing blocks for good (a VMM thread
//!   reading the page must be able to return); touched again, the page gets
//!   one attempt and the same pause, so a failing page costs about ten
//!   attempts a second, not a CPU.
//!
//! A handler thread that stops while guest memory is still registered is
//! always reported (the VM stops).

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

/// Poisoned pages remembered in full; later ones are counted only.
const POISONED_KEPT: usize = 64;

/// A page the fault handler poisoned because it could not serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoisonedPage {
    /// The region (its index in [`GuestMem`](crate::GuestMem)'s order).
    pub region: usize,
    /// Offset of the page in the region.
    pub offset: u64,
    /// Host address of the page (what `SIGBUS` reports as `si_addr`).
    pub host_addr: u64,
    /// The page's size (the huge page size on hugetlbfs).
    pub len: u64,
    /// Why it could not be served.
    pub cause: String,
}

impl std::fmt::Display for PoisonedPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "region {} offset {:#x} (host {:#x}, {:#x} bytes) poisoned: {}",
            self.region, self.offset, self.host_addr, self.len, self.cause
        )
    }
}

/// What went wrong with fault handling, for the VMM to act on.
#[derive(Debug)]
pub struct FaultFailure {
    first: Mutex<Option<String>>,
    count: AtomicU64,
    event: EventFd,
    /// The first poisoned pages, in order.
    poisoned: Mutex<Vec<PoisonedPage>>,
    poisoned_count: AtomicU64,
    poison_event: EventFd,
}

impl FaultFailure {
    pub(crate) fn new() -> Result<Self> {
        Ok(FaultFailure {
            first: Mutex::new(None),
            count: AtomicU64::new(0),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Eventfd)?,
            poisoned: Mutex::new(Vec::new()),
            poisoned_count: AtomicU64::new(0),
            poison_event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(Error::Eventfd)?,
        })
    }

    /// Records a poisoned page and signals the poison event (not the
    /// failure event: the VM goes on).
    pub(crate) fn poisoned(&self, page: PoisonedPage) {
        let n = self.poisoned_count.fetch_add(1, Ordering::Relaxed);
        if n < LOGGED {
            log::error!("guest memory: {page}; a touch of it raises a machine check");
        } else if n == LOGGED {
            log::error!("guest memory: more pages poisoned; counted only from here on");
        }
        let mut kept = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < POISONED_KEPT {
            kept.push(page);
        }
        drop(kept);
        if let Err(e) = self.poison_event.write(1) {
            log::error!("guest memory: signalling a poisoned page: {e}");
        }
    }

    /// Pages poisoned so far (each poisoning counts, a page poisoned again
    /// after it was given back counts twice).
    pub fn poisoned_count(&self) -> u64 {
        self.poisoned_count.load(Ordering::Relaxed)
    }

    /// The first poisoned pages (at most 64), in the order poisoned.
    pub fn poisoned_pages(&self) -> Vec<PoisonedPage> {
        self.poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// An eventfd that becomes readable each time a page is poisoned
    /// (non-blocking; reading it resets it).
    pub fn poison_event_fd(&self) -> RawFd {
        self.poison_event.as_raw_fd()
    }

    /// Resets the poison event; returns how many poisonings it had
    /// signalled.
    pub fn acknowledge_poisoned(&self) -> u64 {
        self.poison_event.read().unwrap_or(0)
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

    /// Failures recorded so far (poisoned pages are not failures: see
    /// [`poisoned_count`](Self::poisoned_count)).
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

    #[test]
    fn a_poisoned_page_is_counted_and_signalled_apart_from_failures() {
        let f = FaultFailure::new().unwrap();
        let page = PoisonedPage {
            region: 0,
            offset: 0x5000,
            host_addr: 0x7f00_0000_5000,
            len: 4096,
            cause: "EIO".into(),
        };
        f.poisoned(page.clone());
        assert_eq!(f.poisoned_count(), 1);
        assert_eq!(f.poisoned_pages(), [page]);
        assert_eq!(f.count(), 0);
        assert_eq!(f.message(), None);
        assert_eq!(f.acknowledge(), 0);
        assert_eq!(f.acknowledge_poisoned(), 1);
    }
}
