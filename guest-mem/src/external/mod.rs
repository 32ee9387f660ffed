//! Serving another process's guest memory: its userfaultfd and a table of
//! its regions, with contents from a [`PageSource`].
//!
//! This is the fault handler of [`GuestMem`](crate::GuestMem) run over
//! memory this process did not map — the external page-fault handler of a
//! VMM such as Firecracker restoring a snapshot (`mem_backend`
//! `"Uffd"`). The other process maps its guest memory, registers it with a
//! userfaultfd and hands the descriptor over with where each region starts
//! in the memory file. Faults are served as in-process ones are: sample the
//! memory file's truncate generation, fetch (with adaptive readahead), take
//! the install lock, re-check, install.
//!
//! The events the userfaultfd sends besides faults are the other process's
//! changes to that memory, and are applied as such:
//! - **remove** (`MADV_DONTNEED`: a balloon inflating, memory unplugged) is
//!   one invalidation of the generation that marks the pages removed in
//!   the file's discard map: from then on they are served as zero pages,
//!   readahead stops short of them, and a fault whose contents were fetched
//!   before the event was read drops them (it installs zero, or the pages
//!   the removal did not touch);
//! - **unmap** and **remap** take ranges out of the table or move them;
//! - an install the kernel holds back (`EAGAIN`: an event is pending) reads
//!   the pending events first, then checks its contents against them
//!   again, so a handler never spins on `EAGAIN` while the event that
//!   causes it waits to be read.
//!
//! Every event of one read is applied before any fault of that read is
//! served (the kernel hands out faults first, so a fault read along with a
//! remove may be its causal successor), and a thread holds the event gate
//! from a read to the application of its events, so no install slips in
//! between.
//!
//! The service ends when the other process goes away: the watched socket
//! hangs up, or the userfaultfd does.
//!
//! ```no_run
//! use std::os::fd::OwnedFd;
//! use std::os::unix::net::UnixStream;
//! use std::sync::Arc;
//! use guest_mem::external::{ExternalMemory, ExternalRegion};
//! use guest_mem::{FaultConfig, FileSource, Readahead};
//!
//! # fn handshake(_: &UnixStream) -> (Vec<ExternalRegion>, OwnedFd) { unimplemented!() }
//! let peer = UnixStream::connect("/run/peer.sock")?;
//! // What the other process sent: its regions and its userfaultfd.
//! let (regions, uffd): (Vec<ExternalRegion>, OwnedFd) = handshake(&peer);
//! let handler = ExternalMemory::new(regions, Arc::new(FileSource::open("snapshot.mem")?))
//!     .fault_config(FaultConfig { readahead: Readahead::default(), ..FaultConfig::default() })
//!     .watch(peer.into())
//!     .serve(uffd)?;
//! let ended = handler.wait(); // until the peer hangs up
//! println!("{}: {}", ended.reason, ended.stats);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A complete round trip (the regions of this very process, so that the
//! example runs) is in the [`ExternalMemory`] documentation.

mod check;
pub use check::overlap;
mod table;

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::Uffd;
use vmm_sys_util::eventfd::EventFd;

use crate::fault::run::{self, Stopped};
use crate::fault::{Context, FaultConfig, FaultFailure};
use crate::generation::TruncateGen;
use crate::pagemap::PageBits;
use crate::source::PageSource;
use crate::stats::{Stats, StatsSnapshot};
use crate::{Error, Result};
use table::{PeerFile, PeerRegions};

/// Largest memory file a discard map is made for (bits are one per page).
const MAX_FILE_PAGES: u64 = 1 << 32;

/// One region of the other process's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExternalRegion {
    /// Where the other process mapped it, in its address space.
    pub host_addr: u64,
    /// Bytes (whole pages).
    pub size: u64,
    /// Where its contents start in the page source (the memory file).
    pub offset: u64,
    /// 4 KiB, or 2 MiB for hugetlbfs; one page size for all regions.
    pub page_size: u64,
}

/// Another process's memory to serve: its regions, the page source, the
/// fault handler's settings and, optionally, a socket whose hang-up ends
/// the service.
///
/// A round trip within one process (root, or access to userfaultfd):
///
/// ```
/// use std::io::Write;
/// use std::os::fd::AsFd;
/// use std::sync::Arc;
/// use guest_mem::external::{ExternalMemory, ExternalRegion};
/// use guest_mem::FileSource;
/// use userfaultfd::{FeatureFlags, UffdBuilder};
///
/// // A memory file of 1 MiB whose page 3 holds a marker.
/// let mut image = tempfile();
/// image.write_all(&vec![0u8; 3 * 4096]).unwrap();
/// image.write_all(b"saved state").unwrap();
/// image.set_len(1 << 20).unwrap();
///
/// // What the other process does: map, create the userfaultfd, register.
/// let len = 1usize << 20;
/// // SAFETY: a fresh anonymous mapping, unmapped at the end.
/// let mem = unsafe {
///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
/// };
/// assert_ne!(mem, libc::MAP_FAILED);
/// let uffd = UffdBuilder::new()
///     .require_features(FeatureFlags::EVENT_REMOVE)
///     .close_on_exec(true)
///     .non_blocking(true)
///     .user_mode_only(false)
///     .create()
///     .unwrap();
/// uffd.register(mem, len).unwrap();
///
/// // The handler: the region table, the source, the descriptor.
/// let region = ExternalRegion { host_addr: mem as u64, size: len as u64, offset: 0, page_size: 4096 };
/// // The other process sends a copy of the descriptor and keeps its own.
/// let fd = uffd.as_fd().try_clone_to_owned()?;
/// let handler = ExternalMemory::new(vec![region], Arc::new(FileSource::from_file(image)?))
///     .serve(fd)?;
///
/// // SAFETY: page 3 of the mapping; the handler serves the fault.
/// let marker = unsafe { std::slice::from_raw_parts((mem as *const u8).add(3 * 4096), 11) };
/// assert_eq!(marker, b"saved state");
/// // Given back (a balloon inflating): it reads zero from then on.
/// // SAFETY: page 3 of the mapping, which no reference points into now.
/// assert_eq!(unsafe { libc::madvise((mem as *mut u8).add(3 * 4096).cast(), 4096, libc::MADV_DONTNEED) }, 0);
/// // SAFETY: as above.
/// assert_eq!(unsafe { *(mem as *const u8).add(3 * 4096) }, 0);
/// let stats = handler.stop().stats;
/// assert_eq!(stats.pages_removed, 1);
/// // SAFETY: the mapping made above; nothing points into it any more.
/// unsafe { libc::munmap(mem, len) };
/// # fn tempfile() -> std::fs::File { guest_mem::backing::memfd_file("doc", false).unwrap() }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ExternalMemory {
    regions: Vec<ExternalRegion>,
    source: Arc<dyn PageSource>,
    fault: FaultConfig,
    watch: Option<OwnedFd>,
}

impl ExternalMemory {
    /// The regions, served from `source` (region contents start at their
    /// `offset` in it), with the default fault handler settings.
    pub fn new(regions: Vec<ExternalRegion>, source: Arc<dyn PageSource>) -> Self {
        ExternalMemory {
            regions,
            source,
            fault: FaultConfig::default(),
            watch: None,
        }
    }

    /// Sets the fault handler settings (`mode` and `minor_faults` do not
    /// apply: the other process chose how it registered).
    pub fn fault_config(mut self, fault: FaultConfig) -> Self {
        self.fault = fault;
        self
    }

    /// Ends the service when `peer` hangs up (the other process's
    /// connection: it exited). The handler keeps it open while it serves.
    pub fn watch(mut self, peer: OwnedFd) -> Self {
        self.watch = Some(peer);
        self
    }

    /// Checks the regions and the descriptor and starts serving.
    pub fn serve(self, uffd: OwnedFd) -> Result<ExternalHandler> {
        self.fault.validate()?;
        let page = check::regions(&self.regions, self.source.size())?;
        let pages = self
            .regions
            .iter()
            .map(|r| (r.offset + r.size) / page)
            .max()
            .unwrap_or(0);
        if pages > MAX_FILE_PAGES {
            return Err(Error::External(format!(
                "the regions reach {pages} pages into the memory file; at most \
                 {MAX_FILE_PAGES} are served"
            )));
        }
        check::userfaultfd(&uffd)?;
        let file = Arc::new(PeerFile {
            gen: TruncateGen::new(),
            discarded: PageBits::new(pages),
            page_size: page,
            source: self.source,
        });
        // SAFETY: into_raw_fd gives up the only owner of a descriptor just
        // checked to be a userfaultfd; the Uffd owns it from here on.
        let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
        let table = PeerRegions::new(&self.regions, file);
        let ctx = Arc::new(Context::new(
            uffd,
            table,
            Arc::new(Stats::default()),
            self.fault,
        )?);
        let mut handler = ExternalHandler {
            ctx: ctx.clone(),
            stop: Arc::new(EventFd::new(libc::EFD_CLOEXEC).map_err(Error::Eventfd)?),
            threads: Vec::new(),
            end: Arc::new(Mutex::new(None)),
            watch: self.watch,
        };
        let watch_fd = handler.watch.as_ref().map(|f| f.as_raw_fd());
        for i in 0..ctx.config.threads {
            let (ctx, stop, end) = (ctx.clone(), handler.stop.clone(), handler.end.clone());
            let t = std::thread::Builder::new()
                .name(format!("uffd-peer-{i}"))
                .spawn(move || {
                    let started = match &ctx.config.on_thread_start {
                        Some(hook) => hook.call(),
                        None => Ok(()),
                    };
                    let stopped = match started {
                        Ok(()) => run::run(&ctx, stop.as_raw_fd(), watch_fd),
                        Err(e) => Stopped::Failed(format!("its start hook failed: {e}")),
                    };
                    let why = match stopped {
                        Stopped::Asked => return,
                        Stopped::PeerGone(why) => why,
                        Stopped::Failed(why) => {
                            if !ctx.stopping.load(Ordering::Acquire) {
                                ctx.failure.report(format!(
                                    "fault handler thread uffd-peer-{i} stopped ({why}): \
                                     faults are no longer served"
                                ));
                            }
                            format!("a handler thread failed: {why}")
                        }
                    };
                    end.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert(why);
                    // The others stop too: nothing is served any more.
                    let _ = stop.write(1);
                })
                .map_err(Error::Thread)?;
            handler.threads.push(t);
        }
        Ok(handler)
    }
}

/// How the service of another process's memory ended.
#[derive(Clone, Debug)]
pub struct Ended {
    /// Why: the peer hung up, the handler was asked to stop, or failed.
    pub reason: String,
    /// The counters at the end.
    pub stats: StatsSnapshot,
}

/// Serving another process's memory: its handler threads.
///
/// Dropping it (or [`stop`](Self::stop)) stops serving but leaves the
/// ranges registered: the other process's next fault then waits rather
/// than reading memory that is not its own.
pub struct ExternalHandler {
    ctx: Arc<Context<PeerRegions>>,
    stop: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    end: Arc<Mutex<Option<String>>>,
    watch: Option<OwnedFd>,
}

impl std::fmt::Debug for ExternalHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalHandler")
            .field("regions", &self.regions())
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl ExternalHandler {
    /// The counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.ctx.stats.snapshot()
    }

    /// The counters once every fault read so far has finished its
    /// bookkeeping (which runs just after the faulting thread is woken), or
    /// at `timeout`.
    pub fn settled_stats(&self, timeout: std::time::Duration) -> StatsSnapshot {
        self.ctx.stats.settled(timeout)
    }

    /// Where failures to serve faults are reported.
    pub fn failure(&self) -> &Arc<FaultFailure> {
        &self.ctx.failure
    }

    /// The regions served now (unmaps and remaps change them).
    pub fn regions(&self) -> Vec<ExternalRegion> {
        self.ctx.table.pieces().iter().map(|p| p.region).collect()
    }

    /// Pages removed and not touched since (they read zero when touched).
    pub fn removed_pages(&self) -> u64 {
        self.ctx.table.file.discarded.count()
    }

    /// Whether the service has ended (the peer went away or a thread
    /// failed); [`wait`](Self::wait) then returns at once.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Serves until the peer goes away (or a handler thread fails).
    pub fn wait(mut self) -> Ended {
        self.join()
    }

    /// Stops serving.
    pub fn stop(mut self) -> Ended {
        self.ctx.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        self.join()
    }

    fn join(&mut self) -> Ended {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.watch = None;
        let reason = self
            .end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| "asked to stop".into());
        Ended {
            reason,
            stats: self.stats(),
        }
    }
}

impl Drop for ExternalHandler {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.ctx.stopping.store(true, Ordering::Release);
            let _ = self.stop.write(1);
            self.join();
        }
    }
}
