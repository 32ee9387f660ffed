//! A minimal KVM VMM whose guest RAM is file-backed and whose faults are
//! served by `guest-mem`: it boots a stock Linux kernel (ELF `vmlinux` or
//! `bzImage`, with an initramfs) or a flat payload entered in long mode,
//! optionally at CPL3.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod error;
pub mod event_loop;
pub mod exit;
pub mod exit_profile;
pub mod hotplug_window;
pub mod kvm_vm;
pub mod layout;
pub mod mce;
pub mod pre_fault;
pub mod ram;
pub mod seccomp;
pub mod sigbus;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vcpu_gate;
pub mod vcpu_state;
pub mod virtio;
pub mod vm;

pub use config::{BalloonOptions, MemBackend, SerialOut, VmConfig};
pub use error::VmError;
pub use event_loop::{RunOutcome, FAILURE_GRACE};
pub use exit::ExitReason;
pub use vm::Vm;
