//! Guest memory as the VMM's own code reads and writes it (device queues,
//! buffers, PFN lists), safe against a concurrent shrink.
//!
//! A fault handler is a reader of the truncate generation: it samples,
//! fetches and re-checks before it installs. The VMM's own accesses of guest
//! memory are readers too. A device that took a `vm-memory` snapshot of the
//! map and then touches a page past the end of a file that a shrink on
//! another thread has just truncated gets `SIGBUS`, which ends the whole
//! VMM. So every snapshot handed out by [`DeviceMemory`] is a
//! [`MemoryGuard`] that holds off shrinks until it is dropped, and a shrink
//! swaps the map before it lets new guards in: an access either finishes
//! before the truncation or sees the smaller map and gets an error, never a
//! fault. Punched holes need no such care (a hole reads zero).
//!
//! Guards are re-entrant on one thread (a device that takes a second
//! snapshot while holding one never waits behind a queued shrink), and a
//! thread that holds a guard and asks for a shrink gets
//! [`Error::MemoryInUse`](crate::Error::MemoryInUse) instead of a deadlock.
//!
//! ```
//! use guest_mem::{GuestMem, RegionConfig, RegionIndex};
//! use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
//!
//! let mut window = RegionConfig::new(1 << 30, 8 << 20);
//! window.max_size = Some(8 << 20);
//! let mem = GuestMem::builder().region(window).build()?;
//! let devices = mem.device_memory();
//! let top = GuestAddress((1 << 30) + (6 << 20));
//! {
//!     let m = devices.memory(); // holds off shrinks while in use
//!     m.write_obj(1u8, top).unwrap();
//!     // This thread holds a guard: shrinking now would wait on itself.
//!     assert!(mem.resize(RegionIndex(0), 4 << 20).is_err());
//! }
//! mem.resize(RegionIndex(0), 4 << 20)?; // no guard: the tail goes
//! assert!(devices.memory().read_obj::<u8>(top).is_err()); // refused, no SIGBUS
//! # Ok::<(), guest_mem::Error>(())
//! ```

use std::cell::Cell;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex};

use vm_memory::GuestAddressSpace;

use crate::region::{AtomicMemoryMap, GuestMemoryMap};

thread_local! {
    /// Guards this thread holds (of any gate).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

#[derive(Debug, Default)]
struct GateState {
    readers: usize,
    /// A shrink is waiting or running: new readers wait (unless re-entrant).
    writer: bool,
}

/// Readers (device accesses) against shrinks. Writer-preferring, so a
/// stream of device accesses cannot starve an unplug.
#[derive(Debug, Default)]
pub(crate) struct AccessGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl AccessGate {
    fn enter(&self) {
        let reentrant = HELD.with(|h| h.get() > 0);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.writer && !reentrant {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.readers += 1;
        HELD.with(|h| h.set(h.get() + 1));
    }

    fn leave(&self) {
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.readers -= 1;
        if s.readers == 0 {
            self.changed.notify_all();
        }
    }

    /// Runs `f` with no device access in progress and none starting.
    /// Refuses (returns `None`) when this thread itself holds a guard.
    pub(crate) fn exclusive<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        if HELD.with(|h| h.get() > 0) {
            return None;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.writer {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.writer = true;
        while s.readers > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        drop(s);
        // Lets readers in again even if `f` panics.
        struct Reopen<'a>(&'a AccessGate);
        impl Drop for Reopen<'_> {
            fn drop(&mut self) {
                let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
                s.writer = false;
                self.0.changed.notify_all();
            }
        }
        let _reopen = Reopen(self);
        Some(f())
    }
}

/// The guest memory map for devices: a `vm-memory` address space whose
/// snapshots hold off shrinks while they live. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DeviceMemory {
    map: AtomicMemoryMap,
    gate: Arc<AccessGate>,
}

impl DeviceMemory {
    pub(crate) fn new(map: AtomicMemoryMap, gate: Arc<AccessGate>) -> Self {
        DeviceMemory { map, gate }
    }
}

impl GuestAddressSpace for DeviceMemory {
    type M = GuestMemoryMap;
    type T = MemoryGuard;

    fn memory(&self) -> MemoryGuard {
        self.gate.enter();
        MemoryGuard(Rc::new(GuardInner {
            map: self.map.memory().into_inner(),
            gate: self.gate.clone(),
        }))
    }
}

#[derive(Debug)]
struct GuardInner {
    map: Arc<GuestMemoryMap>,
    gate: Arc<AccessGate>,
}

impl Drop for GuardInner {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

/// A snapshot of the memory map that no shrink can truncate under. Clones
/// share one hold; the last one dropped lets shrinks in. It stays on the
/// thread that took it (not `Send`): the gate counts guards per thread.
#[derive(Clone, Debug)]
pub struct MemoryGuard(Rc<GuardInner>);

impl Deref for MemoryGuard {
    type Target = GuestMemoryMap;

    fn deref(&self) -> &GuestMemoryMap {
        &self.0.map
    }
}
