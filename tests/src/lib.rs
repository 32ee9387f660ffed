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
