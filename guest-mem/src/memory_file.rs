//! Saving guest memory to a sparse memory file, for snapshots.
//!
//! Every distinct backing file is copied into one memory file, each at its
//! own page-aligned base, extent by extent as `SEEK_DATA`/`SEEK_HOLE` find
//! them: a page that is a hole in guest memory (never touched, given back
//! to the balloon, unplugged) stays a hole in the memory file, and so does
//! a page that holds only zeros, so a 1 GiB guest using 200 MiB writes at
//! most about 200 MiB. The layout says where each
//! region's bytes are, so that a restore serves region `i` from
//! `FileSource` at `regions[i].offset` (a hole there reads zero).
//!
//! A region served from a page source (a VM restored lazily, or memory
//! with synthetic first-touch contents) has its untouched pages in the
//! source, not the file: those are fetched from the source and saved too,
//! except pages given back (discarded), which stay holes.
//!
//! The memory must not change while it is saved (the VM paused). Private
//! (copy-on-write) regions are refused: their contents live in the VMM's
//! private copies, not in the file.
//!
//! ```
//! use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
//! use guest_mem::{memory_file, FileSource, GuestMem, RegionConfig, RegionSource};
//! use std::sync::Arc;
//!
//! # let dir = std::env::temp_dir().join(format!("guest-mem-save-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("memory");
//! let mem = GuestMem::builder().region(RegionConfig::new(0, 64 << 20)).build()?;
//! mem.memory().memory().write_obj(0x5eed_u64, GuestAddress(0x10_0000)).unwrap();
//! let layout = memory_file::save(&mem, &path)?;
//! assert!(layout.bytes_written < 1 << 20, "64 MiB of mostly holes");
//!
//! // Restore lazily from it.
//! let mut ram = RegionConfig::new(0, 64 << 20);
//! ram.source = Some(RegionSource {
//!     source: Arc::new(FileSource::open(&path).unwrap()),
//!     offset: layout.regions[0].offset,
//! });
//! let restored = GuestMem::builder().region(ram).build()?;
//! let v: u64 = restored.memory().memory().read_obj(GuestAddress(0x10_0000)).unwrap();
//! assert_eq!(v, 0x5eed);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), guest_mem::Error>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::backing::BackingFile;
use crate::{Error, GuestMem, Result};

/// Where one region's bytes are in the memory file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedRegion {
    /// Guest-physical address of the region.
    pub guest_addr: u64,
    /// Bytes of the region that were backed (its backed size).
    pub size: u64,
    /// Offset of the region's first byte in the memory file.
    pub offset: u64,
}

/// What [`save`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedLayout {
    /// One entry per region, in the memory's order.
    pub regions: Vec<SavedRegion>,
    /// The memory file's length (holes included).
    pub file_len: u64,
    /// Bytes of data written (what is not a hole: pages that hold
    /// something other than zeros).
    pub bytes_written: u64,
}

/// The data extents of `[0, len)` of `fd`, from SEEK_DATA/SEEK_HOLE.
fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek on an open descriptor has no memory effects.
        let data = unsafe { libc::lseek64(fd, at as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `at`
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek64(fd, data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = (hole as u64).min(len);
        out.push((data, end - data));
        at = end;
    }
    Ok(out)
}

/// Copies `[off, off + len)` of `from` to `dst` in `to`, leaving pages that
/// read all zero as holes (pages the fault handler zero-filled, readahead
/// included, are data to SEEK_DATA but nothing to save). Returns the bytes
/// written.
fn copy_range(from: &File, to: &File, off: u64, dst: u64, len: u64) -> io::Result<u64> {
    const PAGE: usize = 4096;
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    let mut written = 0u64;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        from.read_exact_at(&mut buf[..n], off + done)?;
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                to.write_all_at(page, dst + done + (i * PAGE) as u64)?;
                written += page.len() as u64;
            }
        }
        done += n as u64;
    }
    Ok(written)
}

/// Saves the pages of `region` that are in neither its file nor its
/// discard map from its source, to `dst` + region offset in `to`.
fn copy_unfetched(
    region: &crate::Region,
    src: &crate::RegionSource,
    to: &File,
    dst: u64,
) -> io::Result<u64> {
    let page = region.page_size();
    let backed = region.backed_size();
    let file = region.backing().file();
    let first = region.file_offset();
    // The holes of the region's part of its file, in region offsets.
    let mut holes = Vec::new();
    let mut at = 0;
    for (off, n) in data_extents(file, first + backed)? {
        let (start, end) = (off.max(first) - first, (off + n).max(first) - first);
        if start > at {
            holes.push((at, start));
        }
        at = at.max(end);
    }
    if at < backed {
        holes.push((at, backed));
    }
    let mut buf = vec![0u8; page as usize];
    let mut written = 0;
    for (start, end) in holes {
        if src.source.is_zero(src.offset + start, end - start) {
            continue;
        }
        for off in (start..end).step_by(page as usize) {
            if region.is_discarded(off) || src.source.is_zero(src.offset + off, page) {
                continue;
            }
            src.source.fetch(src.offset + off, &mut buf)?;
            if buf.iter().any(|&b| b != 0) {
                to.write_all_at(&buf, dst + off)?;
                written += page;
            }
        }
    }
    Ok(written)
}

/// Writes every backing file of `mem` into a new sparse memory file at
/// `path` (created; an existing file is refused) and returns where each
/// region is in it.
pub fn save(mem: &GuestMem, path: &Path) -> Result<SavedLayout> {
    let io_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(r) = mem.regions().iter().find(|r| r.is_private()) {
        return Err(Error::Config(format!(
            "region {} is a private mapping: its contents are not in its file",
            r.index()
        )));
    }
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    // Each distinct backing file once, at a page-aligned base.
    let mut files: Vec<(Arc<BackingFile>, u64)> = Vec::new();
    let mut next = 0u64;
    let mut written = 0u64;
    for r in mem.regions() {
        if files.iter().any(|(f, _)| Arc::ptr_eq(f, r.backing())) {
            continue;
        }
        let f = r.backing().clone();
        let len = f.size();
        for (off, n) in data_extents(f.file(), len).map_err(io_err)? {
            written += copy_range(f.file(), &out, off, next + off, n).map_err(io_err)?;
        }
        files.push((f, next));
        next += len.next_multiple_of(1 << 21);
    }
    for r in mem.regions() {
        let Some(src) = &r.source else { continue };
        let base = files
            .iter()
            .find(|(f, _)| Arc::ptr_eq(f, r.backing()))
            .map_or(0, |(_, b)| *b);
        written += copy_unfetched(r, src, &out, base + r.file_offset()).map_err(io_err)?;
    }
    out.set_len(next).map_err(io_err)?;
    out.sync_all().map_err(io_err)?;
    let regions = mem
        .regions()
        .iter()
        .map(|r| {
            let base = files
                .iter()
                .find(|(f, _)| Arc::ptr_eq(f, r.backing()))
                .map_or(0, |(_, b)| *b);
            SavedRegion {
                guest_addr: r.guest_base().0,
                size: r.backed_size(),
                offset: base + r.file_offset(),
            }
        })
        .collect();
    Ok(SavedLayout {
        regions,
        file_len: next,
        bytes_written: written,
    })
}

/// Fills each region of `mem` with its saved bytes from the memory file at
/// `path` (the eager counterpart of serving it as a `FileSource`):
/// `regions[i]` says where region `i`'s bytes are. Only the memory file's
/// data extents are read and only pages holding something are written, so
/// holes stay holes. Run it before the memory is touched: the pages go
/// into the backing files' page cache, where the guest then finds them
/// without a fault. Returns the bytes written.
pub fn load(mem: &GuestMem, path: &Path, regions: &[SavedRegion]) -> Result<u64> {
    let io_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    if regions.len() != mem.regions().len() {
        return Err(Error::Config(format!(
            "the memory file describes {} regions, the memory has {}",
            regions.len(),
            mem.regions().len()
        )));
    }
    let from = File::open(path).map_err(io_err)?;
    let file_len = from.metadata().map_err(io_err)?.len();
    let extents = data_extents(&from, file_len).map_err(io_err)?;
    let mut written = 0;
    for (region, saved) in mem.regions().iter().zip(regions) {
        if saved.size > region.backed_size() {
            return Err(Error::Config(format!(
                "region {}: {:#x} saved bytes do not fit its {:#x}",
                region.index(),
                saved.size,
                region.backed_size()
            )));
        }
        let (start, end) = (saved.offset, saved.offset + saved.size);
        let to = region.backing().file();
        for &(off, n) in &extents {
            let (a, b) = (off.max(start), (off + n).min(end));
            if a < b {
                let dst = region.file_offset() + (a - start);
                written += copy_range(&from, to, a, dst, b - a).map_err(io_err)?;
            }
        }
    }
    Ok(written)
}
