//! Device accesses of guest memory against shrinks on another thread: a
//! device holding a snapshot never touches memory past a truncated file's
//! end (which would raise SIGBUS and end the whole process).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{Error, GuestMem, RegionConfig};

const MIB: u64 = 1 << 20;
const BASE: u64 = common::WINDOW_BASE;

fn window(fault_kernel: bool) -> Arc<GuestMem> {
    let mut w = RegionConfig::new(BASE, 8 * MIB);
    w.max_size = Some(8 * MIB);
    let mut b = GuestMem::builder().region(w);
    if fault_kernel {
        b = b.fault_config(guest_mem::FaultConfig {
            mode: guest_mem::FaultMode::Kernel,
            ..Default::default()
        });
    }
    Arc::new(b.build().unwrap())
}

#[test]
fn a_shrink_waits_for_the_device_access_in_progress() {
    let mem = window(false);
    let devices = mem.device_memory();
    let tail = GuestAddress(BASE + 7 * MIB);
    devices.memory().write_obj(0x5au8, tail).unwrap();

    let guard = devices.memory();
    let done = Arc::new(AtomicBool::new(false));
    let shrinker = {
        let (mem, done) = (mem.clone(), done.clone());
        std::thread::spawn(move || {
            mem.resize(guest_mem::RegionIndex(0), 4 * MIB).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !done.load(Ordering::SeqCst),
        "the tail was truncated while a device held the memory"
    );
    // Still mapped and backed: this read would SIGBUS after a truncation.
    assert_eq!(guard.read_obj::<u8>(tail).unwrap(), 0x5a);
    drop(guard);
    shrinker.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert!(
        devices.memory().read_obj::<u8>(tail).is_err(),
        "a new snapshot no longer reaches the tail"
    );
    assert_eq!(mem.regions()[0].backed_size(), 4 * MIB);
}

#[test]
fn a_thread_holding_memory_cannot_shrink_it_under_itself() {
    let mem = window(false);
    let devices = mem.device_memory();
    let guard = devices.memory();
    let nested = devices.memory(); // re-entrant: no wait
    assert!(matches!(
        mem.resize(guest_mem::RegionIndex(0), 2 * MIB),
        Err(Error::MemoryInUse)
    ));
    drop(nested);
    drop(guard);
    mem.resize(guest_mem::RegionIndex(0), 2 * MIB).unwrap();
    // Growing never waits and never refuses.
    let _g = devices.memory();
    mem.resize(guest_mem::RegionIndex(0), 6 * MIB).unwrap();
}

/// Devices on two threads read and write the window's tail in a loop while
/// a third shrinks and grows it: every access succeeds or is refused, none
/// faults. With kernel faults as well as userfaultfd.
#[test]
fn device_accesses_never_fault_past_a_truncation() {
    for kernel in [false, true] {
        let mem = window(kernel);
        let devices = mem.device_memory();
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (tx, rx) = mpsc::channel();
        let workers: Vec<_> = (0..2)
            .map(|t| {
                let (devices, stop, ok, refused, tx) = (
                    devices.clone(),
                    stop.clone(),
                    ok.clone(),
                    refused.clone(),
                    tx.clone(),
                );
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let m = devices.memory();
                        let at = GuestAddress(BASE + 4 * MIB + (i * 4096 + t * 64) % (4 * MIB));
                        match m.write_obj(i, at).and_then(|()| m.read_obj::<u64>(at)) {
                            Ok(v) => {
                                assert_eq!(v, i);
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        i += 1;
                        if i == 1 {
                            let _ = tx.send(());
                        }
                    }
                })
            })
            .collect();
        rx.recv().unwrap();
        rx.recv().unwrap();
        for round in 0..300 {
            let size = if round % 2 == 0 { 4 * MIB } else { 8 * MIB };
            mem.resize(guest_mem::RegionIndex(0), size).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert!(ok.load(Ordering::Relaxed) > 0);
        assert!(mem.stats().shrinks >= 150);
    }
}

/// A hotplug window reaches devices only where blocks are plugged: the
/// holes below the highest plugged block stay out of the memory map, so
/// nothing the VMM does can make the host back them.
#[test]
fn unplugged_parts_of_a_window_are_out_of_reach() {
    use guest_mem::backend::HotplugRegion;
    let mem = common::ram_and_window(8 * MIB);
    let window = HotplugRegion::new(mem.clone(), guest_mem::RegionIndex(1)).unwrap();
    // Plug the block at 6 MiB only: the file reaches past 0-6 MiB.
    window.set_backed_size(8 * MIB).unwrap();
    window.set_plugged(6 * MIB, 2 * MIB, true).unwrap();
    assert_eq!(
        mem.accessible_extents(guest_mem::RegionIndex(1)),
        vec![(6 * MIB, 2 * MIB)]
    );
    let devices = mem.device_memory();
    let m = devices.memory();
    m.write_obj(7u64, GuestAddress(BASE + 6 * MIB)).unwrap();
    for gap in [0, 2 * MIB, 4 * MIB + 4096] {
        assert!(
            m.write_obj(1u64, GuestAddress(BASE + gap)).is_err(),
            "{gap:#x}"
        );
        assert!(
            m.read_obj::<u64>(GuestAddress(BASE + gap)).is_err(),
            "{gap:#x}"
        );
    }
    drop(m);
    assert!(
        window.allocated_bytes() <= 2 * MIB,
        "only the plugged block is backed"
    );
    // Plugging another block and unplugging the first.
    window.set_plugged(0, 2 * MIB, true).unwrap();
    window.set_plugged(6 * MIB, 2 * MIB, false).unwrap();
    assert_eq!(
        mem.accessible_extents(guest_mem::RegionIndex(1)),
        vec![(0, 2 * MIB)]
    );
    assert!(devices
        .memory()
        .read_obj::<u64>(GuestAddress(BASE + 6 * MIB))
        .is_err());
    // Taking memory out of reach waits for device accesses, like a shrink.
    let _g = devices.memory();
    assert!(matches!(
        window.set_plugged(0, 2 * MIB, false),
        Err(Error::MemoryInUse)
    ));
}
