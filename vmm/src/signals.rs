//! SIGTERM and SIGINT as a file descriptor: the event loop of
//! [`Vm::run`](crate::Vm::run) reads them and stops the VM as it does when
//! the guest stops (vCPUs stopped, console flushed, API socket removed),
//! instead of the process dying on the spot.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::signal::create_sigset;

/// SIGTERM and SIGINT, blocked and delivered through a signalfd.
#[derive(Debug)]
pub struct ShutdownSignals {
    fd: OwnedFd,
}

impl ShutdownSignals {
    /// The signals that stop the VM.
    pub const SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

    /// Blocks SIGTERM and SIGINT in the calling thread, and so in every
    /// thread it spawns from then on, and opens a signalfd that receives
    /// them. Call it before any other thread exists: a thread that does not
    /// block them may be the one the kernel hands the signal to, and the
    /// process would die of its default action.
    pub fn install() -> io::Result<Self> {
        let set = create_sigset(&Self::SIGNALS).map_err(io::Error::from)?;
        // SAFETY: `set` is an initialised signal set; a null old-set pointer
        // is allowed; only this thread's mask changes.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new descriptor; `set` is initialised; the
        // result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ShutdownSignals { fd })
    }

    /// The number of the next pending signal, if one is pending.
    pub fn read(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data; all zeroes is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the read writes at most `size` bytes into `info`, which
        // is that large; the fd is open as long as `self`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (usize::try_from(n).ok() == Some(size)).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for ShutdownSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A signal's usual name.
pub fn signal_name(signo: libc::c_int) -> String {
    match signo {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        n => format!("signal {n}"),
    }
}
