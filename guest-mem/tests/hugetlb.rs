//! hugetlbfs-backed guest memory: faults served in 2 MiB pages, discards
//! and window resizes in whole huge pages, boot images copied in whole
//! pages. These need free huge pages: the tests reserve them when they may
//! (root), and otherwise say why they skip.

mod common;

use std::io::{Seek, SeekFrom};
use std::time::Duration;

use common::{guest_bytes, image_in};
use guest_mem::backing::free_huge_pages;
use guest_mem::image::ImageFile;
use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{Backing, FaultConfig, GuestMem, RegionConfig, Unservable};

const HUGE: u64 = 2 << 20;

const POOL: &str = "/proc/sys/vm/nr_hugepages";

/// One test at a time owns the pool: a test that shrank it back while
/// another one's memory still needed pages would starve that one.
static POOL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Huge pages in the pool, free or not.
fn pool_total() -> Option<u64> {
    std::fs::read_to_string(POOL).ok()?.trim().parse().ok()
}

/// Puts the huge page pool back the way the test found it, whatever the
/// test did to it meanwhile.
struct PoolGuard {
    restore: Option<u64>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Some(total) = self.restore {
            if pool_total() != Some(total) {
                let _ = std::fs::write(POOL, total.to_string());
            }
        }
    }
}

/// Makes sure `pages` huge pages are free, reserving more if allowed;
/// `None` (with the reason printed) when they cannot be had.
fn have_huge_pages(pages: u64) -> Option<PoolGuard> {
    let lock = POOL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let guard = PoolGuard {
        restore: pool_total(),
        _lock: lock,
    };
    let free = free_huge_pages(HUGE).unwrap_or(0);
    if free >= pages {
        return Some(guard);
    }
    let total = guard.restore.unwrap_or(0);
    if std::fs::write(POOL, (total + pages - free).to_string()).is_err() {
        eprintln!("skipped: {pages} free 2 MiB huge pages needed and {POOL} is not writable");
        return None;
    }
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

/// Memory and the pool it draws from, dropped in that order.
struct HugeRam {
    mem: GuestMem,
    _pool: PoolGuard,
}

/// 16 MiB of hugetlbfs RAM whose faults this crate serves, or `None` (with
/// the reason printed).
fn huge_ram() -> Option<HugeRam> {
    let pool = have_huge_pages(8)?;
    let mut ram = RegionConfig::new(0, 16 << 20);
    ram.backing = Backing::MemfdHugetlb;
    let mem = GuestMem::builder()
        .region(ram)
        .build()
        .expect("hugetlbfs memory builds");
    if !mem.userfault_enabled() {
        eprintln!("skipped: no userfaultfd on hugetlbfs here");
        return None;
    }
    Some(HugeRam { mem, _pool: pool })
}

/// Places `len` bytes of `file` from `file_off` at `gpa` as linux-loader
/// places a segment; returns the image reader's (copied, read) counts, or
/// the loader's error.
fn place(
    mem: &GuestMem,
    file: std::fs::File,
    file_off: u64,
    gpa: u64,
    len: usize,
) -> Result<(u64, u64), String> {
    let mut image = ImageFile::new(mem, file);
    image.seek(SeekFrom::Start(file_off)).unwrap();
    mem.memory()
        .memory()
        .read_exact_volatile_from(GuestAddress(gpa), &mut image, len)
        .map_err(|e| e.to_string())?;
    Ok((image.copied_bytes(), image.read_bytes()))
}

#[test]
fn whole_huge_pages_of_an_image_are_copied_in_without_a_fault() {
    let Some(ram) = huge_ram() else {
        return;
    };
    let mem = &ram.mem;
    // A segment as an ELF kernel has them: file and guest offsets agree
    // modulo the page, starting and ending inside a huge page.
    let (file, bytes) = image_in("/tmp", "hugetlb", (4 * HUGE) as usize);
    let (gpa, len) = (2 * HUGE + 0x1000, 3 * HUGE as usize);
    let (copied, read) = place(mem, file, 0x1000, gpa, len).unwrap();
    assert_eq!(copied, 2 * HUGE, "the two whole pages go in by copy");
    assert_eq!(read, HUGE, "the head and tail are read");
    // Only the two partial pages faulted (read through the mapping).
    let s = mem.settled_stats(Duration::from_secs(5));
    assert_eq!(s.pages_installed, 2, "{s}");
    assert_eq!(s.faults, 2, "{s}");
    assert!(guest_bytes(mem, gpa, len) == bytes[0x1000..0x1000 + len]);
    // What lies around the segment in its partial pages reads zero.
    assert!(guest_bytes(mem, 2 * HUGE, 0x1000).iter().all(|&b| b == 0));
    assert_eq!(mem.allocated_bytes(), 4 * HUGE);
}

#[test]
fn a_huge_page_already_present_is_read_over_and_offsets_out_of_step_are_read() {
    let Some(ram) = huge_ram() else {
        return;
    };
    let mem = &ram.mem;
    // A page the guest (or an earlier segment) has: UFFDIO_COPY refuses
    // it, and the image is read over it instead.
    mem.memory()
        .memory()
        .write_obj(0xeeu8, GuestAddress(HUGE + 5))
        .unwrap();
    let (file, bytes) = image_in("/tmp", "hugetlb-present", (2 * HUGE) as usize);
    let (copied, read) = place(mem, file, 0, 0, (2 * HUGE) as usize).unwrap();
    assert_eq!((copied, read), (HUGE, HUGE));
    assert!(guest_bytes(mem, 0, (2 * HUGE) as usize) == bytes[..]);

    // File offsets not congruent to guest ones (no page-aligned source):
    // everything is read, and lands as well.
    let (file, bytes) = image_in("/tmp", "hugetlb-skew", (3 * HUGE) as usize);
    let (copied, read) = place(mem, file, 0x800, 4 * HUGE, (2 * HUGE) as usize).unwrap();
    assert_eq!((copied, read), (0, 2 * HUGE));
    assert!(
        guest_bytes(mem, 4 * HUGE, (2 * HUGE) as usize)
            == bytes[0x800..0x800 + (2 * HUGE) as usize]
    );
}

#[test]
fn an_image_shorter_than_its_segment_is_an_error_after_the_pages_it_has() {
    let Some(ram) = huge_ram() else {
        return;
    };
    let mem = &ram.mem;
    let (file, bytes) = image_in("/tmp", "hugetlb-short", (HUGE + 0x3000) as usize);
    let err = place(mem, file, 0, 0, (3 * HUGE) as usize).unwrap_err();
    assert!(!err.is_empty());
    // The whole page the file had went in; nothing past its end was copied.
    assert!(guest_bytes(mem, 0, HUGE as usize) == bytes[..HUGE as usize]);
    assert!(guest_bytes(mem, 2 * HUGE, 16).iter().all(|&b| b == 0));
}

#[test]
fn a_page_the_kernel_cannot_map_once_the_pool_shrank_is_reported_not_spun_on() {
    let Some(pool) = have_huge_pages(4) else {
        return;
    };
    let mut ram = RegionConfig::new(0, 8 << 20);
    ram.backing = Backing::MemfdHugetlb;
    let fault = FaultConfig {
        on_unservable: Unservable::Report,
        failed_attempts: 2,
        ..FaultConfig::default()
    };
    let mem = std::sync::Arc::new(
        GuestMem::builder()
            .region(ram)
            .fault_config(fault)
            .build()
            .expect("hugetlbfs memory builds"),
    );
    if !mem.userfault_enabled() {
        eprintln!("skipped: no userfaultfd on hugetlbfs here");
        return;
    }
    // The host takes pages back from the pool under the running VM: two
    // are left for the four the guest's memory may use.
    let total = pool_total().unwrap();
    let free = free_huge_pages(HUGE).unwrap();
    std::fs::write(POOL, (total - free + 2).to_string()).unwrap();

    let (done_tx, done) = std::sync::mpsc::channel();
    let touching = mem.clone();
    std::thread::spawn(move || {
        for i in 0..3u64 {
            touching
                .memory()
                .memory()
                .write_obj(1u8, GuestAddress(i * HUGE))
                .unwrap();
        }
        let _ = done_tx.send(());
    });
    // The third page cannot be had: a failure is reported, and the thread
    // is not woken to fault again as fast as it can.
    let failure = mem
        .fault_failure()
        .expect("userfaultfd memory has a failure channel");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while failure.message().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let message = failure.message();
    let s = mem.stats();
    eprintln!("reported: {message:?}");
    assert!(message.is_some(), "no failure reported: {s}");
    std::thread::sleep(Duration::from_millis(500));
    let later = mem.stats();
    assert!(
        later.faults - s.faults < 1_000,
        "the thread kept faulting: {} faults in 0.5 s",
        later.faults - s.faults
    );
    // Pages back in the pool: the thread goes on.
    std::fs::write(POOL, (total + 8).to_string()).unwrap();
    done.recv_timeout(Duration::from_secs(10))
        .expect("the thread finished once the pool had pages again");
    drop(mem);
    drop(pool);
}
