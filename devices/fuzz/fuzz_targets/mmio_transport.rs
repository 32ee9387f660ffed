//! Fuzzes the virtio-mmio transport in front of a balloon, as a vCPU
//! reaches it: a script of register reads and writes at any offset below
//! 0x200 with 1-, 2-, 4- and 8-byte accesses (aligned or not), mixed with
//! the steps a driver takes (status changes in and out of order, feature
//! negotiation, queue setup, notifications, interrupt acks, config space,
//! resets) and with writes of guest RAM, so that the queues may point at
//! fuzzer-made rings. The properties: no panic, the status register holds
//! only the bits the spec defines, the device runs exactly when DRIVER_OK
//! took, and the identification registers never change.
#![no_main]

use std::sync::Arc;

use devices::bus::BusDevice;
use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::mmio::{status, MmioTransport};
use devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use devices_fuzz::Input;
use guest_mem::{GuestMem, RegionConfig};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM: 16 MiB at 0.
const RAM: u64 = 16 << 20;
/// Steps per input, bounded for speed.
const MAX_STEPS: usize = 128;
/// The balloon's queues; the transport is asked about one more.
const QUEUES: u32 = 4;

/// Register offsets (virtio 1.x, 4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;

    /// Every register, for picking one.
    pub const ALL: [u64; 22] = [
        MAGIC,
        VERSION,
        DEVICE_ID,
        DEVICE_FEATURES,
        DEVICE_FEATURES_SEL,
        DRIVER_FEATURES,
        DRIVER_FEATURES_SEL,
        QUEUE_SEL,
        QUEUE_NUM_MAX,
        QUEUE_NUM,
        QUEUE_READY,
        QUEUE_NOTIFY,
        INTERRUPT_STATUS,
        INTERRUPT_ACK,
        STATUS,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
        CONFIG_GENERATION,
    ];
}

const MAGIC: u32 = 0x7472_6976;
/// The status bits virtio 1.x defines (2.1).
const DEFINED_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::FEATURES_OK
    | status::DRIVER_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;
/// The status bits in the order a driver sets them.
const ORDER: [u32; 4] = [
    status::ACKNOWLEDGE,
    status::DRIVER,
    status::FEATURES_OK,
    status::DRIVER_OK,
];

/// A ring address aligned as virtio wants it, in the first MiB of RAM
/// (where the script writes), or any 32-bit value.
fn ring_addr(inp: &mut Input, align: u64) -> u32 {
    match inp.u8() {
        0xff => inp.u32(),
        _ => (u64::from(inp.u16()) * align % (1 << 20)) as u32,
    }
}

/// A register access through the bus interface, as a trapped MMIO exit
/// delivers it.
fn read(t: &mut MmioTransport, offset: u64, len: usize) -> [u8; 8] {
    let mut data = [0xa5u8; 8];
    t.read(offset, &mut data[..len]);
    data
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let d = read(t, offset, 4);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// What the script's driver remembers of a queue it set up, to publish
/// chains there.
#[derive(Clone, Copy, Default)]
struct Ring {
    desc: u64,
    avail: u64,
    size: u16,
    idx: u16,
}

/// Sets up queue `q` through its registers with fuzzer-chosen size and
/// rings, as a driver does between FEATURES_OK and DRIVER_OK (and at any
/// other time, when the transport must refuse it).
fn setup_queue(t: &mut MmioTransport, inp: &mut Input, rings: &mut [Ring], q: u32) {
    let size = match inp.u8() {
        0xff => u32::from(inp.u16()),
        b => 1 << (b % 9),
    };
    let (desc, drv, dev) = (ring_addr(inp, 16), ring_addr(inp, 2), ring_addr(inp, 4));
    write32(t, reg::QUEUE_SEL, q);
    read32(t, reg::QUEUE_NUM_MAX);
    write32(t, reg::QUEUE_NUM, size);
    write32(t, reg::QUEUE_DESC_LOW, desc);
    write32(t, reg::QUEUE_DESC_HIGH, 0);
    write32(t, reg::QUEUE_DRIVER_LOW, drv);
    write32(t, reg::QUEUE_DRIVER_HIGH, 0);
    write32(t, reg::QUEUE_DEVICE_LOW, dev);
    write32(t, reg::QUEUE_DEVICE_HIGH, 0);
    write32(t, reg::QUEUE_READY, u32::from(inp.u8() != 0xff));
    if let Some(r) = rings.get_mut(q as usize) {
        *r = Ring {
            desc: u64::from(desc),
            avail: u64::from(drv),
            size: size.clamp(1, 256) as u16,
            idx: 0,
        };
    }
}

/// Writes the driver's feature bits: what is offered, some of it, or
/// anything.
fn negotiate(t: &mut MmioTransport, inp: &mut Input, offered: u64) {
    let features = match inp.u8() % 4 {
        0 | 1 => offered,
        2 => offered & (u64::from(inp.u32()) << 32 | u64::from(inp.u32())),
        _ => u64::from(inp.u32()) << 32 | u64::from(inp.u32()),
    };
    for half in 0..2 {
        write32(t, reg::DEVICE_FEATURES_SEL, half);
        read32(t, reg::DEVICE_FEATURES);
        write32(t, reg::DRIVER_FEATURES_SEL, half);
        write32(t, reg::DRIVER_FEATURES, (features >> (32 * half)) as u32);
    }
}

/// What must hold between any two accesses.
fn check(t: &mut MmioTransport, irq: &Interrupt) {
    let s = t.status();
    assert_eq!(s & !DEFINED_STATUS, 0, "status {s:#x}");
    assert_eq!(read32(t, reg::STATUS), s, "the register shows the status");
    assert_eq!(read32(t, reg::MAGIC), MAGIC);
    assert_eq!(read32(t, reg::VERSION), 2);
    assert_eq!(read32(t, reg::DEVICE_ID), 5, "a balloon");
    // DRIVER_OK activates, and a failed activation sets NEEDS_RESET;
    // only a reset clears either.
    assert_eq!(
        t.is_activated(),
        s & status::DRIVER_OK != 0 && s & status::DEVICE_NEEDS_RESET == 0,
        "activated in status {s:#x}"
    );
    if s & status::FEATURES_OK == 0 {
        assert!(!t.is_activated(), "running without FEATURES_OK");
    }
    let i = irq.status();
    assert_eq!(
        i & !(Interrupt::VRING | Interrupt::CONFIG),
        0,
        "interrupt {i:#x}"
    );
    assert_eq!(read32(t, reg::INTERRUPT_STATUS), i);
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mem = Arc::new(
        GuestMem::builder()
            .region(RegionConfig::new(0, RAM))
            .build()
            .expect("guest memory"),
    );
    let flags = inp.u8();
    let config = BalloonConfig {
        deflate_on_oom: flags & 1 != 0,
        free_page_reporting: flags & 2 != 0,
    };
    let balloon = Balloon::new(mem.clone(), config);
    let balloon_state = balloon.state();
    let offered = balloon.features() | 1 << VIRTIO_F_VERSION_1;
    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    let mut t = MmioTransport::new(Box::new(balloon), mem.device_memory(), irq.clone());
    // Work cut at a notification's budget is continued through these.
    let notify_evts = (0..QUEUES)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    t.set_notify_events(notify_evts);
    let mut rings = [Ring::default(); QUEUES as usize];
    check(&mut t, &irq);

    for _ in 0..MAX_STEPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 14 {
            0 => {
                // Any access below 0x200, any size, aligned or not.
                let offset = u64::from(inp.u16() % 0x200);
                let len = [1, 2, 4, 8][usize::from(inp.u8() % 4)];
                if inp.u8() & 1 == 0 {
                    let d = read(&mut t, offset, len);
                    if offset < reg::CONFIG && (len != 4 || offset % 4 != 0) {
                        assert!(
                            d[..len].iter().all(|&b| b == 0),
                            "{len}-byte read at {offset:#x} gave {d:?}"
                        );
                    }
                } else {
                    t.write(offset, inp.bytes(len));
                }
            }
            1 => {
                let r = reg::ALL[usize::from(inp.u8()) % reg::ALL.len()];
                let v = inp.u32();
                write32(&mut t, r, v);
            }
            2 => {
                let r = reg::ALL[usize::from(inp.u8()) % reg::ALL.len()];
                read32(&mut t, r);
            }
            3 => {
                // A status write: the next bit in order, a reset, FAILED,
                // or anything.
                let s = t.status();
                let v = match inp.u8() % 8 {
                    0..=3 => ORDER.iter().find(|&&b| s & b == 0).map_or(s, |&b| s | b),
                    4 => 0,
                    5 => s | status::FAILED,
                    _ => inp.u32(),
                };
                write32(&mut t, reg::STATUS, v);
                if v == 0 {
                    assert_eq!(t.status(), 0, "a reset clears the status");
                    assert!(!t.is_activated());
                    assert_eq!(irq.status(), 0, "a reset clears the interrupt");
                }
            }
            4 => negotiate(&mut t, &mut inp, offered),
            5 => {
                let q = u32::from(inp.u8()) % (QUEUES + 1);
                setup_queue(&mut t, &mut inp, &mut rings, q);
            }
            6 => {
                // The whole initialization Linux does: reset, ACKNOWLEDGE,
                // DRIVER, features, FEATURES_OK, the queues, DRIVER_OK.
                write32(&mut t, reg::STATUS, 0);
                let mut s = 0;
                for bit in &ORDER[..3] {
                    s |= bit;
                    if *bit == status::FEATURES_OK {
                        negotiate(&mut t, &mut inp, offered);
                    }
                    write32(&mut t, reg::STATUS, s);
                }
                for q in 0..u32::from(inp.u8() % (QUEUES as u8 + 1)) {
                    setup_queue(&mut t, &mut inp, &mut rings, q);
                }
                write32(&mut t, reg::STATUS, s | status::DRIVER_OK);
            }
            7 => {
                let at = u64::from(inp.u16()) * 16;
                let n = usize::from(inp.u8());
                let _ = mem
                    .memory()
                    .memory()
                    .write_slice(inp.bytes(n), GuestAddress(at));
            }
            8 => {
                // A descriptor in a queue's table: a PFN array or a stats
                // buffer in the first MiB, or anywhere.
                let r = rings[usize::from(inp.u8()) % QUEUES as usize];
                let index = u64::from(inp.u8());
                let addr = match inp.u8() {
                    0xff => u64::from(inp.u32()) << 32 | u64::from(inp.u32()),
                    _ => u64::from(inp.u16()) * 16,
                };
                let (len, flags, next) = (inp.u16(), inp.u8() & 7, inp.u8());
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&u32::from(len).to_le_bytes());
                d[12..14].copy_from_slice(&u16::from(flags).to_le_bytes());
                d[14..16].copy_from_slice(&u16::from(next).to_le_bytes());
                let _ = mem
                    .memory()
                    .memory()
                    .write_slice(&d, GuestAddress(r.desc + index * 16));
            }
            9 => {
                // Publishes a chain head on a queue the script set up.
                let r = &mut rings[usize::from(inp.u8()) % QUEUES as usize];
                let head = u16::from(inp.u8());
                let slot = u64::from(r.idx % r.size.max(1));
                r.idx = r.idx.wrapping_add(1);
                let m = mem.memory().memory();
                let _ = m.write_obj(head, GuestAddress(r.avail + 4 + 2 * slot));
                let _ = m.write_obj(r.idx, GuestAddress(r.avail + 2));
            }
            10 => {
                let q = u32::from(inp.u8() % (QUEUES as u8 + 2));
                write32(&mut t, reg::QUEUE_NOTIFY, q);
            }
            11 => {
                let v = u32::from(inp.u8() % 4);
                write32(&mut t, reg::INTERRUPT_ACK, v);
            }
            12 => {
                // Config space: `num_pages`, `actual`, `poison_val` and
                // past the end.
                let offset = reg::CONFIG + u64::from(inp.u8() % 0x20);
                let len = [1, 2, 4, 8][usize::from(inp.u8() % 4)];
                if inp.u8() & 1 == 0 {
                    read(&mut t, offset, len);
                } else {
                    t.write(offset, inp.bytes(len));
                }
            }
            _ => {
                // The host changes the target or wants statistics.
                if inp.u8() & 1 == 0 {
                    balloon_state.set_target(inp.u32());
                    t.config_changed();
                } else {
                    t.refresh();
                }
            }
        }
        check(&mut t, &irq);
    }
});
