//! The virtio-mmio transport, version 2 (virtio 1.x section 4.2).
//!
//! Register accesses come straight from the guest: every value is checked,
//! out-of-order or out-of-range writes are ignored and counted, and nothing
//! here panics on them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guest_mem::DeviceMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, Progress, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

mod saved;
pub use saved::{MmioTransportState, VirtqueueState, MMIO_STATE_VERSION};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4551; // as QEMU and others do

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Register offsets (virtio 1.x, 4.2.2), from virtio-bindings.
mod reg {
    use virtio_bindings::virtio_mmio as m;
    pub const MAGIC: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_DRIVER_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_DRIVER_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_DEVICE_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_DEVICE_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
}

/// The status bits in the order a driver sets them.
const STATUS_ORDER: [u32; 4] = [
    status::ACKNOWLEDGE,
    status::DRIVER,
    status::FEATURES_OK,
    status::DRIVER_OK,
];

/// Offset of the notify register, for the VMM's ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// A virtio device behind the MMIO register interface, reaching guest
/// memory through `M`.
pub struct MmioTransport<M: GuestAddressSpace = DeviceMemory> {
    device: Box<dyn VirtioDevice<M>>,
    mem: M,
    interrupt: Arc<Interrupt>,
    /// The queues' notification eventfds, written to continue a queue
    /// whose work was cut at the budget (the event loop comes back to it
    /// after everything else).
    notify_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    /// Queues whose driver wrote a size the device cannot use (zero, not a
    /// power of two, past the maximum): virtio-queue ignores such a write
    /// and keeps its old size, so the refusal is remembered here and
    /// activation fails, rather than the device running the driver's rings
    /// at a size the driver never chose.
    bad_size: Vec<bool>,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// Queues notified before DRIVER_OK (Linux's balloon primes its stats
    /// queue that early), served once the device runs.
    early_notifies: u64,
    rejected: AtomicU64,
}

impl<M: GuestAddressSpace> MmioTransport<M> {
    /// Puts `device` behind the transport; `interrupt` is its irqfd.
    pub fn new(device: Box<dyn VirtioDevice<M>>, mem: M, interrupt: Arc<Interrupt>) -> Self {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            notify_evts: Vec::new(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            bad_size: vec![false; queues.len()],
            queues,
            status: 0,
            config_generation: 0,
            activated: false,
            early_notifies: 0,
            rejected: AtomicU64::new(0),
        }
    }

    /// Sets the eventfds the VMM watches for each queue's notifications,
    /// so that work cut at a notification's budget is continued there.
    pub fn set_notify_events(&mut self, evts: Vec<EventFd>) {
        self.notify_evts = evts;
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice<M> {
        self.device.as_ref()
    }

    /// The device behind the transport, mutably (configuration changes).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice<M> {
        self.device.as_mut()
    }

    /// Whether the driver has set DRIVER_OK and the device runs.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Register accesses refused (bad size, wrong state, out of range).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Tells the driver the configuration changed.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.raise(Interrupt::CONFIG);
        }
    }

    /// Asks the device for fresh device-reported data, if it runs.
    pub fn refresh(&mut self) {
        if self.activated {
            self.device.refresh();
        }
    }

    /// The driver notified queue `index` (from the ioeventfd, or a trapped
    /// write to the notify register). Returns whether work is left over.
    pub fn queue_notified(&mut self, index: u32) -> Progress {
        let i = index as usize;
        if i >= self.queues.len() {
            self.reject(format_args!(
                "notify of queue {index}, which does not exist"
            ));
        } else if self.activated {
            return self.process(i);
        } else if i < 64 && self.queues[i].ready() {
            self.early_notifies |= 1 << i;
        } else {
            self.reject(format_args!("notify of queue {index} before it is ready"));
        }
        Progress::Done
    }

    /// Lets the device process queue `i`; work left over is continued
    /// through the queue's eventfd, after the event loop's other work.
    fn process(&mut self, i: usize) -> Progress {
        let progress = self.device.process_queue(i);
        if progress == Progress::MoreWork {
            if let Some(evt) = self.notify_evts.get(i) {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio-mmio: re-arming queue {i}: {e}");
                }
            }
        }
        progress
    }

    fn reject(&self, what: std::fmt::Arguments<'_>) {
        crate::guest_log::refuse(&self.rejected, format_args!("virtio-mmio: ignoring {what}"));
    }

    fn all_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.early_notifies = 0;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.bad_size.fill(false);
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, v: u32) {
        const ORDER: [u32; 4] = STATUS_ORDER;
        if v == 0 {
            return self.reset();
        }
        if v & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        // Bits are only ever added, each after the one before it; clearing
        // takes a reset. Anything else is a driver bug and changes nothing.
        if v & self.status != self.status {
            return self.reject(format_args!(
                "status {v:#x} clearing bits of {:#x}",
                self.status
            ));
        }
        let added = v & !self.status;
        let mut have = self.status;
        for (i, &bit) in ORDER.iter().enumerate() {
            if added & bit == 0 {
                continue;
            }
            if i > 0 && have & ORDER[i - 1] == 0 {
                return self.reject(format_args!("status bit {bit:#x} out of order"));
            }
            if bit == status::FEATURES_OK {
                let unknown = self.driver_features & !self.all_features();
                if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                    // FEATURES_OK stays clear: the driver reads it back and
                    // gives up (virtio 1.x 3.1.1).
                    return self.reject(format_args!(
                        "driver features {:#x} (device offers {:#x})",
                        self.driver_features,
                        self.all_features()
                    ));
                }
                self.device.ack_features(self.driver_features);
            }
            have |= bit;
        }
        self.status = have;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        // The guard is dropped before the device runs: a notification
        // served below may unplug memory, which waits for every guard.
        let bad = {
            let mem = self.mem.memory();
            self.queues
                .iter()
                .enumerate()
                .find(|(i, q)| q.ready() && (self.bad_size[*i] || !q.is_valid(&*mem)))
                .map(|(i, _)| i)
        };
        let copies: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let result = match (bad, copies) {
            (Some(i), _) => Err(super::ActivateError::BadQueues(format!(
                "queue {i} has a size the device cannot use or does not lie in guest memory"
            ))),
            (None, Err(e)) => Err(super::ActivateError::BadQueues(e.to_string())),
            (None, Ok(queues)) => {
                self.device
                    .activate(self.mem.clone(), self.interrupt.clone(), queues)
            }
        };
        match result {
            Ok(()) => {
                self.activated = true;
                let early = std::mem::take(&mut self.early_notifies);
                for i in (0..self.queues.len()).filter(|i| early & (1 << i) != 0) {
                    self.process(i);
                }
            }
            Err(e) => {
                crate::guest_warn!(
                    "virtio-mmio: activating device {}: {e}",
                    self.device.device_type()
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.raise(Interrupt::CONFIG);
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.all_features() as u32,
                1 => (self.all_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                self.reject(format_args!("read of register {offset:#x}"));
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0
                    || self.status & status::DRIVER == 0
                {
                    return self
                        .reject(format_args!("driver features in status {:#x}", self.status));
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    s => self.reject(format_args!("driver features select {s}")),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => {
                self.queue_notified(v);
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !setup {
                    return self.reject(format_args!(
                        "queue register {offset:#x} in status {:#x}",
                        self.status
                    ));
                }
                let sel = self.queue_sel;
                let Some(q) = self.selected_queue() else {
                    return self.reject(format_args!("queue register of queue {sel}"));
                };
                match offset {
                    reg::QUEUE_NUM => {
                        let ok = v != 0 && v.is_power_of_two() && v <= u32::from(q.max_size());
                        if ok {
                            q.set_size(v as u16);
                        }
                        if let Some(b) = self.bad_size.get_mut(sel as usize) {
                            *b = !ok;
                        }
                        if !ok {
                            self.reject(format_args!("queue {sel} size {v}"));
                        }
                    }
                    reg::QUEUE_READY => q.set_ready(v == 1),
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
                    reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
                    reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            _ => self.reject(format_args!("write of register {offset:#x}")),
        }
    }
}

impl<M: GuestAddressSpace + Send> BusDevice for MmioTransport<M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            return self.device.read_config(offset - reg::CONFIG, data);
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return self.reject(format_args!("{}-byte read at {offset:#x}", data.len()));
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::FAILED == 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return self.reject(format_args!("{}-byte write at {offset:#x}", data.len()));
        }
        let v = u32::from_le_bytes(data.try_into().expect("checked length"));
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Default)]
    struct Seen {
        acked: u64,
        activated: usize,
        processed: Vec<usize>,
        resets: usize,
        config: Vec<u8>,
        more_work: bool,
    }

    struct Dummy(Arc<Mutex<Seen>>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn features(&self) -> u64 {
            0b101
        }
        fn ack_features(&mut self, f: u64) {
            self.0.lock().unwrap().acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let s = self.0.lock().unwrap();
            for (i, b) in data.iter_mut().enumerate() {
                *b = s.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut s = self.0.lock().unwrap();
            let end = offset as usize + data.len();
            if s.config.len() < end {
                s.config.resize(end, 0);
            }
            s.config[offset as usize..end].copy_from_slice(data);
        }
        fn activate(
            &mut self,
            _mem: DeviceMemory,
            _i: Arc<Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), super::super::ActivateError> {
            assert_eq!(queues.len(), 2);
            self.0.lock().unwrap().activated += 1;
            Ok(())
        }
        fn process_queue(&mut self, index: usize) -> Progress {
            let mut s = self.0.lock().unwrap();
            s.processed.push(index);
            if s.more_work {
                Progress::MoreWork
            } else {
                Progress::Done
            }
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Seen>>, Arc<Interrupt>) {
        let mem = guest_mem::GuestMem::builder()
            .region(guest_mem::RegionConfig::new(0, 1 << 20))
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        // The atomic map keeps the mappings alive after `mem` goes.
        let t = MmioTransport::new(
            Box::new(Dummy(seen.clone())),
            mem.device_memory(),
            irq.clone(),
        );
        (t, seen, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, q: u32, base: u64) {
        w(t, reg::QUEUE_SEL, q);
        w(t, reg::QUEUE_NUM, 16);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport, features_hi: u32, features_lo: u32) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, features_hi);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features_lo);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 5);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0b101);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
        w(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn full_handshake_activates_and_routes_notifications() {
        let (mut t, seen, _) = transport();
        negotiate(&mut t, 1, 0b100);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(seen.lock().unwrap().acked, (1 << 32) | 0b100);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.is_activated());
        assert_eq!(seen.lock().unwrap().activated, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        t.queue_notified(0);
        t.queue_notified(7); // no such queue: ignored
        assert_eq!(seen.lock().unwrap().processed, vec![1, 0]);
        // Reset.
        w(&mut t, reg::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(seen.lock().unwrap().resets, 1);
    }

    #[test]
    fn a_notify_before_driver_ok_is_served_at_activation() {
        let (mut t, seen, _) = transport();
        negotiate(&mut t, 1, 0);
        setup_queue(&mut t, 1, 0x20000);
        t.queue_notified(1); // ready: kept for later
        t.queue_notified(0); // not ready yet: refused
        assert!(seen.lock().unwrap().processed.is_empty());
        assert_eq!(t.rejected(), 1);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(seen.lock().unwrap().processed, vec![1]);
        // A reset forgets notifications the device never saw.
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1, 0);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        t.queue_notified(0);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1, 0);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(seen.lock().unwrap().processed, vec![1]);
    }

    #[test]
    fn features_without_version_1_or_unknown_bits_are_refused() {
        let (mut t, seen, _) = transport();
        negotiate(&mut t, 0, 0b100);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1, 0b110); // bit 1 is not offered
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(seen.lock().unwrap().acked, 0);
        assert!(t.rejected() >= 2);
    }

    #[test]
    fn out_of_order_and_late_writes_are_ignored() {
        let (mut t, seen, _) = transport();
        // DRIVER_OK before anything else.
        w(&mut t, reg::STATUS, status::DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, reg::STATUS), 0);
        // Queue set-up before FEATURES_OK.
        w(&mut t, reg::QUEUE_NUM, 16);
        negotiate(&mut t, 1, 0);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.is_activated());
        // Queue registers after DRIVER_OK, feature writes after FEATURES_OK.
        let before = t.rejected();
        w(&mut t, reg::QUEUE_DESC_LOW, 0xdead_0000);
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.rejected(), before + 2);
        // Clearing bits without a reset.
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, reg::STATUS), 0xf);
        // Odd sizes and unknown registers.
        t.write(reg::STATUS, &[0, 0]);
        let mut b = [0u8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        w(&mut t, 0x0f0, 1);
        assert_eq!(r(&mut t, 0x0f0), 0);
        assert_eq!(seen.lock().unwrap().activated, 1);
    }

    #[test]
    fn a_queue_outside_memory_does_not_activate() {
        let (mut t, seen, irq) = transport();
        negotiate(&mut t, 1, 0);
        setup_queue(&mut t, 0, 0xfff0_0000); // past the 1 MiB of RAM
        w(&mut t, reg::STATUS, 0xf);
        assert!(!t.is_activated());
        assert_eq!(seen.lock().unwrap().activated, 0);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(irq.status() & Interrupt::CONFIG, 0);
    }

    #[test]
    fn config_space_passes_through_and_changes_bump_the_generation() {
        let (mut t, seen, irq) = transport();
        t.write(reg::CONFIG + 4, &[1, 2, 3, 4]);
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 5, &mut b);
        assert_eq!(b, [2, 3]);
        assert_eq!(seen.lock().unwrap().config[4..8], [1, 2, 3, 4]);
        let g = r(&mut t, reg::CONFIG_GENERATION);
        t.config_changed();
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), g + 1);
        assert_eq!(irq.status(), 0, "no interrupt before DRIVER_OK");
        w(&mut t, reg::INTERRUPT_ACK, 0);
    }

    #[test]
    fn work_left_over_is_continued_through_the_queue_eventfd() {
        let (mut t, seen, _) = transport();
        let evts: Vec<_> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        t.set_notify_events(evts.iter().map(|e| e.try_clone().unwrap()).collect());
        negotiate(&mut t, 1, 0);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(t.queue_notified(1), Progress::Done);
        assert!(evts[1].read().is_err(), "nothing to continue");
        seen.lock().unwrap().more_work = true;
        assert_eq!(t.queue_notified(1), Progress::MoreWork);
        assert_eq!(evts[1].read().unwrap(), 1, "re-armed");
        assert!(evts[0].read().is_err());
    }

    #[test]
    fn a_queue_size_the_device_cannot_use_stops_activation() {
        for size in [0, 3, 1024, 65535] {
            let (mut t, seen, _) = transport();
            negotiate(&mut t, 1, 0);
            setup_queue(&mut t, 0, 0x10000);
            w(&mut t, reg::QUEUE_SEL, 0);
            w(&mut t, reg::QUEUE_NUM, size);
            w(&mut t, reg::STATUS, 0xf);
            assert!(!t.is_activated(), "size {size}");
            assert_eq!(seen.lock().unwrap().activated, 0);
            assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
            // A reset and a good size make it usable again.
            w(&mut t, reg::STATUS, 0);
            negotiate(&mut t, 1, 0);
            setup_queue(&mut t, 0, 0x10000);
            w(&mut t, reg::STATUS, 0xf);
            assert!(t.is_activated(), "size {size}, then 16");
        }
    }

    /// A device that shrinks guest memory when notified, as virtio-mem's
    /// unplug does.
    struct Shrinker(Arc<guest_mem::GuestMem>, Arc<Mutex<Vec<bool>>>);

    impl VirtioDevice for Shrinker {
        fn device_type(&self) -> u32 {
            24
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: DeviceMemory,
            _: Arc<Interrupt>,
            _: Vec<Queue>,
        ) -> Result<(), super::super::ActivateError> {
            Ok(())
        }
        fn process_queue(&mut self, _: usize) -> Progress {
            let ok = self.0.resize(guest_mem::RegionIndex(1), 2 << 20).is_ok();
            self.1.lock().unwrap().push(ok);
            Progress::Done
        }
        fn reset(&mut self) {}
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
    }

    /// A notification queued before DRIVER_OK is served at activation with
    /// no memory guard held, so an unplug it asks for can run.
    #[test]
    fn an_early_notification_may_unplug_memory() {
        let mut window = guest_mem::RegionConfig::new(1 << 30, 4 << 20);
        window.max_size = Some(4 << 20);
        let mem = Arc::new(
            guest_mem::GuestMem::builder()
                .region(guest_mem::RegionConfig::new(0, 1 << 20))
                .region(window)
                .build()
                .unwrap(),
        );
        let results = Arc::new(Mutex::new(Vec::new()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(
            Box::new(Shrinker(mem.clone(), results.clone())),
            mem.device_memory(),
            irq,
        );
        negotiate(&mut t, 1, 0);
        setup_queue(&mut t, 0, 0x10000);
        t.queue_notified(0); // early: served at DRIVER_OK
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(*results.lock().unwrap(), vec![true]);
        assert_eq!(mem.regions()[1].backed_size(), 2 << 20);
    }
}
