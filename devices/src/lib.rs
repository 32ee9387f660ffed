//! Device models for the VMM. They reach guest memory through `vm-memory`
//! and the memory backend through `guest_mem::backend::MemoryBackend`, never
//! through the `vmm` crate.
