//! A fault whose fetch an invalidation overlapped settles it under the
//! install lock from the backing file's discard map, instead of fetching
//! again: it never retries a fetch because of an invalidation and never
//! holds the lock across one. And the map belongs to the file, so every
//! region over it sees every discard.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{Backing, BackingFile, GuestMem, Readahead, RegionConfig, RegionSource};

/// The fault on page 8 fetches a 4-page window; while the fetch is held,
/// `meanwhile` runs. Returns (memory, what the fault read, fetches made).
fn held_fetch(meanwhile: impl FnOnce(&Arc<GuestMem>)) -> (Arc<GuestMem>, u64, u64) {
    let (src, gate) = GatedSource::new(Box::new(PatternSource { len: 64 * PAGE }), 8 * PAGE);
    let mem = Arc::new(memory(
        64,
        src.clone(),
        false,
        config(Readahead::fixed(4 * PAGE), false),
    ));
    let t = {
        let mem = mem.clone();
        thread::spawn(move || read_page(&mem, 8))
    };
    gate.fetched.recv().unwrap();
    meanwhile(&mem);
    gate.release.send(()).unwrap();
    let read = t.join().unwrap();
    (mem, read, src.fetches.load(Ordering::SeqCst))
}

#[test]
fn a_page_given_back_during_its_fetch_gets_zero_without_a_second_fetch() {
    let (mem, read, fetches) = held_fetch(|mem| {
        mem.discard(GuestAddress(8 * PAGE), PAGE).unwrap();
    });
    assert_eq!(read, 0, "the discarded page reads zero");
    assert_eq!(fetches, 1, "settled under the lock, not fetched again");
    let s = mem.stats();
    assert_eq!((s.retries, s.resolved_under_lock), (1, 1), "{s}");
    assert!(
        !page_has_data(&mem, 9),
        "no readahead past the settled page"
    );
}

#[test]
fn a_neighbour_given_back_keeps_the_fetched_pages_before_it() {
    let (mem, read, fetches) = held_fetch(|mem| {
        mem.discard(GuestAddress(10 * PAGE), PAGE).unwrap();
    });
    assert_eq!(read, pattern_word(8));
    assert_eq!(fetches, 1);
    assert!(page_has_data(&mem, 9), "page 9 was untouched: installed");
    assert!(!page_has_data(&mem, 10), "page 10 stays a hole");
    assert!(!page_has_data(&mem, 11), "nothing past the hole");
    assert_eq!(read_page(&mem, 10), 0);
}

/// A storm of discards elsewhere overruns the invalidation log (the
/// re-check then cannot tell where they were): still one fetch, and the
/// fetched pages, none of which was discarded, are installed.
#[test]
fn a_storm_that_overruns_the_log_costs_no_second_fetch() {
    let (mem, read, fetches) = held_fetch(|mem| {
        for p in 32..64 {
            for _ in 0..4 {
                mem.discard(GuestAddress(p * PAGE), PAGE).unwrap();
            }
        }
    });
    assert_eq!(read, pattern_word(8));
    assert_eq!(fetches, 1);
    assert_eq!(mem.stats().resolved_under_lock, 1);
}

/// While a fault's fetch is held for as long as the test likes, discards of
/// the very pages it fetched complete at once: no lock is held across a
/// fetch, ever.
#[test]
fn discards_never_wait_for_a_slow_fetch() {
    let (_, read, fetches) = held_fetch(|mem| {
        let discarder = {
            let mem = mem.clone();
            thread::spawn(move || {
                for _ in 0..20 {
                    mem.discard(GuestAddress(8 * PAGE), 4 * PAGE).unwrap();
                }
            })
        };
        // The fetch is still held; the discards must not need it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !discarder.is_finished() && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(discarder.is_finished(), "discards blocked behind a fetch");
    });
    assert_eq!(read, 0);
    assert_eq!(fetches, 1);
}

/// Two regions map the same file range (at two guest addresses): a discard
/// through one must read zero through the other, which reads the same
/// file's discard map.
#[test]
fn two_regions_over_one_file_range_share_its_discard_map() {
    let file = Arc::new(BackingFile::memfd("shared", 64 * PAGE).unwrap());
    let region = |gpa: u64| {
        let mut rc = RegionConfig::new(gpa, 64 * PAGE);
        rc.backing = Backing::Shared {
            file: file.clone(),
            offset: 0,
        };
        rc.source = Some(RegionSource {
            source: Arc::new(PatternSource { len: 64 * PAGE }),
            offset: 0,
        });
        rc
    };
    let b_base = 1 << 30;
    let mem = GuestMem::builder()
        .region(region(0))
        .region(region(b_base))
        .fault_config(config(Readahead::NONE, false))
        .build()
        .unwrap();
    let ram = mem.memory().memory();
    mem.discard(GuestAddress(5 * PAGE), PAGE).unwrap();
    let through_b: u64 = ram.read_obj(GuestAddress(b_base + 5 * PAGE)).unwrap();
    assert_eq!(
        through_b, 0,
        "the other region refilled a discarded page from the source"
    );
    let through_a: u64 = ram.read_obj(GuestAddress(5 * PAGE)).unwrap();
    assert_eq!(through_a, 0);
    // An untouched page still comes from the source, through either.
    let p: u64 = ram.read_obj(GuestAddress(b_base + 6 * PAGE)).unwrap();
    assert_eq!(p, pattern_word(6));
}
