//! The devices of a VM: the legacy ones on the port I/O bus (serial
//! console, i8042, CMOS, ACPI sleep), the virtio-mmio ones on the MMIO bus
//! (balloon, virtio-mem), the console they write to and the events by
//! which the guest resets or powers off.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, SharedDevice};
use devices::legacy::{AcpiSleep, Cmos, SerialConsole, I8042};
use devices::virtio::balloon::Balloon;
use devices::virtio::mem::VirtioMem;
use devices::virtio::VirtioDevice;
use guest_mem::{GuestMem, RegionIndex};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{BalloonHandle, HotplugHandle};
use crate::config::{BalloonOptions, SerialOut};
use crate::error::{io_err, kvm_err, VmError};
use crate::hotplug_slots::SlottedWindow;
use crate::virtio::VirtioSlot;

/// The console every guest-visible writer (serial, payload debug port)
/// shares.
pub type Console = Arc<Mutex<Box<dyn Write + Send>>>;

/// The legacy devices, by type (they are also on the port bus).
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The i8042 (reset line).
    pub i8042: Arc<Mutex<I8042>>,
    /// The CMOS clock.
    pub cmos: Arc<Mutex<Cmos>>,
    /// The ACPI sleep register (power off).
    pub acpi_sleep: Arc<Mutex<AcpiSleep>>,
}

/// A VM's devices, wired to its VM fd and memory.
pub struct DeviceManager {
    /// The legacy devices.
    pub legacy: LegacyDevices,
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Where the serial console writes.
    pub console: Console,
    /// Signalled by the i8042 when the guest resets.
    pub reset_evt: EventFd,
    /// Signalled by the ACPI sleep register when the guest powers off.
    pub power_off_evt: EventFd,
    /// The virtio-mmio slots, in MMIO window order.
    pub virtio: Vec<VirtioSlot>,
    /// The balloon, if any.
    pub balloon: Option<BalloonHandle>,
    /// The virtio-mem device, if any.
    pub hotplug: Option<HotplugHandle>,
}

impl DeviceManager {
    /// The legacy devices, writing the console to `serial`.
    pub fn new(fd: &VmFd, serial: SerialOut) -> Result<Self, VmError> {
        let out: Box<dyn Write + Send> = match serial {
            SerialOut::Stdout => Box::new(std::io::stdout()),
            SerialOut::File(p) => Box::new(
                std::fs::File::create(&p).map_err(io_err(format!("creating {}", p.display())))?,
            ),
            SerialOut::Writer(w) => w,
            SerialOut::Sink => Box::new(std::io::sink()),
        };
        let console: Console = Arc::new(Mutex::new(out));
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"));

        let mut pio = Bus::new();
        let reset_evt = eventfd()?;
        let power_off_evt = eventfd()?;
        let serial_irq = eventfd()?;
        fd.register_irqfd(&serial_irq, SerialConsole::COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let legacy = LegacyDevices {
            serial: Arc::new(Mutex::new(SerialConsole::new(
                serial_irq,
                Box::new(SharedWriter(console.clone())),
            ))),
            i8042: Arc::new(Mutex::new(I8042::new(
                reset_evt.try_clone().map_err(io_err("eventfd"))?,
            ))),
            cmos: Arc::new(Mutex::new(Cmos::new())),
            acpi_sleep: Arc::new(Mutex::new(AcpiSleep::new(
                power_off_evt.try_clone().map_err(io_err("eventfd"))?,
            ))),
        };
        let on_bus: [(SharedDevice, u64, u64); 4] = [
            (legacy.serial.clone(), SerialConsole::COM1, 8),
            (legacy.i8042.clone(), I8042::BASE, I8042::LEN),
            (legacy.cmos.clone(), Cmos::BASE, Cmos::LEN),
            (legacy.acpi_sleep.clone(), AcpiSleep::BASE, AcpiSleep::LEN),
        ];
        for (d, base, len) in on_bus {
            pio.insert(d, base, len)
                .map_err(|e| VmError::Config(e.to_string()))?;
        }
        Ok(DeviceManager {
            legacy,
            pio,
            mmio: Bus::new(),
            console,
            reset_evt,
            power_off_evt,
            virtio: Vec::new(),
            balloon: None,
            hotplug: None,
        })
    }

    /// Puts `device` in the next virtio-mmio window, with the next GSI.
    fn attach(
        &mut self,
        fd: &VmFd,
        mem: &GuestMem,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Arc<Mutex<devices::virtio::mmio::MmioTransport>>, VmError> {
        let slot = VirtioSlot::attach(
            self.virtio.len() as u32,
            device,
            mem.device_memory(),
            fd,
            &mut self.mmio,
        )?;
        let transport = slot.transport.clone();
        self.virtio.push(slot);
        Ok(transport)
    }

    /// Adds a virtio-balloon over `mem`.
    pub fn add_balloon(
        &mut self,
        fd: &VmFd,
        mem: &Arc<GuestMem>,
        opts: BalloonOptions,
    ) -> Result<(), VmError> {
        let backend: Arc<dyn devices::memory::MemoryBackend> = mem.clone();
        let device = Balloon::new(backend, opts);
        let state = device.state();
        let transport = self.attach(fd, mem, Box::new(device))?;
        self.balloon = Some(BalloonHandle { state, transport });
        Ok(())
    }

    /// Adds a virtio-mem device over the last region of `mem`, its window;
    /// the window's memory slots are numbered from that region's index.
    pub fn add_hotplug(&mut self, fd: &Arc<VmFd>, mem: &Arc<GuestMem>) -> Result<(), VmError> {
        let last = mem.regions().len() - 1;
        let window = Arc::new(SlottedWindow::new(
            fd.clone(),
            mem.clone(),
            RegionIndex(last),
            last as u32,
        )?);
        let device = VirtioMem::new(window.clone()).map_err(VmError::Config)?;
        let state = device.state();
        let transport = self.attach(fd, mem, Box::new(device))?;
        self.hotplug = Some(HotplugHandle {
            state,
            transport,
            window,
        });
        Ok(())
    }
}

/// A [`Console`] as a writer of its own.
struct SharedWriter(Console);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// The state of every virtio device, for a snapshot.
pub fn save_devices(
    _legacy: &LegacyDevices,
    transports: &[Arc<Mutex<devices::virtio::mmio::MmioTransport>>],
) -> Result<serde_json::Value, String> {
    if !transports.is_empty() {
        return Err("snapshots of VMs with virtio devices are not supported yet".into());
    }
    Ok(serde_json::json!({}))
}

/// Puts saved virtio device state back (see [`save_devices`]).
pub fn restore_devices(
    devices: &mut DeviceManager,
    saved: &serde_json::Value,
) -> Result<(), String> {
    if !devices.virtio.is_empty() || saved.as_object().is_none_or(|o| !o.is_empty()) {
        return Err("snapshots of VMs with virtio devices are not supported yet".into());
    }
    Ok(())
}
