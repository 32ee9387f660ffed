//! A guest memory region: a window of a backing file at a guest-physical
//! address, mapped once into the VMM at its largest size.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryRegion, GuestMemoryRegionBytes, GuestUsize,
    MemoryRegionAddress, MmapRegion, VolatileMemory, VolatileSlice,
};

use crate::backing::{BackingFile, BackingKind};
use crate::generation::FileRange;
use crate::pagemap::PageBits;
use crate::source::PageSource;
use crate::{Error, Result};

/// Where a region's contents come from on first touch.
///
/// A memory image restored lazily: each page is read from the image the
/// first time the guest (or the VMM) touches it.
///
/// ```
/// use std::io::Write;
/// use std::sync::Arc;
/// use guest_mem::{FileSource, GuestMem, RegionConfig, RegionSource};
/// use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
///
/// # let dir = std::env::temp_dir().join(format!("guest-mem-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// # let image = dir.join("ram.img");
/// // An image of 2 MiB whose page 3 holds a marker.
/// let mut f = std::fs::File::create(&image).unwrap();
/// f.write_all(&vec![0u8; 3 * 4096]).unwrap();
/// f.write_all(b"saved state").unwrap();
/// f.set_len(2 << 20).unwrap();
///
/// let mut ram = RegionConfig::new(0, 2 << 20);
/// ram.source = Some(RegionSource {
///     source: Arc::new(FileSource::open(&image).unwrap()),
///     offset: 0,
/// });
/// let mem = GuestMem::builder().region(ram).build()?;
/// let mut buf = [0u8; 11];
/// mem.memory().memory().read_slice(&mut buf, GuestAddress(3 * 4096)).unwrap();
/// assert_eq!(&buf, b"saved state");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), guest_mem::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RegionSource {
    /// The source of page contents.
    pub source: Arc<dyn PageSource>,
    /// Byte offset in the source of the region's first page.
    pub offset: u64,
}

/// Readahead streams tracked per region: one per vCPU walking its own part
/// of memory is the common case.
pub(crate) const READAHEAD_STREAMS: usize = 8;

/// One sequential stream: where it will fault next and its last window.
#[derive(Debug, Default)]
pub(crate) struct ReadaheadStream {
    /// The page just past the last window installed.
    pub next: AtomicU64,
    /// The last window size, in pages.
    pub window: AtomicU64,
}

/// Adaptive readahead state of one region. Updates race benignly between
/// handler threads: the worst case is a window that starts small again.
#[derive(Debug, Default)]
pub(crate) struct ReadaheadState {
    pub streams: [ReadaheadStream; READAHEAD_STREAMS],
    /// Round-robin victim for a new stream.
    pub victim: AtomicU64,
}

/// Which region of a [`GuestMem`](crate::GuestMem): its position in the
/// builder's order, starting at 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionIndex(pub usize);

impl fmt::Display for RegionIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One region of guest memory.
pub struct Region {
    pub(crate) index: RegionIndex,
    pub(crate) guest_base: GuestAddress,
    pub(crate) max_size: u64,
    pub(crate) backing: Arc<BackingFile>,
    pub(crate) file_offset: u64,
    pub(crate) mapping: Arc<MmapRegion>,
    pub(crate) private: bool,
    /// Ranges `(offset, len)` of the region kept out of the devices'
    /// memory map (virtio-mem blocks that are not plugged), sorted and
    /// disjoint.
    pub(crate) inaccessible: std::sync::Mutex<Vec<(u64, u64)>>,
    pub(crate) source: Option<RegionSource>,
    pub(crate) readahead: ReadaheadState,
    /// Where fresh memory is served a huge page at a time (set when a fault
    /// handler starts, if the host allows it).
    pub(crate) huge_fill: std::sync::OnceLock<crate::huge_fill::FillMapping>,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("index", &self.index)
            .field("guest_base", &format_args!("{:#x}", self.guest_base.0))
            .field("max_size", &self.max_size)
            .field("backed", &self.backed_size())
            .field("backing", &self.backing.kind())
            .field("file_offset", &self.file_offset)
            .field("private", &self.private)
            .finish()
    }
}

impl Region {
    pub(crate) fn map(
        index: RegionIndex,
        guest_base: GuestAddress,
        max_size: u64,
        backing: Arc<BackingFile>,
        file_offset: u64,
        private: bool,
        source: Option<RegionSource>,
    ) -> Result<Self> {
        let page = backing.page_size();
        if max_size == 0 {
            return Err(Error::ZeroSize);
        }
        for (what, value) in [
            ("region size", max_size),
            ("guest address", guest_base.0),
            ("file offset", file_offset),
        ] {
            if value % page != 0 {
                return Err(Error::Unaligned {
                    what,
                    value,
                    align: page,
                });
            }
        }
        if guest_base.0.checked_add(max_size).is_none() || max_size > isize::MAX as u64 {
            return Err(Error::TooLarge { size: max_size });
        }
        let flags = libc::MAP_NORESERVE
            | if private {
                libc::MAP_PRIVATE
            } else {
                libc::MAP_SHARED
            };
        let mapping = MmapRegionBuilder::new(max_size as usize)
            .with_file_offset(FileOffset::from_arc(backing.file().clone(), file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(backing.kind() == BackingKind::Hugetlbfs)
            .build()
            .map_err(|e| match e {
                vm_memory::mmap::MmapRegionError::Mmap(io)
                    if backing.kind() == BackingKind::Hugetlbfs
                        && io.raw_os_error() == Some(libc::ENOMEM) =>
                {
                    Error::NoHugePages {
                        path: backing.path().map(Into::into),
                        page_size: page,
                        needed: max_size / page,
                        free: crate::backing::free_huge_pages(page).unwrap_or(0),
                    }
                }
                other => Error::Mmap(other.to_string()),
            })?;
        let pages = max_size / page;
        backing.init_discard_map((file_offset + max_size) / page)?;
        let region = Region {
            index,
            guest_base,
            max_size,
            backing,
            file_offset,
            mapping: Arc::new(mapping),
            private,
            inaccessible: std::sync::Mutex::new(Vec::new()),
            source,
            readahead: ReadaheadState::default(),
            huge_fill: std::sync::OnceLock::new(),
        };
        // Pages past the backed size have no source contents.
        region
            .discarded()
            .set_range(region.backed_size() / page, pages);
        Ok(region)
    }

    /// Index of the region in its [`crate::GuestMem`].
    pub fn index(&self) -> RegionIndex {
        self.index
    }

    /// Guest-physical address of the first byte.
    pub fn guest_base(&self) -> GuestAddress {
        self.guest_base
    }

    /// Largest size the region can be backed to (the mapping's length).
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// Bytes of the region the backing file currently covers.
    pub fn backed_size(&self) -> u64 {
        self.backing
            .size()
            .saturating_sub(self.file_offset)
            .min(self.max_size)
    }

    /// Host virtual address of the region's first byte.
    pub fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64
    }

    /// The backing file.
    pub fn backing(&self) -> &Arc<BackingFile> {
        &self.backing
    }

    /// Offset of the region's first byte in the backing file.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// Whether first touches are served from a page source (a memory
    /// image): then pages not yet touched are in the source, not the file.
    pub fn has_source(&self) -> bool {
        self.source.is_some()
    }

    /// Whether the mapping is `MAP_PRIVATE` (copy-on-write over the file).
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Page size of the backing file.
    pub fn page_size(&self) -> u64 {
        self.backing.page_size()
    }

    /// The file range of `[offset, offset + len)` of the region.
    pub fn file_range(&self, offset: u64, len: u64) -> FileRange {
        FileRange::new(self.file_offset + offset, len)
    }

    /// Pages currently marked discarded (or unplugged) and not touched since.
    pub fn discarded_pages(&self) -> u64 {
        self.discarded().count()
    }

    /// Whether any page of `[offset, offset + len)` of the region is
    /// poisoned (its fault could not be served; touching it raises
    /// `SIGBUS`).
    pub fn is_poisoned(&self, offset: u64, len: u64) -> bool {
        self.backing.is_poisoned(self.file_range(offset, len))
    }

    /// Checks a new backed size: a page multiple, at most the max size.
    pub(crate) fn check_size(&self, size: u64) -> crate::Result<()> {
        let page = self.page_size();
        if size > self.max_size {
            return Err(crate::Error::Config(format!(
                "region {}: {size:#x} is larger than its max size {:#x}",
                self.index, self.max_size
            )));
        }
        if size % page != 0 {
            return Err(crate::Error::Unaligned {
                what: "region size",
                value: size,
                align: page,
            });
        }
        Ok(())
    }

    /// Region offsets of the poisoned pages in `[offset, offset + len)`.
    pub(crate) fn poisoned_offsets(&self, offset: u64, len: u64) -> impl Iterator<Item = u64> + '_ {
        let page = self.page_size();
        let end = (self.file_offset + offset + len).div_ceil(page);
        let mut at = (self.file_offset + offset) / page;
        std::iter::from_fn(move || {
            let p = self.backing.first_poisoned(at, end)?;
            at = p + 1;
            Some(p * page - self.file_offset)
        })
    }

    /// Drops the VMM mapping's poison markers over the poisoned pages of
    /// `[offset, offset + len)` (inside the invalidation that gives them
    /// back): a hole punched in a shmem file leaves them in place (measured
    /// on 6.18: `fallocate(PUNCH_HOLE)` and `MADV_REMOVE` keep the marker,
    /// `MADV_DONTNEED` and truncation drop it; hugetlbfs punches drop it
    /// too), so without this the page would stay poisoned after the guest
    /// gave it back.
    pub(crate) fn zap_poisoned(&self, offset: u64, len: u64) {
        let page = self.page_size();
        for off in self.poisoned_offsets(offset, len) {
            let host = self.host_addr() + off;
            // SAFETY: the page lies inside our own mapping (a file page of
            // this region's window); MADV_DONTNEED only drops its page-table
            // entry (here: the poison marker), after which the page faults
            // to the handler again. No Rust reference into guest memory is
            // held across the call.
            let rc = unsafe {
                libc::madvise(
                    host as *mut libc::c_void,
                    page as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                log::error!(
                    "region {}: dropping the poison marker at {host:#x}: {}",
                    self.index,
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// Whether the region offset's page is marked discarded.
    pub fn is_discarded(&self, offset: u64) -> bool {
        self.discarded().get(offset / self.page_size())
    }

    /// The region's window of its backing file's discard map, indexed by
    /// region page.
    pub(crate) fn discarded(&self) -> DiscardView<'_> {
        DiscardView {
            map: self.backing.discard_map(),
            first: self.file_offset / self.page_size(),
            pages: self.max_size / self.page_size(),
        }
    }

    /// Whether a host address falls inside the region's mapping.
    pub fn contains_host(&self, addr: u64) -> bool {
        addr >= self.host_addr() && addr - self.host_addr() < self.max_size
    }

    /// The accessible parts of the backed size, for `vm-memory` users.
    pub(crate) fn guest_regions(&self) -> Vec<GuestRegion> {
        self.guest_regions_of(self.backed_size())
    }

    /// The accessible parts of the first `len` bytes.
    pub(crate) fn guest_regions_of(&self, len: u64) -> Vec<GuestRegion> {
        self.accessible_of(len)
            .into_iter()
            .map(|(offset, len)| GuestRegion {
                mapping: self.mapping.clone(),
                backing: self.backing.clone(),
                file_base: self.file_offset + offset,
                offset,
                guest_base: GuestAddress(self.guest_base.0 + offset),
                len,
                file_offset: self
                    .mapping
                    .file_offset()
                    .map(|f| FileOffset::from_arc(f.arc().clone(), f.start() + offset)),
            })
            .collect()
    }

    /// The accessible `(offset, len)` extents of the first `len` bytes.
    pub(crate) fn accessible_of(&self, len: u64) -> Vec<(u64, u64)> {
        let len = len.min(self.max_size);
        let holes = self.inaccessible.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut at = 0;
        for &(start, n) in holes.iter() {
            if start >= len {
                break;
            }
            if start > at {
                out.push((at, start - at));
            }
            at = at.max(start + n);
        }
        if at < len {
            out.push((at, len - at));
        }
        out
    }

    /// End of the accessible stretch from `offset` within the backed size;
    /// `offset` itself when it is kept out of reach.
    pub(crate) fn reachable_end(&self, offset: u64) -> u64 {
        let backed = self.backed_size();
        let holes = self.inaccessible.lock().unwrap_or_else(|p| p.into_inner());
        for &(start, n) in holes.iter() {
            if start + n <= offset {
                continue;
            }
            return start.max(offset).min(backed);
        }
        backed
    }

    /// The parts of `[offset, offset + len)` kept out of reach.
    pub(crate) fn inaccessible_in(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset + len;
        let holes = self.inaccessible.lock().unwrap_or_else(|p| p.into_inner());
        holes
            .iter()
            .map(|&(s, n)| (s.max(offset), (s + n).min(end)))
            .filter(|&(s, e)| s < e)
            .map(|(s, e)| (s, e - s))
            .collect()
    }

    /// Marks `[offset, offset + len)` accessible or not in the set.
    pub(crate) fn set_accessible(&self, offset: u64, len: u64, accessible: bool) {
        let mut holes = self.inaccessible.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + len;
        // Cut the range out of every hole, then add it back as one if it
        // becomes inaccessible; merge neighbours.
        let mut next: Vec<(u64, u64)> = Vec::with_capacity(holes.len() + 2);
        for &(s, n) in holes.iter() {
            let e = s + n;
            if e <= offset || s >= end {
                next.push((s, n));
                continue;
            }
            if s < offset {
                next.push((s, offset - s));
            }
            if e > end {
                next.push((end, e - end));
            }
        }
        if !accessible {
            next.push((offset, len));
        }
        next.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(next.len());
        for (s, n) in next {
            match merged.last_mut() {
                Some((ms, mn)) if *ms + *mn >= s => *mn = (*mn).max(s + n - *ms),
                _ => merged.push((s, n)),
            }
        }
        *holes = merged;
    }

    /// Zaps the VMM's private copies of `[offset, offset + len)`. Shared
    /// mappings need nothing: punching or truncating the file zaps them.
    pub(crate) fn zap_private(&self, offset: u64, len: u64) {
        if !self.private || len == 0 {
            return;
        }
        // SAFETY: the range lies inside our own mapping (callers clip it to
        // max_size); MADV_DONTNEED only drops pages, which later read back
        // from the file or fault to the handler. No Rust reference into guest
        // memory is held across this call (guest memory is accessed only
        // through volatile slices).
        let rc = unsafe {
            libc::madvise(
                (self.host_addr() + offset) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            log::error!(
                "region {}: madvise(DONTNEED) at {:#x}+{:#x} failed: {}",
                self.index,
                offset,
                len,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A region's window of its backing file's discard map (see
/// [`BackingFile`]): region page `p` is file page `first + p`. Pages outside
/// the region read clear and are never changed through it.
pub(crate) struct DiscardView<'a> {
    map: Option<&'a PageBits>,
    first: u64,
    pages: u64,
}

impl<'a> DiscardView<'a> {
    /// Region page `p` is page `first + p` of `map`; the region has `pages`.
    pub(crate) fn new(map: Option<&'a PageBits>, first: u64, pages: u64) -> Self {
        DiscardView { map, first, pages }
    }

    pub(crate) fn get(&self, page: u64) -> bool {
        page < self.pages && self.map.is_some_and(|m| m.get(self.first + page))
    }

    pub(crate) fn set_range(&self, from: u64, to: u64) {
        if let Some(m) = self.map {
            m.set_range(self.first + from, self.first + to.min(self.pages));
        }
    }

    pub(crate) fn clear_range(&self, from: u64, to: u64) {
        if let Some(m) = self.map {
            m.clear_range(self.first + from, self.first + to.min(self.pages));
        }
    }

    pub(crate) fn first_set(&self, from: u64, to: u64) -> Option<u64> {
        let m = self.map?;
        m.first_set(self.first + from, self.first + to.min(self.pages))
            .map(|p| p - self.first)
    }

    pub(crate) fn count(&self) -> u64 {
        self.map.map_or(0, |m| {
            (0..self.pages).filter(|&p| m.get(self.first + p)).count() as u64
        })
    }
}

/// A guest memory region as `vm-memory` sees it: an accessible, backed
/// part of a [`Region`]'s mapping. Accesses past the backed size are
/// refused instead of touching memory past the backing file's end (which
/// would `SIGBUS`), and so are accesses to ranges kept inaccessible
/// (unplugged virtio-mem blocks), and so are accesses to a page the fault
/// handler poisoned because it could not serve it: the VMM thread making
/// the access gets an error instead of `SIGBUS`.
#[derive(Debug)]
pub struct GuestRegion {
    mapping: Arc<MmapRegion>,
    backing: Arc<BackingFile>,
    /// The file offset of this part's first byte.
    file_base: u64,
    /// Where this part starts in the mapping.
    offset: u64,
    guest_base: GuestAddress,
    len: u64,
    file_offset: Option<FileOffset>,
}

impl GuestMemoryRegion for GuestRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.len
    }

    fn start_addr(&self) -> GuestAddress {
        self.guest_base
    }

    fn bitmap(&self) -> BS<'_, Self::B> {}

    fn get_host_address(&self, addr: MemoryRegionAddress) -> guest_memory::Result<*mut u8> {
        self.check_address(addr)
            .ok_or(guest_memory::Error::InvalidBackendAddress)
            .map(|addr| {
                self.mapping
                    .as_ptr()
                    .wrapping_add((self.offset + addr.0) as usize)
            })
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        self.file_offset.as_ref()
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let end = offset
            .0
            .checked_add(count as u64)
            .ok_or(guest_memory::Error::InvalidBackendAddress)?;
        if end > self.len {
            return Err(guest_memory::Error::InvalidBackendAddress);
        }
        if self
            .backing
            .is_poisoned(FileRange::new(self.file_base + offset.0, count as u64))
        {
            log::debug!(
                "refusing an access to {:#x}+{count:#x}: it holds a poisoned page",
                self.guest_base.0 + offset.0
            );
            return Err(guest_memory::Error::InvalidBackendAddress);
        }
        Ok(self
            .mapping
            .get_slice((self.offset + offset.0) as usize, count)?)
    }

    fn is_hugetlbfs(&self) -> Option<bool> {
        self.mapping.is_hugetlbfs()
    }
}

impl GuestMemoryRegionBytes for GuestRegion {}

/// The guest memory that devices use: the backed, accessible part of every region.
pub type GuestMemoryMap = vm_memory::GuestRegionCollection<GuestRegion>;

/// Swapped atomically when a region is resized.
pub type AtomicMemoryMap = vm_memory::GuestMemoryAtomic<GuestMemoryMap>;
