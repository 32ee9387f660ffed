//! Device models for the VMM. They reach guest memory through `vm-memory`
//! and the memory backend through [`guest_mem::backend::MemoryBackend`],
//! never through the `vmm` crate, and know nothing of KVM: interrupts are
//! eventfds the VMM wires to the guest.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod virtio;
