//! `GuestMem`: the regions, their fault handler, discards and resizes.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::access::{AccessGate, DeviceMemory};
use crate::backing::BackingFile;
use crate::fault::{regions_support_userfault, FaultConfig, FaultHandler, FaultMode, Unservable};
use crate::region::{AtomicMemoryMap, GuestMemoryMap, Region, RegionIndex, RegionSource};
use crate::stats::{Stats, StatsSnapshot};
use crate::{Error, Result};

/// What backs a region.
#[derive(Clone, Debug, Default)]
pub enum Backing {
    /// A new anonymous memfd for this region.
    #[default]
    Memfd,
    /// A new `MFD_HUGETLB` memfd.
    MemfdHugetlb,
    /// A file at this path (tmpfs, hugetlbfs or a disk file system).
    File(PathBuf),
    /// A window of a backing file that the caller already has (for example
    /// one file shared by several regions, each at its own offset).
    Shared {
        /// The file.
        file: Arc<BackingFile>,
        /// Offset of the region's first byte in the file.
        offset: u64,
    },
}

/// One region to build.
#[derive(Clone, Debug)]
pub struct RegionConfig {
    /// Guest-physical address of the first byte.
    pub guest_addr: u64,
    /// Bytes backed at start.
    pub size: u64,
    /// Largest size the region may grow to (`None`: `size`, not resizable).
    pub max_size: Option<u64>,
    /// What backs it.
    pub backing: Backing,
    /// Map `MAP_PRIVATE` (copy-on-write over the file) instead of shared.
    pub private: bool,
    /// Where first-touch contents come from (`None`: zero).
    pub source: Option<RegionSource>,
}

impl RegionConfig {
    /// A memfd-backed, zero-filled, fixed-size region.
    pub fn new(guest_addr: u64, size: u64) -> Self {
        RegionConfig {
            guest_addr,
            size,
            max_size: None,
            backing: Backing::Memfd,
            private: false,
            source: None,
        }
    }
}

/// Builds a [`GuestMem`].
#[derive(Debug, Default)]
pub struct GuestMemBuilder {
    regions: Vec<RegionConfig>,
    fault: FaultConfig,
}

impl GuestMemBuilder {
    /// Adds a region.
    pub fn region(mut self, region: RegionConfig) -> Self {
        self.regions.push(region);
        self
    }

    /// Sets the fault handler configuration.
    pub fn fault_config(mut self, fault: FaultConfig) -> Self {
        self.fault = fault;
        self
    }

    /// Creates the backing files, maps them, and starts the fault handler.
    pub fn build(self) -> Result<GuestMem> {
        if self.regions.is_empty() {
            return Err(Error::Config("no memory regions".into()));
        }
        self.fault.validate()?;
        // A file shared by several regions gets one discard map covering
        // all of them, sized before the first region is mapped.
        for rc in &self.regions {
            if let Backing::Shared { file, .. } = &rc.backing {
                let end = self
                    .regions
                    .iter()
                    .filter_map(|o| match &o.backing {
                        Backing::Shared { file: f, offset } if Arc::ptr_eq(f, file) => {
                            Some(offset.saturating_add(o.max_size.unwrap_or(o.size)))
                        }
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                file.init_discard_map(end.div_ceil(file.page_size()))?;
            }
        }
        let mut regions = Vec::with_capacity(self.regions.len());
        for (index, rc) in self.regions.into_iter().enumerate() {
            regions.push(Arc::new(build_region(RegionIndex(index), rc)?));
        }
        check_overlaps(&regions)?;
        let stats = Arc::new(Stats::default());
        let use_uffd = match self.fault.mode {
            FaultMode::Kernel => false,
            FaultMode::Userfault => {
                if let Some(r) = regions
                    .iter()
                    .find(|r| !r.backing().kind().supports_userfault())
                {
                    return Err(Error::Userfault(format!(
                        "region {} is backed by a file on a file system userfaultfd cannot \
                         manage ({:?}); use a memfd, tmpfs or hugetlbfs, or kernel fault handling",
                        r.index(),
                        r.backing().kind()
                    )));
                }
                true
            }
            FaultMode::Auto => {
                let ok = regions_support_userfault(&regions);
                if !ok {
                    log::info!(
                        "a region's backing file cannot be managed by userfaultfd; \
                         the kernel serves faults"
                    );
                }
                ok
            }
        };
        let memory = AtomicMemoryMap::new(snapshot(&regions)?);
        let handler = if use_uffd {
            Some(FaultHandler::start(
                regions.clone(),
                stats.clone(),
                self.fault.clone(),
            )?)
        } else {
            None
        };
        Ok(GuestMem {
            regions,
            memory,
            stats,
            config: self.fault,
            handler,
            resize: Mutex::new(()),
            gate: Arc::new(AccessGate::default()),
        })
    }
}

fn build_region(index: RegionIndex, rc: RegionConfig) -> Result<Region> {
    let max = rc.max_size.unwrap_or(rc.size);
    if rc.size > max {
        return Err(Error::Config(format!(
            "region {index}: size {:#x} is larger than its max size {max:#x}",
            rc.size
        )));
    }
    if let Some(src) = &rc.source {
        if let Some(len) = src.source.size() {
            let need = src.offset.saturating_add(rc.size);
            if len < need {
                return Err(Error::SourceTooShort {
                    region: index,
                    len,
                    needed: need,
                });
            }
        }
    }
    let name = format!("guest-ram-{index}");
    // A resizable memfd region may start with nothing plugged (hotplug).
    let empty = rc.size == 0 && max > 0;
    let (backing, offset) = match rc.backing {
        Backing::Memfd if empty => (Arc::new(BackingFile::memfd_empty(&name, false)?), 0),
        Backing::MemfdHugetlb if empty => (Arc::new(BackingFile::memfd_empty(&name, true)?), 0),
        Backing::Memfd => (Arc::new(BackingFile::memfd(&name, nonzero(rc.size)?)?), 0),
        Backing::MemfdHugetlb => (
            Arc::new(BackingFile::memfd_hugetlb(&name, nonzero(rc.size)?)?),
            0,
        ),
        // A private mapping never writes its file: open it read-only, as
        // it is (several VMs may restore from one image at once).
        Backing::File(path) if rc.private => {
            let f = BackingFile::open_readonly(&path)?;
            if f.size() < rc.size {
                return Err(Error::SourceTooShort {
                    region: index,
                    len: f.size(),
                    needed: rc.size,
                });
            }
            (Arc::new(f), 0)
        }
        Backing::File(path) => (Arc::new(BackingFile::open(path, nonzero(rc.size)?)?), 0),
        Backing::Shared { file, offset } => (file, offset),
    };
    Region::map(
        index,
        GuestAddress(rc.guest_addr),
        max,
        backing,
        offset,
        rc.private,
        rc.source,
    )
}

fn nonzero(size: u64) -> Result<u64> {
    if size == 0 {
        Err(Error::ZeroSize)
    } else {
        Ok(size)
    }
}

fn check_overlaps(regions: &[Arc<Region>]) -> Result<()> {
    let mut spans: Vec<(u64, u64, RegionIndex)> = regions
        .iter()
        .map(|r| (r.guest_base().0, r.guest_base().0 + r.max_size(), r.index()))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::Config(format!(
                "regions {} and {} overlap in guest-physical space",
                w[0].2, w[1].2
            )));
        }
    }
    Ok(())
}

fn snapshot(regions: &[Arc<Region>]) -> Result<GuestMemoryMap> {
    GuestMemoryMap::from_regions(regions.iter().flat_map(|r| r.guest_regions()).collect())
        .map_err(|e| Error::Config(format!("building the guest memory map: {e}")))
}

/// File-backed guest memory with userspace fault handling.
///
/// ```
/// use guest_mem::{GuestMem, RegionConfig};
/// use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
///
/// // 4 MiB of memfd-backed RAM at guest-physical 0, faults served by the
/// // handler thread.
/// let mem = GuestMem::builder()
///     .region(RegionConfig::new(0, 4 << 20))
///     .build()?;
/// let ram = mem.memory();
/// ram.memory().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
/// assert_eq!(ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
///
/// // Give a page back (what a balloon inflate does): the file gets a hole,
/// // and the next touch reads zero.
/// mem.discard(GuestAddress(0x1000), 4096)?;
/// assert_eq!(ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
/// assert!(mem.stats().faults >= 2);
/// # Ok::<(), guest_mem::Error>(())
/// ```
pub struct GuestMem {
    regions: Vec<Arc<Region>>,
    memory: AtomicMemoryMap,
    stats: Arc<Stats>,
    config: FaultConfig,
    handler: Option<FaultHandler>,
    resize: Mutex<()>,
    /// Device accesses against shrinks (see [`crate::access`]).
    gate: Arc<AccessGate>,
}

impl std::fmt::Debug for GuestMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMem")
            .field("regions", &self.regions)
            .field("userfault", &self.handler.is_some())
            .finish()
    }
}

impl GuestMem {
    /// Starts building guest memory.
    pub fn builder() -> GuestMemBuilder {
        GuestMemBuilder::default()
    }

    /// The guest memory for devices (`vm-memory` `Bytes` reads and writes).
    /// Swapped when a region is resized.
    pub fn memory(&self) -> AtomicMemoryMap {
        self.memory.clone()
    }

    /// The guest memory for device models: like [`memory`](Self::memory),
    /// but each snapshot holds off shrinks until dropped, so a device on
    /// one thread never touches memory that an unplug on another thread
    /// truncated (see [`crate::access`]).
    pub fn device_memory(&self) -> DeviceMemory {
        DeviceMemory::new(self.memory.clone(), self.gate.clone())
    }

    /// Region `index`, if there is one.
    pub fn region(&self, index: RegionIndex) -> Option<&Arc<Region>> {
        self.regions.get(index.0)
    }

    /// Every region, in the builder's order.
    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    /// Whether faults are served by this crate's userfaultfd handler.
    pub fn userfault_enabled(&self) -> bool {
        self.handler.is_some()
    }

    /// The userfaultfd, if faults are served in userspace.
    pub fn userfault_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.handler.as_ref().map(|h| h.uffd_fd())
    }

    /// Where the fault handler reports a page it could not serve or a
    /// handler thread that stopped (`None` with kernel fault handling). A
    /// VMM watches its [`event_fd`](crate::FaultFailure::event_fd) and
    /// stops the VM with its [`message`](crate::FaultFailure::message).
    pub fn fault_failure(&self) -> Option<&Arc<crate::FaultFailure>> {
        self.handler.as_ref().map(|h| h.failure())
    }

    /// The fault handler configuration.
    pub fn fault_config(&self) -> &FaultConfig {
        &self.config
    }

    /// What happens to a page that cannot be served, as negotiated with the
    /// kernel: [`Unservable::Poison`] only where it was asked for and the
    /// userfaultfd has `UFFD_FEATURE_POISON`; `None` with kernel fault
    /// handling.
    pub fn unservable(&self) -> Option<Unservable> {
        self.handler.as_ref().map(FaultHandler::unservable)
    }

    /// Pages poisoned because they could not be served, and not given back
    /// since (each backing file counted once).
    pub fn poisoned_pages(&self) -> u64 {
        self.backing_files().map(|b| b.poisoned_pages()).sum()
    }

    /// Each distinct backing file once (regions may share one).
    fn backing_files(&self) -> impl Iterator<Item = &Arc<BackingFile>> {
        self.regions.iter().enumerate().filter_map(|(i, r)| {
            let first = self.regions[..i]
                .iter()
                .all(|o| !Arc::ptr_eq(o.backing(), r.backing()));
            first.then(|| r.backing())
        })
    }

    /// The live counters.
    pub fn stats_handle(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// A copy of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// A copy of the counters once the handler has finished accounting for
    /// every fault it has begun, waiting at most `timeout`. The faulting
    /// thread is woken by the install itself, before the handler counts the
    /// pages and the latency, so [`stats`](Self::stats) read right after a
    /// first touch can still miss them.
    ///
    /// ```
    /// use guest_mem::{GuestMem, RegionConfig};
    /// use std::time::Duration;
    /// use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    ///
    /// let mem = GuestMem::builder().region(RegionConfig::new(0, 2 << 20)).build()?;
    /// mem.memory().memory().write_obj(1u8, GuestAddress(0)).unwrap();
    /// let s = mem.settled_stats(Duration::from_secs(1));
    /// assert_eq!(s.fault_latency.count + s.unknown_address, s.faults);
    /// # Ok::<(), guest_mem::Error>(())
    /// ```
    pub fn settled_stats(&self, timeout: std::time::Duration) -> StatsSnapshot {
        self.stats.settled(timeout)
    }

    /// The region holding a guest-physical address and the offset in it,
    /// within the backed size.
    pub fn find(&self, gpa: GuestAddress) -> Option<(&Arc<Region>, u64)> {
        self.regions.iter().find_map(|r| {
            let off = gpa.0.checked_sub(r.guest_base().0)?;
            (off < r.backed_size()).then_some((r, off))
        })
    }

    /// Backs `[gpa, gpa + len)` now, with zeroed pages in the backing file,
    /// so that nothing faults when it is first touched: for memory the
    /// guest is known to touch at once (a Linux guest's earliest
    /// allocations). Only shared regions without a page source are
    /// populated (others are left to their faults); returns the bytes
    /// populated. Runs under the install lock, so no discard is in
    /// progress meanwhile; the range counts as written (no longer owed
    /// zero by an earlier discard).
    ///
    /// ```
    /// use guest_mem::vm_memory::GuestAddress;
    /// use guest_mem::{GuestMem, RegionConfig};
    ///
    /// let mem = GuestMem::builder().region(RegionConfig::new(0, 16 << 20)).build()?;
    /// assert_eq!(mem.populate(GuestAddress(8 << 20), 4 << 20)?, 4 << 20);
    /// assert!(mem.allocated_bytes() >= 4 << 20);
    /// # Ok::<(), guest_mem::Error>(())
    /// ```
    pub fn populate(&self, gpa: GuestAddress, len: u64) -> Result<u64> {
        let (region, off) = self.find(gpa).ok_or(Error::NotRam { gpa: gpa.0, len })?;
        let page = region.page_size();
        let n = len.min(region.backed_size() - off);
        if off % page != 0 || n % page != 0 {
            return Err(Error::Unaligned {
                what: "populate range",
                value: if off % page != 0 { gpa.0 } else { n },
                align: page,
            });
        }
        if n == 0 || region.is_private() || region.source.is_some() {
            return Ok(0);
        }
        let backing = region.backing();
        let install = backing.generation().lock_install();
        // Huge pages where fresh memory is served so (an allocation through
        // the file gets them only under some host settings), then the rest.
        region.prefill_huge(&install, off, n);
        backing.allocate(region.file_range(off, n))?;
        region.discarded().clear_range(off / page, (off + n) / page);
        Ok(n)
    }

    /// Gives `[gpa, gpa + len)` back to the host: one invalidation per
    /// backing file touched, then a hole punched. The range must be aligned
    /// to the backing page size and lie in plugged RAM (it may span regions).
    /// The next touch of a discarded page reads zero.
    pub fn discard(&self, gpa: GuestAddress, len: u64) -> Result<()> {
        let mut pieces = Vec::new();
        let mut at = gpa.0;
        let end = gpa
            .0
            .checked_add(len)
            .ok_or(Error::TooLarge { size: len })?;
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        while at < end {
            let (region, off) = self.find(GuestAddress(at)).ok_or(Error::NotRam {
                gpa: at,
                len: end - at,
            })?;
            let page = region.page_size();
            let n = (end - at).min(region.backed_size() - off);
            if off % page != 0 || n % page != 0 {
                return Err(Error::Unaligned {
                    what: "discard range",
                    value: if off % page != 0 { at } else { n },
                    align: page,
                });
            }
            pieces.push((region.clone(), off, n));
            at += n;
        }
        for (region, off, n) in pieces {
            self.discard_in(&region, off, n)?;
        }
        Ok(())
    }

    fn discard_in(&self, region: &Region, off: u64, len: u64) -> Result<()> {
        // The backing file marks the pages discarded inside the
        // invalidation; private copies go too, and so do the poison markers
        // of pages that could not be served (a hole punch keeps them).
        let invalidate = || {
            region.zap_private(off, len);
            region.zap_poisoned(off, len);
        };
        if region.is_private() {
            // Copy-on-write over the file: drop our copies, never the
            // file's pages (other VMs may map the same image). The file's
            // page cache would show through again, so the range gets the
            // zero page (no memory) while no fault can install behind us.
            let uffd = self.userfault_fd();
            region
                .backing()
                .invalidate_mappings(region.file_range(off, len), || {
                    invalidate();
                    if let Some(fd) = uffd {
                        crate::fault::zero_private(fd, region, off, len);
                    }
                })?;
        } else {
            region
                .backing()
                .discard(region.file_range(off, len), invalidate)?;
        }
        self.stats.discards.fetch_add(1, Relaxed);
        self.stats.bytes_discarded.fetch_add(len, Relaxed);
        Ok(())
    }

    /// Plugs or unplugs the tail of region `index` so that `new_size` bytes
    /// are plugged. Shrinking truncates the backing file as one invalidation
    /// (a fault that fetched meanwhile retries and finds the page out of
    /// range); it waits for device accesses in progress
    /// ([`device_memory`](Self::device_memory) guards) to end, and swaps the
    /// devices' memory map before the truncation, so that no device access
    /// can reach past the end. Growing extends the file; the new tail reads
    /// zero.
    ///
    /// Only a region that ends its backing file can be resized. A thread
    /// that holds a device-memory guard cannot shrink
    /// ([`Error::MemoryInUse`]).
    ///
    /// ```
    /// use guest_mem::{GuestMem, RegionConfig, RegionIndex};
    /// use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    ///
    /// // A hotplug window at 4 GiB that may grow to 64 MiB, 16 MiB plugged.
    /// let mut window = RegionConfig::new(4 << 30, 16 << 20);
    /// window.max_size = Some(64 << 20);
    /// let mem = GuestMem::builder()
    ///     .region(RegionConfig::new(0, 2 << 20))
    ///     .region(window)
    ///     .build()?;
    /// let top = GuestAddress((4 << 30) + (8 << 20));
    /// mem.memory().memory().write_obj(0xabu8, top).unwrap();
    ///
    /// mem.resize(RegionIndex(1), 4 << 20)?; // unplug: the file is truncated
    /// assert!(mem.memory().memory().read_obj::<u8>(top).is_err());
    /// mem.resize(RegionIndex(1), 32 << 20)?; // plug again: the new memory reads zero
    /// assert_eq!(mem.memory().memory().read_obj::<u8>(top).unwrap(), 0);
    /// assert!(mem.resize(RegionIndex(1), 128 << 20).is_err()); // past max_size
    /// # Ok::<(), guest_mem::Error>(())
    /// ```
    pub fn resize(&self, index: RegionIndex, new_size: u64) -> Result<()> {
        let _serial = self.resize.lock().unwrap_or_else(|e| e.into_inner());
        let region = self
            .regions
            .get(index.0)
            .ok_or(Error::NoSuchRegion(index))?
            .clone();
        let page = region.page_size();
        region.check_size(new_size)?;
        let backing = region.backing();
        if region.is_private() {
            // Resizing truncates or extends the file, which a private
            // mapping must never do.
            return Err(Error::NotResizable(index));
        }
        let file_end = region.file_offset() + region.backed_size();
        if backing.size() > file_end
            || self.regions.iter().any(|r| {
                r.index() != index
                    && Arc::ptr_eq(r.backing(), backing)
                    && r.file_offset() > region.file_offset()
            })
        {
            return Err(Error::NotResizable(index));
        }
        let old = region.backed_size();
        let target = region.file_offset() + new_size;
        let started = std::time::Instant::now();
        if new_size < old {
            // No device access may be in progress past the new end: the
            // map is swapped inside, before the file is truncated.
            self.gate
                .exclusive(|| {
                    backing.shrink(target, || {
                        region.zap_private(new_size, old - new_size);
                        self.swap_memory(Some((index, new_size)));
                    })
                })
                .ok_or(Error::MemoryInUse)??;
            self.stats.shrinks.fetch_add(1, Relaxed);
            self.stats
                .bytes_truncated
                .fetch_add(old - new_size, Relaxed);
        } else if new_size > old {
            backing.grow(target)?;
            if region.source.is_none() {
                // No source: nothing stale to hide, and readahead may fill
                // the new memory.
                let _install = backing.generation().lock_install();
                region.discarded().clear_range(old / page, new_size / page);
            }
            self.swap_memory(None);
            self.stats.grows.fetch_add(1, Relaxed);
        }
        log::debug!(
            "region {index}: resized from {old:#x} to {new_size:#x} in {} us",
            started.elapsed().as_micros()
        );
        Ok(())
    }

    /// Rebuilds the devices' memory map; `pending` gives a region's size
    /// before the backing file reflects it.
    fn swap_memory(&self, pending: Option<(RegionIndex, u64)>) {
        let regions = self
            .regions
            .iter()
            .flat_map(|r| match pending {
                Some((i, size)) if i == r.index() => r.guest_regions_of(size),
                _ => r.guest_regions(),
            })
            .collect();
        match GuestMemoryMap::from_regions(regions) {
            Ok(map) => {
                let guard = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                guard.replace(map);
            }
            Err(e) => log::error!("rebuilding the guest memory map failed: {e}"),
        }
    }

    /// Keeps `[offset, offset + len)` of region `index` out of the memory
    /// map (devices and the VMM cannot reach it) or lets it back in: for
    /// virtio-mem blocks that are not plugged, which the host must not
    /// back. Taking a range away waits for device accesses in progress, as
    /// a shrink does.
    pub fn set_accessible(
        &self,
        index: RegionIndex,
        offset: u64,
        len: u64,
        accessible: bool,
    ) -> Result<()> {
        let region = self.region(index).ok_or(Error::NoSuchRegion(index))?;
        let end = offset
            .checked_add(len)
            .ok_or(Error::TooLarge { size: len })?;
        if end > region.max_size() {
            return Err(Error::Config(format!(
                "region {index}: {offset:#x}+{len:#x} is past its {:#x} bytes",
                region.max_size()
            )));
        }
        let _serial = self.resize.lock().unwrap_or_else(|e| e.into_inner());
        if accessible {
            let was_out = region.inaccessible_in(offset, len);
            region.set_accessible(offset, len, true);
            self.swap_memory(None);
            return self.drop_unreachable_poison(region, &was_out);
        }
        self.gate
            .exclusive(|| {
                region.set_accessible(offset, len, false);
                self.swap_memory(None);
            })
            .ok_or(Error::MemoryInUse)
    }

    /// Gives back the pages of `ranges` (just made reachable) that the
    /// fault handler poisoned while they were out of reach: a guest touched
    /// memory it had not plugged. They read zero now. The install lock
    /// orders the look with the handler's poisoning, which checks
    /// reachability under it: a page poisoned after the look was not
    /// out of reach any more, so it cannot be.
    fn drop_unreachable_poison(&self, region: &Region, ranges: &[(u64, u64)]) -> Result<()> {
        let page = region.page_size();
        let pages: Vec<u64> = {
            let _install = region.backing().generation().lock_install();
            ranges
                .iter()
                .flat_map(|&(off, len)| region.poisoned_offsets(off, len))
                .collect()
        };
        for off in pages {
            if off + page <= region.backed_size() {
                self.discard_in(region, off, page)?;
            }
        }
        Ok(())
    }

    /// The accessible `(offset, len)` extents of region `index`'s backed
    /// part: what a VMM maps into the guest (KVM memory slots).
    pub fn accessible_extents(&self, index: RegionIndex) -> Vec<(u64, u64)> {
        self.region(index)
            .map_or_else(Vec::new, |r| r.accessible_of(r.backed_size()))
    }

    /// Bytes the backing files have allocated (each file counted once).
    pub fn allocated_bytes(&self) -> u64 {
        self.backing_files()
            .map(|b| b.allocated_bytes().unwrap_or(0))
            .sum()
    }

    /// Bytes the memory map covers: backed and accessible.
    pub fn mapped_bytes(&self) -> u64 {
        self.memory
            .memory()
            .iter()
            .map(vm_memory::GuestMemoryRegion::len)
            .sum()
    }
}
