//! A region whose mapping is split (part of it protected apart, as a
//! virtio-mem window's unplugged blocks are) still has every fault served:
//! a readahead window that runs into the next mapping is refused whole by
//! the kernel, and the faulting page must then go in alone rather than
//! leave its thread faulting on it for ever.

use std::sync::mpsc;
use std::time::Duration;

use guest_mem::{FaultConfig, GuestMem, Readahead, RegionConfig};

const PAGE: u64 = 4096;

/// Runs `touch` on a thread; false if it had not returned after 5 s.
fn returns(touch: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        touch();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).is_ok()
}

#[test]
fn a_window_running_into_another_mapping_still_serves_the_faulting_page() {
    let fault = FaultConfig {
        readahead: Readahead::fixed(16 * PAGE),
        ..FaultConfig::default()
    };
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 4 << 20))
        .fault_config(fault)
        .build()
        .expect("memory builds");
    if !mem.userfault_enabled() {
        eprintln!("skipped: userfaultfd is not available");
        return;
    }
    let base = mem.regions()[0].host_addr();
    // Page 2 read-only: the mapping is three mappings now, and the window
    // of a fault at page 0 (16 pages) crosses two of their edges.
    // SAFETY: one page inside the region's own mapping, which outlives
    // this test's use of it; only its protection changes.
    let rc = unsafe {
        libc::mprotect(
            (base + 2 * PAGE) as *mut libc::c_void,
            PAGE as usize,
            libc::PROT_READ,
        )
    };
    assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
    let at = base as usize;
    assert!(
        returns(move || {
            // SAFETY: page 0 of the region's writable mapping.
            unsafe { (at as *mut u64).write_volatile(0x5eed) }
        }),
        "a write to page 0 was never served"
    );
    let ro = (base + 2 * PAGE) as usize;
    let (tx, rx) = mpsc::channel();
    assert!(
        returns(move || {
            // SAFETY: page 2, mapped read-only; read only.
            let _ = tx.send(unsafe { (ro as *const u64).read_volatile() });
        }),
        "a read of the read-only page was never served"
    );
    assert_eq!(rx.recv().unwrap(), 0);
    let at = base as usize;
    // SAFETY: page 0, served above.
    assert_eq!(unsafe { (at as *const u64).read_volatile() }, 0x5eed);
}
