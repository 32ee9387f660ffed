//! One rate limiter for every log line a guest can trigger.
//!
//! A hostile driver can make a device refuse something on every
//! notification; logging each refusal would let it fill the host's disk and
//! slow the event loop. Every such line goes through [`guest_warn!`](crate::guest_warn): a
//! token bucket shared by all devices lets a burst through, then about
//! [`RATE_PER_SEC`] lines a second, and says how many it held back. The
//! refusals themselves are always counted (each device's counters, shown by
//! the API), so nothing is lost but the text.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Lines let through at once after a quiet spell.
pub const BURST: f64 = 20.0;
/// Lines let through per second after the burst.
pub const RATE_PER_SEC: f64 = 5.0;

struct Bucket {
    tokens: f64,
    last: Option<Instant>,
    held_back: u64,
}

static BUCKET: Mutex<Bucket> = Mutex::new(Bucket {
    tokens: BURST,
    last: None,
    held_back: 0,
});
static HELD_BACK_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Whether a guest-triggered line may be logged now; if so, how many lines
/// were held back since the last one let through.
pub fn admit() -> Option<u64> {
    admit_at(Instant::now())
}

fn admit_at(now: Instant) -> Option<u64> {
    let mut b = BUCKET.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(last) = b.last {
        let refill = now.saturating_duration_since(last).as_secs_f64() * RATE_PER_SEC;
        b.tokens = (b.tokens + refill).min(BURST);
    }
    b.last = Some(now);
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        Some(std::mem::take(&mut b.held_back))
    } else {
        b.held_back += 1;
        HELD_BACK_TOTAL.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Guest-triggered lines held back since the VMM started.
pub fn held_back_total() -> u64 {
    HELD_BACK_TOTAL.load(Ordering::Relaxed)
}

/// Counts a refusal in `counter` and logs it through the rate limiter.
pub fn refuse(counter: &AtomicU64, line: std::fmt::Arguments<'_>) {
    counter.fetch_add(1, Ordering::Relaxed);
    crate::guest_warn!("{line}");
}

/// `log::warn!` for lines a guest can trigger, rate-limited by [`admit`].
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if let Some(held) = $crate::guest_log::admit() {
            if held > 0 {
                log::warn!("({held} guest-triggered log lines held back)");
            }
            log::warn!($($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_is_cut_to_the_burst_then_the_rate() {
        // One test touches the shared bucket, with explicit times.
        let t0 = Instant::now() + Duration::from_secs(3600);
        let before = held_back_total();
        let let_through = (0..10_000).filter(|_| admit_at(t0).is_some()).count();
        assert!(let_through <= BURST as usize, "{let_through} lines at once");
        assert!(held_back_total() - before >= 10_000 - BURST as u64);
        // A second later about RATE_PER_SEC more get through, and the first
        // one says how many were held back.
        let later = t0 + Duration::from_secs(1);
        let held = admit_at(later).expect("refilled");
        assert!(held >= 10_000 - BURST as u64, "{held}");
        let more = (0..100).filter(|_| admit_at(later).is_some()).count();
        assert!(more < RATE_PER_SEC as usize, "{more}");
    }
}
