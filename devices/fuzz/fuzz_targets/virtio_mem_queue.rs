//! Fuzzes virtio-mem's request queue: the input sets the requested size and
//! the queue's size and ring addresses (in boot RAM or in the hotplug
//! window), then runs a script of steps: writes of raw bytes, descriptors,
//! requests (PLUG, UNPLUG, UNPLUG_ALL, STATE or unknown, at any address and
//! count) and avail-ring entries into guest memory, notifications, changes
//! of the requested size, device resets and re-activations. After every
//! step the device's accounting must agree with its own block states and
//! with the window's backing file, and every plugged block must be
//! reachable through the devices' memory map.
#![no_main]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use devices::virtio::mem::{req, resp, state, MemRequest, VirtioMem, BLOCK_SIZE};
use devices::virtio::{Interrupt, VirtioDevice};
use devices_fuzz::Input;
use guest_mem::backend::HotplugRegion;
use guest_mem::{GuestMem, RegionConfig};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
/// Boot RAM at [0, 1 MiB): where the rings and requests usually live.
const RAM: u64 = MIB;
/// The hotplug window: 64 MiB (32 blocks) at 64 MiB, nothing plugged.
const WINDOW: u64 = 64 * MIB;
const WINDOW_SIZE: u64 = 64 * MIB;
const BLOCKS: u64 = WINDOW_SIZE / BLOCK_SIZE;
/// Steps per input: enough for several notifications, bounded for speed.
const MAX_STEPS: usize = 64;

/// A guest address: mostly boot RAM or inside the window's blocks
/// (plugged or not), sometimes anything at all.
fn gpa(inp: &mut Input) -> u64 {
    match inp.u8() % 8 {
        0..=2 => u64::from(inp.u16()),
        3..=5 => u64::from(inp.u16()) * 16,
        6 => block_addr(inp) + u64::from(inp.u16()) * 16,
        _ => inp.u64(),
    }
}

/// A block's address, from two blocks before the window to two past.
fn block_addr(inp: &mut Input) -> u64 {
    (WINDOW - 2 * BLOCK_SIZE) + u64::from(inp.u8()) % (BLOCKS + 4) * BLOCK_SIZE
}

/// A request's address: mostly block-aligned, sometimes not.
fn request_addr(inp: &mut Input) -> u64 {
    match inp.u8() % 8 {
        0 => block_addr(inp) + u64::from(inp.u16()),
        1 => inp.u64(),
        _ => block_addr(inp),
    }
}

/// A size for the host to request: whole blocks up to a little past the
/// window, or any value.
fn requested_size(inp: &mut Input) -> u64 {
    match inp.u8() {
        0xff => inp.u64(),
        b => u64::from(b) % (BLOCKS + 4) * BLOCK_SIZE,
    }
}

/// A ring address aligned as virtio wants it, mostly in boot RAM,
/// sometimes (the top two bits set) at the start of the window.
fn ring_addr(inp: &mut Input, align: u64) -> u64 {
    let v = inp.u16();
    let off = u64::from(v & 0x3fff) * align;
    if v & 0xc000 != 0xc000 {
        off
    } else {
        WINDOW + off
    }
}

/// A descriptor index: mostly inside a queue of `size`, sometimes any.
fn index(inp: &mut Input, size: u16) -> u8 {
    match inp.u8() {
        i @ 0xf0.. => i,
        i => (u16::from(i) % size) as u8,
    }
}

/// A queue as the driver set it up (copied into every activation).
#[derive(Clone, Copy)]
struct QueueSetup {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
}

impl QueueSetup {
    fn read(inp: &mut Input) -> Self {
        let flags = inp.u8();
        // Mostly a power of two up to the device's 128, sometimes anything
        // (virtio-queue keeps its maximum for a size it refuses).
        let size = if flags & 2 == 0 {
            1 << (inp.u8() % 8)
        } else {
            inp.u16()
        };
        // The size the queue ends up with, which the driver's pushes wrap at.
        let mut probe = Queue::new(128).expect("queue");
        probe.set_size(size);
        QueueSetup {
            size: probe.size(),
            desc: ring_addr(inp, 16),
            avail: ring_addr(inp, 2),
            used: ring_addr(inp, 4),
            event_idx: flags & 1 != 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(128).expect("queue");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(self.event_idx);
        q.set_ready(true);
        q
    }
}

/// Writes through the memory map as it is now; a write to memory that is
/// not plugged just fails, as a guest's would fault.
fn write(mem: &GuestMem, gpa: u64, bytes: &[u8]) {
    let _ = mem.memory().memory().write_slice(bytes, GuestAddress(gpa));
}

/// A descriptor written into the table of `q` (anywhere the index says,
/// in range or not).
fn write_desc(
    mem: &GuestMem,
    q: &QueueSetup,
    index: u8,
    addr: u64,
    len: u32,
    flags: u16,
    next: u8,
) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&u16::from(next).to_le_bytes());
    write(mem, q.desc + u64::from(index) * 16, &d);
}

/// Publishes a chain head in the avail ring, as the driver does.
fn push(mem: &GuestMem, q: &QueueSetup, avail_idx: &mut u16, head: u8) {
    let slot = u64::from(*avail_idx % q.size);
    write(mem, q.avail + 4 + 2 * slot, &u16::from(head).to_le_bytes());
    *avail_idx = avail_idx.wrapping_add(1);
    write(mem, q.avail + 2, &avail_idx.to_le_bytes());
}

/// A request of any kind (four known, one not) for any range.
fn request(inp: &mut Input) -> MemRequest {
    let kind = u16::from(inp.u8() % 5);
    let addr = request_addr(inp);
    let nb = match inp.u8() {
        0xff => inp.u16(),
        b => u16::from(b % 40),
    };
    MemRequest::new(kind, addr, nb)
}

fn block_state(dev: &mut VirtioMem, i: u64) -> u16 {
    let r = dev.handle(&MemRequest::new(req::STATE, WINDOW + i * BLOCK_SIZE, 1));
    assert_eq!(r.kind, resp::ACK, "STATE of block {i}");
    r.state
}

/// What must hold between any two steps.
fn check(dev: &mut VirtioMem, mem: &GuestMem) {
    let plugged = dev.state().plugged_size.load(Ordering::Relaxed);
    assert!(
        plugged % BLOCK_SIZE == 0 && plugged <= WINDOW_SIZE,
        "plugged_size {plugged:#x}"
    );
    let region = &mem.regions()[1];
    let file = region.backing().size();
    assert!(
        file % BLOCK_SIZE == 0 && file <= WINDOW_SIZE,
        "window file size {file:#x}"
    );
    let mut count = 0;
    let mut end = 0;
    let map = mem.memory().memory();
    for i in 0..BLOCKS {
        let block = GuestAddress(WINDOW + i * BLOCK_SIZE);
        let last = GuestAddress(block.0 + BLOCK_SIZE - 1);
        match block_state(dev, i) {
            state::PLUGGED => {
                count += 1;
                end = (i + 1) * BLOCK_SIZE;
                // A plugged block is memory the guest and devices can use.
                assert!(
                    map.read_obj::<u8>(block).is_ok() && map.read_obj::<u8>(last).is_ok(),
                    "plugged block {i} is not in the memory map"
                );
            }
            state::UNPLUGGED => {}
            s => panic!("block {i} in state {s}"),
        }
    }
    assert_eq!(
        count * BLOCK_SIZE,
        plugged,
        "plugged_size disagrees with the blocks' states"
    );
    // Plugs grow the file to their end; unplugs truncate it to the last
    // plugged block: the file ends exactly there.
    assert_eq!(
        file, end,
        "window file size against the last plugged block's end"
    );
    assert_eq!(region.backed_size(), file);
    // Past the file's end nothing is mapped: reads fail, never fault.
    if end < WINDOW_SIZE {
        assert!(map.read_obj::<u8>(GuestAddress(WINDOW + end)).is_err());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mut hotplug = RegionConfig::new(WINDOW, 0);
    hotplug.max_size = Some(WINDOW_SIZE);
    let mem = Arc::new(
        GuestMem::builder()
            .region(RegionConfig::new(0, RAM))
            .region(hotplug)
            .build()
            .expect("guest memory"),
    );
    let mut dev = VirtioMem::new(Arc::new(
        HotplugRegion::new(mem.clone(), guest_mem::RegionIndex(1)).expect("hotplug window"),
    ))
    .expect("virtio-mem");
    let st = dev.state();
    st.request(requested_size(&mut inp));
    let mut q = QueueSetup::read(&mut inp);
    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    dev.ack_features(dev.features());
    dev.activate(mem.device_memory(), irq.clone(), vec![q.queue()])
        .expect("a ready queue activates");
    // The driver's avail index, as pushes advance it.
    let mut avail_idx = 0u16;
    check(&mut dev, &mem);

    for _ in 0..MAX_STEPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 10 {
            0 => {
                let at = gpa(&mut inp);
                let n = usize::from(inp.u8());
                write(&mem, at, inp.bytes(n));
            }
            1 => {
                let index = inp.u8();
                let (addr, len, flags, next) = (gpa(&mut inp), inp.u8(), inp.u8() & 7, inp.u8());
                write_desc(
                    &mem,
                    &q,
                    index,
                    addr,
                    u32::from(len),
                    u16::from(flags),
                    next,
                );
            }
            2 => {
                let at = gpa(&mut inp);
                let r = request(&mut inp);
                let _ = mem.memory().memory().write_obj(r, GuestAddress(at));
            }
            3 => {
                let head = inp.u8();
                push(&mem, &q, &mut avail_idx, head);
            }
            4 => {
                avail_idx = inp.u16();
                write(&mem, q.avail + 2, &avail_idx.to_le_bytes());
            }
            5 => {
                let before = st.plugged_size.load(Ordering::Relaxed);
                let requested = st.requested_size.load(Ordering::Relaxed);
                dev.process_queue(usize::from(inp.u8() % 2));
                let after = st.plugged_size.load(Ordering::Relaxed);
                assert!(
                    after <= before.max(requested),
                    "plugged {after:#x} past the request {requested:#x} (was {before:#x})"
                );
            }
            6 => st.request(requested_size(&mut inp)),
            7 => {
                // Reset; the driver sets the queue up again, maybe elsewhere.
                dev.reset();
                dev.process_queue(0);
                q = QueueSetup::read(&mut inp);
                avail_idx = 0;
                dev.activate(mem.device_memory(), irq.clone(), vec![q.queue()])
                    .expect("a ready queue activates");
            }
            8 => {
                // Config space: any offset and length; writes are ignored.
                let offset = u64::from(inp.u8());
                let mut c = vec![0u8; usize::from(inp.u8() % 65)];
                dev.read_config(offset, &mut c);
                dev.write_config(offset, &c);
            }
            _ => {
                // A whole chain as Linux sends it (request, then room for
                // the answer), published; a quarter of them have parts
                // spoiled, as `bend`'s low bits say.
                let (i, j) = (index(&mut inp, q.size), index(&mut inp, q.size));
                let bend = match inp.u8() {
                    b @ 0xc0.. => b,
                    _ => 0,
                };
                let (req_at, resp_at) = (gpa(&mut inp), gpa(&mut inp));
                let r = request(&mut inp);
                let _ = mem.memory().memory().write_obj(r, GuestAddress(req_at));
                let req_len = if bend & 1 == 0 {
                    24
                } else {
                    u32::from(inp.u8())
                };
                let resp_len = if bend & 2 == 0 {
                    10
                } else {
                    u32::from(inp.u8())
                };
                let req_flags = if bend & 4 == 0 {
                    1
                } else {
                    u16::from(inp.u8() & 7)
                };
                let resp_flags = if bend & 8 == 0 {
                    2
                } else {
                    u16::from(inp.u8() & 7)
                };
                write_desc(&mem, &q, i, req_at, req_len, req_flags, j);
                write_desc(&mem, &q, j, resp_at, resp_len, resp_flags, inp.u8());
                push(&mem, &q, &mut avail_idx, i);
            }
        }
        check(&mut dev, &mem);
    }
});
