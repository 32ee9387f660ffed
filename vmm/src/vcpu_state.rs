//! A vCPU's architectural state as KVM holds it, saved for a snapshot and
//! put back into a fresh vCPU on restore.
//!
//! Everything KVM keeps per vCPU that a guest can observe: registers,
//! segment and control registers, FPU/SSE/AVX (XSAVE), XCR0, debug
//! registers, the local APIC, every MSR KVM lists (the TSC among them),
//! pending events (exceptions, NMIs, interrupt shadow), the MP state and
//! the CPUID the guest sees.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::vcpu::VcpuError;

const MSR_IA32_TSC: u32 = 0x10;

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's id (its APIC id).
    pub id: u8,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM let us read, the TSC first.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX... state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs and shadows.
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, if KVM tells it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

/// The MSRs to save: those KVM lists, the TSC first (so that a restore
/// sets it before the MSRs that are relative to it, the TSC deadline).
pub fn msrs_to_save(kvm_fd: &Kvm) -> Result<Vec<u32>, VcpuError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut v: Vec<u32> = list.as_slice().to_vec();
    v.sort_by_key(|&i| (i != MSR_IA32_TSC, i));
    v.dedup();
    Ok(v)
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuError> {
    Msrs::from_entries(entries).map_err(|e| VcpuError::State(format!("MSR list: {e:?}")))
}

/// Reads `indices`; an MSR KVM lists but cannot read here (it stops
/// `KVM_GET_MSRS` at that entry) is left out.
fn save_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = msrs_of(&entries)?;
            let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
            out.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
            // Entry n could not be read: skip it and go on after it.
            rest = rest.get(n + 1..).unwrap_or(&[]);
        }
    }
    Ok(out)
}

/// Saves vCPU `id`'s state; `msrs` from [`msrs_to_save`]. Call it on a
/// vCPU that is out of `KVM_RUN` with its pending I/O completed.
pub fn save(vcpu: &VcpuFd, id: u8, msrs: &[u32]) -> Result<VcpuState, VcpuError> {
    // The order Firecracker and Cloud Hypervisor use: events and MP state
    // first, so that what they describe matches the registers read after.
    let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    Ok(VcpuState {
        id,
        events,
        mp_state,
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        debug_regs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs: save_msrs(vcpu, msrs)?,
        cpuid: vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// Puts `state` into a fresh vCPU (created, not yet run).
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuError> {
    if state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(VcpuError::State(format!(
            "{} CPUID entries (at most {KVM_MAX_CPUID_ENTRIES})",
            state.cpuid.len()
        )));
    }
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|e| VcpuError::State(format!("CPUID: {e:?}")))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            vcpu.set_tsc_khz(khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
        }
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: KVM_SET_XSAVE reads more than the 4 KiB `kvm_xsave` only
    // for a process that was granted dynamic XSTATE features (AMX, through
    // arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)), which this VMM never asks
    // for; so the kernel reads exactly `state.xsave`, a whole struct, and
    // checks its contents (reserved bits, XSTATE_BV) itself.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let n = vcpu
            .set_msrs(&msrs_of(chunk)?)
            .map_err(kvm("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(VcpuError::State(format!(
                "KVM refused MSR {:#x} (value {:#x})",
                chunk[n].index, chunk[n].data
            )));
        }
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
