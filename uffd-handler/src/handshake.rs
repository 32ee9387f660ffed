//! The handshake of Firecracker's external page-fault handler protocol
//! (snapshot load with `mem_backend.backend_type = "Uffd"`), as Firecracker
//! sends it: one message on a Unix stream socket whose body is a JSON array
//! of `GuestRegionUffdMapping` objects, with the userfaultfd attached as
//! `SCM_RIGHTS`. Each object has `base_host_virt_addr`, `size`, `offset`
//! (into the snapshot's memory file) and `page_size`, and the deprecated
//! `page_size_kib`, which carries the same value in bytes despite its
//! name. The sender's pid comes from `SO_PEERCRED`.
//!
//! Everything in the message is checked before a single page is served:
//! page sizes of 4 KiB or 2 MiB only, aligned, non-empty regions inside the
//! memory file, no two regions over the same host or file bytes.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

use guest_mem::external::ExternalRegion;
use serde_json::Value;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Largest handshake accepted (Firecracker sends a few hundred bytes per
/// region).
pub const MAX_HANDSHAKE: usize = 64 << 10;

/// One guest memory region of the sender, as it maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UffdRegion {
    /// Where the sender mapped the region (its address space).
    pub base_host_virt_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Where the region's contents start in the memory file.
    pub offset: u64,
    /// The region's page size: 4 KiB, or 2 MiB for hugetlbfs.
    pub page_size: u64,
}

impl UffdRegion {
    /// The region as `guest-mem` serves it.
    pub fn external(&self) -> ExternalRegion {
        ExternalRegion {
            host_addr: self.base_host_virt_addr,
            size: self.size,
            offset: self.offset,
            page_size: self.page_size,
        }
    }
}

/// What the handshake brought.
#[derive(Debug)]
pub struct Handshake {
    /// The regions, sorted by host address.
    pub regions: Vec<UffdRegion>,
    /// The sender's userfaultfd.
    pub uffd: File,
    /// The sender's pid, if the kernel told.
    pub peer_pid: Option<i32>,
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed.
    #[error("receiving the handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection without sending anything.
    #[error("the peer sent nothing")]
    Empty,
    /// No file descriptor came with the message.
    #[error("the handshake carries no userfaultfd (SCM_RIGHTS)")]
    NoFd,
    /// The body is not what Firecracker sends.
    #[error("the handshake body is not a JSON array of regions: {0}")]
    NotJson(String),
    /// A region is malformed or does not fit.
    #[error("region {index}: {why}")]
    BadRegion {
        /// Which region.
        index: usize,
        /// What is wrong.
        why: String,
    },
}

fn field(obj: &Value, index: usize, name: &str) -> Result<Option<u64>, HandshakeError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| HandshakeError::BadRegion {
                index,
                why: format!("{name} is not a non-negative integer: {v}"),
            }),
    }
}

/// Parses and checks the JSON body against a memory file of `file_len`
/// bytes.
pub fn parse_regions(body: &[u8], file_len: u64) -> Result<Vec<UffdRegion>, HandshakeError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| HandshakeError::NotJson(e.to_string()))?;
    let items = v
        .as_array()
        .ok_or_else(|| HandshakeError::NotJson(format!("expected an array, got {v}")))?;
    if items.is_empty() {
        return Err(HandshakeError::NotJson("no regions".into()));
    }
    let mut regions = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let bad = |why: String| HandshakeError::BadRegion { index, why };
        if !item.is_object() {
            return Err(bad(format!("not an object: {item}")));
        }
        let need = |name: &str| field(item, index, name)?.ok_or_else(|| bad(format!("no {name}")));
        let base = need("base_host_virt_addr")?;
        let size = need("size")?;
        let offset = need("offset")?;
        // `page_size_kib` holds bytes, as `page_size` does.
        let page_size = match (
            field(item, index, "page_size")?,
            field(item, index, "page_size_kib")?,
        ) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(format!("page_size {a} and page_size_kib {b} disagree")))
            }
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => return Err(bad("no page_size".into())),
        };
        if page_size != 4096 && page_size != 2 << 20 {
            return Err(bad(format!(
                "page size {page_size} is neither 4 KiB nor 2 MiB"
            )));
        }
        if size == 0 || size % page_size != 0 {
            return Err(bad(format!(
                "size {size:#x} is not a whole number of pages"
            )));
        }
        if base % page_size != 0 || offset % page_size != 0 {
            return Err(bad(format!(
                "base {base:#x} or offset {offset:#x} is not page aligned"
            )));
        }
        if base.checked_add(size).is_none() {
            return Err(bad("the region wraps the address space".into()));
        }
        match offset.checked_add(size) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(bad(format!(
                    "{offset:#x}+{size:#x} is past the memory file's {file_len:#x} bytes"
                )))
            }
        }
        regions.push(UffdRegion {
            base_host_virt_addr: base,
            size,
            offset,
            page_size,
        });
    }
    let table: Vec<ExternalRegion> = regions.iter().map(UffdRegion::external).collect();
    if let Some((index, other, what)) = guest_mem::external::overlap(&table) {
        return Err(HandshakeError::BadRegion {
            index,
            why: format!("overlaps region {other} in {what} bytes"),
        });
    }
    regions.sort_by_key(|r| r.base_host_virt_addr);
    Ok(regions)
}

fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a properly
    // sized and aligned ucred, and updates `len`; the fd is the open socket.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Receives and checks one handshake on `stream`, for a memory file of
/// `file_len` bytes.
pub fn receive(stream: &UnixStream, file_len: u64) -> Result<Handshake, HandshakeError> {
    let mut buf = vec![0u8; MAX_HANDSHAKE];
    // The descriptor, if any, is owned at once: dropped on any refusal.
    let (n, uffd) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    if n == 0 {
        return Err(HandshakeError::Empty);
    }
    let regions = parse_regions(&buf[..n], file_len)?;
    let uffd = uffd.ok_or(HandshakeError::NoFd)?;
    Ok(Handshake {
        regions,
        uffd,
        peer_pid: peer_pid(stream),
    })
}

/// Sends a handshake as Firecracker does (for tests and tools).
pub fn send(stream: &UnixStream, body: &[u8], uffd: Option<&impl AsRawFd>) -> std::io::Result<()> {
    match uffd {
        Some(fd) => stream
            .send_with_fd(body, fd.as_raw_fd())
            .map(|_| ())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno())),
        None => std::io::Write::write_all(&mut &*stream, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn region(base: u64, size: u64, offset: u64, page: &str) -> String {
        format!(r#"{{"base_host_virt_addr": {base}, "size": {size}, "offset": {offset}, {page}}}"#)
    }

    #[test]
    fn firecracker_s_body_is_parsed_with_either_page_size_field() {
        let body = format!(
            "[{}, {}]",
            region(
                0x7f00_0000_0000,
                64 * MIB,
                0,
                r#""page_size": 4096, "page_size_kib": 4096"#
            ),
            region(
                0x7f10_0000_0000,
                4 * MIB,
                64 * MIB,
                r#""page_size_kib": 2097152"#
            ),
        );
        let r = parse_regions(body.as_bytes(), 68 * MIB).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].page_size, 2 * MIB);
        assert_eq!(r[1].offset, 64 * MIB);
    }

    #[test]
    fn bad_bodies_are_refused_with_a_clear_error() {
        let ok = |b, s, o| region(b, s, o, r#""page_size": 4096"#);
        for (body, expect) in [
            ("not json".to_string(), "not a JSON array"),
            ("{}".into(), "expected an array"),
            ("[]".into(), "no regions"),
            ("[1]".into(), "not an object"),
            (
                r#"[{"size": 4096, "offset": 0, "page_size": 4096}]"#.into(),
                "no base_host_virt_addr",
            ),
            (
                format!("[{}]", region(0, 4096, 0, r#""page_size": 8192"#)),
                "neither 4 KiB nor 2 MiB",
            ),
            (
                format!(
                    "[{}]",
                    region(0, 4096, 0, r#""page_size": 4096, "page_size_kib": 4"#)
                ),
                "disagree",
            ),
            (format!("[{}]", ok(0, 6000, 0)), "whole number of pages"),
            (format!("[{}]", ok(100, 4096, 0)), "page aligned"),
            (
                format!("[{}]", ok(0, 8 * MIB, 4096)),
                "past the memory file",
            ),
            (format!("[{}]", ok(u64::MAX - 4095, 8192, 0)), "wraps"),
            (
                format!("[{}, {}]", ok(0, 2 * MIB, 0), ok(MIB, 2 * MIB, 2 * MIB)),
                "host bytes",
            ),
            (
                format!("[{}, {}]", ok(0, 2 * MIB, 0), ok(4 * MIB, 2 * MIB, MIB)),
                "memory file bytes",
            ),
            (
                format!(
                    "[{}]",
                    r#"{"base_host_virt_addr": -1, "size": 4096, "offset": 0, "page_size": 4096}"#
                ),
                "non-negative",
            ),
        ] {
            let e = parse_regions(body.as_bytes(), 8 * MIB)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{body}: {e}");
        }
    }

    #[test]
    fn a_handshake_over_a_socket_brings_the_fd_and_the_pid() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = memfd();
        let body = format!(
            "[{}]",
            region(0x1000_0000, 2 * MIB, 0, r#""page_size": 4096"#)
        );
        send(&a, body.as_bytes(), Some(&file)).unwrap();
        let h = receive(&b, 2 * MIB).unwrap();
        assert_eq!(h.regions.len(), 1);
        assert_eq!(h.peer_pid, Some(std::process::id() as i32));
        assert!(h.uffd.metadata().is_ok());
        // Without a descriptor: refused.
        send(&a, body.as_bytes(), None::<&File>).unwrap();
        assert!(matches!(receive(&b, 2 * MIB), Err(HandshakeError::NoFd)));
        drop(a);
        assert!(matches!(receive(&b, 2 * MIB), Err(HandshakeError::Empty)));
    }

    fn memfd() -> File {
        guest_mem::backing::memfd_file("handshake-test", false).unwrap()
    }
}
