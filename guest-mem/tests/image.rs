//! Boot images placed with `ImageFile` land in guest memory byte for byte:
//! through the backing file (no fault served) where the region is a shared
//! mapping of a writable file, through the mapping elsewhere.

mod common;

use std::fs::File;
use std::io::{Seek, SeekFrom};

use common::{guest_bytes, image_in, PAGE};
use guest_mem::image::ImageFile;
use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{GuestMem, RegionConfig};

/// Loads `len` bytes of `file` from `file_off` at `gpa`, as linux-loader
/// does for a segment; returns (spliced, read) byte counts.
fn load(mem: &GuestMem, file: File, file_off: u64, gpa: u64, len: usize) -> (u64, u64) {
    let mut image = ImageFile::new(mem, file);
    image.seek(SeekFrom::Start(file_off)).unwrap();
    mem.memory()
        .memory()
        .read_exact_volatile_from(GuestAddress(gpa), &mut image, len)
        .unwrap();
    (image.spliced_bytes(), image.read_bytes())
}

#[test]
fn a_memfd_region_is_filled_through_the_file_without_faults() {
    for dir in ["/dev/shm", &std::env::temp_dir().to_string_lossy()] {
        let mem = GuestMem::builder()
            .region(RegionConfig::new(0, 1024 * PAGE))
            .build()
            .unwrap();
        assert!(mem.userfault_enabled());
        // Unaligned start and length, several splice rounds (over 1 MiB).
        let len = 3 * (1 << 20) + 123;
        let (file, bytes) = image_in(dir, "memfd", len + 4096);
        let (spliced, read) = load(&mem, file, 100, 5 * PAGE + 17, len);
        assert_eq!((spliced, read), (len as u64, 0), "source in {dir}");
        assert_eq!(mem.stats().faults, 0, "placing the image served no fault");
        assert_eq!(guest_bytes(&mem, 5 * PAGE + 17, len), bytes[100..100 + len]);
        // Around it the guest sees zeros, as on any fresh page.
        assert_eq!(guest_bytes(&mem, 5 * PAGE, 17), vec![0; 17]);
        let end = 5 * PAGE + 17 + len as u64;
        assert_eq!(guest_bytes(&mem, end, 64), vec![0; 64]);
    }
}

#[test]
fn an_image_spanning_two_regions_lands_in_both() {
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 64 * PAGE))
        .region(RegionConfig::new(64 * PAGE, 64 * PAGE))
        .build()
        .unwrap();
    let len = 20 * PAGE as usize;
    let (file, bytes) = image_in("/dev/shm", "span", len);
    let (spliced, _) = load(&mem, file, 0, 54 * PAGE, len);
    assert_eq!(spliced, len as u64);
    assert_eq!(guest_bytes(&mem, 54 * PAGE, len), bytes);
}

#[test]
fn a_private_mapping_is_filled_through_the_mapping_and_its_file_left_alone() {
    let mut rc = RegionConfig::new(0, 256 * PAGE);
    rc.private = true;
    let mem = GuestMem::builder().region(rc).build().unwrap();
    let len = 8 * PAGE as usize;
    let (file, bytes) = image_in("/dev/shm", "private", len);
    let (spliced, read) = load(&mem, file, 0, 16 * PAGE, len);
    assert_eq!((spliced, read), (0, len as u64));
    assert_eq!(guest_bytes(&mem, 16 * PAGE, len), bytes);
    // The file under a copy-on-write mapping must not change.
    let r = &mem.regions()[0];
    let file_range = r.file_range(16 * PAGE, len as u64);
    assert!(!r.backing().has_data(file_range).unwrap());
}

#[test]
fn an_image_past_the_end_of_its_file_is_an_error_not_a_hang() {
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 64 * PAGE))
        .build()
        .unwrap();
    let (file, _) = image_in("/dev/shm", "short", 1000);
    let mut image = ImageFile::new(&mem, file);
    image.rewind().unwrap();
    let r = mem
        .memory()
        .memory()
        .read_exact_volatile_from(GuestAddress(0), &mut image, 4000);
    assert!(
        r.is_err(),
        "reading 4000 bytes of a 1000-byte file must fail"
    );
}

#[test]
fn pages_given_back_hold_the_image_once_it_is_loaded_over_them() {
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 256 * PAGE))
        .build()
        .unwrap();
    mem.discard(GuestAddress(32 * PAGE), 64 * PAGE).unwrap();
    let r = &mem.regions()[0];
    assert!(r.is_discarded(40 * PAGE));
    let len = 8 * PAGE as usize + 10;
    let (file, bytes) = image_in("/dev/shm", "discarded", len);
    let (spliced, _) = load(&mem, file, 0, 40 * PAGE, len);
    assert_eq!(spliced, len as u64);
    // Every page the image touched, the partial last one included, now
    // holds contents; the rest of the discarded range is still owed zero.
    assert!((40..49).all(|p| !r.is_discarded(p * PAGE)));
    assert!(r.is_discarded(39 * PAGE) && r.is_discarded(49 * PAGE));
    assert_eq!(guest_bytes(&mem, 40 * PAGE, len), bytes);
}
