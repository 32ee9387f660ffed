//! The VM: its KVM fds, guest memory, devices and vCPUs, as the
//! [builder](crate::builder) made them, and the ways to boot it (a Linux
//! kernel or a flat payload). [`Vm::run`](crate::event_loop) runs it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use guest_mem::image::ImageFile;
use guest_mem::GuestMem;
use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::api::{ApiConfig, BalloonHandle, HotplugHandle};
use crate::boot::{acpi, linux, mptable, BootError};
use crate::control::{ControlInbox, VmControl};
use crate::device_manager::DeviceManager;
use crate::error::VmError;
use crate::layout::*;
use crate::pre_fault;
use crate::signals::ShutdownSignals;
use crate::snapshot::MachineConfig;
use crate::vcpu::{self, PayloadArgs};
use crate::virtio::VirtioSlot;
use devices::bus::Bus;

/// What [`Vm::new_linux`](crate::builder) boots.
pub struct LinuxBoot<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    /// See [`Vm::set_pre_fault`].
    pub pre_fault: bool,
}

/// A kernel and initramfs placed in guest memory, not yet booted.
pub struct PlacedLinux {
    kernel: linux::LoadedKernel,
    /// Where the initramfs lies and how long it is.
    initrd: Option<(u64, u64)>,
}

impl PlacedLinux {
    /// Places `kernel` and `initrd` in `mem`, a VM of `ram_size` bytes of
    /// boot RAM: through the backing file, not the fault-managed mapping
    /// (see [`guest_mem::image`]).
    pub fn place(
        mem: &GuestMem,
        ram_size: u64,
        kernel: &Path,
        initrd: Option<&Path>,
    ) -> Result<PlacedLinux, VmError> {
        let guard = mem.memory();
        let m = guard.memory();
        let image = |f| ImageFile::new(mem, f);
        let k = linux::load_kernel(&*m, kernel, image)?;
        let low_end = ram_size.min(MMIO_GAP_START);
        let initrd = match initrd {
            Some(p) => Some(linux::load_initrd(
                &*m,
                p,
                image,
                low_end,
                k.end,
                k.setup_header.map(|h| h.initrd_addr_max),
            )?),
            None => None,
        };
        log::debug!("kernel and initramfs placed");
        Ok(PlacedLinux { kernel: k, initrd })
    }
}

/// A VM ready to boot.
pub struct Vm {
    // Field order matters for drop: vCPUs and the VM go before the memory
    // their memslots point into.
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) fd: Arc<VmFd>,
    pub(crate) mem: Arc<GuestMem>,
    pub(crate) supported_cpuid: CpuId,
    /// The vCPUs take machine checks (`KVM_X86_SETUP_MCE` succeeded), built
    /// for their CPU vendor.
    pub(crate) mce: Option<crate::mce::Flavour>,
    pub(crate) devices: DeviceManager,
    pub(crate) payload: bool,
    pub(crate) ram_size: u64,
    pub(crate) vcpu_count: u8,
    pub(crate) backend_desc: String,
    pub(crate) api_socket: Option<PathBuf>,
    pub(crate) api_config: ApiConfig,
    pub(crate) shutdown: Option<ShutdownSignals>,
    pub(crate) seccomp: bool,
    /// Map the boot images into KVM before the guest runs (`boot_linux`).
    pub(crate) pre_fault: bool,
    /// What a snapshot records of the machine.
    pub(crate) machine: MachineConfig,
    /// The MSRs a vCPU snapshot saves.
    pub(crate) msrs: Vec<u32>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) inbox: ControlInbox,
    pub(crate) _kvm: Kvm,
}

impl Vm {
    /// The handle that pauses, resumes and snapshots the VM while it runs
    /// (what `PUT /vm` and `PUT /snapshot` use).
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpu_count
    }

    /// Boot RAM in bytes (the virtio-mem window not included).
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// The VM fd (for devices that need irqfds or ioeventfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.fd
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<&BalloonHandle> {
        self.devices.balloon.as_ref()
    }

    /// The virtio-mem device, if the VM has one.
    pub fn hotplug(&self) -> Option<&HotplugHandle> {
        self.devices.hotplug.as_ref()
    }

    /// Sets the API server's limits and balloon statistics interval
    /// (defaults: [`ApiConfig::default`]).
    pub fn set_api_config(&mut self, config: ApiConfig) {
        self.api_config = config;
    }

    /// Makes [`Vm::run`] stop the VM when one of `signals` arrives, as it
    /// does when the guest stops; the outcome's reason is then
    /// [`ExitReason::Signal`](crate::ExitReason::Signal).
    pub fn stop_on_signals(&mut self, signals: ShutdownSignals) {
        self.shutdown = Some(signals);
    }

    /// Whether `boot_linux` asks KVM to map the memory a Linux guest's
    /// earliest boot touches before the guest runs ([`crate::pre_fault`];
    /// on by default, a no-op where KVM lacks `KVM_PRE_FAULT_MEMORY`).
    pub fn set_pre_fault(&mut self, on: bool) {
        self.pre_fault = on;
    }

    /// The MMIO bus, to add devices before running.
    pub fn mmio_bus(&mut self) -> &mut Bus {
        &mut self.devices.mmio
    }

    /// The CPUID KVM supports on this host.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Loads a Linux kernel, its initramfs and command line, and points the
    /// boot vCPU at the 64-bit entry; the MP table announces every vCPU.
    pub fn boot_linux(
        &mut self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
    ) -> Result<(), VmError> {
        let placed = PlacedLinux::place(&self.mem, self.ram_size, kernel, initrd)?;
        self.boot_placed(placed, cmdline)
    }

    /// The rest of [`boot_linux`](Self::boot_linux) once the images are in
    /// memory: command line, boot parameters, ACPI and MP tables, the boot
    /// vCPU's registers, and the boot memory mapped ahead.
    pub(crate) fn boot_placed(
        &mut self,
        placed: PlacedLinux,
        cmdline: &str,
    ) -> Result<(), VmError> {
        let guard = self.mem.memory();
        let mem = guard.memory();
        let PlacedLinux { kernel: k, initrd } = placed;
        let len = linux::write_cmdline(&*mem, &linux::with_platform_args(cmdline))?;
        let mut params = linux::boot_params(&k, len, initrd, self.ram_size)?;
        // SMP and power-off through ACPI (kernels without MPPARSE ignore the
        // MP table); the MP table stays for those that have it.
        let n = self.vcpus.len() as u8;
        let virtio: Vec<_> = self.devices.virtio.iter().map(VirtioSlot::acpi).collect();
        params.acpi_rsdp_addr = acpi::setup_acpi(&*mem, n, &virtio).map_err(BootError::Acpi)?;
        mptable::setup_mptable(&*mem, n).map_err(BootError::Mptable)?;
        linux::write_boot_params(&*mem, &params)?;
        vcpu::setup_linux_boot(&self.vcpus[0], &*mem, k.entry.0)?;
        if self.pre_fault && pre_fault::supported(&self.fd) {
            self.pre_fault_boot_memory(k.end, initrd);
        } else if self.pre_fault && self.mem.regions().iter().any(|r| r.huge_fills()) {
            // No KVM pre-faulting, but fresh memory comes in huge pages:
            // the boot's ranges are allocated in the file now (what the
            // guest would fault in at once anyway), and KVM maps them 2 MiB
            // at a time at the first touch.
            self.populate_boot_memory(k.end, initrd);
        }
        Ok(())
    }

    /// Allocates in the backing file the ranges of
    /// [`pre_fault::linux_boot_ranges`] that hold no image; returns them
    /// all.
    fn populate_boot_memory(
        &self,
        kernel_end: u64,
        initrd: Option<(u64, u64)>,
    ) -> Vec<pre_fault::BootRange> {
        let ram: Vec<_> = ram_ranges(self.ram_size)
            .into_iter()
            .map(|(gpa, len, _)| (gpa, len))
            .collect();
        let page_size = self.mem.regions().first().map_or(4096, |r| r.page_size());
        let ranges = pre_fault::linux_boot_ranges(&ram, kernel_end, initrd, page_size);
        let started = std::time::Instant::now();
        let mut populated = 0;
        for r in ranges.iter().filter(|r| r.populate) {
            match self.mem.populate(GuestAddress(r.gpa), r.len) {
                Ok(n) => populated += n,
                Err(e) => log::debug!("populating {:#x}+{:#x}: {e}", r.gpa, r.len),
            }
        }
        log::debug!(
            "populated {} KiB of boot memory in {:.1} ms",
            populated >> 10,
            started.elapsed().as_secs_f64() * 1e3
        );
        ranges
    }

    /// Maps into KVM what a Linux guest's earliest boot touches
    /// ([`pre_fault::linux_boot_ranges`]). The ranges that hold no image are
    /// first allocated in the backing file (one call each), so that mapping
    /// them serves no userfaultfd faults.
    fn pre_fault_boot_memory(&self, kernel_end: u64, initrd: Option<(u64, u64)>) {
        let ranges = self.populate_boot_memory(kernel_end, initrd);
        let spans: Vec<_> = ranges.iter().map(|r| (r.gpa, r.len)).collect();
        let done = pre_fault::pre_fault(&self.vcpus[0], &spans);
        log::info!(
            "pre-faulted {} KiB of boot memory in {:.1} ms ({} ranges refused)",
            done.bytes >> 10,
            done.took.as_secs_f64() * 1e3,
            done.refused
        );
    }

    /// Loads a flat payload at `load_addr` and starts every vCPU in it in
    /// long mode (CPL3 if asked), with registers from `args(vcpu_id)`.
    pub fn load_payload(
        &mut self,
        image: &[u8],
        load_addr: u64,
        cpl3: bool,
        args: impl Fn(u8) -> PayloadArgs,
    ) -> Result<(), VmError> {
        let guard = self.mem.memory();
        let mem = guard.memory();
        let ram_end = mem
            .iter()
            .map(|r| {
                vm_memory::GuestMemoryRegion::start_addr(r).0 + vm_memory::GuestMemoryRegion::len(r)
            })
            .max()
            .unwrap_or(0);
        // The page tables reach every region at its largest and the MMIO
        // gap, so a payload can drive virtio-mmio devices and resized memory.
        let map_end = self
            .mem
            .regions()
            .iter()
            .map(|r| r.guest_base().0 + r.max_size())
            .max()
            .unwrap_or(0)
            .max(MMIO_GAP_END);
        if load_addr < HIMEM_START.min(0x10_0000) || load_addr + image.len() as u64 > ram_end {
            return Err(BootError::Payload(format!(
                "{} bytes at {load_addr:#x} do not fit in guest RAM",
                image.len()
            ))
            .into());
        }
        mem.write_slice(image, GuestAddress(load_addr))
            .map_err(BootError::Memory)?;
        vcpu::setup_payload_memory(&*mem, map_end, cpl3)?;
        for (id, v) in self.vcpus.iter().enumerate() {
            vcpu::setup_payload(v, cpl3, &args(id as u8))?;
        }
        self.payload = true;
        self.machine.payload = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MemBackend, SerialOut, VmConfig};
    use crate::exit::ExitReason;
    use guest_mem::FaultConfig;

    #[test]
    fn the_payload_exit_port_is_live_only_for_payloads() {
        if Kvm::new().is_err() {
            eprintln!("skipped: /dev/kvm is not available");
            return;
        }
        // mov eax, 0; out 0xe0, eax; hlt (a #GP at CPL3: no IDT, triple fault)
        let code = [0xb8, 0, 0, 0, 0, 0xe7, 0xe0, 0xf4];
        let run = |payload: bool| {
            let mut vm = Vm::new(VmConfig {
                memory: 16 << 20,
                vcpus: 1,
                backend: MemBackend::Memfd,
                fault: FaultConfig::default(),
                serial: SerialOut::Sink,
                balloon: None,
                hotplug: None,
                api_socket: None,
                seccomp: true,
            })
            .unwrap();
            vm.load_payload(&code, 0x10_0000, true, |_| vcpu::PayloadArgs {
                entry: 0x10_0000,
                stack: 0x10_0000,
                args: [0; 6],
            })
            .unwrap();
            vm.payload = payload;
            vm.machine.payload = payload;
            vm.run().unwrap().reason
        };
        assert!(
            matches!(run(true), ExitReason::PayloadDone { code: 0, .. }),
            "payload verdict"
        );
        let other = run(false);
        assert!(
            matches!(other, ExitReason::TripleFault { .. }),
            "ran past the port write: {other}"
        );
    }
}
