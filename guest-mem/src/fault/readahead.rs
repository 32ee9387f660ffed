//! How many pages to install with the faulting one.
//!
//! Like the kernel's readahead: a fault right after a stream's previous
//! window continues that stream and doubles its window (up to the maximum);
//! any other fault starts a new stream at the initial window. Each region
//! tracks a few streams, so vCPUs walking different parts of memory do not
//! reset each other. Windows run forward from the
//! faulting page and stop at the first discarded page, the plugged end and
//! the region end, so readahead never refills memory the guest gave back.

use std::sync::atomic::Ordering;

use super::target::FaultRegion;
use crate::region::READAHEAD_STREAMS;

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
pub(crate) fn window_pages(
    cfg: &Readahead,
    region: &impl FaultRegion,
    page: u64,
    limit: u64,
) -> u64 {
    let page_size = region.page_size();
    let max = (cfg.max / page_size).max(1);
    // A fault right where a stream's last window ended continues it.
    let state = region.readahead_state();
    let stream = if cfg.adaptive && max > 1 {
        let hit = state
            .streams
            .iter()
            .find(|s| page != 0 && s.next.load(Ordering::Relaxed) == page);
        Some(hit.map(|s| (s, true)).unwrap_or_else(|| {
            let v = state.victim.fetch_add(1, Ordering::Relaxed) as usize % READAHEAD_STREAMS;
            (&state.streams[v], false)
        }))
    } else {
        None
    };
    let want = match stream {
        None => max,
        Some((s, true)) => (s.window.load(Ordering::Relaxed).max(1) * 2).min(max),
        Some((_, false)) => INITIAL_PAGES.min(max),
    };
    let mut end = page.saturating_add(want).min(limit);
    if end > page + 1 {
        if let Some(hole) = region.discarded().first_set(page + 1, end) {
            end = hole;
        }
    }
    let n = end.saturating_sub(page).max(1);
    if let Some((s, _)) = stream {
        s.window.store(n, Ordering::Relaxed);
        s.next.store(page + n, Ordering::Relaxed);
    }
    n
}
