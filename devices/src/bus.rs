//! Port-I/O and MMIO buses: address ranges routed to devices.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the range it was inserted at.
/// Guest accesses arrive unvalidated: devices must accept any offset and
/// length the range allows and ignore what they do not implement.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already there.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// Routes accesses to devices; counts the ones nothing claims.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
    unhandled: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let prev = self.devices.range(..end).next_back();
        if let Some((&b, e)) = prev {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let off = addr - base;
        (off.checked_add(len as u64)? <= entry.len).then_some((off, entry))
    }

    /// Dispatches a read; returns false (and fills `data` with ones, as an
    /// unclaimed ISA port reads) when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, e)) => {
                e.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, e)) => {
                e.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Accesses no device claimed.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.0.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
    }

    #[test]
    fn routes_by_range_and_counts_the_rest() {
        let mut bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Echo(vec![0; 8])));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [7]);
        // Straddling the end, before, after: unclaimed.
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut w));
        assert_eq!(w, [0xff, 0xff]);
        assert!(!bus.write(0x3f7, &[1]));
        assert!(!bus.write(0x400, &[1]));
        assert_eq!(bus.unhandled(), 3);
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev.clone(), 0x108, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0xf8, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0x110, 0).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev, 0x110, 0x10).unwrap();
    }
}
