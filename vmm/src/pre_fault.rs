//! `KVM_PRE_FAULT_MEMORY` (Linux 6.10+): KVM builds its guest-physical
//! mappings of a range before the guest runs, instead of one exit per 4 KiB
//! page the first time the guest touches it.
//!
//! Used for what a Linux guest's earliest boot touches: the low megabyte
//! (boot parameters, command line, boot page tables, ACPI and MP tables),
//! the placed kernel and the initramfs. Under nested virtualization each of
//! those first touches is an exit to the L1's KVM, which is what makes the
//! guest's first second slow; one ioctl maps them all. The pages themselves
//! stay file-backed and fault-managed: the ioctl faults them in through the
//! same mapping (placed images are already in the page cache, so no
//! userfaultfd fault is raised for them).

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pre_fault_memory, KVM_CAP_PRE_FAULT_MEMORY};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);

const PAGE: u64 = 4096;

/// What a pre-fault did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PreFaulted {
    /// Bytes KVM mapped.
    pub bytes: u64,
    /// Ranges KVM refused (no memory slot, or an error other than a retry).
    pub refused: u32,
    /// How long it took.
    pub took: Duration,
}

/// Whether this KVM has `KVM_PRE_FAULT_MEMORY` (it also needs two-dimensional
/// paging, which the ioctl itself reports with `EOPNOTSUPP`).
pub fn supported(vm: &VmFd) -> bool {
    vm.check_extension_raw(KVM_CAP_PRE_FAULT_MEMORY.into()) > 0
}

/// Page-aligned `(start, len)` covering `[addr, addr + len)`, or `None` for
/// an empty or overflowing range.
fn page_span(addr: u64, len: u64) -> Option<(u64, u64)> {
    let end = addr.checked_add(len)?.checked_add(PAGE - 1)? & !(PAGE - 1);
    let start = addr & !(PAGE - 1);
    (end > start).then(|| (start, end - start))
}

/// Maps `ranges` (guest-physical `(address, length)`) into KVM's page
/// tables through `vcpu`. Gives up on a range at its first error other than
/// `EINTR`/`EAGAIN` (the ioctl then leaves the rest to ordinary faults), and
/// on every range once KVM answers `EOPNOTSUPP` or `ENOTTY`.
pub fn pre_fault(vcpu: &VcpuFd, ranges: &[(u64, u64)]) -> PreFaulted {
    let started = Instant::now();
    let mut done = PreFaulted::default();
    for &(addr, len) in ranges {
        let Some((gpa, size)) = page_span(addr, len) else {
            continue;
        };
        let mut arg = kvm_pre_fault_memory {
            gpa,
            size,
            ..Default::default()
        };
        while arg.size > 0 {
            let before = arg.size;
            // SAFETY: KVM_PRE_FAULT_MEMORY reads and updates (gpa and size
            // advance past what was mapped) the one struct passed, which is
            // a live, exclusively borrowed kvm_pre_fault_memory of the size
            // the ioctl number encodes. It changes no guest memory contents.
            let rc = unsafe { ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut arg) };
            done.bytes += before - arg.size;
            if rc >= 0 {
                continue;
            }
            match errno::Error::last().errno() {
                libc::EINTR | libc::EAGAIN => continue,
                e @ (libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL) => {
                    log::debug!("KVM_PRE_FAULT_MEMORY not usable here (errno {e})");
                    done.refused += 1;
                    done.took = started.elapsed();
                    return done;
                }
                e => {
                    log::debug!(
                        "KVM_PRE_FAULT_MEMORY at {:#x}+{:#x}: errno {e}",
                        arg.gpa,
                        arg.size
                    );
                    done.refused += 1;
                    break;
                }
            }
        }
    }
    done.took = started.elapsed();
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_widened_to_whole_pages() {
        assert_eq!(page_span(0x1001, 2), Some((0x1000, 0x1000)));
        assert_eq!(page_span(0x1000, 0x1000), Some((0x1000, 0x1000)));
        assert_eq!(page_span(0xfff, 2), Some((0, 0x2000)));
        assert_eq!(page_span(0x1000, 0), None);
        assert_eq!(page_span(u64::MAX - 10, 5), None);
    }

    #[test]
    fn pre_faulting_maps_the_ranges_with_a_slot_and_refuses_the_rest() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        if !supported(&vm) {
            eprintln!("skipped: KVM has no KVM_PRE_FAULT_MEMORY");
            return;
        }
        let len = 4 << 20;
        // SAFETY: a fresh private anonymous mapping, checked below, owned by
        // this test and unmapped after the VM that points into it is gone.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: len as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the slot points at the mapping above, which outlives the
        // VM fd (dropped at the end of the block below).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        {
            let vcpu = vm.create_vcpu(0).unwrap();
            let got = pre_fault(&vcpu, &[(0x1000, 0x3000), (1 << 20, 5)]);
            if got.refused > 0 && got.bytes == 0 {
                // No two-dimensional paging (EOPNOTSUPP): nothing to map.
                eprintln!("skipped: KVM refused KVM_PRE_FAULT_MEMORY");
            } else {
                assert_eq!(
                    got,
                    PreFaulted {
                        took: got.took,
                        bytes: 0x4000,
                        refused: 0
                    }
                );
                // No memory slot behind 64 MiB: refused, nothing counted.
                let miss = pre_fault(&vcpu, &[(64 << 20, 0x1000)]);
                assert_eq!((miss.bytes, miss.refused), (0, 1));
            }
        }
        drop(vm);
        // SAFETY: the mapping made above; nothing points into it any more.
        unsafe { libc::munmap(host, len) };
    }
}
