//! virtio-mem: device-managed hot(un)plug of guest memory in blocks.
//!
//! The device owns a window of guest-physical memory beside boot RAM (a
//! resizable `guest-mem` region reached through [`HotplugBackend`]). The
//! host sets `requested_size`; the guest driver plugs and unplugs blocks to
//! follow it. Plugging past the backing file's end extends the file;
//! unplugging punches holes, and when the window's tail is unplugged the file
//! is truncated — both truncate-generation invalidations, so a fault racing
//! with an unplug retries instead of resurrecting memory. Requests are
//! hostile input: ranges outside the usable window, unaligned, overflowing
//! or for blocks in the wrong state are answered with the spec's error and
//! counted, never a panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::mem::size_of;

use guest_mem::DeviceMemory;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use super::chain::{serve_queue, Progress, Served};
use super::resize_timer::ResizeTimer;
use super::{ActivateError, Interrupt, VirtioDevice};
use crate::guest_log::refuse;
use crate::memory::{BackendError, HotplugBackend};
use crate::state::StateError;

mod saved;
pub use saved::{MemCountersState, VirtioMemDeviceState, VIRTIO_MEM_STATE_VERSION};

/// The virtio device ID of virtio-mem.
pub const VIRTIO_ID_MEM: u32 = 24;
/// Unplugged memory must not be accessed by the driver (it is not backed).
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// Block size: 2 MiB, the smallest the Linux driver handles on x86.
pub const BLOCK_SIZE: u64 = 2 << 20;
const QUEUE_SIZE: u16 = 128;
/// Most descriptors in a request chain (Linux sends two).
const MAX_DESCS_PER_CHAIN: usize = 8;

/// Request types.
pub mod req {
    /// Plug blocks.
    pub const PLUG: u16 = 0;
    /// Unplug blocks.
    pub const UNPLUG: u16 = 1;
    /// Unplug every block.
    pub const UNPLUG_ALL: u16 = 2;
    /// Report the state of blocks.
    pub const STATE: u16 = 3;
}

/// Response types.
pub mod resp {
    /// Done.
    pub const ACK: u16 = 0;
    /// Refused: plugging would exceed the requested size.
    pub const NACK: u16 = 1;
    /// Try again later.
    pub const BUSY: u16 = 2;
    /// A malformed request (range, alignment, block state).
    pub const ERROR: u16 = 3;
}

/// Block states answered to `STATE`.
pub mod state {
    /// All blocks plugged.
    pub const PLUGGED: u16 = 0;
    /// All blocks unplugged.
    pub const UNPLUGGED: u16 = 1;
    /// Some of each.
    pub const MIXED: u16 = 2;
}

/// A request as the driver lays it out (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemRequest {
    /// One of [`req`].
    pub kind: u16,
    padding: [u16; 3],
    /// Guest-physical address of the first block.
    pub addr: u64,
    /// Number of blocks.
    pub nb_blocks: u16,
    padding_1: [u16; 3],
}

// SAFETY: plain little-endian integers with no implicit padding; any byte
// pattern is a valid value.
unsafe impl ByteValued for MemRequest {}
const _: () = assert!(size_of::<MemRequest>() == 24);

impl MemRequest {
    /// A request of `kind` for `nb_blocks` blocks at `addr`.
    pub fn new(kind: u16, addr: u64, nb_blocks: u16) -> Self {
        MemRequest {
            kind,
            addr,
            nb_blocks,
            ..Default::default()
        }
    }
}

/// A response (10 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemResponse {
    /// One of [`resp`].
    pub kind: u16,
    padding: [u16; 3],
    /// For `STATE`: one of [`state`].
    pub state: u16,
}

// SAFETY: plain little-endian integers (10 bytes, 2-aligned, no implicit
// padding); any byte pattern is a valid value.
unsafe impl ByteValued for MemResponse {}
const _: () = assert!(size_of::<MemResponse>() == 10);

/// Counters of what the device did and refused.
#[derive(Debug, Default)]
pub struct MemCounters {
    /// Plug requests acknowledged.
    pub plugs: AtomicU64,
    /// Unplug and unplug-all requests acknowledged.
    pub unplugs: AtomicU64,
    /// Requests answered NACK or ERROR.
    pub refused: AtomicU64,
    /// Descriptor chains too malformed to answer.
    pub rejected_chains: AtomicU64,
    /// Backend operations (grow, discard, truncate) that failed.
    pub backend_errors: AtomicU64,
    /// Unplug requests refused because they would take away the memory the
    /// device answers in (the response buffer or the queue itself).
    pub self_unplug_refused: AtomicU64,
    /// Notifications on queues the device does not use.
    pub unused_queue_notifies: AtomicU64,
}

/// State the VMM shares with the device.
#[derive(Debug, Default)]
pub struct MemState {
    /// Bytes the host asks the guest to have plugged.
    pub requested_size: AtomicU64,
    /// Bytes the guest has plugged.
    pub plugged_size: AtomicU64,
    /// Counters.
    pub counters: MemCounters,
    /// How the guest followed the last change of the requested size.
    pub resize: ResizeTimer,
}

impl MemState {
    /// Asks for `bytes` plugged and starts timing the guest's response.
    pub fn request(&self, bytes: u64) {
        self.requested_size.store(bytes, Ordering::Relaxed);
        self.resize.start();
    }
}

/// The virtio-mem device, reaching guest memory through `M`.
pub struct VirtioMem<M = DeviceMemory> {
    backend: Arc<dyn HotplugBackend>,
    state: Arc<MemState>,
    addr: u64,
    region_size: u64,
    /// One entry per block: plugged or not.
    plugged: Vec<bool>,
    mem: Option<M>,
    interrupt: Option<Arc<Interrupt>>,
    queue: Option<Queue>,
}

impl<M: GuestAddressSpace> VirtioMem<M> {
    /// A device over `backend`'s window, which must be block-aligned.
    pub fn new(backend: Arc<dyn HotplugBackend>) -> Result<Self, String> {
        let (addr, size) = backend.window();
        if addr.0 % BLOCK_SIZE != 0 || size % BLOCK_SIZE != 0 || size == 0 {
            return Err(format!(
                "virtio-mem window {:#x}+{size:#x} is not a whole number of {BLOCK_SIZE:#x}-byte blocks",
                addr.0
            ));
        }
        let blocks = usize::try_from(size / BLOCK_SIZE).map_err(|e| e.to_string())?;
        // Whatever the file holds at start counts as plugged.
        let backed = backend.backed_size().min(size) / BLOCK_SIZE;
        let mut plugged = vec![false; blocks];
        plugged[..backed as usize].fill(true);
        let state = Arc::new(MemState::default());
        state
            .plugged_size
            .store(backed * BLOCK_SIZE, Ordering::Relaxed);
        Ok(VirtioMem {
            backend,
            state,
            addr: addr.0,
            region_size: size,
            plugged,
            mem: None,
            interrupt: None,
            queue: None,
        })
    }

    /// The state shared with the VMM.
    pub fn state(&self) -> Arc<MemState> {
        self.state.clone()
    }

    fn config(&self) -> [u8; 56] {
        let mut c = [0u8; 56];
        let requested = self.state.requested_size.load(Ordering::Relaxed);
        let plugged = self.state.plugged_size.load(Ordering::Relaxed);
        c[0..8].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        // node_id (8..10) and padding stay zero: no NUMA.
        c[16..24].copy_from_slice(&self.addr.to_le_bytes());
        c[24..32].copy_from_slice(&self.region_size.to_le_bytes());
        // The whole window is usable: the driver may plug anywhere in it.
        c[32..40].copy_from_slice(&self.region_size.to_le_bytes());
        c[40..48].copy_from_slice(&plugged.to_le_bytes());
        c[48..56].copy_from_slice(&requested.to_le_bytes());
        c
    }

    /// The blocks `[first, first + n)` of a request, if it names a non-empty,
    /// aligned range inside the window.
    fn blocks(&self, addr: u64, nb_blocks: u16) -> Option<std::ops::Range<usize>> {
        let off = addr.checked_sub(self.addr)?;
        let len = u64::from(nb_blocks) * BLOCK_SIZE;
        if nb_blocks == 0 || off % BLOCK_SIZE != 0 || off.checked_add(len)? > self.region_size {
            return None;
        }
        let first = (off / BLOCK_SIZE) as usize;
        Some(first..first + usize::from(nb_blocks))
    }

    fn plugged_bytes(&self) -> u64 {
        self.state.plugged_size.load(Ordering::Relaxed)
    }

    fn set_plugged_bytes(&self, v: u64) {
        let previous = self.state.plugged_size.swap(v, Ordering::Relaxed);
        let reached = v == self.state.requested_size.load(Ordering::Relaxed);
        self.state.resize.observe(v != previous, reached);
    }

    /// End of the last plugged block, in bytes from the window's start.
    fn plugged_end(&self) -> u64 {
        self.plugged
            .iter()
            .rposition(|&p| p)
            .map_or(0, |i| (i as u64 + 1) * BLOCK_SIZE)
    }

    fn backend_failed(&self, what: &str, e: BackendError) -> u16 {
        refuse(
            &self.state.counters.backend_errors,
            format_args!("virtio-mem: {what}: {e}"),
        );
        resp::ERROR
    }

    fn plug(&mut self, blocks: std::ops::Range<usize>) -> u16 {
        if self.plugged[blocks.clone()].iter().any(|&p| p) {
            return resp::ERROR;
        }
        let bytes = blocks.len() as u64 * BLOCK_SIZE;
        let requested = self.state.requested_size.load(Ordering::Relaxed);
        if self.plugged_bytes() + bytes > requested {
            return resp::NACK;
        }
        let (start, end) = (
            blocks.start as u64 * BLOCK_SIZE,
            blocks.end as u64 * BLOCK_SIZE,
        );
        if end > self.backend.backed_size() {
            // The blocks between the old end and these stay unplugged:
            // holes the guest cannot reach, so the host never backs them.
            if let Err(e) = self.backend.set_backed_size(end) {
                return self.backend_failed("growing the backing file", e);
            }
        }
        if let Err(e) = self.backend.set_plugged(start, end - start, true) {
            return self.backend_failed("plugging", e);
        }
        self.plugged[blocks].fill(true);
        self.set_plugged_bytes(self.plugged_bytes() + bytes);
        resp::ACK
    }

    fn unplug(&mut self, blocks: std::ops::Range<usize>) -> u16 {
        if !self.plugged[blocks.clone()].iter().all(|&p| p) {
            return resp::ERROR;
        }
        let (start, end) = (
            blocks.start as u64 * BLOCK_SIZE,
            blocks.end as u64 * BLOCK_SIZE,
        );
        // Out of reach first (no device access in progress there any more),
        // then given back.
        if let Err(e) = self.backend.set_plugged(start, end - start, false) {
            return self.backend_failed("unplugging", e);
        }
        self.plugged[blocks.clone()].fill(false);
        // The part below the new end of plugged memory becomes a hole; the
        // part above it goes with the truncation.
        let new_end = self.plugged_end();
        let result = if start < new_end {
            self.backend.discard_range(start, end.min(new_end) - start)
        } else {
            Ok(())
        }
        .and_then(|()| self.shrink_to(new_end));
        if let Err(e) = result {
            self.plugged[blocks].fill(true);
            let _ = self.backend.set_plugged(start, end - start, true);
            return self.backend_failed("unplugging", e);
        }
        self.set_plugged_bytes(self.plugged_bytes() - (end - start));
        resp::ACK
    }

    fn shrink_to(&self, end: u64) -> Result<(), BackendError> {
        if end < self.backend.backed_size() {
            self.backend.set_backed_size(end)
        } else {
            Ok(())
        }
    }

    fn unplug_all(&mut self) -> u16 {
        if let Err(e) = self.backend.set_plugged(0, self.region_size, false) {
            return self.backend_failed("unplugging everything", e);
        }
        if let Err(e) = self.backend.set_backed_size(0) {
            return self.backend_failed("unplugging everything", e);
        }
        self.plugged.fill(false);
        self.set_plugged_bytes(0);
        resp::ACK
    }

    fn block_state(&self, blocks: std::ops::Range<usize>) -> u16 {
        let s = &self.plugged[blocks];
        if s.iter().all(|&p| p) {
            state::PLUGGED
        } else if s.iter().all(|&p| !p) {
            state::UNPLUGGED
        } else {
            state::MIXED
        }
    }

    fn refused(&self, r: &MemRequest, kind: u16) {
        let (addr, nb) = (r.addr, r.nb_blocks);
        refuse(
            &self.state.counters.refused,
            format_args!(
                "virtio-mem: answering {kind} to request {} for {nb} blocks at {addr:#x}",
                r.kind
            ),
        );
    }

    /// Carries out one request; returns the response.
    pub fn handle(&mut self, r: &MemRequest) -> MemResponse {
        let (addr, nb) = (r.addr, r.nb_blocks);
        let started = std::time::Instant::now();
        let blocks = self.blocks(addr, nb);
        let (kind, st) = match (r.kind, blocks) {
            (req::PLUG, Some(b)) => (self.plug(b), 0),
            (req::UNPLUG, Some(b)) => (self.unplug(b), 0),
            (req::UNPLUG_ALL, _) => (self.unplug_all(), 0),
            (req::STATE, Some(b)) => (resp::ACK, self.block_state(b)),
            _ => (resp::ERROR, 0),
        };
        let c = &self.state.counters;
        match (kind, r.kind) {
            (resp::ACK, req::PLUG) => {
                c.plugs.fetch_add(1, Ordering::Relaxed);
            }
            (resp::ACK, req::UNPLUG | req::UNPLUG_ALL) => {
                c.unplugs.fetch_add(1, Ordering::Relaxed);
            }
            (resp::ACK, _) => {}
            _ => self.refused(r, kind),
        }
        log::debug!(
            "virtio-mem: request {} for {nb} blocks at {addr:#x}: answer {kind} in {} us",
            r.kind,
            started.elapsed().as_micros()
        );
        MemResponse {
            kind,
            state: st,
            ..Default::default()
        }
    }

    fn reject_chain(&self, why: std::fmt::Arguments<'_>) {
        refuse(
            &self.state.counters.rejected_chains,
            format_args!("virtio-mem: refusing a descriptor chain: {why}"),
        );
    }

    /// The request and where its response goes, from one chain: a
    /// device-readable request, then a device-writable buffer with room for
    /// the response.
    fn parse_chain(
        &self,
        mem: &impl GuestMemory,
        descs: &[Descriptor],
    ) -> Option<(MemRequest, GuestAddress)> {
        let split = descs.iter().position(Descriptor::is_write_only);
        let (readable, writable) = descs.split_at(split.unwrap_or(descs.len()));
        let Some(req_desc) = readable.first() else {
            self.reject_chain(format_args!("no request"));
            return None;
        };
        let Some(resp_desc) = writable.first() else {
            self.reject_chain(format_args!("no response buffer"));
            return None;
        };
        if (req_desc.len() as usize) < size_of::<MemRequest>() {
            self.reject_chain(format_args!("a request of {} bytes", req_desc.len()));
            return None;
        }
        // No room for the answer: refuse before acting, so that the driver
        // never misses the outcome of a plug or an unplug.
        if (resp_desc.len() as usize) < size_of::<MemResponse>() {
            self.reject_chain(format_args!(
                "{} writable bytes for a response",
                resp_desc.len()
            ));
            return None;
        }
        match mem.read_obj::<MemRequest>(req_desc.addr()) {
            Ok(r) => Some((r, resp_desc.addr())),
            Err(e) => {
                self.reject_chain(format_args!("reading the request: {e}"));
                None
            }
        }
    }

    /// Whether an unplug of `r` would take away the memory the device is
    /// about to answer in: the response buffer or the queue's rings.
    fn unplugs_own_buffers(&self, r: &MemRequest, resp: GuestAddress, queue: &Queue) -> bool {
        let range = match r.kind {
            req::UNPLUG_ALL => Some((self.addr, self.region_size)),
            req::UNPLUG => self.blocks(r.addr, r.nb_blocks).map(|b| {
                (
                    self.addr + b.start as u64 * BLOCK_SIZE,
                    b.len() as u64 * BLOCK_SIZE,
                )
            }),
            _ => None,
        };
        let Some((start, len)) = range else {
            return false;
        };
        let end = start + len;
        let size = u64::from(queue.size());
        let touched = [
            (resp.0, size_of::<MemResponse>() as u64),
            (queue.desc_table(), 16 * size),
            (queue.avail_ring(), 6 + 2 * size),
            (queue.used_ring(), 6 + 8 * size),
        ];
        touched
            .iter()
            .any(|&(a, l)| a < end && a.saturating_add(l) > start)
    }

    /// Serves the request queue: each chain is read, carried out, answered
    /// and returned before the next, within one notification's budget.
    ///
    /// No memory guard is held while a request runs (an unplug shrinks the
    /// window, which waits for every guard), and the answer is written
    /// against the memory as it is afterwards. A request that would unplug
    /// the memory its own answer or the queue lives in is answered ERROR.
    fn process_requests(&mut self) -> Progress {
        let (Some(mem), Some(mut queue)) = (self.mem.clone(), self.queue.take()) else {
            return Progress::Done;
        };
        let interrupt = self.interrupt.clone();
        let progress = serve_queue(
            self,
            &mem,
            &mut queue,
            interrupt.as_deref(),
            MAX_DESCS_PER_CHAIN,
            |d, why| d.reject_chain(why),
            |d, queue, _, descs| {
                let Some((r, resp)) = d.parse_chain(&*mem.memory(), descs) else {
                    return Served::Used(0);
                };
                let answer = if d.unplugs_own_buffers(&r, resp, queue) {
                    d.state
                        .counters
                        .self_unplug_refused
                        .fetch_add(1, Ordering::Relaxed);
                    d.refused(&r, resp::ERROR);
                    MemResponse {
                        kind: resp::ERROR,
                        ..Default::default()
                    }
                } else {
                    d.handle(&r)
                };
                match mem.memory().write_obj(answer, resp) {
                    Ok(()) => Served::Used(size_of::<MemResponse>() as u32),
                    Err(e) => {
                        d.reject_chain(format_args!("writing the response: {e}"));
                        Served::Used(0)
                    }
                }
            },
        );
        self.queue = Some(queue);
        progress
    }
}

impl<M: GuestAddressSpace + Send> VirtioDevice<M> for VirtioMem<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }

    fn ack_features(&mut self, _features: u64) {
        // Nothing to switch: the one feature offered changes no behaviour
        // here (unplugged memory is never backed either way).
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            "virtio-mem: ignoring config write at {offset} of {} bytes (read-only)",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let Some(queue) = queues.into_iter().next().filter(|q| q.ready()) else {
            return Err(ActivateError::BadQueues("queue 0 is not ready".into()));
        };
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
        self.queue = Some(queue);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Progress {
        if index == 0 {
            self.process_requests()
        } else {
            refuse(
                &self.state.counters.unused_queue_notifies,
                format_args!("virtio-mem: notification on unused queue {index}"),
            );
            Progress::Done
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queue.iter().map(|q| q.state()).collect()
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::to_value(self.save()).unwrap_or_default()
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        self.restore(&crate::state::parse("virtio-mem", state)?)
    }

    fn reset(&mut self) {
        // Plugged memory stays plugged across a device reset (the spec
        // forbids touching it); the driver asks for the state again.
        self.mem = None;
        self.interrupt = None;
        self.queue = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mem::backend::HotplugRegion;
    use guest_mem::{GuestMem, RegionConfig};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    pub(super) const MIB: u64 = 1 << 20;
    /// The hotplug window: 32 MiB (16 blocks) at 64 MiB.
    pub(super) const BASE: u64 = 64 * MIB;

    /// 16 MiB of RAM and the hotplug window at [`BASE`], nothing plugged.
    pub(super) fn memory() -> Arc<GuestMem> {
        let mut hotplug = RegionConfig::new(BASE, 0);
        hotplug.max_size = Some(32 * MIB);
        Arc::new(
            GuestMem::builder()
                .region(RegionConfig::new(0, 16 * MIB))
                .region(hotplug)
                .build()
                .unwrap(),
        )
    }

    /// A device over the window of [`memory`].
    pub(super) fn device(mem: &Arc<GuestMem>) -> VirtioMem {
        VirtioMem::new(Arc::new(
            HotplugRegion::new(mem.clone(), guest_mem::RegionIndex(1)).unwrap(),
        ))
        .unwrap()
    }

    fn block(i: u64) -> u64 {
        BASE + i * BLOCK_SIZE
    }

    /// Request `kind` for `n` blocks from block `block_index`: (answer, state).
    pub(super) fn ask(d: &mut VirtioMem, kind: u16, block_index: u64, n: u16) -> (u16, u16) {
        let r = d.handle(&MemRequest::new(kind, block(block_index), n));
        (r.kind, r.state)
    }

    fn file_size(mem: &GuestMem) -> u64 {
        mem.regions()[1].backing().size()
    }

    /// Activates `d` with one mock queue at 1 MiB of `ram` (the boot RAM of
    /// `mem`), 4 MiB allowed to be plugged.
    fn with_queue<'a>(
        d: &mut VirtioMem,
        mem: &GuestMem,
        ram: &'a guest_mem::GuestMemoryMap,
    ) -> (
        MockSplitQueue<'a, guest_mem::GuestMemoryMap>,
        Arc<Interrupt>,
    ) {
        d.state().requested_size.store(4 * MIB, Ordering::Relaxed);
        let q = MockSplitQueue::create(ram, GuestAddress(MIB), 16);
        let mut queue: Queue = q.create_queue().unwrap();
        queue.set_ready(true);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        d.ack_features(d.features());
        d.activate(mem.device_memory(), irq.clone(), vec![queue])
            .unwrap();
        (q, irq)
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn has_data(mem: &GuestMem, block_index: u64) -> bool {
        let r = &mem.regions()[1];
        r.backing()
            .has_data(r.file_range(block_index * BLOCK_SIZE, BLOCK_SIZE))
            .unwrap()
    }

    #[test]
    fn plugs_up_to_the_requested_size_and_grows_the_file() {
        let mem = memory();
        let mut d = device(&mem);
        assert_eq!(
            ask(&mut d, req::PLUG, 0, 1).0,
            resp::NACK,
            "nothing requested"
        );
        d.state().request(8 * MIB);
        assert_eq!(ask(&mut d, req::PLUG, 2, 2).0, resp::ACK);
        let t = d.state().resize.get();
        assert_eq!((t.updates, t.settled), (1, None), "half way: not settled");
        assert_eq!(
            file_size(&mem),
            8 * MIB,
            "the file covers the plugged blocks"
        );
        assert_eq!(d.state().plugged_size.load(Ordering::Relaxed), 4 * MIB);
        assert_eq!(
            ask(&mut d, req::PLUG, 3, 1).0,
            resp::ERROR,
            "already plugged"
        );
        assert_eq!(
            ask(&mut d, req::PLUG, 4, 3).0,
            resp::NACK,
            "past the request"
        );
        assert_eq!(ask(&mut d, req::PLUG, 0, 2).0, resp::ACK);
        let t = d.state().resize.get();
        assert_eq!(t.updates, 2);
        assert!(t.settled.is_some() && t.settled >= t.first_change, "{t:?}");
        // The devices' view of memory includes the plugged blocks.
        let ram = mem.memory().memory();
        ram.write_obj(0xabu8, GuestAddress(block(3))).unwrap();
        assert_eq!(ask(&mut d, req::STATE, 0, 4), (resp::ACK, state::PLUGGED));
        assert_eq!(ask(&mut d, req::STATE, 3, 2), (resp::ACK, state::MIXED));
        assert_eq!(
            ask(&mut d, req::STATE, 4, 12),
            (resp::ACK, state::UNPLUGGED)
        );
        assert_eq!(d.state().counters.plugs.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn unplugging_punches_holes_and_truncates_the_tail() {
        let mem = memory();
        let mut d = device(&mem);
        d.state().requested_size.store(32 * MIB, Ordering::Relaxed);
        assert_eq!(ask(&mut d, req::PLUG, 0, 8).0, resp::ACK);
        let ram = mem.memory().memory();
        for i in 0..8 {
            ram.write_obj(i as u8 + 1, GuestAddress(block(i))).unwrap();
        }
        // Inside: a hole, the file keeps its size.
        assert_eq!(ask(&mut d, req::UNPLUG, 2, 2).0, resp::ACK);
        assert!(!has_data(&mem, 2) && !has_data(&mem, 3));
        assert!(has_data(&mem, 1) && has_data(&mem, 4));
        assert_eq!(file_size(&mem), 16 * MIB);
        assert_eq!(ask(&mut d, req::UNPLUG, 3, 1).0, resp::ERROR, "not plugged");
        // The tail: truncated down to the last plugged block.
        assert_eq!(ask(&mut d, req::UNPLUG, 5, 3).0, resp::ACK);
        assert_eq!(file_size(&mem), 10 * MIB);
        assert_eq!(mem.regions()[1].backed_size(), 10 * MIB);
        assert_eq!(ask(&mut d, req::UNPLUG, 4, 1).0, resp::ACK);
        assert_eq!(file_size(&mem), 4 * MIB, "down past the earlier hole");
        assert_eq!(d.state().plugged_size.load(Ordering::Relaxed), 4 * MIB);
        // Plugging again reads zero where data was.
        assert_eq!(ask(&mut d, req::PLUG, 2, 4).0, resp::ACK);
        let ram = mem.memory().memory();
        assert_eq!(ram.read_obj::<u8>(GuestAddress(block(4))).unwrap(), 0);
        assert_eq!(ram.read_obj::<u8>(GuestAddress(block(1))).unwrap(), 2);
        assert_eq!(ask(&mut d, req::UNPLUG_ALL, 0, 0).0, resp::ACK);
        assert_eq!(file_size(&mem), 0);
        assert_eq!(d.state().plugged_size.load(Ordering::Relaxed), 0);
        assert!(mem.stats().shrinks >= 3);
    }

    #[test]
    fn hostile_requests_get_an_error() {
        let mem = memory();
        let mut d = device(&mem);
        d.state().requested_size.store(32 * MIB, Ordering::Relaxed);
        for (kind, addr, n) in [
            (req::PLUG, BASE - BLOCK_SIZE, 1),      // before the window
            (req::PLUG, block(15), 2),              // runs past its end
            (req::PLUG, block(1) + 4096, 1),        // unaligned
            (req::PLUG, block(0), 0),               // no blocks
            (req::PLUG, u64::MAX - 4095, u16::MAX), // overflows
            (req::STATE, 0, 1),                     // boot RAM
            (req::UNPLUG, block(16), 1),            // past the end
            (7, block(0), 1),                       // unknown request
        ] {
            let r = d.handle(&MemRequest::new(kind, addr, n));
            assert_eq!(r.kind, resp::ERROR, "{kind} {addr:#x} {n}");
        }
        assert_eq!(d.state().counters.refused.load(Ordering::Relaxed), 8);
        assert_eq!(file_size(&mem), 0, "nothing was plugged");
    }

    #[test]
    fn config_space_describes_the_window() {
        let mem = memory();
        let d = device(&mem);
        d.state().requested_size.store(6 * MIB, Ordering::Relaxed);
        let mut c = [0u8; 56];
        d.read_config(0, &mut c);
        let at = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().unwrap());
        assert_eq!(at(0), BLOCK_SIZE);
        assert_eq!(at(16), BASE);
        assert_eq!((at(24), at(32)), (32 * MIB, 32 * MIB));
        assert_eq!((at(40), at(48)), (0, 6 * MIB));
        let mut far = [1u8; 4];
        d.read_config(54, &mut far);
        assert_eq!(far, [0, 0, 0, 0], "past the end reads zero");
    }

    #[test]
    fn requests_travel_through_the_queue_and_bad_chains_are_refused() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut d = device(&mem);
        let (q, irq) = with_queue(&mut d, &mem, ram);
        let (req_at, resp_at) = (4 * MIB, 5 * MIB);
        ram.write_obj(
            MemRequest::new(req::PLUG, block(0), 2),
            GuestAddress(req_at),
        )
        .unwrap();
        // A good request, then one whose "response" buffer is read-only,
        // then one with a 3-byte request.
        q.build_multiple_desc_chains(&[
            desc(req_at, 24, 1, 1),
            desc(resp_at, 10, 2, 0),
            desc(req_at, 24, 1, 3),
            desc(resp_at + 64, 10, 0, 0),
            desc(req_at, 3, 1, 5),
            desc(resp_at + 128, 10, 2, 0),
        ])
        .unwrap();
        d.process_queue(0);
        let r: MemResponse = ram.read_obj(GuestAddress(resp_at)).unwrap();
        assert_eq!(r.kind, resp::ACK);
        assert_eq!(d.state().plugged_size.load(Ordering::Relaxed), 4 * MIB);
        assert_eq!(
            d.state().counters.rejected_chains.load(Ordering::Relaxed),
            2
        );
        assert_ne!(irq.status() & Interrupt::VRING, 0);
        d.process_queue(3); // no such queue: ignored
    }

    #[test]
    fn a_request_without_room_for_its_answer_is_not_carried_out() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut d = device(&mem);
        let (q, _irq) = with_queue(&mut d, &mem, ram);
        ram.write_obj(
            MemRequest::new(req::PLUG, block(0), 2),
            GuestAddress(4 * MIB),
        )
        .unwrap();
        // A valid plug whose response buffer is read-only, then one whose
        // writable buffer is too short.
        q.build_multiple_desc_chains(&[
            desc(4 * MIB, 24, 1, 1),
            desc(5 * MIB, 10, 0, 0),
            desc(4 * MIB, 24, 1, 3),
            desc(5 * MIB, 4, 2, 0),
        ])
        .unwrap();
        d.process_queue(0);
        assert_eq!(
            d.state().counters.rejected_chains.load(Ordering::Relaxed),
            2
        );
        assert_eq!(d.state().plugged_size.load(Ordering::Relaxed), 0);
        assert_eq!(file_size(&mem), 0, "nothing was plugged");
    }

    /// A device with blocks 0..3 of the window plugged, and a map of
    /// memory that includes them.
    fn plugged(
        mem: &Arc<GuestMem>,
    ) -> (
        VirtioMem,
        vm_memory::GuestMemoryLoadGuard<guest_mem::GuestMemoryMap>,
    ) {
        let mut d = device(mem);
        d.state().requested_size.store(8 * MIB, Ordering::Relaxed);
        assert_eq!(ask(&mut d, req::PLUG, 0, 3).0, resp::ACK);
        (d, mem.memory().memory())
    }

    fn run_request(
        d: &mut VirtioMem,
        mem: &Arc<GuestMem>,
        ram: &guest_mem::GuestMemoryMap,
        queue_at: u64,
        r: MemRequest,
        resp_at: u64,
    ) -> u32 {
        let q = MockSplitQueue::create(ram, GuestAddress(queue_at), 16);
        let mut queue: Queue = q.create_queue().unwrap();
        queue.set_ready(true);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        d.activate(mem.device_memory(), irq, vec![queue]).unwrap();
        let req_at = 4 * MIB;
        ram.write_obj(r, GuestAddress(req_at)).unwrap();
        q.build_desc_chain(&[desc(req_at, 24, 1, 1), desc(resp_at, 10, 2, 0)])
            .unwrap();
        d.process_queue(0);
        let refused = d
            .state()
            .counters
            .self_unplug_refused
            .load(Ordering::Relaxed);
        d.reset();
        refused as u32
    }

    /// The guest puts the answer to an unplug in the very block it unplugs
    /// (the window's tail, so the file would be truncated under the
    /// write): the device answers ERROR and keeps the block, instead of
    /// writing past the end of the file (SIGBUS).
    #[test]
    fn unplugging_the_block_that_holds_the_answer_is_refused() {
        let mem = memory();
        let (mut d, ram) = plugged(&mem);
        let resp_at = block(2) + 4096;
        let refused = run_request(
            &mut d,
            &mem,
            &ram,
            MIB,
            MemRequest::new(req::UNPLUG, block(2), 1),
            resp_at,
        );
        assert_eq!(refused, 1);
        let r: MemResponse = ram.read_obj(GuestAddress(resp_at)).unwrap();
        assert_eq!(r.kind, resp::ERROR);
        assert_eq!(file_size(&mem), 3 * BLOCK_SIZE, "nothing unplugged");
        assert_eq!(
            d.state().plugged_size.load(Ordering::Relaxed),
            3 * BLOCK_SIZE
        );
        // UNPLUG_ALL takes the whole window, answer included.
        let refused = run_request(
            &mut d,
            &mem,
            &ram,
            MIB,
            MemRequest::new(req::UNPLUG_ALL, 0, 0),
            resp_at,
        );
        assert_eq!(refused, 2);
        assert_eq!(file_size(&mem), 3 * BLOCK_SIZE);
        // Unplugging another block, with the answer in boot RAM, works.
        run_request(
            &mut d,
            &mem,
            &ram,
            MIB,
            MemRequest::new(req::UNPLUG, block(2), 1),
            5 * MIB,
        );
        let r: MemResponse = ram.read_obj(GuestAddress(5 * MIB)).unwrap();
        assert_eq!(r.kind, resp::ACK);
        assert_eq!(file_size(&mem), 2 * BLOCK_SIZE);
    }

    /// The same with the queue's rings in the block being unplugged.
    #[test]
    fn unplugging_the_block_that_holds_the_queue_is_refused() {
        let mem = memory();
        let (mut d, ram) = plugged(&mem);
        let refused = run_request(
            &mut d,
            &mem,
            &ram,
            block(2),
            MemRequest::new(req::UNPLUG, block(2), 1),
            5 * MIB,
        );
        assert_eq!(refused, 1);
        let r: MemResponse = ram.read_obj(GuestAddress(5 * MIB)).unwrap();
        assert_eq!(r.kind, resp::ERROR);
        assert_eq!(file_size(&mem), 3 * BLOCK_SIZE);
    }

    /// One notification serves at most a queue's worth of chains: a
    /// driver that keeps the ring full gets the rest on later turns.
    #[test]
    fn one_notification_serves_a_bounded_number_of_requests() {
        let mem = memory();
        let ram_guard = mem.memory().memory();
        let ram = &*ram_guard;
        let mut d = device(&mem);
        // The rings laid out by hand (the mock's overlap past 8 entries).
        let (table, avail, used) = (MIB, MIB + 0x1000, MIB + 0x2000);
        let mut queue = Queue::new(16).unwrap();
        queue.set_desc_table_address(Some(table as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        d.activate(mem.device_memory(), irq, vec![queue]).unwrap();
        let req_at = 4 * MIB;
        ram.write_obj(
            MemRequest::new(req::STATE, block(0), 1),
            GuestAddress(req_at),
        )
        .unwrap();
        ram.write_obj(SplitDescriptor::new(req_at, 24, 1, 1), GuestAddress(table))
            .unwrap();
        ram.write_obj(
            SplitDescriptor::new(5 * MIB, 10, 2, 0),
            GuestAddress(table + 16),
        )
        .unwrap();
        // Every slot of the avail ring names the same chain, twice over.
        let used_idx = || ram.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
        for round in 1..=2u16 {
            ram.write_obj(16 * round, GuestAddress(avail + 2)).unwrap();
            assert_eq!(d.process_queue(0), Progress::MoreWork);
            assert_eq!(used_idx(), 16 * round, "a queue's worth");
        }
        assert_eq!(d.process_queue(0), Progress::Done);
        assert_eq!(used_idx(), 32);
        assert_eq!(
            d.state().counters.rejected_chains.load(Ordering::Relaxed),
            0
        );
    }
}
