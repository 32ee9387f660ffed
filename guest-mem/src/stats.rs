//! Counters and a latency histogram for fault service and discards.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Sub-buckets per power of two in the latency histogram (~19% wide each).
const SUB: u32 = 4;
const BUCKETS: usize = 64 * SUB as usize;

/// A lock-free log-linear histogram of durations in nanoseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < 4 {
        return ns as usize;
    }
    let log = 63 - ns.leading_zeros();
    // The two bits below the leading one pick the sub-bucket.
    let frac = ((ns >> (log - 2)) & (SUB as u64 - 1)) as u32;
    ((log * SUB + frac) as usize).min(BUCKETS - 1)
}

fn bucket_floor(b: usize) -> u64 {
    if b < 4 {
        return b as u64;
    }
    let log = (b as u32 / SUB).max(2);
    let frac = if b < 8 { 0 } else { b as u64 % SUB as u64 };
    (1u64 << log) + (frac << (log - 2))
}

impl Histogram {
    /// Records one duration. The count goes last, with release: a reader
    /// that sees it (with acquire) sees everything the recording thread
    /// counted before.
    pub fn record(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Release);
    }

    /// A consistent-enough copy for reporting. The count is read first:
    /// every recording it includes is in the other fields too.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let count = self.count.load(Ordering::Acquire);
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| -> u64 {
            if total == 0 {
                return 0;
            }
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    // Midpoint of the bucket.
                    let lo = bucket_floor(i);
                    let hi = if i + 1 < BUCKETS {
                        bucket_floor(i + 1)
                    } else {
                        lo
                    };
                    return lo + (hi - lo) / 2;
                }
            }
            0
        };
        HistogramSnapshot {
            count,
            mean_ns: self
                .sum_ns
                .load(Ordering::Relaxed)
                .checked_div(count)
                .unwrap_or(0),
            p50_ns: quantile(0.50),
            p90_ns: quantile(0.90),
            p99_ns: quantile(0.99),
            max_ns: self.max_ns.load(Ordering::Relaxed),
            buckets: counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| (bucket_floor(i), c))
                .collect(),
        }
    }
}

/// Summary of a [`Histogram`].
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Number of samples.
    pub count: u64,
    /// Mean, in nanoseconds.
    pub mean_ns: u64,
    /// Median, in nanoseconds (bucket midpoint).
    pub p50_ns: u64,
    /// 90th percentile, in nanoseconds.
    pub p90_ns: u64,
    /// 99th percentile, in nanoseconds.
    pub p99_ns: u64,
    /// Largest sample, in nanoseconds.
    pub max_ns: u64,
    /// Non-empty buckets as (lower bound in ns, count).
    pub buckets: Vec<(u64, u64)>,
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters, updated by the fault handler and the discard paths.
        ///
        /// A fault's counters are updated just after its thread is woken, so a
        /// snapshot taken the instant a touch returns may lag by that fault.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
            /// Time from reading a fault event to waking the faulting thread.
            pub fault_latency: Histogram,
        }

        /// A copy of [`Stats`] at one moment.
        #[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
            /// Fault service latency.
            pub fault_latency: HistogramSnapshot,
        }

        impl Stats {
            /// Copies every counter. The latency histogram is read first:
            /// a fault records its latency after the rest of its
            /// bookkeeping, so every fault the copy counts as finished has
            /// its pages and installs in the copy too (read last, the
            /// histogram could count a fault whose pages the copy missed).
            pub fn snapshot(&self) -> StatsSnapshot {
                let fault_latency = self.fault_latency.snapshot();
                StatsSnapshot {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                    fault_latency,
                }
            }
        }

        impl fmt::Display for StatsSnapshot {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                $( writeln!(f, "{:<22} {:>12}", stringify!($name), self.$name)?; )*
                let h = &self.fault_latency;
                write!(
                    f,
                    "{:<22} n={} mean={:.1}us p50={:.1}us p90={:.1}us p99={:.1}us max={:.1}us",
                    "fault_latency", h.count,
                    h.mean_ns as f64 / 1e3, h.p50_ns as f64 / 1e3, h.p90_ns as f64 / 1e3,
                    h.p99_ns as f64 / 1e3, h.max_ns as f64 / 1e3,
                )
            }
        }
    };
}

counters! {
    /// Fault events read from userfaultfd.
    faults,
    /// Of those, minor faults (page cache already had the page).
    minor_faults,
    /// Installs with `UFFDIO_COPY` (contents from a source).
    installs_copy,
    /// Installs with `UFFDIO_ZEROPAGE` (or a zero `UFFDIO_COPY` on hugetlbfs).
    installs_zero,
    /// Installs with `UFFDIO_CONTINUE` (minor faults).
    installs_continue,
    /// Pages installed in all, the faulting ones and readahead.
    pages_installed,
    /// Pages installed ahead of the faulting one.
    readahead_pages,
    /// Huge pages of fresh shmem memory filled whole instead of installed
    /// page by page (their pages count as installed).
    huge_fills,
    /// Installs that found the faulting page already there (`EEXIST`).
    already_present,
    /// Fetched contents dropped because an invalidation overlapped them.
    retries,
    /// Retries whose install range no invalidation since the sample touched
    /// (made only under `RetryPolicy::AnyInvalidation`). A retry after more
    /// invalidations than the log holds counts as needed, so this is a lower
    /// bound.
    spurious_retries,
    /// Invalidations seen by the re-check that did not overlap the install,
    /// so no retry was needed.
    retries_avoided,
    /// Faults whose fetch an invalidation overlapped, settled under the
    /// install lock from the discard map (installed zero, or the pages the
    /// invalidation did not touch) instead of fetching again.
    resolved_under_lock,
    /// Faults beyond the backing file's end: reported, woken, not installed.
    out_of_range,
    /// Faults at addresses no region covers.
    unknown_address,
    /// Faults at memory kept out of reach (virtio-mem blocks not plugged):
    /// never served; poisoned where the handler poisons, else woken.
    unreachable,
    /// Source fetch failures (the faulting thread is woken, not served).
    fetch_errors,
    /// Install ioctls that failed for another reason than `EEXIST`.
    install_errors,
    /// Pages poisoned (`UFFDIO_POISON`) because their fetch or install kept
    /// failing.
    pages_poisoned,
    /// Discard (hole punch) operations.
    discards,
    /// Bytes discarded.
    bytes_discarded,
    /// Shrinks (truncations).
    shrinks,
    /// Bytes truncated away by shrinks.
    bytes_truncated,
    /// Grows.
    grows,
    /// Installs the kernel held back (`EAGAIN`) until the events pending on
    /// the userfaultfd were read; each was retried after reading them.
    installs_held_back,
    /// Messages read from the userfaultfd that could not be decoded.
    bad_events,
    /// `UFFD_EVENT_REMOVE`s applied (another process's `MADV_DONTNEED`,
    /// a balloon inflating): each one invalidation.
    remove_events,
    /// Pages those remove events gave back; they read zero from then on.
    pages_removed,
    /// `UFFD_EVENT_UNMAP`s applied.
    unmap_events,
    /// `UFFD_EVENT_REMAP`s applied.
    remap_events,
}

impl Stats {
    /// A copy once every fault counted so far has finished its bookkeeping
    /// (which runs just after the faulting thread is woken), or the copy at
    /// `timeout`. Every fault ends by recording its latency, but one at an
    /// address outside every region, which is counted there instead.
    ///
    /// ```
    /// use guest_mem::Stats;
    /// use std::sync::atomic::Ordering;
    /// use std::time::Duration;
    ///
    /// let stats = Stats::default();
    /// stats.faults.fetch_add(1, Ordering::Relaxed);
    /// // The fault is not finished: the copy comes at the timeout.
    /// assert_eq!(stats.settled(Duration::from_millis(1)).fault_latency.count, 0);
    /// stats.pages_installed.fetch_add(1, Ordering::Relaxed);
    /// stats.fault_latency.record(Duration::from_micros(3));
    /// let s = stats.settled(Duration::from_secs(1));
    /// assert_eq!((s.faults, s.pages_installed, s.fault_latency.count), (1, 1, 1));
    /// ```
    pub fn settled(&self, timeout: Duration) -> StatsSnapshot {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if s.fault_latency.count + s.unknown_address >= s.faults
                || std::time::Instant::now() >= deadline
            {
                return s;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover_values() {
        let mut last = 0;
        for ns in [1u64, 2, 3, 5, 8, 100, 1000, 4095, 4096, 1 << 20, 1 << 40] {
            let b = bucket_of(ns);
            assert!(b >= last, "bucket of {ns} went backwards");
            last = b;
            assert!(bucket_floor(b) <= ns, "floor of bucket of {ns} above it");
            if b + 1 < BUCKETS {
                assert!(bucket_floor(b + 1) > ns, "{ns} past its bucket");
            }
        }
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(5));
        h.record(Duration::from_millis(5));
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert!((8_000..=12_000).contains(&s.p50_ns), "p50 {}", s.p50_ns);
        assert!(
            (4_000_000..=6_000_000).contains(&s.p99_ns),
            "p99 {}",
            s.p99_ns
        );
        assert_eq!(s.max_ns, 5_000_000);
    }

    #[test]
    fn a_snapshot_that_counts_a_fault_finished_has_its_pages() {
        // A handler thread counts a fault, its page, then its latency,
        // as serve does; the snapshots taken meanwhile must never show
        // the fault finished and its page missing.
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let stats = Arc::new(Stats::default());
        let done = Arc::new(AtomicBool::new(false));
        let handler = {
            let (stats, done) = (stats.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..300_000 {
                    stats.faults.fetch_add(1, Ordering::Relaxed);
                    stats.pages_installed.fetch_add(1, Ordering::Relaxed);
                    stats.fault_latency.record(Duration::from_nanos(1));
                }
                done.store(true, Ordering::Release);
            })
        };
        let (mut finished, mut torn) = (0u64, 0u64);
        while !done.load(Ordering::Acquire) {
            let s = stats.snapshot();
            if s.fault_latency.count >= s.faults {
                finished += 1;
                torn += u64::from(s.pages_installed < s.faults);
            }
        }
        handler.join().unwrap();
        assert!(finished > 0, "no snapshot saw every fault finished");
        assert_eq!(
            torn, 0,
            "{torn} of {finished} finished snapshots missed pages"
        );
    }
}
