//! Identity-mapped page tables for the boot and payload vCPU states.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// Writes a PML4 at `pml4`, one PDPT after it and as many page directories
/// as needed to identity-map `[0, bytes)` with 2 MiB pages (rounded up to
/// 1 GiB). `user` sets the U/S bit so CPL3 code can use the mappings.
/// Returns the first byte past the tables.
pub fn identity_map<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    mem: &M,
    pml4: u64,
    bytes: u64,
    user: bool,
) -> Result<u64, GuestMemoryError> {
    let flags = PRESENT | WRITABLE | if user { USER } else { 0 };
    let gibs = bytes.div_ceil(1 << 30).clamp(1, 512);
    let pdpt = pml4 + 0x1000;
    let pd0 = pdpt + 0x1000;
    mem.write_obj(pdpt | flags, GuestAddress(pml4))?;
    for g in 0..gibs {
        let pd = pd0 + g * 0x1000;
        mem.write_obj(pd | flags, GuestAddress(pdpt + g * 8))?;
        let mut entries = [0u8; 4096];
        for (i, e) in entries.chunks_exact_mut(8).enumerate() {
            let addr = (g << 30) | ((i as u64) << 21);
            e.copy_from_slice(&(addr | flags | HUGE).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(pd0 + gibs * 0x1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn maps_two_gib_with_user_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let end = identity_map(&mem, 0x9000, 2 << 30, true).unwrap();
        assert_eq!(end, 0x9000 + 4 * 0x1000);
        let pml4e: u64 = mem.read_obj(GuestAddress(0x9000)).unwrap();
        assert_eq!(pml4e, 0xa000 | 7);
        let pdpte1: u64 = mem.read_obj(GuestAddress(0xa008)).unwrap();
        assert_eq!(pdpte1, 0xc000 | 7);
        // Second GiB, third 2 MiB page.
        let pde: u64 = mem.read_obj(GuestAddress(0xc000 + 2 * 8)).unwrap();
        assert_eq!(pde, ((1 << 30) + (2 << 21)) | 0x87);
    }
}
