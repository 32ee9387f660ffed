//! vCPU set-up (CPUID, MSRs, FPU, LAPIC, registers) and the run loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, CpuId, Msrs, KVM_MP_STATE_RUNNABLE,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryError};

use crate::boot::gdt::{self, segment};
use crate::boot::paging::identity_map;
use crate::cpuid::configure_vcpu_cpuid;
use crate::exit::ExitReason;
use crate::exit_profile::{ExitKind, ExitProfile};
use crate::layout::*;
use devices::bus::Bus;

/// The port a payload writes its verdict to (`out dx, eax`): 0 is success;
/// anything else is a failure code, with details in rbx, rcx and rdx.
pub const PAYLOAD_EXIT_PORT: u16 = 0xe0;
/// A payload's console: bytes written here go to the serial output.
pub const PAYLOAD_CONSOLE_PORT: u16 = 0xe9;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const X86_CR4_MCE: u64 = 1 << 6;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The cause.
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures to guest memory failed.
    #[error("writing vCPU boot structures: {0}")]
    Memory(#[from] GuestMemoryError),
    /// Saved state that KVM cannot take.
    #[error("vCPU state: {0}")]
    State(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

/// CPUID, MSRs, FPU and LAPIC set-up every vCPU gets.
pub fn configure_common(
    vcpu: &VcpuFd,
    supported: &CpuId,
    id: u8,
    count: u8,
) -> Result<(), VcpuError> {
    let mut cpuid = supported.clone();
    configure_vcpu_cpuid(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),          // fast strings
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back by default
    ]
    .map(|(index, data)| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).expect("a fixed, small MSR list");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        log::warn!(
            "vCPU {id}: KVM accepted {set} of {} boot MSRs",
            entries.len()
        );
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let cell = &mut lapic.regs[reg..reg + 4];
        let mut b = [0u8; 4];
        for (dst, src) in b.iter_mut().zip(cell.iter()) {
            *dst = *src as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (dst, src) in cell.iter_mut().zip(v.to_le_bytes()) {
            *dst = src as libc::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

/// The boot CPU's state for the Linux 64-bit boot protocol: long mode, the
/// first GiB identity-mapped, `rsi` pointing at `boot_params`.
pub fn setup_linux_boot<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    vcpu: &VcpuFd,
    mem: &M,
    entry: u64,
) -> Result<(), VcpuError> {
    let table = [0, gdt::KERNEL_CODE64, gdt::KERNEL_DATA, gdt::tss(0, 0x67)];
    write_gdt(mem, &table)?;
    identity_map(mem, PML4, 1 << 30, false)?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(1, table[1], 0);
    let data = segment(2, table[2], 0);
    long_mode_sregs(&mut sregs, code, data, segment(3, table[3], 0), table.len());
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

/// Where the payload's GDT puts its TSS (unused, but VM entry wants a TR).
const PAYLOAD_TSS: u64 = 0x600;
/// The 64-bit TSS proper; its I/O permission bitmap follows.
const TSS_HEADER: u32 = 104;
/// TSS limit: header, one bit per port, and the terminating byte.
const TSS_LIMIT: u32 = TSS_HEADER + 65536 / 8;

/// Arguments a payload vCPU starts with.
#[derive(Debug, Clone, Copy, Default)]
pub struct PayloadArgs {
    /// `rip`.
    pub entry: u64,
    /// `rsp`.
    pub stack: u64,
    /// `rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`.
    pub args: [u64; 6],
}

/// The payload GDT: null, kernel code and data, user code and data, TSS.
const PAYLOAD_GDT: [u64; 6] = [
    0,
    gdt::KERNEL_CODE64,
    gdt::KERNEL_DATA,
    gdt::USER_CODE64,
    gdt::USER_DATA,
    gdt::tss(PAYLOAD_TSS as u32, TSS_LIMIT),
];

/// What every payload vCPU shares in guest memory, written once: the GDT,
/// the TSS and page tables identity-mapping all of `[0, map_end)` with
/// 2 MiB pages (user-accessible for CPL3).
pub fn setup_payload_memory<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    mem: &M,
    map_end: u64,
    cpl3: bool,
) -> Result<(), VcpuError> {
    write_gdt(mem, &PAYLOAD_GDT)?;
    // The TSS itself, whatever guest memory held before: zero stacks and an
    // I/O permission bitmap that allows every port. KVM on this host checks
    // the bitmap for CPL3 `in`/`out` even at IOPL 3.
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[0x66..0x68].copy_from_slice(&(TSS_HEADER as u16).to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff; // the bitmap's terminating byte
    mem.write_slice(&tss, GuestAddress(PAYLOAD_TSS))?;
    identity_map(mem, PML4, map_end, cpl3)?;
    Ok(())
}

/// A payload vCPU's state over [`setup_payload_memory`]: long mode, at CPL3
/// with IOPL 3 (port I/O exits to the VMM) or at CPL0. Every vCPU is made
/// runnable at once (no INIT/SIPI).
pub fn setup_payload(vcpu: &VcpuFd, cpl3: bool, start: &PayloadArgs) -> Result<(), VcpuError> {
    let table = PAYLOAD_GDT;
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let (code, data) = if cpl3 {
        (segment(3, table[3], 3), segment(4, table[4], 3))
    } else {
        (segment(1, table[1], 0), segment(2, table[2], 0))
    };
    long_mode_sregs(&mut sregs, code, data, segment(5, table[5], 0), table.len());
    sregs.cr0 |= X86_CR0_WP;
    // Machine checks enabled, as a kernel would: a poisoned page then
    // reaches the payload as a #MC (which, without a handler, shuts it
    // down, and the VMM names the page).
    sregs.cr4 |= X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT | X86_CR4_MCE;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let [rdi, rsi, rdx, rcx, r8, r9] = start.args;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED | if cpl3 { RFLAGS_IOPL3 } else { 0 },
        rip: start.entry,
        rsp: start.stack,
        rbp: start.stack,
        rdi,
        rsi,
        rdx,
        rcx,
        r8,
        r9,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm("KVM_SET_MP_STATE"))?;
    Ok(())
}

fn write_gdt<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    mem: &M,
    table: &[u64],
) -> Result<(), GuestMemoryError> {
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))
}

fn long_mode_sregs(
    sregs: &mut kvm_sregs,
    code: kvm_bindings::kvm_segment,
    data: kvm_bindings::kvm_segment,
    tss: kvm_bindings::kvm_segment,
    entries: usize,
) {
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (entries * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// What a vCPU's run loop needs besides its fd.
pub struct VcpuContext {
    /// vCPU index.
    pub id: u8,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
    /// Where the vCPU parks while the VM is paused.
    pub gate: Arc<crate::vcpu_gate::VcpuGate>,
    /// Payload console output (port 0xe9), if any.
    pub console: Option<Arc<Mutex<Box<dyn std::io::Write + Send>>>>,
    /// Whether the guest is a payload: only then are the payload's exit and
    /// console ports live (a Linux guest writing port 0xe0 must not end the
    /// VM "cleanly"); otherwise they are ordinary, unclaimed ports.
    pub payload: bool,
    /// The vCPU takes machine checks (`KVM_X86_SETUP_MCE` succeeded), built
    /// this way: a guest page that could not be served is reported to the
    /// guest as one.
    pub mce: Option<crate::mce::Flavour>,
    /// Guest memory: tells a poisoned page the guest never plugged from
    /// one that could not be served.
    pub mem: Arc<guest_mem::GuestMem>,
}

/// A machine check injected before the last entry.
#[derive(Clone, Copy)]
struct Injected {
    page: u64,
    /// The page is not plugged (the guest broke the virtio-mem contract);
    /// else its contents could not be served.
    unplugged: bool,
}

/// Runs the vCPU until the guest stops it or the VM stops; returns why.
pub fn run(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> ExitReason {
    let mut profile = ExitProfile::new(log::log_enabled!(log::Level::Debug));
    let reason = run_loop(vcpu, ctx, &mut profile);
    if profile.enabled() {
        log::debug!("vCPU {}: {profile}", ctx.id);
    }
    reason
}

fn run_loop(vcpu: &mut VcpuFd, ctx: &VcpuContext, profile: &mut ExitProfile) -> ExitReason {
    let id = ctx.id;
    log::debug!("vCPU {id} entering the guest");
    let stopping = || ctx.stop.load(Ordering::Acquire);
    let mut injected: Option<Injected> = None;
    loop {
        ctx.gate.pass(usize::from(id), vcpu, &stopping);
        if stopping() {
            return ExitReason::Stopped;
        }
        let exit = vcpu.run();
        let since = profile.clock();
        let machine_check = injected.take();
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if ctx.payload && port == PAYLOAD_EXIT_PORT {
                    let code = read_u32(data);
                    let regs = vcpu.get_regs().unwrap_or_default();
                    return ExitReason::PayloadDone {
                        vcpu: id,
                        code,
                        detail: [regs.rbx, regs.rcx, regs.rdx],
                    };
                }
                if ctx.payload && port == PAYLOAD_CONSOLE_PORT {
                    if let Some(c) = &ctx.console {
                        let mut w = c.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = w.write_all(data);
                        let _ = w.flush();
                    }
                    continue;
                }
                ctx.pio.write(u64::from(port), data);
                profile.record(ExitKind::PioOut, u64::from(port), since);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(u64::from(port), data);
                profile.record(ExitKind::PioIn, u64::from(port), since);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio.read(addr, data);
                profile.record(ExitKind::MmioRead, addr, since);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
                profile.record(ExitKind::MmioWrite, addr, since);
            }
            Ok(VcpuExit::Hlt) => return ExitReason::Halted { vcpu: id },
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                return match machine_check {
                    Some(Injected {
                        page,
                        unplugged: true,
                    }) => {
                        // The guest's own doing: a crash, not a VMM failure.
                        log::error!(
                            "vCPU {id}: the guest shut down on the machine check for guest \
                             page {page:#x}, which it touched without plugging it"
                        );
                        ExitReason::TripleFault { vcpu: id, rip }
                    }
                    // KVM shuts a guest down that cannot take the #MC.
                    Some(Injected { page, .. }) => ExitReason::Error(format!(
                        "vCPU {id}: machine check for guest page {page:#x} could not be \
                         delivered: the guest shut down (CR4.MCE clear, or a machine check \
                         already in progress); the page could not be served"
                    )),
                    None => ExitReason::TripleFault { vcpu: id, rip },
                };
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    KVM_SYSTEM_EVENT_CRASH => ExitReason::Crash { vcpu: id },
                    other => ExitReason::Error(format!("vCPU {id}: system event {other}")),
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return ExitReason::Error(format!(
                    "vCPU {id}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                let regs = vcpu.get_regs().unwrap_or_default();
                return ExitReason::Error(format!(
                    "vCPU {id}: KVM internal error (emulation failure?) at rip {:#x}",
                    regs.rip
                ));
            }
            Ok(other) => {
                profile.record(ExitKind::Other, 0, since);
                log::debug!("vCPU {id}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                injected = machine_check;
                if let Some(err) = crate::sigbus::take() {
                    match deliver_machine_check(vcpu, ctx, err) {
                        Ok(page) => injected = Some(page),
                        Err(reason) => return reason,
                    }
                }
            }
            Err(e) if e.errno() == libc::EFAULT => {
                let regs = vcpu.get_regs().unwrap_or_default();
                return ExitReason::Error(format!(
                    "vCPU {id}: guest memory access failed (EFAULT) at rip {:#x}: the guest \
                     touched memory that is not plugged",
                    regs.rip
                ));
            }
            Err(e) => return ExitReason::Error(format!("vCPU {id}: KVM_RUN: {e}")),
        }
    }
}

/// Injects the machine check for a poisoned guest page this vCPU touched
/// (KVM's `SIGBUS`, recorded by [`crate::sigbus`]); returns what it
/// injected, or why the VM must stop instead.
fn deliver_machine_check(
    vcpu: &VcpuFd,
    ctx: &VcpuContext,
    err: crate::sigbus::MemoryError,
) -> Result<Injected, ExitReason> {
    let id = ctx.id;
    let host = err.host_addr;
    // The handler only records addresses inside guest RAM.
    let gpa = crate::sigbus::guest_address(host).unwrap_or(0);
    let page = gpa & !0xfff;
    // The memory map holds what is plugged: a page outside it was
    // poisoned because the guest touched memory it does not have.
    let unplugged = {
        use vm_memory::GuestMemoryBackend as _;
        !ctx.mem
            .memory()
            .memory()
            .address_in_range(GuestAddress(gpa))
    };
    let cause = if unplugged {
        "the page is not plugged"
    } else {
        "the page could not be served"
    };
    let fail = |why: String| {
        ExitReason::Error(format!(
            "vCPU {id}: machine check for guest page {page:#x} (host {host:#x}) could not be \
             delivered: {why}; {cause}"
        ))
    };
    let Some(flavour) = ctx.mce else {
        return Err(fail("KVM emulates no machine checks here".into()));
    };
    // KVM shuts down a guest that has not enabled machine checks: say so
    // rather than let it triple-fault.
    match vcpu.get_sregs() {
        Ok(s) if s.cr4 & X86_CR4_MCE == 0 => {
            return Err(fail(format!(
                "the guest has not enabled machine checks (CR4 {:#x})",
                s.cr4
            )))
        }
        _ => {}
    }
    let injected = Injected { page, unplugged };
    let Some(mce) = flavour.memory_error(gpa, err.code == libc::BUS_MCEERR_AR) else {
        log::warn!("vCPU {id}: action-optional error at guest page {page:#x} not injected (AMD)");
        return Ok(injected);
    };
    crate::mce::inject(vcpu, &mce).map_err(|e| fail(format!("KVM_X86_SET_MCE: {e}")))?;
    log::error!(
        "vCPU {id}: guest page {page:#x} (host {host:#x}): {cause}; machine check injected"
    );
    Ok(injected)
}

fn read_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}
