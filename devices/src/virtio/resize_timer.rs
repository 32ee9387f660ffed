//! Times how a driver follows a new target (a balloon size, a plugged
//! size), on the device's own clock: a client that polls sees the end only
//! as finely as it polls, and each look costs it a request. It also tells
//! a waiter of each change ([`ResizeTimer::change_fd`]), so that nothing
//! has to poll the value.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// How the driver followed the last target change.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResizeTiming {
    /// When the target was set.
    pub requested: Option<Instant>,
    /// From the request to the driver's first change of the value.
    pub first_change: Option<Duration>,
    /// From the request to the change that reached the target.
    pub settled: Option<Duration>,
    /// Changes since the request.
    pub updates: u32,
}

/// The timing of the last target change, shared by the device and the VMM.
#[derive(Debug, Default)]
pub struct ResizeTimer {
    timing: Mutex<ResizeTiming>,
    changes: OnceLock<EventFd>,
}

impl ResizeTimer {
    /// An eventfd (non-blocking) that becomes readable each time the
    /// driver changes the value, made on the first call: a waiter watches
    /// it instead of polling (the VMM's API answers `"wait_ms"` requests so,
    /// and a poll every few ms would cost a busy guest a host interrupt, an
    /// exit, each time).
    pub fn change_fd(&self) -> std::io::Result<&EventFd> {
        if let Some(fd) = self.changes.get() {
            return Ok(fd);
        }
        let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(self.changes.get_or_init(|| fd))
    }

    /// A new target was set: start over.
    pub fn start(&self) {
        *self.lock() = ResizeTiming {
            requested: Some(Instant::now()),
            ..ResizeTiming::default()
        };
    }

    /// The driver set the value: `changed` from what it was, `reached` the
    /// target.
    pub fn observe(&self, changed: bool, reached: bool) {
        let mut t = self.lock();
        let Some(at) = t.requested else {
            return;
        };
        if changed {
            t.updates += 1;
            t.first_change.get_or_insert(at.elapsed());
        }
        if reached && t.settled.is_none() {
            t.settled = Some(at.elapsed());
        }
        drop(t);
        if changed {
            if let Some(fd) = self.changes.get() {
                // Only fails when the counter is at its maximum, which is
                // as readable as a waiter needs.
                let _ = fd.write(1);
            }
        }
    }

    /// The timing so far.
    pub fn get(&self) -> ResizeTiming {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResizeTiming> {
        self.timing.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_response_is_timed_from_the_request() {
        let t = ResizeTimer::default();
        t.observe(true, true); // before any request: nothing to time
        assert_eq!(t.get().requested, None);
        t.start();
        t.observe(false, false);
        t.observe(true, false);
        assert_eq!((t.get().updates, t.get().settled), (1, None));
        std::thread::sleep(Duration::from_millis(2));
        t.observe(true, true);
        t.observe(false, true);
        let r = t.get();
        assert_eq!(r.updates, 2);
        let (first, settled) = (r.first_change.unwrap(), r.settled.unwrap());
        assert!(settled >= first + Duration::from_millis(2), "{r:?}");
        t.start();
        assert_eq!(t.get().updates, 0);
    }

    #[test]
    fn a_waiter_hears_of_changes_only() {
        let t = ResizeTimer::default();
        t.start();
        t.observe(true, false); // before anyone watches: nothing kept
        let fd = t.change_fd().unwrap();
        assert!(fd.read().is_err(), "nothing to read yet");
        t.observe(false, false);
        assert!(fd.read().is_err(), "no change, no wake-up");
        t.observe(true, false);
        t.observe(true, true);
        assert_eq!(fd.read().unwrap(), 2);
        assert_eq!(
            t.change_fd().unwrap().as_raw_fd(),
            fd.as_raw_fd(),
            "one fd per value"
        );
    }
}
