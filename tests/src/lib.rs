//! Helpers shared by the integration tests: guest payloads assembled in
//! Rust, and checks for what this machine can run.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod external_guest;
pub mod failing_source;
pub mod hostile;
pub mod l1;
pub mod payload;
pub mod stress;
pub mod uffd_peer;

/// Whether `/dev/kvm` can be opened here.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The configuration the KVM payload tests start from: `memory` bytes on a
/// memfd, served through userfaultfd with the default settings, `vcpus`
/// vCPUs, the serial port discarded, no devices and no API, seccomp on.
pub fn payload_vm_config(memory: u64, vcpus: u8) -> vmm::VmConfig {
    vmm::VmConfig {
        memory,
        vcpus,
        backend: vmm::MemBackend::Memfd,
        fault: Default::default(),
        serial: vmm::SerialOut::Sink,
        balloon: None,
        hotplug: None,
        api_socket: None,
        seccomp: true,
    }
}
