//! How many pages to install with the faulting one.
//!
//! Like the kernel's readahead: a fault right after the previous window is a
//! sequential stream and doubles the window (up to the maximum); any other
//! fault starts again from the initial window. Windows run forward from the
//! faulting page and stop at the first discarded page, the plugged end and
//! the region end, so readahead never refills memory the guest gave back.

use std::sync::atomic::Ordering;

use crate::region::Region;

/// Readahead settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readahead {
    /// Largest window in bytes (at least one page; at most 2 MiB is sensible).
    pub max: u64,
    /// Grow the window on sequential faults (`true`), or always install `max`.
    pub adaptive: bool,
}

impl Default for Readahead {
    fn default() -> Self {
        Readahead {
            max: 2 << 20,
            adaptive: true,
        }
    }
}

impl Readahead {
    /// No readahead: one page per fault.
    pub const NONE: Readahead = Readahead {
        max: 0,
        adaptive: false,
    };

    /// Always install a window of `bytes`.
    pub const fn fixed(bytes: u64) -> Readahead {
        Readahead {
            max: bytes,
            adaptive: false,
        }
    }
}

/// Initial adaptive window, in pages.
const INITIAL_PAGES: u64 = 4;

/// The window, in pages, for a fault at `page` (region page index), limited
/// to `limit` pages (plugged end) and to the first discarded page.
pub(crate) fn window_pages(cfg: &Readahead, region: &Region, page: u64, limit: u64) -> u64 {
    let page_size = region.page_size();
    let max = (cfg.max / page_size).max(1);
    let want = if !cfg.adaptive || max == 1 {
        max
    } else {
        let state = &region.readahead;
        let sequential = state.next.load(Ordering::Relaxed) == page && page != 0;
        let last = state.window.load(Ordering::Relaxed);
        if sequential {
            (last.max(1) * 2).min(max)
        } else {
            INITIAL_PAGES.min(max)
        }
    };
    let mut end = page.saturating_add(want).min(limit);
    if end > page + 1 {
        if let Some(hole) = region.discarded.first_set(page + 1, end) {
            end = hole;
        }
    }
    let n = end.saturating_sub(page).max(1);
    if cfg.adaptive {
        region.readahead.window.store(n, Ordering::Relaxed);
        region.readahead.next.store(page + n, Ordering::Relaxed);
    }
    n
}
