//! A lock-free bitmap with one bit per guest page.
//!
//! Each region keeps one to remember which pages were discarded (balloon
//! inflate, free-page report, shrink) and not touched since: such a page's
//! contents are zero whatever the page source says, and readahead must not
//! fill it again (that would hand back memory the guest just returned).

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page, set and cleared atomically.
#[derive(Debug)]
pub struct PageBits {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl PageBits {
    /// A map of `pages` clear bits.
    pub fn new(pages: u64) -> Self {
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        PageBits { words, pages }
    }

    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.pages
    }

    /// Whether the map covers no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Whether `page` is set; pages past the end read as clear.
    pub fn get(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        self.words[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Clears `page`.
    pub fn clear(&self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize].fetch_and(!(1 << (page % 64)), Ordering::AcqRel);
        }
    }

    /// Sets `page`; returns whether it was clear before (false past the end).
    pub fn test_and_set(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Updates pages `[first, end)`; returns how many of them changed.
    fn update_range(&self, first: u64, end: u64, set: bool) -> u64 {
        let end = end.min(self.pages);
        let mut changed = 0;
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let w = &self.words[(p / 64) as usize];
            let old = if set {
                w.fetch_or(mask, Ordering::AcqRel)
            } else {
                w.fetch_and(!mask, Ordering::AcqRel)
            };
            let was_set = (old & mask).count_ones() as u64;
            changed += if set { n - was_set } else { was_set };
            p += n;
        }
        changed
    }

    /// Sets pages `[first, end)`.
    pub fn set_range(&self, first: u64, end: u64) {
        self.update_range(first, end, true);
    }

    /// Clears pages `[first, end)`.
    pub fn clear_range(&self, first: u64, end: u64) {
        self.update_range(first, end, false);
    }

    /// Clears pages `[first, end)`; returns how many of them were set.
    pub fn take_range(&self, first: u64, end: u64) -> u64 {
        self.update_range(first, end, false)
    }

    /// The first set page in `[first, end)`, if any.
    pub fn first_set(&self, first: u64, end: u64) -> Option<u64> {
        let end = end.min(self.pages);
        let mut p = first;
        while p < end {
            let word = self.words[(p / 64) as usize].load(Ordering::Acquire) >> (p % 64);
            if word != 0 {
                let hit = p + word.trailing_zeros() as u64;
                return (hit < end).then_some(hit);
            }
            p = (p / 64 + 1) * 64;
        }
        None
    }

    /// How many pages are set.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cross_word_boundaries() {
        let b = PageBits::new(200);
        b.set_range(60, 130);
        assert!(!b.get(59));
        assert!(b.get(60) && b.get(64) && b.get(129));
        assert!(!b.get(130));
        assert_eq!(b.count(), 70);
        assert_eq!(b.first_set(0, 200), Some(60));
        assert_eq!(b.first_set(70, 200), Some(70));
        assert_eq!(b.first_set(130, 200), None);
        b.clear_range(64, 128);
        assert_eq!(b.count(), 6);
        assert_eq!(b.first_set(61, 128), Some(61));
        assert_eq!(b.first_set(64, 128), None);
        b.clear(60);
        assert!(!b.get(60));
    }

    #[test]
    fn out_of_range_is_ignored() {
        let b = PageBits::new(10);
        b.set_range(5, 100);
        assert_eq!(b.count(), 5);
        assert!(!b.get(10));
        b.clear(1000);
        assert_eq!(b.first_set(0, 1000), Some(5));
        assert!(!b.test_and_set(1000));
    }

    #[test]
    fn test_and_set_and_take_count_what_changed() {
        let b = PageBits::new(200);
        assert!(b.test_and_set(63));
        assert!(!b.test_and_set(63));
        assert!(b.test_and_set(64));
        assert!(b.test_and_set(150));
        assert_eq!(b.take_range(0, 100), 2);
        assert_eq!(b.take_range(0, 100), 0);
        assert_eq!(b.count(), 1);
        assert_eq!(b.take_range(100, 1000), 1);
    }
}
