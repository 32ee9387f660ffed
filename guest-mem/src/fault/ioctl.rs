//! The userfaultfd resolution ioctls, with the partial counts and errnos the
//! fault path needs (the `userfaultfd` crate drops some of them).

use std::os::unix::io::RawFd;

use userfaultfd_sys as raw;

/// What one resolution ioctl did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Bytes resolved from the start of the range.
    pub done: u64,
    /// The error that stopped it early, if any.
    pub errno: Option<i32>,
}

fn outcome(rc: libc::c_int, field: i64, len: u64) -> Outcome {
    if rc == 0 {
        return Outcome {
            done: len,
            errno: None,
        };
    }
    let errno = std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO);
    // The kernel reports partial progress as -EAGAIN with the count in the
    // structure; on other errors the field holds -errno.
    Outcome {
        done: field.max(0) as u64,
        errno: Some(errno),
    }
}

/// `UFFDIO_COPY` of `len` bytes from `src` to `dst`, waking the range.
///
/// # Safety
/// `src` must be readable for `len` bytes and `dst..dst+len` must lie in a
/// range registered with `uffd`.
pub(crate) unsafe fn copy(uffd: RawFd, dst: u64, src: *const u8, len: u64) -> Outcome {
    let mut arg = raw::uffdio_copy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    // SAFETY: arg is a valid uffdio_copy the kernel reads and updates; the
    // caller vouches for the source and destination ranges.
    let rc = unsafe { libc::ioctl(uffd, raw::UFFDIO_COPY as _, &mut arg) };
    outcome(rc, arg.copy, len)
}

/// `UFFDIO_ZEROPAGE` over `dst..dst+len`, waking the range.
pub(crate) fn zeropage(uffd: RawFd, dst: u64, len: u64) -> Outcome {
    let mut arg = raw::uffdio_zeropage {
        range: raw::uffdio_range { start: dst, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: arg is a valid uffdio_zeropage; the kernel validates the range
    // against the registered areas and only installs zero pages there.
    let rc = unsafe { libc::ioctl(uffd, raw::UFFDIO_ZEROPAGE as _, &mut arg) };
    outcome(rc, arg.zeropage, len)
}

/// `UFFDIO_CONTINUE` over `dst..dst+len`: map what the page cache holds.
pub(crate) fn r#continue(uffd: RawFd, dst: u64, len: u64) -> Outcome {
    let mut arg = raw::uffdio_continue {
        range: raw::uffdio_range { start: dst, len },
        mode: 0,
        mapped: 0,
    };
    // SAFETY: arg is a valid uffdio_continue; the kernel validates the range.
    let rc = unsafe { libc::ioctl(uffd, raw::UFFDIO_CONTINUE as _, &mut arg) };
    outcome(rc, arg.mapped, len)
}

/// `UFFDIO_WAKE` over `start..start+len`.
pub(crate) fn wake(uffd: RawFd, start: u64, len: u64) -> Option<i32> {
    let mut arg = raw::uffdio_range { start, len };
    // SAFETY: arg is a valid uffdio_range; waking has no memory effects.
    let rc = unsafe { libc::ioctl(uffd, raw::UFFDIO_WAKE as _, &mut arg) };
    (rc != 0).then(|| {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    })
}
