//! Linux boot: kernel image, initramfs, command line, `boot_params` with an
//! e820 map that matches the guest-memory layout (64-bit boot protocol).

use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{bzimage::BzImage, load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, ReadVolatile};

use super::BootError;
use crate::layout::*;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Highest address the initramfs may end at unless the kernel says more.
const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;

/// A loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where the 64-bit entry point is.
    pub entry: GuestAddress,
    /// The bzImage setup header, for bzImages.
    pub setup_header: Option<setup_header>,
    /// First byte past the kernel.
    pub end: u64,
}

fn bad(path: &Path, reason: impl Into<String>) -> BootError {
    BootError::BadKernel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn ram_bytes<M: GuestMemoryBackend>(mem: &M) -> u64 {
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

/// Loads an x86-64 ELF `vmlinux` or a `bzImage` into guest memory, reading
/// the file through `reader` (a plain `File`, or a reader that places the
/// bytes some cheaper way, such as `guest_mem::image::ImageFile`).
pub fn load_kernel<M, R>(
    mem: &M,
    path: &Path,
    reader: impl FnOnce(File) -> R,
) -> Result<LoadedKernel, BootError>
where
    M: GuestMemoryBackend,
    R: Read + ReadVolatile + Seek,
{
    let mut file = reader(File::open(path).map_err(|source| BootError::ReadKernel {
        path: path.to_path_buf(),
        source,
    })?);
    let mut magic = [0u8; 4];
    let n = file
        .read(&mut magic)
        .map_err(|source| BootError::ReadKernel {
            path: path.to_path_buf(),
            source,
        })?;
    if n < 4 {
        return Err(bad(path, "file is too short to be a kernel image"));
    }
    if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            // linux-loader reports a segment it cannot place in guest
            // memory as a read error; say what that usually means.
            let hint = if e.to_string().contains("Unable to read kernel image") {
                format!(
                    " (does it fit in the {} MiB of guest RAM?)",
                    ram_bytes(mem) >> 20
                )
            } else {
                String::new()
            };
            bad(path, format!("not a loadable x86-64 ELF kernel: {e}{hint}"))
        })?;
        return Ok(LoadedKernel {
            entry: r.kernel_load,
            setup_header: None,
            end: r.kernel_end,
        });
    }
    let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        bad(
            path,
            format!("neither an ELF vmlinux nor a valid bzImage ({e})"),
        )
    })?;
    let hdr = r
        .setup_header
        .ok_or_else(|| bad(path, "bzImage without a setup header"))?;
    if hdr.version < 0x0206 {
        return Err(bad(
            path,
            format!("boot protocol {:#x} is too old (2.06 needed)", {
                hdr.version
            }),
        ));
    }
    if hdr.xloadflags & 1 == 0 {
        return Err(bad(
            path,
            "bzImage has no 64-bit entry point (XLF_KERNEL_64)",
        ));
    }
    Ok(LoadedKernel {
        // startup_64 is 0x200 past the start of the protected-mode kernel.
        entry: r.kernel_load.unchecked_add(0x200),
        setup_header: Some(hdr),
        end: r.kernel_end,
    })
}

/// Loads the initramfs as high as the kernel allows in low RAM, reading it
/// through `reader` (see [`load_kernel`]); returns (address, size).
pub fn load_initrd<M, R>(
    mem: &M,
    path: &Path,
    reader: impl FnOnce(File) -> R,
    low_ram_end: u64,
    kernel_end: u64,
    addr_max: Option<u32>,
) -> Result<(u64, u64), BootError>
where
    M: GuestMemoryBackend,
    R: ReadVolatile,
{
    let err = |reason: String| BootError::Initrd {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
    if size == 0 {
        return Err(err("the file is empty".into()));
    }
    let limit = low_ram_end.min(u64::from(addr_max.unwrap_or(0)).max(INITRD_ADDR_MAX_DEFAULT) + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
        .ok_or_else(|| {
            err(format!(
                "{size} bytes do not fit between the kernel's end {kernel_end:#x} and {limit:#x}"
            ))
        })?;
    let mut file = reader(file);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| err(format!("loading into guest memory: {e}")))?;
    Ok((addr, size))
}

/// The e820 map for boot RAM of `ram_size` bytes laid out by
/// [`ram_ranges`]: conventional memory below the EBDA, then from 1 MiB up to
/// the MMIO gap, then above 4 GiB.
pub fn e820_map(ram_size: u64) -> Vec<boot_e820_entry> {
    let mut map = Vec::new();
    let mut add = |addr: u64, size: u64| {
        if size > 0 {
            map.push(boot_e820_entry {
                addr,
                size,
                r#type: E820_RAM,
            });
        }
    };
    for (gpa, len, _) in ram_ranges(ram_size) {
        if gpa == 0 {
            add(0, len.min(EBDA_START));
            add(HIMEM_START, len.saturating_sub(HIMEM_START));
        } else {
            add(gpa, len);
        }
    }
    map
}

/// Builds `boot_params` for the 64-bit boot protocol.
pub fn boot_params(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    ram_size: u64,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(ram_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::Cmdline("e820 map too large".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// The command line with what the platform implies added: this VMM has no
/// PCI bus, so `pci=off` spares the guest probing one (as Firecracker
/// does), unless the command line already says something about PCI.
pub fn with_platform_args(cmdline: &str) -> String {
    if cmdline.split_whitespace().any(|w| w.starts_with("pci=")) {
        cmdline.to_string()
    } else {
        format!("{} pci=off", cmdline.trim_end())
    }
}

/// Parses and places the kernel command line; returns its length.
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<usize, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(format!("{e} (at most {CMDLINE_MAX} bytes)")))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &c).map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() + 1)
}

/// Writes `boot_params` to the zero page.
pub fn write_boot_params<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    mem: &M,
    params: &boot_params,
) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_gets_pci_off_unless_it_speaks_of_pci() {
        assert_eq!(
            with_platform_args("console=ttyS0 panic=-1 "),
            "console=ttyS0 panic=-1 pci=off"
        );
        assert_eq!(with_platform_args("pci=noacpi quiet"), "pci=noacpi quiet");
    }
    use std::io::Write;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn plain(f: File) -> File {
        f
    }

    fn file_with(bytes: &[u8]) -> tempfile::TempPath {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.into_temp_path()
    }

    #[test]
    fn e820_skips_the_low_hole_and_the_mmio_gap() {
        let m = e820_map(256 << 20);
        let v: Vec<(u64, u64)> = m.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(
            v,
            vec![(0, EBDA_START), (HIMEM_START, (256 << 20) - HIMEM_START)]
        );
        let m = e820_map(5 << 30);
        let last = m.last().unwrap();
        assert_eq!(
            (last.addr, last.size),
            (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START)
        );
        assert!(m.iter().all(|e| e.r#type == E820_RAM));
        // Nothing overlaps the MMIO gap.
        assert!(m
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn boot_params_follow_the_boot_protocol() {
        let k = LoadedKernel {
            entry: GuestAddress(0x100_0000),
            setup_header: None,
            end: 0x200_0000,
        };
        let p = boot_params(&k, 42, Some((0x800_0000, 0x1234)), 512 << 20).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 2);
        let total: u64 = p.e820_table[..2].iter().map(|e| e.size).sum();
        assert_eq!(total, EBDA_START + (512 << 20) - HIMEM_START);
    }

    /// A minimal x86-64 ELF kernel: one PT_LOAD of `payload` at `paddr`,
    /// entered there.
    fn elf_kernel(paddr: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        let len = payload.len() as u64;
        ph[32..40].copy_from_slice(&len.to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&len.to_le_bytes()); // p_memsz
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_kernel_goes_into_the_backing_file_without_serving_faults() {
        use guest_mem::image::ImageFile;
        use guest_mem::{GuestMem, RegionConfig};
        use vm_memory::GuestAddressSpace;

        let gm = GuestMem::builder()
            .region(RegionConfig::new(0, 16 << 20))
            .build()
            .unwrap();
        let payload: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8 | 1).collect();
        let path = file_with(&elf_kernel(0x20_0000, &payload));
        let mem = gm.memory();
        let k = load_kernel(&*mem.memory(), &path, |f| ImageFile::new(&gm, f)).unwrap();
        assert_eq!(k.entry, GuestAddress(0x20_0000));
        assert_eq!(k.end, 0x20_0000 + payload.len() as u64);
        if gm.userfault_enabled() {
            assert_eq!(gm.stats().faults, 0, "placed through the memfd");
        }
        let mut back = vec![0u8; payload.len()];
        mem.memory()
            .read_slice(&mut back, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn malformed_kernels_are_rejected_with_reasons() {
        let m = mem(64 << 20);
        let short = file_with(b"\x7fE");
        let e = load_kernel(&m, &short, plain).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");

        // An ELF header cut off after the magic.
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(20, 0);
        let e = load_kernel(&m, &file_with(&elf), plain)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ELF"), "{e}");

        // A 32-bit ELF (wrong class) and a non-x86 machine.
        let mut elf32 = vec![0u8; 64];
        elf32[..4].copy_from_slice(b"\x7fELF");
        elf32[4] = 1;
        let e = load_kernel(&m, &file_with(&elf32), plain)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ELF"), "{e}");
        let mut arm = vec![0u8; 64];
        arm[..4].copy_from_slice(b"\x7fELF");
        arm[4] = 2;
        arm[5] = 1;
        arm[6] = 1;
        arm[18] = 183; // EM_AARCH64
        let e = load_kernel(&m, &file_with(&arm), plain)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ELF"), "{e}");

        // Not a bzImage: no HdrS magic.
        let junk = vec![0x55u8; 8192];
        let e = load_kernel(&m, &file_with(&junk), plain)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bzImage"), "{e}");

        let e = load_kernel(&m, Path::new("/nonexistent/vmlinux"), plain)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn bzimage_header_checks() {
        let m = mem(64 << 20);
        // A bzImage header with protocol 2.05 and no 64-bit entry.
        let mut img = vec![0u8; 0x4000];
        img[0x1f1] = 1; // setup_sects
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        let e = load_kernel(&m, &file_with(&img), plain)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too old") || e.contains("bzImage"), "{e}");
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let m = mem(64 << 20);
        let f = file_with(&[7u8; 10000]);
        let (addr, size) = load_initrd(&m, &f, plain, 64 << 20, 0x200_0000, None).unwrap();
        assert_eq!(size, 10000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr >= 0x200_0000);
        let big = file_with(&vec![1u8; 3 << 20]);
        let e = load_initrd(&m, &big, plain, 4 << 20, 0x200_0000, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
        let empty = file_with(&[]);
        assert!(load_initrd(&m, &empty, plain, 64 << 20, 0, None).is_err());
    }

    #[test]
    fn overlong_command_lines_are_refused() {
        let m = mem(1 << 20);
        assert_eq!(write_cmdline(&m, "console=ttyS0").unwrap(), 14);
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert!(write_cmdline(&m, &long).is_err());
    }
}
