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

use super::BALLOON_PAGE;

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
}
