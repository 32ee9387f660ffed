//! Getting a guest from reset to its first instruction: loading a Linux
//! kernel (ELF `vmlinux` or `bzImage`) with its boot parameters, or a flat
//! payload entered in long mode, optionally at CPL3.

pub mod acpi;
pub mod gdt;
pub mod linux;
pub mod mptable;
pub mod paging;

use vm_memory::GuestMemoryError;

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
