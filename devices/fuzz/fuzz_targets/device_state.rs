//! Fuzzes the device state loader: the input's bytes are a state file's
//! contents, parsed as a virtio-mmio transport state and restored in front
//! of a balloon and of virtio-mem, and as the serial, CMOS, i8042 and ACPI
//! sleep states. The property: no panic, whatever the bytes; a state that
//! is accepted gives a device that saves a state which restores again, and
//! a running one that serves its queues without panicking.
#![no_main]

use std::sync::Arc;

use devices::legacy::{
    AcpiSleep, AcpiSleepState, Cmos, CmosState, I8042State, SerialConsole, SerialConsoleState,
    I8042,
};
use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::mem::VirtioMem;
use devices::virtio::mmio::{MmioTransport, MmioTransportState};
use devices::virtio::{Interrupt, VirtioDevice};
use guest_mem::backend::HotplugRegion;
use guest_mem::{GuestMem, RegionConfig, RegionIndex};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;

fn evt() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
}

/// Restores `state` in front of `device`; an accepted one must save and
/// restore again, and run.
fn transport(
    device: Box<dyn VirtioDevice>,
    again: Box<dyn VirtioDevice>,
    mem: &GuestMem,
    state: &MmioTransportState,
) {
    let irq = Arc::new(Interrupt::new(evt()));
    let Ok(mut t) = MmioTransport::restore(device, mem.device_memory(), irq.clone(), state) else {
        return;
    };
    let saved = t.save();
    t.kick_queues();
    MmioTransport::restore(again, mem.device_memory(), irq, &saved)
        .expect("a saved state restores");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = serde_json::from_slice::<MmioTransportState>(data) {
        let mut window = RegionConfig::new(64 * MIB, 4 * MIB);
        window.max_size = Some(16 * MIB);
        let mem = Arc::new(
            GuestMem::builder()
                .region(RegionConfig::new(0, 2 * MIB))
                .region(window)
                .build()
                .expect("guest memory"),
        );
        let balloon = || -> Box<dyn VirtioDevice> {
            Box::new(Balloon::new(mem.clone(), BalloonConfig::default()))
        };
        transport(balloon(), balloon(), &mem, &state);
        let virtio_mem = || -> Box<dyn VirtioDevice> {
            let region = HotplugRegion::new(mem.clone(), RegionIndex(1)).expect("window");
            Box::new(VirtioMem::new(Arc::new(region)).expect("virtio-mem"))
        };
        transport(virtio_mem(), virtio_mem(), &mem, &state);
    }
    if let Ok(s) = serde_json::from_slice::<SerialConsoleState>(data) {
        if let Ok(c) = SerialConsole::restore(evt(), Box::new(std::io::sink()), &s) {
            assert_eq!(c.save(), s);
        }
    }
    if let Ok(s) = serde_json::from_slice::<CmosState>(data) {
        if let Ok(c) = Cmos::restore(&s) {
            assert_eq!(c.save(), s);
        }
    }
    if let Ok(s) = serde_json::from_slice::<I8042State>(data) {
        let _ = I8042::restore(evt(), &s);
    }
    if let Ok(s) = serde_json::from_slice::<AcpiSleepState>(data) {
        let _ = AcpiSleep::restore(evt(), &s);
    }
});
