//! File-backed guest memory whose faults are served in userspace, with a
//! truncate generation per backing file so that discards and faults cannot
//! race.
//!
//! Guest RAM is a set of [`Region`]s, each a window of a [`BackingFile`]
//! (a memfd by default, or a file on tmpfs, hugetlbfs or disk) mapped into
//! the VMM. First touches are served by handler threads reading a
//! userfaultfd: they fetch contents from a [`PageSource`] (zero, or a memory
//! image restored lazily) and install them, with adaptive readahead. Where
//! the host lets shmem use huge pages, fresh memory is filled a 2 MiB huge
//! page at a time instead ([`FaultConfig::huge_fill`]).
//!
//! Anything that takes memory away — [`GuestMem::discard`] (balloon inflate,
//! free-page report) or [`GuestMem::resize`] down (unplug) — runs as one
//! invalidation of the file's [`TruncateGen`](generation::TruncateGen): a
//! fault handler that fetched contents meanwhile sees the generation moved
//! when it re-checks under the install lock, drops what it fetched and tries
//! again. This is the userspace form of the fix Linux made in 2003 for
//! truncate racing with `do_no_page` (`address_space->truncate_count`).
//!
//! ```
//! use guest_mem::{GuestMem, RegionConfig};
//! use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
//!
//! let mem = GuestMem::builder()
//!     .region(RegionConfig::new(0, 2 << 20))
//!     .build()?;
//! mem.memory().memory().write_obj(7u64, GuestAddress(0x2000)).unwrap();
//! mem.discard(GuestAddress(0x2000), 0x1000)?;
//! println!("{}", mem.stats());
//! # Ok::<(), guest_mem::Error>(())
//! ```
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]

pub mod access;
pub mod backend;
pub mod backing;
mod error;
pub mod external;
pub mod fault;
pub mod generation;
mod huge_fill;
pub mod image;
mod memory;
pub mod memory_file;
pub mod pagemap;
pub mod region;
pub mod source;
pub mod stats;
mod sync;
#[cfg(feature = "test-switches")]
pub mod testing;

pub use access::{DeviceMemory, MemoryGuard};
pub use backing::{BackingFile, BackingKind};
pub use error::{Error, Result};
#[cfg(feature = "test-switches")]
pub use fault::TestHook;
pub use fault::{
    FaultConfig, FaultFailure, FaultMode, PoisonedPage, Readahead, ThreadStartHook, Unservable,
};
pub use generation::{FileRange, RetryPolicy};
pub use memory::{Backing, GuestMem, GuestMemBuilder, RegionConfig};
pub use region::{AtomicMemoryMap, GuestMemoryMap, GuestRegion, Region, RegionIndex, RegionSource};
pub use source::{FileSource, PageSource, ZeroSource};
pub use stats::{Stats, StatsSnapshot};
/// The `vm-memory` this crate is built against, for embedders.
pub use vm_memory;
