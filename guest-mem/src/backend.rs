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
                Some((r, off)) => at += r.plugged_size() - off,
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
            let n = (end - at).min(r.plugged_size() - off);
            any |= r.backing().has_data(r.file_range(off, n)).ok()?;
            at += n;
        }
        Some(any)
    }
}
