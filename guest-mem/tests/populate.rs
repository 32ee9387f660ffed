//! `GuestMem::populate`: memory backed ahead of its first touch, which then
//! raises no fault; regions with a page source are left to their faults.

mod common;

use std::sync::Arc;

use common::PAGE;
use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{FileSource, GuestMem, RegionConfig, RegionSource};

#[test]
fn populated_memory_is_touched_without_a_fault() {
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 1024 * PAGE))
        .build()
        .unwrap();
    assert!(mem.userfault_enabled());
    assert_eq!(
        mem.populate(GuestAddress(256 * PAGE), 512 * PAGE).unwrap(),
        512 * PAGE
    );
    let m = mem.memory();
    for p in 256..768 {
        let v: u64 = m.memory().read_obj(GuestAddress(p * PAGE + 8)).unwrap();
        assert_eq!(v, 0);
    }
    assert_eq!(
        mem.stats().faults,
        0,
        "no page of the populated range faulted"
    );
    // A page outside it still faults in.
    let _: u64 = m.memory().read_obj(GuestAddress(800 * PAGE)).unwrap();
    assert!(mem.stats().faults > 0);
    // Given back, a populated page is a hole again and reads zero.
    m.memory()
        .write_obj(0xabu8, GuestAddress(300 * PAGE))
        .unwrap();
    mem.discard(GuestAddress(300 * PAGE), PAGE).unwrap();
    assert_eq!(
        m.memory().read_obj::<u8>(GuestAddress(300 * PAGE)).unwrap(),
        0
    );
}

#[test]
fn populating_refuses_bad_ranges_and_skips_memory_with_a_source() {
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 64 * PAGE))
        .build()
        .unwrap();
    assert!(
        mem.populate(GuestAddress(PAGE + 1), PAGE).is_err(),
        "unaligned"
    );
    assert!(
        mem.populate(GuestAddress(128 * PAGE), PAGE).is_err(),
        "not RAM"
    );
    // Clipped to the region.
    assert_eq!(
        mem.populate(GuestAddress(60 * PAGE), 100 * PAGE).unwrap(),
        4 * PAGE
    );

    let dir = std::env::temp_dir().join(format!("guest-mem-populate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("image");
    std::fs::write(&image, vec![0x5a; 64 * PAGE as usize]).unwrap();
    let mut ram = RegionConfig::new(0, 64 * PAGE);
    ram.source = Some(RegionSource {
        source: Arc::new(FileSource::open(&image).unwrap()),
        offset: 0,
    });
    let restored = GuestMem::builder().region(ram).build().unwrap();
    assert_eq!(restored.populate(GuestAddress(0), 8 * PAGE).unwrap(), 0);
    let v: u8 = restored
        .memory()
        .memory()
        .read_obj(GuestAddress(PAGE))
        .unwrap();
    assert_eq!(v, 0x5a, "the source's contents, not zeros");
    let _ = std::fs::remove_dir_all(&dir);
}
