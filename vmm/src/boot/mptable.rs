//! Intel MultiProcessor Specification 1.4 table writer.
//!
//! Linux guests booted without ACPI discover their CPUs, the I/O APIC and the
//! legacy interrupt routing from an MP table. This module writes one into the
//! first 1 KiB of the EBDA (`0x9fc00..0xa0000`):
//!
//! ```text
//! 0x9fc00  MP floating pointer structure ("_MP_", 16 bytes)
//! 0x9fc10  MP configuration table header ("PCMP", 44 bytes)
//!          processor entries     (20 bytes each, APIC IDs 0..n-1, cpu 0 is the BSP)
//!          bus entry             (8 bytes, bus 0 = "ISA   ")
//!          I/O APIC entry        (8 bytes, id n, version 0x11, at 0xfec0_0000)
//!          I/O interrupt entries (8 bytes each, ISA IRQ i -> I/O APIC pin i, i = 0..=23)
//!          local interrupt entries (ExtINT -> LINT0, NMI -> LINT1, all local APICs)
//! ```
//!
//! The rest of the 1 KiB area is zeroed. With 1 KiB of room the table holds at
//! most [`MAX_CPUS_IN_EBDA`] processor entries; asking for more fails with
//! [`MptableError::TableTooLarge`].
//!
//! All multi-byte fields are little-endian, which is the native byte order of
//! the x86_64 hosts this VMM runs on.

use super::checksum;
use std::mem::size_of;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Guest-physical address of the MP floating pointer (start of the EBDA).
pub const MPTABLE_START: u64 = 0x9fc00;

/// End (exclusive) of the area the MP table must fit in: the BIOS/VGA hole.
const MPTABLE_END: u64 = 0xa0000;
/// Room available for the MP table, in bytes.
const MPTABLE_AREA_SIZE: usize = (MPTABLE_END - MPTABLE_START) as usize;

pub use crate::layout::MAX_VCPUS as MAX_CPUS;
use crate::layout::{IOAPIC_START as IOAPIC_ADDR, LAPIC_START as APIC_ADDR};

/// Largest vCPU count whose table fits in the 1 KiB EBDA area.
pub const MAX_CPUS_IN_EBDA: u8 = {
    let fixed = size_of::<MpfIntel>()
        + size_of::<MpcTable>()
        + size_of::<MpcBus>()
        + size_of::<MpcIoapic>()
        + NUM_IO_IRQS * size_of::<MpcIntsrc>()
        + NUM_LOCAL_INTS * size_of::<MpcLintsrc>();
    ((MPTABLE_AREA_SIZE - fixed) / size_of::<MpcCpu>()) as u8
};

/// Number of I/O APIC pins described (ISA IRQs 0..=23).
const NUM_IO_IRQS: usize = 24;
/// Number of local interrupt entries (LINT0 and LINT1).
const NUM_LOCAL_INTS: usize = 2;

/// MP specification revision 1.4.
const MPC_SPEC_REV: u8 = 4;
/// OEM ID of the configuration table (8 bytes, space padded).
const MPC_OEM: [u8; 8] = *b"KVMVMM  ";
/// Product ID of the configuration table (12 bytes, space padded).
const MPC_PRODUCT_ID: [u8; 12] = *b"000000000000";

/// Configuration table entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

/// Processor entry flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Local APIC version reported in the processor entries.
const APIC_VERSION: u8 = 0x14;
/// CPU signature: stepping 0, model 0, family 6.
const CPU_STEPPING: u32 = 0x600;
/// CPUID.1:EDX feature flags reported per CPU: FPU and on-chip APIC.
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;

/// I/O APIC entry: enabled flag and version.
const MPC_APIC_USABLE: u8 = 1;
const IOAPIC_VERSION: u8 = 0x11;

/// Interrupt types of I/O and local interrupt entries.
const MP_IRQ_TYPE_INT: u8 = 0;
const MP_IRQ_TYPE_NMI: u8 = 1;
const MP_IRQ_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus specification".
const MP_IRQ_DEFAULT: u16 = 0;
/// Destination "all local APICs" of a local interrupt entry.
const MP_ALL_APICS: u8 = 0xff;
/// The single ISA bus.
const ISA_BUS_ID: u8 = 0;
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";

/// MP floating pointer structure (MP spec 4.1).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    /// "_MP_".
    signature: [u8; 4],
    /// Physical address of the configuration table.
    physptr: u32,
    /// Length of this structure in 16-byte units (1).
    length: u8,
    /// Specification revision.
    specification: u8,
    /// Makes the bytes of this structure sum to 0.
    checksum: u8,
    /// 0: a configuration table is present.
    feature1: u8,
    /// Bit 7 = IMCR present; 0 selects virtual wire mode.
    feature2: u8,
    feature3: u8,
    feature4: u8,
    feature5: u8,
}

/// MP configuration table header (MP spec 4.2).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    /// "PCMP".
    signature: [u8; 4],
    /// Length of the base table (header and entries) in bytes.
    length: u16,
    /// Specification revision.
    spec: u8,
    /// Makes the bytes of the base table sum to 0.
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    /// Number of entries following the header.
    oemcount: u16,
    /// Address of the local APICs.
    lapic: u32,
    /// Extended table length (0: none).
    ext_length: u16,
    /// Extended table checksum.
    ext_checksum: u8,
    reserved: u8,
}

/// Processor entry (MP spec 4.3.1).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

/// Bus entry (MP spec 4.3.2).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

/// I/O APIC entry (MP spec 4.3.3).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

/// I/O interrupt assignment entry (MP spec 4.3.4).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

/// Local interrupt assignment entry (MP spec 4.3.5).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcLintsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbusid: u8,
    srcbusirq: u8,
    destapic: u8,
    destapiclint: u8,
}

// The layouts are fixed by the MP specification.
const _: () = assert!(size_of::<MpfIntel>() == 16);
const _: () = assert!(size_of::<MpcTable>() == 44);
const _: () = assert!(size_of::<MpcCpu>() == 20);
const _: () = assert!(size_of::<MpcBus>() == 8);
const _: () = assert!(size_of::<MpcIoapic>() == 8);
const _: () = assert!(size_of::<MpcIntsrc>() == 8);
const _: () = assert!(size_of::<MpcLintsrc>() == 8);

// SAFETY: `MpfIntel` is `repr(C, packed)` and made only of `u8`, `u32` and
// `u8` arrays, so it has no padding bytes and every bit pattern of its size is
// a valid value; it holds no pointers or references.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: `MpcTable` is `repr(C, packed)` and made only of integers and `u8`
// arrays: no padding, every bit pattern is valid, no pointers.
unsafe impl ByteValued for MpcTable {}
// SAFETY: `MpcCpu` is `repr(C, packed)` and made only of integers and integer
// arrays: no padding, every bit pattern is valid, no pointers.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: `MpcBus` is `repr(C, packed)` and made only of `u8` and a `u8`
// array: no padding, every bit pattern is valid, no pointers.
unsafe impl ByteValued for MpcBus {}
// SAFETY: `MpcIoapic` is `repr(C, packed)` and made only of integers: no
// padding, every bit pattern is valid, no pointers.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: `MpcIntsrc` is `repr(C, packed)` and made only of integers: no
// padding, every bit pattern is valid, no pointers.
unsafe impl ByteValued for MpcIntsrc {}
// SAFETY: `MpcLintsrc` is `repr(C, packed)` and made only of integers: no
// padding, every bit pattern is valid, no pointers.
unsafe impl ByteValued for MpcLintsrc {}

/// Errors from [`setup_mptable`].
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// No vCPU was asked for.
    #[error("an MP table needs at least one CPU")]
    NoCpus,
    /// More vCPUs than APIC IDs can address (the I/O APIC takes the next ID).
    #[error("too many CPUs for the MP table: {0} (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// The table for this many vCPUs does not fit below 0xA0000.
    #[error("MP table of {size} bytes does not fit in the {available} bytes at 0x9fc00")]
    TableTooLarge {
        /// Size the table would need.
        size: usize,
        /// Room available.
        available: usize,
    },
    /// Guest memory does not cover 0x9fc00..0xa0000.
    #[error("guest memory does not cover the MP table area 0x9fc00..0xa0000")]
    NotEnoughMemory,
    /// Writing the table into guest memory failed.
    #[error("failed to write the MP table to guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

/// Size in bytes of the floating pointer plus the configuration table for
/// `num_cpus` CPUs.
fn table_size(num_cpus: usize) -> usize {
    size_of::<MpfIntel>() + size_of::<MpcTable>() + entries_size(num_cpus)
}

/// Size in bytes of the configuration table entries for `num_cpus` CPUs.
fn entries_size(num_cpus: usize) -> usize {
    num_cpus * size_of::<MpcCpu>()
        + size_of::<MpcBus>()
        + size_of::<MpcIoapic>()
        + NUM_IO_IRQS * size_of::<MpcIntsrc>()
        + NUM_LOCAL_INTS * size_of::<MpcLintsrc>()
}

/// Builds the configuration table entries for `num_cpus` CPUs.
fn build_entries(num_cpus: u8) -> (Vec<u8>, u16) {
    let mut out = Vec::with_capacity(entries_size(usize::from(num_cpus)));
    let mut count: u16 = 0;
    let mut push = |bytes: &[u8]| {
        out.extend_from_slice(bytes);
        count += 1;
    };

    for cpu_id in 0..num_cpus {
        let cpu = MpcCpu {
            type_: MP_PROCESSOR,
            apicid: cpu_id,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu_id == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        push(cpu.as_slice());
    }

    let bus = MpcBus {
        type_: MP_BUS,
        busid: ISA_BUS_ID,
        bustype: BUS_TYPE_ISA,
    };
    push(bus.as_slice());

    // The I/O APIC takes the first ID after the CPUs' (num_cpus <= 254).
    let ioapic_id = num_cpus;
    let ioapic = MpcIoapic {
        type_: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: IOAPIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_ADDR as u32,
    };
    push(ioapic.as_slice());

    for irq in 0..NUM_IO_IRQS as u8 {
        let intsrc = MpcIntsrc {
            type_: MP_INTSRC,
            irqtype: MP_IRQ_TYPE_INT,
            irqflag: MP_IRQ_DEFAULT,
            srcbus: ISA_BUS_ID,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        };
        push(intsrc.as_slice());
    }

    for (lint, irqtype) in [(0u8, MP_IRQ_TYPE_EXTINT), (1u8, MP_IRQ_TYPE_NMI)] {
        let lintsrc = MpcLintsrc {
            type_: MP_LINTSRC,
            irqtype,
            irqflag: MP_IRQ_DEFAULT,
            srcbusid: ISA_BUS_ID,
            srcbusirq: 0,
            destapic: MP_ALL_APICS,
            destapiclint: lint,
        };
        push(lintsrc.as_slice());
    }

    (out, count)
}

/// Builds the whole 1 KiB area at [`MPTABLE_START`]: floating pointer,
/// configuration table, zero padding.
fn build_table(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let size = table_size(usize::from(num_cpus));
    if size > MPTABLE_AREA_SIZE {
        return Err(MptableError::TableTooLarge {
            size,
            available: MPTABLE_AREA_SIZE,
        });
    }

    let (entries, count) = build_entries(num_cpus);
    let config_len = size_of::<MpcTable>() + entries.len();
    let config_addr = MPTABLE_START + size_of::<MpfIntel>() as u64;

    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        physptr: config_addr as u32,
        length: 1,
        specification: MPC_SPEC_REV,
        ..Default::default()
    };
    mpf.checksum = checksum(mpf.as_slice());

    let mut header = MpcTable {
        signature: *b"PCMP",
        // Fits: config_len < MPTABLE_AREA_SIZE (checked above).
        length: config_len as u16,
        spec: MPC_SPEC_REV,
        oem: MPC_OEM,
        productid: MPC_PRODUCT_ID,
        oemcount: count,
        lapic: APIC_ADDR as u32,
        ..Default::default()
    };
    let sum = checksum(header.as_slice()).wrapping_add(checksum(&entries));
    header.checksum = sum;

    let mut out = Vec::with_capacity(MPTABLE_AREA_SIZE);
    out.extend_from_slice(mpf.as_slice());
    out.extend_from_slice(header.as_slice());
    out.extend_from_slice(&entries);
    out.resize(MPTABLE_AREA_SIZE, 0);
    Ok(out)
}

/// Writes an MP 1.4 floating pointer and configuration table describing
/// `num_cpus` CPUs (APIC IDs `0..num_cpus`, cpu 0 the bootstrap processor),
/// one ISA bus, one I/O APIC (ID `num_cpus`) at [`IOAPIC_ADDR`] with ISA IRQs
/// 0..=23 wired to its pins 0..=23, and ExtINT/NMI on LINT0/LINT1 of every
/// local APIC, at [`MPTABLE_START`] in `mem`.
///
/// The area `0x9fc00..0xa0000` is written as a whole (unused bytes zeroed).
///
/// # Errors
///
/// [`MptableError::NoCpus`] for 0 CPUs, [`MptableError::TooManyCpus`] above
/// [`MAX_CPUS`], [`MptableError::TableTooLarge`] above [`MAX_CPUS_IN_EBDA`],
/// [`MptableError::NotEnoughMemory`] if `mem` does not cover the area and
/// [`MptableError::Write`] if writing to it fails.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let table = build_table(num_cpus)?;
    let start = GuestAddress(MPTABLE_START);
    if !mem.check_range(start, table.len()) {
        return Err(MptableError::NotEnoughMemory);
    }
    mem.write_slice(&table, start).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{guest, read_bytes, sum};
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Reads the floating pointer and the configuration table header, checks
    /// both checksums and returns the header and its address.
    fn read_checked(mem: &GuestMemoryMmap<()>) -> (MpcTable, u64) {
        let mpf: MpfIntel = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(mpf.signature, *b"_MP_");
        assert_eq!({ mpf.length }, 1);
        assert_eq!({ mpf.specification }, 4);
        assert_eq!(sum(&read_bytes(mem, MPTABLE_START, 16)), 0);

        let table_addr = u64::from(mpf.physptr);
        assert_eq!(table_addr, MPTABLE_START + 16);
        let header: MpcTable = mem.read_obj(GuestAddress(table_addr)).unwrap();
        assert_eq!(header.signature, *b"PCMP");
        assert_eq!({ header.spec }, 4);
        assert_eq!({ header.lapic }, APIC_ADDR as u32);
        let len = usize::from(header.length);
        assert!(table_addr + len as u64 <= 0xa0000);
        assert_eq!(sum(&read_bytes(mem, table_addr, len)), 0);
        (header, table_addr)
    }

    /// Walks the entries and returns them as (type, address) pairs, checking
    /// the entry count and the table length against the header.
    fn entries(mem: &GuestMemoryMmap<()>, header: &MpcTable, table_addr: u64) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        let mut addr = table_addr + size_of::<MpcTable>() as u64;
        for _ in 0..header.oemcount {
            let type_: u8 = mem.read_obj(GuestAddress(addr)).unwrap();
            out.push((type_, addr));
            addr += if type_ == MP_PROCESSOR { 20 } else { 8 };
        }
        assert_eq!(addr, table_addr + u64::from(header.length));
        out
    }

    #[test]
    fn floating_pointer_and_header_are_valid() {
        for n in [1u8, 2, 4, MAX_CPUS_IN_EBDA] {
            let mem = guest(1 << 20);
            setup_mptable(&mem, n).unwrap();
            let (header, addr) = read_checked(&mem);
            let all = entries(&mem, &header, addr);
            // CPUs, bus, I/O APIC, 24 I/O interrupts, 2 local interrupts.
            assert_eq!(all.len(), usize::from(n) + 1 + 1 + 24 + 2);
            assert_eq!(
                usize::from(header.length),
                44 + usize::from(n) * 20 + 8 + 8 + 24 * 8 + 2 * 8
            );
        }
    }

    #[test]
    fn processor_entries() {
        let n = 4u8;
        let mem = guest(1 << 20);
        setup_mptable(&mem, n).unwrap();
        let (header, addr) = read_checked(&mem);
        let cpus: Vec<MpcCpu> = entries(&mem, &header, addr)
            .into_iter()
            .filter(|(t, _)| *t == MP_PROCESSOR)
            .map(|(_, a)| mem.read_obj(GuestAddress(a)).unwrap())
            .collect();
        assert_eq!(cpus.len(), usize::from(n));
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(usize::from(cpu.apicid), i);
            assert_ne!(cpu.cpuflag & CPU_ENABLED, 0);
            assert_eq!(cpu.cpuflag & CPU_BOOTPROCESSOR != 0, i == 0);
            assert_eq!({ cpu.cpufeature } >> 8 & 0xf, 6);
        }
    }

    #[test]
    fn bus_ioapic_and_interrupt_entries() {
        let n = 3u8;
        let mem = guest(1 << 20);
        setup_mptable(&mem, n).unwrap();
        let (header, addr) = read_checked(&mem);
        let all = entries(&mem, &header, addr);

        let buses: Vec<MpcBus> = all
            .iter()
            .filter(|(t, _)| *t == MP_BUS)
            .map(|(_, a)| mem.read_obj(GuestAddress(*a)).unwrap())
            .collect();
        assert_eq!(buses.len(), 1);
        assert_eq!(buses[0].busid, 0);
        assert_eq!(&buses[0].bustype, b"ISA   ");

        let ioapics: Vec<MpcIoapic> = all
            .iter()
            .filter(|(t, _)| *t == MP_IOAPIC)
            .map(|(_, a)| mem.read_obj(GuestAddress(*a)).unwrap())
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0].apicid, n);
        assert_eq!(ioapics[0].apicver, 0x11);
        assert_eq!(ioapics[0].flags, 1);
        assert_eq!({ ioapics[0].apicaddr }, 0xfec0_0000);

        let intsrcs: Vec<MpcIntsrc> = all
            .iter()
            .filter(|(t, _)| *t == MP_INTSRC)
            .map(|(_, a)| mem.read_obj(GuestAddress(*a)).unwrap())
            .collect();
        assert_eq!(intsrcs.len(), 24);
        for (i, e) in intsrcs.iter().enumerate() {
            assert_eq!(e.irqtype, MP_IRQ_TYPE_INT);
            assert_eq!(e.srcbus, 0);
            assert_eq!(usize::from(e.srcbusirq), i);
            assert_eq!(usize::from(e.dstirq), i);
            assert_eq!(e.dstapic, n);
        }

        let lints: Vec<MpcLintsrc> = all
            .iter()
            .filter(|(t, _)| *t == MP_LINTSRC)
            .map(|(_, a)| mem.read_obj(GuestAddress(*a)).unwrap())
            .collect();
        assert_eq!(lints.len(), 2);
        assert_eq!((lints[0].irqtype, lints[0].destapiclint), (3, 0));
        assert_eq!((lints[1].irqtype, lints[1].destapiclint), (1, 1));
        assert!(lints.iter().all(|l| l.destapic == 0xff));
    }

    #[test]
    fn too_many_cpus() {
        let mem = guest(1 << 20);
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::TooManyCpus(255))
        ));
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
    }

    #[test]
    fn table_too_large_for_the_ebda() {
        let mem = guest(1 << 20);
        assert!(matches!(
            setup_mptable(&mem, MAX_CPUS_IN_EBDA + 1),
            Err(MptableError::TableTooLarge { .. })
        ));
        assert!(matches!(
            setup_mptable(&mem, MAX_CPUS),
            Err(MptableError::TableTooLarge { .. })
        ));
    }

    #[test]
    fn memory_too_small() {
        let mem = guest(64 << 10);
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::NotEnoughMemory)
        ));
    }
}
