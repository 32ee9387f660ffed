//! The balloon's saved state: the sizes, the guest's statistics and poison
//! value, the statistics buffer it holds, the huge pages part-way in the
//! balloon, and its counters. Queue positions and the negotiated features
//! are the transport's (`MmioTransportState`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::huge_pages::{HugePageTracker, HugeUnitState};
use super::{
    Balloon, BalloonCounters, BALLOON_PAGE, MAX_DESCS_PER_PFN_CHAIN, QUEUE_SIZE, STAT_SIZE,
    VIRTIO_BALLOON_F_PAGE_POISON,
};
use crate::state::{check_version, saved_counters, StateError};

/// The version of [`BalloonDeviceState`] this build writes and reads.
pub const BALLOON_STATE_VERSION: u32 = 1;
const DEV: &str = "balloon";

saved_counters!(
    /// The balloon's counters ([`BalloonCounters`]), field for field.
    BalloonCountersState for BalloonCounters {
        inflated_pages, deflated_pages, reported_bytes, freed_bytes, discards,
        rejected_pfns, rejected_chains, reports_kept_for_poison, discard_errors,
        unused_queue_notifies, yields, inflate_batches, inflate_us, stray_ranges,
    }
);

/// The saved state of a [`Balloon`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonDeviceState {
    /// [`BALLOON_STATE_VERSION`].
    pub version: u32,
    /// The features the device offered (they follow its configuration,
    /// which the restored device must share).
    pub offered_features: u64,
    /// Pages the host asked the guest to hold (`num_pages`).
    pub target_pages: u32,
    /// Pages the guest said it holds (`actual`).
    pub actual_pages: u32,
    /// The guest's free page poison value.
    pub poison_val: u32,
    /// The guest's last statistics, by tag.
    pub guest_stats: BTreeMap<u16, u64>,
    /// The statistics buffer the device holds, by head index.
    pub stats_head: Option<u16>,
    /// Huge pages with some of their balloon pages in the balloon.
    pub huge_pages: Vec<HugeUnitState>,
    /// Counters.
    pub counters: BalloonCountersState,
}

fn invalid(what: impl Into<String>) -> StateError {
    StateError::invalid(DEV, what)
}

impl<M: GuestAddressSpace> Balloon<M> {
    /// Its state, for a snapshot.
    pub fn save(&self) -> BalloonDeviceState {
        let s = &self.state;
        BalloonDeviceState {
            version: BALLOON_STATE_VERSION,
            offered_features: self.offered,
            target_pages: s.target_pages.load(Ordering::Relaxed),
            actual_pages: s.actual_pages.load(Ordering::Relaxed),
            poison_val: s.poison_val.load(Ordering::Relaxed),
            guest_stats: s
                .guest_stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            stats_head: self.stats_head,
            huge_pages: self.huge.save(),
            counters: BalloonCountersState::save(&s.counters),
        }
    }

    /// Takes `saved` over, after checking it fits this device and its
    /// memory. Called once the negotiated features are back (the queue
    /// roles and the poison feature depend on them).
    pub fn restore(&mut self, saved: &BalloonDeviceState) -> Result<(), StateError> {
        check_version(DEV, saved.version, BALLOON_STATE_VERSION)?;
        if saved.offered_features != self.offered {
            return Err(invalid(format!(
                "offered features {:#x}, this device offers {:#x} (another configuration)",
                saved.offered_features, self.offered
            )));
        }
        if let Some(ram) = self.backend.ram_bytes() {
            for (what, pages) in [
                ("target", saved.target_pages),
                ("actual", saved.actual_pages),
            ] {
                if u64::from(pages) * BALLOON_PAGE > ram {
                    return Err(invalid(format!(
                        "{what} of {pages} pages, more than the {ram:#x} bytes of RAM"
                    )));
                }
            }
        }
        if saved.poison_val != 0 && !self.has(VIRTIO_BALLOON_F_PAGE_POISON) {
            return Err(invalid(
                "a poison value without VIRTIO_BALLOON_F_PAGE_POISON",
            ));
        }
        let max_stats = MAX_DESCS_PER_PFN_CHAIN * 64;
        if saved.guest_stats.len() > max_stats {
            return Err(invalid(format!(
                "{} statistics, a buffer holds at most {max_stats}",
                saved.guest_stats.len()
            )));
        }
        if let Some(head) = saved.stats_head {
            if self.stats_queue.is_none() || head >= QUEUE_SIZE {
                return Err(invalid(format!(
                    "a held statistics buffer {head} (statistics queue negotiated: {})",
                    self.stats_queue.is_some()
                )));
            }
        }
        let backend = &self.backend;
        let huge = HugePageTracker::restore(&saved.huge_pages, |grain, at| {
            backend.discard_granularity(GuestAddress(at)) == Some(grain)
                && backend.is_ram(GuestAddress(at), grain)
        })
        .map_err(invalid)?;
        let s = &self.state;
        s.target_pages.store(saved.target_pages, Ordering::Relaxed);
        s.actual_pages.store(saved.actual_pages, Ordering::Relaxed);
        s.poison_val.store(saved.poison_val, Ordering::Relaxed);
        *s.guest_stats.lock().unwrap_or_else(|p| p.into_inner()) = saved.guest_stats.clone();
        saved.counters.restore(&s.counters);
        self.stats_head = saved.stats_head;
        self.huge = huge;
        Ok(())
    }
}

// A statistics record is 10 bytes: the bound above counts records.
const _: () = assert!(STAT_SIZE == 10);

#[cfg(test)]
mod tests {
    use super::*;

    /// One way to spoil a good state.
    type Change = Box<dyn Fn(&mut BalloonDeviceState)>;
    use crate::virtio::balloon::{BalloonConfig, VIRTIO_BALLOON_F_STATS_VQ};
    use crate::virtio::VirtioDevice;
    use guest_mem::{GuestMem, RegionConfig};
    use std::sync::Arc;

    fn balloon(features: u64) -> Balloon {
        let mem = GuestMem::builder()
            .region(RegionConfig::new(0, 16 << 20))
            .build()
            .unwrap();
        let mut b: Balloon = Balloon::new(Arc::new(mem), BalloonConfig::default());
        b.ack_features(features);
        b
    }

    fn good() -> BalloonDeviceState {
        let b = balloon(1 << VIRTIO_BALLOON_F_STATS_VQ);
        b.state().set_target(1024);
        b.state().set_actual(512);
        b.state().guest_stats.lock().unwrap().insert(4, 99);
        let mut s = b.save();
        s.stats_head = Some(3);
        s
    }

    #[test]
    fn a_balloon_state_round_trips() {
        let s = good();
        let mut b = balloon(1 << VIRTIO_BALLOON_F_STATS_VQ);
        b.restore_state(&serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(b.save(), s);
    }

    #[test]
    fn bad_balloon_states_are_refused() {
        let cases: Vec<(&str, Change)> = vec![
            ("version", Box::new(|s| s.version = 0)),
            (
                "another configuration",
                Box::new(|s| s.offered_features = 0),
            ),
            ("actual past RAM", Box::new(|s| s.actual_pages = 4097)),
            ("target past RAM", Box::new(|s| s.target_pages = u32::MAX)),
            (
                "poison without the feature",
                Box::new(|s| s.poison_val = 0xaa),
            ),
            (
                "held buffer past the queue",
                Box::new(|s| s.stats_head = Some(256)),
            ),
            (
                "too many statistics",
                Box::new(|s| s.guest_stats = (0..2000).map(|t| (t, 0)).collect()),
            ),
            (
                "a huge page on 4 KiB memory",
                Box::new(|s| {
                    s.huge_pages = vec![HugeUnitState {
                        grain: 2 << 20,
                        unit: 1,
                        pages: vec![1; 8],
                    }]
                }),
            ),
        ];
        for (what, change) in cases {
            let mut s = good();
            change(&mut s);
            let mut b = balloon(1 << VIRTIO_BALLOON_F_STATS_VQ);
            assert!(b.restore(&s).is_err(), "{what}: accepted");
        }
        let mut b = balloon(0);
        assert!(
            b.restore(&good()).is_err(),
            "a held buffer without a stats queue"
        );
        let e = b.restore_state(&serde_json::json!([1, 2]));
        assert!(matches!(e, Err(StateError::Malformed { .. })), "{e:?}");
    }
}
