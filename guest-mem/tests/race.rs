//! Deterministic races between a fault whose fetch is held by a gate and a
//! discard or shrink that lands meanwhile. Each scenario runs twice: with
//! the generation re-check (the stray page must not appear) and with it
//! switched off (the stray page must appear, proving the test sees the race).

mod common;

use std::sync::Arc;
use std::thread;

use common::*;
use guest_mem::vm_memory::GuestAddress;
use guest_mem::{GuestMem, Readahead};

/// What a scenario observed.
#[derive(Debug)]
struct Observed {
    /// The word the faulting thread read.
    touched: u64,
    /// The fault handler's retry count.
    retries: u64,
    /// Scenario-specific facts checked after the race.
    page_has_data: bool,
    after: u64,
}

/// Touches `touch` on a thread, holds its fetch, runs `meanwhile`, releases.
fn race(
    pages: u64,
    touch: u64,
    readahead: Readahead,
    private: bool,
    skip_recheck: bool,
    meanwhile: impl FnOnce(&GuestMem),
    check_page: u64,
) -> Observed {
    let (src, gate) = GatedSource::new(Box::new(PatternSource { len: pages * PAGE }), touch * PAGE);
    let mem = Arc::new(memory(pages, src, private, config(readahead, skip_recheck)));
    let toucher = {
        let mem = mem.clone();
        thread::spawn(move || read_page(&mem, touch))
    };
    gate.fetched.recv().expect("the fetch never started");
    meanwhile(&mem);
    gate.release.send(()).unwrap();
    let touched = toucher.join().expect("toucher panicked");
    let has_data = page_has_data(&mem, check_page);
    let after = read_page(&mem, check_page);
    Observed {
        touched,
        retries: mem.stats().retries,
        page_has_data: has_data,
        after,
    }
}

fn discard_own_page(skip_recheck: bool) -> Observed {
    race(
        64,
        5,
        Readahead::NONE,
        false,
        skip_recheck,
        |mem| mem.discard(GuestAddress(5 * PAGE), PAGE).unwrap(),
        5,
    )
}

#[test]
fn discard_during_fetch_drops_the_stale_page() {
    let on = discard_own_page(false);
    assert_eq!(on.touched, 0, "the discarded page must read zero");
    assert!(on.retries >= 1, "the handler must have retried: {on:?}");
    let off = discard_own_page(true);
    assert_eq!(
        off.touched,
        pattern_word(5),
        "without the re-check the stale contents come back: {off:?}"
    );
    assert_eq!(off.retries, 0);
}

fn discard_readahead_neighbour(skip_recheck: bool, private: bool) -> Observed {
    race(
        64,
        8,
        Readahead::fixed(4 * PAGE),
        private,
        skip_recheck,
        |mem| mem.discard(GuestAddress(10 * PAGE), PAGE).unwrap(),
        10,
    )
}

#[test]
fn discard_of_a_readahead_page_stays_a_hole() {
    let on = discard_readahead_neighbour(false, false);
    assert_eq!(on.touched, pattern_word(8));
    assert!(
        !on.page_has_data,
        "the punched page was filled again: {on:?}"
    );
    assert!(on.retries >= 1);
    let off = discard_readahead_neighbour(true, false);
    assert!(
        off.page_has_data,
        "without the re-check readahead refills the hole: {off:?}"
    );
    assert_eq!(
        off.after,
        pattern_word(10),
        "and the stale contents are back"
    );
}

/// A private region's discard leaves its file alone and maps the zero page
/// over the range inside the invalidation, so a readahead install racing
/// with it stops at that page (`EEXIST`): the page reads zero even with
/// the re-check off, and the file never holds it.
#[test]
fn discard_of_a_private_readahead_page_reads_zero() {
    for skip_recheck in [false, true] {
        let seen = discard_readahead_neighbour(skip_recheck, true);
        assert_eq!(seen.touched, pattern_word(8));
        assert_eq!(
            seen.after, 0,
            "the discarded private page must read zero (re-check off: {skip_recheck}): {seen:?}"
        );
        assert!(!seen.page_has_data);
    }
}

fn shrink_then_grow(skip_recheck: bool) -> Observed {
    race(
        64,
        40,
        Readahead::NONE,
        false,
        skip_recheck,
        |mem| {
            mem.resize(guest_mem::RegionIndex(0), 32 * PAGE).unwrap();
            mem.resize(guest_mem::RegionIndex(0), 64 * PAGE).unwrap();
        },
        40,
    )
}

#[test]
fn shrink_and_regrow_during_fetch_reads_zero() {
    let on = shrink_then_grow(false);
    assert_eq!(on.touched, 0, "the regrown page must read zero: {on:?}");
    assert!(on.retries >= 1);
    let off = shrink_then_grow(true);
    assert_eq!(
        off.touched,
        pattern_word(40),
        "without the re-check the truncated contents come back: {off:?}"
    );
    assert!(off.page_has_data);
}

/// A private (copy-on-write) region never truncates or extends its file,
/// so it cannot be resized; a discard drops only the VMM's copy.
#[test]
fn a_private_region_is_never_resized() {
    let mem = memory(
        64,
        Arc::new(PatternSource { len: 64 * PAGE }),
        true,
        config(Readahead::NONE, false),
    );
    assert!(matches!(
        mem.resize(guest_mem::RegionIndex(0), 32 * PAGE),
        Err(guest_mem::Error::NotResizable(guest_mem::RegionIndex(0)))
    ));
    assert_eq!(mem.regions()[0].backing().size(), 64 * PAGE);
}

#[test]
fn invalidation_elsewhere_does_not_retry_under_the_range_policy() {
    // A discard far from the install range: the precise policy installs
    // without retrying; the per-file policy retries spuriously.
    let run = |policy| {
        let (src, gate) = GatedSource::new(Box::new(PatternSource { len: 64 * PAGE }), 3 * PAGE);
        let mut cfg = config(Readahead::NONE, false);
        cfg.retry_policy = policy;
        let mem = Arc::new(memory(64, src, false, cfg));
        let t = {
            let mem = mem.clone();
            thread::spawn(move || read_page(&mem, 3))
        };
        gate.fetched.recv().unwrap();
        mem.discard(GuestAddress(50 * PAGE), PAGE).unwrap();
        gate.release.send(()).unwrap();
        assert_eq!(t.join().unwrap(), pattern_word(3));
        mem.stats()
    };
    let precise = run(guest_mem::RetryPolicy::Overlapping);
    assert_eq!(precise.retries, 0);
    assert_eq!(precise.retries_avoided, 1);
    let per_file = run(guest_mem::RetryPolicy::AnyInvalidation);
    assert_eq!(per_file.retries, 1);
    assert_eq!(per_file.spurious_retries, 1);
}
