//! Model check of the truncate-generation protocol with loom: every
//! interleaving of one fault and one invalidation (and, separately, a shrink
//! followed by a grow) is explored.
//!
//! Invariant: once the invalidation has completed, no contents fetched before
//! it are installed. The page's final state is never the stale image.
//!
//! The protocol is the crate's own `generation.rs`, compiled here against
//! loom's atomics and locks. The same models also run against the variant
//! without the re-check, and against a naive single bump-first counter, and
//! must find the violation there.

mod sync {
    pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
    pub(crate) use loom::sync::{RwLock, RwLockReadGuard};
}

#[path = "../src/generation.rs"]
#[allow(dead_code)]
mod generation;

use generation::{FileRange, RetryPolicy, Sample, TruncateGen};
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::{Arc, RwLock};
use loom::thread;

const HOLE: u64 = 0;
const IMAGE: u64 = 1;
const ZERO: u64 = 2;
const PAGE: FileRange = FileRange::new(0, 4096);

/// A one-page file: its page-cache state, the fault path's metadata (is the
/// image still the page's contents? is the page inside the file?), and the
/// protocol guarding them.
trait Protocol: Send + Sync + 'static {
    type Sample: Copy;
    fn sample(&self) -> Self::Sample;
    /// Runs `f` as an invalidation.
    fn invalidate(&self, f: &dyn Fn());
    /// Runs `install` under the install lock unless the re-check says retry;
    /// returns false to retry.
    fn install_if_valid(&self, sample: Self::Sample, install: &dyn Fn()) -> bool;
}

struct Real {
    gen: TruncateGen,
    recheck: bool,
}

impl Protocol for Real {
    type Sample = Sample;
    fn sample(&self) -> Sample {
        self.gen.sample()
    }
    fn invalidate(&self, f: &dyn Fn()) {
        self.gen.invalidate(PAGE, f)
    }
    fn install_if_valid(&self, sample: Sample, install: &dyn Fn()) -> bool {
        let guard = self.gen.lock_install();
        let verdict = guard.recheck(sample, PAGE);
        if self.recheck && verdict.must_retry(RetryPolicy::Overlapping) {
            return false;
        }
        install();
        true
    }
}

/// The 2003 design taken literally: one counter bumped before the zap, and
/// no odd "in progress" state.
struct Naive {
    count: AtomicU64,
    lock: RwLock<()>,
}

impl Protocol for Naive {
    type Sample = u64;
    fn sample(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
    fn invalidate(&self, f: &dyn Fn()) {
        let _w = self.lock.write().unwrap();
        self.count.fetch_add(1, Ordering::Release);
        f();
    }
    fn install_if_valid(&self, sample: u64, install: &dyn Fn()) -> bool {
        let _r = self.lock.read().unwrap();
        if self.count.load(Ordering::Acquire) != sample {
            return false;
        }
        install();
        true
    }
}

struct File<P> {
    proto: P,
    /// Page-cache state: HOLE, IMAGE or ZERO.
    page: AtomicU64,
    /// Metadata read during the fetch: the page still holds image contents
    /// (cleared by a discard or shrink).
    image_valid: AtomicBool,
    /// Metadata: the page lies inside the file.
    in_file: AtomicBool,
}

impl<P: Protocol> File<P> {
    fn new(proto: P) -> Self {
        File {
            proto,
            page: AtomicU64::new(HOLE),
            image_valid: AtomicBool::new(true),
            in_file: AtomicBool::new(true),
        }
    }

    /// The fault path: sample, fetch with no lock held, re-check, install
    /// (as UFFDIO_COPY does: only into a hole).
    fn fault(&self) {
        loop {
            let s = self.proto.sample();
            if !self.in_file.load(Ordering::Acquire) {
                return; // out of range: reported, nothing installed
            }
            let contents = if self.image_valid.load(Ordering::Acquire) {
                IMAGE
            } else {
                ZERO
            };
            let installed = self.proto.install_if_valid(s, &|| {
                if self.page.load(Ordering::Relaxed) == HOLE {
                    self.page.store(contents, Ordering::Relaxed);
                }
            });
            if installed {
                return;
            }
        }
    }

    fn discard(&self) {
        self.proto.invalidate(&|| {
            self.image_valid.store(false, Ordering::Release);
            self.page.store(HOLE, Ordering::Relaxed);
        });
    }

    fn shrink_then_grow(&self) {
        self.proto.invalidate(&|| {
            self.image_valid.store(false, Ordering::Release);
            self.in_file.store(false, Ordering::Release);
            self.page.store(HOLE, Ordering::Relaxed);
        });
        // Growing takes nothing away: not an invalidation.
        self.in_file.store(true, Ordering::Release);
    }
}

fn check<P: Protocol>(make: fn() -> P, shrink: bool) {
    loom::model(move || {
        let file = Arc::new(File::new(make()));
        let f = file.clone();
        let fault = thread::spawn(move || f.fault());
        if shrink {
            file.shrink_then_grow();
        } else {
            file.discard();
        }
        fault.join().unwrap();
        assert_ne!(
            file.page.load(Ordering::Relaxed),
            IMAGE,
            "stale image contents installed after the invalidation completed"
        );
    });
}

fn real() -> Real {
    Real {
        gen: TruncateGen::new(),
        recheck: true,
    }
}

fn without_recheck() -> Real {
    Real {
        gen: TruncateGen::new(),
        recheck: false,
    }
}

fn naive() -> Naive {
    Naive {
        count: AtomicU64::new(0),
        lock: RwLock::new(()),
    }
}

fn violates(f: impl FnOnce() + std::panic::UnwindSafe) -> bool {
    std::panic::catch_unwind(f).is_err()
}

#[test]
fn discard_never_lets_stale_contents_in() {
    check(real, false);
}

#[test]
fn shrink_and_grow_never_let_stale_contents_in() {
    check(real, true);
}

#[test]
fn without_the_recheck_the_model_finds_the_race() {
    assert!(violates(|| check(without_recheck, false)));
    assert!(violates(|| check(without_recheck, true)));
}

#[test]
fn a_single_bump_first_counter_misses_metadata_written_after_it() {
    // Why the generation is a sequence count: with one bump before the
    // metadata changes, a fault can sample the new count, read the old
    // metadata, and pass the re-check.
    assert!(violates(|| check(naive, false)));
}
