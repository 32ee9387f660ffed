//! What device models need from guest memory beyond reading and writing
//! it: where memory can be given back and in what unit, whether the host
//! still holds it, and a window that grows and shrinks in blocks. Device
//! crates wrap these in traits of their own (the `devices` crate's
//! `MemoryBackend` and `HotplugBackend`), so nothing here knows of devices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::GuestAddress;

use crate::{Error, GuestMem, Region, RegionIndex, Result};

impl GuestMem {
    /// The smallest unit [`discard`](GuestMem::discard) accepts at `gpa`
    /// (the backing file's page size), or `None` when `gpa` is not RAM.
    pub fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64> {
        self.find(gpa).map(|(r, _)| r.page_size())
    }

    /// Whether all of `[gpa, gpa + len)` is RAM the backing files cover.
    pub fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool {
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

    /// Whether the host holds memory for any of `[gpa, gpa + len)`, or
    /// `None` when that cannot be told (private mappings, not RAM). Right
    /// after a discard this is `Some(false)`: anything else is a page that
    /// came back behind the discard's back.
    ///
    /// ```
    /// use guest_mem::{GuestMem, RegionConfig};
    /// use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    ///
    /// let mem = GuestMem::builder().region(RegionConfig::new(0, 1 << 20)).build()?;
    /// mem.memory().memory().write_obj(1u8, GuestAddress(5 << 12)).unwrap();
    /// assert_eq!(mem.populated(GuestAddress(5 << 12), 4096), Some(true));
    /// mem.discard(GuestAddress(5 << 12), 4096)?; // balloon inflate
    /// assert_eq!(mem.populated(GuestAddress(5 << 12), 4096), Some(false));
    /// # Ok::<(), guest_mem::Error>(())
    /// ```
    pub fn populated(&self, gpa: GuestAddress, len: u64) -> Option<bool> {
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
/// use guest_mem::backend::HotplugRegion;
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
#[derive(Debug, Clone)]
pub struct HotplugRegion {
    mem: Arc<GuestMem>,
    index: RegionIndex,
    /// For a window whose file spans it whole ([`spanning`](Self::spanning)):
    /// the backed size the window reports, which the file's size no longer
    /// tells.
    spanned: Option<Arc<AtomicU64>>,
}

impl HotplugRegion {
    /// The window of region `index`: a region built with `max_size` that
    /// ends its own backing file.
    pub fn new(mem: Arc<GuestMem>, index: RegionIndex) -> Result<Self> {
        let region = mem.region(index).ok_or(Error::NoSuchRegion(index))?;
        let shared = mem
            .regions()
            .iter()
            .any(|r| r.index() != index && Arc::ptr_eq(r.backing(), region.backing()));
        if shared || region.file_offset() != 0 {
            return Err(Error::NotResizable(index));
        }
        let backed = region.backed_size();
        mem.set_accessible(index, backed, region.max_size() - backed, false)?;
        Ok(HotplugRegion {
            mem,
            index,
            spanned: None,
        })
    }

    /// The window of region `index`, its backing file grown at once to
    /// span the whole window (sparse: it allocates nothing). Nothing is
    /// truncated or grown afterwards: shrinking the backed size punches
    /// the tail out instead, and what is not plugged stays out of reach,
    /// which the fault handler enforces (it never serves such a fault, and
    /// poisons it where it poisons). For a VMM that maps the whole window
    /// into the guest at once, as one KVM memory slot, so that plugging
    /// and unplugging never change the guest's memory map.
    ///
    /// ```
    /// use guest_mem::backend::HotplugRegion;
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
    /// let window = HotplugRegion::spanning(mem.clone(), RegionIndex(1))?;
    /// assert_eq!(mem.regions()[1].backing().size(), 64 << 20);
    /// assert_eq!(window.backed_size(), 0); // nothing plugged yet
    /// window.set_backed_size(8 << 20)?;
    /// window.set_plugged(0, 8 << 20, true)?;
    /// window.set_backed_size(0)?; // punched, not truncated
    /// assert_eq!(mem.regions()[1].backing().size(), 64 << 20);
    /// # Ok::<(), guest_mem::Error>(())
    /// ```
    pub fn spanning(mem: Arc<GuestMem>, index: RegionIndex) -> Result<Self> {
        let mut w = Self::new(mem, index)?;
        let backed = w.backed_size();
        w.mem.resize(index, w.region().max_size())?;
        w.spanned = Some(Arc::new(AtomicU64::new(backed)));
        Ok(w)
    }

    fn region(&self) -> &Region {
        &self.mem.regions()[self.index.0]
    }

    /// Guest-physical address and size of the whole window.
    pub fn window(&self) -> (GuestAddress, u64) {
        let r = self.region();
        (r.guest_base(), r.max_size())
    }

    /// Bytes of the window the backing file covers now.
    pub fn backed_size(&self) -> u64 {
        match &self.spanned {
            Some(size) => size.load(Ordering::Acquire),
            None => self.region().backed_size(),
        }
    }

    /// Makes the window's first `size` bytes backed: extends the file (new
    /// memory reads zero) or truncates it (an invalidation). A spanning
    /// window punches the tail out instead of truncating it.
    pub fn set_backed_size(&self, size: u64) -> Result<()> {
        let Some(spanned) = &self.spanned else {
            return self.mem.resize(self.index, size);
        };
        self.region().check_size(size)?;
        let old = spanned.load(Ordering::Acquire);
        if size < old {
            self.discard_range(size, old - size)?;
        }
        spanned.store(size, Ordering::Release);
        Ok(())
    }

    /// Gives back `[offset, offset + len)` of the window, which must lie in
    /// the backed part: a hole punched as one invalidation.
    pub fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        let base = self.region().guest_base().0;
        let gpa = base
            .checked_add(offset)
            .ok_or(Error::TooLarge { size: offset })?;
        self.mem.discard(GuestAddress(gpa), len)
    }

    /// Makes `[offset, offset + len)` of the window reachable (plugged) or
    /// not: memory that is not plugged is kept out of the memory map, so
    /// neither the devices nor the guest can make the host back it. A
    /// window starts with only its backed part plugged.
    pub fn set_plugged(&self, offset: u64, len: u64, plugged: bool) -> Result<()> {
        self.mem.set_accessible(self.index, offset, len, plugged)
    }

    /// Bytes the window's backing file has allocated on the host.
    pub fn allocated_bytes(&self) -> u64 {
        self.region().backing().allocated_bytes().unwrap_or(0)
    }
}
