//! Checks on what another process hands over, before anything is served:
//! the region table and the descriptor.

use std::os::fd::{AsRawFd, OwnedFd};

use super::ExternalRegion;
use crate::{Error, Result};

const KIB4: u64 = 4 << 10;
const MIB2: u64 = 2 << 20;

fn bad(index: usize, why: String) -> Error {
    Error::External(format!("region {index}: {why}"))
}

/// Checks the regions against a source of `source_len` bytes (`None`: no
/// end): one page size of 4 KiB or 2 MiB, aligned, non-empty, inside the
/// source, no two over the same host or file bytes. Returns the page size.
pub(crate) fn regions(regions: &[ExternalRegion], source_len: Option<u64>) -> Result<u64> {
    let Some(first) = regions.first() else {
        return Err(Error::External("no regions".into()));
    };
    let page = first.page_size;
    for (i, r) in regions.iter().enumerate() {
        if r.page_size != KIB4 && r.page_size != MIB2 {
            return Err(bad(
                i,
                format!("page size {} is neither 4 KiB nor 2 MiB", r.page_size),
            ));
        }
        if r.page_size != page {
            return Err(bad(
                i,
                format!(
                    "page size {} differs from region 0's {page} (one page size per memory)",
                    r.page_size
                ),
            ));
        }
        if r.size == 0 || r.size % page != 0 {
            return Err(bad(
                i,
                format!("size {:#x} is not a whole number of pages", r.size),
            ));
        }
        if r.host_addr % page != 0 || r.offset % page != 0 {
            return Err(bad(
                i,
                format!(
                    "host address {:#x} or offset {:#x} is not page aligned",
                    r.host_addr, r.offset
                ),
            ));
        }
        if r.host_addr.checked_add(r.size).is_none() || r.size > isize::MAX as u64 {
            return Err(bad(i, "the region wraps the address space".into()));
        }
        match (r.offset.checked_add(r.size), source_len) {
            (None, _) => return Err(bad(i, "the region wraps the file offsets".into())),
            (Some(end), Some(len)) if end > len => {
                return Err(bad(
                    i,
                    format!(
                        "{:#x}+{:#x} is past the memory file's {len:#x} bytes",
                        r.offset, r.size
                    ),
                ))
            }
            _ => {}
        }
    }
    if let Some((i, j, what)) = overlap(regions) {
        return Err(bad(i, format!("overlaps region {j} in {what} bytes")));
    }
    Ok(page)
}

/// The first two regions over the same host bytes or the same memory-file
/// bytes: `(later, earlier, "host" | "memory file")`, by start address.
/// Sizes must not wrap (checked before).
///
/// ```
/// use guest_mem::external::{overlap, ExternalRegion};
/// let r = |host_addr, offset| ExternalRegion { host_addr, size: 0x2000, offset, page_size: 0x1000 };
/// assert_eq!(overlap(&[r(0x10000, 0), r(0x20000, 0x2000)]), None);
/// assert_eq!(overlap(&[r(0x10000, 0), r(0x11000, 0x4000)]), Some((1, 0, "host")));
/// assert_eq!(overlap(&[r(0x10000, 0), r(0x20000, 0x1000)]), Some((1, 0, "memory file")));
/// ```
pub fn overlap(regions: &[ExternalRegion]) -> Option<(usize, usize, &'static str)> {
    type Key = fn(&ExternalRegion) -> u64;
    for (what, key) in [
        ("host", (|r: &ExternalRegion| r.host_addr) as Key),
        ("memory file", |r: &ExternalRegion| r.offset),
    ] {
        let mut spans: Vec<(u64, u64, usize)> = regions
            .iter()
            .enumerate()
            .map(|(i, r)| (key(r), key(r) + r.size, i))
            .collect();
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return Some((w[1].2, w[0].2, what));
        }
    }
    None
}

/// `UFFD_FEATURE_EVENT_REMOVE`.
const FEATURE_EVENT_REMOVE: u64 = 1 << 3;

/// Checks that `fd` is a userfaultfd whose API handshake is done, makes it
/// non-blocking (the handler threads poll it; a blocking one polls as an
/// error), and returns its feature bits.
pub(crate) fn userfaultfd(fd: &OwnedFd) -> Result<u64> {
    let raw = fd.as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{raw}"))
        .map_err(|e| Error::External(format!("inspecting the descriptor: {e}")))?;
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        return Err(Error::External(format!(
            "the descriptor is not a userfaultfd (it is {})",
            link.display()
        )));
    }
    // The fdinfo of a userfaultfd reads "API:\t<api>:<features>:<ioctls>".
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))
        .map_err(|e| Error::External(format!("inspecting the userfaultfd: {e}")))?;
    let features = info
        .lines()
        .find_map(|l| l.strip_prefix("API:"))
        .and_then(|v| v.trim().split(':').nth(1))
        .and_then(|f| u64::from_str_radix(f, 16).ok())
        .ok_or_else(|| {
            Error::External("the userfaultfd has not been through its API handshake".into())
        })?;
    if features & FEATURE_EVENT_REMOVE == 0 {
        log::warn!(
            "the userfaultfd lacks UFFD_FEATURE_EVENT_REMOVE: pages the other process gives \
             back are not seen, and a later touch is served from the memory file again"
        );
    }
    set_nonblocking(raw)?;
    Ok(features)
}

fn set_nonblocking(fd: i32) -> Result<()> {
    // SAFETY: F_GETFL on an open descriptor has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL with flags read just above plus O_NONBLOCK; no memory
    // effects. The flag is the open file's, shared with the other process,
    // which polls its copy too (Firecracker creates it non-blocking anyway).
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(Error::External(format!(
            "making the userfaultfd non-blocking: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn memfd() -> OwnedFd {
        crate::backing::memfd_file("check-test", false)
            .unwrap()
            .into()
    }

    fn r(host_addr: u64, size: u64, offset: u64, page_size: u64) -> ExternalRegion {
        ExternalRegion {
            host_addr,
            size,
            offset,
            page_size,
        }
    }

    #[test]
    fn good_tables_pass_with_their_page_size() {
        let t = [
            r(0x7f00_0000_0000, 64 * MIB, 0, 4096),
            r(0x7f10_0000_0000, 4 * MIB, 64 * MIB, 4096),
        ];
        assert_eq!(regions(&t, Some(68 * MIB)).unwrap(), 4096);
        let t = [r(0x4000_0000, 4 * MIB, 2 * MIB, MIB2)];
        assert_eq!(regions(&t, None).unwrap(), MIB2);
    }

    #[test]
    fn bad_tables_are_refused_with_a_clear_error() {
        let p = 4096;
        for (table, expect) in [
            (vec![], "no regions"),
            (vec![r(0, p, 0, 8192)], "neither 4 KiB nor 2 MiB"),
            (
                vec![r(0, MIB2, 0, MIB2), r(MIB2, p, MIB2, p)],
                "differs from region 0",
            ),
            (vec![r(0, 0, 0, p)], "whole number of pages"),
            (vec![r(0, 6000, 0, p)], "whole number of pages"),
            (vec![r(100, p, 0, p)], "not page aligned"),
            (vec![r(0, p, 100, p)], "not page aligned"),
            (
                vec![r(u64::MAX - 4095, 2 * p, 0, p)],
                "wraps the address space",
            ),
            (
                vec![r(0, 2 * p, u64::MAX - 4095, p)],
                "wraps the file offsets",
            ),
            (vec![r(0, 8 * MIB, p, p)], "past the memory file"),
            (
                vec![r(0, 2 * MIB, 0, p), r(MIB, 2 * MIB, 2 * MIB, p)],
                "host bytes",
            ),
            (
                vec![r(0, 2 * MIB, 0, p), r(4 * MIB, 2 * MIB, MIB, p)],
                "memory file bytes",
            ),
        ] {
            let e = regions(&table, Some(8 * MIB)).unwrap_err().to_string();
            assert!(e.contains(expect), "{table:?}: {e}");
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_userfaultfd_is_refused() {
        let e = userfaultfd(&memfd()).unwrap_err().to_string();
        assert!(e.contains("not a userfaultfd"), "{e}");
    }
}
