//! Backing files for guest RAM: a memfd (the default), or a file on tmpfs,
//! hugetlbfs or a disk file system.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::generation::{FileRange, InstallGuard, TruncateGen};
use crate::pagemap::PageBits;
use crate::{Error, Result};

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// What kind of file system holds a backing file; decides which fault
/// handling and which discard operations it supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    /// An anonymous memfd (shmem).
    Memfd,
    /// A file on tmpfs (shmem).
    Tmpfs,
    /// A file on hugetlbfs, or a `MFD_HUGETLB` memfd.
    Hugetlbfs,
    /// A file on any other file system (ext4, xfs, ...). The kernel's
    /// userfaultfd cannot manage shared mappings of such files.
    Regular,
}

impl BackingKind {
    /// Whether userfaultfd can register a shared mapping of this file.
    pub fn supports_userfault(self) -> bool {
        !matches!(self, BackingKind::Regular)
    }
}

/// A file that backs guest RAM, with its truncate generation.
///
/// Every operation that takes contents away (`discard`, `shrink`) runs as one
/// invalidation of the file's [`TruncateGen`], so that a fault handler that
/// fetched contents meanwhile retries instead of installing them.
///
/// ```
/// use guest_mem::backing::BackingFile;
/// use guest_mem::generation::FileRange;
///
/// let file = BackingFile::memfd("example", 1 << 20)?;
/// assert_eq!(file.size(), 1 << 20);
/// file.discard(FileRange::new(0, 4096), || {})?;
/// assert_eq!(file.generation().invalidations(), 1);
/// file.shrink(512 << 10, || {})?;
/// file.grow(2 << 20)?;
/// assert_eq!(file.size(), 2 << 20);
/// # Ok::<(), guest_mem::Error>(())
/// ```
#[derive(Debug)]
pub struct BackingFile {
    file: Arc<File>,
    path: Option<PathBuf>,
    kind: BackingKind,
    page_size: u64,
    /// The file's size as this crate last set it. Changed only under the
    /// resize lock; shrinks also inside an invalidation.
    size: AtomicU64,
    gen: TruncateGen,
    resize: Mutex<()>,
    /// Opened read-only (an image under private mappings): never punched,
    /// truncated or extended.
    read_only: bool,
    /// Pages of the file discarded (or never plugged) and not installed
    /// since, one bit per file page: they read zero whatever a page source
    /// holds, and readahead skips them. It lives with the generation so
    /// that every region over the file sees every discard; invalidations
    /// set it, installs clear it under the install lock. Sized when the
    /// first memory is built over the file.
    discard_map: OnceLock<PageBits>,
    /// Pages of the file poisoned (`UFFDIO_POISON`) because they could not
    /// be served, one bit per file page, sized with the discard map. Set
    /// under the install lock, cleared inside the invalidation that gives
    /// the page back (discard, shrink); a poisoned page is refused to the
    /// VMM's own accesses ([`GuestRegion`](crate::GuestRegion)).
    poisoned: OnceLock<PageBits>,
    /// How many bits of `poisoned` are set (the accesses' fast path).
    poisoned_count: AtomicU64,
    /// Huge fills may have put huge pages in the file (shmem).
    huge_pages: std::sync::atomic::AtomicBool,
}

/// Punches after the first where a huge page could not be split.
const PUNCH_ATTEMPTS: u32 = 3;

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let sz = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if sz > 0 {
        sz as u64
    } else {
        4096
    }
}

/// The base page size of this host.
pub fn host_page_size() -> u64 {
    page_size()
}

fn fs_magic_and_block(fd: RawFd) -> io::Result<(i64, u64)> {
    // SAFETY: statfs is plain data; zeroed is a valid value for it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor and st points to writable storage of
    // the right type.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_type, st.f_bsize as u64))
}

/// A new, empty anonymous memfd (close-on-exec; on hugetlbfs if `huge`).
/// The one place this crate, its tests and its benches create memfds.
pub fn memfd_file(name: &str, huge: bool) -> Result<File> {
    let cname = CString::new(name).map_err(|_| Error::InvalidName(name.to_string()))?;
    let mut flags = libc::MFD_CLOEXEC;
    if huge {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: cname is a valid NUL-terminated string; memfd_create only
    // reads it and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn check_size(size: u64, page: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    if size % page != 0 {
        return Err(Error::Unaligned {
            what: "backing file size",
            value: size,
            align: page,
        });
    }
    if size > i64::MAX as u64 {
        return Err(Error::TooLarge { size });
    }
    Ok(())
}

impl BackingFile {
    /// An anonymous memfd of `size` bytes (a multiple of the host page size).
    pub fn memfd(name: &str, size: u64) -> Result<Self> {
        Self::create_memfd(name, size, false, false)
    }

    /// An anonymous memfd on hugetlbfs (`MFD_HUGETLB`, default huge page
    /// size). Fails with [`Error::NoHugePages`] when the pool cannot back it.
    pub fn memfd_hugetlb(name: &str, size: u64) -> Result<Self> {
        Self::create_memfd(name, size, true, false)
    }

    /// A memfd (on hugetlbfs if `huge`) that starts empty, for a region
    /// whose memory is all plugged later.
    pub fn memfd_empty(name: &str, huge: bool) -> Result<Self> {
        Self::create_memfd(name, 0, huge, true)
    }

    fn create_memfd(name: &str, size: u64, huge: bool, may_be_empty: bool) -> Result<Self> {
        let file = memfd_file(name, huge)?;
        let (kind, page) = if huge {
            let (_, block) = fs_magic_and_block(file.as_raw_fd()).map_err(Error::Memfd)?;
            (BackingKind::Hugetlbfs, block)
        } else {
            (BackingKind::Memfd, page_size())
        };
        if !(may_be_empty && size == 0) {
            check_size(size, page)?;
        }
        if huge {
            check_huge_pool(page, size, None)?;
        }
        file.set_len(size).map_err(Error::Memfd)?;
        Ok(Self::from_parts(file, None, kind, page, size))
    }

    /// A file at `path` (created if absent) on tmpfs, hugetlbfs or a disk
    /// file system, set to `size` bytes. An existing larger file is refused
    /// rather than truncated, so that no data is lost by accident.
    pub fn open(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        let path = path.as_ref();
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.is_dir() {
                return Err(Error::IsDirectory(path.to_path_buf()));
            }
            let ft = meta.file_type();
            if ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket() {
                return Err(Error::NotRegularFile(path.to_path_buf()));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let io_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let (magic, block) = fs_magic_and_block(file.as_raw_fd()).map_err(io_err)?;
        let (kind, page) = match magic {
            HUGETLBFS_MAGIC => (BackingKind::Hugetlbfs, block),
            TMPFS_MAGIC => (BackingKind::Tmpfs, page_size()),
            _ => (BackingKind::Regular, page_size()),
        };
        check_size(size, page)?;
        let existing = file.metadata().map_err(io_err)?.len();
        if existing > size {
            return Err(Error::FileLargerThanMemory {
                path: path.to_path_buf(),
                file_size: existing,
                size,
            });
        }
        if kind == BackingKind::Hugetlbfs {
            check_huge_pool(page, size - existing, Some(path))?;
        }
        if existing != size {
            file.set_len(size).map_err(io_err)?;
        }
        Ok(Self::from_parts(
            file,
            Some(path.to_path_buf()),
            kind,
            page,
            size,
        ))
    }

    /// An existing file at `path`, opened read-only, for regions mapped
    /// privately (copy-on-write) over it: a memory image that several VMs
    /// restore from at once and none may modify. Its size must be a
    /// multiple of the page size.
    pub fn open_readonly(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if meta.is_dir() {
            return Err(Error::IsDirectory(path.to_path_buf()));
        }
        if !meta.file_type().is_file() {
            return Err(Error::NotRegularFile(path.to_path_buf()));
        }
        let (magic, block) = fs_magic_and_block(file.as_raw_fd()).map_err(io_err)?;
        let (kind, page) = match magic {
            HUGETLBFS_MAGIC => (BackingKind::Hugetlbfs, block),
            TMPFS_MAGIC => (BackingKind::Tmpfs, page_size()),
            _ => (BackingKind::Regular, page_size()),
        };
        check_size(meta.len(), page)?;
        let mut f = Self::from_parts(file, Some(path.to_path_buf()), kind, page, meta.len());
        f.read_only = true;
        Ok(f)
    }

    /// Whether the file was opened read-only ([`open_readonly`](Self::open_readonly)).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly(self.path.clone().unwrap_or_default()))
        } else {
            Ok(())
        }
    }

    fn from_parts(
        file: File,
        path: Option<PathBuf>,
        kind: BackingKind,
        page_size: u64,
        size: u64,
    ) -> Self {
        BackingFile {
            file: Arc::new(file),
            path,
            kind,
            page_size,
            size: AtomicU64::new(size),
            gen: TruncateGen::new(),
            resize: Mutex::new(()),
            read_only: false,
            discard_map: OnceLock::new(),
            poisoned: OnceLock::new(),
            poisoned_count: AtomicU64::new(0),
            huge_pages: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The open file.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The path, for files opened by path.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The kind of file system behind the file.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// The page size of the file (the huge page size on hugetlbfs).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The file's truncate generation.
    pub fn generation(&self) -> &TruncateGen {
        &self.gen
    }

    /// Makes the discard map cover at least `pages` file pages (fixed once
    /// memory is built over the file).
    pub(crate) fn init_discard_map(&self, pages: u64) -> Result<()> {
        let map = self.discard_map.get_or_init(|| PageBits::new(pages));
        let poisoned = self.poisoned.get_or_init(|| PageBits::new(map.len()));
        if map.len() < pages || poisoned.len() < pages {
            return Err(Error::Config(format!(
                "backing file already in use with a discard map of {} pages; {pages} needed \
                 (build every region over one file together)",
                map.len()
            )));
        }
        Ok(())
    }

    /// The discard map, once memory was built over the file.
    pub(crate) fn discard_map(&self) -> Option<&PageBits> {
        self.discard_map.get()
    }

    /// Pages of the file currently poisoned because they could not be
    /// served (see [`FaultConfig::on_unservable`](crate::FaultConfig)).
    pub fn poisoned_pages(&self) -> u64 {
        self.poisoned_count.load(Ordering::Acquire)
    }

    /// Whether any page of `range` (file offsets) is poisoned.
    pub fn is_poisoned(&self, range: FileRange) -> bool {
        if range.is_empty() || self.poisoned_pages() == 0 {
            return false;
        }
        let page = self.page_size;
        self.poisoned.get().is_some_and(|m| {
            m.first_set(range.start / page, range.end.div_ceil(page))
                .is_some()
        })
    }

    /// The first poisoned file page in `[first, end)` (page numbers).
    pub(crate) fn first_poisoned(&self, first: u64, end: u64) -> Option<u64> {
        if self.poisoned_pages() == 0 {
            return None;
        }
        self.poisoned.get()?.first_set(first, end)
    }

    /// Records file page `page` poisoned (counted once); the install lock
    /// proves no invalidation (which clears the set) runs meanwhile.
    pub(crate) fn mark_poisoned(&self, _guard: &InstallGuard<'_>, page: u64) {
        if self.poisoned.get().is_some_and(|m| m.test_and_set(page)) {
            self.poisoned_count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Forgets the poisoned pages of `range` (inside the invalidation that
    /// gives them back); returns how many there were.
    fn unpoison(&self, range: FileRange) -> u64 {
        let Some(map) = self.poisoned.get() else {
            return 0;
        };
        let page = self.page_size;
        let n = map.take_range(range.start / page, range.end.div_ceil(page));
        if n > 0 {
            self.poisoned_count.fetch_sub(n, Ordering::AcqRel);
            log::info!(
                "backing file: {n} poisoned page(s) in {:#x}..{:#x} given back; they are \
                 served again",
                range.start,
                range.end
            );
        }
        n
    }

    /// Marks the file pages of `range` discarded (inside an invalidation).
    fn mark_discarded(&self, range: FileRange) {
        if let Some(map) = self.discard_map.get() {
            let page = self.page_size;
            map.set_range(range.start / page, range.end.div_ceil(page));
        }
    }

    fn check_range(&self, range: FileRange) -> Result<()> {
        let page = self.page_size;
        if range.is_empty() {
            return Err(Error::ZeroSize);
        }
        if range.start % page != 0 || range.end % page != 0 {
            return Err(Error::Unaligned {
                what: "discard range",
                value: if range.start % page != 0 {
                    range.start
                } else {
                    range.end
                },
                align: page,
            });
        }
        Ok(())
    }

    /// Punches a hole over `range` (clipped to the file's size) as one
    /// invalidation, and marks its pages discarded. `before_punch` runs
    /// inside the invalidation, before the hole is punched: the place to
    /// update other metadata that fault handlers read and to zap private
    /// mappings of the range.
    pub fn discard(&self, range: FileRange, before_punch: impl FnOnce()) -> Result<()> {
        self.check_range(range)?;
        self.writable()?;
        self.gen.invalidate(range, || {
            self.mark_discarded(range);
            before_punch();
            self.unpoison(range);
            let end = range.end.min(self.size());
            if end > range.start {
                let range = FileRange {
                    start: range.start,
                    end,
                };
                self.punch_hole(range)?;
                self.punch_again_if_kept(range)
            } else {
                Ok(())
            }
        })
    }

    /// Tells discards that the file may hold huge pages (shmem huge fills).
    pub(crate) fn may_hold_huge_pages(&self) {
        self.huge_pages.store(true, Ordering::Release);
    }

    /// A punch inside a shmem huge page splits it; a split that meets a
    /// page briefly referenced elsewhere (a vCPU faulting on a neighbour
    /// in the same huge page) fails, and the kernel then only zeroes the
    /// range, keeping its memory. Punch again a few times while the range
    /// still holds pages (nothing installs meanwhile: this runs inside the
    /// invalidation).
    fn punch_again_if_kept(&self, range: FileRange) -> Result<()> {
        // A range of whole huge pages splits none (folios are at most one
        // huge page, naturally aligned): free page reports, unplugs.
        let huge = crate::huge_fill::HUGE;
        let whole = range.start % huge == 0 && range.end % huge == 0;
        if whole || !self.huge_pages.load(Ordering::Acquire) {
            return Ok(());
        }
        for _ in 0..PUNCH_ATTEMPTS {
            if !matches!(self.has_data(range), Ok(true)) {
                return Ok(());
            }
            std::thread::yield_now();
            self.punch_hole(range)?;
        }
        if matches!(self.has_data(range), Ok(true)) {
            log::debug!(
                "{:#x}..{:#x}: its huge page could not be split; zeroed, memory kept",
                range.start,
                range.end
            );
        }
        Ok(())
    }

    /// Truncates the file to `new_size` as one invalidation of the removed
    /// tail. `before_truncate` runs inside the invalidation first.
    pub fn shrink(&self, new_size: u64, before_truncate: impl FnOnce()) -> Result<()> {
        self.writable()?;
        let _resize = self.resize.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.size();
        if new_size % self.page_size != 0 {
            return Err(Error::Unaligned {
                what: "new size",
                value: new_size,
                align: self.page_size,
            });
        }
        if new_size > old {
            return Err(Error::ShrinkGrows {
                size: old,
                new_size,
            });
        }
        if new_size == old {
            return Ok(());
        }
        self.gen.invalidate(
            FileRange {
                start: new_size,
                end: old,
            },
            || {
                self.mark_discarded(FileRange {
                    start: new_size,
                    end: old,
                });
                before_truncate();
                // Truncation drops the poison markers of the removed tail.
                self.unpoison(FileRange {
                    start: new_size,
                    end: old,
                });
                self.size.store(new_size, Ordering::Release);
                self.file.set_len(new_size).map_err(Error::Truncate)
            },
        )
    }

    /// Extends the file to `new_size`; the new tail reads as zero. Growing
    /// takes nothing away, so it is not an invalidation.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        self.writable()?;
        let _resize = self.resize.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.size();
        check_size(new_size, self.page_size)?;
        if new_size < old {
            return Err(Error::GrowShrinks {
                size: old,
                new_size,
            });
        }
        if new_size == old {
            return Ok(());
        }
        if self.kind == BackingKind::Hugetlbfs {
            check_huge_pool(self.page_size, new_size - old, self.path.as_deref())?;
        }
        self.file.set_len(new_size).map_err(Error::Truncate)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Runs `invalidate` as one invalidation of `range` without touching the
    /// file: for private mappings, whose discards only drop the VMM's
    /// copies (`MADV_DONTNEED`).
    pub fn invalidate_mappings(&self, range: FileRange, invalidate: impl FnOnce()) -> Result<()> {
        self.check_range(range)?;
        self.gen.invalidate(range, || {
            self.mark_discarded(range);
            invalidate();
            self.unpoison(range);
        });
        Ok(())
    }

    /// Raw `fallocate(PUNCH_HOLE)`: no generation. Callers hold an invalidation.
    pub(crate) fn punch_hole(&self, range: FileRange) -> Result<()> {
        // SAFETY: fallocate on an open descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate64(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                range.start as i64,
                range.len() as i64,
            )
        };
        if rc != 0 {
            return Err(Error::PunchHole(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Allocates `range` in the file (`fallocate`, keeping its size): its
    /// pages read zero and are in the page cache, so touching them raises
    /// no fault for a handler to serve. Pages already there are kept.
    pub(crate) fn allocate(&self, range: FileRange) -> Result<()> {
        // SAFETY: fallocate on an open descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate64(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                range.start as i64,
                range.len() as i64,
            )
        };
        if rc != 0 {
            return Err(Error::Allocate(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Bytes the file system has allocated to the file (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        // SAFETY: stat is plain data; zeroed is a valid value for it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a pointer to a stat we own.
        if unsafe { libc::fstat(self.file.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.st_blocks as u64 * 512)
    }

    /// Whether every byte of `range` holds data (no hole in it), by
    /// `SEEK_HOLE`.
    pub(crate) fn is_all_data(&self, range: FileRange) -> io::Result<bool> {
        if range.is_empty() || range.end > self.size() {
            return Ok(false);
        }
        // SAFETY: lseek on an open descriptor has no memory effects.
        let hole =
            unsafe { libc::lseek64(self.file.as_raw_fd(), range.start as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(hole as u64 >= range.end)
    }

    /// Whether any byte of `range` holds data (is not a hole), by `SEEK_DATA`.
    pub fn has_data(&self, range: FileRange) -> io::Result<bool> {
        if range.is_empty() || range.start >= self.size() {
            return Ok(false);
        }
        // SAFETY: lseek on an open descriptor has no memory effects.
        let off =
            unsafe { libc::lseek64(self.file.as_raw_fd(), range.start as i64, libc::SEEK_DATA) };
        if off < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::ENXIO) {
                Ok(false)
            } else {
                Err(err)
            };
        }
        Ok((off as u64) < range.end)
    }
}

impl AsRawFd for BackingFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Free huge pages of `page_size`, from sysfs.
pub fn free_huge_pages(page_size: u64) -> Option<u64> {
    let p = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
        page_size / 1024
    );
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn check_huge_pool(page_size: u64, bytes: u64, path: Option<&Path>) -> Result<()> {
    let needed = bytes.div_ceil(page_size);
    match free_huge_pages(page_size) {
        Some(free) if free < needed => Err(Error::NoHugePages {
            path: path.map(Path::to_path_buf),
            page_size,
            needed,
            free,
        }),
        _ => Ok(()),
    }
}
