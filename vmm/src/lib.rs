//! A minimal KVM VMM whose guest RAM is file-backed and whose faults are
//! served by `guest-mem`: it boots a stock Linux kernel (ELF `vmlinux` or
//! `bzImage`, with an initramfs) or a flat payload entered in long mode,
//! optionally at CPL3.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod boot;
pub mod cli;
pub mod cpuid;
pub mod exit;
pub mod exit_profile;
pub mod hotplug_slots;
pub mod layout;
pub mod seccomp;
pub mod signals;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use exit::ExitReason;
pub use vm::{BalloonOptions, MemBackend, RunOutcome, SerialOut, Vm, VmConfig, VmError};
