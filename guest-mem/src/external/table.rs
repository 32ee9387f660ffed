//! Another process's regions as the fault path sees them, and the events
//! its userfaultfd sends besides faults: a remove is an invalidation of the
//! memory file's generation that marks its pages discarded; an unmap or a
//! remap changes the table.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use userfaultfd::Event;

use super::ExternalRegion;
use crate::fault::target::{is_base_page, FaultRegion, RegionTable};
use crate::generation::{FileRange, TruncateGen};
use crate::pagemap::PageBits;
use crate::region::{DiscardView, ReadaheadState, RegionSource};
use crate::source::PageSource;
use crate::stats::Stats;

/// The memory file as one peer's memory sees it: the generation every
/// removal bumps, and which of its pages were removed and not installed
/// since (they read zero; readahead skips them).
pub(crate) struct PeerFile {
    pub gen: TruncateGen,
    pub discarded: PageBits,
    pub page_size: u64,
    pub source: Arc<dyn PageSource>,
}

/// One mapped window of the memory file.
pub(crate) struct Piece {
    /// Position of the region it came from in the handshake.
    index: usize,
    pub region: ExternalRegion,
    source: RegionSource,
    readahead: ReadaheadState,
    file: Arc<PeerFile>,
}

impl Piece {
    fn new(index: usize, region: ExternalRegion, file: &Arc<PeerFile>) -> Arc<Piece> {
        Arc::new(Piece {
            index,
            region,
            source: RegionSource {
                source: file.source.clone(),
                offset: region.offset,
            },
            readahead: ReadaheadState::default(),
            file: file.clone(),
        })
    }

    fn end(&self) -> u64 {
        self.region.host_addr + self.region.size
    }
}

impl FaultRegion for Piece {
    fn label(&self) -> usize {
        self.index
    }
    fn host_addr(&self) -> u64 {
        self.region.host_addr
    }
    fn max_size(&self) -> u64 {
        self.region.size
    }
    fn page_size(&self) -> u64 {
        self.region.page_size
    }
    fn backed_size(&self) -> u64 {
        self.region.size
    }
    fn generation(&self) -> &TruncateGen {
        &self.file.gen
    }
    fn discarded(&self) -> DiscardView<'_> {
        let page = self.region.page_size;
        DiscardView::new(
            Some(&self.file.discarded),
            self.region.offset / page,
            self.region.size / page,
        )
    }
    fn source(&self) -> Option<&RegionSource> {
        Some(&self.source)
    }
    fn readahead_state(&self) -> &ReadaheadState {
        &self.readahead
    }
    fn file_range(&self, offset: u64, len: u64) -> FileRange {
        FileRange::new(self.region.offset + offset, len)
    }
    fn zero_by_copy(&self) -> bool {
        !is_base_page(self.region.page_size)
    }
}

/// The peer's regions, sorted by host address; unmaps and remaps edit it.
pub(crate) struct PeerRegions {
    pieces: RwLock<Vec<Arc<Piece>>>,
    pub file: Arc<PeerFile>,
}

impl PeerRegions {
    pub(crate) fn new(regions: &[ExternalRegion], file: Arc<PeerFile>) -> Self {
        let mut pieces: Vec<_> = regions
            .iter()
            .enumerate()
            .map(|(i, r)| Piece::new(i, *r, &file))
            .collect();
        pieces.sort_by_key(|p| p.region.host_addr);
        PeerRegions {
            pieces: RwLock::new(pieces),
            file,
        }
    }

    pub(crate) fn pieces(&self) -> Vec<Arc<Piece>> {
        self.pieces
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The file pages of `[start, end)` (host addresses) that pieces map,
    /// widened to whole pages (a huge page is removed whole).
    fn file_spans(&self, start: u64, end: u64) -> Vec<FileRange> {
        let page = self.file.page_size;
        self.pieces()
            .iter()
            .filter(|p| p.region.host_addr < end && start < p.end())
            .map(|p| {
                let from = (start.max(p.region.host_addr) - p.region.host_addr) / page * page;
                let to = (end.min(p.end()) - p.region.host_addr).div_ceil(page) * page;
                FileRange::new(p.region.offset + from, to - from)
            })
            .collect()
    }

    /// Removal: from now on the range reads zero. One invalidation per
    /// file span, so a fault that fetched any of it before this was read
    /// drops what it fetched.
    fn remove(&self, stats: &Stats, start: u64, end: u64) {
        let page = self.file.page_size;
        for span in self.file_spans(start, end) {
            self.file.gen.invalidate(span, || {
                self.file
                    .discarded
                    .set_range(span.start / page, span.end / page);
            });
            stats.pages_removed.fetch_add(span.len() / page, Relaxed);
        }
        // Counted once applied, so that a reader of the counters sees the
        // table as the event left it.
        stats.remove_events.fetch_add(1, Relaxed);
    }

    /// Takes `[start, end)` out of the table; returns the parts taken, with
    /// where they were.
    fn cut(&self, start: u64, end: u64) -> Vec<(Arc<Piece>, ExternalRegion)> {
        let mut pieces = self
            .pieces
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut kept = Vec::with_capacity(pieces.len() + 1);
        let mut taken = Vec::new();
        for p in pieces.drain(..) {
            if p.end() <= start || end <= p.region.host_addr {
                kept.push(p);
                continue;
            }
            let r = p.region;
            let part = |from: u64, to: u64| ExternalRegion {
                host_addr: from,
                size: to - from,
                offset: r.offset + (from - r.host_addr),
                page_size: r.page_size,
            };
            if r.host_addr < start {
                kept.push(Piece::new(p.index, part(r.host_addr, start), &p.file));
            }
            if end < p.end() {
                kept.push(Piece::new(p.index, part(end, p.end()), &p.file));
            }
            taken.push((p.clone(), part(start.max(r.host_addr), end.min(p.end()))));
        }
        kept.sort_by_key(|p| p.region.host_addr);
        *pieces = kept;
        taken
    }

    fn add(&self, new: Vec<Arc<Piece>>) {
        let mut pieces = self
            .pieces
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pieces.extend(new);
        pieces.sort_by_key(|p| p.region.host_addr);
    }

    /// Invalidates `[start, end)` without marking anything removed: the
    /// contents stay (moved, or gone with the mapping), but a fault that
    /// fetched for the old addresses must not install there.
    fn invalidate(&self, start: u64, end: u64) {
        for span in self.file_spans(start, end) {
            self.file.gen.invalidate(span, || {});
        }
    }
}

impl RegionTable for PeerRegions {
    type Region = Piece;
    const EVENTS: bool = true;

    fn region_at(&self, addr: u64) -> Option<Arc<Piece>> {
        let pieces = self
            .pieces
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = pieces.partition_point(|p| p.region.host_addr <= addr);
        let p = pieces.get(i.checked_sub(1)?)?;
        p.contains_host(addr).then(|| p.clone())
    }

    fn apply_event(&self, stats: &Stats, event: Event) {
        match event {
            Event::Remove { start, end } => self.remove(stats, start as u64, end as u64),
            Event::Unmap { start, end } => {
                let (start, end) = (start as u64, end as u64);
                self.invalidate(start, end);
                self.cut(start, end);
                stats.unmap_events.fetch_add(1, Relaxed);
            }
            Event::Remap { from, to, len } => {
                let (from, to, len) = (from as u64, to as u64, len as u64);
                let Some(end) = from.checked_add(len) else {
                    log::warn!("remap of {from:#x}+{len:#x} wraps; ignored");
                    return;
                };
                self.invalidate(from, end);
                let moved = self
                    .cut(from, end)
                    .into_iter()
                    .filter_map(|(p, mut r)| {
                        r.host_addr = r.host_addr.checked_sub(from)?.checked_add(to)?;
                        r.host_addr.checked_add(r.size)?;
                        Some(Piece::new(p.index, r, &p.file))
                    })
                    .collect();
                self.add(moved);
                stats.remap_events.fetch_add(1, Relaxed);
            }
            Event::Fork { .. } => {
                // Dropping the child's userfaultfd leaves its memory to the
                // kernel; nothing here serves a second process.
                log::warn!("the peer forked; its child's memory is not served");
            }
            Event::Pagefault { .. } => {}
        }
    }
}
