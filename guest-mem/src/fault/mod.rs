//! Userspace fault handling: userfaultfd registration, handler threads, and
//! the fault path of the truncate-generation protocol.

mod failure;
pub(crate) mod ioctl;
mod readahead;
pub(crate) mod run;
mod serve;
pub(crate) mod target;

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vmm_sys_util::eventfd::EventFd;

pub use failure::{FaultFailure, PoisonedPage};
pub use readahead::Readahead;

use crate::backing::BackingKind;
use crate::generation::RetryPolicy;
use crate::region::Region;
use crate::stats::Stats;
use crate::{Error, Result};
use run::Stopped;
use target::{OwnRegions, RegionTable};

/// Who serves first touches of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultMode {
    /// userfaultfd where every region's backing supports it, else the kernel.
    #[default]
    Auto,
    /// userfaultfd; building fails if a region's backing cannot be managed.
    Userfault,
    /// The kernel's own demand paging; no handler threads.
    Kernel,
}

/// What the fault handler does with a page whose fetch or install still
/// fails after [`FaultConfig::failed_attempts`] attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unservable {
    /// `UFFDIO_POISON` the page (the whole huge page on hugetlbfs): the
    /// thread that touches it gets `SIGBUS` (`BUS_MCEERR_AR`), which KVM
    /// raises on a vCPU thread and a VMM turns into a machine check for the
    /// guest; the VM goes on. The page is recorded in its backing file's
    /// poisoned set, the VMM's own accesses of it are refused
    /// ([`GuestRegion`](crate::GuestRegion)), it is reported through
    /// [`FaultFailure::poison_event_fd`], and a discard of it (the guest
    /// gives it back) makes it serviceable again. Where the kernel has no
    /// `UFFD_FEATURE_POISON` (before Linux 6.6), or for a peer's memory,
    /// the handler falls back to [`Report`](Self::Report).
    #[default]
    Poison,
    /// Report the page through [`FaultFailure::event_fd`], naming it and the
    /// cause (a VMM stops the VM), and wake the faulting thread after a
    /// pause; touched again, the page gets one more attempt.
    Report,
}

/// Fault handler settings.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// Who serves faults.
    pub mode: FaultMode,
    /// Also register MINOR mode on shmem/hugetlbfs: pages already in the page
    /// cache (a file that holds contents) are mapped with `UFFDIO_CONTINUE`.
    pub minor_faults: bool,
    /// Handler threads reading the one userfaultfd.
    pub threads: usize,
    /// Pages installed with the faulting one.
    pub readahead: Readahead,
    /// Which invalidations make a fault drop what it fetched.
    pub retry_policy: RetryPolicy,
    /// Attempts at a fetch or install that fails (an I/O error, no memory)
    /// before the failure is reported ([`FaultFailure`]); they are spaced
    /// 1, 2, 4... ms apart.
    pub failed_attempts: u32,
    /// What happens to a page whose attempts are spent.
    pub on_unservable: Unservable,
    /// Called first by every handler thread, on that thread (an embedder
    /// installs its seccomp filter there). An error stops the thread and is
    /// reported like any other handler failure.
    pub on_thread_start: Option<ThreadStartHook>,
    /// Serve first touches of fresh shmem memory (a memfd or tmpfs file,
    /// no page source) a 2 MiB huge page at a time where the host gives
    /// shmem huge pages (`shmem_enabled` or the mount's `huge=`, `advise`
    /// being enough): the guest, and KVM, then map it with one entry
    /// instead of 512. Costs up to 2 MiB of memory per first touch.
    pub huge_fill: bool,
    /// Test-only: each handler thread stops after serving this many
    /// faults, as if it had failed.
    #[cfg(feature = "test-switches")]
    pub stop_after_faults: Option<u64>,
    /// Test-only: skip the generation re-check (re-opens the race).
    #[cfg(feature = "test-switches")]
    pub skip_recheck: bool,
    /// Test-only: sleep this long after every fetch (zero-fill included),
    /// widening the window in which an invalidation can land.
    #[cfg(feature = "test-switches")]
    pub fetch_delay: std::time::Duration,
    /// Test-only: called after every fetch (after `fetch_delay`), on the
    /// handler thread, before the install: a test holds the install back
    /// there until what it races with has happened.
    #[cfg(feature = "test-switches")]
    pub after_fetch: Option<TestHook>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            mode: FaultMode::Auto,
            minor_faults: false,
            threads: 1,
            readahead: Readahead::default(),
            retry_policy: RetryPolicy::Overlapping,
            failed_attempts: 5,
            on_unservable: Unservable::Poison,
            on_thread_start: None,
            huge_fill: true,
            #[cfg(feature = "test-switches")]
            stop_after_faults: None,
            #[cfg(feature = "test-switches")]
            skip_recheck: false,
            #[cfg(feature = "test-switches")]
            fetch_delay: std::time::Duration::ZERO,
            #[cfg(feature = "test-switches")]
            after_fetch: None,
        }
    }
}

impl FaultConfig {
    pub(crate) fn recheck_enabled(&self) -> bool {
        #[cfg(feature = "test-switches")]
        {
            !self.skip_recheck
        }
        #[cfg(not(feature = "test-switches"))]
        {
            true
        }
    }

    pub(crate) fn after_fetch(&self) {
        #[cfg(feature = "test-switches")]
        {
            if !self.fetch_delay.is_zero() {
                std::thread::sleep(self.fetch_delay);
            }
            if let Some(hook) = &self.after_fetch {
                (hook.0)();
            }
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.failed_attempts == 0 {
            return Err(Error::Config(
                "failed fetch attempts must be at least 1".into(),
            ));
        }
        if self.mode != FaultMode::Kernel && self.threads == 0 {
            return Err(Error::Config(
                "fault handler threads must be at least 1".into(),
            ));
        }
        if self.readahead.max > 1 << 30 {
            return Err(Error::Config(format!(
                "readahead window {} is larger than 1 GiB",
                self.readahead.max
            )));
        }
        Ok(())
    }
}

/// A function each fault handler thread runs before serving anything.
#[derive(Clone)]
pub struct ThreadStartHook(Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>);

impl ThreadStartHook {
    /// Wraps `f`; its error message says why the thread cannot serve.
    pub fn new(f: impl Fn() -> std::result::Result<(), String> + Send + Sync + 'static) -> Self {
        ThreadStartHook(Arc::new(f))
    }

    pub(crate) fn call(&self) -> std::result::Result<(), String> {
        (self.0)()
    }
}

impl std::fmt::Debug for ThreadStartHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadStartHook")
    }
}

/// Test-only: a function the handler calls at a chosen point.
#[cfg(feature = "test-switches")]
#[derive(Clone)]
pub struct TestHook(Arc<dyn Fn() + Send + Sync>);

#[cfg(feature = "test-switches")]
impl TestHook {
    /// Wraps `f`.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        TestHook(Arc::new(f))
    }
}

#[cfg(feature = "test-switches")]
impl std::fmt::Debug for TestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHook")
    }
}

/// What the handler threads of one userfaultfd share.
pub(crate) struct Context<T: RegionTable> {
    pub uffd: Uffd,
    pub table: T,
    pub stats: Arc<Stats>,
    pub config: FaultConfig,
    pub failure: Arc<FaultFailure>,
    /// Set when the handler is being dropped: threads stop on purpose.
    pub stopping: AtomicBool,
    /// Pages that cannot be served are poisoned (the policy asks for it and
    /// the userfaultfd has `UFFD_FEATURE_POISON`), else reported.
    pub poison: bool,
    /// Held exclusively by a thread from reading events to applying them,
    /// shared by installs (only when `T::EVENTS`; see [`RegionTable`]).
    pub event_gate: RwLock<()>,
}

impl<T: RegionTable> Context<T> {
    pub(crate) fn new(
        uffd: Uffd,
        table: T,
        stats: Arc<Stats>,
        config: FaultConfig,
    ) -> Result<Self> {
        Ok(Context {
            uffd,
            table,
            stats,
            config,
            failure: Arc::new(FaultFailure::new()?),
            stopping: AtomicBool::new(false),
            poison: false,
            event_gate: RwLock::new(()),
        })
    }
}

/// The running fault handler: a userfaultfd and its threads.
pub(crate) struct FaultHandler {
    ctx: Arc<Context<OwnRegions>>,
    stop: EventFd,
    threads: Vec<JoinHandle<()>>,
}

/// Whether every region can be managed with userfaultfd.
pub(crate) fn regions_support_userfault(regions: &[Arc<Region>]) -> bool {
    regions
        .iter()
        .all(|r| r.backing().kind().supports_userfault())
}

impl FaultHandler {
    pub(crate) fn start(
        regions: Vec<Arc<Region>>,
        stats: Arc<Stats>,
        config: FaultConfig,
    ) -> Result<Self> {
        let mut features = FeatureFlags::empty();
        let any_huge = regions
            .iter()
            .any(|r| r.backing().kind() == BackingKind::Hugetlbfs);
        let any_shmem = regions
            .iter()
            .any(|r| r.backing().kind() != BackingKind::Hugetlbfs);
        if any_shmem {
            features |= FeatureFlags::MISSING_SHMEM;
        }
        if any_huge {
            features |= FeatureFlags::MISSING_HUGETLBFS;
        }
        if config.minor_faults {
            if any_shmem {
                features |=
                    FeatureFlags::from_bits_retain(userfaultfd_sys::UFFD_FEATURE_MINOR_SHMEM);
            }
            if any_huge {
                features |=
                    FeatureFlags::from_bits_retain(userfaultfd_sys::UFFD_FEATURE_MINOR_HUGETLBFS);
            }
        }
        let poison = config.on_unservable == Unservable::Poison
            && ioctl::kernel_features() & ioctl::UFFD_FEATURE_POISON != 0;
        if poison {
            features |= FeatureFlags::from_bits_retain(ioctl::UFFD_FEATURE_POISON);
        } else if config.on_unservable == Unservable::Poison {
            log::info!(
                "this kernel's userfaultfd cannot poison pages (UFFD_FEATURE_POISON, Linux \
                 6.6): a page that cannot be served stops the VM instead"
            );
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(features)
            .create()
            .map_err(|e| Error::Userfault(format!("creating a userfaultfd: {e}")))?;
        let mut mode = RegisterMode::MISSING;
        if config.minor_faults {
            mode |= RegisterMode::MINOR;
        }
        for r in &regions {
            uffd.register_with_mode(r.host_addr() as *mut _, r.max_size() as usize, mode)
                .map_err(|e| {
                    Error::Userfault(format!(
                        "registering region {} ({:?}, {} bytes) with userfaultfd: {e}",
                        r.index(),
                        r.backing().kind(),
                        r.max_size()
                    ))
                })?;
        }
        if config.huge_fill {
            let filled: Vec<_> = regions
                .iter()
                .filter(|r| r.enable_huge_fill())
                .map(|r| r.index().0)
                .collect();
            if !filled.is_empty() {
                log::info!(
                    "fresh memory of region(s) {filled:?} is served a 2 MiB huge page at a time"
                );
            }
        }
        let mut sorted = regions;
        sorted.sort_by_key(|r| r.host_addr());
        let mut ctx = Context::new(uffd, OwnRegions(sorted), stats, config)?;
        ctx.poison = poison;
        let ctx = Arc::new(ctx);
        let stop = EventFd::new(libc::EFD_CLOEXEC).map_err(Error::Eventfd)?;
        let mut handler = FaultHandler {
            ctx: ctx.clone(),
            stop,
            threads: Vec::new(),
        };
        for i in 0..ctx.config.threads {
            let ctx = ctx.clone();
            let stop_fd = handler.stop.as_raw_fd();
            let t = std::thread::Builder::new()
                .name(format!("uffd-{i}"))
                .spawn(move || {
                    let started = match &ctx.config.on_thread_start {
                        Some(hook) => hook.call(),
                        None => Ok(()),
                    };
                    let why = match started {
                        Ok(()) => match run::run(&ctx, stop_fd, None) {
                            Stopped::Asked => return,
                            Stopped::PeerGone(why) | Stopped::Failed(why) => why,
                        },
                        Err(e) => format!("its start hook failed: {e}"),
                    };
                    if !ctx.stopping.load(Ordering::Acquire) {
                        ctx.failure.report(format!(
                            "fault handler thread uffd-{i} stopped ({why}): faults are no \
                             longer served"
                        ));
                    }
                })
                .map_err(Error::Thread)?;
            handler.threads.push(t);
        }
        Ok(handler)
    }

    /// The userfaultfd's descriptor (for embedders that want to poll it).
    pub(crate) fn uffd_fd(&self) -> RawFd {
        self.ctx.uffd.as_raw_fd()
    }

    /// Where failures to serve faults are reported.
    pub(crate) fn failure(&self) -> &Arc<FaultFailure> {
        &self.ctx.failure
    }

    /// What happens to a page that cannot be served, as negotiated.
    pub(crate) fn unservable(&self) -> Unservable {
        if self.ctx.poison {
            Unservable::Poison
        } else {
            Unservable::Report
        }
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.ctx.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Unregistering wakes any thread still blocked on a fault in the
        // range; it then faults again under the kernel's own handling.
        for r in &self.ctx.table.0 {
            let _ = self
                .ctx
                .uffd
                .unregister(r.host_addr() as *mut _, r.max_size() as usize);
        }
    }
}

/// Maps the zero page over `[offset, offset + len)` of a private region
/// whose copies were just dropped, so that a discarded page reads zero
/// rather than the file beneath it. Pages a fault installed meanwhile are
/// left alone (`EEXIST`); hugetlbfs has no zero page, and its discarded
/// pages read the file again.
pub(crate) fn zero_private(uffd: std::os::unix::io::RawFd, region: &Region, offset: u64, len: u64) {
    let page = region.page_size();
    let mut at = offset;
    while at < offset + len {
        let out = ioctl::zeropage(uffd, region.host_addr() + at, offset + len - at);
        at += out.done.max(page);
        match out.errno {
            None | Some(libc::EEXIST) | Some(libc::EAGAIN) => {}
            Some(e) => {
                log::debug!(
                    "region {}: zero page over discarded {at:#x}: {}",
                    region.index(),
                    std::io::Error::from_raw_os_error(e)
                );
                return;
            }
        }
    }
}
