//! The guest-physical address map.
//!
//! ```text
//! 0x0000_0000  low RAM (real-mode area, boot structures, kernel, initrd)
//! 0xC000_0000  MMIO gap: virtio-mmio devices at 0xD000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 high RAM (whatever does not fit below the gap)
//! ```

/// GDT for the boot vCPU state.
pub const BOOT_GDT: u64 = 0x500;
/// IDT (empty) for the boot vCPU state: past the payload GDT, which runs
/// to 0x538 (five entries and a 16-byte TSS descriptor).
pub const BOOT_IDT: u64 = 0x580;
/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot page tables; PDPT and PDs follow it.
pub const PML4: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 4096;
/// End of the low 640 KiB of conventional memory (EBDA starts here).
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the BIOS/option ROM hole, reserved in the e820 map.
pub const LOW_HOLE_START: u64 = 0xa_0000;
/// Where the kernel may be loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap: high RAM starts here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Largest vCPU count: APIC IDs are 8 bits, 0xff is the broadcast ID, and
/// the I/O APIC takes the ID right after the last CPU. The ACPI and MP
/// tables and the configuration checks all use this one.
pub const MAX_VCPUS: u8 = 254;
/// KVM's TSS (three pages) just below the identity map page.
pub const KVM_TSS: u64 = 0xfffb_d000;
/// KVM's identity-map page (needed on Intel without unrestricted guest).
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// Largest guest memory accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Linux adds hotplugged memory in blocks of this size (x86-64): a
/// virtio-mem window is a whole number of them.
pub const HOTPLUG_ALIGN: u64 = 128 << 20;

/// Where the virtio-mem window starts: above boot RAM and the 4 GiB line,
/// on a 1 GiB boundary. It is not in the e820 map; the guest's driver adds
/// what it plugs.
pub fn hotplug_base(ram_size: u64) -> u64 {
    let end = ram_ranges(ram_size)
        .last()
        .map_or(0, |(gpa, len, _)| gpa + len);
    end.max(MMIO_GAP_END).next_multiple_of(1 << 30)
}

/// Boot RAM as (guest address, length, offset in the backing file): below
/// the MMIO gap, and above 4 GiB for what does not fit.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut v = vec![(0, low, 0)];
    if size > low {
        v.push((MMIO_GAP_END, size - low, low));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hotplug_window_lies_above_ram_and_4_gib() {
        assert_eq!(hotplug_base(256 << 20), 4 << 30);
        assert_eq!(hotplug_base(3 << 30), 4 << 30);
        assert_eq!(hotplug_base(4 << 30), 5 << 30);
        assert_eq!(hotplug_base((4 << 30) + 4096), 6 << 30);
    }

    #[test]
    fn ram_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20, 0)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START, 0)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START, 0),
                (MMIO_GAP_END, 1 << 30, MMIO_GAP_START)
            ]
        );
    }
}
