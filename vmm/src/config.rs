//! What a VM is made of: the configuration a caller (the CLI, a test, an
//! embedder) hands to [`Vm::new`](crate::Vm::new).

use std::io::Write;
use std::path::PathBuf;

use guest_mem::FaultConfig;

/// Where guest RAM lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MemBackend {
    /// An anonymous memfd.
    #[default]
    Memfd,
    /// A file at this path (tmpfs, or a disk file system with kernel faults).
    File(PathBuf),
    /// Huge pages: a `MFD_HUGETLB` memfd, or a file on a hugetlbfs mount.
    Hugetlbfs(Option<PathBuf>),
}

/// Where the serial console writes.
pub enum SerialOut {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Any writer (tests).
    Writer(Box<dyn Write + Send>),
    /// Nowhere.
    Sink,
}

/// A VM's shape.
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Where guest RAM lives.
    pub backend: MemBackend,
    /// Fault handling.
    pub fault: FaultConfig,
    /// Serial console output.
    pub serial: SerialOut,
    /// A virtio-balloon, if wanted.
    pub balloon: Option<BalloonOptions>,
    /// Size of a virtio-mem window for memory plugged at run time, if any.
    pub hotplug: Option<u64>,
    /// Where to serve the control API, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Confine the vCPU, fault handler and event loop threads with their
    /// seccomp filters ([`crate::seccomp`]) before the guest runs. With
    /// [`Vm::with_memory`](crate::Vm::with_memory), the fault handler threads are confined only if
    /// the caller's memory was built with
    /// [`crate::seccomp::fault_thread_hook`].
    pub seccomp: bool,
}

/// Balloon options: the device's optional features.
pub type BalloonOptions = devices::virtio::balloon::BalloonConfig;
