//! ACPI tables for a hardware-reduced x86 platform.
//!
//! Kernels built without `CONFIG_X86_MPPARSE` (the Debian cloud kernels, for
//! one) ignore the MP table and find their CPUs and I/O APIC through ACPI
//! only. This module writes the minimum Linux needs, in the BIOS area it
//! scans for the RSDP (`0xe0000..0x100000`):
//!
//! ```text
//! 0xe0000  RSDP (revision 2, 36 bytes) -> XSDT
//!          XSDT  -> FADT, MADT
//!          FADT  (revision 6, HW_REDUCED_ACPI, sleep control/status
//!                 registers at I/O port 0x3c0) -> DSDT
//!          DSDT  Name (_S5_, Package () { 5, 0 })
//!          MADT  one enabled local APIC per CPU (APIC ID = UID = index),
//!                one I/O APIC (ID num_cpus) at 0xfec0_0000, GSI base 0
//! ```
//!
//! Each table starts on a 16-byte boundary. There are no interrupt source
//! overrides: KVM's I/O APIC takes ISA IRQ `n` on pin `n`, which is what
//! Linux assumes without them. With the `_S5_` object and the sleep control
//! register, `poweroff` in the guest writes `SLP_EN | 5 << 2` to
//! [`ACPI_SLEEP_PORT`] (see `devices::legacy::AcpiSleep`).

use super::checksum;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

pub use crate::layout::MAX_VCPUS as MAX_CPUS;
use crate::layout::{IOAPIC_START, LAPIC_START};
use devices::legacy::AcpiSleep;

/// Guest-physical address of the RSDP (Linux scans `0xe0000..0x100000`).
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// I/O port of the hardware-reduced sleep control and status registers:
/// where the device that carries out the guest's `poweroff` listens.
pub const ACPI_SLEEP_PORT: u16 = AcpiSleep::BASE as u16;
/// `SLP_TYP` of S5 (soft-off), as the DSDT's `_S5_` object gives it and the
/// device expects it.
pub const S5_SLP_TYP: u8 = AcpiSleep::S5_SLP_TYP;

/// End (exclusive) of the area the tables must fit in.
const ACPI_AREA_END: u64 = 0x10_0000;
/// Alignment of each table.
const TABLE_ALIGN: usize = 16;

/// OEM ID of every table (6 bytes).
const OEM_ID: [u8; 6] = *b"GMVMM ";
/// OEM table ID of every table (8 bytes).
const OEM_TABLE_ID: [u8; 8] = *b"GMVMMACP";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// FADT hypervisor vendor identity.
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"GMVMM\0\0\0";

/// Size of the common table header (signature .. creator revision).
const SDT_HEADER_LEN: usize = 36;
/// Offset of the checksum byte in the common table header.
const SDT_CHECKSUM_OFFSET: usize = 9;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Offset of the MADT flags field.
const MADT_FLAGS_OFFSET: usize = 40;
/// MADT flag: the platform also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;

/// Errors from [`setup_acpi`].
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// No vCPU was asked for.
    #[error("ACPI tables need at least one CPU")]
    NoCpus,
    /// More vCPUs than APIC IDs can address (the I/O APIC takes the next ID).
    #[error("too many CPUs for the ACPI tables: {0} (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// The tables do not fit between [`RSDP_ADDR`] and 1 MiB.
    #[error("ACPI tables of {size} bytes do not fit in the {available} bytes at {RSDP_ADDR:#x}")]
    TablesTooLarge {
        /// Size the tables need, from [`RSDP_ADDR`].
        size: usize,
        /// Room available.
        available: usize,
    },
    /// A virtio-mmio window that a 32-bit descriptor cannot describe.
    #[error("a virtio-mmio window lies above 4 GiB")]
    VirtioWindow,
    /// Guest memory does not cover the area the tables go in.
    #[error("guest memory does not cover the ACPI area {RSDP_ADDR:#x}..{end:#x}")]
    NotEnoughMemory {
        /// End (exclusive) of the area needed.
        end: u64,
    },
    /// Writing the tables into guest memory failed.
    #[error("failed to write the ACPI tables to guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

/// The bytes an [`Aml`] object serializes to.
fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Recomputes the header checksum of a whole serialized table.
fn fix_checksum(table: &mut [u8]) {
    table[SDT_CHECKSUM_OFFSET] = 0;
    table[SDT_CHECKSUM_OFFSET] = checksum(table);
}

/// A virtio-mmio device window and its interrupt line, described to the
/// guest as an `LNRO0005` device (what Linux's virtio_mmio driver matches).
/// Interrupts of a hardware-reduced platform are routed only for devices
/// the DSDT describes, so these are not announced on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// Interrupt line (GSI).
    pub irq: u32,
}

impl VirtioMmioDevice {
    fn aml(&self, index: usize) -> Vec<u8> {
        let mmio = aml::Memory32Fixed::new(true, self.base as u32, self.size as u32);
        let int = aml::Interrupt::new(true, true, false, false, self.irq);
        let crs = aml::ResourceTemplate::new(vec![&mmio, &int]);
        let hid: aml::AmlStr = "LNRO0005";
        let hid = aml::Name::new("_HID".into(), &hid);
        let uid = aml::Name::new("_UID".into(), &(index as u64));
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("_SB_.V{index:03X}");
        to_bytes(&aml::Device::new(
            name.as_str().into(),
            vec![&hid, &uid, &crs],
        ))
    }
}

/// A legacy ISA device: its PNP id, I/O ports and interrupt line. A
/// hardware-reduced platform has no implicit ISA bus, so the guest finds
/// (and routes the interrupts of) only the devices the DSDT describes.
fn isa_device(name: &str, hid: &str, ports: &[(u16, u8)], irq: Option<u32>) -> Vec<u8> {
    let io: Vec<aml::IO> = ports
        .iter()
        .map(|&(base, len)| aml::IO::new(base, base, 1, len))
        .collect();
    let int = irq.map(|n| aml::Interrupt::new(true, true, false, false, n));
    let mut res: Vec<&dyn acpi_tables::Aml> =
        io.iter().map(|i| i as &dyn acpi_tables::Aml).collect();
    if let Some(i) = &int {
        res.push(i);
    }
    let crs = aml::ResourceTemplate::new(res);
    let hid = aml::EISAName::new(hid);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let dev = aml::Device::new(name.into(), vec![&hid, &uid, &crs]);
    to_bytes(&dev)
}

/// The DSDT: the `_S5_` object that makes S5 (power off) available, and
/// the legacy devices: COM1 and the CMOS clock. The i8042 is left out on
/// purpose: it is there only for the reset command, and a described PS/2
/// controller costs the guest a 1.7 s probe.
fn build_dsdt(virtio: &[VirtioMmioDevice]) -> Vec<u8> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &aml::ZERO]),
    );
    let mut devices = vec![
        isa_device("_SB_.COM1", "PNP0501", &[(0x3f8, 8)], Some(4)),
        isa_device("_SB_.RTC_", "PNP0B00", &[(0x70, 2)], Some(8)),
    ];
    devices.extend(virtio.iter().enumerate().map(|(i, d)| d.aml(i)));
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&to_bytes(&s5));
    for d in &devices {
        dsdt.append_slice(d);
    }
    dsdt.as_slice().to_vec()
}

/// The FADT of a hardware-reduced platform whose DSDT is at `dsdt_addr`.
fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let sleep_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_PORT),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi);
    fadt.sleep_control_reg = sleep_reg;
    fadt.sleep_status_reg = sleep_reg;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    to_bytes(&fadt.finalize())
}

/// The MADT: `num_cpus` local APICs and the I/O APIC (ID `num_cpus`).
fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(num_cpus, IOAPIC_START as u32, 0));
    let mut bytes = to_bytes(&madt);
    // The crate has no setter for the MADT flags.
    bytes[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4]
        .copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

/// The XSDT listing the tables at `entries`.
fn build_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &e in entries {
        xsdt.add_entry(e);
    }
    to_bytes(&xsdt)
}

/// Appends `table` to `image` (which starts at [`RSDP_ADDR`]) at the next
/// aligned offset; returns the table's guest-physical address.
fn place(image: &mut Vec<u8>, table: &[u8]) -> u64 {
    image.resize(image.len().next_multiple_of(TABLE_ALIGN), 0);
    let addr = RSDP_ADDR + image.len() as u64;
    image.extend_from_slice(table);
    addr
}

/// Replaces the bytes of the table placed at `addr` in `image` with `table`
/// (of the same size).
fn overwrite(image: &mut [u8], addr: u64, table: &[u8]) {
    let offset = (addr - RSDP_ADDR) as usize;
    image[offset..offset + table.len()].copy_from_slice(table);
}

/// Builds the whole image, RSDP first, to be written at [`RSDP_ADDR`].
fn build_image(num_cpus: u8, virtio: &[VirtioMmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }

    // The XSDT and the FADT have fixed sizes: reserve their room with
    // placeholders and fill them in once the addresses they hold are known.
    let mut image = vec![0u8; Rsdp::len()];
    let xsdt_addr = place(&mut image, &build_xsdt(&[0, 0]));
    let fadt_addr = place(&mut image, &build_fadt(0));
    let dsdt_addr = place(&mut image, &build_dsdt(virtio));
    let madt_addr = place(&mut image, &build_madt(num_cpus));
    overwrite(&mut image, xsdt_addr, &build_xsdt(&[fadt_addr, madt_addr]));
    overwrite(&mut image, fadt_addr, &build_fadt(dsdt_addr));
    overwrite(
        &mut image,
        RSDP_ADDR,
        &to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
    );

    let available = (ACPI_AREA_END - RSDP_ADDR) as usize;
    if image.len() > available {
        return Err(AcpiError::TablesTooLarge {
            size: image.len(),
            available,
        });
    }
    Ok(image)
}

/// Writes an RSDP at [`RSDP_ADDR`] and, after it, an XSDT, a hardware-reduced
/// FADT (sleep registers at [`ACPI_SLEEP_PORT`]), a DSDT with an `_S5_`
/// object ([`S5_SLP_TYP`]) and a MADT describing `num_cpus` CPUs (APIC IDs
/// `0..num_cpus`) and an I/O APIC (ID `num_cpus`) at 0xfec0_0000. Returns the
/// RSDP's address.
///
/// # Errors
///
/// [`AcpiError::NoCpus`] for 0 CPUs, [`AcpiError::TooManyCpus`] above
/// [`MAX_CPUS`], [`AcpiError::TablesTooLarge`] if the tables do not fit below
/// 1 MiB, [`AcpiError::NotEnoughMemory`] if `mem` does not cover where they
/// go and [`AcpiError::Write`] if writing them fails.
pub fn setup_acpi<M: GuestMemoryBackend>(
    mem: &M,
    num_cpus: u8,
    virtio: &[VirtioMmioDevice],
) -> Result<u64, AcpiError> {
    if virtio
        .iter()
        .any(|d| d.base.checked_add(d.size).is_none_or(|e| e > 1 << 32))
    {
        return Err(AcpiError::VirtioWindow);
    }
    let image = build_image(num_cpus, virtio)?;
    let start = GuestAddress(RSDP_ADDR);
    if !mem.check_range(start, image.len()) {
        return Err(AcpiError::NotEnoughMemory {
            end: RSDP_ADDR + image.len() as u64,
        });
    }
    mem.write_slice(&image, start).map_err(AcpiError::Write)?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{guest, read_bytes, sum};
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads the table at `addr`, checks its signature, that it lies in the
    /// ACPI area and that its checksum is right; returns its bytes.
    fn table(mem: &GuestMemoryMmap<()>, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        assert!((RSDP_ADDR..ACPI_AREA_END).contains(&addr), "{addr:#x}");
        assert_eq!(addr % TABLE_ALIGN as u64, 0, "{addr:#x} is not aligned");
        let header = read_bytes(mem, addr, SDT_HEADER_LEN);
        assert_eq!(&header[..4], signature);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= SDT_HEADER_LEN);
        assert!(addr + len as u64 <= ACPI_AREA_END);
        let bytes = read_bytes(mem, addr, len);
        assert_eq!(
            sum(&bytes),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        assert_eq!(&bytes[10..16], &OEM_ID);
        assert_eq!(&bytes[16..24], &OEM_TABLE_ID);
        bytes
    }

    /// Checks the RSDP and returns the XSDT's address.
    fn rsdp(mem: &GuestMemoryMmap<()>) -> u64 {
        let r = read_bytes(mem, RSDP_ADDR, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        assert_eq!(r[15], 2, "revision");
        assert_eq!(u32_at(&r, 20), 36, "length");
        u64_at(&r, 24)
    }

    /// The XSDT's entries.
    fn xsdt_entries(mem: &GuestMemoryMmap<()>) -> Vec<u64> {
        let x = table(mem, rsdp(mem), b"XSDT");
        x[SDT_HEADER_LEN..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// The address of the XSDT entry whose table has `signature`.
    fn find(mem: &GuestMemoryMmap<()>, signature: &[u8; 4]) -> u64 {
        xsdt_entries(mem)
            .into_iter()
            .find(|&a| &read_bytes(mem, a, 4)[..] == signature)
            .unwrap_or_else(|| panic!("no {} in the XSDT", String::from_utf8_lossy(signature)))
    }

    #[test]
    fn rsdp_points_to_the_xsdt() {
        let mem = guest(1 << 20);
        assert_eq!(setup_acpi(&mem, 2, &[]).unwrap(), RSDP_ADDR);
        let xsdt = rsdp(&mem);
        table(&mem, xsdt, b"XSDT");
    }

    #[test]
    fn xsdt_lists_fadt_and_madt() {
        let mem = guest(1 << 20);
        setup_acpi(&mem, 2, &[]).unwrap();
        let entries = xsdt_entries(&mem);
        assert_eq!(entries.len(), 2);
        let mut sigs: Vec<Vec<u8>> = entries
            .iter()
            .map(|&a| {
                let sig: [u8; 4] = read_bytes(&mem, a, 4).try_into().unwrap();
                table(&mem, a, &sig);
                sig.to_vec()
            })
            .collect();
        sigs.sort();
        assert_eq!(sigs, vec![b"APIC".to_vec(), b"FACP".to_vec()]);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_registers() {
        let mem = guest(1 << 20);
        setup_acpi(&mem, 1, &[]).unwrap();
        let f = table(&mem, find(&mem, b"FACP"), b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "FADT major version");
        assert_ne!(u32_at(&f, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u32_at(&f, 40), 0, "32-bit DSDT pointer unused");
        let dsdt = u64_at(&f, 140);
        table(&mem, dsdt, b"DSDT");
        for off in [244, 256] {
            let gas = &f[off..off + 12];
            assert_eq!(gas[0], 1, "SystemIO space");
            assert_eq!(gas[1], 8, "bit width");
            assert_eq!(gas[2], 0, "bit offset");
            assert_eq!(u64_at(gas, 4), 0x3c0);
        }
    }

    #[test]
    fn dsdt_has_s5() {
        let mem = guest(1 << 20);
        setup_acpi(&mem, 1, &[]).unwrap();
        let f = table(&mem, find(&mem, b"FACP"), b"FACP");
        let d = table(&mem, u64_at(&f, 140), b"DSDT");
        // NameOp "_S5_" PackageOp PkgLength(5) NumElements(2) BytePrefix 5 ZeroOp
        let s5 = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00,
        ];
        assert_eq!(&d[SDT_HEADER_LEN..SDT_HEADER_LEN + s5.len()], &s5);
        // The legacy devices follow, with their PNP ids (EISA-compressed
        // "PNP0501" is 41 d0 05 01) and interrupt lines.
        for (name, id) in [
            (b"COM1", [0x41, 0xd0, 0x05, 0x01]),
            (b"RTC_", [0x41, 0xd0, 0x0b, 0x00]),
        ] {
            assert!(d.windows(4).any(|w| w == name), "{name:?}");
            assert!(d.windows(4).any(|w| w == id), "{name:?} id");
        }
        assert_eq!(checksum(&d), 0);
    }

    #[test]
    fn virtio_devices_are_described_with_their_window_and_irq() {
        let mem = guest(1 << 20);
        let devs = [
            VirtioMmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            VirtioMmioDevice {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        setup_acpi(&mem, 1, &devs).unwrap();
        let f = table(&mem, find(&mem, b"FACP"), b"FACP");
        let d = table(&mem, u64_at(&f, 140), b"DSDT");
        assert_eq!(checksum(&d), 0);
        let hits = d.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hits, 2);
        for dev in devs {
            // Memory32Fixed: 0x86, length 9, read-write, base, size.
            let mut m = vec![0x86, 0x09, 0x00, 0x01];
            m.extend_from_slice(&(dev.base as u32).to_le_bytes());
            m.extend_from_slice(&(dev.size as u32).to_le_bytes());
            assert!(d.windows(m.len()).any(|w| w == m), "window of {dev:?}");
            // Extended interrupt: 0x89, length 6, consumer+edge, 1 irq.
            let mut i = vec![0x89, 0x06, 0x00, 0x03, 0x01];
            i.extend_from_slice(&dev.irq.to_le_bytes());
            assert!(d.windows(i.len()).any(|w| w == i), "irq of {dev:?}");
        }
        let high = [VirtioMmioDevice {
            base: 0xffff_f000,
            size: 0x2000,
            irq: 5,
        }];
        assert!(matches!(
            setup_acpi(&mem, 1, &high),
            Err(AcpiError::VirtioWindow)
        ));
    }

    #[test]
    fn madt_describes_cpus_and_ioapic() {
        for n in [1u8, 2, 4, 64, MAX_CPUS] {
            let mem = guest(1 << 20);
            setup_acpi(&mem, n, &[]).unwrap();
            let m = table(&mem, find(&mem, b"APIC"), b"APIC");
            assert_eq!(u32_at(&m, 36), 0xfee0_0000, "local APIC address");
            assert_eq!(u32_at(&m, 40), 1, "PCAT_COMPAT");
            let mut lapic_ids = Vec::new();
            let mut ioapics = Vec::new();
            let mut off = 44;
            while off < m.len() {
                let (ty, len) = (m[off], usize::from(m[off + 1]));
                assert!(len >= 2 && off + len <= m.len());
                let e = &m[off..off + len];
                match ty {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(e[2], e[3], "UID = APIC ID");
                        assert_eq!(u32_at(e, 4), 1, "enabled");
                        lapic_ids.push(e[3]);
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
                    }
                    t => panic!("unexpected MADT entry type {t}"),
                }
                off += len;
            }
            assert_eq!(off, m.len());
            assert_eq!(lapic_ids, (0..n).collect::<Vec<_>>());
            assert_eq!(ioapics, vec![(n, 0xfec0_0000, 0)]);
        }
    }

    #[test]
    fn tables_are_packed_after_the_rsdp() {
        let mem = guest(1 << 20);
        setup_acpi(&mem, MAX_CPUS, &[]).unwrap();
        let xsdt = rsdp(&mem);
        let f = find(&mem, b"FACP");
        let dsdt = u64_at(&table(&mem, f, b"FACP"), 140);
        let madt = find(&mem, b"APIC");
        assert!(RSDP_ADDR < xsdt && xsdt < f && f < dsdt && dsdt < madt);
        let madt_len = table(&mem, madt, b"APIC").len() as u64;
        assert!(madt + madt_len <= ACPI_AREA_END);
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let mem = guest(1 << 20);
        assert!(matches!(setup_acpi(&mem, 0, &[]), Err(AcpiError::NoCpus)));
        assert!(matches!(
            setup_acpi(&mem, 255, &[]),
            Err(AcpiError::TooManyCpus(255))
        ));
    }

    #[test]
    fn rejects_memory_without_the_bios_area() {
        let mem = guest(512 << 10);
        assert!(matches!(
            setup_acpi(&mem, 1, &[]),
            Err(AcpiError::NotEnoughMemory { .. })
        ));
        // Covering 0xe0000 but not everything up to the end of the tables.
        let mem = guest(0xe0000 + 64);
        assert!(matches!(
            setup_acpi(&mem, 1, &[]),
            Err(AcpiError::NotEnoughMemory { .. })
        ));
    }
}
