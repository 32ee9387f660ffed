//! What the fault path needs of the memory a fault lands in. One path
//! serves this crate's own regions and another process's memory
//! ([`crate::external`]): both are tables of regions, each a window of a
//! file with a truncate generation, a discard map and a page source.

use std::sync::Arc;

use userfaultfd::Event;

use crate::backing::{host_page_size, BackingKind};
use crate::generation::{FileRange, InstallGuard, TruncateGen};
use crate::huge_fill::HugeFill;
use crate::region::{DiscardView, ReadaheadState, Region, RegionSource};
use crate::stats::Stats;

/// One region as the fault path sees it.
pub(crate) trait FaultRegion: Send + Sync {
    /// Names the region in messages.
    fn label(&self) -> usize;
    /// Address of its first byte in the faulting process.
    fn host_addr(&self) -> u64;
    /// Bytes registered with the userfaultfd.
    fn max_size(&self) -> u64;
    /// Page size: what one fault installs at least.
    fn page_size(&self) -> u64;
    /// Bytes from the start that a fault may install.
    fn backed_size(&self) -> u64;
    /// End of the stretch a fault at `offset` may install up to: the
    /// backed size, or the start of the next range kept out of reach
    /// (`offset` itself when it lies in one).
    fn reachable_end(&self, _offset: u64) -> u64 {
        self.backed_size()
    }
    /// The truncate generation of the file the region is a window of.
    fn generation(&self) -> &TruncateGen;
    /// The region's window of its file's discard map.
    fn discarded(&self) -> DiscardView<'_>;
    /// Where first-touch contents come from (`None`: zero).
    fn source(&self) -> Option<&RegionSource>;
    /// Adaptive readahead streams.
    fn readahead_state(&self) -> &ReadaheadState;
    /// The file range of `[offset, offset + len)` of the region.
    fn file_range(&self, offset: u64, len: u64) -> FileRange;
    /// Zero pages are installed by copying zeros: hugetlb memory has no
    /// `UFFDIO_ZEROPAGE`.
    fn zero_by_copy(&self) -> bool;

    /// Records region page `page` poisoned, under the install lock (a
    /// peer's regions keep no poisoned set: they are never poisoned).
    fn record_poisoned(&self, _guard: &InstallGuard<'_>, _page: u64) {}

    /// Serves fresh memory around `offset` a huge page at a time where it
    /// can ([`crate::huge_fill`]), under the install lock; `None` to
    /// install pages as usual.
    fn fill_huge(&self, _guard: &InstallGuard<'_>, _offset: u64) -> Option<HugeFill> {
        None
    }

    fn contains_host(&self, addr: u64) -> bool {
        addr >= self.host_addr() && addr - self.host_addr() < self.max_size()
    }
}

/// The regions one userfaultfd serves, and what happens to the events it
/// reads besides page faults.
pub(crate) trait RegionTable: Send + Sync + 'static {
    type Region: FaultRegion;

    /// Whether events other than page faults arrive (remove, unmap, remap).
    /// Then a thread holds the event gate from the read that returns such
    /// an event to the invalidation that applies it, and installs hold it
    /// shared: an install cannot slip between the two.
    const EVENTS: bool;

    /// The region holding `addr`.
    fn region_at(&self, addr: u64) -> Option<Arc<Self::Region>>;

    /// Applies an event that is not a page fault, under the event gate.
    fn apply_event(&self, stats: &Stats, event: Event);
}

impl FaultRegion for Region {
    fn label(&self) -> usize {
        self.index().0
    }
    fn host_addr(&self) -> u64 {
        Region::host_addr(self)
    }
    fn max_size(&self) -> u64 {
        Region::max_size(self)
    }
    fn page_size(&self) -> u64 {
        Region::page_size(self)
    }
    fn backed_size(&self) -> u64 {
        Region::backed_size(self)
    }
    fn reachable_end(&self, offset: u64) -> u64 {
        Region::reachable_end(self, offset)
    }
    fn generation(&self) -> &TruncateGen {
        self.backing().generation()
    }
    fn discarded(&self) -> DiscardView<'_> {
        Region::discarded(self)
    }
    fn source(&self) -> Option<&RegionSource> {
        self.source.as_ref()
    }
    fn readahead_state(&self) -> &ReadaheadState {
        &self.readahead
    }
    fn file_range(&self, offset: u64, len: u64) -> FileRange {
        Region::file_range(self, offset, len)
    }
    fn zero_by_copy(&self) -> bool {
        self.backing().kind() == BackingKind::Hugetlbfs
    }
    fn fill_huge(&self, guard: &InstallGuard<'_>, offset: u64) -> Option<HugeFill> {
        Region::fill_huge(self, guard, offset)
    }
    fn record_poisoned(&self, guard: &InstallGuard<'_>, page: u64) {
        let file_page = self.file_offset() / Region::page_size(self) + page;
        self.backing().mark_poisoned(guard, file_page);
    }
}

/// This crate's own regions, sorted by host address. Nothing but page
/// faults is asked of their userfaultfd.
pub(crate) struct OwnRegions(pub Vec<Arc<Region>>);

impl RegionTable for OwnRegions {
    type Region = Region;
    const EVENTS: bool = false;

    fn region_at(&self, addr: u64) -> Option<Arc<Region>> {
        let i = self.0.partition_point(|r| r.host_addr() <= addr);
        let r = self.0.get(i.checked_sub(1)?)?;
        FaultRegion::contains_host(&**r, addr).then(|| r.clone())
    }

    fn apply_event(&self, _stats: &Stats, event: Event) {
        log::debug!("fault handler: ignoring event {event:?}");
    }
}

/// Whether `page` is the host's base page size (else: hugetlb).
pub(crate) fn is_base_page(page: u64) -> bool {
    page == host_page_size()
}
