//! The interface device models use to give memory back, so that they
//! depend on this trait rather than on a VMM.

use vm_memory::GuestAddress;

use crate::{GuestMem, Result};

/// What a device (virtio-balloon, virtio-mem, free-page reporting) needs from
/// the memory manager beyond reading and writing guest memory.
///
/// ```
/// use guest_mem::backend::MemoryBackend;
/// use guest_mem::{GuestMem, RegionConfig};
/// use guest_mem::vm_memory::GuestAddress;
///
/// fn inflate(backend: &dyn MemoryBackend, pfn: u64) -> guest_mem::Result<()> {
///     let gpa = GuestAddress(pfn << 12);
///     let grain = backend.discard_granularity(gpa).expect("RAM");
///     assert!(grain <= 4096, "hugetlbfs would need whole huge pages");
///     backend.discard(gpa, 4096)
/// }
///
/// let mem = GuestMem::builder().region(RegionConfig::new(0, 1 << 20)).build()?;
/// inflate(&mem, 5)?;
/// assert_eq!(mem.stats().discards, 1);
/// assert_eq!(mem.populated(GuestAddress(5 << 12), 4096), Some(false));
/// # Ok::<(), guest_mem::Error>(())
/// ```
pub trait MemoryBackend: Send + Sync {
    /// The smallest unit `discard` accepts at `gpa` (the backing file's page
    /// size), or `None` when `gpa` is not plugged RAM.
    fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64>;

    /// Whether all of `[gpa, gpa + len)` is plugged RAM.
    fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool;

    /// Gives `[gpa, gpa + len)` back to the host; the next touch reads zero.
    /// The range must be aligned to the granularity.
    fn discard(&self, gpa: GuestAddress, len: u64) -> Result<()>;

    /// Whether the host holds memory for any of `[gpa, gpa + len)`, or
    /// `None` when that cannot be told (private mappings, not RAM). Right
    /// after a discard this must be `Some(false)`: anything else is a page
    /// that came back behind the discard's back.
    fn populated(&self, gpa: GuestAddress, len: u64) -> Option<bool> {
        let _ = (gpa, len);
        None
    }
}

impl MemoryBackend for GuestMem {
    fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64> {
        self.find(gpa).map(|(r, _)| r.page_size())
    }

    fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool {
        let Some(end) = gpa.0.checked_add(len) else {
            return false;
        };
        let mut at = gpa.0;
        while at < end {
            match self.find(GuestAddress(at)) {
                Some((r, off)) => at += r.backed_size() - off,
                None => return false,
            }
        }
        true
    }

    fn discard(&self, gpa: GuestAddress, len: u64) -> Result<()> {
        GuestMem::discard(self, gpa, len)
    }

    fn populated(&self, gpa: GuestAddress, len: u64) -> Option<bool> {
        let end = gpa.0.checked_add(len)?;
        let mut at = gpa.0;
        let mut any = false;
        while at < end {
            let (r, off) = self.find(GuestAddress(at))?;
            if r.is_private() {
                return None;
            }
            let n = (end - at).min(r.backed_size() - off);
            any |= r.backing().has_data(r.file_range(off, n)).ok()?;
            at += n;
        }
        Some(any)
    }
}

/// A window of guest-physical memory a device plugs and unplugs in blocks
/// (virtio-mem): one resizable region whose backing file holds the plugged
/// prefix. Unplugging inside that prefix punches holes; giving back the
/// tail truncates the file. Both are truncate-generation invalidations, so
/// a fault racing with them retries instead of installing stale memory.
///
/// ```
/// use guest_mem::backend::{HotplugBackend, HotplugRegion};
/// use guest_mem::{GuestMem, RegionConfig, RegionIndex};
/// use std::sync::Arc;
///
/// let mut hotplug = RegionConfig::new(4 << 30, 0);
/// hotplug.max_size = Some(64 << 20);
/// let mem = Arc::new(
///     GuestMem::builder()
///         .region(RegionConfig::new(0, 16 << 20))
///         .region(hotplug)
///         .build()?,
/// );
/// let window = HotplugRegion::new(mem.clone(), RegionIndex(1))?;
/// window.set_backed_size(8 << 20)?; // back the first 8 MiB...
/// window.set_plugged(0, 8 << 20, true)?; // ...and let the guest reach them
/// window.set_plugged(2 << 20, 2 << 20, false)?; // unplug a block inside it
/// window.discard_range(2 << 20, 2 << 20)?; // and give it back
/// window.set_backed_size(0)?; // unplug everything
/// assert_eq!(mem.regions()[1].backed_size(), 0);
/// # Ok::<(), guest_mem::Error>(())
/// ```
pub trait HotplugBackend: Send + Sync {
    /// Guest-physical address and size of the whole window.
    fn window(&self) -> (GuestAddress, u64);
    /// Bytes of the window the backing file covers now.
    fn backed_size(&self) -> u64;
    /// Makes the window's first `size` bytes backed: extends the file (new
    /// memory reads zero) or truncates it (an invalidation).
    fn set_backed_size(&self, size: u64) -> Result<()>;
    /// Gives back `[offset, offset + len)` of the window, which must lie in
    /// the backed part: a hole punched as one invalidation.
    fn discard_range(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes `[offset, offset + len)` of the window reachable (plugged) or
    /// not: memory that is not plugged is kept out of the memory map, so
    /// neither the devices nor the guest can make the host back it. A
    /// window starts with only its backed part plugged.
    fn set_plugged(&self, offset: u64, len: u64, plugged: bool) -> Result<()>;
    /// Bytes the window's backing file has allocated on the host.
    fn allocated_bytes(&self) -> u64;
}

/// [`HotplugBackend`] over one resizable region of a [`GuestMem`]: a region
/// built with `max_size` that ends its own backing file.
#[derive(Debug, Clone)]
pub struct HotplugRegion {
    mem: std::sync::Arc<GuestMem>,
    index: crate::RegionIndex,
}

impl HotplugRegion {
    /// The window of region `index`.
    pub fn new(mem: std::sync::Arc<GuestMem>, index: crate::RegionIndex) -> Result<Self> {
        let region = mem.region(index).ok_or(crate::Error::NoSuchRegion(index))?;
        let shared = mem
            .regions()
            .iter()
            .any(|r| r.index() != index && std::sync::Arc::ptr_eq(r.backing(), region.backing()));
        if shared || region.file_offset() != 0 {
            return Err(crate::Error::NotResizable(index));
        }
        let backed = region.backed_size();
        mem.set_accessible(index, backed, region.max_size() - backed, false)?;
        Ok(HotplugRegion { mem, index })
    }

    fn region(&self) -> &crate::Region {
        &self.mem.regions()[self.index.0]
    }
}

impl HotplugBackend for HotplugRegion {
    fn window(&self) -> (GuestAddress, u64) {
        let r = self.region();
        (r.guest_base(), r.max_size())
    }

    fn backed_size(&self) -> u64 {
        self.region().backed_size()
    }

    fn set_backed_size(&self, size: u64) -> Result<()> {
        self.mem.resize(self.index, size)
    }

    fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        let base = self.region().guest_base().0;
        let gpa = base
            .checked_add(offset)
            .ok_or(crate::Error::TooLarge { size: offset })?;
        self.mem.discard(GuestAddress(gpa), len)
    }

    fn set_plugged(&self, offset: u64, len: u64, plugged: bool) -> Result<()> {
        self.mem.set_accessible(self.index, offset, len, plugged)
    }

    fn allocated_bytes(&self) -> u64 {
        self.region().backing().allocated_bytes().unwrap_or(0)
    }
}
