//! The KVM side of a VM: the VM file descriptor with its in-kernel devices
//! (irqchip, PIT) and their state, the memory slots over guest RAM, and the
//! vCPU fds.

use guest_mem::GuestMem;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::error::{kvm_err, VmError};
use crate::layout::{KVM_IDENTITY_MAP, KVM_TSS, MAX_VCPUS};
use crate::vcpu;

/// Opens `/dev/kvm` and checks that it can run `vcpus` vCPUs with what this
/// VMM relies on.
pub fn open_kvm(vcpus: u8) -> Result<Kvm, VmError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(VmError::Config(format!(
            "{vcpus} vCPUs requested; between 1 and {MAX_VCPUS} are supported"
        )));
    }
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    for cap in [Cap::Irqchip, Cap::UserMemory, Cap::Irqfd, Cap::Ioeventfd] {
        if !kvm.check_extension(cap) {
            return Err(VmError::Config(format!("KVM lacks {cap:?}")));
        }
    }
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(VmError::Config(format!(
            "{vcpus} vCPUs requested; KVM allows {max}"
        )));
    }
    Ok(kvm)
}

/// A VM being created on a thread of its own. In a nested L1,
/// `KVM_CREATE_VM` waits in the kernel for most of the 18-31 ms it takes
/// (2-4 ms of CPU): time the VMM spends building guest memory and placing
/// the boot images instead of waiting.
pub struct PendingVm(Pending);

enum Pending {
    Thread(std::thread::JoinHandle<Result<(Kvm, VmFd), VmError>>),
    /// The thread could not be spawned: created in place.
    Done(Result<(Kvm, VmFd), VmError>),
}

impl PendingVm {
    /// Opens KVM and creates a VM for `vcpus` vCPUs ([`open_kvm`],
    /// [`create_vm`]) in the background.
    pub fn spawn(vcpus: u8) -> PendingVm {
        let create = move || {
            let kvm = open_kvm(vcpus)?;
            let started = std::time::Instant::now();
            let fd = create_vm(&kvm)?;
            log::debug!(
                "KVM VM created in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
            Ok((kvm, fd))
        };
        match std::thread::Builder::new()
            .name("vm-create".into())
            .spawn(create)
        {
            Ok(h) => PendingVm(Pending::Thread(h)),
            Err(e) => {
                log::debug!("creating the VM in place: no thread for it ({e})");
                PendingVm(Pending::Done(create()))
            }
        }
    }

    /// Waits for the VM.
    pub fn join(self) -> Result<(Kvm, VmFd), VmError> {
        match self.0 {
            Pending::Thread(h) => h
                .join()
                .unwrap_or_else(|_| Err(VmError::Config("creating the VM panicked".into()))),
            Pending::Done(r) => r,
        }
    }
}

/// Creates the VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    fd.set_tss_address(KVM_TSS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.set_identity_map_address(KVM_IDENTITY_MAP)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    fd.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    fd.create_pit2(kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    narrow_slot_zaps(&fd);
    Ok(fd)
}

/// Asks KVM to drop only a deleted memory slot's mappings, not every
/// mapping of the guest, where the host kernel lets it be asked (Linux
/// 6.12+). Unplugging virtio-mem memory deletes slots; under the
/// `KVM_X86_QUIRK_SLOT_ZAP_ALL` default every one makes the guest fault
/// back its whole working set (under nested paging, an exit per page).
/// Returns whether the quirk is now off.
pub fn narrow_slot_zaps(fd: &VmFd) -> bool {
    let quirk = kvm_bindings::KVM_X86_QUIRK_SLOT_ZAP_ALL;
    let can = fd.check_extension_raw(kvm_bindings::KVM_CAP_DISABLE_QUIRKS2.into());
    if can <= 0 || can as u32 & quirk == 0 {
        log::debug!("KVM cannot leave other memory slots mapped when one is deleted");
        return false;
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_DISABLE_QUIRKS2,
        ..Default::default()
    };
    cap.args[0] = quirk.into();
    match fd.enable_cap(&cap) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("disabling KVM_X86_QUIRK_SLOT_ZAP_ALL: {e}");
            false
        }
    }
}

/// Gives each of the first `count` regions of `mem` one memory slot over its
/// whole mapping (slot number = region index). The virtio-mem window is
/// left out: its [`HotplugWindow`](crate::hotplug_window::HotplugWindow)
/// maps it as its guard wants (one slot, or one per plugged extent).
///
/// The caller must drop `fd` (and every vCPU fd) before `mem`.
pub fn map_regions(fd: &VmFd, mem: &GuestMem, count: usize) -> Result<(), VmError> {
    for (slot, r) in mem.regions().iter().enumerate().take(count) {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.guest_base().0,
            memory_size: r.max_size(),
            userspace_addr: r.host_addr(),
        };
        // SAFETY: the host range is the region's own mapping (max_size
        // bytes), which lives in `mem`; the caller drops its vCPU and VM fds
        // before `mem` (the Vm's field order), and no other memslot covers
        // these guest addresses (regions are disjoint).
        unsafe { fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The CPUID KVM supports on this host, with the TSC-deadline timer where
/// KVM emulates it (every VM has the in-kernel local APIC), which
/// `KVM_GET_SUPPORTED_CPUID` leaves out on the L1's 6.1 kernel (its API
/// documentation says it always does; newer hosts report it).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        crate::cpuid::announce_tsc_deadline(&mut cpuid);
    }
    Ok(cpuid)
}

/// Creates `count` vCPUs with the set-up every guest shares (CPUID, MSRs,
/// FPU, LAPIC), and machine checks (`KVM_X86_SETUP_MCE`) with `mcg_cap`
/// when KVM emulates them (see [`crate::mce`]). A restored VM is built the
/// same way, so its vCPUs get the same `IA32_MCG_CAP` (which is not an MSR
/// KVM lets a snapshot set) before their MSRs are restored.
pub fn create_vcpus(
    fd: &VmFd,
    cpuid: &CpuId,
    count: u8,
    mcg_cap: Option<u64>,
) -> Result<Vec<VcpuFd>, VmError> {
    let mut cpuid = cpuid.clone();
    if mcg_cap.is_some() {
        crate::cpuid::announce_machine_checks(&mut cpuid);
    }
    (0..count)
        .map(|id| {
            let v = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            if let Some(cap) = mcg_cap {
                crate::mce::setup(&v, cap).map_err(|e| {
                    VmError::Config(format!("vCPU {id}: KVM_X86_SETUP_MCE {cap:#x}: {e}"))
                })?;
            }
            vcpu::configure_common(&v, &cpuid, id, count)?;
            Ok(v)
        })
        .collect()
}

/// The in-kernel devices' state: PICs, IOAPIC, PIT and the KVM clock.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock: the guest's nanoseconds since boot.
    pub clock: kvm_clock_data,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Saves the VM's in-kernel device state. The vCPUs must be paused, so
/// that no interrupt is delivered halfway.
pub fn save_state(fd: &VmFd) -> Result<VmState, VmError> {
    Ok(VmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Puts saved state into a fresh VM (irqchip and PIT created).
pub fn restore_state(fd: &VmFd, state: &VmState) -> Result<(), VmError> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(VmError::Config(format!(
                "saved irqchip {} where chip {id} belongs",
                chip.chip_id
            )));
        }
        fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // The clock carries on from the saved value; the flags described the
    // old host's reading (TSC stability, realtime), not a request.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_created_in_the_background_is_the_same_vm_or_the_same_error() {
        let e = PendingVm::spawn(0).join().expect_err("0 vCPUs refused");
        assert!(e.to_string().contains("0 vCPUs requested"), "{e}");
        if Kvm::new().is_err() {
            return;
        }
        let (_kvm, fd) = PendingVm::spawn(2).join().expect("a VM");
        // Set up as create_vm does: the in-kernel irqchip is there.
        assert!(fd.create_irq_chip().is_err(), "irqchip created twice");
    }

    #[test]
    fn slot_deletions_zap_only_their_slot_where_kvm_allows() {
        let Ok(kvm) = Kvm::new() else { return };
        let fd = kvm.create_vm().unwrap();
        let offered = fd.check_extension_raw(kvm_bindings::KVM_CAP_DISABLE_QUIRKS2.into());
        let expected =
            offered > 0 && offered as u32 & kvm_bindings::KVM_X86_QUIRK_SLOT_ZAP_ALL != 0;
        assert_eq!(narrow_slot_zaps(&fd), expected);
    }

    #[test]
    fn vcpus_with_machine_checks_announce_them_in_cpuid() {
        let Ok(kvm) = Kvm::new() else { return };
        let Some(cap) = crate::mce::supported(&kvm).map(crate::mce::mcg_cap) else {
            return;
        };
        let fd = create_vm(&kvm).unwrap();
        let mut cpuid = supported_cpuid(&kvm).unwrap();
        // As a host that reports no machine checks would.
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.edx &= !((1 << crate::cpuid::EDX_MCE_BIT) | (1 << crate::cpuid::EDX_MCA_BIT));
        }
        let vcpus = create_vcpus(&fd, &cpuid, 1, Some(cap)).unwrap();
        let got = vcpus[0].get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = got.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_ne!(leaf1.edx & (1 << crate::cpuid::EDX_MCE_BIT), 0, "MCE");
        assert_ne!(leaf1.edx & (1 << crate::cpuid::EDX_MCA_BIT), 0, "MCA");
    }
}
