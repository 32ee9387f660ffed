//! Makes a [`Vm`] from a [`VmConfig`]: guest memory, the KVM VM and its
//! memory slots, the devices, the vCPUs. One path for every VM, so that a
//! VM restored from a snapshot is built as a booted one is.

use std::sync::Arc;

use guest_mem::{FaultConfig, FileSource, GuestMem, RegionConfig, RegionSource};

use crate::config::{MemBackend, VmConfig};
use crate::control;
use crate::device_manager::{DeviceManager, DevicesState};
use crate::error::{io_err, VmError};
use crate::kvm_vm::{self, PendingVm};
use crate::ram::build_memory;
use crate::snapshot::{self, BalloonSettings, MachineConfig};
use crate::vcpu_state;
use crate::vm::{LinuxBoot, PlacedLinux, Vm};

/// `fault` with its handler threads confined when the VM is (`seccomp`),
/// unless the caller set its own thread start hook.
fn confined(mut fault: FaultConfig, seccomp: bool) -> FaultConfig {
    if seccomp && fault.on_thread_start.is_none() {
        fault.on_thread_start = Some(crate::seccomp::fault_thread_hook());
    }
    fault
}

/// The guest memory `config` asks for, its fault handler threads confined
/// when the VM is.
fn config_memory(config: &VmConfig) -> Result<GuestMem, VmError> {
    let fault = confined(config.fault.clone(), config.seccomp);
    build_memory(config.memory, &config.backend, fault, config.hotplug)
}

impl Vm {
    /// Opens KVM, creates the VM, its memory, devices and vCPUs.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let pending = PendingVm::spawn(config.vcpus);
        let mem = config_memory(&config)?;
        Vm::build(config, mem, None, pending)
    }

    /// [`Vm::new`] and [`Vm::boot_linux`] in one: the kernel and initramfs
    /// are placed in guest memory while KVM creates the VM ([`PendingVm`]).
    pub fn new_linux(config: VmConfig, boot: &LinuxBoot<'_>) -> Result<Vm, VmError> {
        let pending = PendingVm::spawn(config.vcpus);
        let mem = config_memory(&config)?;
        let placed = PlacedLinux::place(&mem, config.memory, boot.kernel, boot.initrd)?;
        let mut vm = Vm::build(config, mem, None, pending)?;
        vm.set_pre_fault(boot.pre_fault);
        vm.boot_placed(placed, boot.cmdline)?;
        Ok(vm)
    }

    /// Like [`Vm::new`], over memory the caller built (its own regions,
    /// sources or fault settings). `config.memory` is the boot RAM size the
    /// guest is told about; with `config.hotplug` set, the last region of
    /// `mem` is the virtio-mem window. `config.backend` and `config.fault`
    /// are not used.
    pub fn with_memory(config: VmConfig, mem: GuestMem) -> Result<Vm, VmError> {
        let pending = PendingVm::spawn(config.vcpus);
        Vm::build(config, mem, None, pending)
    }

    /// The one path every VM takes; `saved`: the devices of a restore.
    fn build(
        config: VmConfig,
        mem: GuestMem,
        saved: Option<&DevicesState>,
        pending: PendingVm,
    ) -> Result<Vm, VmError> {
        let (kvm, fd) = pending.join()?;
        let fd = Arc::new(fd);
        let mem = Arc::new(mem);
        let fixed = mem.regions().len() - usize::from(config.hotplug.is_some());
        kvm_vm::map_regions(&fd, &mem, fixed)?;
        log::debug!("guest memory mapped into KVM");

        let mut devices = DeviceManager::new(&fd, config.serial, saved)?;
        // A restore needs the state of every device the machine has.
        let missing = |what: &str| VmError::Config(format!("snapshot: no {what} state"));
        if let Some(opts) = config.balloon {
            let s = match saved {
                Some(d) => Some(d.balloon.as_ref().ok_or_else(|| missing("balloon"))?),
                None => None,
            };
            devices.add_balloon(&fd, &mem, opts, s)?;
        }
        if config.hotplug.is_some() {
            let s = match saved {
                Some(d) => Some(d.virtio_mem.as_ref().ok_or_else(|| missing("virtio-mem"))?),
                None => None,
            };
            devices.add_hotplug(&fd, &mem, s)?;
        }

        let machine = MachineConfig {
            memory: config.memory,
            vcpus: config.vcpus,
            huge_pages: mem.regions()[0].page_size() > 4096,
            hotplug: config.hotplug,
            balloon: config.balloon.map(|b| BalloonSettings {
                deflate_on_oom: b.deflate_on_oom,
                free_page_reporting: b.free_page_reporting,
            }),
            payload: false,
        };
        let (control, inbox) = control::channel().map_err(io_err("eventfd"))?;
        let msrs = vcpu_state::msrs_to_save(&kvm)?;
        let supported_cpuid = kvm_vm::supported_cpuid(&kvm)?;
        let mcg_cap = crate::mce::supported(&kvm).map(crate::mce::mcg_cap);
        if mcg_cap.is_none() {
            log::info!(
                "KVM emulates no machine checks: a guest page that cannot be served stops the VM"
            );
        }
        log::debug!("devices added");
        let vcpus = kvm_vm::create_vcpus(&fd, &supported_cpuid, config.vcpus, mcg_cap)?;
        log::debug!("vCPUs created");
        Ok(Vm {
            vcpus,
            mce: mcg_cap.map(|_| crate::mce::Flavour::of(&supported_cpuid)),
            fd,
            mem,
            supported_cpuid,
            devices,
            payload: false,
            ram_size: config.memory,
            vcpu_count: config.vcpus,
            backend_desc: format!("{:?}", config.backend),
            api_socket: config.api_socket,
            api_config: Default::default(),
            shutdown: None,
            seccomp: config.seccomp,
            pre_fault: true,
            machine,
            msrs,
            control,
            inbox,
            _kvm: kvm,
        })
    }
}

/// How a restored VM gets its memory from the snapshot's memory file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestoreMode {
    /// Each page on first touch, through the fault handler (with
    /// readahead): the guest runs at once.
    #[default]
    Lazy,
    /// All of it before the guest runs.
    Eager,
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lazy" => Ok(RestoreMode::Lazy),
            "eager" => Ok(RestoreMode::Eager),
            _ => Err(format!("restore mode {s:?}: expected lazy or eager")),
        }
    }
}

/// What a restore takes besides the snapshot.
pub struct RestoreConfig {
    /// The snapshot directory.
    pub dir: std::path::PathBuf,
    /// Lazy or eager.
    pub mode: RestoreMode,
    /// Fault handling (threads, readahead).
    pub fault: guest_mem::FaultConfig,
    /// Serial console output.
    pub serial: crate::config::SerialOut,
    /// Where to serve the control API, if anywhere.
    pub api_socket: Option<std::path::PathBuf>,
    /// Confine the VMM's threads (see [`VmConfig::seccomp`]).
    pub seccomp: bool,
}

impl Vm {
    /// Builds the VM saved in `restore.dir` (see [`crate::snapshot`]), ready to
    /// [`run`](Vm::run) from where it stopped. The snapshot is only read:
    /// several VMs may be restored from one at once.
    pub fn restore(restore: RestoreConfig) -> Result<Vm, VmError> {
        let (snap, memory_path) = snapshot::read(&restore.dir)?;
        let m = &snap.machine;
        let pending = PendingVm::spawn(m.vcpus);
        let backend = if m.huge_pages {
            MemBackend::Hugetlbfs(None)
        } else {
            MemBackend::Memfd
        };
        // The regions as they were saved, each on a file of its own: a
        // restored region is served from the memory file, not shared.
        let mut regions: Vec<RegionConfig> = snap
            .memory
            .regions
            .iter()
            .map(|saved| {
                let mut r = RegionConfig::new(saved.guest_addr, saved.size);
                // Resizable as before (each region has a file of its own).
                r.max_size = Some(saved.max_size);
                if saved.page_size > 4096 {
                    r.backing = guest_mem::Backing::MemfdHugetlb;
                }
                r
            })
            .collect();
        if let Some(w) = m.hotplug {
            let last = snap.memory.regions.last().map(|r| r.max_size);
            if last != Some(w) {
                return Err(bad_snapshot(format!(
                    "the last region is not the {w:#x}-byte virtio-mem window"
                )));
            }
        }
        if restore.mode == RestoreMode::Lazy {
            let source: Arc<dyn guest_mem::PageSource> = Arc::new(
                FileSource::open(&memory_path)
                    .map_err(crate::error::io_err(memory_path.display().to_string()))?,
            );
            for (r, saved) in regions.iter_mut().zip(&snap.memory.regions) {
                r.source = Some(RegionSource {
                    source: source.clone(),
                    offset: saved.offset,
                });
            }
        }
        let fault = confined(restore.fault, restore.seccomp);
        let mem = regions
            .into_iter()
            .fold(GuestMem::builder().fault_config(fault), |b, r| b.region(r))
            .build()?;
        if restore.mode == RestoreMode::Eager {
            copy_memory(&mem, &memory_path, &snap.memory.regions)?;
        }
        let config = VmConfig {
            memory: m.memory,
            vcpus: m.vcpus,
            backend,
            fault: Default::default(),
            serial: restore.serial,
            balloon: m.balloon.map(|b| crate::config::BalloonOptions {
                deflate_on_oom: b.deflate_on_oom,
                free_page_reporting: b.free_page_reporting,
            }),
            hotplug: m.hotplug,
            api_socket: restore.api_socket,
            seccomp: restore.seccomp,
        };
        let payload = m.payload;
        let mut vm = Vm::build(config, mem, Some(&snap.devices), pending)?;
        vm.payload = payload;
        vm.machine.payload = payload;
        for (v, s) in vm.vcpus.iter().zip(&snap.vcpus) {
            vcpu_state::restore(v, s)?;
        }
        kvm_vm::restore_state(&vm.fd, &snap.kvm)?;
        Ok(vm)
    }
}

fn bad_snapshot(why: String) -> VmError {
    VmError::Config(format!("snapshot: {why}"))
}

/// Copies each region's saved bytes into its backing file, data extents
/// only (holes stay holes), before anything touches the memory: pages in
/// the file's page cache are mapped by the kernel without a fault.
fn copy_memory(
    mem: &GuestMem,
    path: &std::path::Path,
    saved: &[crate::snapshot::RegionState],
) -> Result<(), VmError> {
    let regions: Vec<_> = saved
        .iter()
        .map(|s| guest_mem::memory_file::SavedRegion {
            guest_addr: s.guest_addr,
            size: s.size,
            offset: s.offset,
        })
        .collect();
    guest_mem::memory_file::load(mem, path, &regions)
        .map(drop)
        .map_err(|e| VmError::Config(format!("filling guest memory from {}: {e}", path.display())))
}
