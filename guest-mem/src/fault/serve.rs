//! Serving one fault: resolve, sample, fetch, re-check under the install
//! lock, install, wake.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::ioctl::{self, Outcome};
use super::readahead::window_pages;
use super::run::{read_events, PendingFault};
use super::target::{FaultRegion, RegionTable};
use super::Context;
use crate::generation::{InstallGuard, Verdict};
use crate::huge_fill::HugeFill;

/// Per-thread buffers: fetched contents, zeros for hugetlbfs (which has
/// no `UFFDIO_ZEROPAGE`), and what was read from the userfaultfd.
pub(crate) struct Scratch {
    data: Vec<u8>,
    zeros: Vec<u8>,
    /// The last page this thread gave up on (host address): touched again,
    /// it gets one attempt and a long pause, not the whole series.
    given_up: Option<u64>,
    /// The range the kernel last answered `EEXIST` for, and how many times
    /// in a row (see [`PRESENT_CLAIMS_LIMIT`]).
    present_claims: (u64, u32),
    /// Messages read at once.
    pub events: userfaultfd::EventBuffer,
    /// Faults read and not served yet (in the order read).
    pub pending: VecDeque<PendingFault>,
}

impl Scratch {
    pub(crate) fn new() -> Self {
        Scratch {
            data: Vec::new(),
            zeros: Vec::new(),
            given_up: None,
            present_claims: (0, 0),
            events: userfaultfd::EventBuffer::new(32),
            pending: VecDeque::new(),
        }
    }

    fn data(&mut self, len: usize) -> &mut [u8] {
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        &mut self.data[..len]
    }

    /// Counts an `EEXIST` for the range at `dst`; true once the kernel has
    /// claimed it present [`PRESENT_CLAIMS_LIMIT`] times in a row.
    fn claim_present(&mut self, dst: u64) -> bool {
        let (at, n) = self.present_claims;
        let n = if at == dst { n.saturating_add(1) } else { 1 };
        self.present_claims = (dst, n);
        n >= PRESENT_CLAIMS_LIMIT
    }

    /// Whether the last install failed because the kernel keeps claiming a
    /// page present that its thread faults on again.
    fn phantom_present(&self) -> bool {
        self.present_claims.1 >= PRESENT_CLAIMS_LIMIT
    }

    fn zeros(&mut self, len: usize) -> &[u8] {
        if self.zeros.len() < len {
            // A fresh zeroed allocation (calloc: untouched pages that read
            // as the shared zero page), not resize(), which writes every
            // byte and keeps a 2 MiB huge-page buffer resident.
            self.zeros = vec![0; len];
        }
        &self.zeros[..len]
    }
}

/// `EEXIST` answers in a row for one range after which it is a failure, not
/// a page another thread installed. Each queued fault of a page installed
/// meanwhile gets one (a few per vCPU at most); a thread that keeps
/// faulting on a page the kernel calls present (hugetlbfs whose pool was
/// shrunk under the mapping does this) would otherwise be woken to fault
/// again forever, tens of thousands of times a second, and never reported.
const PRESENT_CLAIMS_LIMIT: u32 = 1024;

/// What a fetch produced for the install range.
#[derive(Clone, Copy)]
enum Contents {
    Zero,
    Data,
    /// Minor fault: the page cache holds the page; map it.
    PageCache,
}

/// How an install attempt ended.
enum Installed {
    Done,
    /// The kernel refused it (no memory, no space...): try again later.
    Failed(i32),
    /// The range changed under us in a way the kernel caught (`EAGAIN`).
    Retry,
    /// A minor fault whose page left the page cache before the fault was
    /// read (a discard between the fault and our sample): serve it as a
    /// missing page.
    RetryAsMissing,
}

pub(crate) fn serve_fault<T: RegionTable>(
    ctx: &Context<T>,
    scratch: &mut Scratch,
    addr: u64,
    mut minor: bool,
) {
    let start = Instant::now();
    let stats = &ctx.stats;
    stats.faults.fetch_add(1, Relaxed);
    if minor {
        stats.minor_faults.fetch_add(1, Relaxed);
    }
    let Some(region) = ctx.table.region_at(addr) else {
        stats.unknown_address.fetch_add(1, Relaxed);
        log::warn!("fault at {addr:#x} outside every region; waking the thread");
        wake(ctx, addr & !(crate::backing::host_page_size() - 1), 1);
        return;
    };
    let region = &*region;
    let page = region.page_size();
    let offset = (addr - region.host_addr()) & !(page - 1);
    let page_index = offset / page;
    let gen = region.generation();
    let host = region.host_addr() + offset;
    // A page given up on before gets one attempt; a fresh one the series.
    let attempts = if scratch.given_up == Some(host) {
        1
    } else {
        ctx.config.failed_attempts
    };
    let mut failures = 0u32;
    // Why the attempts were spent, once they are.
    let mut gave_up: Option<String> = None;
    // Counts a failed fetch or install: pauses and returns true while
    // attempts are left; else records why and returns false (the fault then
    // gets its outcome: poisoned or reported).
    let mut failed = |what: std::fmt::Arguments<'_>| -> bool {
        failures += 1;
        if failures < attempts {
            std::thread::sleep(super::failure::backoff(failures));
            return true;
        }
        gave_up = Some(format!("{what} after {failures} attempt(s)"));
        false
    };
    'fetch: loop {
        let sample = gen.sample();
        let plugged = region.backed_size();
        if offset >= plugged {
            stats.out_of_range.fetch_add(1, Relaxed);
            log::warn!(
                "fault at region {} offset {offset:#x} is past the backed size {plugged:#x}; \
                 not installed (the access will fail)",
                region.label()
            );
            wake(ctx, region.host_addr() + offset, page);
            break;
        }
        let reach = region.reachable_end(offset);
        if reach <= offset {
            let guard = gen.lock_install();
            if region.reachable_end(offset) <= offset {
                refuse_unreachable(ctx, region, &guard, offset);
                break;
            }
            // Plugged meanwhile: serve it.
            continue;
        }
        let discarded = region.discarded().get(page_index);
        let pages = if minor || discarded {
            1
        } else {
            let window = window_pages(&ctx.config.readahead, region, page_index, reach / page);
            trim_to_data(region, offset, window)
        };
        let fetched_len = pages * page;
        let fetched = match fetch(region, offset, fetched_len, discarded, minor, scratch) {
            Ok(c) => c,
            Err(e) => {
                stats.fetch_errors.fetch_add(1, Relaxed);
                if failed(format_args!("fetching {fetched_len:#x} bytes failed: {e}")) {
                    continue;
                }
                break;
            }
        };
        ctx.config.after_fetch();
        // Install attempts with what was fetched: the first, and one after
        // each `EAGAIN` (an event the kernel holds installs back for until
        // it is read: read it, then check again against the same sample,
        // without fetching again).
        loop {
            let (mut contents, mut len) = (fetched, fetched_len);
            let events_gate = T::EVENTS.then(|| {
                ctx.event_gate
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            });
            let guard = gen.lock_install();
            let verdict = guard.recheck(sample, region.file_range(offset, len));
            if ctx.config.recheck_enabled() && verdict.must_retry(ctx.config.retry_policy) {
                stats.retries.fetch_add(1, Relaxed);
                if verdict == Verdict::ChangedElsewhere {
                    stats.spurious_retries.fetch_add(1, Relaxed);
                }
                // What the invalidations left behind is known here, under the
                // lock, without fetching again: no fault can be made to retry
                // for ever, and none holds the lock across a (slow) fetch.
                match resolve(region, &guard, page_index, pages, minor) {
                    Resolved::Gone => {
                        stats.out_of_range.fetch_add(1, Relaxed);
                        wake(ctx, region.host_addr() + offset, page);
                        break 'fetch;
                    }
                    Resolved::Zero => {
                        contents = Contents::Zero;
                        len = page;
                    }
                    Resolved::Valid(n) => len = n * page,
                    Resolved::Again => continue 'fetch,
                }
                stats.resolved_under_lock.fetch_add(1, Relaxed);
            } else if verdict == Verdict::ChangedElsewhere {
                stats.retries_avoided.fetch_add(1, Relaxed);
            }
            // Out of reach since the sample (an unplug, which takes the
            // range away before it discards it): not installed. A plug
            // makes its range reachable before it looks, under this lock,
            // for markers to drop.
            let reach = region.reachable_end(offset);
            if reach <= offset {
                refuse_unreachable(ctx, region, &guard, offset);
                break 'fetch;
            }
            len = len.min(reach - offset);
            if let Contents::Zero = contents {
                match region.fill_huge(&guard, offset) {
                    Some(HugeFill::Window(start)) => {
                        let pages = crate::huge_fill::HUGE / page;
                        stats.huge_fills.fetch_add(1, Relaxed);
                        stats.pages_installed.fetch_add(pages, Relaxed);
                        stats.readahead_pages.fetch_add(pages - 1, Relaxed);
                        wake(ctx, region.host_addr() + start, crate::huge_fill::HUGE);
                        break 'fetch;
                    }
                    Some(HugeFill::Page(at)) => {
                        stats.pages_installed.fetch_add(1, Relaxed);
                        wake(ctx, region.host_addr() + at, page);
                        break 'fetch;
                    }
                    None => {}
                }
            }
            match install(ctx, region, &guard, offset, len, contents, scratch) {
                Installed::Done => break 'fetch,
                Installed::Retry => {
                    drop(guard);
                    drop(events_gate);
                    stats.installs_held_back.fetch_add(1, Relaxed);
                    match read_events(ctx, scratch) {
                        // The event was read by another thread, which has not
                        // yet let the kernel go on: give it the CPU.
                        Ok(0) => std::thread::yield_now(),
                        Ok(_) => {}
                        Err(e) => {
                            if !failed(format_args!("{e}")) {
                                break 'fetch;
                            }
                        }
                    }
                }
                Installed::RetryAsMissing => {
                    minor = false;
                    continue 'fetch;
                }
                Installed::Failed(errno) => {
                    drop(guard);
                    drop(events_gate);
                    let e = std::io::Error::from_raw_os_error(errno);
                    let e = if errno == libc::EEXIST {
                        format!("the kernel calls the page present ({e}) yet faults on it again")
                    } else {
                        e.to_string()
                    };
                    if !failed(format_args!("installing {len:#x} bytes failed: {e}")) {
                        break 'fetch;
                    }
                    continue 'fetch;
                }
            }
        }
    }
    let reported = match gave_up {
        Some(why) => give_up(ctx, region, scratch, offset, why),
        None => false,
    };
    scratch.given_up = reported.then_some(host);
    let took = start.elapsed();
    stats.fault_latency.record(took);
    log::trace!(
        "fault region {} offset {offset:#x} served in {:.0} us",
        region.label(),
        took.as_secs_f64() * 1e6
    );
}

/// Faults at unreachable memory logged before they are only counted.
const UNREACHABLE_LOGGED: u64 = 16;

/// A fault at memory kept out of reach (a virtio-mem block that is not
/// plugged): never served, so the host allocates nothing for it. Where the
/// handler poisons, the page gets a poison marker and the faulting thread
/// its `SIGBUS` (a vCPU: a machine check in the guest, which broke the
/// virtio-mem contract); else the thread is only woken, to fault again.
/// Runs under the install lock: a plug makes its range reachable, then
/// takes the lock to find the markers it must drop, so no marker is left
/// in plugged memory.
fn refuse_unreachable<T: RegionTable>(
    ctx: &Context<T>,
    region: &T::Region,
    guard: &InstallGuard<'_>,
    offset: u64,
) {
    let page = region.page_size();
    let host = region.host_addr() + offset;
    let n = ctx.stats.unreachable.fetch_add(1, Relaxed);
    let outcome = if ctx.poison {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&ctx.uffd);
        match ioctl::poison(fd, host, page).errno {
            None => {
                region.record_poisoned(guard, offset / page);
                "poisoned, the access raises a machine check".to_string()
            }
            // A marker (or a page) is there already.
            Some(libc::EEXIST) => "poisoned already".to_string(),
            Some(errno) => format!(
                "poisoning it failed ({}); not served",
                std::io::Error::from_raw_os_error(errno)
            ),
        }
    } else {
        "not served".to_string()
    };
    // The guest chooses how often this happens: a few lines, then counts.
    if n < UNREACHABLE_LOGGED {
        log::warn!(
            "fault at region {} offset {offset:#x}, memory kept out of reach (not plugged): \
             {outcome}",
            region.label(),
        );
    } else if n == UNREACHABLE_LOGGED {
        log::warn!("more faults at memory kept out of reach; counted only from here on");
    }
    wake(ctx, host, page);
}

/// The outcome of a page whose attempts are spent: poisoned (the faulting
/// thread wakes to `SIGBUS`), or reported and the thread woken after a
/// pause. Returns whether it was reported.
fn give_up<T: RegionTable>(
    ctx: &Context<T>,
    region: &T::Region,
    scratch: &mut Scratch,
    offset: u64,
    why: String,
) -> bool {
    let stats = &ctx.stats;
    let page = region.page_size();
    let host = region.host_addr() + offset;
    let mut why = why;
    if ctx.poison {
        let guard = region.generation().lock_install();
        if offset >= region.backed_size() {
            // Unplugged meanwhile: nothing to serve, nothing to poison.
            stats.out_of_range.fetch_add(1, Relaxed);
            wake(ctx, host, page);
            return false;
        }
        if region.discarded().get(offset / page) {
            // Given back while the attempts ran: it reads zero now.
            if let Installed::Done =
                install(ctx, region, &guard, offset, page, Contents::Zero, scratch)
            {
                return false;
            }
        }
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&ctx.uffd);
        let out = ioctl::poison(fd, host, page);
        match out.errno {
            None => {
                // Recorded before the thread wakes to its SIGBUS.
                region.record_poisoned(&guard, offset / page);
                drop(guard);
                stats.pages_poisoned.fetch_add(1, Relaxed);
                ctx.failure.poisoned(super::PoisonedPage {
                    region: region.label(),
                    offset,
                    host_addr: host,
                    len: page,
                    cause: why,
                });
                wake(ctx, host, page);
                return false;
            }
            Some(libc::EEXIST) if !scratch.phantom_present() => {
                // Installed by another thread meanwhile.
                stats.already_present.fetch_add(1, Relaxed);
                wake(ctx, host, page);
                return false;
            }
            Some(errno) => {
                why = format!(
                    "{why}; poisoning it failed too: {}",
                    std::io::Error::from_raw_os_error(errno)
                );
            }
        }
    }
    ctx.failure.report(format!(
        "region {} offset {offset:#x} (host {host:#x}): {why}; the page could not be served",
        region.label(),
    ));
    std::thread::sleep(super::failure::GIVE_UP_PAUSE);
    wake(ctx, host, page);
    true
}

/// A readahead window over a region served from a source stops at the
/// source's next hole: neighbours that would only be zero pages are left to
/// their own faults, so a restored guest's untouched (or given-back)
/// memory stays unallocated. Fresh memory, with no source, keeps the whole
/// window.
fn trim_to_data(region: &impl FaultRegion, offset: u64, window: u64) -> u64 {
    let Some(src) = region.source().filter(|_| window > 1) else {
        return window;
    };
    let page = region.page_size();
    let data = src.source.data_len(src.offset + offset, window * page) / page;
    data.clamp(1, window)
}

/// What a fault whose fetch an invalidation overlapped may install.
enum Resolved {
    /// The page is past the file's end now: nothing.
    Gone,
    /// The page was given back meanwhile: it reads zero.
    Zero,
    /// The first `n` fetched pages were not touched by any invalidation
    /// (every invalidation marks what it removes in the discard map).
    Valid(u64),
    /// A minor fault: look at the page cache again (nothing is fetched).
    Again,
}

/// Decides, under the install lock, what of a fetch of `pages` pages from
/// `page_index` is still good after an overlapping invalidation.
fn resolve(
    region: &impl FaultRegion,
    _guard: &InstallGuard<'_>,
    page_index: u64,
    pages: u64,
    minor: bool,
) -> Resolved {
    let page = region.page_size();
    let plugged_pages = region.backed_size() / page;
    if page_index >= plugged_pages {
        return Resolved::Gone;
    }
    if minor {
        return Resolved::Again;
    }
    let map = region.discarded();
    if map.get(page_index) {
        return Resolved::Zero;
    }
    let end = (page_index + pages).min(plugged_pages);
    let valid_end = map.first_set(page_index, end).unwrap_or(end);
    Resolved::Valid(valid_end - page_index)
}

fn fetch(
    region: &impl FaultRegion,
    offset: u64,
    len: u64,
    discarded: bool,
    minor: bool,
    scratch: &mut Scratch,
) -> std::io::Result<Contents> {
    if minor {
        return Ok(Contents::PageCache);
    }
    let Some(src) = region.source().filter(|_| !discarded) else {
        return Ok(Contents::Zero);
    };
    let src_off = src.offset + offset;
    if src.source.is_zero(src_off, len) {
        return Ok(Contents::Zero);
    }
    src.source.fetch(src_off, scratch.data(len as usize))?;
    Ok(Contents::Data)
}

fn install<T: RegionTable>(
    ctx: &Context<T>,
    region: &impl FaultRegion,
    _guard: &InstallGuard<'_>,
    offset: u64,
    len: u64,
    contents: Contents,
    scratch: &mut Scratch,
) -> Installed {
    let stats = &ctx.stats;
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&ctx.uffd);
    let dst = region.host_addr() + offset;
    let page = region.page_size();
    let minor = matches!(contents, Contents::PageCache);
    // Counted before the ioctl (which wakes the faulting thread, so a
    // reader of the stats after its access sees the install) and taken
    // back if the kernel installs nothing: a window it refuses whole and
    // the page that then goes in alone are one install.
    let counter = match contents {
        Contents::Zero => &stats.installs_zero,
        Contents::Data => &stats.installs_copy,
        Contents::PageCache => &stats.installs_continue,
    };
    counter.fetch_add(1, Relaxed);
    let out: Outcome = match contents {
        Contents::Zero if region.zero_by_copy() => {
            let zeros = scratch.zeros(len as usize);
            // SAFETY: zeros is len readable bytes; dst..dst+len lies inside
            // the region's registered mapping (offset + len <= backed size).
            unsafe { ioctl::copy(fd, dst, zeros.as_ptr(), len) }
        }
        Contents::Zero => ioctl::zeropage(fd, dst, len),
        Contents::Data => {
            let data = scratch.data(len as usize);
            // SAFETY: as above; data holds len fetched bytes.
            unsafe { ioctl::copy(fd, dst, data.as_ptr(), len) }
        }
        Contents::PageCache => ioctl::r#continue(fd, dst, len),
    };
    let pages_done = out.done / page;
    if pages_done > 0 {
        scratch.present_claims = (0, 0);
        stats.pages_installed.fetch_add(pages_done, Relaxed);
        stats.readahead_pages.fetch_add(pages_done - 1, Relaxed);
        // Installed pages hold current contents again.
        region
            .discarded()
            .clear_range(offset / page, offset / page + pages_done);
        return Installed::Done;
    }
    counter.fetch_sub(1, Relaxed);
    match out.errno {
        None => Installed::Done,
        Some(libc::EEXIST) => {
            // Another thread (or an earlier event for the same page) got
            // there first; make sure our faulting thread runs again.
            stats.already_present.fetch_add(1, Relaxed);
            if scratch.claim_present(dst) {
                stats.install_errors.fetch_add(1, Relaxed);
                return Installed::Failed(libc::EEXIST);
            }
            wake(ctx, dst, page);
            Installed::Done
        }
        Some(libc::EAGAIN) => Installed::Retry,
        Some(libc::EFAULT) if minor => Installed::RetryAsMissing,
        Some(libc::EFAULT) | Some(libc::ENOENT) if len > page => {
            // A window must lie in one mapping: one that runs into another
            // (part of the region protected apart, as a virtio-mem window's
            // blocks are) is refused whole. The faulting page, the first,
            // goes in alone; woken without it, the thread would fault on it
            // again and again.
            install(ctx, region, _guard, offset, page, contents, scratch)
        }
        Some(libc::EFAULT) | Some(libc::ENOENT) => {
            // Past the file's end (a truncate the kernel caught) or the
            // mapping is going away: nothing to install.
            stats.out_of_range.fetch_add(1, Relaxed);
            wake(ctx, dst, page);
            Installed::Done
        }
        Some(errno) => {
            stats.install_errors.fetch_add(1, Relaxed);
            Installed::Failed(errno)
        }
    }
}

fn wake<T: RegionTable>(ctx: &Context<T>, addr: u64, len: u64) {
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&ctx.uffd);
    if let Some(errno) = ioctl::wake(fd, addr, len) {
        log::warn!(
            "waking {addr:#x}+{len:#x} failed: {}",
            std::io::Error::from_raw_os_error(errno)
        );
    }
}
