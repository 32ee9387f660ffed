//! Fresh memory on shmem that may use huge pages is served a 2 MiB huge
//! page at a time: one fill, one huge folio, mapped with one PMD; but never
//! over memory given back, holding contents already, or when turned off.
//!
//! Needs a tmpfs mounted with `huge=advise` (root); skipped without one.

mod common;

use common::PAGE;
use guest_mem::testing::HugeTmpfs;
use guest_mem::vm_memory::GuestAddress;
use guest_mem::{Backing, FaultConfig, GuestMem, RegionConfig};

const HUGE: u64 = 2 << 20;

/// A huge=advise tmpfs and 16 MiB of guest memory on a file there; `None`
/// (skipped) where either is not available.
fn setup(name: &str, huge_fill: bool) -> Option<(HugeTmpfs, GuestMem)> {
    let fs = HugeTmpfs::mount(name, 64 << 20)?;
    let mut region = RegionConfig::new(0, 16 << 20);
    region.backing = Backing::File(fs.path().join("ram"));
    let mem = GuestMem::builder()
        .region(region)
        .fault_config(FaultConfig {
            huge_fill,
            ..FaultConfig::default()
        })
        .build()
        .expect("memory builds");
    if !mem.userfault_enabled() {
        eprintln!("skipped: userfaultfd is not available");
        return None;
    }
    Some((fs, mem))
}

/// A first touch through the guest's mapping, as a vCPU's.
fn touch(mem: &GuestMem, offset: u64) -> u64 {
    let at = mem.regions()[0].host_addr() + offset;
    // SAFETY: inside the region's mapping, which `mem` keeps alive.
    unsafe { (at as *const u64).read_volatile() }
}

/// `ShmemPmdMapped` of this process's mapping starting at `addr`, in KiB.
fn pmd_mapped_kib(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_vma = false;
    for l in smaps.lines() {
        if let Some((range, _)) = l.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(s) = u64::from_str_radix(start, 16) {
                    in_vma = s == addr;
                    continue;
                }
            }
        }
        if in_vma {
            if let Some(v) = l.strip_prefix("ShmemPmdMapped:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    0
}

#[test]
fn a_first_touch_of_fresh_memory_takes_one_huge_page() {
    let Some((_fs, mem)) = setup("fresh", true) else {
        return;
    };
    let backing = mem.regions()[0].backing().clone();
    assert_eq!(touch(&mem, HUGE + 12345 / 8 * 8), 0);
    let s = mem.settled_stats(std::time::Duration::from_secs(5));
    assert_eq!((s.faults, s.huge_fills), (1, 1), "{s}");
    assert_eq!(s.pages_installed, HUGE / PAGE, "{s}");
    assert_eq!(backing.allocated_bytes().unwrap(), HUGE);
    let base = mem.regions()[0].host_addr();
    assert!(
        pmd_mapped_kib(base) >= HUGE / 1024,
        "the filled huge page is mapped with one PMD"
    );
    // The rest of the window is there without another fault.
    assert_eq!(touch(&mem, 2 * HUGE - PAGE), 0);
    assert_eq!(
        mem.settled_stats(std::time::Duration::from_secs(5)).faults,
        1
    );
    // A page of it given back (the balloon) goes back to the host: the
    // huge page is split, not kept whole.
    let gpa = GuestAddress(HUGE + 9 * PAGE);
    mem.discard(gpa, PAGE).unwrap();
    assert_eq!(backing.allocated_bytes().unwrap(), HUGE - PAGE);
    assert_eq!(touch(&mem, HUGE + 9 * PAGE), 0);
}

#[test]
fn memory_given_back_or_holding_contents_is_never_filled() {
    let Some((_fs, mem)) = setup("kept", true) else {
        return;
    };
    let backing = mem.regions()[0].backing().clone();
    // Window 1: one page given back (the balloon) before any touch.
    mem.discard(GuestAddress(HUGE + 7 * PAGE), PAGE).unwrap();
    // Window 2: a word written into the file (as a kernel is placed), so
    // the file holds a page there.
    std::os::unix::fs::FileExt::write_at(
        &**backing.file(),
        &0xfeed_u64.to_le_bytes(),
        2 * HUGE + 8 * PAGE,
    )
    .unwrap();
    let before = backing.allocated_bytes().unwrap();
    assert_eq!(touch(&mem, HUGE), 0);
    assert_eq!(touch(&mem, 2 * HUGE), 0);
    assert_eq!(touch(&mem, 2 * HUGE + 8 * PAGE), 0xfeed);
    let s = mem.settled_stats(std::time::Duration::from_secs(5));
    assert_eq!(s.huge_fills, 0, "{s}");
    assert!(s.pages_installed >= 2, "{s}");
    // Neither window became a whole huge page.
    let grown = backing.allocated_bytes().unwrap() - before;
    assert!(grown < 2 * HUGE, "{grown:#x} bytes allocated");
    // A window that is fresh still gets its fill.
    assert_eq!(touch(&mem, 3 * HUGE), 0);
    let s = mem.settled_stats(std::time::Duration::from_secs(5));
    assert_eq!(s.huge_fills, 1, "{s}");
}

#[test]
fn turned_off_it_installs_pages() {
    let Some((_fs, mem)) = setup("off", false) else {
        return;
    };
    assert_eq!(touch(&mem, HUGE), 0);
    let s = mem.settled_stats(std::time::Duration::from_secs(5));
    assert_eq!(s.huge_fills, 0, "{s}");
    assert_eq!(pmd_mapped_kib(mem.regions()[0].host_addr()), 0);
}

#[test]
fn an_image_placed_through_the_file_lands_in_huge_pages() {
    use guest_mem::image::ImageFile;
    use guest_mem::vm_memory::{Bytes, GuestAddressSpace};
    use std::io::Seek;

    let Some((fs, mem)) = setup("image", true) else {
        return;
    };
    let dir = fs.path().to_str().unwrap();
    let (mut f, image) = common::image_in(dir, "kernel", (HUGE + 5 * PAGE) as usize);
    f.rewind().unwrap();
    let at = GuestAddress(HUGE);
    let mut file = ImageFile::new(&mem, f);
    mem.memory()
        .memory()
        .read_exact_volatile_from(at, &mut file, image.len())
        .unwrap();
    assert_eq!(file.spliced_bytes(), image.len() as u64);
    drop(file);
    // Both windows the image overlaps were filled whole before the splice.
    let backing = mem.regions()[0].backing().clone();
    assert_eq!(backing.allocated_bytes().unwrap(), 2 * HUGE);
    // The guest finds the image in place, mapped 2 MiB at a time, without
    // a fault.
    for (i, off) in [0, PAGE + 8, HUGE - 8, HUGE + 4 * PAGE]
        .into_iter()
        .enumerate()
    {
        let want = u64::from_le_bytes(image[off as usize..off as usize + 8].try_into().unwrap());
        assert_eq!(touch(&mem, HUGE + off), want, "word {i}");
    }
    assert_eq!(mem.stats().faults, 0);
    assert!(pmd_mapped_kib(mem.regions()[0].host_addr()) >= 2 * HUGE / 1024);
}

#[test]
fn populated_memory_is_populated_in_huge_pages() {
    let Some((_fs, mem)) = setup("populate", true) else {
        return;
    };
    // Half a huge page in the middle of window 3: the whole window is
    // filled (it was fresh), and mapped with one PMD at the first touch.
    let at = 3 * HUGE + HUGE / 4;
    assert_eq!(mem.populate(GuestAddress(at), HUGE / 2).unwrap(), HUGE / 2);
    assert_eq!(mem.allocated_bytes(), HUGE);
    assert_eq!(touch(&mem, at), 0);
    assert_eq!(mem.stats().faults, 0);
    assert_eq!(pmd_mapped_kib(mem.regions()[0].host_addr()), HUGE / 1024);
}
