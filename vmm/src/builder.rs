//! Makes a [`Vm`] from a [`VmConfig`]: guest memory, the KVM VM and its
//! memory slots, the devices, the vCPUs. One path for every VM, so that a
//! VM restored from a snapshot is built as a booted one is.

use std::sync::Arc;

use guest_mem::GuestMem;

use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::error::VmError;
use crate::kvm_vm;
use crate::ram::build_memory;
use crate::vm::Vm;

impl Vm {
    /// Opens KVM, creates the VM, its memory, devices and vCPUs.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let mut fault = config.fault.clone();
        if config.seccomp && fault.on_thread_start.is_none() {
            fault.on_thread_start = Some(crate::seccomp::fault_thread_hook());
        }
        let mem = build_memory(config.memory, &config.backend, fault, config.hotplug)?;
        Vm::with_memory(config, mem)
    }

    /// Like [`Vm::new`], over memory the caller built (its own regions,
    /// sources or fault settings). `config.memory` is the boot RAM size the
    /// guest is told about; with `config.hotplug` set, the last region of
    /// `mem` is the virtio-mem window. `config.backend` and `config.fault`
    /// are not used.
    pub fn with_memory(config: VmConfig, mem: GuestMem) -> Result<Vm, VmError> {
        let kvm = kvm_vm::open_kvm(config.vcpus)?;
        let fd = Arc::new(kvm_vm::create_vm(&kvm)?);
        let mem = Arc::new(mem);
        let fixed = mem.regions().len() - usize::from(config.hotplug.is_some());
        kvm_vm::map_regions(&fd, &mem, fixed)?;

        let mut devices = DeviceManager::new(&fd, config.serial)?;
        if let Some(opts) = config.balloon {
            devices.add_balloon(&fd, &mem, opts)?;
        }
        if config.hotplug.is_some() {
            devices.add_hotplug(&fd, &mem)?;
        }

        let supported_cpuid = kvm_vm::supported_cpuid(&kvm)?;
        let vcpus = kvm_vm::create_vcpus(&fd, &supported_cpuid, config.vcpus)?;
        Ok(Vm {
            vcpus,
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
            _kvm: kvm,
        })
    }
}
