//! Each backing kind serves faults and discards as it should: memfd, a file
//! on tmpfs, private mappings, MINOR faults over a file that already holds
//! contents, and a fault whose page is truncated away before it is served.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use common::*;
use guest_mem::backing::{BackingFile, BackingKind};
use guest_mem::vm_memory::GuestAddress;
use guest_mem::{Backing, FaultConfig, GuestMem, Readahead, RegionConfig};

#[test]
fn a_file_on_tmpfs_is_fault_managed() {
    let path =
        std::path::Path::new("/dev/shm").join(format!("guest-mem-test-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut rc = RegionConfig::new(0, 64 * PAGE);
    rc.backing = Backing::File(path.clone());
    let mem = GuestMem::builder().region(rc).build().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(mem.regions()[0].backing().kind(), BackingKind::Tmpfs);
    assert!(mem.userfault_enabled());
    assert_eq!(read_page(&mem, 3), 0);
    assert!(mem.stats().faults >= 1);
    assert!(page_has_data(&mem, 3));
    mem.discard(GuestAddress(3 * PAGE), PAGE).unwrap();
    assert!(!page_has_data(&mem, 3));
}

#[test]
fn discard_returns_memory_to_the_host() {
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 1024 * PAGE))
        .build()
        .unwrap();
    for p in 0..1024 {
        write_page(&mem, p, p + 1);
    }
    let before = mem.allocated_bytes();
    assert!(before >= 1024 * PAGE, "all pages allocated: {before}");
    mem.discard(GuestAddress(0), 512 * PAGE).unwrap();
    let after = mem.allocated_bytes();
    assert_eq!(before - after, 512 * PAGE, "half returned");
    assert_eq!(read_page(&mem, 10), 0);
    assert_eq!(read_page(&mem, 600), 601);
    let s = mem.stats();
    assert_eq!((s.discards, s.bytes_discarded), (1, 512 * PAGE));
}

#[test]
fn minor_faults_map_what_the_file_already_holds() {
    let file = Arc::new(BackingFile::memfd("minor", 64 * PAGE).unwrap());
    // Contents written before the memory is mapped: a file that survives a
    // VMM restart, or one prepared by another process.
    for p in (0..64).step_by(2) {
        file.file()
            .write_at(&pattern_word(p).to_le_bytes(), p * PAGE)
            .unwrap();
    }
    let mut rc = RegionConfig::new(0, 64 * PAGE);
    rc.backing = Backing::Shared { file, offset: 0 };
    let mem = GuestMem::builder()
        .region(rc)
        .fault_config(FaultConfig {
            minor_faults: true,
            readahead: Readahead::NONE,
            ..FaultConfig::default()
        })
        .build()
        .unwrap();
    for p in 0..64 {
        let want = if p % 2 == 0 { pattern_word(p) } else { 0 };
        assert_eq!(read_page(&mem, p), want, "page {p}");
    }
    let s = mem.stats();
    assert_eq!(s.minor_faults, 32, "{s}");
    assert_eq!(s.installs_continue, 32);
    assert_eq!(s.installs_zero, 32);
}

/// SIGBUS recovery for the out-of-range test: record the address and map a
/// private zero page over it so the faulting read can finish.
static SIGBUS_ADDR: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as u64 & !(PAGE - 1);
    SIGBUS_ADDR.store(addr, Ordering::SeqCst);
    // SAFETY: mmap is async-signal-safe; MAP_FIXED replaces exactly the one
    // page of the test's own guest mapping that faulted, which the test
    // never uses again except through this read.
    unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
    }
}

#[test]
fn a_fault_truncated_away_is_reported_not_left_hanging() {
    // SAFETY: installs a SIGBUS handler for this test binary; the handler
    // only stores an atomic and calls mmap.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
    }
    let (src, gate) = GatedSource::new(Box::new(PatternSource { len: 64 * PAGE }), 40 * PAGE);
    let mem = Arc::new(memory(64, src, false, config(Readahead::NONE, false)));
    let (done_tx, done_rx) = mpsc::channel();
    {
        let mem = mem.clone();
        thread::spawn(move || {
            let addr = mem.regions()[0].host_addr() + 40 * PAGE;
            // SAFETY: addr lies in the region's mapping; the read may fault
            // (served, or SIGBUS recovered by the handler above).
            let v = unsafe { std::ptr::read_volatile(addr as *const u64) };
            done_tx.send(v).unwrap();
        });
    }
    gate.fetched.recv().unwrap();
    mem.resize(guest_mem::RegionIndex(0), 32 * PAGE).unwrap();
    gate.release.send(()).unwrap();
    let v = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the faulting thread was left hanging");
    assert_eq!(v, 0, "nothing from before the shrink was installed");
    assert_eq!(mem.stats().out_of_range, 1);
    assert_eq!(
        SIGBUS_ADDR.load(Ordering::SeqCst),
        mem.regions()[0].host_addr() + 40 * PAGE,
        "the access past the end failed, as on real hardware"
    );
}

/// Several VMs restored copy-on-write from one image file: they write and
/// give pages back, and the image is never modified (opened read-only;
/// discards drop only each VM's own copies).
#[test]
fn private_regions_over_one_image_never_modify_it() {
    use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    use guest_mem::{Backing, GuestMem, RegionConfig};
    let page = 4096u64;
    let pages = 256u64;
    let path =
        std::path::Path::new("/dev/shm").join(format!("guest-mem-image-{}", std::process::id()));
    let image: Vec<u8> = (0..pages * page).map(|i| (i / page) as u8 ^ 0x5a).collect();
    std::fs::write(&path, &image).unwrap();
    let vm = || {
        let mut rc = RegionConfig::new(0, pages * page);
        rc.backing = Backing::File(path.clone());
        rc.private = true;
        GuestMem::builder().region(rc).build().unwrap()
    };
    let (a, b) = (vm(), vm());
    assert!(a.regions()[0].backing().is_read_only());
    for (n, mem) in [&a, &b].into_iter().enumerate() {
        let m = mem.memory().memory();
        assert_eq!(m.read_obj::<u8>(GuestAddress(7 * page)).unwrap(), 7 ^ 0x5a);
        m.write_obj(0xee00 + n as u16, GuestAddress(9 * page))
            .unwrap();
        mem.discard(GuestAddress(16 * page), 32 * page).unwrap();
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(20 * page)).unwrap(),
            0,
            "a discarded page reads zero"
        );
        assert!(
            mem.resize(guest_mem::RegionIndex(0), 128 * page).is_err(),
            "never truncated"
        );
    }
    let b_mem = b.memory().memory();
    assert_eq!(
        b_mem.read_obj::<u16>(GuestAddress(9 * page)).unwrap(),
        0xee01,
        "each VM its own copy"
    );
    drop((a, b, b_mem));
    assert!(std::fs::read(&path).unwrap() == image, "the image changed");
    // A larger region than the image is refused, not mapped past its end.
    let mut rc = RegionConfig::new(0, 2 * pages * page);
    rc.backing = Backing::File(path.clone());
    rc.private = true;
    assert!(GuestMem::builder().region(rc).build().is_err());
    std::fs::remove_file(&path).unwrap();
}
