//! Device models for the VMM. They reach guest memory through a `vm-memory`
//! address space they are generic over, and give memory back through the
//! traits of [`memory`] ([`memory::MemoryBackend`],
//! [`memory::HotplugBackend`]), which `guest-mem` and the VMM implement.
//! They never reach into the `vmm` crate, and know nothing of KVM:
//! interrupts are eventfds the VMM wires to the guest.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod memory;
pub mod state;
pub mod virtio;
