//! A CPL3 payload guest on `/dev/kvm` whose RAM is memory this process
//! mapped itself (a [`FirecrackerLike`](crate::uffd_peer::FirecrackerLike)
//! peer's regions), not a `vmm::Vm`'s: slot 0 is a small plain mapping
//! holding the GDT, TSS, page tables, code and stacks; the peer's regions
//! follow at [`GUEST_BASE`], so that everything the guest touches there
//! is served by the external handler.

use std::sync::Arc;

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vmm::vcpu::{self, PayloadArgs, PAYLOAD_EXIT_PORT};

/// Size of the plain low memory (slot 0).
pub const LOW_SIZE: u64 = 2 << 20;
/// Where the payload is loaded.
pub const LOAD: u64 = 0x10_0000;
/// Guest-physical address of the peer's first region.
pub const GUEST_BASE: u64 = 1 << 30;

/// How a vCPU ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The payload's exit code (0: success).
    pub code: u32,
    /// rbx, rcx, rdx at the exit.
    pub regs: [u64; 3],
}

/// A VM over `regions` (host address, size), laid out from [`GUEST_BASE`]
/// in order.
pub struct ExternalGuest {
    vm: Arc<VmFd>,
    kvm: Kvm,
    low: GuestMemoryMmap<()>,
    map_end: u64,
}

impl ExternalGuest {
    /// Creates the VM and its memory slots.
    pub fn new(regions: &[(u64, u64)]) -> Result<Self, String> {
        let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        vm.set_tss_address(vmm::layout::KVM_TSS as usize)
            .map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?;
        vm.create_irq_chip()
            .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
        let low = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LOW_SIZE as usize)])
            .map_err(|e| format!("low memory: {e}"))?;
        let low_host = low
            .get_host_address(GuestAddress(0))
            .map_err(|e| format!("low memory: {e}"))? as u64;
        let mut slots = vec![(0u64, low_host, LOW_SIZE)];
        let mut gpa = GUEST_BASE;
        for &(host, size) in regions {
            slots.push((gpa, host, size));
            gpa += size;
        }
        for (slot, &(guest_phys_addr, userspace_addr, memory_size)) in slots.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr,
                memory_size,
                userspace_addr,
            };
            // SAFETY: every slot is a live mapping of this process of
            // memory_size bytes (the low memory owned by self, the peer's
            // regions kept mapped by the caller for the VM's lifetime).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION {slot}: {e}"))?;
        }
        Ok(ExternalGuest {
            vm: Arc::new(vm),
            kvm,
            low,
            map_end: gpa,
        })
    }

    /// Loads `code` at [`LOAD`] and runs one vCPU per entry of `args`
    /// (entry and stack are filled in) at CPL3 until each writes the exit
    /// port.
    pub fn run(&self, code: &[u8], args: &[[u64; 6]]) -> Result<Vec<Verdict>, String> {
        self.low
            .write_slice(code, GuestAddress(LOAD))
            .map_err(|e| format!("loading the payload: {e}"))?;
        vcpu::setup_payload_memory(&self.low, self.map_end, true)
            .map_err(|e| format!("payload memory: {e}"))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
        let count = args.len() as u8;
        let mut threads = Vec::new();
        for (id, a) in args.iter().enumerate() {
            let fd = self
                .vm
                .create_vcpu(id as u64)
                .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
            vcpu::configure_common(&fd, &cpuid, id as u8, count).map_err(|e| e.to_string())?;
            let start = PayloadArgs {
                entry: LOAD,
                stack: LOAD - id as u64 * 0x1000,
                args: *a,
            };
            vcpu::setup_payload(&fd, true, &start).map_err(|e| e.to_string())?;
            threads.push(std::thread::spawn(move || run_vcpu(fd)));
        }
        threads
            .into_iter()
            .map(|t| t.join().map_err(|_| "a vCPU thread panicked".to_string())?)
            .collect()
    }
}

fn run_vcpu(mut fd: kvm_ioctls::VcpuFd) -> Result<Verdict, String> {
    loop {
        match fd.run() {
            Ok(VcpuExit::IoOut(PAYLOAD_EXIT_PORT, data)) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                let regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
                return Ok(Verdict {
                    code: u32::from_le_bytes(b),
                    regs: [regs.rbx, regs.rcx, regs.rdx],
                });
            }
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::IoIn(..)) => {}
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
}
