//! Virtio-mmio devices on the VMM side: their MMIO window, the irqfd that
//! carries their interrupt, the ioeventfds that carry the driver's queue
//! notifications, and the event-loop subscriber that services them.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, SharedDevice};
use devices::virtio::mmio::{MmioTransport, MmioTransportState, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{Interrupt, VirtioDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use guest_mem::DeviceMemory;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::error::VmError;
use crate::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// First interrupt line for virtio devices (the serial console has 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// One virtio-mmio device slot.
pub struct VirtioSlot {
    /// The transport and its device.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Guest-physical base of its window.
    pub base: u64,
    /// Its interrupt line.
    pub irq: u32,
    queue_evts: Vec<EventFd>,
}

impl VirtioSlot {
    /// Places `device` in slot `index`: MMIO window, irqfd and ioeventfds.
    /// With `saved`, the transport and device come back as a snapshot left
    /// them (a running device running, its queues where they were).
    pub fn attach(
        index: u32,
        device: Box<dyn VirtioDevice>,
        mem: DeviceMemory,
        vm: &VmFd,
        mmio: &mut Bus,
        saved: Option<&MmioTransportState>,
    ) -> Result<VirtioSlot, VmError> {
        let base = VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + index;
        let io = |what: &str| {
            let what = what.to_string();
            move |source| VmError::Io { what, source }
        };
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|source| VmError::Kvm {
                what: "KVM_IRQFD",
                source,
            })?;
        let queues = device.queue_max_sizes().len();
        let interrupt = Arc::new(Interrupt::new(irq_evt));
        let transport = match saved {
            None => MmioTransport::new(device, mem, interrupt),
            Some(state) => MmioTransport::restore(device, mem, interrupt, state)
                .map_err(|e| VmError::Config(format!("snapshot: {e}")))?,
        };
        let transport = Arc::new(Mutex::new(transport));
        let mut queue_evts = Vec::with_capacity(queues);
        for q in 0..queues as u32 {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), q)
                .map_err(|source| VmError::Kvm {
                    what: "KVM_IOEVENTFD",
                    source,
                })?;
            queue_evts.push(evt);
        }
        let clones = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(io("eventfd"))?;
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_notify_events(clones);
        let shared: SharedDevice = transport.clone();
        mmio.insert(shared, base, VIRTIO_MMIO_SIZE)
            .map_err(|e| VmError::Config(e.to_string()))?;
        Ok(VirtioSlot {
            transport,
            base,
            irq,
            queue_evts,
        })
    }

    /// The kernel command-line word that announces the device (for
    /// guests without ACPI; the VMM describes it in the DSDT instead).
    pub fn cmdline(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }

    /// How the ACPI tables describe the device.
    pub fn acpi(&self) -> crate::boot::acpi::VirtioMmioDevice {
        crate::boot::acpi::VirtioMmioDevice {
            base: self.base,
            size: VIRTIO_MMIO_SIZE,
            irq: self.irq,
        }
    }
}

impl MutEventSubscriber for VirtioSlot {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio: watching queue {i} notifications: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let q = events.data();
        if let Some(evt) = self.queue_evts.get(q as usize) {
            let _ = evt.read();
            // Work left over re-arms the eventfd: served on a later turn.
            self.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .queue_notified(q);
        }
    }
}
