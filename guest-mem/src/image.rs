//! Placing boot images (a kernel, an initramfs) in guest memory through the
//! backing file.
//!
//! A loader that writes an image through the guest mapping makes the fault
//! handler zero-fill every page first (the mapping is userfaultfd-managed)
//! only to overwrite it. [`ImageFile`] is a reader for loaders such as
//! `linux-loader`: when the destination is a shared mapping of a writable
//! backing file (memfd, tmpfs, disk), it splices the bytes straight into the
//! file's page cache at the right offset, so no page is faulted in or
//! zeroed and the bytes are copied once. On hugetlbfs, which takes no
//! writes through the file, each whole huge page goes in by `UFFDIO_COPY`
//! straight from a mapping of the image: again one copy, and no fault for
//! the handler to zero-fill first. Elsewhere (the rest of a huge page,
//! private mappings, memory that is not guest RAM) it reads through the
//! mapping like a plain file. In a nested guest this halves the time to
//! place a Debian kernel.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::backing::BackingKind;
use crate::fault::ioctl;
use crate::{GuestMem, Region};

/// Bytes moved per splice round trip (the pipe is grown to this if it can be).
const CHUNK: usize = 1 << 20;

/// A file to be loaded into `mem` by a boot loader; see the [module
/// documentation](self).
///
/// ```
/// use guest_mem::image::ImageFile;
/// use guest_mem::{GuestMem, RegionConfig};
/// use std::io::Write;
/// use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
///
/// let mem = GuestMem::builder().region(RegionConfig::new(0, 4 << 20)).build()?;
/// let mut kernel = tempfile()?;
/// kernel.write_all(&[0x90; 8192])?;
/// let mut image = ImageFile::new(&mem, kernel);
/// image.rewind()?;
/// mem.memory()
///     .memory()
///     .read_exact_volatile_from(GuestAddress(0x10_0000), &mut image, 8192)
///     .unwrap();
/// assert_eq!(image.spliced_bytes(), 8192); // went into the memfd, not the mapping
/// assert_eq!(mem.stats().faults, 0);
/// let byte: u8 = mem.memory().memory().read_obj(GuestAddress(0x10_1fff)).unwrap();
/// assert_eq!(byte, 0x90);
/// # use std::io::Seek;
/// # fn tempfile() -> std::io::Result<std::fs::File> {
/// #     let path = std::env::temp_dir().join(format!("image-doc-{}", std::process::id()));
/// #     let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
/// #     std::fs::remove_file(&path)?;
/// #     Ok(f)
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ImageFile<'m> {
    file: File,
    mem: &'m GuestMem,
    /// (read end, write end, capacity) of the splice pipe, made on first use.
    pipe: Option<(OwnedFd, OwnedFd, usize)>,
    spliced: u64,
    /// Bytes placed by `UFFDIO_COPY` from a mapping of the file.
    copied: u64,
    read: u64,
    /// Huge pages filled ahead of the splice ([`crate::huge_fill`]).
    prefilled: u64,
    /// Cleared when the backing refuses splice, so it is not tried again.
    splice_ok: bool,
}

impl<'m> ImageFile<'m> {
    /// Wraps `file` (positioned where the loader expects it) for loading
    /// into `mem`.
    pub fn new(mem: &'m GuestMem, file: File) -> Self {
        ImageFile {
            file,
            mem,
            pipe: None,
            spliced: 0,
            copied: 0,
            read: 0,
            prefilled: 0,
            splice_ok: true,
        }
    }

    /// Bytes placed through the backing file so far.
    pub fn spliced_bytes(&self) -> u64 {
        self.spliced
    }

    /// Bytes placed as whole huge pages by `UFFDIO_COPY` so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied
    }

    /// Bytes placed through the mapping (or into host buffers) so far.
    pub fn read_bytes(&self) -> u64 {
        self.read
    }

    /// The region, region offset and userfaultfd of `len` bytes of guest
    /// memory at host address `ptr`, when whole pages of them can be
    /// installed by `UFFDIO_COPY`: fresh shared hugetlbfs memory (no page
    /// source behind it) whose faults this crate serves.
    fn copy_destination(&self, ptr: u64, len: u64) -> Option<(&'m Region, u64, RawFd)> {
        let uffd = self.mem.userfault_fd()?;
        let (region, offset) = self.region_at(ptr, len)?;
        let fresh = !region.is_private() && region.source.is_none();
        (fresh && region.backing().kind() == BackingKind::Hugetlbfs)
            .then_some((region, offset, uffd))
    }

    /// The region and region offset of `len` bytes of guest memory at host
    /// address `ptr`, if they lie inside one region's backed size.
    fn region_at(&self, ptr: u64, len: u64) -> Option<(&'m Region, u64)> {
        let mem: &'m GuestMem = self.mem;
        let region = mem.regions().iter().find(|r| r.contains_host(ptr))?;
        let offset = ptr - region.host_addr();
        (offset.checked_add(len)? <= region.backed_size()).then_some((region, offset))
    }

    /// Fills `buf` (at `offset` in `region`, whose faults `uffd` serves)
    /// from the file's position:
    /// each whole page by `UFFDIO_COPY` from a mapping of the file where
    /// the file and guest offsets line up, the rest (and any page already
    /// present) by reading through the mapping. Returns the bytes placed,
    /// short only at the end of the file.
    fn place_by_copy<B: BitmapSlice>(
        &mut self,
        region: &Region,
        offset: u64,
        uffd: RawFd,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let io = VolatileMemoryError::IOError;
        let len = buf.len();
        let page = region.page_size();
        let start = self.file.stream_position().map_err(io)?;
        let file_len = self.file.metadata().map_err(io)?.len();
        let source = SourceMap::new(&self.file, start, len as u64, file_len);
        let mut at = 0usize;
        while at < len {
            let off = offset + at as u64;
            let whole = off % page == 0 && (len - at) as u64 >= page;
            let src = source.as_ref().and_then(|s| s.page_at(at as u64, page));
            if let (true, Some(src)) = (whole, src) {
                if self.copy_page(uffd, region, off, src, page) {
                    buf.bitmap().mark_dirty(at, page as usize);
                    at += page as usize;
                    continue;
                }
            }
            // Up to the next page boundary through the mapping (a fault
            // zero-fills the page first), as a plain read would.
            let n = (len - at).min((page - off % page) as usize);
            self.file
                .seek(SeekFrom::Start(start + at as u64))
                .map_err(io)?;
            let part = buf.subslice(at, n)?;
            let mut got = 0;
            while got < n {
                let m = self.file.read_volatile(&mut part.offset(got)?)?;
                if m == 0 {
                    break;
                }
                got += m;
            }
            self.read += got as u64;
            at += got;
            if got < n {
                return Ok(at);
            }
        }
        self.file
            .seek(SeekFrom::Start(start + at as u64))
            .map_err(io)?;
        Ok(at)
    }

    /// Installs the page at `offset` of `region` from `src` (`page`
    /// readable bytes) through `uffd` under the install lock, as the fault
    /// handler would; false if the page is present already or the kernel
    /// refuses.
    fn copy_page(
        &mut self,
        uffd: RawFd,
        region: &Region,
        offset: u64,
        src: *const u8,
        page: u64,
    ) -> bool {
        let _install = region.backing().generation().lock_install();
        // SAFETY: src points at `page` bytes of a live read-only mapping of
        // the image inside its file size (SourceMap::page_at); the
        // destination is a whole page inside the region's registered
        // mapping (copy_destination checked it lies below the backed size).
        let out = unsafe { ioctl::copy(uffd, region.host_addr() + offset, src, page) };
        if out.done < page {
            // EEXIST: an earlier segment's partial page is there already.
            log::trace!(
                "placing {offset:#x}+{page:#x} by UFFDIO_COPY: {:?}",
                out.errno.map(io::Error::from_raw_os_error)
            );
            return false;
        }
        self.copied += page;
        // As after a splice: contents now, not owed zero.
        region
            .discarded()
            .clear_range(offset / page, (offset + page) / page);
        true
    }

    /// The region and region offset of `len` bytes of guest memory at host
    /// address `ptr`, when they can be written through the backing file.
    fn destination(&self, ptr: u64, len: u64) -> Option<(&'m Region, u64)> {
        let (region, offset) = self.region_at(ptr, len)?;
        let writable = !region.is_private() && region.backing().kind() != BackingKind::Hugetlbfs;
        writable.then_some((region, offset))
    }

    fn pipe(&mut self) -> io::Result<(RawFd, RawFd, usize)> {
        if self.pipe.is_none() {
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two descriptors into the array it is given.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just created and are owned here.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: F_SETPIPE_SZ/F_GETPIPE_SZ on our own pipe; a refusal
            // (pipe-max-size) leaves the default size, which is read back.
            let cap = unsafe {
                libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
                libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
            };
            let cap = usize::try_from(cap).ok().filter(|&c| c > 0).unwrap_or(4096);
            self.pipe = Some((r, w, cap));
        }
        let (r, w, cap) = self.pipe.as_ref().expect("just made");
        Ok((r.as_raw_fd(), w.as_raw_fd(), *cap))
    }

    /// Moves up to `len` bytes from the file's position to `dst_off` in the
    /// backing file `dst`; returns how many (0 at the end of the file).
    fn splice_into(&mut self, dst: RawFd, dst_off: u64, len: usize) -> io::Result<usize> {
        let start = self.file.stream_position()?;
        let (r, w, cap) = self.pipe()?;
        let mut off_in = i64::try_from(start).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: splice between descriptors we hold open; the offset
        // pointer refers to a local that outlives the call.
        let n = unsafe {
            libc::splice(
                self.file.as_raw_fd(),
                &mut off_in,
                w,
                std::ptr::null_mut(),
                len.min(cap),
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let mut off_out = i64::try_from(dst_off).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut left = n;
        while left > 0 {
            // SAFETY: as above.
            let m = unsafe {
                libc::splice(
                    r,
                    std::ptr::null_mut(),
                    dst,
                    &mut off_out,
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            if m <= 0 {
                let err = if m < 0 {
                    io::Error::last_os_error()
                } else {
                    io::ErrorKind::WriteZero.into()
                };
                // The pipe may still hold bytes: drop it. Nothing was
                // consumed from the file (its position is unchanged), so a
                // caller may read the same bytes another way.
                self.pipe = None;
                if left < n {
                    // Part of the chunk landed: report that much.
                    break;
                }
                return Err(err);
            }
            left -= m as usize;
        }
        let done = n - left;
        self.file.seek(SeekFrom::Start(start + done as u64))?;
        Ok(done)
    }
}

/// A read-only mapping of `len` bytes of an image file from `start`, the
/// source of `UFFDIO_COPY`; unmapped on drop.
struct SourceMap {
    base: *mut libc::c_void,
    map_len: usize,
    /// `start` minus the page-aligned offset the mapping begins at.
    lead: u64,
    /// Bytes from `start` that lie inside the file.
    avail: u64,
}

impl SourceMap {
    /// `None` when the file cannot be mapped (the caller reads instead).
    fn new(file: &File, start: u64, len: u64, file_len: u64) -> Option<SourceMap> {
        let avail = len.min(file_len.checked_sub(start)?);
        let lead = start % 4096;
        let map_len = usize::try_from(lead + avail).ok()?;
        if avail == 0 {
            return None;
        }
        // SAFETY: a new private read-only mapping of a file we hold open;
        // the kernel picks the address, so nothing else is overlapped.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                file.as_raw_fd(),
                i64::try_from(start - lead).ok()?,
            )
        };
        (base != libc::MAP_FAILED).then_some(SourceMap {
            base,
            map_len,
            lead,
            avail,
        })
    }

    /// The source of the `page` bytes at `at` past the start, if they lie
    /// inside the file and the address is page-aligned (`UFFDIO_COPY`
    /// wants that).
    fn page_at(&self, at: u64, page: u64) -> Option<*const u8> {
        let pos = self.lead + at;
        (at + page <= self.avail && pos % 4096 == 0)
            // SAFETY: pos + page <= lead + avail = map_len: inside the mapping.
            .then(|| unsafe { self.base.cast::<u8>().add(pos as usize) }.cast_const())
    }
}

impl Drop for SourceMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(), unmapped once; no pointer into
        // it outlives the place_by_copy call that owns this.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}

/// Errors that mean "this file cannot be written by splice", not "the write
/// failed": the caller falls back to the mapping.
fn splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EBADF)
    )
}

impl Drop for ImageFile<'_> {
    fn drop(&mut self) {
        log::debug!(
            "image placed: {} bytes through the backing file ({} huge pages filled first), \
             {} copied in by userfaultfd, {} read",
            self.spliced,
            self.prefilled,
            self.copied,
            self.read
        );
    }
}

impl Read for ImageFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl Seek for ImageFile<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for ImageFile<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let ptr = buf.ptr_guard_mut().as_ptr() as u64;
        let len = buf.len();
        if let Some((region, offset, uffd)) = self.copy_destination(ptr, len as u64) {
            return self.place_by_copy(region, offset, uffd, buf);
        }
        let dst = self
            .splice_ok
            .then(|| self.destination(ptr, len as u64))
            .flatten();
        if let Some((region, offset)) = dst {
            {
                let install = region.backing().generation().lock_install();
                self.prefilled += region.prefill_huge(&install, offset, len as u64);
            }
            let fd = region.backing().file().as_raw_fd();
            let off = region.file_offset() + offset;
            // Fill the whole slice, as one read(2) of a regular file would:
            // vm-memory's GuestMemory takes a short count for an error.
            let mut done = 0;
            let result = loop {
                if done == len {
                    break Ok(done);
                }
                match self.splice_into(fd, off + done as u64, len - done) {
                    Ok(0) => break Ok(done),
                    Ok(n) => done += n,
                    Err(e) if done > 0 => {
                        log::debug!("placing an image by splice stopped after {done} bytes: {e}");
                        break Ok(done);
                    }
                    Err(e) => break Err(e),
                }
            };
            match result {
                Ok(n) => {
                    buf.bitmap().mark_dirty(0, n);
                    self.spliced += n as u64;
                    // Those pages hold contents now, as if the guest had
                    // written them: no longer owed zero, and readahead may
                    // run over them again.
                    let page = region.page_size();
                    let end = (offset + n as u64).div_ceil(page);
                    let _install = region.backing().generation().lock_install();
                    region.discarded().clear_range(offset / page, end);
                    return Ok(n);
                }
                Err(e) if splice_unsupported(&e) => {
                    self.splice_ok = false;
                    log::debug!("placing an image by splice failed ({e}); reading it instead");
                }
                Err(e) => return Err(VolatileMemoryError::IOError(e)),
            }
        }
        let n = self.file.read_volatile(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}
