//! Bad input gets a clear error, never a panic.

use std::io::Write;
use std::sync::Arc;

use guest_mem::backing::{free_huge_pages, BackingFile};
use guest_mem::vm_memory::GuestAddress;
use guest_mem::{
    Backing, Error, FaultConfig, FaultMode, FileSource, GuestMem, RegionConfig, RegionSource,
};

const PAGE: u64 = 4096;

fn build(rc: RegionConfig) -> Result<GuestMem, Error> {
    GuestMem::builder().region(rc).build()
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn zero_size_is_refused() {
    let err = build(RegionConfig::new(0, 0)).unwrap_err();
    assert!(matches!(err, Error::ZeroSize), "{err}");
    assert!(matches!(BackingFile::memfd("x", 0), Err(Error::ZeroSize)));
    assert!(GuestMem::builder().build().is_err(), "no regions at all");
}

#[test]
fn unaligned_sizes_and_addresses_are_refused() {
    let err = build(RegionConfig::new(0, PAGE + 1)).unwrap_err();
    assert!(matches!(err, Error::Unaligned { .. }), "{err}");
    assert!(
        err.to_string().contains("not a multiple of the page size"),
        "{err}"
    );
    let err = build(RegionConfig::new(0x800, 4 * PAGE)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unaligned {
                what: "guest address",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn overlapping_regions_are_refused() {
    let err = GuestMem::builder()
        .region(RegionConfig::new(0, 16 * PAGE))
        .region(RegionConfig::new(8 * PAGE, 16 * PAGE))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
}

#[test]
fn a_directory_is_not_a_backing_file() {
    let dir = scratch_dir("backing-dir");
    let mut rc = RegionConfig::new(0, 16 * PAGE);
    rc.backing = Backing::File(dir.clone());
    let err = build(rc).unwrap_err();
    assert!(
        matches!(err, Error::IsDirectory(ref p) if *p == dir),
        "{err}"
    );
    assert!(err.to_string().contains("is a directory"));
}

#[test]
fn a_missing_parent_directory_is_reported_with_the_path() {
    let mut rc = RegionConfig::new(0, 16 * PAGE);
    rc.backing = Backing::File("/nonexistent-dir/guest.ram".into());
    let err = build(rc).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent-dir/guest.ram"),
        "{err}"
    );
}

#[test]
fn a_larger_existing_file_is_not_truncated() {
    let dir = scratch_dir("larger-file");
    let path = dir.join("ram");
    std::fs::write(&path, vec![1u8; 32 * PAGE as usize]).unwrap();
    let mut rc = RegionConfig::new(0, 16 * PAGE);
    rc.backing = Backing::File(path.clone());
    let err = build(rc).unwrap_err();
    assert!(matches!(err, Error::FileLargerThanMemory { .. }), "{err}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        32 * PAGE,
        "file kept"
    );
}

#[test]
fn hugetlbfs_without_free_pages_is_a_clear_error() {
    let huge = 2 << 20;
    let free = free_huge_pages(huge).unwrap_or(0);
    let mut rc = RegionConfig::new(0, (free + 1) * huge);
    rc.backing = Backing::MemfdHugetlb;
    let err = build(rc).unwrap_err();
    assert!(matches!(err, Error::NoHugePages { .. }), "{err}");
    assert!(err.to_string().contains("nr_hugepages"), "{err}");
}

#[test]
fn a_source_shorter_than_the_region_is_refused() {
    let dir = scratch_dir("short-source");
    let path = dir.join("image");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&vec![7u8; 4 * PAGE as usize])
        .unwrap();
    let mut rc = RegionConfig::new(0, 16 * PAGE);
    rc.source = Some(RegionSource {
        source: Arc::new(FileSource::open(&path).unwrap()),
        offset: 0,
    });
    let err = build(rc).unwrap_err();
    assert!(
        matches!(err, Error::SourceTooShort { len, needed, .. } if len == 4 * PAGE && needed == 16 * PAGE),
        "{err}"
    );
}

#[test]
fn userfault_on_a_disk_file_is_refused_and_auto_falls_back() {
    let dir = scratch_dir("disk-backing");
    let kind = BackingFile::open(dir.join("probe"), PAGE).unwrap().kind();
    if kind.supports_userfault() {
        eprintln!(
            "skipped: {} is on tmpfs here, not a disk file system",
            dir.display()
        );
        return;
    }
    let mut rc = RegionConfig::new(0, 16 * PAGE);
    rc.backing = Backing::File(dir.join("ram"));
    let err = GuestMem::builder()
        .region(rc.clone())
        .fault_config(FaultConfig {
            mode: FaultMode::Userfault,
            ..FaultConfig::default()
        })
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("userfaultfd cannot"), "{err}");
    // Auto: the kernel serves faults, and discards still work.
    let mem = GuestMem::builder().region(rc).build().unwrap();
    assert!(!mem.userfault_enabled());
    mem.discard(GuestAddress(0), PAGE).unwrap();
}

#[test]
fn bad_discards_and_resizes_are_refused() {
    let mut rc = RegionConfig::new(0, 16 * PAGE);
    rc.max_size = Some(32 * PAGE);
    let mem = build(rc).unwrap();
    for (gpa, len) in [
        (0x800, PAGE),
        (0, PAGE + 1),
        (0, 0),
        (16 * PAGE, PAGE),
        (u64::MAX - 10, PAGE),
    ] {
        let err = mem.discard(GuestAddress(gpa), len);
        assert!(err.is_err(), "discard {gpa:#x}+{len:#x} accepted");
    }
    assert!(matches!(
        mem.discard(GuestAddress(15 * PAGE), 2 * PAGE),
        Err(Error::NotRam { .. })
    ));
    assert!(
        mem.resize(guest_mem::RegionIndex(0), 33 * PAGE).is_err(),
        "past max"
    );
    assert!(
        mem.resize(guest_mem::RegionIndex(0), PAGE + 1).is_err(),
        "unaligned"
    );
    assert!(matches!(
        mem.resize(guest_mem::RegionIndex(1), PAGE),
        Err(Error::NoSuchRegion(guest_mem::RegionIndex(1)))
    ));
    assert_eq!(mem.stats().discards, 0, "nothing was discarded");
}

#[test]
fn only_the_tail_window_of_a_shared_file_can_resize() {
    let file = Arc::new(BackingFile::memfd("shared", 32 * PAGE).unwrap());
    let mut a = RegionConfig::new(0, 16 * PAGE);
    a.backing = Backing::Shared {
        file: file.clone(),
        offset: 0,
    };
    let mut b = RegionConfig::new(1 << 30, 16 * PAGE);
    b.backing = Backing::Shared {
        file,
        offset: 16 * PAGE,
    };
    let mem = GuestMem::builder().region(a).region(b).build().unwrap();
    assert!(matches!(
        mem.resize(guest_mem::RegionIndex(0), 8 * PAGE),
        Err(Error::NotResizable(guest_mem::RegionIndex(0)))
    ));
    mem.resize(guest_mem::RegionIndex(1), 8 * PAGE).unwrap();
    assert_eq!(mem.regions()[1].backed_size(), 8 * PAGE);
    assert_eq!(mem.regions()[0].backed_size(), 16 * PAGE);
}
