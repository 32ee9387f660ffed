//! A handler thread's loop: wait for the userfaultfd, read what it holds,
//! apply the events that are not faults, serve the faults.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;

use userfaultfd::{Event, FaultKind};

use super::serve::{self, Scratch};
use super::target::RegionTable;
use super::Context;

/// Why a handler thread stopped.
#[derive(Debug)]
pub(crate) enum Stopped {
    /// The stop event was signalled.
    Asked,
    /// The other side went away: its socket hung up, or the userfaultfd did.
    PeerGone(String),
    /// Something failed; faults are no longer served by this thread.
    Failed(String),
}

/// A fault read from the userfaultfd and not served yet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingFault {
    pub addr: u64,
    pub minor: bool,
}

/// Serves faults until asked to stop, the peer goes away (`watch` hangs up)
/// or something fails.
pub(crate) fn run<T: RegionTable>(
    ctx: &Context<T>,
    stop_fd: RawFd,
    watch: Option<RawFd>,
) -> Stopped {
    let mut scratch = Scratch::new();
    let uffd_fd = ctx.uffd.as_raw_fd();
    #[cfg(feature = "test-switches")]
    let mut served = 0u64;
    loop {
        if scratch.pending.is_empty() {
            let mut fds = [
                libc::pollfd {
                    fd: uffd_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    // poll ignores negative descriptors.
                    fd: watch.unwrap_or(-1),
                    // Not POLLIN: data the peer sends must not spin us.
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a valid array of three pollfd structures.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Stopped::Failed(format!("poll failed: {err}"));
            }
            if fds[1].revents != 0 {
                return Stopped::Asked;
            }
            if fds[2].revents != 0 {
                return Stopped::PeerGone("the peer closed its socket".into());
            }
            if fds[0].revents & libc::POLLHUP != 0 {
                return Stopped::PeerGone("the userfaultfd hung up".into());
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Stopped::Failed("the userfaultfd reported an error condition".into());
            }
        }
        if let Err(why) = read_events(ctx, &mut scratch) {
            return Stopped::Failed(why);
        }
        while let Some(f) = scratch.pending.pop_front() {
            serve::serve_fault(ctx, &mut scratch, f.addr, f.minor);
            #[cfg(feature = "test-switches")]
            {
                served += 1;
                if ctx.config.stop_after_faults.is_some_and(|n| served >= n) {
                    return Stopped::Failed("test switch: stop after faults".into());
                }
            }
        }
    }
}

/// Reads what the userfaultfd holds without blocking: events other than
/// faults are applied at once, faults are queued in `scratch`. Returns how
/// many messages were read.
///
/// The kernel hands out pending faults before other events, so a fault read
/// with a remove event may well be the remove's causal successor (a page
/// touched again after the balloon took it): applying every event of a read
/// before serving any of its faults serves such a page as removed. A fault
/// that was being served when the event was read is caught by the
/// generation re-check instead.
pub(crate) fn read_events<T: RegionTable>(
    ctx: &Context<T>,
    scratch: &mut Scratch,
) -> Result<usize, String> {
    let _gate = T::EVENTS.then(|| {
        ctx.event_gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    });
    let events = match ctx.uffd.read_events(&mut scratch.events) {
        Ok(events) => events,
        Err(e) => return Err(format!("reading events failed: {e}")),
    };
    let mut n = 0;
    for event in events {
        n += 1;
        match event {
            Ok(Event::Pagefault { kind, addr, .. }) => scratch.pending.push_back(PendingFault {
                addr: addr as u64,
                minor: kind == FaultKind::Minor,
            }),
            Ok(other) => ctx.table.apply_event(&ctx.stats, other),
            Err(e) => {
                ctx.stats.bad_events.fetch_add(1, Relaxed);
                log::warn!("fault handler: bad event: {e}");
            }
        }
    }
    Ok(n)
}
