//! Errors of this crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong building or changing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A size of zero.
    #[error("size must not be zero")]
    ZeroSize,
    /// A size, address or offset not aligned to the page size.
    #[error("{what} {value:#x} is not a multiple of the page size {align:#x}")]
    Unaligned {
        /// What was misaligned.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// A size too large to map or address.
    #[error("size {size:#x} is too large")]
    TooLarge {
        /// The size.
        size: u64,
    },
    /// A backing path that is a directory.
    #[error("{0} is a directory; give a file path for guest memory")]
    IsDirectory(PathBuf),
    /// A backing path that is a device, FIFO or socket.
    #[error("{0} is not a regular file")]
    NotRegularFile(PathBuf),
    /// Opening or sizing a backing file failed.
    #[error("cannot use {path} for guest memory: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An existing backing file larger than the memory asked for.
    #[error(
        "{path} is {file_size:#x} bytes, larger than the {size:#x} bytes of guest memory; \
         refusing to truncate it"
    )]
    FileLargerThanMemory {
        /// The path.
        path: PathBuf,
        /// Its size.
        file_size: u64,
        /// The memory size.
        size: u64,
    },
    /// The huge page pool cannot back the memory.
    #[error(
        "hugetlbfs{} has {free} free {page_size}-byte huge pages, {needed} needed \
         (reserve more with /proc/sys/vm/nr_hugepages)",
        path.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default()
    )]
    NoHugePages {
        /// The hugetlbfs path, if any.
        path: Option<PathBuf>,
        /// Huge page size.
        page_size: u64,
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
    },
    /// A memfd could not be created or sized.
    #[error("memfd: {0}")]
    Memfd(io::Error),
    /// A memfd name with a NUL byte.
    #[error("invalid memfd name {0:?}")]
    InvalidName(String),
    /// Mapping guest memory failed.
    #[error("mapping guest memory: {0}")]
    Mmap(String),
    /// A page source shorter than the region it should fill.
    #[error(
        "the page source of region {region} has {len:#x} bytes, {needed:#x} needed to fill it"
    )]
    SourceTooShort {
        /// The region.
        region: crate::RegionIndex,
        /// The source's length.
        len: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// Punching a hole failed.
    #[error("punching a hole: {0}")]
    PunchHole(io::Error),
    /// Allocating pages in a backing file failed.
    #[error("allocating guest memory: {0}")]
    Allocate(io::Error),
    /// Truncating or extending a backing file failed.
    #[error("resizing a backing file: {0}")]
    Truncate(io::Error),
    /// A shrink to a larger size.
    #[error("cannot shrink from {size:#x} to the larger {new_size:#x}")]
    ShrinkGrows {
        /// Current size.
        size: u64,
        /// Requested size.
        new_size: u64,
    },
    /// A grow to a smaller size.
    #[error("cannot grow from {size:#x} to the smaller {new_size:#x}")]
    GrowShrinks {
        /// Current size.
        size: u64,
        /// Requested size.
        new_size: u64,
    },
    /// A guest-physical range that is not plugged RAM.
    #[error("guest-physical {gpa:#x}+{len:#x} is not plugged RAM")]
    NotRam {
        /// Start of the part that is not RAM.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// No region with this index.
    #[error("no region {0}")]
    NoSuchRegion(crate::RegionIndex),
    /// A region that does not end its backing file.
    #[error("region {0} does not end its backing file and cannot be resized")]
    NotResizable(crate::RegionIndex),
    /// userfaultfd could not be set up.
    #[error("userfaultfd: {0}")]
    Userfault(String),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    Eventfd(io::Error),
    /// A handler thread could not be started.
    #[error("starting a fault handler thread: {0}")]
    Thread(io::Error),
    /// An inconsistent configuration.
    #[error("{0}")]
    Config(String),
    /// Another process's memory cannot be served as described: a region
    /// table that does not fit, or a descriptor that is not a userfaultfd.
    #[error("external memory: {0}")]
    External(String),
    /// The backing file is a read-only image (under private mappings).
    #[error("{0} is opened read-only (an image under private mappings); it is never modified")]
    ReadOnly(PathBuf),
    /// A shrink was asked for by a thread that holds a
    /// [`MemoryGuard`](crate::access::MemoryGuard): it would wait on itself.
    #[error("cannot shrink guest memory while this thread holds a guard on it")]
    MemoryInUse,
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
