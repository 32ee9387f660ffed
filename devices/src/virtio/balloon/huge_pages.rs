//! Balloon pages over memory the host gives back in larger units
//! (hugetlbfs: 2 MiB).
//!
//! The guest inflates 4 KiB pages, 256 at a time, in no particular order; a
//! huge page can only be given back whole. The tracker remembers which
//! small pages of each huge page are in the balloon and says when one
//! becomes complete, so the device frees exactly the huge pages the guest
//! gave up entirely and reports what it freed. A deflated page makes its
//! huge page incomplete again (the guest may touch it, and the host then
//! backs the whole huge page); inflating it again completes it once more.
//!
//! Its size is bounded by guest RAM: one entry per huge page that holds at
//! least one balloon page.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::BALLOON_PAGE;

/// The largest unit a restored tracker accepts (1 GiB huge pages).
const MAX_UNIT: u64 = 1 << 30;

/// One unit of a saved [`HugePageTracker`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugeUnitState {
    /// The unit's size in bytes (a power of two above a balloon page).
    pub grain: u64,
    /// Its index (guest-physical address / `grain`).
    pub unit: u64,
    /// Which of its balloon pages are in the balloon, one bit each.
    pub pages: Vec<u64>,
}

/// Small pages per unit, as a bit set.
#[derive(Debug, Clone)]
struct Unit {
    bits: Vec<u64>,
    count: u64,
}

/// Which balloon pages of each discard unit the guest holds in the balloon.
#[derive(Debug, Default)]
pub struct HugePageTracker {
    /// Keyed by (unit size, unit index).
    units: BTreeMap<(u64, u64), Unit>,
}

impl HugePageTracker {
    /// Records balloon page `pfn` inflated in a unit of `grain` bytes.
    /// Returns the unit's guest-physical address if this completed it.
    pub fn inflate(&mut self, pfn: u64, grain: u64) -> Option<u64> {
        let per_unit = grain / BALLOON_PAGE;
        let (unit, bit) = (pfn / per_unit, pfn % per_unit);
        let u = self.units.entry((grain, unit)).or_insert_with(|| Unit {
            bits: vec![0; per_unit.div_ceil(64) as usize],
            count: 0,
        });
        let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if u.bits[word] & mask != 0 {
            return None;
        }
        u.bits[word] |= mask;
        u.count += 1;
        (u.count == per_unit).then_some(unit * grain)
    }

    /// Records balloon page `pfn` deflated from a unit of `grain` bytes.
    pub fn deflate(&mut self, pfn: u64, grain: u64) {
        let per_unit = grain / BALLOON_PAGE;
        let (unit, bit) = (pfn / per_unit, pfn % per_unit);
        let Some(u) = self.units.get_mut(&(grain, unit)) else {
            return;
        };
        let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if u.bits[word] & mask != 0 {
            u.bits[word] &= !mask;
            u.count -= 1;
            if u.count == 0 {
                self.units.remove(&(grain, unit));
            }
        }
    }

    /// Forgets everything (the driver reset the device: the balloon is
    /// empty from the guest's side).
    pub fn clear(&mut self) {
        self.units.clear();
    }

    /// Units holding at least one balloon page.
    pub fn units(&self) -> usize {
        self.units.len()
    }

    /// Its state, for a snapshot.
    pub fn save(&self) -> Vec<HugeUnitState> {
        self.units
            .iter()
            .map(|(&(grain, unit), u)| HugeUnitState {
                grain,
                unit,
                pages: u.bits.clone(),
            })
            .collect()
    }

    /// A tracker as `units` describe it. Each unit must be whole (a power of
    /// two above a balloon page, at most 1 GiB, its bit set of the right
    /// length, at least one page in), appear once, and be a unit of RAM as
    /// `unit_of_ram(grain, address)` says.
    pub fn restore(
        units: &[HugeUnitState],
        unit_of_ram: impl Fn(u64, u64) -> bool,
    ) -> Result<Self, String> {
        let mut t = HugePageTracker::default();
        for s in units {
            let grain = s.grain;
            if !grain.is_power_of_two() || grain <= BALLOON_PAGE || grain > MAX_UNIT {
                return Err(format!("a huge page unit of {grain:#x} bytes"));
            }
            let per_unit = grain / BALLOON_PAGE;
            let words = per_unit.div_ceil(64) as usize;
            let past_end =
                per_unit % 64 != 0 && s.pages.last().is_some_and(|w| w >> (per_unit % 64) != 0);
            if s.pages.len() != words || past_end {
                return Err(format!(
                    "huge page {:#x}: {} words of page bits for {per_unit} pages",
                    s.unit,
                    s.pages.len()
                ));
            }
            let count: u64 = s.pages.iter().map(|w| u64::from(w.count_ones())).sum();
            let at = s.unit.checked_mul(grain);
            if count == 0 || !at.is_some_and(|a| unit_of_ram(grain, a)) {
                return Err(format!(
                    "huge page {:#x} of {grain:#x} bytes: not RAM in such units, or empty",
                    s.unit
                ));
            }
            let unit = Unit {
                bits: s.pages.clone(),
                count,
            };
            if t.units.insert((grain, s.unit), unit).is_some() {
                return Err(format!("huge page {:#x} listed twice", s.unit));
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUGE: u64 = 2 << 20;
    const PER: u64 = HUGE / BALLOON_PAGE;

    #[test]
    fn a_huge_page_completes_once_all_its_small_pages_are_in() {
        let mut t = HugePageTracker::default();
        let base = 3 * PER; // the fourth huge page
        for p in (0..PER).rev().skip(1) {
            assert_eq!(t.inflate(base + p, HUGE), None);
        }
        assert_eq!(t.inflate(base + 5, HUGE), None, "a duplicate adds nothing");
        assert_eq!(t.inflate(base + PER - 1, HUGE), Some(3 * HUGE));
        // Deflating one page and inflating it again completes it again.
        t.deflate(base + 7, HUGE);
        assert_eq!(t.inflate(base + 7, HUGE), Some(3 * HUGE));
        for p in 0..PER {
            t.deflate(base + p, HUGE);
        }
        assert_eq!(t.units(), 0, "an empty unit is forgotten");
        t.deflate(base, HUGE); // never inflated: nothing happens
        assert_eq!(t.units(), 0);
    }

    #[test]
    fn a_restored_tracker_completes_the_same_unit_and_bad_units_are_refused() {
        let mut t = HugePageTracker::default();
        for p in 1..PER {
            t.inflate(PER + p, HUGE);
        }
        let saved = t.save();
        let mut r = HugePageTracker::restore(&saved, |_, _| true).unwrap();
        assert_eq!(r.inflate(PER, HUGE), Some(HUGE), "one page was missing");
        let bad = |f: &dyn Fn(&mut HugeUnitState)| {
            let mut s = saved.clone();
            f(&mut s[0]);
            HugePageTracker::restore(&s, |_, _| true).unwrap_err()
        };
        bad(&|u| u.grain = 3 << 20);
        bad(&|u| u.grain = BALLOON_PAGE);
        bad(&|u| u.pages.push(0));
        bad(&|u| u.pages.iter_mut().for_each(|w| *w = 0));
        bad(&|u| u.unit = u64::MAX);
        let mut twice = saved.clone();
        twice.push(saved[0].clone());
        assert!(HugePageTracker::restore(&twice, |_, _| true).is_err());
        assert!(
            HugePageTracker::restore(&saved, |_, _| false).is_err(),
            "not RAM"
        );
    }
}
