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

/// Distinct (kind, port or address) keys kept; the guest chooses the
/// addresses it touches, so exits at further keys are only counted in all.
pub const MAX_KEYS: usize = 256;

/// Exit counts per (kind, port or address), and the time spent handling them.
/// A profile made disabled costs nothing per exit: no clock read, no count.
#[derive(Default)]
pub struct ExitProfile {
    enabled: bool,
    counts: HashMap<(ExitKind, u64), u64>,
    /// Exits at keys beyond the first [`MAX_KEYS`].
    elsewhere: u64,
    handling: Duration,
}

impl ExitProfile {
    /// A profile that counts exits if `enabled`.
    pub fn new(enabled: bool) -> Self {
        ExitProfile {
            enabled,
            ..ExitProfile::default()
        }
    }

    /// Whether exits are counted.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The time KVM_RUN returned, for [`record`](Self::record), when enabled.
    pub fn clock(&self) -> Option<Instant> {
        self.enabled.then(Instant::now)
    }

    /// Counts one exit; `since` is what [`clock`](Self::clock) gave when
    /// KVM_RUN returned (nothing is counted without it).
    pub fn record(&mut self, kind: ExitKind, key: u64, since: Option<Instant>) {
        let Some(since) = since else {
            return;
        };
        let full = self.counts.len() >= MAX_KEYS;
        match self.counts.get_mut(&(kind, key)) {
            Some(n) => *n += 1,
            None if full => self.elsewhere += 1,
            None => {
                self.counts.insert((kind, key), 1);
            }
        }
        self.handling += since.elapsed();
    }

    /// Total exits recorded.
    pub fn total(&self) -> u64 {
        self.counts.values().sum::<u64>() + self.elsewhere
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
        if self.elsewhere > 0 {
            write!(f, "; at {MAX_KEYS}+ other places: {}", self.elsewhere)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_kind_and_key_most_frequent_first() {
        let mut p = ExitProfile::new(true);
        let now = p.clock();
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

    #[test]
    fn a_guest_touching_endless_addresses_cannot_grow_it() {
        let mut p = ExitProfile::new(true);
        let now = p.clock();
        for addr in 0..10 * MAX_KEYS as u64 {
            p.record(ExitKind::MmioWrite, 0xe000_0000 + addr * 8, now);
        }
        // A key seen before the cap still counts on its own row.
        p.record(ExitKind::MmioWrite, 0xe000_0000, now);
        assert_eq!(p.counts.len(), MAX_KEYS);
        assert_eq!(p.total(), 10 * MAX_KEYS as u64 + 1);
        assert_eq!(p.counts[&(ExitKind::MmioWrite, 0xe000_0000)], 2);
        assert!(p.to_string().contains("other places: 2304"), "{p}");
    }

    #[test]
    fn a_disabled_profile_counts_nothing() {
        let mut p = ExitProfile::new(false);
        let now = p.clock();
        assert!(now.is_none());
        p.record(ExitKind::PioOut, 0x3f8, now);
        assert_eq!(p.total(), 0);
    }
}
