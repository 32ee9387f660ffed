//! An external page-fault handler for Firecracker's snapshot restore
//! (`mem_backend` `{"backend_type": "Uffd", "backend_path": SOCKET}`):
//! it listens on a Unix socket, takes Firecracker's handshake (its guest
//! regions and its userfaultfd) and serves the guest's page faults from the
//! snapshot's memory file with `guest-mem`'s fault path, remove events
//! (balloon inflation, memory unplug) applied as truncate-generation
//! invalidations.
//!
//! A crate of its own rather than a binary of `vmm`: the handler runs
//! beside another VMM and needs `guest-mem` and nothing of this one (no
//! KVM, no devices, no API), so it builds and ships as a small program
//! with a small surface, and changes to `vmm` never touch it.
//!
//! - [`handshake`]: the protocol, parsed and checked;
//! - [`server`]: the socket, and the service of each peer.

#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]

pub mod handshake;
pub mod server;
