//! Where devices meet guest memory.
//!
//! Devices read and write guest memory through a `vm-memory`
//! [`GuestAddressSpace`](vm_memory::GuestAddressSpace) they are generic over
//! (the VMM gives them `guest_mem::DeviceMemory`, whose snapshots hold off
//! shrinks), and take memory away through the two traits here:
//! [`MemoryBackend`] (balloon inflate, free-page reporting) and
//! [`HotplugBackend`] (virtio-mem plug and unplug). Both report failures as
//! a [`BackendError`] of this crate, so a device never names the memory
//! manager's own error type.
//!
//! `guest-mem`'s types implement them in [`guest_mem_backend`] (the orphan
//! rule puts the implementations on this side: this crate depends on
//! `guest-mem`, not the other way round); a VMM implements them for its own
//! wrappers (KVM memory slots that follow a hotplug window, for example).

pub mod guest_mem_backend;

use vm_memory::GuestAddress;

/// Why the memory backend could not do what a device asked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A guest-physical range that is not (plugged) RAM.
    #[error("guest-physical {gpa:#x}+{len:#x} is not RAM")]
    NotRam {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// A range the backend cannot take: unaligned to its granularity, empty,
    /// overflowing, or outside the window.
    #[error("invalid range: {0}")]
    InvalidRange(String),
    /// The memory is in use by the calling thread (it holds a snapshot of
    /// the memory map the change would have to wait for).
    #[error("the memory is in use by this thread")]
    Busy,
    /// The backend failed (I/O on the backing file, the hypervisor, ...).
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl BackendError {
    /// A failure described by `message`.
    pub fn failed(message: impl Into<String>) -> Self {
        BackendError::Failed(message.into().into())
    }
}

/// What a device (virtio-balloon, free-page reporting) needs from the
/// memory manager beyond reading and writing guest memory: to give memory
/// back.
///
/// ```
/// use devices::memory::{BackendError, MemoryBackend};
/// use guest_mem::{GuestMem, RegionConfig};
/// use guest_mem::vm_memory::GuestAddress;
///
/// fn inflate(backend: &dyn MemoryBackend, pfn: u64) -> Result<(), BackendError> {
///     let gpa = GuestAddress(pfn << 12);
///     let grain = backend.discard_granularity(gpa).expect("RAM");
///     assert!(grain <= 4096, "hugetlbfs would need whole huge pages");
///     backend.discard(gpa, 4096)
/// }
///
/// let mem = GuestMem::builder().region(RegionConfig::new(0, 1 << 20)).build()?;
/// inflate(&mem, 5)?;
/// assert_eq!(mem.stats().discards, 1);
/// assert_eq!(MemoryBackend::populated(&mem, GuestAddress(5 << 12), 4096), Some(false));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait MemoryBackend: Send + Sync {
    /// The smallest unit `discard` accepts at `gpa` (the backing file's page
    /// size), or `None` when `gpa` is not plugged RAM.
    fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64>;

    /// Whether all of `[gpa, gpa + len)` is plugged RAM.
    fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool;

    /// Gives `[gpa, gpa + len)` back to the host; the next touch reads zero.
    /// The range must be aligned to the granularity.
    fn discard(&self, gpa: GuestAddress, len: u64) -> Result<(), BackendError>;

    /// Whether the host holds memory for any of `[gpa, gpa + len)`, or
    /// `None` when that cannot be told (private mappings, not RAM). Right
    /// after a discard this must be `Some(false)`: anything else is a page
    /// that came back behind the discard's back.
    fn populated(&self, gpa: GuestAddress, len: u64) -> Option<bool> {
        let _ = (gpa, len);
        None
    }

    /// Bytes of RAM the guest has, when the backend can tell: the bound a
    /// restored balloon's sizes are checked against.
    fn ram_bytes(&self) -> Option<u64> {
        None
    }
}

/// A window of guest-physical memory a device plugs and unplugs in blocks
/// (virtio-mem): a resizable range whose backing holds the plugged prefix.
/// Unplugging inside that prefix punches holes; giving back the tail
/// shrinks the backing.
///
/// ```
/// use devices::memory::HotplugBackend;
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
/// let window: Arc<dyn HotplugBackend> = Arc::new(HotplugRegion::new(mem.clone(), RegionIndex(1))?);
/// window.set_backed_size(8 << 20)?; // back the first 8 MiB...
/// window.set_plugged(0, 8 << 20, true)?; // ...and let the guest reach them
/// window.set_plugged(2 << 20, 2 << 20, false)?; // unplug a block inside it
/// window.discard_range(2 << 20, 2 << 20)?; // and give it back
/// window.set_backed_size(0)?; // unplug everything
/// assert_eq!(window.backed_size(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait HotplugBackend: Send + Sync {
    /// Guest-physical address and size of the whole window.
    fn window(&self) -> (GuestAddress, u64);
    /// Bytes of the window the backing covers now.
    fn backed_size(&self) -> u64;
    /// Makes the window's first `size` bytes backed: grows the backing (new
    /// memory reads zero) or shrinks it.
    fn set_backed_size(&self, size: u64) -> Result<(), BackendError>;
    /// Gives back `[offset, offset + len)` of the window, which must lie in
    /// the backed part.
    fn discard_range(&self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Makes `[offset, offset + len)` of the window reachable (plugged) or
    /// not: memory that is not plugged is kept out of the memory map, so
    /// neither the devices nor the guest can make the host back it. A
    /// window starts with only its backed part plugged.
    fn set_plugged(&self, offset: u64, len: u64, plugged: bool) -> Result<(), BackendError>;
    /// Bytes the window's backing has allocated on the host.
    fn allocated_bytes(&self) -> u64;
}
