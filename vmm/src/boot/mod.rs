//! Getting a guest from reset to its first instruction: loading a Linux
//! kernel (ELF `vmlinux` or `bzImage`) with its boot parameters, or a flat
//! payload entered in long mode, optionally at CPL3.

pub mod acpi;
pub mod gdt;
pub mod linux;
pub mod mptable;
pub mod paging;

use vm_memory::GuestMemoryError;

/// The value that makes the bytes of `bytes` plus itself sum to 0 (mod 256),
/// as ACPI and MP table checksums need.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// Guest memory and byte helpers for the table tests.
#[cfg(test)]
pub(crate) mod test_util {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Plain guest memory of `size` bytes at 0.
    pub fn guest(size: usize) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// The byte sum of `bytes` (0 for a table with a right checksum).
    pub fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    /// `len` bytes of guest memory at `addr`.
    pub fn read_bytes(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

/// Errors while loading or configuring a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be read.
    #[error("reading kernel image {path}: {source}")]
    ReadKernel {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The kernel image is neither an x86-64 ELF nor a bzImage, or is damaged.
    #[error("kernel image {path}: {reason}")]
    BadKernel {
        /// The path.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The initramfs could not be read or does not fit.
    #[error("initramfs {path}: {reason}")]
    Initrd {
        /// The path.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A bad kernel command line.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures to guest memory failed.
    #[error("writing boot structures: {0}")]
    Memory(#[from] GuestMemoryError),
    /// The ACPI tables could not be written.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    /// The MP table could not be written.
    #[error("MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    /// A payload that does not fit.
    #[error("payload: {0}")]
    Payload(String),
}
