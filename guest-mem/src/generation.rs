//! The truncate generation: one per backing file.
//!
//! This is the userspace form of Linux's `address_space->truncate_count`.
//! An invalidation (hole punch, truncate) and a fault that fetched page
//! contents without holding any lock must never let the fault install what it
//! fetched into a range the invalidation removed meanwhile.
//!
//! ```text
//! invalidate(range):                     serve_fault(range):
//!   lock exclusive                         s = sample()        (waits out an odd value)
//!   gen += 1   (odd: in progress)          fetch contents      (no lock held)
//!   record range in the log                lock shared
//!   update metadata, punch, zap            if changed_since(s) and an invalidation in the
//!   gen += 1   (even: done)                   log overlaps range: drop contents, retry
//!   unlock                                 install
//! ```
//!
//! Two refinements over a single bump-before-zap counter:
//! - The counter is a sequence count (odd while an invalidation runs). The
//!   fault path reads metadata that the invalidation changes (the file size,
//!   the discard map) *during its lock-free fetch*; a fault that sampled just
//!   after a lone first bump could read metadata not yet written and still
//!   pass the re-check. With the count odd for the whole critical section,
//!   every metadata change falls inside one "changed" interval.
//! - The ranges of the most recent invalidations are kept in a small log, so
//!   a fault whose install range did not overlap any invalidation since its
//!   sample need not retry (a *spurious* retry with one counter per file).
//!   When the log has been overrun, the check falls back to "retry".
//!
//! This module only uses `crate::sync`, so that the model checker can
//! compile it against its own atomics and locks (see `tests/model_check.rs`).

use crate::sync::{AtomicU64, Ordering, RwLock, RwLockReadGuard};

/// How many invalidation ranges are remembered for the precise check.
pub const LOG_CAPACITY: usize = 64;

/// A half-open byte range `[start, end)` of a backing file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileRange {
    /// First byte of the range.
    pub start: u64,
    /// One past the last byte of the range.
    pub end: u64,
}

impl FileRange {
    /// The range `[start, start + len)`.
    pub const fn new(start: u64, len: u64) -> Self {
        FileRange {
            start,
            end: start.saturating_add(len),
        }
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range is empty.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether two ranges share at least one byte.
    pub const fn overlaps(&self, other: &FileRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// What the re-check under the install lock found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No invalidation since the sample: install.
    Unchanged,
    /// Invalidations ran since the sample, none of them over this range.
    ChangedElsewhere,
    /// An invalidation since the sample overlapped this range, or the log no
    /// longer covers the whole interval: the fetched contents may be stale.
    Overlapped,
}

/// Which invalidations force a fault to drop what it fetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Retry after any invalidation of the file (the 2003 design).
    AnyInvalidation,
    /// Retry only after an invalidation that overlapped the install range.
    #[default]
    Overlapping,
}

impl Verdict {
    /// Whether a fault must drop its contents and retry under `policy`.
    pub fn must_retry(self, policy: RetryPolicy) -> bool {
        match (self, policy) {
            (Verdict::Unchanged, _) => false,
            (Verdict::Overlapped, _) => true,
            (Verdict::ChangedElsewhere, RetryPolicy::AnyInvalidation) => true,
            (Verdict::ChangedElsewhere, RetryPolicy::Overlapping) => false,
        }
    }
}

/// A generation sampled before a lock-free fetch. Always even.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample(u64);

impl Sample {
    /// The sampled sequence count.
    pub fn value(self) -> u64 {
        self.0
    }
}

#[derive(Debug)]
struct InvalidationLog {
    /// Entry `n % LOG_CAPACITY` holds the range of invalidation number `n`
    /// (the n-th invalidation ends with the count at `2 * n`).
    ranges: [FileRange; LOG_CAPACITY],
}

/// The per-file truncate generation and its install lock.
#[derive(Debug)]
pub struct TruncateGen {
    seq: AtomicU64,
    install: RwLock<InvalidationLog>,
}

impl Default for TruncateGen {
    fn default() -> Self {
        Self::new()
    }
}

impl TruncateGen {
    /// A generation at zero with an empty log.
    pub fn new() -> Self {
        TruncateGen {
            seq: AtomicU64::new(0),
            install: RwLock::new(InvalidationLog {
                ranges: [FileRange::default(); LOG_CAPACITY],
            }),
        }
    }

    /// The current sequence count (odd while an invalidation is running).
    pub fn current(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// How many invalidations have completed.
    pub fn invalidations(&self) -> u64 {
        self.current() / 2
    }

    /// Samples the generation before a fetch. If an invalidation is running,
    /// waits for it to finish (by taking the install lock shared) rather than
    /// fetching contents that are certain to be dropped.
    pub fn sample(&self) -> Sample {
        loop {
            let s = self.seq.load(Ordering::Acquire);
            if s % 2 == 0 {
                return Sample(s);
            }
            drop(self.lock_install());
        }
    }

    /// Runs `invalidate` (update metadata, punch, truncate, zap) as one
    /// invalidation of `range`: exclusive against installs, and visible to
    /// every fault that sampled the generation before it finished.
    pub fn invalidate<R>(&self, range: FileRange, invalidate: impl FnOnce() -> R) -> R {
        let mut log = self
            .install
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = self.seq.load(Ordering::Relaxed);
        debug_assert!(start % 2 == 0, "invalidation entered with an odd count");
        let number = start / 2 + 1;
        log.ranges[(number % LOG_CAPACITY as u64) as usize] = range;
        self.seq.store(start + 1, Ordering::Release);
        // Even again however `invalidate` ends: a panic in it (guest-mem is
        // a library; the caller may catch it) must not leave the count odd,
        // which would make every later fault wait forever in `sample`.
        struct Close<'a>(&'a AtomicU64, u64);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.store(self.1, Ordering::Release);
            }
        }
        let _close = Close(&self.seq, start + 2);
        invalidate()
    }

    /// Takes the install lock shared: while it is held no invalidation of this
    /// file can start or be in progress.
    pub fn lock_install(&self) -> InstallGuard<'_> {
        InstallGuard {
            gen: self,
            log: self
                .install
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }
}

/// Proof that no invalidation of the file is running; installs happen while
/// one of these is held.
pub struct InstallGuard<'a> {
    gen: &'a TruncateGen,
    log: RwLockReadGuard<'a, InvalidationLog>,
}

impl InstallGuard<'_> {
    /// Compares the generation with `sample` and, if it moved, looks up the
    /// invalidations since then for one that overlaps `range`.
    pub fn recheck(&self, sample: Sample, range: FileRange) -> Verdict {
        // Relaxed is enough: the lock orders us after every completed
        // invalidation, and none can be in progress while we hold it.
        let now = self.gen.seq.load(Ordering::Relaxed);
        if now == sample.0 {
            return Verdict::Unchanged;
        }
        let (first, last) = (sample.0 / 2 + 1, now / 2);
        if last - first >= LOG_CAPACITY as u64 {
            return Verdict::Overlapped;
        }
        let overlapped = (first..=last)
            .any(|n| self.log.ranges[(n % LOG_CAPACITY as u64) as usize].overlaps(&range));
        if overlapped {
            Verdict::Overlapped
        } else {
            Verdict::ChangedElsewhere
        }
    }
}
