//! hugetlbfs-backed guest memory: faults served in 2 MiB pages, discards
//! and window resizes in whole huge pages. These need free huge pages: the
//! test reserves them when it may (root), and otherwise says why it skips.

use guest_mem::backing::free_huge_pages;
use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{Backing, GuestMem, RegionConfig};

const HUGE: u64 = 2 << 20;

const POOL: &str = "/proc/sys/vm/nr_hugepages";

/// Puts the huge page pool back the way the test found it.
struct PoolGuard(Option<u64>);

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Some(total) = self.0 {
            let _ = std::fs::write(POOL, total.to_string());
        }
    }
}

/// Makes sure `pages` huge pages are free, reserving more if allowed;
/// `None` (with the reason printed) when they cannot be had.
fn have_huge_pages(pages: u64) -> Option<PoolGuard> {
    let free = free_huge_pages(HUGE).unwrap_or(0);
    if free >= pages {
        return Some(PoolGuard(None));
    }
    let total: u64 = std::fs::read_to_string(POOL)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if std::fs::write(POOL, (total + pages - free).to_string()).is_err() {
        eprintln!("skipped: {pages} free 2 MiB huge pages needed and {POOL} is not writable");
        return None;
    }
    let guard = PoolGuard(Some(total));
    if free_huge_pages(HUGE).unwrap_or(0) < pages {
        eprintln!("skipped: the kernel could not reserve {pages} huge pages");
        return None;
    }
    Some(guard)
}

#[test]
fn huge_pages_are_faulted_in_discarded_and_resized_whole() {
    let Some(_pool) = have_huge_pages(8) else {
        return;
    };
    let mut ram = RegionConfig::new(0, 8 << 20);
    ram.backing = Backing::MemfdHugetlb;
    let mut window = RegionConfig::new(1 << 30, 8 << 20);
    window.backing = Backing::MemfdHugetlb;
    window.max_size = Some(8 << 20);
    let mem = GuestMem::builder()
        .region(ram)
        .region(window)
        .build()
        .expect("hugetlbfs memory builds");
    let m = mem.memory();
    let ram = m.memory();
    eprintln!("userfaultfd on hugetlbfs: {}", mem.userfault_enabled());
    for (i, at) in [0x1000u64, HUGE + 8, 3 * HUGE + 0x1234].iter().enumerate() {
        ram.write_obj(i as u64 + 1, GuestAddress(*at)).unwrap();
    }
    let r = &mem.regions()[0];
    assert_eq!(r.page_size(), HUGE);
    if mem.userfault_enabled() {
        // One fault per huge page touched, each installing a whole page.
        let s = mem.settled_stats(std::time::Duration::from_secs(5));
        assert_eq!(s.pages_installed, 3, "{s}");
    }
    assert_eq!(mem.allocated_bytes(), 3 * HUGE);

    // A discard gives the whole huge page back; it reads zero again.
    mem.discard(GuestAddress(HUGE), HUGE).unwrap();
    assert_eq!(mem.allocated_bytes(), 2 * HUGE);
    assert_eq!(ram.read_obj::<u64>(GuestAddress(HUGE + 8)).unwrap(), 0);
    assert_eq!(ram.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 1);
    // Less than a huge page is refused, not rounded.
    assert!(mem.discard(GuestAddress(0), 0x1000).is_err());

    // The window: write its top page, unplug it, plug it again: zero.
    let top = GuestAddress((1 << 30) + 3 * HUGE);
    ram.write_obj(0xabu8, top).unwrap();
    drop(ram);
    mem.resize(guest_mem::RegionIndex(1), 2 * HUGE).unwrap();
    assert!(mem.memory().memory().read_obj::<u8>(top).is_err());
    mem.resize(guest_mem::RegionIndex(1), 4 * HUGE).unwrap();
    assert_eq!(mem.memory().memory().read_obj::<u8>(top).unwrap(), 0);
    assert!(
        mem.resize(guest_mem::RegionIndex(1), 3 * HUGE + 4096)
            .is_err(),
        "not a whole huge page"
    );
}
