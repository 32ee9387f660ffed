//! `KVM_PRE_FAULT_MEMORY` (Linux 6.10+): KVM builds its guest-physical
//! mappings of a range before the guest runs, instead of one exit per 4 KiB
//! page the first time the guest touches it.
//!
//! Used for what a Linux guest's earliest boot touches ([`linux_boot_ranges`]):
//! the low megabyte (boot parameters, command line, boot page tables, ACPI
//! and MP tables), the placed kernel and the initramfs, the RAM right above
//! the kernel (the page allocator's first pages) and the top of RAM (the
//! memblock allocator's). Under nested virtualization each of
//! those first touches is an exit to the L1's KVM, which is what makes the
//! guest's first second slow; one ioctl maps them all. The pages themselves
//! stay file-backed and fault-managed: the ioctl faults them in through the
//! same mapping (placed images are already in the page cache, so no
//! userfaultfd fault is raised for them). Where KVM lacks the ioctl, the
//! free RAM among those ranges is allocated up front only where fresh
//! memory comes in huge pages (`guest_mem::Region::huge_fills`): then each
//! first touch there maps 2 MiB, and the guest's memory map for memory
//! plugged later lands in RAM already there (a 6.1 L1: boot 1.88 s against
//! 2.07 s without, virtio-mem plug 19 ms against 25 ms). In 4 KiB pages it
//! saved the guest nothing (each first touch stays a nested fault, and the
//! userfaultfd round trip is a small part of one).

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pre_fault_memory, KVM_CAP_PRE_FAULT_MEMORY};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::layout::HIMEM_START;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);

const PAGE: u64 = 4096;

/// How much RAM right above the kernel is pre-faulted (at most an eighth of
/// RAM): a Linux guest's page allocator hands out its lowest free pages
/// first, and with `init_on_alloc` (Debian's default) zeroes each, so its
/// boot writes every page of the first tens of MiB above the kernel. Up to
/// its init, a Debian 12 guest (6.1) wrote 25 MiB of them at 256 MiB of RAM
/// and 24 MiB at 1 GiB, a Debian 13 guest (6.12) 15-16 MiB (the L1's
/// `kvm_page_fault` tracepoint, booted `--no-pre-fault`). A page allocated
/// here and never touched costs about 30 us in the TCG L1 (fallocate,
/// zeroing, mapping), one the guest touches unmapped several times that.
const ABOVE_KERNEL: u64 = 26 << 20;
/// The top of RAM holds the memblock allocations of the guest's earliest
/// boot, made from the top down: chiefly the memory map (64 bytes per
/// 4 KiB page, a sixty-fourth of RAM), then page tables, per-CPU areas and
/// hash tables. Both kernels above wrote the top 8 MiB of a 256 MiB guest
/// and the top 20 MiB of a 1 GiB one: a sixty-fourth of RAM and 4 MiB.
fn top_of_ram(total: u64) -> u64 {
    total / 64 + (4 << 20)
}

/// One range to pre-fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether the range must first be allocated in the backing file: it
    /// holds no image, so pre-faulting it would otherwise raise a
    /// userfaultfd fault per window instead of mapping allocated pages.
    pub populate: bool,
}

/// What a Linux guest's earliest boot touches, in guest RAM laid out as
/// `ram` (`(gpa, len)` ranges, ascending) in pages of `page_size`: the low
/// megabyte, the kernel (placed from 1 MiB up to `kernel_end`), the
/// initramfs, and, on 4 KiB pages, the RAM just above the kernel and the
/// top of RAM. On huge pages those two are left to the guest: a nested
/// fault there maps 2 MiB, so pre-faulting them would save a few dozen
/// exits, against allocating and zeroing their huge pages before the
/// guest starts (0.6 s per boot in the TCG L1, where a huge page that held
/// an earlier guest's code is slow to write: a 256 MiB hugetlbfs boot took
/// 0.6 s longer with them, its guest no less time).
pub fn linux_boot_ranges(
    ram: &[(u64, u64)],
    kernel_end: u64,
    initrd: Option<(u64, u64)>,
    page_size: u64,
) -> Vec<BootRange> {
    let total: u64 = ram.iter().map(|&(_, len)| len).sum();
    let image = |gpa, len| BootRange {
        gpa,
        len,
        populate: false,
    };
    let mut v = vec![
        image(0, HIMEM_START),
        image(HIMEM_START, kernel_end.saturating_sub(HIMEM_START)),
    ];
    v.extend(initrd.map(|(gpa, len)| image(gpa, len)));
    v.retain(|r| r.len > 0);
    if page_size > PAGE {
        return v;
    }
    let above = kernel_end.next_multiple_of(PAGE);
    if let Some(&(gpa, len)) = ram
        .iter()
        .find(|&&(gpa, len)| gpa <= above && above < gpa + len)
    {
        let span = ABOVE_KERNEL.min(total / 8).min(gpa + len - above);
        v.push(BootRange {
            gpa: above,
            len: span,
            populate: true,
        });
    }
    if let Some(&(gpa, len)) = ram.last() {
        let span = top_of_ram(total)
            .next_multiple_of(PAGE)
            .min(total / 8)
            .min(len);
        v.push(BootRange {
            gpa: gpa + len - span,
            len: span,
            populate: true,
        });
    }
    v.retain(|r| r.len > 0);
    v
}

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
    fn a_linux_boot_pre_faults_low_memory_images_above_the_kernel_and_the_top() {
        let ram = [(0, 256 << 20)];
        let initrd = Some((0x0f00_0000, 0x10_0000));
        let v = linux_boot_ranges(&ram, 0x3e0_0123, initrd, PAGE);
        let image = |gpa, len| BootRange {
            gpa,
            len,
            populate: false,
        };
        let fresh = |gpa, len| BootRange {
            gpa,
            len,
            populate: true,
        };
        assert_eq!(
            v,
            [
                image(0, 0x10_0000),
                image(0x10_0000, 0x3e0_0123 - 0x10_0000),
                image(0x0f00_0000, 0x10_0000),
                fresh(0x3e0_1000, 26 << 20),
                fresh((256 - 8) << 20, 8 << 20),
            ]
        );
        // A small guest: an eighth of RAM at most above the kernel, a
        // sixty-fourth and 4 MiB at the top; nothing past the end of RAM.
        let v = linux_boot_ranges(&[(0, 64 << 20)], 60 << 20, None, PAGE);
        assert_eq!(v[2], fresh(60 << 20, 4 << 20));
        assert_eq!(v[3], fresh(59 << 20, 5 << 20));
        // RAM split by the MMIO gap: the top is that of the upper range.
        // The top grows with RAM (its memory map): 68 MiB of 4 GiB.
        let v = linux_boot_ranges(&[(0, 3 << 30), (4 << 30, 1 << 30)], 64 << 20, None, PAGE);
        assert_eq!(v[2], fresh(64 << 20, 26 << 20));
        assert_eq!(v[3], fresh((5 << 30) - (68 << 20), 68 << 20));
        let v = linux_boot_ranges(&[(0, 1 << 30)], 64 << 20, None, PAGE);
        assert_eq!(v[3], fresh((1 << 30) - (20 << 20), 20 << 20));
        // A kernel that fills RAM leaves nothing above it.
        let v = linux_boot_ranges(&[(0, 64 << 20)], 64 << 20, None, PAGE);
        assert!(v.iter().all(|r| r.gpa + r.len <= 64 << 20), "{v:?}");
        assert_eq!(v.iter().filter(|r| r.populate).count(), 1);
        // On huge pages: the images only, nothing to allocate up front.
        let v = linux_boot_ranges(&ram, 0x3e0_0123, initrd, 2 << 20);
        assert_eq!(
            v,
            [
                image(0, 0x10_0000),
                image(0x10_0000, 0x3e0_0123 - 0x10_0000),
                image(0x0f00_0000, 0x10_0000),
            ]
        );
    }

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
