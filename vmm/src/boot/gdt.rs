//! GDT entries and the segment registers KVM wants for them.

use kvm_bindings::kvm_segment;

/// A GDT entry from flags, base and limit (the layout Linux's `GDT_ENTRY` uses).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

/// The segment register a selector of `index` with this entry loads.
pub fn segment(index: u16, entry: u64, rpl: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = limit(entry);
    kvm_segment {
        base: base(entry),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) | rpl,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// 64-bit ring-0 code.
pub const KERNEL_CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// Ring-0 data.
pub const KERNEL_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// 64-bit ring-3 code.
pub const USER_CODE64: u64 = gdt_entry(0xa0fb, 0, 0xfffff);
/// Ring-3 data.
pub const USER_DATA: u64 = gdt_entry(0xc0f3, 0, 0xfffff);
/// A busy 64-bit TSS at `base`, `limit` bytes long minus one (0x67 for a
/// TSS without an I/O permission bitmap).
pub const fn tss(base: u32, limit: u32) -> u64 {
    gdt_entry(0x008b, base, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_code_segment_is_long_mode_ring0() {
        let s = segment(1, KERNEL_CODE64, 0);
        assert_eq!(
            (s.selector, s.l, s.db, s.dpl, s.type_, s.present),
            (8, 1, 0, 0, 0xb, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn user_segments_are_ring3() {
        let cs = segment(3, USER_CODE64, 3);
        assert_eq!((cs.selector, cs.dpl, cs.l), (0x1b, 3, 1));
        let ss = segment(4, USER_DATA, 3);
        assert_eq!((ss.selector, ss.dpl, ss.type_, ss.db), (0x23, 3, 3, 1));
    }

    #[test]
    fn tss_base_round_trips() {
        let s = segment(5, tss(0x12_3456, 0x67), 0);
        assert_eq!((s.base, s.limit, s.type_), (0x12_3456, 0x67, 0xb));
    }
}
