//! The devices of a VM: the legacy ones on the port I/O bus (serial
//! console, i8042, CMOS, ACPI sleep), the virtio-mmio ones on the MMIO bus
//! (balloon, virtio-mem), the console they write to and the events by
//! which the guest resets or powers off.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, SharedDevice};
use devices::legacy::{
    AcpiSleep, AcpiSleepState, Cmos, CmosState, I8042State, SerialConsole, SerialConsoleState,
    I8042,
};
use devices::virtio::balloon::{Balloon, VIRTIO_ID_BALLOON};
use devices::virtio::mem::{VirtioMem, VIRTIO_ID_MEM};
use devices::virtio::mmio::MmioTransportState;
use devices::virtio::VirtioDevice;
use guest_mem::{GuestMem, RegionIndex};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{BalloonHandle, HotplugHandle};
use crate::config::{BalloonOptions, SerialOut};
use crate::error::{io_err, kvm_err, VmError};
use crate::hotplug_window::HotplugWindow;
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

/// Every device's saved state, for a snapshot.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialConsoleState,
    /// The i8042.
    pub i8042: I8042State,
    /// The CMOS clock.
    pub cmos: CmosState,
    /// The ACPI sleep register.
    pub acpi_sleep: AcpiSleepState,
    /// The balloon's transport and device, if the VM has one.
    pub balloon: Option<MmioTransportState>,
    /// virtio-mem's transport and device, if the VM has one.
    pub virtio_mem: Option<MmioTransportState>,
}

fn restored<T>(what: &str, r: Result<T, devices::state::StateError>) -> Result<T, VmError> {
    r.map_err(|e| VmError::Config(format!("snapshot: {what}: {e}")))
}

impl DeviceManager {
    /// The legacy devices, writing the console to `serial`; as `saved`
    /// left them, if given.
    pub fn new(
        fd: &VmFd,
        serial: SerialOut,
        saved: Option<&DevicesState>,
    ) -> Result<Self, VmError> {
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
        let out = Box::new(SharedWriter(console.clone()));
        let reset = reset_evt.try_clone().map_err(io_err("eventfd"))?;
        let power_off = power_off_evt.try_clone().map_err(io_err("eventfd"))?;
        let (serial, i8042, cmos, acpi_sleep) = match saved {
            None => (
                SerialConsole::new(serial_irq, out),
                I8042::new(reset),
                Cmos::new(),
                AcpiSleep::new(power_off),
            ),
            Some(s) => (
                restored("serial", SerialConsole::restore(serial_irq, out, &s.serial))?,
                restored("i8042", I8042::restore(reset, &s.i8042))?,
                restored("CMOS", Cmos::restore(&s.cmos))?,
                restored("ACPI sleep", AcpiSleep::restore(power_off, &s.acpi_sleep))?,
            ),
        };
        let legacy = LegacyDevices {
            serial: Arc::new(Mutex::new(serial)),
            i8042: Arc::new(Mutex::new(i8042)),
            cmos: Arc::new(Mutex::new(cmos)),
            acpi_sleep: Arc::new(Mutex::new(acpi_sleep)),
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
        saved: Option<&MmioTransportState>,
    ) -> Result<Arc<Mutex<devices::virtio::mmio::MmioTransport>>, VmError> {
        let slot = VirtioSlot::attach(
            self.virtio.len() as u32,
            device,
            mem.device_memory(),
            fd,
            &mut self.mmio,
            saved,
        )?;
        let transport = slot.transport.clone();
        self.virtio.push(slot);
        Ok(transport)
    }

    /// Adds a virtio-balloon over `mem` (as `saved` left it, if given).
    pub fn add_balloon(
        &mut self,
        fd: &VmFd,
        mem: &Arc<GuestMem>,
        opts: BalloonOptions,
        saved: Option<&MmioTransportState>,
    ) -> Result<(), VmError> {
        let backend: Arc<dyn devices::memory::MemoryBackend> = mem.clone();
        let device = Balloon::new(backend, opts);
        let state = device.state();
        let transport = self.attach(fd, mem, Box::new(device), saved)?;
        self.balloon = Some(BalloonHandle { state, transport });
        Ok(())
    }

    /// Adds a virtio-mem device over the last region of `mem`, its window
    /// (as `saved` left it, if given); the window's memory slots are
    /// numbered from that region's index.
    pub fn add_hotplug(
        &mut self,
        fd: &Arc<VmFd>,
        mem: &Arc<GuestMem>,
        saved: Option<&MmioTransportState>,
    ) -> Result<(), VmError> {
        let last = mem.regions().len() - 1;
        let window = Arc::new(HotplugWindow::new(
            fd.clone(),
            mem.clone(),
            RegionIndex(last),
            last as u32,
        )?);
        let device = VirtioMem::new(window.clone()).map_err(VmError::Config)?;
        let state = device.state();
        let transport = self.attach(fd, mem, Box::new(device), saved)?;
        self.hotplug = Some(HotplugHandle {
            state,
            transport,
            guard: Some(window.guard()),
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

/// Every device's state, for a snapshot. The VM must be paused: no vCPU
/// in a device, no notification being served.
pub fn save_devices(
    legacy: &LegacyDevices,
    transports: &[Arc<Mutex<devices::virtio::mmio::MmioTransport>>],
) -> Result<DevicesState, String> {
    let mut balloon = None;
    let mut virtio_mem = None;
    for t in transports {
        let t = t.lock().unwrap_or_else(|p| p.into_inner());
        let state = t.save();
        match t.device().device_type() {
            VIRTIO_ID_BALLOON => balloon = Some(state),
            VIRTIO_ID_MEM => virtio_mem = Some(state),
            other => return Err(format!("cannot save a virtio device of type {other}")),
        }
    }
    Ok(DevicesState {
        serial: legacy
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save(),
        i8042: legacy
            .i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save(),
        cmos: legacy.cmos.lock().unwrap_or_else(|p| p.into_inner()).save(),
        acpi_sleep: legacy
            .acpi_sleep
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save(),
        balloon,
        virtio_mem,
    })
}
