//! Per-vCPU CPUID adjustment.
//!
//! `KVM_GET_SUPPORTED_CPUID` reports what the host and KVM can offer, with
//! the host's own topology in it. Before `KVM_SET_CPUID2` each vCPU needs its
//! own copy fixed up so the guest sees a single package of `num_vcpus` cores
//! (one thread each) and its own APIC ID:
//!
//! * leaf 0x1: initial APIC ID, logical processor count, HTT, CLFLUSH line
//!   size, hypervisor bit; OSXSAVE cleared (the guest OS sets CR4.OSXSAVE);
//! * leaf 0x4: cores per package and threads sharing each cache;
//! * leaves 0xB and 0x1F: an SMT level of one thread and a core level of
//!   `num_vcpus` cores, with the vCPU's x2APIC ID;
//! * leaf 0x8000_0008: AMD core count;
//! * leaf 0x4000_0000: KVM signature leaf kept, its max leaf at least
//!   0x4000_0001 so the guest finds the KVM features leaf.
//!
//! Leaves missing from the input are skipped; nothing is added.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Basic features leaf.
const LEAF_FEATURES: u32 = 0x1;
/// Intel deterministic cache parameters leaf (indexed by subleaf).
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Extended topology enumeration leaf (indexed by subleaf).
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// V2 extended topology enumeration leaf (indexed by subleaf).
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// Hypervisor (KVM) signature leaf.
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// KVM features leaf, the least the signature leaf must announce.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// AMD address sizes and core count leaf.
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

/// Leaf 0x1 ECX: TSC-deadline timer (see [`announce_tsc_deadline`]).
pub const ECX_TSC_DEADLINE_BIT: u32 = 24;
/// Leaf 0x1 ECX: XSAVE supported (left as the host reports it).
pub const ECX_XSAVE_BIT: u32 = 26;
/// Leaf 0x1 ECX: OS has enabled XSAVE (CR4.OSXSAVE); cleared here.
pub const ECX_OSXSAVE_BIT: u32 = 27;
/// Leaf 0x1 ECX: running under a hypervisor; set here.
pub const ECX_HYPERVISOR_BIT: u32 = 31;
/// Leaf 0x1 EDX: hyper-threading / multi-core package (HTT).
pub const EDX_HTT_BIT: u32 = 28;
/// Leaf 0x1 EDX: machine check exception (CR4.MCE, #MC).
pub const EDX_MCE_BIT: u32 = 7;
/// Leaf 0x1 EDX: machine check architecture (MCG_CAP and the banks).
pub const EDX_MCA_BIT: u32 = 14;

/// Leaf 0x1 EBX: CLFLUSH line size in 8-byte units (8 = 64 bytes).
const CLFLUSH_SIZE: u32 = 8;

/// Leaf 0xB/0x1F ECX[15:8] level types.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Replaces bits `lo..=hi` of `value` with `field` (truncated to fit).
fn set_bits(value: u32, lo: u32, hi: u32, field: u32) -> u32 {
    let width = hi - lo + 1;
    let mask = if width >= 32 {
        u32::MAX
    } else {
        ((1u32 << width) - 1) << lo
    };
    (value & !mask) | ((field << lo) & mask)
}

/// Number of APIC ID bits needed to tell `count` items apart:
/// ceil(log2(count)), 0 for 0 or 1.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

/// Leaf 0x1: APIC ID, logical processor count, HTT, CLFLUSH, hypervisor,
/// OSXSAVE.
fn fix_features(entry: &mut kvm_cpuid_entry2, vcpu_id: u8, num_vcpus: u8) {
    entry.ebx = set_bits(entry.ebx, 24, 31, u32::from(vcpu_id));
    entry.ebx = set_bits(entry.ebx, 16, 23, u32::from(num_vcpus));
    entry.ebx = set_bits(entry.ebx, 8, 15, CLFLUSH_SIZE);
    if num_vcpus > 1 {
        entry.edx |= 1 << EDX_HTT_BIT;
    } else {
        entry.edx &= !(1 << EDX_HTT_BIT);
    }
    entry.ecx |= 1 << ECX_HYPERVISOR_BIT;
    entry.ecx &= !(1 << ECX_OSXSAVE_BIT);
    // XSAVE (bit 26) and TSC-deadline (bit 24) stay as given.
}

/// Leaf 0x4 (one subleaf): cores per package and threads sharing the cache.
fn fix_cache_params(entry: &mut kvm_cpuid_entry2, num_vcpus: u8) {
    // Cache type 0 marks the end of the list: leave that descriptor empty.
    if entry.eax & 0x1f == 0 {
        return;
    }
    let cores_minus_one = u32::from(num_vcpus.saturating_sub(1));
    let level = (entry.eax >> 5) & 0x7;
    let sharing_minus_one = if level >= 3 { cores_minus_one } else { 0 };
    entry.eax = set_bits(entry.eax, 26, 31, cores_minus_one.min(0x3f));
    entry.eax = set_bits(entry.eax, 14, 25, sharing_minus_one);
}

/// Leaves 0xB and 0x1F (one subleaf): SMT level of one thread, core level of
/// `num_vcpus` cores, nothing above.
fn fix_ext_topology(entry: &mut kvm_cpuid_entry2, vcpu_id: u8, num_vcpus: u8) {
    let subleaf = entry.index;
    let (eax, ebx, level_type) = match subleaf {
        0 => (0, 1, LEVEL_TYPE_SMT),
        1 => (
            id_bits(u32::from(num_vcpus)),
            u32::from(num_vcpus),
            LEVEL_TYPE_CORE,
        ),
        _ => (0, 0, LEVEL_TYPE_INVALID),
    };
    entry.eax = eax;
    entry.ebx = ebx;
    entry.ecx = (subleaf & 0xff) | (level_type << 8);
    entry.edx = u32::from(vcpu_id);
}

/// Leaf 0x8000_0008: ECX[7:0] = number of cores - 1 (AMD).
fn fix_amd_sizes(entry: &mut kvm_cpuid_entry2, num_vcpus: u8) {
    entry.ecx = set_bits(entry.ecx, 0, 7, u32::from(num_vcpus.saturating_sub(1)));
}

/// Adapts `cpuid` (as returned by `KVM_GET_SUPPORTED_CPUID`) for vCPU
/// `vcpu_id` of a VM with `num_vcpus` vCPUs, in place.
///
/// The guest sees one package of `num_vcpus` single-threaded cores whose
/// APIC IDs are `0..num_vcpus`; this vCPU's initial and x2APIC ID is
/// `vcpu_id`. See the module docs for the leaves touched. Leaves absent from
/// `cpuid` are left absent; none are added.
pub fn configure_vcpu_cpuid(cpuid: &mut CpuId, vcpu_id: u8, num_vcpus: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => fix_features(entry, vcpu_id, num_vcpus),
            LEAF_CACHE_PARAMS => fix_cache_params(entry, num_vcpus),
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => fix_ext_topology(entry, vcpu_id, num_vcpus),
            LEAF_HYPERVISOR => entry.eax = entry.eax.max(LEAF_KVM_FEATURES),
            LEAF_AMD_SIZES => fix_amd_sizes(entry, num_vcpus),
            _ => {}
        }
    }
}

/// Announces machine checks (MCE and MCA) to the guest. For vCPUs set up
/// with `KVM_X86_SETUP_MCE`: KVM emulates the banks and `#MC` delivery
/// itself, whatever the host reports (a nested host under TCG leaves MCE
/// out of `KVM_GET_SUPPORTED_CPUID`, and a guest that does not see it never
/// sets CR4.MCE, so an injected machine check would shut it down).
///
/// Also sets SUCCOR (leaf 0x8000_0007 EBX bit 1, "software uncorrectable
/// error containment and recovery", an AMD bit that Intel leaves
/// reserved), as QEMU does for its AMD models: without it an AMD guest
/// kernel treats every uncorrected error as fatal.
pub fn announce_machine_checks(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => entry.edx |= (1 << EDX_MCE_BIT) | (1 << EDX_MCA_BIT),
            LEAF_RAS => entry.ebx |= 1 << EBX_SUCCOR_BIT,
            _ => {}
        }
    }
}

/// Announces the TSC-deadline timer, for a KVM that emulates it
/// (`KVM_CAP_TSC_DEADLINE_TIMER`, with the in-kernel local APIC), as QEMU
/// and Firecracker do: `KVM_GET_SUPPORTED_CPUID` leaves it out. A Linux
/// guest without it calibrates its local APIC timer at boot, a 100 ms busy
/// wait (and more, in exits, under nested virtualization), and reprograms
/// the timer through the APIC's counter instead of one MSR write.
pub fn announce_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES {
            entry.ecx |= 1 << ECX_TSC_DEADLINE_BIT;
        }
    }
}

/// Leaf 0x8000_0007: advanced power management and RAS.
const LEAF_RAS: u32 = 0x8000_0007;
/// Leaf 0x8000_0007 EBX: SUCCOR.
pub const EBX_SUCCOR_BIT: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn subleaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx,
            edx: 0x55,
            ..Default::default()
        }
    }

    /// Cache descriptor EAX: type, level, self-initializing, and host
    /// topology bits that must be overwritten.
    fn cache_eax(cache_type: u32, level: u32) -> u32 {
        (0x3f << 26) | (0xfff << 14) | (1 << 8) | (level << 5) | cache_type
    }

    /// A host-like CPUID: 16 host threads, XSAVE and OSXSAVE on, no
    /// TSC-deadline.
    fn host_cpuid() -> CpuId {
        CpuId::from_entries(&[
            leaf(0x0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(
                0x1,
                0x000a_0655,
                (0x0f << 24) | (16 << 16) | (4 << 8) | 0x01,
                (1 << ECX_XSAVE_BIT) | (1 << ECX_OSXSAVE_BIT) | 1,
                (1 << EDX_HTT_BIT) | 1,
            ),
            subleaf(0x4, 0, cache_eax(1, 1), 0x01c0_003f, 0x3f),
            subleaf(0x4, 1, cache_eax(2, 1), 0x01c0_003f, 0x3f),
            subleaf(0x4, 2, cache_eax(3, 2), 0x01c0_003f, 0x3ff),
            subleaf(0x4, 3, cache_eax(3, 3), 0x03c0_003f, 0x3fff),
            subleaf(0x4, 4, 0, 0, 0),
            subleaf(0xb, 0, 1, 2, 0x100),
            subleaf(0xb, 1, 4, 16, 0x201),
            subleaf(0xb, 2, 0, 0, 2),
            leaf(0x4000_0000, 0, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x8000_0008, 0x3030, 0, 0x700f, 0),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn tsc_deadline_is_announced_in_leaf_1_only() {
        let mut cpuid = host_cpuid();
        let before = cpuid.clone();
        announce_tsc_deadline(&mut cpuid);
        for (a, b) in cpuid.as_slice().iter().zip(before.as_slice()) {
            if a.function == 0x1 {
                assert_eq!(a.ecx, b.ecx | (1 << ECX_TSC_DEADLINE_BIT));
                assert_eq!((a.eax, a.ebx, a.edx), (b.eax, b.ebx, b.edx));
            } else {
                assert_eq!(a, b, "leaf {:#x} untouched", a.function);
            }
        }
    }

    #[test]
    fn leaf_1_topology_and_feature_bits() {
        let mut cpuid = host_cpuid();
        configure_vcpu_cpuid(&mut cpuid, 2, 4);
        let e = find(&cpuid, 0x1, 0);
        assert_eq!(e.ebx >> 24, 2, "initial APIC id");
        assert_eq!((e.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!((e.ebx >> 8) & 0xff, 8, "CLFLUSH size");
        assert_eq!(e.ebx & 0xff, 1, "brand index untouched");
        assert_ne!(e.edx & (1 << EDX_HTT_BIT), 0, "HTT");
        assert_ne!(e.ecx & (1 << ECX_HYPERVISOR_BIT), 0, "hypervisor");
        assert_eq!(e.ecx & (1 << ECX_OSXSAVE_BIT), 0, "OSXSAVE cleared");
        assert_ne!(e.ecx & (1 << ECX_XSAVE_BIT), 0, "XSAVE kept");
        assert_eq!(e.ecx & (1 << ECX_TSC_DEADLINE_BIT), 0, "no TSC-deadline");
        assert_eq!(e.ecx & 1, 1, "other bits kept");
        assert_eq!(e.eax, 0x000a_0655, "signature kept");
    }

    #[test]
    fn leaf_1_tsc_deadline_kept_and_single_vcpu_has_no_htt() {
        let mut cpuid = host_cpuid();
        for e in cpuid.as_mut_slice() {
            if e.function == 0x1 {
                e.ecx |= 1 << ECX_TSC_DEADLINE_BIT;
            }
        }
        configure_vcpu_cpuid(&mut cpuid, 0, 1);
        let e = find(&cpuid, 0x1, 0);
        assert_ne!(e.ecx & (1 << ECX_TSC_DEADLINE_BIT), 0);
        assert_eq!(e.edx & (1 << EDX_HTT_BIT), 0);
        assert_eq!(e.ebx >> 24, 0);
        assert_eq!((e.ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn leaf_4_cache_topology() {
        let mut cpuid = host_cpuid();
        configure_vcpu_cpuid(&mut cpuid, 2, 4);
        for index in 0..4 {
            let e = find(&cpuid, 0x4, index);
            let level = (e.eax >> 5) & 7;
            assert_eq!(e.eax >> 26, 3, "cores per package - 1, subleaf {index}");
            let sharing = (e.eax >> 14) & 0xfff;
            assert_eq!(sharing, if level == 3 { 3 } else { 0 }, "subleaf {index}");
            let host = find(&host_cpuid(), 0x4, index);
            assert_eq!(e.eax & 0x3fff, host.eax & 0x3fff, "type and level kept");
            assert_eq!((e.ebx, e.ecx), (host.ebx, host.ecx));
        }
        assert_eq!(find(&cpuid, 0x4, 4).eax, 0, "null descriptor untouched");
    }

    #[test]
    fn leaf_b_extended_topology() {
        let mut cpuid = host_cpuid();
        configure_vcpu_cpuid(&mut cpuid, 2, 4);
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 2));
    }

    #[test]
    fn core_level_shift_rounds_up() {
        for (n, shift) in [(1u8, 0u32), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4)] {
            let mut cpuid = host_cpuid();
            configure_vcpu_cpuid(&mut cpuid, 0, n);
            assert_eq!(find(&cpuid, 0xb, 1).eax, shift, "{n} vCPUs");
        }
    }

    #[test]
    fn leaf_1f_like_leaf_b() {
        let mut cpuid = CpuId::from_entries(&[
            subleaf(0x1f, 0, 1, 2, 0x100),
            subleaf(0x1f, 1, 4, 16, 0x201),
            subleaf(0x1f, 2, 7, 16, 0x502),
        ])
        .unwrap();
        configure_vcpu_cpuid(&mut cpuid, 3, 4);
        let e = find(&cpuid, 0x1f, 1);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (2, 4, 0x201, 3));
        let e = find(&cpuid, 0x1f, 2);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 2, 3));
    }

    #[test]
    fn amd_core_count_and_kvm_leaf() {
        let mut cpuid = host_cpuid();
        configure_vcpu_cpuid(&mut cpuid, 2, 4);
        let e = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(e.ecx, 0x7003, "NC = 3, the rest kept");
        assert_eq!(e.eax, 0x3030);
        let kvm = find(&cpuid, 0x4000_0000, 0);
        assert_eq!(kvm.eax, 0x4000_0001);
        assert_eq!(
            (kvm.ebx, kvm.ecx, kvm.edx),
            (0x4b4d_564b, 0x564b_4d56, 0x4d)
        );
    }

    #[test]
    fn kvm_leaf_max_not_lowered() {
        let mut cpuid = CpuId::from_entries(&[leaf(0x4000_0000, 0x4000_0010, 0, 0, 0)]).unwrap();
        configure_vcpu_cpuid(&mut cpuid, 0, 1);
        assert_eq!(find(&cpuid, 0x4000_0000, 0).eax, 0x4000_0010);
    }

    #[test]
    fn missing_leaves_are_skipped() {
        let mut cpuid = CpuId::from_entries(&[leaf(0x1, 0, 0, 0, 0)]).unwrap();
        configure_vcpu_cpuid(&mut cpuid, 2, 4);
        assert_eq!(cpuid.as_slice().len(), 1);
        assert_eq!(find(&cpuid, 0x1, 0).ebx >> 24, 2);

        let mut empty = CpuId::new(0).unwrap();
        configure_vcpu_cpuid(&mut empty, 0, 1);
        assert!(empty.as_slice().is_empty());
    }

    #[test]
    fn bit_helpers() {
        assert_eq!(set_bits(0xffff_ffff, 8, 15, 0x12), 0xffff_12ff);
        assert_eq!(set_bits(0, 26, 31, 0xff), 0xfc00_0000);
        assert_eq!(set_bits(0x1234, 0, 31, 7), 7);
        assert_eq!(id_bits(0), 0);
        assert_eq!(id_bits(254), 8);
    }

    #[test]
    fn machine_checks_are_announced_with_succor() {
        let mut cpuid = CpuId::from_entries(&[
            leaf(LEAF_FEATURES, 0, 0, 0, 1 << EDX_HTT_BIT),
            leaf(0x8000_0001, 0, 0, 0, 0),
            leaf(0x8000_0007, 0, 0, 0, 0x100),
        ])
        .unwrap();
        announce_machine_checks(&mut cpuid);
        let e = cpuid.as_slice();
        assert_eq!(
            e[0].edx,
            (1 << EDX_HTT_BIT) | (1 << EDX_MCE_BIT) | (1 << EDX_MCA_BIT)
        );
        assert_eq!(e[1].edx, 0);
        assert_eq!((e[2].ebx, e[2].edx), (1 << EBX_SUCCOR_BIT, 0x100));
    }
}
