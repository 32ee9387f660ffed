//! virtio-mem's saved state: the window it was built over, the requested
//! size, which blocks the guest plugged, and its counters. The queue's
//! position is the transport's (`MmioTransportState`).
//!
//! Restoring makes the hotplug backend agree with the blocks: plugged ones
//! reachable, the rest out of reach. The window's memory itself (its file
//! and contents) is the VMM's to restore first; a state with blocks plugged
//! past what the window's backing covers is refused.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use vm_memory::GuestAddressSpace;

use super::{MemCounters, VirtioMem, BLOCK_SIZE};
use crate::state::{check_version, saved_counters, StateError};

/// The version of [`VirtioMemDeviceState`] this build writes and reads.
pub const VIRTIO_MEM_STATE_VERSION: u32 = 1;
const DEV: &str = "virtio-mem";

saved_counters!(
    /// virtio-mem's counters ([`MemCounters`]), field for field.
    MemCountersState for MemCounters {
        plugs, unplugs, refused, rejected_chains, backend_errors,
        self_unplug_refused, unused_queue_notifies,
    }
);

/// The saved state of a [`VirtioMem`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemDeviceState {
    /// [`VIRTIO_MEM_STATE_VERSION`].
    pub version: u32,
    /// Guest-physical start of the window.
    pub addr: u64,
    /// Size of the window.
    pub region_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Bytes the host asked to have plugged.
    pub requested_size: u64,
    /// Which blocks are plugged: bit `i % 64` of word `i / 64` for block `i`.
    pub plugged: Vec<u64>,
    /// Counters.
    pub counters: MemCountersState,
}

fn invalid(what: impl Into<String>) -> StateError {
    StateError::invalid(DEV, what)
}

impl<M: GuestAddressSpace> VirtioMem<M> {
    /// Its state, for a snapshot.
    pub fn save(&self) -> VirtioMemDeviceState {
        let mut plugged = vec![0u64; self.plugged.len().div_ceil(64)];
        for (i, _) in self.plugged.iter().enumerate().filter(|(_, &p)| p) {
            plugged[i / 64] |= 1 << (i % 64);
        }
        VirtioMemDeviceState {
            version: VIRTIO_MEM_STATE_VERSION,
            addr: self.addr,
            region_size: self.region_size,
            block_size: BLOCK_SIZE,
            requested_size: self.state.requested_size.load(Ordering::Relaxed),
            plugged,
            counters: MemCountersState::save(&self.state.counters),
        }
    }

    /// Takes `saved` over, after checking it describes this device's window
    /// and fits its backing, and plugs exactly the saved blocks.
    pub fn restore(&mut self, saved: &VirtioMemDeviceState) -> Result<(), StateError> {
        check_version(DEV, saved.version, VIRTIO_MEM_STATE_VERSION)?;
        if (saved.addr, saved.region_size, saved.block_size)
            != (self.addr, self.region_size, BLOCK_SIZE)
        {
            return Err(invalid(format!(
                "a window of {:#x}+{:#x} in {:#x}-byte blocks, this one is {:#x}+{:#x} in {BLOCK_SIZE:#x}",
                saved.addr, saved.region_size, saved.block_size, self.addr, self.region_size
            )));
        }
        let blocks = self.plugged.len();
        let past_end = blocks % 64 != 0
            && saved
                .plugged
                .last()
                .is_some_and(|w| w >> (blocks % 64) != 0);
        if saved.plugged.len() != blocks.div_ceil(64) || past_end {
            return Err(invalid(format!(
                "a block bitmap of {} words for {blocks} blocks",
                saved.plugged.len()
            )));
        }
        if saved.requested_size % BLOCK_SIZE != 0 || saved.requested_size > self.region_size {
            return Err(invalid(format!(
                "requested size {:#x} is not whole blocks of the window",
                saved.requested_size
            )));
        }
        let plugged: Vec<bool> = (0..blocks)
            .map(|i| saved.plugged[i / 64] & (1 << (i % 64)) != 0)
            .collect();
        let end = plugged.iter().rposition(|&p| p).map_or(0, |i| i + 1) as u64 * BLOCK_SIZE;
        let backed = self.backend.backed_size();
        if end > backed {
            return Err(invalid(format!(
                "blocks plugged up to {end:#x}, the window's memory covers {backed:#x}"
            )));
        }
        let reach = |offset: u64, len: u64, on: bool| {
            self.backend
                .set_plugged(offset, len, on)
                .map_err(|e| invalid(format!("making blocks reachable: {e}")))
        };
        reach(0, self.region_size, false)?;
        let mut i = 0;
        while i < blocks {
            let run = plugged[i..].iter().take_while(|&&p| p).count();
            if run > 0 {
                reach(i as u64 * BLOCK_SIZE, run as u64 * BLOCK_SIZE, true)?;
            }
            i += run + 1;
        }
        let count = plugged.iter().filter(|&&p| p).count() as u64;
        self.plugged = plugged;
        let s = &self.state;
        s.requested_size
            .store(saved.requested_size, Ordering::Relaxed);
        s.plugged_size.store(count * BLOCK_SIZE, Ordering::Relaxed);
        saved.counters.restore(&s.counters);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One way to spoil a good state.
    type Change = Box<dyn Fn(&mut VirtioMemDeviceState)>;
    use crate::virtio::mem::tests::{ask, device, memory, MIB};
    use crate::virtio::mem::{req, resp};
    use crate::virtio::VirtioDevice;
    use guest_mem::{GuestMem, RegionIndex};
    use std::sync::Arc;

    /// Blocks 0-2 and 5 plugged; block 4 backed (below the end) but not.
    fn plugged(mem: &Arc<GuestMem>) -> VirtioMem {
        let mut d = device(mem);
        d.state().request(8 * MIB);
        assert_eq!(ask(&mut d, req::PLUG, 0, 3).0, resp::ACK);
        assert_eq!(ask(&mut d, req::PLUG, 5, 1).0, resp::ACK);
        d
    }

    #[test]
    fn a_restored_device_answers_state_requests_the_same() {
        let mem = memory();
        let mut d = plugged(&mem);
        let json = serde_json::to_value(d.save()).unwrap();
        // The window as a restored VM builds it: its backed part reachable.
        let mut r = device(&mem);
        mem.set_accessible(RegionIndex(1), 0, 12 * MIB, true)
            .unwrap();
        r.restore(&serde_json::from_value(json).unwrap()).unwrap();
        assert_eq!(
            mem.accessible_extents(RegionIndex(1)),
            vec![(0, 6 * MIB), (10 * MIB, 2 * MIB)],
            "exactly the plugged blocks are reachable"
        );
        for (block, n) in [(0, 3), (0, 6), (3, 2), (4, 1), (5, 1), (6, 10), (0, 16)] {
            assert_eq!(
                ask(&mut r, req::STATE, block, n),
                ask(&mut d, req::STATE, block, n),
                "blocks {block}+{n}"
            );
        }
        let st = r.state();
        assert_eq!(st.plugged_size.load(Ordering::Relaxed), 8 * MIB);
        assert_eq!(st.requested_size.load(Ordering::Relaxed), 8 * MIB);
        assert_eq!(st.counters.plugs.load(Ordering::Relaxed), 2);
        // And it goes on: the last unplug truncates as the original would.
        assert_eq!(ask(&mut r, req::UNPLUG, 5, 1).0, resp::ACK);
        assert_eq!(mem.regions()[1].backed_size(), 6 * MIB);
    }

    #[test]
    fn bad_virtio_mem_states_are_refused() {
        let mem = memory();
        let good = plugged(&mem).save();
        let cases: Vec<(&str, Change)> = vec![
            ("version", Box::new(|s| s.version = 2)),
            ("another window", Box::new(|s| s.addr += BLOCK_SIZE)),
            ("another size", Box::new(|s| s.region_size *= 2)),
            ("block size", Box::new(|s| s.block_size = 4096)),
            ("bitmap too long", Box::new(|s| s.plugged.push(0))),
            ("bitmap too short", Box::new(|s| s.plugged.clear())),
            (
                "a block past the window",
                Box::new(|s| s.plugged[0] |= 1 << 20),
            ),
            ("past the backing", Box::new(|s| s.plugged[0] |= 1 << 9)),
            (
                "requested too big",
                Box::new(|s| s.requested_size = 64 * MIB),
            ),
            ("requested not blocks", Box::new(|s| s.requested_size = MIB)),
        ];
        for (what, change) in cases {
            let mut s = good.clone();
            change(&mut s);
            let mut r = device(&mem);
            assert!(r.restore(&s).is_err(), "{what}: accepted");
        }
        let mut r = device(&mem);
        let e = r.restore_state(&serde_json::json!({"version": 1}));
        assert!(matches!(e, Err(StateError::Malformed { .. })), "{e:?}");
        assert!(device(&mem).restore(&good).is_ok());
    }
}
