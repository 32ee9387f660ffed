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

/// `UFFD_FEATURE_POISON` (Linux 6.6): `UFFDIO_POISON` may be used.
pub(crate) const UFFD_FEATURE_POISON: u64 = 1 << 14;

/// `struct uffdio_poison` (not in `userfaultfd-sys` 0.6).
#[repr(C)]
struct UffdioPoison {
    range: raw::uffdio_range,
    mode: u64,
    updated: i64,
}

/// `_IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)`.
const UFFDIO_POISON: libc::c_ulong = 0xc020_aa08;

const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);

/// `UFFDIO_POISON_MODE_DONTWAKE`.
const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1;

/// `UFFDIO_POISON` over `dst..dst+len` without waking it: the pages get a
/// poison marker, and a touch raises `SIGBUS` (KVM sends a vCPU thread
/// `BUS_MCEERR_AR`). The caller records the page, then wakes the range.
pub(crate) fn poison(uffd: RawFd, dst: u64, len: u64) -> Outcome {
    let mut arg = UffdioPoison {
        range: raw::uffdio_range { start: dst, len },
        mode: UFFDIO_POISON_MODE_DONTWAKE,
        updated: 0,
    };
    // SAFETY: arg is a valid uffdio_poison the kernel reads and updates; the
    // kernel validates the range against the registered areas and only
    // installs markers into empty page-table entries there.
    let rc = unsafe { libc::ioctl(uffd, UFFDIO_POISON as _, &mut arg) };
    outcome(rc, arg.updated, len)
}

/// The features this kernel's userfaultfd offers (0 if it cannot be told).
pub(crate) fn kernel_features() -> u64 {
    // SAFETY: the userfaultfd syscall takes flags only and returns a new
    // descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return 0;
    }
    let fd = fd as RawFd;
    let mut api = raw::uffdio_api {
        api: raw::UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: api is a valid uffdio_api; with no features asked for, the
    // kernel fills in what it offers.
    let rc = unsafe { libc::ioctl(fd, raw::UFFDIO_API as _, &mut api) };
    // SAFETY: fd is the descriptor opened above, owned here.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return 0;
    }
    api.features
}
