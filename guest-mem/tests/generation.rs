//! Unit tests of the truncate generation through its public API. (They live
//! here, not in the module, because the model check compiles that module's
//! file against loom, where these would run outside a model.)

use guest_mem::generation::*;

#[test]
fn unchanged_when_nothing_ran() {
    let g = TruncateGen::new();
    let s = g.sample();
    assert_eq!(
        g.lock_install().recheck(s, FileRange::new(0, 4096)),
        Verdict::Unchanged
    );
}

#[test]
fn overlap_and_elsewhere_are_told_apart() {
    let g = TruncateGen::new();
    let s = g.sample();
    g.invalidate(FileRange::new(8192, 4096), || ());
    let guard = g.lock_install();
    assert_eq!(
        guard.recheck(s, FileRange::new(0, 4096)),
        Verdict::ChangedElsewhere
    );
    assert_eq!(
        guard.recheck(s, FileRange::new(4096, 8192)),
        Verdict::Overlapped
    );
    assert!(Verdict::ChangedElsewhere.must_retry(RetryPolicy::AnyInvalidation));
    assert!(!Verdict::ChangedElsewhere.must_retry(RetryPolicy::Overlapping));
}

#[test]
fn overrun_log_is_conservative() {
    let g = TruncateGen::new();
    let s = g.sample();
    for i in 0..LOG_CAPACITY as u64 {
        g.invalidate(FileRange::new((i + 10) * 4096, 4096), || ());
    }
    // Exactly the capacity: still precise.
    assert_eq!(
        g.lock_install().recheck(s, FileRange::new(0, 4096)),
        Verdict::ChangedElsewhere
    );
    g.invalidate(FileRange::new(1 << 30, 4096), || ());
    assert_eq!(
        g.lock_install().recheck(s, FileRange::new(0, 4096)),
        Verdict::Overlapped
    );
}

#[test]
fn count_is_odd_inside_and_even_after() {
    let g = TruncateGen::new();
    let inside = g.invalidate(FileRange::new(0, 1), || g.current());
    assert_eq!(inside % 2, 1);
    assert_eq!(g.current(), 2);
    assert_eq!(g.invalidations(), 1);
}

/// A panic inside an invalidation (the caller caught it) leaves the count
/// even and the log consistent: later faults sample without waiting, and
/// see the invalidation as one that happened.
#[test]
fn a_panicking_invalidation_still_ends() {
    let g = std::sync::Arc::new(TruncateGen::new());
    let s = g.sample();
    let g2 = g.clone();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        g2.invalidate(FileRange::new(0, 4096), || panic!("punch failed"))
    }));
    assert!(caught.is_err());
    assert_eq!(g.current() % 2, 0, "count left odd");
    // sample() would spin forever on an odd count; run it on a thread and
    // give it a second.
    let (tx, rx) = std::sync::mpsc::channel();
    let g3 = g.clone();
    std::thread::spawn(move || {
        let _ = tx.send(g3.sample());
    });
    let after = rx
        .recv_timeout(std::time::Duration::from_secs(1))
        .expect("sample returns after a panicked invalidation");
    assert_eq!(after.value(), 2);
    assert_eq!(
        g.lock_install().recheck(s, FileRange::new(0, 4096)),
        Verdict::Overlapped
    );
}
