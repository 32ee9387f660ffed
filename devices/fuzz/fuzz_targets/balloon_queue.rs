//! Fuzzes the balloon's queue handling: the input sets the negotiated
//! features and the four queues' sizes and ring addresses, fills guest RAM
//! with descriptor tables, rings and PFN arrays, and notifies queues in the
//! order it chooses. The properties: no panic, and every range the balloon
//! asks the backend to discard is page-aligned guest RAM.
#![no_main]

use std::sync::Arc;

use devices::memory::{BackendError, MemoryBackend};
use devices::virtio::balloon::{
    Balloon, BalloonConfig, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
use devices::virtio::{Interrupt, VirtioDevice};
use guest_mem::{GuestMem, RegionConfig};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const HEADER: usize = 1 + 4 * 8 + 1;

/// Forwards to guest-mem, checking what the device asks for.
struct Checked(Arc<GuestMem>);

impl MemoryBackend for Checked {
    fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64> {
        self.0.discard_granularity(gpa)
    }
    fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool {
        self.0.is_ram(gpa, len)
    }
    fn discard(&self, gpa: GuestAddress, len: u64) -> Result<(), BackendError> {
        assert!(len > 0 && gpa.0 % 4096 == 0 && len % 4096 == 0);
        assert!(
            self.0.is_ram(gpa, len),
            "discard outside RAM: {gpa:?}+{len:#x}"
        );
        Ok(self.0.discard(gpa, len)?)
    }
    fn populated(&self, gpa: GuestAddress, len: u64) -> Option<bool> {
        self.0.populated(gpa, len)
    }
}

fn u16_at(data: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([data[at], data[at + 1]])
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    // RAM at [0, 1 MiB) and [2 MiB, 3 MiB): a hole between, like the MMIO gap.
    let mem = Arc::new(
        GuestMem::builder()
            .region(RegionConfig::new(0, MIB))
            .region(RegionConfig::new(2 * MIB, MIB))
            .build()
            .expect("guest memory"),
    );
    let flags = data[0];
    let config = BalloonConfig {
        deflate_on_oom: flags & 4 != 0,
        free_page_reporting: flags & 16 == 0,
    };
    let mut balloon = Balloon::new(Arc::new(Checked(mem.clone())), config);
    let mut features = 0u64;
    if flags & 1 != 0 {
        features |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
    }
    if flags & 2 != 0 {
        features |= 1 << VIRTIO_BALLOON_F_REPORTING;
    }
    balloon.ack_features(features);

    let queues = (0..4)
        .map(|i| {
            let q = &data[1 + i * 8..1 + (i + 1) * 8];
            let mut queue = Queue::new(256).expect("queue");
            queue.set_size(u16_at(q, 0));
            queue.set_desc_table_address(Some(u32::from(u16_at(q, 2)) * 16), Some(0));
            queue.set_avail_ring_address(Some(u32::from(u16_at(q, 4)) * 2), Some(0));
            queue.set_used_ring_address(Some(u32::from(u16_at(q, 6)) * 4), Some(0));
            queue.set_event_idx(flags & 8 != 0);
            queue.set_ready(true);
            queue
        })
        .collect();

    let notifies = usize::from(data[HEADER - 1] % 16);
    let Some(order) = data.get(HEADER..HEADER + notifies) else {
        return;
    };
    let image = &data[HEADER + notifies..];
    mem.memory()
        .memory()
        .write_slice(&image[..image.len().min(MIB as usize)], GuestAddress(0))
        .expect("image fits in the first region");

    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    if balloon.activate(mem.device_memory(), irq, queues).is_err() {
        return;
    }
    for &q in order {
        match q % 5 {
            4 => balloon.refresh(),
            i => {
                balloon.process_queue(usize::from(i));
            }
        }
    }
    let c = &balloon.state().counters;
    assert_eq!(
        c.stray_ranges.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no fault handler runs here, so nothing can refill a hole"
    );
});
