//! A peer that behaves as Firecracker does when it restores a snapshot with
//! `mem_backend` `"Uffd"`: it maps its guest memory anonymously, creates a
//! userfaultfd with `EVENT_REMOVE`, registers every region, connects to the
//! handler's socket and sends the regions as JSON with the descriptor in
//! `SCM_RIGHTS`. Like Firecracker it keeps the socket open for its
//! lifetime: dropping it (or [`FirecrackerLike::hang_up`]) is the exit the
//! handler sees.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

/// The word the memory file holds at byte offset `off` (8-aligned): never
/// zero, and different at every offset.
pub fn file_word(off: u64) -> u64 {
    off ^ 0xf11e_0000_0000_0000
}

/// A memory file of `len` bytes holding [`file_word`] everywhere.
pub fn memory_file(path: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        for (i, w) in chunk[..n].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&file_word(at + i as u64 * 8).to_le_bytes());
        }
        f.write_all(&chunk[..n])?;
        at += n as u64;
    }
    f.flush()
}

/// One region of the peer's guest memory.
#[derive(Clone, Copy, Debug)]
pub struct PeerRegion {
    /// Where it is mapped here.
    pub host: u64,
    /// Bytes.
    pub size: u64,
    /// Where its contents are in the memory file.
    pub offset: u64,
}

/// The Firecracker-like peer.
pub struct FirecrackerLike {
    /// Its regions; offsets follow one another from 0, as Firecracker's do.
    pub regions: Vec<PeerRegion>,
    /// Page size of every region.
    pub page_size: u64,
    /// Its own copy of the userfaultfd (Firecracker keeps one too).
    pub uffd: Uffd,
    stream: Option<UnixStream>,
}

impl FirecrackerLike {
    /// Maps regions of `sizes` bytes (on hugetlb if `page_size` is 2 MiB),
    /// creates the userfaultfd with `features` (at least `EVENT_REMOVE`) and
    /// registers them.
    pub fn new(sizes: &[u64], page_size: u64, features: FeatureFlags) -> std::io::Result<Self> {
        let uffd = UffdBuilder::new()
            .require_features(FeatureFlags::EVENT_REMOVE | features)
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| std::io::Error::other(format!("creating the userfaultfd: {e}")))?;
        let mut regions = Vec::new();
        let mut offset = 0;
        for &size in sizes {
            let host = map_anonymous(size, page_size)?;
            regions.push(PeerRegion { host, size, offset });
            uffd.register(host as *mut _, size as usize)
                .map_err(|e| std::io::Error::other(format!("registering: {e}")))?;
            offset += size;
        }
        Ok(FirecrackerLike {
            regions,
            page_size,
            uffd,
            stream: None,
        })
    }

    /// The handshake body Firecracker sends (both page size fields).
    pub fn body(&self) -> String {
        let items: Vec<String> = self
            .regions
            .iter()
            .map(|r| {
                format!(
                    r#"{{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{},"page_size_kib":{}}}"#,
                    r.host, r.size, r.offset, self.page_size, self.page_size
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    /// Connects to the handler and sends the handshake with the descriptor.
    pub fn connect(&mut self, socket: &Path) -> std::io::Result<()> {
        let stream = UnixStream::connect(socket)?;
        send(&stream, self.body().as_bytes(), Some(self.uffd.as_raw_fd()))?;
        self.stream = Some(stream);
        Ok(())
    }

    /// Closes the socket, as Firecracker's exit does.
    pub fn hang_up(&mut self) {
        self.stream = None;
    }

    /// The word at host address `addr` (faults it in through the handler).
    pub fn read(&self, addr: u64) -> u64 {
        assert!(self.contains(addr, 8), "{addr:#x} is not guest memory");
        // SAFETY: addr..addr+8 lies in one of our live mappings (checked
        // above); a volatile read of a u64 that the handler may be
        // installing concurrently is what a vCPU does too.
        unsafe { std::ptr::read_volatile(addr as *const u64) }
    }

    /// `MADV_DONTNEED` over `[addr, addr + len)`, as Firecracker's balloon
    /// does: the handler gets `UFFD_EVENT_REMOVE`, and the call returns
    /// once it has read it.
    pub fn remove(&self, addr: u64, len: u64) -> std::io::Result<()> {
        assert!(
            self.contains(addr, len),
            "{addr:#x}+{len:#x} is not guest memory"
        );
        // SAFETY: the range is inside our own mapping; dropping pages of
        // guest memory is what the balloon does, and nothing holds a
        // reference into it (reads go through `read`).
        if unsafe { libc::madvise(addr as *mut _, len as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The file offset of host address `addr`.
    pub fn file_offset(&self, addr: u64) -> u64 {
        let r = self
            .regions
            .iter()
            .find(|r| addr >= r.host && addr < r.host + r.size)
            .expect("a guest address");
        r.offset + (addr - r.host)
    }

    fn contains(&self, addr: u64, len: u64) -> bool {
        self.regions
            .iter()
            .any(|r| addr >= r.host && addr + len <= r.host + r.size)
    }
}

impl Drop for FirecrackerLike {
    fn drop(&mut self) {
        self.stream = None;
        for r in &self.regions {
            // Unregistered first: with EVENT_UNMAP, munmap would wait for a
            // handler that may be gone to read the event.
            let _ = self.uffd.unregister(r.host as *mut _, r.size as usize);
            // SAFETY: the mappings made in `new`; nothing points into them
            // once the peer is dropped.
            unsafe { libc::munmap(r.host as *mut _, r.size as usize) };
        }
    }
}

/// Sends `body` on `stream` with `fd` attached, or without any.
pub fn send(stream: &UnixStream, body: &[u8], fd: Option<i32>) -> std::io::Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    match fd {
        Some(fd) => stream
            .send_with_fd(body, fd)
            .map(|_| ())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno())),
        None => std::io::Write::write_all(&mut &*stream, body),
    }
}

fn map_anonymous(size: u64, page_size: u64) -> std::io::Result<u64> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if page_size == 2 << 20 {
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    }
    // SAFETY: a fresh anonymous mapping at an address the kernel picks;
    // unmapped in Drop.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p as u64)
}

const POOL: &str = "/proc/sys/vm/nr_hugepages";

/// Puts the huge page pool back the way it was found.
pub struct PoolGuard(Option<u64>);

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Some(total) = self.0 {
            let _ = std::fs::write(POOL, total.to_string());
        }
    }
}

/// Makes sure `pages` 2 MiB huge pages are free, reserving more when
/// allowed; `None` (with the reason printed) when they cannot be had.
pub fn reserve_huge_pages(pages: u64) -> Option<PoolGuard> {
    let free = guest_mem::backing::free_huge_pages(2 << 20).unwrap_or(0);
    if free >= pages {
        return Some(PoolGuard(None));
    }
    let total: u64 = std::fs::read_to_string(POOL)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if std::fs::write(POOL, (total + pages - free).to_string()).is_err() {
        eprintln!("{pages} free 2 MiB huge pages needed and {POOL} is not writable");
        return None;
    }
    let guard = PoolGuard(Some(total));
    if guest_mem::backing::free_huge_pages(2 << 20).unwrap_or(0) < pages {
        eprintln!("the kernel could not reserve {pages} 2 MiB huge pages");
        return None;
    }
    Some(guard)
}
