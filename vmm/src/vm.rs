//! The VM: KVM set-up, guest memory from `guest-mem`, legacy devices, vCPU
//! threads and the loop that waits for the guest to stop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use guest_mem::image::ImageFile;

use guest_mem::{Backing, BackingFile, FaultConfig, GuestMem, RegionConfig, RegionIndex};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::api::{ApiConfig, ApiContext, ApiServer, BalloonHandle, HotplugHandle, VirtioTransport};
use crate::boot::{acpi, linux, mptable, BootError};
use crate::exit::ExitReason;
use crate::hotplug_slots::SlottedWindow;
use crate::layout::*;
use crate::seccomp::{install, ThreadKind};
use crate::signals::ShutdownSignals;
use crate::vcpu::{self, PayloadArgs, VcpuContext, VcpuError};
use crate::virtio::VirtioSlot;
use devices::bus::{Bus, SharedDevice};
use devices::legacy::{AcpiSleep, Cmos, SerialConsole, I8042};
use devices::virtio::balloon::Balloon;
use devices::virtio::mem::VirtioMem;
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

/// Where guest RAM lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MemBackend {
    /// An anonymous memfd.
    #[default]
    Memfd,
    /// A file at this path (tmpfs, or a disk file system with kernel faults).
    File(PathBuf),
    /// Huge pages: a `MFD_HUGETLB` memfd, or a file on a hugetlbfs mount.
    Hugetlbfs(Option<PathBuf>),
}

/// Where the serial console writes.
pub enum SerialOut {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Any writer (tests).
    Writer(Box<dyn Write + Send>),
    /// Nowhere.
    Sink,
}

/// A VM's shape.
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Where guest RAM lives.
    pub backend: MemBackend,
    /// Fault handling.
    pub fault: FaultConfig,
    /// Serial console output.
    pub serial: SerialOut,
    /// A virtio-balloon, if wanted.
    pub balloon: Option<BalloonOptions>,
    /// Size of a virtio-mem window for memory plugged at run time, if any.
    pub hotplug: Option<u64>,
    /// Where to serve the control API, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Confine the vCPU, fault handler and event loop threads with their
    /// seccomp filters ([`crate::seccomp`]) before the guest runs. With
    /// [`Vm::with_memory`], the fault handler threads are confined only if
    /// the caller's memory was built with
    /// [`crate::seccomp::fault_thread_hook`].
    pub seccomp: bool,
}

/// Balloon options: the device's optional features.
pub type BalloonOptions = devices::virtio::balloon::BalloonConfig;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A bad configuration.
    #[error("{0}")]
    Config(String),
    /// `/dev/kvm` is unusable.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The cause.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(#[from] guest_mem::Error),
    /// vCPU set-up failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Boot failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// An I/O error (eventfds, the serial output file).
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// Checks a memory size: not zero, page aligned, not absurd.
pub fn check_memory_size(size: u64, page: u64) -> Result<(), VmError> {
    if size == 0 {
        return Err(VmError::Config("memory size must not be zero".into()));
    }
    if size < (2 << 20) {
        return Err(VmError::Config(format!(
            "memory size {size} bytes is too small (at least 2 MiB)"
        )));
    }
    if size % page != 0 {
        return Err(VmError::Config(format!(
            "memory size {size:#x} is not a multiple of the page size {page:#x}"
        )));
    }
    if size > MAX_MEMORY {
        return Err(VmError::Config(format!(
            "memory size {size:#x} is larger than the {} GiB supported",
            MAX_MEMORY >> 30
        )));
    }
    Ok(())
}

/// Builds the boot RAM: one backing file, one region per side of the MMIO gap.
pub fn build_memory(
    size: u64,
    backend: &MemBackend,
    fault: FaultConfig,
    hotplug: Option<u64>,
) -> Result<GuestMem, VmError> {
    let file = match backend {
        MemBackend::Memfd => {
            check_memory_size(size, 4096)?;
            BackingFile::memfd("guest-ram", size)?
        }
        MemBackend::Hugetlbfs(None) => {
            check_memory_size(size, 2 << 20)?;
            BackingFile::memfd_hugetlb("guest-ram", size)?
        }
        MemBackend::File(path) => {
            check_memory_size(size, 4096)?;
            BackingFile::open(path, size)?
        }
        MemBackend::Hugetlbfs(Some(path)) => {
            check_memory_size(size, 2 << 20)?;
            let f = BackingFile::open(path, size)?;
            if f.kind() != guest_mem::BackingKind::Hugetlbfs {
                return Err(VmError::Config(format!(
                    "{} is not on a hugetlbfs mount",
                    path.display()
                )));
            }
            f
        }
    };
    let file = Arc::new(file);
    let mut builder = GuestMem::builder().fault_config(fault);
    for (gpa, len, offset) in ram_ranges(size) {
        let mut rc = RegionConfig::new(gpa, len);
        rc.backing = Backing::Shared {
            file: file.clone(),
            offset,
        };
        builder = builder.region(rc);
    }
    if let Some(window) = hotplug {
        check_hotplug_size(size, window)?;
        // The window has a memfd of its own, empty until the guest plugs
        // blocks, so that unplugging its tail can truncate it.
        let mut rc = RegionConfig::new(hotplug_base(size), 0);
        rc.max_size = Some(window);
        if matches!(backend, MemBackend::Hugetlbfs(_)) {
            rc.backing = Backing::MemfdHugetlb;
        }
        builder = builder.region(rc);
    }
    Ok(builder.build()?)
}

/// The command line with what the platform implies added: this VMM has no
/// PCI bus, so `pci=off` spares the guest probing one (as Firecracker
/// does), unless the command line already says something about PCI.
pub fn with_platform_args(cmdline: &str) -> String {
    if cmdline.split_whitespace().any(|w| w.starts_with("pci=")) {
        cmdline.to_string()
    } else {
        format!("{} pci=off", cmdline.trim_end())
    }
}

/// Checks a virtio-mem window size: whole Linux memory blocks, and the
/// window must end inside the address space the guest can reach.
pub fn check_hotplug_size(ram: u64, window: u64) -> Result<(), VmError> {
    if window == 0 || window % HOTPLUG_ALIGN != 0 {
        return Err(VmError::Config(format!(
            "the virtio-mem size {window:#x} must be a non-zero multiple of {} MiB",
            HOTPLUG_ALIGN >> 20
        )));
    }
    let limit = MAX_MEMORY * 2;
    if hotplug_base(ram).saturating_add(window) > limit {
        return Err(VmError::Config(format!(
            "the virtio-mem window of {window:#x} bytes would end past {limit:#x}"
        )));
    }
    Ok(())
}

/// How long [`Vm::run`] waits for the VM to stop after guest memory could
/// not be served before it ends the process.
pub const FAILURE_GRACE: Duration = Duration::from_secs(5);

/// A VM ready to boot.
pub struct Vm {
    // Field order matters for drop: vCPUs and the VM go before the memory
    // their memslots point into.
    vcpus: Vec<VcpuFd>,
    fd: Arc<VmFd>,
    mem: Arc<GuestMem>,
    supported_cpuid: CpuId,
    pio: Bus,
    mmio: Bus,
    reset_evt: EventFd,
    power_off_evt: EventFd,
    console: Arc<Mutex<Box<dyn Write + Send>>>,
    payload: bool,
    ram_size: u64,
    vcpu_count: u8,
    backend_desc: String,
    virtio: Vec<VirtioSlot>,
    balloon: Option<BalloonHandle>,
    hotplug: Option<HotplugHandle>,
    api_socket: Option<PathBuf>,
    api_config: ApiConfig,
    shutdown: Option<ShutdownSignals>,
    seccomp: bool,
    _kvm: Kvm,
}

/// Wakes the event loop when the guest resets (i8042) or powers off
/// (ACPI sleep register), a vCPU stops, or the VMM gets a stop signal.
struct ExitWatcher {
    reset: EventFd,
    power_off: EventFd,
    exited: EventFd,
    signals: Option<ShutdownSignals>,
    /// Guest memory the fault handler could not serve: the VM stops.
    fault_failure: Option<Arc<guest_mem::FaultFailure>>,
    fired: Option<ExitReason>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for (evt, data) in [(&self.reset, 0), (&self.power_off, 1), (&self.exited, 2)] {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("watching VM exit events: {e:?}");
            }
        }
        if let Some(s) = &self.signals {
            if let Err(e) = ops.add(Events::with_data(s, 3, EventSet::IN)) {
                log::error!("watching the stop signals: {e:?}");
            }
        }
        if let Some(f) = &self.fault_failure {
            if let Err(e) = ops.add(Events::with_data_raw(f.event_fd(), 4, EventSet::IN)) {
                log::error!("watching fault handler failures: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            0 => {
                let _ = self.reset.read();
                self.fired.get_or_insert(ExitReason::Reset);
            }
            1 => {
                let _ = self.power_off.read();
                self.fired.get_or_insert(ExitReason::PowerOff);
            }
            3 => {
                while let Some(n) = self.signals.as_ref().and_then(ShutdownSignals::read) {
                    log::info!("{}: stopping the VM", crate::signals::signal_name(n));
                    self.fired.get_or_insert(ExitReason::Signal(n));
                }
            }
            4 => {
                if let Some(f) = &self.fault_failure {
                    f.acknowledge();
                    let why = f.message().unwrap_or_else(|| "unknown".into());
                    self.fired.get_or_insert(ExitReason::Error(format!(
                        "guest memory could not be served: {why}"
                    )));
                }
            }
            _ => {
                let _ = self.exited.read();
            }
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why each vCPU stopped (index = vCPU id), or why the VM did.
    pub reasons: Vec<ExitReason>,
    /// The first reason that stopped the VM.
    pub reason: ExitReason,
    /// Port and MMIO accesses no device claimed.
    pub unhandled_io: u64,
}

struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

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
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "{} vCPUs requested; between 1 and {MAX_VCPUS} are supported",
                config.vcpus
            )));
        }
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        for cap in [Cap::Irqchip, Cap::UserMemory, Cap::Irqfd, Cap::Ioeventfd] {
            if !kvm.check_extension(cap) {
                return Err(VmError::Config(format!("KVM lacks {cap:?}")));
            }
        }
        let max = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max {
            return Err(VmError::Config(format!(
                "{} vCPUs requested; KVM allows {max}",
                config.vcpus
            )));
        }
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

        let mem = Arc::new(mem);
        let fd = Arc::new(fd);
        // The virtio-mem window (the last region) gets a slot per plugged
        // extent from its SlottedWindow, not one over the whole window.
        let fixed = mem.regions().len() - usize::from(config.hotplug.is_some());
        for (slot, r) in mem.regions().iter().enumerate().take(fixed) {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.guest_base().0,
                memory_size: r.max_size(),
                userspace_addr: r.host_addr(),
            };
            // SAFETY: the host range is the region's own mapping (max_size
            // bytes), which lives in `mem`; the Vm drops its vCPU and VM fds
            // before `mem`, and no other memslot covers these guest
            // addresses.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let out: Box<dyn Write + Send> = match config.serial {
            SerialOut::Stdout => Box::new(std::io::stdout()),
            SerialOut::File(p) => Box::new(
                std::fs::File::create(&p).map_err(io_err(format!("creating {}", p.display())))?,
            ),
            SerialOut::Writer(w) => w,
            SerialOut::Sink => Box::new(std::io::sink()),
        };
        let console = Arc::new(Mutex::new(out));

        let mut pio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        fd.register_irqfd(&serial_irq, SerialConsole::COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial: SharedDevice = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq,
            Box::new(SharedWriter(console.clone())),
        )));
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let i8042: SharedDevice = Arc::new(Mutex::new(I8042::new(
            reset_evt.try_clone().map_err(io_err("eventfd"))?,
        )));
        let cmos: SharedDevice = Arc::new(Mutex::new(Cmos::new()));
        let power_off_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let acpi_sleep: SharedDevice = Arc::new(Mutex::new(AcpiSleep::new(
            power_off_evt.try_clone().map_err(io_err("eventfd"))?,
        )));
        let insert = |bus: &mut Bus, d: SharedDevice, base, len| {
            bus.insert(d, base, len)
                .map_err(|e| VmError::Config(e.to_string()))
        };
        insert(&mut pio, serial, SerialConsole::COM1, 8)?;
        insert(&mut pio, i8042, I8042::BASE, I8042::LEN)?;
        insert(&mut pio, cmos, Cmos::BASE, Cmos::LEN)?;
        insert(&mut pio, acpi_sleep, AcpiSleep::BASE, AcpiSleep::LEN)?;

        let mut mmio = Bus::new();
        let mut virtio = Vec::new();
        // Each virtio device gets the next MMIO window and GSI.
        let mut attach = |device: Box<dyn VirtioDevice>| {
            let slot = VirtioSlot::attach(
                virtio.len() as u32,
                device,
                mem.device_memory(),
                &fd,
                &mut mmio,
            )?;
            let transport = slot.transport.clone();
            virtio.push(slot);
            Ok::<_, VmError>(transport)
        };
        let mut balloon = None;
        if let Some(opts) = config.balloon {
            let backend: Arc<dyn devices::memory::MemoryBackend> = mem.clone();
            let device = Balloon::new(backend, opts);
            let state = device.state();
            let transport = attach(Box::new(device))?;
            balloon = Some(BalloonHandle { state, transport });
        }
        let mut hotplug = None;
        if config.hotplug.is_some() {
            let last = mem.regions().len() - 1;
            let window = Arc::new(SlottedWindow::new(
                fd.clone(),
                mem.clone(),
                RegionIndex(last),
                last as u32,
            )?);
            let device = VirtioMem::new(window.clone()).map_err(VmError::Config)?;
            let state = device.state();
            let transport = attach(Box::new(device))?;
            hotplug = Some(HotplugHandle {
                state,
                transport,
                window,
            });
        }

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let v = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu::configure_common(&v, &supported_cpuid, id, config.vcpus)?;
            vcpus.push(v);
        }
        Ok(Vm {
            vcpus,
            fd,
            mem,
            supported_cpuid,
            pio,
            mmio,
            reset_evt,
            power_off_evt,
            console,
            payload: false,
            ram_size: config.memory,
            vcpu_count: config.vcpus,
            backend_desc: format!("{:?}", config.backend),
            virtio,
            balloon,
            hotplug,
            api_socket: config.api_socket,
            api_config: ApiConfig::default(),
            shutdown: None,
            seccomp: config.seccomp,
            _kvm: kvm,
        })
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
        self.balloon.as_ref()
    }

    /// The virtio-mem device, if the VM has one.
    pub fn hotplug(&self) -> Option<&HotplugHandle> {
        self.hotplug.as_ref()
    }

    /// Sets the API server's limits and balloon statistics interval
    /// (defaults: [`ApiConfig::default`]).
    pub fn set_api_config(&mut self, config: ApiConfig) {
        self.api_config = config;
    }

    /// Makes [`Vm::run`] stop the VM when one of `signals` arrives, as it
    /// does when the guest stops; the outcome's reason is then
    /// [`ExitReason::Signal`].
    pub fn stop_on_signals(&mut self, signals: ShutdownSignals) {
        self.shutdown = Some(signals);
    }

    /// The MMIO bus, to add devices before running.
    pub fn mmio_bus(&mut self) -> &mut Bus {
        &mut self.mmio
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
        let guard = self.mem.memory();
        let mem = guard.memory();
        // The images go into the backing file's page cache, not through the
        // fault-managed mapping (see guest_mem::image).
        let image = |f| ImageFile::new(&self.mem, f);
        let k = linux::load_kernel(&*mem, kernel, image)?;
        let low_end = self.ram_size.min(MMIO_GAP_START);
        let initrd = match initrd {
            Some(p) => Some(linux::load_initrd(
                &*mem,
                p,
                image,
                low_end,
                k.end,
                k.setup_header.map(|h| h.initrd_addr_max),
            )?),
            None => None,
        };
        let len = linux::write_cmdline(&*mem, &with_platform_args(cmdline))?;
        let mut params = linux::boot_params(&k, len, initrd, self.ram_size)?;
        // SMP and power-off through ACPI (kernels without MPPARSE ignore the
        // MP table); the MP table stays for those that have it.
        let n = self.vcpus.len() as u8;
        let virtio: Vec<_> = self.virtio.iter().map(VirtioSlot::acpi).collect();
        params.acpi_rsdp_addr = acpi::setup_acpi(&*mem, n, &virtio).map_err(BootError::Acpi)?;
        mptable::setup_mptable(&*mem, n).map_err(BootError::Mptable)?;
        linux::write_boot_params(&*mem, &params)?;
        vcpu::setup_linux_boot(&self.vcpus[0], &*mem, k.entry.0)?;
        Ok(())
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
        Ok(())
    }

    /// Runs the vCPUs until the guest stops (Linux: the first vCPU that
    /// stops, or an i8042 reset, ends the VM; payloads: every vCPU reports,
    /// or one fails). The event loop of the virtio queue notifications runs
    /// on a thread of its own (`vmm-events`), so that its seccomp filter
    /// does not confine the caller; the control API, if any, runs on
    /// another (`api`). Both are stopped before this returns.
    ///
    /// Guest memory the fault handler cannot serve stops the VM through the
    /// event loop. Should the event loop itself be stuck on such a page (a
    /// device reading a queue from it), nothing else could stop the VM: if
    /// it has not stopped [`FAILURE_GRACE`] after the failure, the process
    /// exits with the failure's message and status 1.
    pub fn run(self) -> Result<RunOutcome, VmError> {
        let failure = self.mem.fault_failure().cloned();
        let (tx, rx) = mpsc::channel();
        let events = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                let _ = tx.send(self.run_events());
            })
            .map_err(io_err("spawning the event loop thread"))?;
        // The outcome arrives the moment the event loop ends; meanwhile the
        // caller looks at the failure count every 50 ms.
        let mut failed_at = None;
        let outcome = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(outcome) => break outcome,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Err(VmError::Config("the event loop thread panicked".into()))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let Some(f) = failure.as_ref().filter(|f| f.count() > 0) else {
                continue;
            };
            let since = *failed_at.get_or_insert_with(Instant::now);
            if since.elapsed() > FAILURE_GRACE {
                if let Ok(outcome) = rx.try_recv() {
                    break outcome; // it stopped after all
                }
                let why = f.message().unwrap_or_default();
                eprintln!(
                    "vmm: guest memory could not be served ({why}) and the VM did not stop \
                     within {} s; exiting",
                    FAILURE_GRACE.as_secs()
                );
                std::process::exit(1);
            }
        };
        let _ = events.join();
        outcome
    }

    fn run_events(self) -> Result<RunOutcome, VmError> {
        static SIGNAL: Once = Once::new();
        SIGNAL.call_once(|| {
            extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
            if let Err(e) = register_signal_handler(SIGRTMIN(), kick) {
                log::error!("registering the vCPU kick signal failed: {e}");
            }
        });
        let Vm {
            vcpus,
            fd,
            mem,
            pio,
            mmio,
            reset_evt,
            power_off_evt,
            console,
            payload,
            vcpu_count,
            ram_size,
            backend_desc,
            virtio,
            balloon,
            hotplug,
            api_socket,
            api_config,
            shutdown,
            seccomp,
            ..
        } = self;
        let io = |what: &str| {
            let what = what.to_string();
            move |source| VmError::Io { what, source }
        };
        let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| VmError::Config(format!("creating the event loop: {e:?}")))?;
        let transports: Vec<VirtioTransport> = virtio
            .iter()
            .map(|slot| {
                let t = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
                VirtioTransport {
                    name: VirtioTransport::device_name(t.device().device_type()),
                    mmio_base: slot.base,
                    transport: slot.transport.clone(),
                }
            })
            .collect();
        for slot in virtio {
            events.add_subscriber(Arc::new(Mutex::new(slot)));
        }
        // Dropping the handle (also on the error returns below) stops the
        // thread and removes the socket.
        let api = match &api_socket {
            Some(path) => {
                let ctx = Arc::new(ApiContext {
                    mem: mem.clone(),
                    vcpus: vcpu_count,
                    memory: ram_size,
                    backend: backend_desc,
                    balloon,
                    hotplug,
                    virtio: transports,
                });
                let server = ApiServer::with_config(path, ctx, api_config)
                    .map_err(io(&format!("creating the API socket {}", path.display())))?;
                Some(
                    server
                        .spawn_sandboxed(seccomp)
                        .map_err(io("spawning the API thread"))?,
                )
            }
            None => None,
        };
        let exited = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        let watcher = Arc::new(Mutex::new(ExitWatcher {
            reset: reset_evt,
            power_off: power_off_evt,
            exited: exited.try_clone().map_err(io("eventfd"))?,
            signals: shutdown,
            fault_failure: mem.fault_failure().cloned(),
            fired: None,
        }));
        events.add_subscriber(watcher.clone());

        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<(u8, ExitReason)>();
        let mut handles = Vec::new();
        for (id, mut v) in vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                id: id as u8,
                pio: pio.clone(),
                mmio: mmio.clone(),
                stop: stop.clone(),
                console: Some(console.clone()),
                payload,
            };
            let tx = tx.clone();
            let exited = exited.try_clone().map_err(io("eventfd"))?;
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let reason = match seccomp.then(|| install(ThreadKind::Vcpu)) {
                        Some(Err(e)) => ExitReason::Error(format!("vCPU {id}: {e}")),
                        _ => vcpu::run(&mut v, &ctx),
                    };
                    let _ = tx.send((ctx.id, reason));
                    let _ = exited.write(1);
                })
                .map_err(io("spawning a vCPU thread"))?;
            handles.push(h);
        }
        drop(tx);
        let n = handles.len();
        let mut reasons: Vec<Option<ExitReason>> = vec![None; n];
        let mut first: Option<ExitReason> = None;
        // Everything that opens, maps or spawns is done: from here on the
        // loop only serves the guest and tears the VM down.
        if seccomp {
            if let Err(e) = install(ThreadKind::EventLoop) {
                first = Some(ExitReason::Error(e.to_string()));
            }
        }
        let mut done = 0;
        while done < n && first.is_none() {
            if let Err(e) = events.run_with_timeout(100) {
                log::error!("event loop: {e:?}");
            }
            let requested = watcher
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fired
                .take();
            while let Ok((id, reason)) = rx.try_recv() {
                done += 1;
                let ends_vm = !payload || !reason.is_clean();
                if ends_vm && first.is_none() {
                    first = Some(reason.clone());
                }
                reasons[usize::from(id)] = Some(reason);
            }
            if first.is_none() {
                first = requested;
            }
        }
        // No more requests while the VM stops; the socket goes.
        if let Some(api) = api {
            api.stop();
        }
        // Stop whatever still runs: flag, then kick until every thread is out.
        stop.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(10);
        while done < n && Instant::now() < deadline {
            for h in &handles {
                if !h.is_finished() {
                    let _ = h.kill(SIGRTMIN());
                }
            }
            if let Ok((id, reason)) = rx.recv_timeout(Duration::from_millis(10)) {
                reasons[usize::from(id)] = Some(reason);
                done += 1;
            }
        }
        // A vCPU that reported its reason is on its way out: join it. One
        // that never reported may still be in the guest.
        let mut stuck = 0;
        for (id, h) in handles.into_iter().enumerate() {
            if reasons[id].is_some() || h.is_finished() {
                let _ = h.join();
            } else {
                stuck += 1;
            }
        }
        if stuck > 0 {
            // A vCPU thread that did not stop may still enter the guest: its
            // memslots point into guest memory, which must stay mapped for
            // as long as it can run. Leak the mappings rather than unmap
            // them under it.
            log::error!("{stuck} vCPU thread(s) did not stop; guest memory stays mapped");
            std::mem::forget(mem.clone());
        }
        let _ = console.lock().map(|mut c| c.flush());
        let reasons: Vec<ExitReason> = reasons
            .into_iter()
            .map(|r| r.unwrap_or_else(|| ExitReason::Error("vCPU did not stop".into())))
            .collect();
        let reason = first.unwrap_or_else(|| {
            reasons
                .iter()
                .find(|r| !r.is_clean())
                .cloned()
                .unwrap_or_else(|| reasons[0].clone())
        });
        drop(events);
        drop(fd);
        drop(mem);
        Ok(RunOutcome {
            reasons,
            reason,
            unhandled_io: pio.unhandled() + mmio.unhandled(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_gets_pci_off_unless_it_speaks_of_pci() {
        assert_eq!(
            with_platform_args("console=ttyS0 panic=-1 "),
            "console=ttyS0 panic=-1 pci=off"
        );
        assert_eq!(with_platform_args("pci=noacpi quiet"), "pci=noacpi quiet");
    }

    #[test]
    fn memory_sizes_are_checked() {
        for (size, page, what) in [
            (0, 4096, "zero"),
            (1 << 20, 4096, "too small"),
            ((64 << 20) + 512, 4096, "not a multiple"),
            (MAX_MEMORY + 4096, 4096, "larger than"),
            (3 << 20, 2 << 20, "not a multiple"),
        ] {
            let e = check_memory_size(size, page).unwrap_err().to_string();
            assert!(e.contains(what), "{size:#x}: {e}");
        }
        check_memory_size(256 << 20, 4096).unwrap();
    }

    #[test]
    fn hotplug_sizes_are_checked() {
        for (window, what) in [
            (0, "non-zero multiple"),
            (64 << 20, "non-zero multiple"),
            ((128 << 20) + 4096, "non-zero multiple"),
            (MAX_MEMORY * 2, "would end past"),
        ] {
            let e = check_hotplug_size(256 << 20, window)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{window:#x}: {e}");
        }
        check_hotplug_size(256 << 20, 512 << 20).unwrap();
        let mem = build_memory(
            256 << 20,
            &MemBackend::Memfd,
            FaultConfig::default(),
            Some(256 << 20),
        )
        .unwrap();
        let w = &mem.regions()[1];
        assert_eq!(
            (w.guest_base().0, w.max_size(), w.backed_size()),
            (4 << 30, 256 << 20, 0)
        );
    }

    #[test]
    fn unusable_backends_are_refused_with_the_path() {
        let fault = FaultConfig::default();
        let e = build_memory(
            64 << 20,
            &MemBackend::File("/proc".into()),
            fault.clone(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/proc"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = build_memory(
            64 << 20,
            &MemBackend::Hugetlbfs(Some(dir.path().join("x"))),
            fault,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not on a hugetlbfs"), "{e}");
    }

    #[test]
    fn big_memory_splits_around_the_gap() {
        let mem = build_memory(4 << 30, &MemBackend::Memfd, FaultConfig::default(), None).unwrap();
        let r = mem.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].guest_base().0, r[0].max_size()), (0, MMIO_GAP_START));
        assert_eq!(r[1].guest_base().0, MMIO_GAP_END);
        assert_eq!(r[1].file_offset(), MMIO_GAP_START);
        assert!(
            Arc::ptr_eq(r[0].backing(), r[1].backing()),
            "one backing file"
        );
    }

    /// `out 0xe0` ends a payload with its verdict; from any other guest it
    /// is an ordinary unclaimed port write, not a way to stop the VM.
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
