//! Which guest accesses reach the VMM, and how often: under nested
//! virtualization every exit to userspace is expensive, so this is the
//! first thing to look at when a guest is slow. Logged per vCPU at debug
//! level when the vCPU stops.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

/// What kind of access left the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    PioIn,
    PioOut,
    MmioRead,
    MmioWrite,
    Other,
}

/// Exit counts per (kind, port or address), and the time spent handling them.
#[derive(Default)]
pub struct ExitProfile {
    counts: HashMap<(ExitKind, u64), u64>,
    handling: Duration,
}

impl ExitProfile {
    /// Counts one exit; `since` is when KVM_RUN returned.
    pub fn record(&mut self, kind: ExitKind, key: u64, since: Instant) {
        *self.counts.entry((kind, key)).or_default() += 1;
        self.handling += since.elapsed();
    }

    /// Total exits recorded.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

impl fmt::Display for ExitProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows: Vec<_> = self.counts.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        write!(
            f,
            "{} exits to the VMM, {:.1} ms handling them",
            self.total(),
            self.handling.as_secs_f64() * 1e3
        )?;
        for ((kind, key), n) in rows.iter().take(12) {
            write!(f, "; {kind:?} {key:#x}: {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_kind_and_key_most_frequent_first() {
        let mut p = ExitProfile::default();
        let now = Instant::now();
        for _ in 0..3 {
            p.record(ExitKind::PioOut, 0x3f8, now);
        }
        p.record(ExitKind::MmioRead, 0xd000_0000, now);
        assert_eq!(p.total(), 4);
        let s = p.to_string();
        assert!(s.starts_with("4 exits"), "{s}");
        let out = s.find("PioOut 0x3f8: 3").expect("port row");
        let mmio = s.find("MmioRead 0xd0000000: 1").expect("mmio row");
        assert!(out < mmio, "{s}");
    }
}
