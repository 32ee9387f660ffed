//! The virtio-mmio transport's saved state: its registers, each queue's
//! set-up and ring positions, whether the device runs, and the device's own
//! state inside.
//!
//! A transport restored with the driver past DRIVER_OK comes back running:
//! its queues are rebuilt with their indices and the device is activated
//! with memory and interrupt, so the guest carries on without negotiating
//! again. What the VMM must redo around [`MmioTransport::restore`]: register
//! the irqfd of the interrupt and one ioeventfd per queue at
//! [`QUEUE_NOTIFY_OFFSET`](super::QUEUE_NOTIFY_OFFSET) (datamatch = queue
//! index), hand the transport their clones with
//! [`set_notify_events`](MmioTransport::set_notify_events), restore the
//! interrupt controller (which holds an interrupt in flight), and once the
//! vCPUs run again call [`kick_queues`](MmioTransport::kick_queues) for the
//! chains the driver published after the last notification was served.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddressSpace;

use super::{status, Interrupt, MmioTransport, STATUS_ORDER, VIRTIO_F_VERSION_1};
use crate::state::{check_version, StateError};
use crate::virtio::VirtioDevice;

/// The version of [`MmioTransportState`] this build writes and reads.
pub const MMIO_STATE_VERSION: u32 = 1;
const DEV: &str = "virtio-mmio";

/// One queue as the driver set it up, and where the device is in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// The device's maximum size.
    pub max_size: u16,
    /// The size the driver chose (a power of two, at most `max_size`).
    pub size: u16,
    /// QUEUE_READY.
    pub ready: bool,
    /// Descriptor table address (16-byte aligned).
    pub desc_table: u64,
    /// Available ring address (2-byte aligned).
    pub avail_ring: u64,
    /// Used ring address (4-byte aligned).
    pub used_ring: u64,
    /// The next available ring entry the device takes.
    pub next_avail: u16,
    /// The next used ring entry the device fills.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` in use.
    pub event_idx: bool,
    /// The driver wrote a size the device cannot use (activation fails).
    pub size_refused: bool,
}

/// The saved state of an [`MmioTransport`] and its device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// [`MMIO_STATE_VERSION`].
    pub version: u32,
    /// The virtio device ID behind the transport.
    pub device_type: u32,
    /// DEVICE_FEATURES_SEL.
    pub device_features_sel: u32,
    /// DRIVER_FEATURES_SEL.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// QUEUE_SEL.
    pub queue_sel: u32,
    /// Every queue the device has.
    pub queues: Vec<VirtqueueState>,
    /// The device status register.
    pub status: u32,
    /// CONFIG_GENERATION.
    pub config_generation: u32,
    /// INTERRUPT_STATUS.
    pub interrupt_status: u32,
    /// Whether the device runs (DRIVER_OK took).
    pub activated: bool,
    /// Queues notified before DRIVER_OK, one bit each.
    pub early_notifies: u64,
    /// The device's own state ([`VirtioDevice::save_state`]).
    pub device: serde_json::Value,
}

fn invalid(what: impl Into<String>) -> StateError {
    StateError::invalid(DEV, what)
}

impl<M: GuestAddressSpace> MmioTransport<M> {
    /// The transport's and its device's state, for a snapshot taken while
    /// the VM is paused.
    pub fn save(&self) -> MmioTransportState {
        // A running device holds the live queues; the transport only the
        // set-up it activated them from.
        let live = if self.activated {
            self.device.queue_states()
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .zip(&self.bad_size)
            .enumerate()
            .map(|(i, (q, &refused))| {
                let s = live.get(i).copied().unwrap_or_else(|| q.state());
                VirtqueueState {
                    max_size: s.max_size,
                    size: s.size,
                    ready: s.ready,
                    desc_table: s.desc_table,
                    avail_ring: s.avail_ring,
                    used_ring: s.used_ring,
                    next_avail: s.next_avail,
                    next_used: s.next_used,
                    event_idx: s.event_idx_enabled,
                    size_refused: refused,
                }
            })
            .collect();
        MmioTransportState {
            version: MMIO_STATE_VERSION,
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            early_notifies: self.early_notifies,
            device: self.device.save_state(),
        }
    }

    /// `device` (built with the configuration it had) behind a transport
    /// as `state` left it. A device that ran comes back running: its
    /// features replayed, its own state restored, then activated with its
    /// queues where they were. Everything in `state` is checked first.
    pub fn restore(
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        interrupt: Arc<Interrupt>,
        state: &MmioTransportState,
    ) -> Result<Self, StateError> {
        check_version(DEV, state.version, MMIO_STATE_VERSION)?;
        if state.device_type != device.device_type() {
            return Err(invalid(format!(
                "state of device type {}, restored into device type {}",
                state.device_type,
                device.device_type()
            )));
        }
        let mut t = MmioTransport::new(device, mem, interrupt);
        t.check(state)?;
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, q) in state.queues.iter().enumerate() {
            let queue = Queue::try_from(QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            })
            .map_err(|e| invalid(format!("queue {i}: {e}")))?;
            queues.push(queue);
        }
        t.queues = queues;
        t.bad_size = state.queues.iter().map(|q| q.size_refused).collect();
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.config_generation = state.config_generation;
        t.early_notifies = state.early_notifies;
        if state.status & status::FEATURES_OK != 0 {
            t.device.ack_features(state.driver_features);
        }
        t.device.restore_state(&state.device)?;
        if state.activated {
            // Checked against memory as the device's restore left it
            // (virtio-mem takes unplugged blocks out of reach).
            let guard = t.mem.memory();
            let outside = t
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&*guard));
            drop(guard);
            if let Some(i) = outside {
                return Err(invalid(format!("queue {i} does not lie in guest memory")));
            }
            let copies = t
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(e.to_string()))?;
            t.device
                .activate(t.mem.clone(), t.interrupt.clone(), copies)
                .map_err(|e| invalid(format!("activating the device: {e}")))?;
            t.activated = true;
        }
        t.interrupt.restore_status(state.interrupt_status);
        Ok(t)
    }

    /// Checks what does not depend on rebuilding the queues.
    fn check(&self, state: &MmioTransportState) -> Result<(), StateError> {
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(invalid(format!(
                "{} queues, the device has {}",
                state.queues.len(),
                max_sizes.len()
            )));
        }
        for (i, (q, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                return Err(invalid(format!(
                    "queue {i} of at most {} entries, the device's takes {max}",
                    q.max_size
                )));
            }
            if state.activated && q.ready && q.size_refused {
                return Err(invalid(format!("queue {i} runs at a size it refused")));
            }
        }
        let s = state.status;
        let defined = STATUS_ORDER
            .iter()
            .fold(status::DEVICE_NEEDS_RESET | status::FAILED, |all, bit| {
                all | bit
            });
        if s & !defined != 0 {
            return Err(invalid(format!("status {s:#x} has undefined bits")));
        }
        if let Some(w) = STATUS_ORDER
            .windows(2)
            .find(|w| s & w[1] != 0 && s & w[0] == 0)
        {
            return Err(invalid(format!(
                "status {s:#x} has {:#x} without {:#x}",
                w[1], w[0]
            )));
        }
        // Before FEATURES_OK the driver's features are only a register,
        // checked when the driver sets it; after, they are what the device
        // acked and must be what it offers.
        let offered = self.all_features();
        if s & status::FEATURES_OK != 0
            && (state.driver_features & !offered != 0
                || state.driver_features & (1 << VIRTIO_F_VERSION_1) == 0)
        {
            return Err(invalid(format!(
                "driver features {:#x}, the device offers {offered:#x}",
                state.driver_features
            )));
        }
        let runs = s & status::DRIVER_OK != 0 && s & status::DEVICE_NEEDS_RESET == 0;
        if state.activated != runs {
            return Err(invalid(format!(
                "activated {} in status {s:#x}",
                state.activated
            )));
        }
        if state.interrupt_status & !(Interrupt::VRING | Interrupt::CONFIG) != 0 {
            return Err(invalid(format!(
                "interrupt status {:#x}",
                state.interrupt_status
            )));
        }
        let queues = state.queues.len().min(64);
        if state.early_notifies.checked_shr(queues as u32).unwrap_or(0) != 0
            || (state.activated && state.early_notifies != 0)
        {
            return Err(invalid(format!(
                "early notifications {:#x}",
                state.early_notifies
            )));
        }
        Ok(())
    }

    /// Serves every ready queue of a running device once, as if notified:
    /// for the chains a restored driver published that no notification
    /// will announce again. Harmless on an empty queue.
    pub fn kick_queues(&mut self) {
        if !self.activated {
            return;
        }
        for i in 0..self.queues.len() {
            if self.queues[i].ready() {
                self.process(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One way to spoil a good state.
    type Change = Box<dyn Fn(&mut MmioTransportState)>;
    use crate::bus::BusDevice;
    use crate::virtio::balloon::{Balloon, BalloonConfig, BALLOON_PAGE};
    use crate::virtio::mmio::reg;
    use guest_mem::{GuestMem, RegionConfig};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const MIB: u64 = 1 << 20;
    /// Queue `i`'s rings: table at `RINGS + i * 0x10000`, then avail and
    /// used rings 4 KiB apart.
    const RINGS: u64 = MIB;

    fn memory() -> Arc<GuestMem> {
        Arc::new(
            GuestMem::builder()
                .region(RegionConfig::new(0, 16 * MIB))
                .build()
                .unwrap(),
        )
    }

    fn irq() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn table(q: u64) -> u64 {
        RINGS + q * 0x10000
    }

    /// A balloon driven to DRIVER_OK with every queue it offers set up.
    fn running_balloon(mem: &Arc<GuestMem>) -> MmioTransport {
        let balloon = Balloon::new(mem.clone(), BalloonConfig::default());
        let features = balloon.features() | 1 << VIRTIO_F_VERSION_1;
        let mut t = MmioTransport::new(Box::new(balloon), mem.device_memory(), irq());
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for half in 0..2 {
            w(&mut t, reg::DRIVER_FEATURES_SEL, half);
            w(
                &mut t,
                reg::DRIVER_FEATURES,
                (features >> (32 * half)) as u32,
            );
        }
        w(&mut t, reg::STATUS, 0b1011);
        for q in 0..4 {
            w(&mut t, reg::QUEUE_SEL, q as u32);
            w(&mut t, reg::QUEUE_NUM, 16);
            w(&mut t, reg::QUEUE_DESC_LOW, table(q) as u32);
            w(&mut t, reg::QUEUE_DRIVER_LOW, (table(q) + 0x1000) as u32);
            w(&mut t, reg::QUEUE_DEVICE_LOW, (table(q) + 0x2000) as u32);
            w(&mut t, reg::QUEUE_READY, 1);
        }
        w(&mut t, reg::STATUS, 0b1111);
        assert!(t.is_activated());
        t
    }

    /// The driver's side: publishes an inflate of `pfns` as chain `n` of
    /// queue 0 (one descriptor, its PFN list at 8 MiB + n pages).
    fn publish_inflate(mem: &GuestMem, n: u16, pfns: &[u32]) {
        let ram = mem.memory().memory();
        let list = 8 * MIB + u64::from(n) * 4096;
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        ram.write_slice(&bytes, GuestAddress(list)).unwrap();
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&list.to_le_bytes());
        d[8..12].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        ram.write_slice(&d, GuestAddress(table(0) + 16 * u64::from(n)))
            .unwrap();
        let avail = table(0) + 0x1000;
        ram.write_obj(n, GuestAddress(avail + 4 + 2 * u64::from(n)))
            .unwrap();
        ram.write_obj(n + 1, GuestAddress(avail + 2)).unwrap();
    }

    fn used_idx(mem: &GuestMem, q: u64) -> u16 {
        mem.memory()
            .memory()
            .read_obj(GuestAddress(table(q) + 0x2000 + 2))
            .unwrap()
    }

    fn page_backed(mem: &GuestMem, pfn: u32) -> bool {
        mem.populated(GuestAddress(u64::from(pfn) * BALLOON_PAGE), BALLOON_PAGE) == Some(true)
    }

    fn through_json(s: &MmioTransportState) -> MmioTransportState {
        serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
    }

    fn restore(mem: &Arc<GuestMem>, s: &MmioTransportState) -> Result<MmioTransport, StateError> {
        let balloon = Balloon::new(mem.clone(), BalloonConfig::default());
        MmioTransport::restore(Box::new(balloon), mem.device_memory(), irq(), s)
    }

    /// A balloon snapshotted with an inflate published but not yet served
    /// comes back running, without a new handshake, and serves it where
    /// the first left off.
    #[test]
    fn a_balloon_restored_mid_inflate_carries_on_serving_its_queue() {
        let mem = memory();
        let ram = mem.memory().memory();
        for p in 0..16u64 {
            ram.write_obj(1u8, GuestAddress(12 * MIB + p * 4096))
                .unwrap();
        }
        let base = (12 * MIB / BALLOON_PAGE) as u32;
        let mut t = running_balloon(&mem);
        w(&mut t, reg::CONFIG + 4, 1); // the guest's `actual`
        publish_inflate(&mem, 0, &[base, base + 1]);
        t.queue_notified(0);
        assert_eq!(used_idx(&mem, 0), 1);
        publish_inflate(&mem, 1, &[base + 2, base + 3]);
        let saved = through_json(&t.save());
        drop(t);

        let mut t = restore(&mem, &saved).unwrap();
        assert!(t.is_activated(), "no new handshake");
        assert_eq!(r(&mut t, reg::STATUS), 0b1111);
        assert_eq!(r(&mut t, reg::CONFIG + 4), 1, "actual");
        assert!(page_backed(&mem, base + 2));
        t.kick_queues();
        assert_eq!(used_idx(&mem, 0), 2, "the second chain, once");
        assert!(!page_backed(&mem, base + 2) && !page_backed(&mem, base + 3));
        assert!(page_backed(&mem, base + 4));
        publish_inflate(&mem, 2, &[base + 4]);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(used_idx(&mem, 0), 3);
        let saved = t.save();
        let counters = &saved.device["counters"];
        assert_eq!(counters["inflated_pages"], 5, "the counters carried on");
        assert_eq!(saved.queues[0].next_avail, 3);
    }

    #[test]
    fn a_transport_before_driver_ok_comes_back_mid_handshake() {
        let mem = memory();
        let balloon = Balloon::new(mem.clone(), BalloonConfig::default());
        let mut t = MmioTransport::new(Box::new(balloon), mem.device_memory(), irq());
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        let saved = through_json(&t.save());
        let mut t = restore(&mem, &saved).unwrap();
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE);
        t.kick_queues(); // nothing runs
    }

    /// Every way a transport state can lie is refused, with the reason.
    #[test]
    fn bad_transport_states_are_refused() {
        let mem = memory();
        let good = running_balloon(&mem).save();
        let cases: Vec<(&str, Change)> = vec![
            ("version", Box::new(|s| s.version = 99)),
            ("device type", Box::new(|s| s.device_type = 24)),
            ("queue count", Box::new(|s| s.queues.truncate(3))),
            ("size not a power of 2", Box::new(|s| s.queues[0].size = 12)),
            ("size past the max", Box::new(|s| s.queues[1].size = 512)),
            ("size zero", Box::new(|s| s.queues[1].size = 0)),
            ("max size", Box::new(|s| s.queues[1].max_size = 128)),
            ("unaligned table", Box::new(|s| s.queues[0].desc_table += 8)),
            ("unaligned used", Box::new(|s| s.queues[0].used_ring += 2)),
            (
                "ring outside RAM",
                Box::new(|s| s.queues[2].avail_ring = 1 << 40),
            ),
            (
                "refused size",
                Box::new(|s| s.queues[0].size_refused = true),
            ),
            (
                "features not offered",
                Box::new(|s| s.driver_features |= 1 << 9),
            ),
            (
                "no VERSION_1",
                Box::new(|s| s.driver_features &= !(1 << 32)),
            ),
            ("undefined status", Box::new(|s| s.status |= 0x10)),
            ("status out of order", Box::new(|s| s.status = 0b1101)),
            ("not activated", Box::new(|s| s.activated = false)),
            ("interrupt status", Box::new(|s| s.interrupt_status = 4)),
            ("early notify", Box::new(|s| s.early_notifies = 1)),
            (
                "device state",
                Box::new(|s| s.device = serde_json::json!({"x": 1})),
            ),
        ];
        for (what, change) in cases {
            let mut s = good.clone();
            change(&mut s);
            let e = restore(&mem, &s).err();
            assert!(e.is_some(), "{what}: accepted");
            eprintln!("{what}: {}", e.unwrap());
        }
        let mut s = good.clone();
        s.activated = false;
        s.status = 0b0111;
        s.early_notifies = 1 << 4;
        assert!(restore(&mem, &s).is_err(), "a notify of a queue it lacks");
        assert!(restore(&mem, &good).is_ok());
    }
}
