//! Where page contents come from when a fault is served.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A source of page contents for the fault handler.
///
/// `fetch` may be slow (disk, decompression, network) and is called with no
/// lock held; the truncate generation decides afterwards whether what it
/// returned may still be installed.
pub trait PageSource: Send + Sync + Debug {
    /// The source's length in bytes, or `None` when it has no end.
    fn size(&self) -> Option<u64>;

    /// Whether `[offset, offset + len)` is known to be all zero, so that the
    /// handler may install zero pages without fetching anything.
    fn is_zero(&self, offset: u64, len: u64) -> bool;

    /// Fills `buf` with the contents at `offset`; bytes past the source's end
    /// read as zero.
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// How many of the `len` bytes from `offset` come before the source's
    /// next hole (a range known to read zero): the part of a readahead
    /// window worth installing, so that a restore keeps a sparse image
    /// sparse. The default, for a source that cannot tell: all of them.
    fn data_len(&self, offset: u64, len: u64) -> u64 {
        let _ = offset;
        len
    }
}

/// Every page reads as zero: fresh guest memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn size(&self) -> Option<u64> {
        None
    }
    fn is_zero(&self, _offset: u64, _len: u64) -> bool {
        true
    }
    fn fetch(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// Page contents read from a file: a memory image restored lazily.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Opens the image at `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_file(File::open(path)?)
    }

    /// Uses an already open file.
    pub fn from_file(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl PageSource for FileSource {
    fn size(&self) -> Option<u64> {
        Some(self.len)
    }

    fn is_zero(&self, offset: u64, len: u64) -> bool {
        if offset >= self.len {
            return true;
        }
        // A hole in a sparse image (a page the guest never had) reads zero
        // without reading anything.
        // SAFETY: lseek on an open descriptor has no memory effects.
        let data = unsafe {
            libc::lseek64(
                std::os::unix::io::AsRawFd::as_raw_fd(&self.file),
                offset as i64,
                libc::SEEK_DATA,
            )
        };
        if data < 0 {
            // ENXIO: no data past `offset`; anything else: read to be sure.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        data as u64 >= offset.saturating_add(len)
    }

    fn data_len(&self, offset: u64, len: u64) -> u64 {
        if offset >= self.len {
            return 0;
        }
        // SAFETY: lseek on an open descriptor has no memory effects.
        let hole = unsafe {
            libc::lseek64(
                std::os::unix::io::AsRawFd::as_raw_fd(&self.file),
                offset as i64,
                libc::SEEK_HOLE,
            )
        };
        if hole < 0 {
            return len; // cannot tell: all of it
        }
        (hole as u64).saturating_sub(offset).min(len)
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            if pos >= self.len {
                break;
            }
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_source_zero_fills_past_its_end() {
        let mut f = tempfile();
        f.write_all(&[7u8; 6000]).unwrap();
        let src = FileSource::from_file(f).unwrap();
        assert_eq!(src.size(), Some(6000));
        let mut buf = vec![1u8; 8192];
        src.fetch(4096, &mut buf).unwrap();
        assert!(buf[..1904].iter().all(|&b| b == 7));
        assert!(buf[1904..].iter().all(|&b| b == 0));
        assert!(src.is_zero(8192, 4096));
        assert!(!src.is_zero(4096, 4096));
    }

    #[test]
    fn file_source_data_len_stops_at_the_next_hole() {
        let f = tempfile();
        // Data in [0, 8 KiB) and [64 KiB, 68 KiB); a hole between.
        f.write_all_at(&[1u8; 8192], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 64 << 10).unwrap();
        let src = FileSource::from_file(f).unwrap();
        assert_eq!(src.data_len(0, 1 << 20), 8192);
        assert_eq!(src.data_len(4096, 1 << 20), 4096);
        assert_eq!(src.data_len(0, 4096), 4096, "no more than asked");
        assert_eq!(src.data_len(16 << 10, 4096), 0, "in the hole");
        assert_eq!(
            src.data_len(64 << 10, 1 << 20),
            4096,
            "to the end of the file"
        );
        assert_eq!(src.data_len(1 << 20, 4096), 0, "past the end");
    }

    fn tempfile() -> File {
        crate::backing::memfd_file("src-test", false).unwrap()
    }
}
