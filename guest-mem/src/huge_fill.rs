//! Fresh shmem memory served a huge page at a time.
//!
//! A first touch of fresh memory (never touched, never given back) is
//! served with zeros. `UFFDIO_ZEROPAGE` puts one 4 KiB page in the file, so
//! the guest's mapping, and KVM's mapping after it, take the memory 4 KiB
//! at a time: a Linux guest's boot then costs thousands of nested page
//! faults where the host is itself a guest. Where the host lets shmem use
//! huge pages (`shmem_enabled` for a memfd, the mount's `huge=` for a tmpfs
//! file; `advise` is enough), the handler instead populates the faulting
//! page through a second mapping of the file, marked `MADV_HUGEPAGE` and
//! not registered with the userfaultfd. The file gets the huge folio
//! around it; the woken thread finds it in the page cache and the kernel
//! maps it with one PMD, so KVM maps it 2 MiB at a time too. Where no huge
//! page can be had, only the faulting page goes in.
//!
//! A fill is an install: it runs under the install lock, after the
//! generation re-check, and only over a window that lies in the backed
//! size, is reachable, has no page given back or poisoned, and holds no
//! page yet (else 4 KiB installs go on: a fill there would allocate what
//! the guest gave back, or a folio of small pages).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backing::BackingKind;
use crate::fault::target::is_base_page;
use crate::generation::InstallGuard;
use crate::region::Region;

/// A huge page: what one fill populates.
pub(crate) const HUGE: u64 = 2 << 20;

/// The `[name]` a THP setting file shows selected.
fn selected(setting: &str) -> Option<&str> {
    let start = setting.find('[')? + 1;
    let len = setting[start..].find(']')?;
    Some(&setting[start..start + len])
}

/// Whether shmem on the kernel's internal mount (memfds) may get huge
/// pages through a mapping marked `MADV_HUGEPAGE`, from the global
/// `shmem_enabled` and, where the kernel has per-size settings, the 2 MiB
/// one (`inherit` defers to the global one).
fn memfd_allows(global: &str, pmd_size: Option<&str>) -> bool {
    let allows = |s: &str| matches!(s, "always" | "within_size" | "advise" | "force");
    match pmd_size.and_then(selected) {
        Some("inherit") | None => selected(global).is_some_and(allows),
        Some(s) => allows(s) || selected(global) == Some("force"),
    }
}

/// Whether a tmpfs mount with these options gives huge pages to a mapping
/// marked `MADV_HUGEPAGE`.
fn tmpfs_allows(mount_options: &str, global: &str) -> bool {
    selected(global) == Some("force")
        || mount_options
            .split(',')
            .any(|o| matches!(o, "huge=always" | "huge=within_size" | "huge=advise"))
}

const THP: &str = "/sys/kernel/mm/transparent_hugepage";

/// Whether this host gives a memfd huge pages when asked.
pub(crate) fn memfd_huge_pages() -> bool {
    let Ok(global) = std::fs::read_to_string(format!("{THP}/shmem_enabled")) else {
        return false;
    };
    let pmd = std::fs::read_to_string(format!("{THP}/hugepages-2048kB/shmem_enabled")).ok();
    pmd_is_2m() && memfd_allows(&global, pmd.as_deref())
}

/// Whether the tmpfs file `fd` lies on gives it huge pages when asked.
pub(crate) fn tmpfs_huge_pages(fd: BorrowedFd<'_>) -> bool {
    let Ok(global) = std::fs::read_to_string(format!("{THP}/shmem_enabled")) else {
        return false;
    };
    // SAFETY: stat is plain data; zeroed is a valid value for it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a stat we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    let dev = format!("{}:{}", libc::major(st.st_dev), libc::minor(st.st_dev));
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    pmd_is_2m() && mount_options(&mounts, &dev).is_some_and(|o| tmpfs_allows(o, &global))
}

/// The super block options of the mount of device `dev` ("major:minor")
/// in a `mountinfo` listing.
fn mount_options<'a>(mountinfo: &'a str, dev: &str) -> Option<&'a str> {
    mountinfo.lines().find_map(|l| {
        let mut fields = l.split(' ');
        if fields.nth(2)? != dev {
            return None;
        }
        // After the optional fields' " - ": type, source, super options.
        let (_, tail) = l.split_once(" - ")?;
        tail.split(' ').nth(2)
    })
}

fn pmd_is_2m() -> bool {
    std::fs::read_to_string(format!("{THP}/hpage_pmd_size"))
        .is_ok_and(|s| s.trim().parse::<u64>() == Ok(HUGE))
}

/// What a huge fill did ([`Region::fill_huge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HugeFill {
    /// The whole huge page at this region offset is in the file.
    Window(u64),
    /// No huge page could be had: only the page at this offset is.
    Page(u64),
}

impl Region {
    /// Whether fresh memory of this region is served a 2 MiB huge page at
    /// a time ([`FaultConfig::huge_fill`](crate::FaultConfig), where the
    /// host allows it).
    pub fn huge_fills(&self) -> bool {
        self.huge_fill.get().is_some()
    }

    /// Lets faults on fresh memory be served a huge page at a time, where
    /// the host gives this region's file huge pages (see
    /// [the module](self)). Returns whether it does.
    pub(crate) fn enable_huge_fill(&self) -> bool {
        if self.huge_fill.get().is_some() {
            return true;
        }
        if self.private
            || self.source.is_some()
            || !is_base_page(self.page_size())
            || self.max_size < HUGE
        {
            return false;
        }
        // Only then the host's settings (sysfs, mountinfo).
        let fd = self.backing.file().as_fd();
        let allowed = match self.backing.kind() {
            BackingKind::Memfd => memfd_huge_pages(),
            BackingKind::Tmpfs => tmpfs_huge_pages(fd),
            BackingKind::Hugetlbfs | BackingKind::Regular => false,
        };
        if !allowed {
            return false;
        }
        // The guest's mapping maps a huge folio with one PMD only where its
        // address and the file offset agree modulo the huge page size.
        if self.host_addr() % HUGE != 0 || self.file_offset % HUGE != 0 {
            log::info!(
                "region {}: mapped at {:#x} (file offset {:#x}), not 2 MiB aligned: fresh \
                 memory is served 4 KiB at a time",
                self.index,
                self.host_addr(),
                self.file_offset
            );
            return false;
        }
        match FillMapping::new(fd, self.file_offset, self.max_size) {
            Ok(m) => {
                self.backing.may_hold_huge_pages();
                let _ = self.huge_fill.set(m);
                true
            }
            Err(e) => {
                log::info!("region {}: no huge page fills ({e})", self.index);
                false
            }
        }
    }

    /// Fills the huge page around `offset` with zeros if the whole of it is
    /// fresh: inside the backed size, reachable, nothing given back or
    /// poisoned, no page there yet. Runs under the install lock (it is an
    /// install). `None`: nothing done, install pages as usual.
    pub(crate) fn fill_huge(&self, _guard: &InstallGuard<'_>, offset: u64) -> Option<HugeFill> {
        let fill = self.huge_fill.get()?;
        let start = offset & !(HUGE - 1);
        let end = start + HUGE;
        let page = self.page_size();
        if end > self.backed_size()
            || self.reachable_end(start) < end
            || self
                .discarded()
                .first_set(start / page, end / page)
                .is_some()
            || self.is_poisoned(start, HUGE)
            || !matches!(
                self.backing.has_data(self.file_range(start, HUGE)),
                Ok(false)
            )
        {
            return None;
        }
        let at = offset & !(page - 1);
        if let Err(e) = fill.fill(at, page) {
            log::debug!(
                "region {}: filling {start:#x}+2M failed ({e}); 4 KiB pages instead",
                self.index
            );
            return None;
        }
        match self.backing.is_all_data(self.file_range(start, HUGE)) {
            Ok(true) => Some(HugeFill::Window(start)),
            _ => Some(HugeFill::Page(at)),
        }
    }

    /// Fills the fresh huge pages `[offset, offset + len)` overlaps, before
    /// contents are written into the file there: a write through the file
    /// gets small pages where the host gives huge ones only to mappings
    /// that ask (`advise`). Returns how many were filled.
    pub(crate) fn prefill_huge(&self, guard: &InstallGuard<'_>, offset: u64, len: u64) -> u64 {
        if self.huge_fill.get().is_none() {
            return 0;
        }
        let end = offset.saturating_add(len).min(self.max_size);
        let mut at = offset & !(HUGE - 1);
        let mut filled = 0;
        while at < end {
            filled += u64::from(matches!(
                self.fill_huge(guard, at),
                Some(HugeFill::Window(_))
            ));
            at += HUGE;
        }
        filled
    }
}

/// A second shared mapping of a region's window of its file, marked
/// `MADV_HUGEPAGE`, through which fills populate huge folios.
#[derive(Debug)]
pub(crate) struct FillMapping {
    addr: u64,
    len: u64,
    /// The kernel refused `MADV_POPULATE_WRITE`: no more fills.
    unsupported: AtomicBool,
}

// SAFETY: the mapping is only an address range; every access goes through
// madvise, which the kernel checks.
unsafe impl Send for FillMapping {}
// SAFETY: as above.
unsafe impl Sync for FillMapping {}

impl FillMapping {
    /// Maps `len` bytes of `fd` from `file_offset`.
    pub(crate) fn new(fd: BorrowedFd<'_>, file_offset: u64, len: u64) -> io::Result<Self> {
        // SAFETY: a new shared mapping at an address of the kernel's choice;
        // nothing else is affected.
        let addr = unsafe {
            libc::mmap64(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                file_offset as i64,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let m = FillMapping {
            addr: addr as u64,
            len,
            unsupported: AtomicBool::new(false),
        };
        m.advise(0, len, libc::MADV_HUGEPAGE)?;
        Ok(m)
    }

    /// Populates the page at `offset` (writing, so the file allocates),
    /// then drops this mapping's own page table entry: the page stays in
    /// the file for the guest's mapping to find. Where the kernel can
    /// allocate one, the file gets the whole huge folio around it; where it
    /// cannot (memory too fragmented), just that page, so a first touch
    /// never costs 2 MiB of small pages. The caller tells which by looking
    /// for a hole.
    ///
    /// The caller holds the install lock and has checked that the page
    /// lies inside the file (a populate past the end fails with `EFAULT`,
    /// it raises no signal).
    pub(crate) fn fill(&self, offset: u64, page: u64) -> io::Result<()> {
        if self.unsupported.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if let Err(e) = self.advise(offset, page, libc::MADV_POPULATE_WRITE) {
            // Before Linux 5.14 there is no MADV_POPULATE_WRITE: stop
            // trying, rather than fail one call per fault.
            if e.raw_os_error() == Some(libc::EINVAL) {
                self.unsupported.store(true, Ordering::Relaxed);
                log::info!("no MADV_POPULATE_WRITE here: fresh memory is served 4 KiB at a time");
            }
            return Err(e);
        }
        let window = offset & !(HUGE - 1);
        self.advise(window, HUGE.min(self.len - window), libc::MADV_DONTNEED)
    }

    fn advise(&self, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        // SAFETY: the range lies inside our own mapping (checked above),
        // which nothing reads through: populating and dropping its page
        // table entries changes no memory anyone holds a reference to.
        let rc = unsafe {
            libc::madvise(
                (self.addr + offset) as *mut libc::c_void,
                len as usize,
                advice,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for FillMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_give_a_memfd_huge_pages() {
        let g =
            |s: &str| "always within_size advise never deny force".replace(s, &format!("[{s}]"));
        assert!(memfd_allows(&g("advise"), None));
        assert!(memfd_allows(&g("within_size"), None));
        assert!(!memfd_allows(&g("never"), None));
        assert!(!memfd_allows(&g("deny"), None));
        let inherit = "always [inherit] within_size advise never";
        assert!(memfd_allows(&g("advise"), Some(inherit)));
        assert!(!memfd_allows(&g("never"), Some(inherit)));
        // A 2 MiB setting of its own overrides the global one.
        assert!(!memfd_allows(
            &g("advise"),
            Some("always inherit within_size advise [never]")
        ));
        assert!(memfd_allows(
            &g("never"),
            Some("always inherit within_size [advise] never")
        ));
        assert!(memfd_allows(
            &g("force"),
            Some("always inherit within_size advise [never]")
        ));
        assert!(!memfd_allows("garbage", None));
    }

    /// Bytes the file system holds for `fd`.
    fn allocated(fd: &std::fs::File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fd.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn a_fill_allocates_a_huge_page_or_just_the_page() {
        use std::os::fd::{AsFd, FromRawFd};
        // SAFETY: a NUL-terminated name; the new descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"fill-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a new descriptor nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(2 * HUGE).unwrap();
        let m = FillMapping::new(file.as_fd(), 0, 2 * HUGE).unwrap();
        m.fill(HUGE + 3 * 4096, 4096).unwrap();
        // A whole huge page where this host's shmem policy gives one (or,
        // memory too fragmented, only the page asked for); else only the
        // page: never a window of small pages.
        let got = allocated(&file);
        if memfd_huge_pages() {
            assert!(got == 4096 || got == HUGE, "{got:#x} bytes allocated");
        } else {
            assert_eq!(got, 4096, "no huge pages here: one page, not a window");
        }
        let mut byte = [1u8];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, HUGE + 3 * 4096).unwrap();
        assert_eq!(byte, [0]);
        // A fill past the mapping is refused before reaching the kernel.
        let e = m.fill(2 * HUGE, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ERANGE));
    }

    #[test]
    fn tmpfs_mount_options_are_found_and_read() {
        let info = "22 1 0:21 / /dev/shm rw,nosuid,nodev shared:2 - tmpfs tmpfs rw,size=65536k\n\
                    40 22 0:37 / /mnt/vm rw,relatime - tmpfs vm rw,size=1048576k,huge=advise,inode64\n";
        assert_eq!(mount_options(info, "0:21"), Some("rw,size=65536k"));
        let vm = mount_options(info, "0:37").unwrap();
        assert!(tmpfs_allows(
            vm,
            "always within_size advise [never] deny force"
        ));
        assert!(!tmpfs_allows(
            "rw,size=65536k",
            "always within_size advise [never] deny force"
        ));
        assert!(tmpfs_allows(
            "rw",
            "always within_size advise never deny [force]"
        ));
        assert!(!tmpfs_allows("rw,huge=never", "[never]"));
        assert_eq!(mount_options(info, "0:99"), None);
        assert_eq!(mount_options("short line", "0:21"), None);
    }
}
