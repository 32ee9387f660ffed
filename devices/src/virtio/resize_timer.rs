//! Times how a driver follows a new target (a balloon size, a plugged
//! size), on the device's own clock: a client that polls sees the end only
//! as finely as it polls, and each look costs it a request.

use std::sync::Mutex;
use std::time::{Duration, Instant};

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
pub struct ResizeTimer(Mutex<ResizeTiming>);

impl ResizeTimer {
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
    }

    /// The timing so far.
    pub fn get(&self) -> ResizeTiming {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResizeTiming> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
