//! Virtio devices over the MMIO transport (virtio 1.x, "modern" only).

pub mod balloon;
pub mod chain;
pub mod mem;
pub mod mmio;
pub mod resize_timer;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use guest_mem::DeviceMemory;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};

use crate::state::StateError;
pub use chain::Progress;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: the only mode this transport offers.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up the queues inconsistently.
    #[error("invalid queue configuration: {0}")]
    BadQueues(String),
}

/// Raises the device's interrupt: sets a bit in the transport's interrupt
/// status and signals the irqfd.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// Used-buffer notification.
    pub const VRING: u32 = 1;
    /// Configuration change notification.
    pub const CONFIG: u32 = 2;

    /// An interrupt signalled through `irq` (an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Sets `bits` in the interrupt status and signals the guest.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            log::error!("virtio: signalling the interrupt failed: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Sets the interrupt status register to a restored value without
    /// signalling: an interrupt in flight at the snapshot is in the
    /// restored interrupt controller's state.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }
}

/// Raises a used-buffer interrupt for `queue` unless the driver suppressed
/// it (an unreadable ring counts as "notify").
pub fn signal_used<M: GuestMemory>(queue: &mut Queue, mem: &M, interrupt: Option<&Interrupt>) {
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Some(i) = interrupt {
            i.raise(Interrupt::VRING);
        }
    }
}

/// Copies `data.len()` bytes of a device's configuration space from
/// `offset`; bytes past its end (or an offset that overflows) read zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device behind the MMIO transport. Everything the driver sends is
/// untrusted: devices validate it and never panic on it.
///
/// `M` is the guest memory the device reaches once activated: any
/// `vm-memory` address space; this VMM's is `guest_mem::DeviceMemory`,
/// whose snapshots hold off shrinks while a device uses them.
pub trait VirtioDevice<M: GuestAddressSpace = DeviceMemory>: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue the device may use.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start using `queues`.
    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Processes queue `index` after the driver notified it, within a
    /// bounded budget; [`Progress::MoreWork`] asks to be called again
    /// (after the event loop has served everything else).
    fn process_queue(&mut self, index: usize) -> Progress;
    /// The driver reset the device: drop the queues.
    fn reset(&mut self);
    /// The state of the queues the device runs with, by queue index (it
    /// holds the live copies, with their ring positions, since
    /// activation); empty when not activated.
    fn queue_states(&self) -> Vec<QueueState>;
    /// The host wants fresh device-reported data (balloon statistics).
    fn refresh(&mut self) {}

    /// The device's own state, for a snapshot taken while the VM is paused
    /// (no chain half-processed): what the transport's state does not hold
    /// (see [`crate::state`]). `Null` for a device that keeps none.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restores what [`save_state`](VirtioDevice::save_state) gave, into a
    /// device built with the same configuration. The transport calls it
    /// after replaying the negotiated features and before activating the
    /// device with its restored queues. The state is untrusted: anything
    /// that does not fit the device is refused.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        if state.is_null() {
            Ok(())
        } else {
            Err(StateError::invalid(
                "virtio device",
                "a saved state for a device that keeps none",
            ))
        }
    }
}
