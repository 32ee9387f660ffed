//! Saving guest memory to a sparse memory file and restoring from it:
//! holes stay holes (a mostly empty guest writes little), every page the
//! guest had comes back, and every page it gave back reads zero.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{
    memory_file, Backing, BackingFile, FileSource, GuestMem, RegionConfig, RegionSource,
};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const WINDOW: u64 = 8 << 30;

fn dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("guest-mem-memfile-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Boot RAM in one file as two regions (as around an MMIO gap) and a
/// resizable window with a file of its own.
fn layout(sources: Option<(&std::path::Path, &memory_file::SavedLayout)>) -> GuestMem {
    let file = Arc::new(BackingFile::memfd("ram", 48 * MIB).unwrap());
    let mut configs = vec![
        (
            0,
            32 * MIB,
            Backing::Shared {
                file: file.clone(),
                offset: 0,
            },
            None,
        ),
        (
            1 << 32,
            16 * MIB,
            Backing::Shared {
                file,
                offset: 32 * MIB,
            },
            None,
        ),
        (WINDOW, 16 * MIB, Backing::Memfd, Some(32 * MIB)),
    ];
    let mut b = GuestMem::builder();
    for (i, (gpa, size, backing, max)) in configs.drain(..).enumerate() {
        let mut rc = RegionConfig::new(gpa, size);
        rc.backing = backing;
        rc.max_size = max;
        if let Some((path, saved)) = sources {
            rc.source = Some(RegionSource {
                source: Arc::new(FileSource::open(path).unwrap()),
                offset: saved.regions[i].offset,
            });
        }
        b = b.region(rc);
    }
    b.build().unwrap()
}

#[test]
fn a_saved_memory_is_sparse_and_restores_page_for_page() {
    let d = dir();
    let path = d.join("memory");
    let _ = std::fs::remove_file(&path);
    let mem = layout(None);
    let ram = mem.memory().memory();
    // 300 pages with data across the three regions; 20 of them given back.
    let pages: Vec<u64> = (0..100)
        .flat_map(|i| {
            [
                i * 7 * PAGE,
                (1 << 32) + i * 5 * PAGE,
                WINDOW + i * 3 * PAGE,
            ]
        })
        .collect();
    for &gpa in &pages {
        ram.write_obj(gpa ^ 0xfeed_0000_0000_0000, GuestAddress(gpa))
            .unwrap();
    }
    let given_back: Vec<u64> = pages.iter().copied().step_by(15).collect();
    for &gpa in &given_back {
        mem.discard(GuestAddress(gpa), PAGE).unwrap();
    }
    let saved = memory_file::save(&mem, &path).unwrap();
    assert_eq!(
        saved.regions[1].offset,
        32 * MIB,
        "the second region follows the first in one file"
    );
    let kept = (pages.len() - given_back.len()) as u64;
    assert_eq!(saved.bytes_written, kept * PAGE, "only the pages with data");
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        allocated <= kept * PAGE + MIB,
        "{allocated} bytes allocated on disk"
    );
    assert!(saved.file_len >= 48 * MIB + 16 * MIB);

    let restored = layout(Some((&path, &saved)));
    let r = restored.memory().memory();
    for &gpa in &pages {
        let v: u64 = r.read_obj(GuestAddress(gpa)).unwrap();
        let want = if given_back.contains(&gpa) {
            0
        } else {
            gpa ^ 0xfeed_0000_0000_0000
        };
        assert_eq!(v, want, "at {gpa:#x}");
    }
    assert_eq!(r.read_obj::<u64>(GuestAddress(PAGE + 8)).unwrap(), 0);
    // Holes in the image cost no read: the handler installs zero pages.
    let s = restored.settled_stats(std::time::Duration::from_secs(1));
    assert!(s.installs_zero > 0, "{s}");

    // Eagerly: the same pages copied into fresh memory, holes left holes.
    let eager = layout(None);
    let written = memory_file::load(&eager, &path, &saved.regions).unwrap();
    assert_eq!(written, kept * PAGE, "only the saved pages are written");
    assert!(
        eager.allocated_bytes() <= kept * PAGE + MIB,
        "{} bytes allocated after an eager load",
        eager.allocated_bytes()
    );
    let e = eager.memory().memory();
    for &gpa in &pages {
        let v: u64 = e.read_obj(GuestAddress(gpa)).unwrap();
        let want = if given_back.contains(&gpa) {
            0
        } else {
            gpa ^ 0xfeed_0000_0000_0000
        };
        assert_eq!(v, want, "at {gpa:#x} after an eager load");
    }
    assert!(memory_file::load(&eager, &path, &saved.regions[..1]).is_err());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn saving_refuses_an_existing_file_and_private_regions() {
    let d = dir().join("refusals");
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("exists");
    std::fs::write(&path, b"keep me").unwrap();
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 2 * MIB))
        .build()
        .unwrap();
    assert!(memory_file::save(&mem, &path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    let mut rc = RegionConfig::new(0, 2 * MIB);
    rc.private = true;
    let private = GuestMem::builder().region(rc).build().unwrap();
    let e = memory_file::save(&private, &d.join("new"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("private"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A memory still being restored lazily keeps its untouched pages in its
/// source: saving it again takes them from there, keeps what the guest
/// wrote since, and leaves what it gave back (never fetched) a hole.
#[test]
fn a_lazily_restored_memory_saves_its_unfetched_pages_from_the_source() {
    // Not under dir(): another test removes that when it ends.
    let d = std::env::temp_dir().join(format!("guest-mem-resave-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let (first, second) = (d.join("first"), d.join("second"));
    let mem = layout(None);
    let word = |gpa: u64| gpa ^ 0xfeed_0000_0000_0000;
    let pages: Vec<u64> = (0..64)
        .flat_map(|i| {
            [
                i * 9 * PAGE,
                (1 << 32) + i * 4 * PAGE,
                WINDOW + i * 2 * PAGE,
            ]
        })
        .collect();
    for &gpa in &pages {
        mem.memory()
            .memory()
            .write_obj(word(gpa), GuestAddress(gpa))
            .unwrap();
    }
    let saved = memory_file::save(&mem, &first).unwrap();

    // Restored lazily: a third of the pages rewritten, a third given back
    // without ever being touched, a third left in the source.
    let lazy = layout(Some((&first, &saved)));
    for (i, &gpa) in pages.iter().enumerate() {
        match i % 3 {
            0 => lazy
                .memory()
                .memory()
                .write_obj(!word(gpa), GuestAddress(gpa))
                .unwrap(),
            1 => lazy.discard(GuestAddress(gpa), PAGE).unwrap(),
            _ => {}
        }
    }
    let resaved = memory_file::save(&lazy, &second).unwrap();
    assert!(
        resaved.bytes_written <= (pages.len() as u64 * 2 / 3 + 1) * PAGE,
        "{} bytes: the given-back pages are holes",
        resaved.bytes_written
    );
    let again = layout(Some((&second, &resaved)));
    for (i, &gpa) in pages.iter().enumerate() {
        let v: u64 = again.memory().memory().read_obj(GuestAddress(gpa)).unwrap();
        let want = match i % 3 {
            0 => !word(gpa),
            1 => 0,
            _ => word(gpa),
        };
        assert_eq!(v, want, "page {i} at {gpa:#x}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Readahead over a restored region stops at the image's holes: touching
/// a page next to memory the guest never had (or gave back) does not
/// allocate that memory as zero pages.
#[test]
fn a_restores_readahead_leaves_the_images_holes_unallocated() {
    let d = std::env::temp_dir().join(format!("guest-mem-ra-holes-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("memory");
    let mem = GuestMem::builder()
        .region(RegionConfig::new(0, 8 * MIB))
        .build()
        .unwrap();
    // Data in pages 0-3 and 64; holes around them.
    for p in [0, 1, 2, 3, 64] {
        mem.memory()
            .memory()
            .write_obj(p + 1, GuestAddress(p * PAGE))
            .unwrap();
    }
    let saved = memory_file::save(&mem, &path).unwrap();
    let mut rc = RegionConfig::new(0, 8 * MIB);
    rc.source = Some(RegionSource {
        source: Arc::new(FileSource::open(&path).unwrap()),
        offset: saved.regions[0].offset,
    });
    // A 256 KiB window on every fault: without the trim it would reach
    // page 63.
    let restored = GuestMem::builder()
        .region(rc)
        .fault_config(guest_mem::FaultConfig {
            readahead: guest_mem::Readahead::fixed(256 << 10),
            ..Default::default()
        })
        .build()
        .unwrap();
    let v: u64 = restored
        .memory()
        .memory()
        .read_obj(GuestAddress(0))
        .unwrap();
    assert_eq!(v, 1);
    let r = &restored.regions()[0];
    let backed = |p: u64| r.backing().has_data(r.file_range(p * PAGE, PAGE)).unwrap();
    assert!((0..4).all(backed), "the data run comes in one fault");
    let filled: Vec<u64> = (4..64).filter(|&p| backed(p)).collect();
    assert!(
        filled.is_empty(),
        "holes allocated by readahead: {filled:?}"
    );
    let s = restored.settled_stats(std::time::Duration::from_secs(1));
    assert_eq!(s.faults, 1, "{s}");
    let _ = std::fs::remove_dir_all(&d);
}
