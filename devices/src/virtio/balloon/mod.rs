//! virtio-balloon: inflate and deflate queues, guest statistics, free page
//! reporting, page poisoning and deflate-on-OOM.
//!
//! Inflated PFNs are validated (inside plugged RAM, not in the MMIO gap),
//! de-duplicated, coalesced into ranges and given back through
//! [`MemoryBackend::discard`] — for `guest-mem`, one truncate-generation
//! invalidation and a punched hole per range. Where the host gives memory
//! back in larger units (hugetlbfs), a unit is freed once every balloon page
//! in it is in the balloon ([`huge_pages`]). Deflated pages need nothing:
//! the next touch faults and reads zero.
//!
//! Everything the driver hands over is hostile. Each chain is read, carried
//! out and returned before the next is taken, a notification buys a bounded
//! amount of work ([`chain::Budget`](super::chain::Budget)), and bad PFNs
//! and malformed chains are refused, counted and logged at a limited rate,
//! never a panic.

pub mod huge_pages;
mod saved;

pub use saved::{BalloonCountersState, BalloonDeviceState, BALLOON_STATE_VERSION};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use guest_mem::DeviceMemory;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use super::chain::{serve_queue, Progress, Served};
use super::resize_timer::ResizeTimer;
use super::{signal_used, ActivateError, Interrupt, VirtioDevice};
use crate::guest_log::refuse;
use crate::memory::MemoryBackend;
use crate::state::StateError;
use huge_pages::HugePageTracker;

/// The virtio device ID of the balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// The guest reports memory statistics on a third queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The guest deflates when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// The guest tells the value it fills free pages with (`poison_val`).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// The guest reports free pages it does not use.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Balloon pages are 4 KiB whatever the guest's page size.
pub const BALLOON_PAGE: u64 = 4096;
const QUEUE_SIZE: u16 = 256;
/// Most PFNs taken from one descriptor chain (the Linux driver sends 256).
const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Most descriptors in a PFN or statistics chain (Linux sends one).
const MAX_DESCS_PER_PFN_CHAIN: usize = 16;
const STAT_SIZE: usize = 10;

/// Guest statistics tags (virtio 1.x 5.5.6.3), by name.
pub const STAT_NAMES: [&str; 11] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
];

/// Counters of what the balloon did and refused.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// PFNs given back by inflates (after de-duplication).
    pub inflated_pages: AtomicU64,
    /// PFNs taken back by deflates.
    pub deflated_pages: AtomicU64,
    /// Bytes the guest reported free (free page reporting).
    pub reported_bytes: AtomicU64,
    /// Bytes actually given back to the host, by inflates and reports: less
    /// than what the guest gave up where the host frees whole huge pages
    /// only, or when the guest poisons free pages.
    pub freed_bytes: AtomicU64,
    /// Discard calls (coalesced ranges).
    pub discards: AtomicU64,
    /// PFNs refused (outside RAM, in the MMIO gap).
    pub rejected_pfns: AtomicU64,
    /// Descriptor chains refused (bad direction, size, address, length,
    /// indirect, a broken ring).
    pub rejected_chains: AtomicU64,
    /// Reported ranges kept because the guest poisons free pages with a
    /// value other than zero.
    pub reports_kept_for_poison: AtomicU64,
    /// Discards the memory backend failed.
    pub discard_errors: AtomicU64,
    /// Notifications on queues the device does not use.
    pub unused_queue_notifies: AtomicU64,
    /// Notifications whose work was cut at the budget and continued later.
    pub yields: AtomicU64,
    /// Inflate notifications serviced.
    pub inflate_batches: AtomicU64,
    /// Time spent servicing them, in microseconds (validation, discards,
    /// returning the buffers).
    pub inflate_us: AtomicU64,
    /// Discarded ranges the backend found populated again right after the
    /// discard (a fault installed behind it): must stay zero.
    pub stray_ranges: AtomicU64,
}

/// State the VMM shares with the device: the target, what the guest says
/// it holds, its statistics and the counters.
#[derive(Debug, Default)]
pub struct BalloonState {
    /// Pages the host asks the guest to hold (config `num_pages`).
    pub target_pages: AtomicU32,
    /// Pages the guest says it holds (config `actual`).
    pub actual_pages: AtomicU32,
    /// The value the guest fills free pages with (config `poison_val`,
    /// with `VIRTIO_BALLOON_F_PAGE_POISON`).
    pub poison_val: AtomicU32,
    /// The guest's last statistics, by tag.
    pub guest_stats: Mutex<BTreeMap<u16, u64>>,
    /// Counters.
    pub counters: BalloonCounters,
    /// How the guest followed the last target change.
    pub resize: ResizeTimer,
}

impl BalloonState {
    /// Sets the target and starts timing the guest's response.
    pub fn set_target(&self, pages: u32) {
        self.target_pages.store(pages, Ordering::Relaxed);
        self.resize.start();
    }

    /// Records the guest's `actual`.
    pub fn set_actual(&self, pages: u32) {
        let previous = self.actual_pages.swap(pages, Ordering::Relaxed);
        let reached = pages == self.target_pages.load(Ordering::Relaxed);
        self.resize.observe(pages != previous, reached);
    }
}

/// Which optional features the device offers.
#[derive(Debug, Clone, Copy)]
pub struct BalloonConfig {
    /// Let the guest take pages back when it runs out of memory
    /// (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`).
    pub deflate_on_oom: bool,
    /// Let the guest report free pages for the host to discard
    /// (`VIRTIO_BALLOON_F_REPORTING`). Offered with
    /// `VIRTIO_BALLOON_F_PAGE_POISON`, so that guests that fill free pages
    /// (`init_on_free=1`, page poisoning) keep reporting: a discarded page
    /// reads zero, which is what `init_on_free` wants; reports from a guest
    /// that poisons with another value are returned without a discard.
    pub free_page_reporting: bool,
}

impl Default for BalloonConfig {
    /// Free page reporting on, deflate-on-OOM off.
    fn default() -> Self {
        BalloonConfig {
            deflate_on_oom: false,
            free_page_reporting: true,
        }
    }
}

/// The balloon device, reaching guest memory through `M`.
pub struct Balloon<M = DeviceMemory> {
    backend: Arc<dyn MemoryBackend>,
    state: Arc<BalloonState>,
    offered: u64,
    acked: u64,
    mem: Option<M>,
    interrupt: Option<Arc<Interrupt>>,
    queues: Vec<Queue>,
    /// Queue index of each role, after feature negotiation.
    stats_queue: Option<usize>,
    reporting_queue: Option<usize>,
    /// The stats buffer the guest filled, held until we want fresh numbers.
    stats_head: Option<u16>,
    /// Balloon pages of units larger than a balloon page (huge pages).
    huge: HugePageTracker,
}

impl<M: GuestAddressSpace> Balloon<M> {
    /// A balloon giving memory back through `backend`. The statistics
    /// queue is always offered; `config` says what else is.
    pub fn new(backend: Arc<dyn MemoryBackend>, config: BalloonConfig) -> Self {
        let mut offered = 1 << VIRTIO_BALLOON_F_STATS_VQ;
        if config.free_page_reporting {
            offered |= (1 << VIRTIO_BALLOON_F_REPORTING) | (1 << VIRTIO_BALLOON_F_PAGE_POISON);
        }
        if config.deflate_on_oom {
            offered |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        Balloon {
            backend,
            state: Arc::new(BalloonState::default()),
            offered,
            acked: 0,
            mem: None,
            interrupt: None,
            queues: Vec::new(),
            stats_queue: None,
            reporting_queue: None,
            stats_head: None,
            huge: HugePageTracker::default(),
        }
    }

    /// The state shared with the VMM.
    pub fn state(&self) -> Arc<BalloonState> {
        self.state.clone()
    }

    /// Hands the held statistics buffer back so the guest refills it.
    pub fn request_stats(&mut self) {
        let (Some(q), Some(head)) = (self.stats_queue, self.stats_head.take()) else {
            return;
        };
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        if let Err(e) = self.queues[q].add_used(&*mem, head, 0) {
            crate::guest_warn!("balloon: returning the stats buffer: {e}");
        }
        signal_used(&mut self.queues[q], &*mem, self.interrupt.as_deref());
    }

    fn has(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    fn reject_chain(&self, why: std::fmt::Arguments<'_>) {
        refuse(
            &self.state.counters.rejected_chains,
            format_args!("balloon: refusing a descriptor chain: {why}"),
        );
    }

    /// Serves queue `q` with `handle`, within one notification's budget
    /// (see [`serve_queue`]). The queue is taken out of the device while
    /// it is served, so the handler may use the rest of the device.
    fn serve(
        &mut self,
        q: usize,
        max_descs: usize,
        handle: impl FnMut(&mut Self, &mut Queue, u16, &[Descriptor]) -> Served,
    ) -> Progress {
        let (Some(mem), Some(slot)) = (self.mem.clone(), self.queues.get_mut(q)) else {
            return Progress::Done;
        };
        let mut queue = std::mem::take(slot);
        let interrupt = self.interrupt.clone();
        let progress = serve_queue(
            self,
            &mem,
            &mut queue,
            interrupt.as_deref(),
            max_descs,
            |b, why| b.reject_chain(format_args!("queue {q}: {why}")),
            handle,
        );
        self.queues[q] = queue;
        if progress == Progress::MoreWork {
            self.state.counters.yields.fetch_add(1, Ordering::Relaxed);
        }
        progress
    }

    /// The PFNs of one chain: device-readable buffers of whole PFNs, at most
    /// [`MAX_PFNS_PER_CHAIN`]. `None` (refused) for anything else.
    fn read_pfns(&self, mem: &impl GuestMemory, descs: &[Descriptor]) -> Option<Vec<u32>> {
        let mut pfns = Vec::new();
        for desc in descs {
            if desc.is_write_only() || desc.len() % 4 != 0 {
                self.reject_chain(format_args!(
                    "PFN buffer of {} bytes, write-only {}",
                    desc.len(),
                    desc.is_write_only()
                ));
                return None;
            }
            let n = (desc.len() / 4) as usize;
            if pfns.len() + n > MAX_PFNS_PER_CHAIN {
                self.reject_chain(format_args!("more than {MAX_PFNS_PER_CHAIN} PFNs"));
                return None;
            }
            let mut buf = vec![0u8; n * 4];
            if let Err(e) = mem.read_slice(&mut buf, desc.addr()) {
                self.reject_chain(format_args!("PFNs at {:#x}: {e}", desc.addr().0));
                return None;
            }
            pfns.extend(
                buf.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        Some(pfns)
    }

    /// Validates PFNs: in plugged RAM (so never in the MMIO gap), and
    /// de-duplicated. Returns them sorted, each with its discard unit.
    fn valid_pfns(&self, mut pfns: Vec<u32>) -> Vec<(u64, u64)> {
        pfns.sort_unstable();
        pfns.dedup();
        let mut ok = Vec::with_capacity(pfns.len());
        let mut rejected = 0;
        for pfn in pfns {
            let gpa = GuestAddress(u64::from(pfn) * BALLOON_PAGE);
            match self.backend.discard_granularity(gpa) {
                Some(grain) if self.backend.is_ram(gpa, BALLOON_PAGE) => {
                    ok.push((u64::from(pfn), grain))
                }
                _ => rejected += 1,
            }
        }
        if rejected > 0 {
            self.state
                .counters
                .rejected_pfns
                .fetch_add(rejected, Ordering::Relaxed);
            crate::guest_warn!("balloon: refused {rejected} PFNs outside guest RAM");
        }
        ok
    }

    /// Discards the whole units of the backend's granularity inside
    /// `[gpa, gpa + len)`; returns the bytes given back.
    fn discard(&self, gpa: u64, len: u64) -> u64 {
        let Some(grain) = self.backend.discard_granularity(GuestAddress(gpa)) else {
            return 0;
        };
        let start = gpa.div_ceil(grain) * grain;
        let end = gpa.saturating_add(len) / grain * grain;
        if end <= start {
            return 0;
        }
        match self.backend.discard(GuestAddress(start), end - start) {
            Ok(()) => {
                let c = &self.state.counters;
                c.discards.fetch_add(1, Ordering::Relaxed);
                c.freed_bytes.fetch_add(end - start, Ordering::Relaxed);
                if self.backend.populated(GuestAddress(start), end - start) == Some(true) {
                    c.stray_ranges.fetch_add(1, Ordering::Relaxed);
                    log::error!(
                        "balloon: {start:#x}+{:#x} populated right after its discard",
                        end - start
                    );
                }
                end - start
            }
            Err(e) => {
                self.state
                    .counters
                    .discard_errors
                    .fetch_add(1, Ordering::Relaxed);
                log::error!("balloon: discarding {start:#x}+{:#x}: {e}", end - start);
                0
            }
        }
    }

    /// The valid PFNs of an inflate or deflate chain, each with its
    /// discard unit; `None` for a chain refused whole.
    fn chain_pfns(&self, descs: &[Descriptor]) -> Option<Vec<(u64, u64)>> {
        let pfns = self.read_pfns(&*self.mem.as_ref()?.memory(), descs)?;
        Some(self.valid_pfns(pfns))
    }

    fn inflate_chain(&mut self, descs: &[Descriptor]) -> Served {
        let Some(pfns) = self.chain_pfns(descs) else {
            return Served::Used(0);
        };
        self.state
            .counters
            .inflated_pages
            .fetch_add(pfns.len() as u64, Ordering::Relaxed);
        // Balloon-page units go back as they come; larger units once every
        // balloon page in them is in.
        let mut small = Vec::with_capacity(pfns.len());
        let mut whole_units = Vec::new();
        for (pfn, grain) in pfns {
            if grain <= BALLOON_PAGE {
                small.push(pfn);
            } else if let Some(unit) = self.huge.inflate(pfn, grain) {
                whole_units.push((unit, grain));
            }
        }
        for (first, count) in coalesce(&small) {
            self.discard(first * BALLOON_PAGE, count * BALLOON_PAGE);
        }
        for (unit, grain) in whole_units {
            self.discard(unit, grain);
        }
        Served::Used(0)
    }

    fn deflate_chain(&mut self, descs: &[Descriptor]) -> Served {
        let Some(pfns) = self.chain_pfns(descs) else {
            return Served::Used(0);
        };
        self.state
            .counters
            .deflated_pages
            .fetch_add(pfns.len() as u64, Ordering::Relaxed);
        for (pfn, grain) in pfns {
            if grain > BALLOON_PAGE {
                self.huge.deflate(pfn, grain);
            }
        }
        Served::Used(0)
    }

    fn stats_chain(&mut self, queue: &mut Queue, head: u16, descs: &[Descriptor]) -> Served {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return Served::Used(0);
        };
        let mem = &*mem;
        let mut values = BTreeMap::new();
        for desc in descs {
            if desc.is_write_only() {
                self.reject_chain(format_args!("write-only stats buffer"));
                return Served::Used(0);
            }
            let len = (desc.len() as usize).min(STAT_SIZE * 64);
            let mut buf = vec![0u8; len - len % STAT_SIZE];
            if mem.read_slice(&mut buf, desc.addr()).is_err() {
                self.reject_chain(format_args!("stats at {:#x}", desc.addr().0));
                return Served::Used(0);
            }
            for s in buf.chunks_exact(STAT_SIZE) {
                let tag = u16::from_le_bytes([s[0], s[1]]);
                let mut val = [0u8; 8];
                val.copy_from_slice(&s[2..10]);
                values.insert(tag, u64::from_le_bytes(val));
            }
        }
        if !values.is_empty() {
            *self
                .state
                .guest_stats
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = values;
        }
        // Hold the buffer: returning it asks for new numbers. A driver that
        // queues several gets the older ones back.
        if let Some(old) = self.stats_head.replace(head) {
            match queue.add_used(mem, old, 0) {
                Ok(()) => signal_used(queue, mem, self.interrupt.as_deref()),
                Err(e) => self.reject_chain(format_args!("returning stats buffer {old}: {e}")),
            }
        }
        Served::Held
    }

    fn report_chain(&mut self, descs: &[Descriptor]) -> Served {
        let poisoned = self.has(VIRTIO_BALLOON_F_PAGE_POISON)
            && self.state.poison_val.load(Ordering::Relaxed) != 0;
        for desc in descs {
            let (gpa, len) = (desc.addr().0, u64::from(desc.len()));
            if len == 0 || !self.backend.is_ram(GuestAddress(gpa), len) {
                self.state
                    .counters
                    .rejected_pfns
                    .fetch_add(len.div_ceil(BALLOON_PAGE).max(1), Ordering::Relaxed);
                continue;
            }
            self.state
                .counters
                .reported_bytes
                .fetch_add(len, Ordering::Relaxed);
            if poisoned {
                // A discarded page would read zero, not the guest's poison.
                self.state
                    .counters
                    .reports_kept_for_poison
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.discard(gpa, len);
        }
        Served::Used(0)
    }
}
/// Sorted, distinct PFNs as (first, count) runs.
pub fn coalesce(pfns: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in pfns {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == p => *count += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

impl<M: GuestAddressSpace + Send> VirtioDevice<M> for Balloon<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
        let mut next = 2;
        self.stats_queue = self.has(VIRTIO_BALLOON_F_STATS_VQ).then(|| {
            next += 1;
            next - 1
        });
        self.reporting_queue = self.has(VIRTIO_BALLOON_F_REPORTING).then_some(next);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages, actual, free_page_hint_cmd_id (not offered), poison_val.
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(
            &self
                .state
                .target_pages
                .load(Ordering::Relaxed)
                .to_le_bytes(),
        );
        config[4..8].copy_from_slice(
            &self
                .state
                .actual_pages
                .load(Ordering::Relaxed)
                .to_le_bytes(),
        );
        config[12..16]
            .copy_from_slice(&self.state.poison_val.load(Ordering::Relaxed).to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // `actual` (bytes 4..8) and, with PAGE_POISON, `poison_val`
        // (12..16) are the driver's to write.
        let value = <[u8; 4]>::try_from(data).map(u32::from_le_bytes);
        match (offset, value) {
            (4, Ok(v)) => self.state.set_actual(v),
            (12, Ok(v)) if self.has(VIRTIO_BALLOON_F_PAGE_POISON) => {
                self.state.poison_val.store(v, Ordering::Relaxed)
            }
            _ => crate::guest_warn!(
                "balloon: ignoring config write at {offset} of {} bytes",
                data.len()
            ),
        }
    }

    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let needed = 2
            + usize::from(self.stats_queue.is_some())
            + usize::from(self.reporting_queue.is_some());
        if let Some(i) = (0..needed).find(|&i| !queues.get(i).is_some_and(|q| q.ready())) {
            return Err(ActivateError::BadQueues(format!("queue {i} is not ready")));
        }
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
        self.queues = queues;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Progress {
        if self.mem.is_none() {
            return Progress::Done;
        }
        let pfn_descs = MAX_DESCS_PER_PFN_CHAIN;
        match index {
            0 => {
                let start = std::time::Instant::now();
                let progress = self.serve(0, pfn_descs, |b, _, _, d| b.inflate_chain(d));
                let c = &self.state.counters;
                c.inflate_batches.fetch_add(1, Ordering::Relaxed);
                c.inflate_us
                    .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                progress
            }
            1 => self.serve(1, pfn_descs, |b, _, _, d| b.deflate_chain(d)),
            i if Some(i) == self.stats_queue => self.serve(i, pfn_descs, Self::stats_chain),
            i if Some(i) == self.reporting_queue => {
                self.serve(i, usize::from(QUEUE_SIZE), |b, _, _, d| b.report_chain(d))
            }
            i => {
                refuse(
                    &self.state.counters.unused_queue_notifies,
                    format_args!("balloon: notification on unused queue {i}"),
                );
                Progress::Done
            }
        }
    }

    fn refresh(&mut self) {
        self.request_stats();
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queues.iter().map(|q| q.state()).collect()
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::to_value(self.save()).unwrap_or_default()
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        self.restore(&crate::state::parse("balloon", state)?)
    }

    fn reset(&mut self) {
        self.mem = None;
        self.interrupt = None;
        self.queues.clear();
        self.stats_head = None;
        self.acked = 0;
        self.huge.clear();
        self.state.poison_val.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BackendError;
    use guest_mem::{GuestMem, RegionConfig};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const MIB: u64 = 1 << 20;
    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;
    const VRING_DESC_F_INDIRECT: u16 = 4;

    /// Guest RAM at [0, 16 MiB) and [32 MiB, 48 MiB): a hole between.
    fn memory() -> Arc<GuestMem> {
        Arc::new(
            GuestMem::builder()
                .region(RegionConfig::new(0, 16 * MIB))
                .region(RegionConfig::new(32 * MIB, 16 * MIB))
                .build()
                .unwrap(),
        )
    }

    struct Rig<'a> {
        balloon: Balloon,
        mem: Arc<GuestMem>,
        queues: Vec<MockSplitQueue<'a, guest_mem::GuestMemoryMap>>,
    }

    /// Builds a balloon with mock queues at 1, 2, 3 and 4 MiB.
    fn rig(ram: &guest_mem::GuestMemoryMap, mem: Arc<GuestMem>, features: u64) -> Rig<'_> {
        let mut balloon = Balloon::new(
            mem.clone(),
            BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
            },
        );
        balloon.ack_features(features);
        let queues: Vec<_> = (0..4)
            .map(|i| MockSplitQueue::create(ram, GuestAddress((i + 1) * MIB), 16))
            .collect();
        let qs = queues
            .iter()
            .map(|m| {
                let mut q: Queue = m.create_queue().unwrap();
                q.set_ready(true);
                q
            })
            .collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        balloon.activate(mem.device_memory(), irq, qs).unwrap();
        Rig {
            balloon,
            mem,
            queues,
        }
    }

    fn pfn_buffer(ram: &guest_mem::GuestMemoryMap, at: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        ram.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn all_features() -> u64 {
        (1 << VIRTIO_BALLOON_F_STATS_VQ) | (1 << VIRTIO_BALLOON_F_REPORTING)
    }

    fn populate(mem: &GuestMem, from: u64, to: u64) {
        let ram = mem.memory().memory();
        for p in (from..to).step_by(BALLOON_PAGE as usize) {
            ram.write_obj(1u8, GuestAddress(p)).unwrap();
        }
    }

    fn has_data(mem: &GuestMem, gpa: u64) -> bool {
        let (r, off) = mem.find(GuestAddress(gpa)).unwrap();
        r.backing()
            .has_data(r.file_range(off, BALLOON_PAGE))
            .unwrap()
    }

    #[test]
    fn inflate_coalesces_and_punches_holes() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), all_features());
        populate(&r.mem, 8 * MIB, 9 * MIB);
        let base = (8 * MIB / BALLOON_PAGE) as u32;
        // Out of order, with duplicates: 8 pages in two runs.
        let pfns = [
            base + 3,
            base,
            base + 1,
            base + 2,
            base + 1,
            base + 10,
            base + 11,
            base + 12,
            base + 13,
        ];
        let len = pfn_buffer(ram, 5 * MIB, &pfns);
        r.queues[0]
            .add_desc_chains(&[desc(5 * MIB, len, 0, 0)], 0)
            .unwrap();
        r.balloon.process_queue(0);
        let c = &r.balloon.state().counters;
        assert_eq!(c.inflated_pages.load(Ordering::Relaxed), 8);
        assert_eq!(
            c.discards.load(Ordering::Relaxed),
            2,
            "two coalesced ranges"
        );
        for p in [0, 1, 2, 3, 10, 13] {
            assert!(
                !has_data(&r.mem, 8 * MIB + p * BALLOON_PAGE),
                "page {p} punched"
            );
        }
        assert!(has_data(&r.mem, 8 * MIB + 4 * BALLOON_PAGE), "page 4 kept");
        assert_eq!(r.queues[0].used().idx().load(), 1, "chain returned");
        assert_eq!(r.mem.stats().discards, 2);
        assert_eq!(c.stray_ranges.load(Ordering::Relaxed), 0);
    }

    /// A backend whose discard forgets to punch: what a racing install
    /// would look like from the balloon's side.
    struct Leaky(Arc<GuestMem>);

    impl MemoryBackend for Leaky {
        fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64> {
            self.0.discard_granularity(gpa)
        }
        fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool {
            self.0.is_ram(gpa, len)
        }
        fn discard(&self, _gpa: GuestAddress, _len: u64) -> Result<(), BackendError> {
            Ok(())
        }
        fn populated(&self, gpa: GuestAddress, len: u64) -> Option<bool> {
            self.0.populated(gpa, len)
        }
    }

    #[test]
    fn a_range_populated_after_its_discard_is_counted_as_stray() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), 0);
        r.balloon.backend = Arc::new(Leaky(mem.clone()));
        populate(&r.mem, 8 * MIB, 8 * MIB + 2 * BALLOON_PAGE);
        let base = (8 * MIB / BALLOON_PAGE) as u32;
        let len = pfn_buffer(ram, 5 * MIB, &[base, base + 1, base + 5]);
        r.queues[0]
            .add_desc_chains(&[desc(5 * MIB, len, 0, 0)], 0)
            .unwrap();
        r.balloon.process_queue(0);
        // [base, base+2) still has data; base+5 was never touched.
        assert_eq!(
            r.balloon
                .state()
                .counters
                .stray_ranges
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn pfns_outside_ram_and_in_the_gap_are_refused() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), 0);
        let gap = (20 * MIB / BALLOON_PAGE) as u32;
        let beyond = (100 * MIB / BALLOON_PAGE) as u32;
        let len = pfn_buffer(ram, 5 * MIB, &[gap, beyond, u32::MAX, 100]);
        r.queues[0]
            .add_desc_chains(&[desc(5 * MIB, len, 0, 0)], 0)
            .unwrap();
        r.balloon.process_queue(0);
        let c = &r.balloon.state().counters;
        assert_eq!(c.rejected_pfns.load(Ordering::Relaxed), 3);
        assert_eq!(c.inflated_pages.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn malformed_chains_are_refused_not_fatal() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), 0);
        // 1: a write-only PFN buffer; 2: a length not a multiple of 4;
        // 3: a buffer outside guest memory; 4: a chain that loops on itself.
        r.queues[0]
            .add_desc_chains(
                &[
                    desc(5 * MIB, 8, VRING_DESC_F_WRITE, 0),
                    desc(5 * MIB, 7, 0, 0),
                    desc(0xffff_0000_0000, 8, 0, 0),
                    desc(5 * MIB, 4, VRING_DESC_F_NEXT, 3),
                ],
                0,
            )
            .unwrap();
        r.balloon.process_queue(0);
        let c = &r.balloon.state().counters;
        assert!(c.rejected_chains.load(Ordering::Relaxed) >= 3);
        assert_eq!(c.discard_errors.load(Ordering::Relaxed), 0);
        // An avail index far past the ring: refused, no panic.
        r.queues[1].avail().idx().store(u16::MAX);
        r.balloon.process_queue(1);
        r.balloon.process_queue(9);
    }

    #[test]
    fn deflate_counts_and_pages_read_zero_again() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), 0);
        ram.write_obj(0xabu8, GuestAddress(9 * MIB)).unwrap();
        let pfn = (9 * MIB / BALLOON_PAGE) as u32;
        let len = pfn_buffer(ram, 5 * MIB, &[pfn]);
        r.queues[0]
            .add_desc_chains(&[desc(5 * MIB, len, 0, 0)], 0)
            .unwrap();
        r.balloon.process_queue(0);
        let len = pfn_buffer(ram, 6 * MIB, &[pfn]);
        r.queues[1]
            .add_desc_chains(&[desc(6 * MIB, len, 0, 0)], 0)
            .unwrap();
        r.balloon.process_queue(1);
        assert_eq!(
            r.balloon
                .state()
                .counters
                .deflated_pages
                .load(Ordering::Relaxed),
            1
        );
        assert_eq!(ram.read_obj::<u8>(GuestAddress(9 * MIB)).unwrap(), 0);
    }

    #[test]
    fn stats_are_parsed_and_the_buffer_held() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), all_features());
        let mut buf = Vec::new();
        for (tag, val) in [(4u16, 123u64), (5, 456)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&val.to_le_bytes());
        }
        ram.write_slice(&buf, GuestAddress(7 * MIB)).unwrap();
        r.queues[2]
            .add_desc_chains(&[desc(7 * MIB, buf.len() as u32, 0, 0)], 0)
            .unwrap();
        r.balloon.process_queue(2);
        let stats = r.balloon.state().guest_stats.lock().unwrap().clone();
        assert_eq!(stats.get(&4), Some(&123));
        assert_eq!(stats.get(&5), Some(&456));
        assert_eq!(r.queues[2].used().idx().load(), 0, "held");
        r.balloon.request_stats();
        assert_eq!(r.queues[2].used().idx().load(), 1, "returned for a refill");
    }

    #[test]
    fn free_page_reports_are_discarded_when_in_ram() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), all_features());
        populate(&r.mem, 33 * MIB, 34 * MIB);
        r.queues[3]
            .add_desc_chains(
                &[
                    desc(
                        33 * MIB,
                        MIB as u32,
                        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                        1,
                    ),
                    desc(20 * MIB, 4096, VRING_DESC_F_WRITE, 0),
                ],
                0,
            )
            .unwrap();
        r.balloon.process_queue(3);
        let c = &r.balloon.state().counters;
        assert_eq!(c.reported_bytes.load(Ordering::Relaxed), MIB);
        assert_eq!(c.rejected_pfns.load(Ordering::Relaxed), 1);
        assert!(!has_data(&r.mem, 33 * MIB));
        assert_eq!(r.queues[3].used().idx().load(), 1);
    }

    #[test]
    fn config_space_and_queue_roles_follow_features() {
        let mem = memory();
        let mut b: Balloon = Balloon::new(mem, BalloonConfig::default());
        assert_eq!(b.features() & (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM), 0);
        b.ack_features(1 << VIRTIO_BALLOON_F_REPORTING);
        assert_eq!((b.stats_queue, b.reporting_queue), (None, Some(2)));
        b.ack_features(all_features());
        assert_eq!((b.stats_queue, b.reporting_queue), (Some(2), Some(3)));
        b.state().target_pages.store(0x1234, Ordering::Relaxed);
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234);
        b.write_config(4, &7u32.to_le_bytes());
        assert_eq!(b.state().actual_pages.load(Ordering::Relaxed), 7);
        b.write_config(0, &9u32.to_le_bytes()); // num_pages is the host's
        assert_eq!(b.state().target_pages.load(Ordering::Relaxed), 0x1234);
        let mut far = [1u8; 8];
        b.read_config(u64::MAX - 2, &mut far);
        assert_eq!(far, [0; 8]);
        assert_eq!(coalesce(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        let _ = GuestAddress(0).unchecked_add(1);
    }

    #[test]
    fn features_follow_the_config() {
        let quiet: Balloon = Balloon::new(
            memory(),
            BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: false,
            },
        );
        assert_eq!(quiet.features() & (1 << VIRTIO_BALLOON_F_REPORTING), 0);
        assert_ne!(quiet.features() & (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM), 0);
        let mut b = quiet;
        // A driver acking what was not offered gets no reporting queue.
        b.ack_features(all_features());
        assert_eq!((b.stats_queue, b.reporting_queue), (Some(2), None));
    }

    /// A memory backend over `GuestMem` that stands in for a vCPU: every
    /// discard publishes the same report chain again, as a guest that
    /// keeps the reporting queue full from another vCPU would.
    struct Republisher {
        mem: Arc<GuestMem>,
        avail_idx: GuestAddress,
        published: AtomicU64,
    }

    impl MemoryBackend for Republisher {
        fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64> {
            self.mem.discard_granularity(gpa)
        }
        fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool {
            self.mem.is_ram(gpa, len)
        }
        fn discard(&self, gpa: GuestAddress, len: u64) -> Result<(), BackendError> {
            // Bounded, so that a device without a budget ends the test
            // (with a failed assertion) instead of hanging it.
            if self.published.fetch_add(1, Ordering::Relaxed) < 100_000 {
                let ram = self.mem.memory().memory();
                let idx: u16 = ram.read_obj(self.avail_idx).unwrap();
                ram.write_obj(idx.wrapping_add(1), self.avail_idx).unwrap();
            }
            Ok(self.mem.discard(gpa, len)?)
        }
    }

    #[test]
    fn a_guest_that_keeps_reporting_gets_a_bounded_share_per_notification() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), all_features());
        // The reporting queue laid out by hand (the mock's rings overlap
        // past 8 entries): one chain, named by every slot of the ring.
        let (table, avail, used) = (10 * MIB, 10 * MIB + 0x1000, 10 * MIB + 0x2000);
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(table as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        r.balloon.queues[3] = q;
        ram.write_obj(
            SplitDescriptor::new(33 * MIB, 4096, VRING_DESC_F_WRITE, 0),
            GuestAddress(table),
        )
        .unwrap();
        ram.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        r.balloon.backend = Arc::new(Republisher {
            mem: mem.clone(),
            avail_idx: GuestAddress(avail + 2),
            published: AtomicU64::new(0),
        });
        assert_eq!(r.balloon.process_queue(3), Progress::MoreWork);
        let c = &r.balloon.state().counters;
        let served = c.reported_bytes.load(Ordering::Relaxed) / 4096;
        assert!(served <= 16, "{served} chains served for one notification");
        assert_eq!(c.yields.load(Ordering::Relaxed), 1);
        assert_eq!(c.rejected_chains.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn indirect_and_over_long_chains_are_refused() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), all_features());
        populate(&r.mem, 8 * MIB, 9 * MIB);
        let pfn = (8 * MIB / BALLOON_PAGE) as u32;
        let len = pfn_buffer(ram, 5 * MIB, &[pfn]);
        // An indirect table whose one entry names the PFN buffer: never
        // followed (VIRTIO_RING_F_INDIRECT_DESC is not offered).
        ram.write_obj(
            SplitDescriptor::new(5 * MIB, len, 0, 0),
            GuestAddress(6 * MIB),
        )
        .unwrap();
        r.queues[0]
            .add_desc_chains(&[desc(6 * MIB, 16, VRING_DESC_F_INDIRECT, 0)], 0)
            .unwrap();
        r.balloon.process_queue(0);
        let c = &r.balloon.state().counters;
        assert_eq!(c.rejected_chains.load(Ordering::Relaxed), 1);
        assert_eq!(c.inflated_pages.load(Ordering::Relaxed), 0);
        assert!(has_data(&r.mem, 8 * MIB), "nothing discarded");
        assert_eq!(r.queues[0].used().idx().load(), 1, "the chain is returned");
        // 17 zero-length descriptors and one PFN: past the 16 a PFN chain
        // may have, zero-length ones included.
        let mut chain: Vec<_> = (0..7u16)
            .map(|i| desc(5 * MIB, 0, VRING_DESC_F_NEXT, i + 1))
            .collect();
        chain.push(desc(5 * MIB, len, 0, 0));
        r.queues[1].add_desc_chains(&chain, 0).unwrap();
        r.balloon.process_queue(1);
        assert_eq!(
            c.deflated_pages.load(Ordering::Relaxed),
            1,
            "8 descriptors pass"
        );
    }

    /// A memory backend that gives memory back in 2 MiB units, as
    /// hugetlbfs does.
    struct HugePages(Arc<GuestMem>, Mutex<Vec<(u64, u64)>>);

    impl MemoryBackend for HugePages {
        fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64> {
            self.0.discard_granularity(gpa).map(|_| 2 * MIB)
        }
        fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool {
            self.0.is_ram(gpa, len)
        }
        fn discard(&self, gpa: GuestAddress, len: u64) -> Result<(), BackendError> {
            assert_eq!((gpa.0 % (2 * MIB), len % (2 * MIB)), (0, 0));
            self.1.lock().unwrap().push((gpa.0, len));
            Ok(self.0.discard(gpa, len)?)
        }
    }

    #[test]
    fn on_huge_pages_a_unit_is_freed_once_all_its_pages_are_in_the_balloon() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut r = rig(ram, mem.clone(), 0);
        let backend = Arc::new(HugePages(mem.clone(), Mutex::new(Vec::new())));
        r.balloon.backend = backend.clone();
        let base = (4 * MIB / BALLOON_PAGE) as u32; // huge page 2
        let inflate = |r: &mut Rig, pfns: &[u32]| {
            let len = pfn_buffer(ram, 5 * MIB, pfns);
            r.queues[0]
                .add_desc_chains(&[desc(5 * MIB, len, 0, 0)], 0)
                .unwrap();
            r.balloon.process_queue(0);
        };
        // Linux inflates 256 pages (1 MiB) per batch: nothing can be freed
        // after the first, the huge page goes after the second.
        let batch = |from: u32| (from..from + 256).collect::<Vec<_>>();
        inflate(&mut r, &batch(base + 256));
        assert!(backend.1.lock().unwrap().is_empty());
        inflate(&mut r, &batch(base));
        assert_eq!(*backend.1.lock().unwrap(), vec![(4 * MIB, 2 * MIB)]);
        let c = &r.balloon.state().counters;
        assert_eq!(c.inflated_pages.load(Ordering::Relaxed), 512);
        assert_eq!(
            c.freed_bytes.load(Ordering::Relaxed),
            2 * MIB,
            "what was freed"
        );
        // Half of another huge page: counted as inflated, not as freed.
        inflate(&mut r, &batch(base + 512));
        assert_eq!(c.freed_bytes.load(Ordering::Relaxed), 2 * MIB);
        assert_eq!(backend.1.lock().unwrap().len(), 1);
    }

    #[test]
    fn reports_are_kept_when_the_guest_poisons_free_pages_with_a_pattern() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let features = all_features() | (1 << VIRTIO_BALLOON_F_PAGE_POISON);
        assert_ne!(
            Balloon::<DeviceMemory>::new(mem.clone(), BalloonConfig::default()).features()
                & (1 << VIRTIO_BALLOON_F_PAGE_POISON),
            0,
            "offered with free page reporting"
        );
        let mut r = rig(ram, mem.clone(), features);
        populate(&r.mem, 33 * MIB, 35 * MIB);
        r.balloon.write_config(12, &0xaau32.to_le_bytes());
        let mut v = [0u8; 4];
        r.balloon.read_config(12, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0xaa);
        r.queues[3]
            .add_desc_chains(&[desc(33 * MIB, MIB as u32, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        r.balloon.process_queue(3);
        let c = &r.balloon.state().counters;
        assert!(
            has_data(&r.mem, 33 * MIB),
            "a discard would read zero, not 0xaa"
        );
        assert_eq!(c.reports_kept_for_poison.load(Ordering::Relaxed), 1);
        // Zero poison (init_on_free): discarded pages read what it wants.
        r.balloon.write_config(12, &0u32.to_le_bytes());
        r.queues[3]
            .add_desc_chains(&[desc(34 * MIB, MIB as u32, VRING_DESC_F_WRITE, 0)], 1)
            .unwrap();
        r.balloon.process_queue(3);
        assert!(!has_data(&r.mem, 34 * MIB));
        assert_eq!(c.freed_bytes.load(Ordering::Relaxed), MIB);
    }
}
