//! Machine checks for guest pages that cannot be served.
//!
//! The fault handler poisons a page it cannot serve (`UFFDIO_POISON`). A
//! vCPU that touches it makes KVM send its thread `SIGBUS` with
//! `BUS_MCEERR_AR` and the host address; [`crate::sigbus`] records that on
//! the vCPU's slot, `KVM_RUN` returns `EINTR`, and the vCPU loop injects the
//! machine check built here into the guest, as QEMU does
//! (`kvm_arch_on_sigbus_vcpu` / `kvm_mce_inject` in
//! `target/i386/kvm/kvm.c`): an uncorrected, action-required data-load
//! error (MCACOD 0x134) in bank 9, with the guest-physical address and a
//! 4 KiB recovery unit, for the guest kernel to kill the task that touched
//! the page and offline it.

use kvm_bindings::kvm_x86_mce;
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_X86_SETUP_MCE, KVMIO, 0x9c, u64);
ioctl_ior_nr!(KVM_X86_GET_MCE_CAP_SUPPORTED, KVMIO, 0x9d, u64);
ioctl_iow_nr!(KVM_X86_SET_MCE, KVMIO, 0x9e, kvm_x86_mce);

/// `IA32_MCG_CAP`: `IA32_MCG_CTL` present.
pub const MCG_CTL_P: u64 = 1 << 8;
/// `IA32_MCG_CAP`: software error recovery (the S and AR status bits).
pub const MCG_SER_P: u64 = 1 << 24;
/// Banks the guest gets (QEMU's default, `MCE_BANKS_DEF`).
pub const MCE_BANKS: u64 = 10;
/// The bank QEMU reports memory errors in.
pub const MCE_BANK: u8 = 9;

/// `IA32_MCG_STATUS`: restart IP valid.
pub const MCG_STATUS_RIPV: u64 = 1 << 0;
/// `IA32_MCG_STATUS`: error IP valid (the error is at the interrupted IP).
pub const MCG_STATUS_EIPV: u64 = 1 << 1;
/// `IA32_MCG_STATUS`: machine check in progress.
pub const MCG_STATUS_MCIP: u64 = 1 << 2;

/// `IA32_MCi_STATUS` bits.
pub const MCI_STATUS_VAL: u64 = 1 << 63;
/// Uncorrected.
pub const MCI_STATUS_UC: u64 = 1 << 61;
/// Error reporting enabled.
pub const MCI_STATUS_EN: u64 = 1 << 60;
/// `IA32_MCi_MISC` valid.
pub const MCI_STATUS_MISCV: u64 = 1 << 59;
/// `IA32_MCi_ADDR` valid.
pub const MCI_STATUS_ADDRV: u64 = 1 << 58;
/// Signalled (software recoverable, SRAR/SRAO).
pub const MCI_STATUS_S: u64 = 1 << 56;
/// Action required.
pub const MCI_STATUS_AR: u64 = 1 << 55;
/// MCA error code of a data load that consumed poison (SRAR data load).
pub const MCACOD_DATA_LOAD: u64 = 0x134;
/// `IA32_MCi_MISC` address mode: physical address.
pub const MCM_ADDR_PHYS: u64 = 2;
/// The recovery unit QEMU reports: a 4 KiB page.
pub const MCE_PAGE_SHIFT: u64 = 12;

/// The machine check capabilities a vCPU gets out of what KVM supports:
/// QEMU's default (`MCG_CTL_P | MCG_SER_P`) where supported, ten banks.
pub fn mcg_cap(supported: u64) -> u64 {
    (supported & (MCG_CTL_P | MCG_SER_P)) | MCE_BANKS
}

/// KVM's supported `IA32_MCG_CAP`, or `None` when it emulates no machine
/// checks (`KVM_CAP_MCE` missing or too few banks).
pub fn supported(kvm: &Kvm) -> Option<u64> {
    let banks = kvm.check_extension_int(kvm_ioctls::Cap::Mce);
    if banks < MCE_BANKS as i32 {
        return None;
    }
    let mut cap: u64 = 0;
    // SAFETY: KVM_X86_GET_MCE_CAP_SUPPORTED writes one u64 through the
    // pointer, which refers to `cap`; the fd is /dev/kvm.
    let rc = unsafe { ioctl_with_mut_ref(kvm, KVM_X86_GET_MCE_CAP_SUPPORTED(), &mut cap) };
    (rc == 0).then_some(cap)
}

/// Enables machine checks on a new vCPU (`KVM_X86_SETUP_MCE`) with
/// `mcg_cap` (see [`mcg_cap`]); the vCPU's CPUID keeps the MCE/MCA bits KVM
/// reports.
pub fn setup(vcpu: &VcpuFd, mcg_cap: u64) -> std::io::Result<()> {
    // SAFETY: KVM_X86_SETUP_MCE reads one u64 through the pointer, which
    // refers to `mcg_cap`; the fd is a vCPU's.
    let rc = unsafe { ioctl_with_ref(vcpu, KVM_X86_SETUP_MCE(), &mcg_cap) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The machine check QEMU injects for an action-required memory error at
/// guest-physical `gpa` on an Intel-style vCPU (`kvm_mce_inject` with
/// `BUS_MCEERR_AR`).
pub fn action_required(gpa: u64) -> kvm_x86_mce {
    kvm_x86_mce {
        status: MCI_STATUS_VAL
            | MCI_STATUS_UC
            | MCI_STATUS_EN
            | MCI_STATUS_MISCV
            | MCI_STATUS_ADDRV
            | MCI_STATUS_S
            | MCI_STATUS_AR
            | MCACOD_DATA_LOAD,
        addr: gpa & !((1 << MCE_PAGE_SHIFT) - 1),
        misc: (MCM_ADDR_PHYS << 6) | MCE_PAGE_SHIFT,
        mcg_status: MCG_STATUS_MCIP | MCG_STATUS_RIPV | MCG_STATUS_EIPV,
        bank: MCE_BANK,
        ..Default::default()
    }
}

/// The machine check QEMU injects for an action-optional memory error
/// (`BUS_MCEERR_AO`: found, not consumed): MCACOD 0xc0 (memory scrubbing),
/// the interrupted IP restartable.
pub fn action_optional(gpa: u64) -> kvm_x86_mce {
    kvm_x86_mce {
        status: (action_required(gpa).status & !(MCI_STATUS_AR | 0xffff)) | 0xc0,
        mcg_status: MCG_STATUS_MCIP | MCG_STATUS_RIPV,
        ..action_required(gpa)
    }
}

/// The machine check QEMU injects for an action-required memory error on
/// an AMD vCPU: AMD's banks have no S/AR bits or Intel error codes, so the
/// status is VAL | UC | EN | MISCV | ADDRV, with both IPs valid. (QEMU
/// injects nothing for an action-optional error on AMD, which would make
/// the guest kernel panic.) The guest kernel treats it as recoverable only
/// with CPUID's SUCCOR bit, see [`crate::cpuid::announce_machine_checks`].
pub fn action_required_amd(gpa: u64) -> kvm_x86_mce {
    kvm_x86_mce {
        status: MCI_STATUS_VAL
            | MCI_STATUS_UC
            | MCI_STATUS_EN
            | MCI_STATUS_MISCV
            | MCI_STATUS_ADDRV,
        ..action_required(gpa)
    }
}

/// Whether `cpuid` names an AMD (or Hygon) processor: machine checks are
/// injected the AMD way there ([`action_required_amd`]).
pub fn is_amd(cpuid: &kvm_bindings::CpuId) -> bool {
    cpuid.as_slice().iter().any(|e| {
        e.function == 0
            && ((e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
                || (e.ebx, e.edx, e.ecx) == (0x6f67_7948, 0x6e65_476e, 0x656e_6975))
    })
}

/// How a guest's machine checks are built: its CPU vendor's way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// Intel (and any vendor but AMD's): software-recoverable status bits.
    Intel,
    /// AMD and Hygon: see [`action_required_amd`].
    Amd,
}

impl Flavour {
    /// The flavour of vCPUs given `cpuid`.
    pub fn of(cpuid: &kvm_bindings::CpuId) -> Self {
        if is_amd(cpuid) {
            Flavour::Amd
        } else {
            Flavour::Intel
        }
    }

    /// The machine check for a memory error at `gpa` (`consumed`:
    /// `BUS_MCEERR_AR`, else `BUS_MCEERR_AO`), or `None` where none is
    /// injected: as QEMU, none for an action-optional error on AMD, whose
    /// guest kernels panic on it (the page stays poisoned for its next
    /// touch).
    pub fn memory_error(self, gpa: u64, consumed: bool) -> Option<kvm_x86_mce> {
        match (self, consumed) {
            (Flavour::Intel, true) => Some(action_required(gpa)),
            (Flavour::Intel, false) => Some(action_optional(gpa)),
            (Flavour::Amd, true) => Some(action_required_amd(gpa)),
            (Flavour::Amd, false) => None,
        }
    }
}

/// Injects `mce` into the vCPU (`KVM_X86_SET_MCE`). KVM queues a #MC, or,
/// when the guest cannot take one (CR4.MCE clear, or a machine check
/// already in progress), makes the vCPU triple-fault (a shutdown exit).
pub fn inject(vcpu: &VcpuFd, mce: &kvm_x86_mce) -> std::io::Result<()> {
    // SAFETY: KVM_X86_SET_MCE reads one kvm_x86_mce through the pointer,
    // which refers to `mce`; the fd is a vCPU's.
    let rc = unsafe { ioctl_with_ref(vcpu, KVM_X86_SET_MCE(), mce) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The ioctl request numbers, for the vCPU's seccomp filter.
pub(crate) fn set_mce_request() -> u64 {
    KVM_X86_SET_MCE()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values QEMU's `kvm_mce_inject` uses for `BUS_MCEERR_AR` on an
    /// Intel vCPU (status 0xbd80_0000_0000_0134, MCG status MCIP | EIPV |
    /// RIPV, misc 0x8c, bank 9).
    #[test]
    fn an_action_required_machine_check_is_what_qemu_injects() {
        let m = action_required(0x1234_5678);
        assert_eq!(m.status, 0xbd80_0000_0000_0134);
        assert_eq!(m.mcg_status, 0b111);
        assert_eq!(m.addr, 0x1234_5000);
        assert_eq!(m.misc, 0x8c);
        assert_eq!(m.bank, 9);
        let o = action_optional(0x1234_5678);
        assert_eq!(o.status, 0xbd00_0000_0000_00c0);
        assert_eq!(o.mcg_status, MCG_STATUS_MCIP | MCG_STATUS_RIPV);
        assert_eq!((o.addr, o.misc, o.bank), (0x1234_5000, 0x8c, 9));
    }

    /// QEMU's values for an AMD vCPU (`IS_AMD_CPU` in `kvm_mce_inject`).
    #[test]
    fn an_amd_machine_check_carries_no_intel_only_bits() {
        let m = action_required_amd(0x1234_5678);
        assert_eq!(m.status, 0xbc00_0000_0000_0000);
        assert_eq!(
            m.mcg_status,
            MCG_STATUS_MCIP | MCG_STATUS_RIPV | MCG_STATUS_EIPV
        );
        assert_eq!((m.addr, m.misc, m.bank), (0x1234_5000, 0x8c, 9));
        let vendor = |ebx, edx, ecx| {
            kvm_bindings::CpuId::from_entries(&[kvm_bindings::kvm_cpuid_entry2 {
                function: 0,
                ebx,
                edx,
                ecx,
                ..Default::default()
            }])
            .unwrap()
        };
        // "AuthenticAMD", "HygonGenuine", "GenuineIntel".
        assert!(is_amd(&vendor(0x6874_7541, 0x6974_6e65, 0x444d_4163)));
        assert!(is_amd(&vendor(0x6f67_7948, 0x6e65_476e, 0x656e_6975)));
        assert!(!is_amd(&vendor(0x756e_6547, 0x4965_6e69, 0x6c65_746e)));
        let amd = Flavour::of(&vendor(0x6874_7541, 0x6974_6e65, 0x444d_4163));
        assert_eq!(amd, Flavour::Amd);
        assert_eq!(
            amd.memory_error(0x1234_5678, true).unwrap().status,
            m.status
        );
        assert!(amd.memory_error(0x1234_5678, false).is_none());
        let intel = Flavour::of(&vendor(0x756e_6547, 0x4965_6e69, 0x6c65_746e));
        assert_eq!(
            intel.memory_error(0x1234_5678, true).unwrap().status,
            action_required(0).status
        );
        assert_eq!(
            intel.memory_error(0x1234_5678, false).unwrap().status,
            action_optional(0).status
        );
    }

    #[test]
    fn the_capabilities_are_qemus_default_within_what_kvm_supports() {
        assert_eq!(mcg_cap(0x0900_0d00 | 32), MCG_CTL_P | MCG_SER_P | 10);
        assert_eq!(mcg_cap(MCG_CTL_P), MCG_CTL_P | 10);
    }

    #[test]
    fn kvm_emulates_machine_checks_here() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let cap = supported(&kvm).expect("KVM_CAP_MCE with ten banks");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup(&vcpu, mcg_cap(cap)).unwrap();
        eprintln!("MCG_CAP supported {cap:#x}, set {:#x}", mcg_cap(cap));
    }
}
