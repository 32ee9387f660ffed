//! The host side of the stress run: moves the guest's hot spot, changes
//! the balloon target, shrinks and grows the window (with the guest's
//! acknowledgement before every shrink), and stops the guest at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::GuestMem;
use vmm::api::BalloonHandle;

use super::layout::{ctrl, stat, state, Layout, CHUNK, CTRL, HOT_SPAN, RESIZE_STEP};
use super::{Rng, StressConfig};

/// Index of the window among the guest memory's regions.
pub(crate) const WINDOW_REGION: guest_mem::RegionIndex = guest_mem::RegionIndex(1);

/// What the driver did.
#[derive(Debug, Default, Clone)]
pub struct Driven {
    /// Snapshots taken and restored mid-run.
    pub restores: u64,
    pub target_changes: u64,
    pub shrinks: u64,
    pub grows: u64,
    /// Shrinks given up because a vCPU did not acknowledge the new limit.
    pub ack_timeouts: u64,
    pub resize_errors: Vec<String>,
    /// vCPUs still running after the stop request (aborted).
    pub stuck_vcpus: u64,
    /// Longest wait for the guest to acknowledge a shrink.
    pub max_ack_wait: Duration,
}

struct Guest<'a> {
    mem: &'a GuestMem,
    layout: &'a Layout,
}

impl Guest<'_> {
    fn load(&self, addr: u64) -> u64 {
        self.mem
            .memory()
            .memory()
            .load::<u64>(GuestAddress(addr), Ordering::Acquire)
            .unwrap_or(0)
    }
    fn store(&self, addr: u64, v: u64) {
        if let Err(e) = self
            .mem
            .memory()
            .memory()
            .store(v, GuestAddress(addr), Ordering::Release)
        {
            log::error!("stress driver: writing {addr:#x}: {e}");
        }
    }
    fn stat(&self, id: u8, off: u64) -> u64 {
        self.load(Layout::stats(id) + off)
    }
    fn all_exited(&self) -> bool {
        (0..self.layout.vcpus).all(|id| self.stat(id, stat::EXITED) != 0)
    }
    /// Waits until every running vCPU saw `epoch`.
    fn wait_ack(&self, epoch: u64, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        loop {
            let acked = (0..self.layout.vcpus)
                .all(|id| self.stat(id, stat::ACK) >= epoch || self.stat(id, stat::EXITED) != 0);
            if acked {
                return Some(start.elapsed());
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    /// Marks window pages `[from, to)` as given back: they read zero when
    /// next plugged.
    fn mark_zero(&self, from: u64, to: u64) {
        let bytes: Vec<u8> = (from..to).flat_map(|_| state::ZERO.to_le_bytes()).collect();
        let at = self.layout.window.state + from * 4;
        if let Err(e) = self
            .mem
            .memory()
            .memory()
            .write_slice(&bytes, GuestAddress(at))
        {
            log::error!("stress driver: marking window pages: {e}");
        }
    }
    fn publish_limit(&self, pages: u64) -> u64 {
        self.store(CTRL + ctrl::LIMIT, pages);
        let epoch = self.load(CTRL + ctrl::EPOCH) + 1;
        self.store(CTRL + ctrl::EPOCH, epoch);
        epoch
    }
}

/// Drives the guest for `run_for`, then stops it if `stop_guest` (else
/// leaves it running, for a snapshot). `seed` varies the choices of a
/// second leg after a restore.
pub fn drive(
    cfg: &StressConfig,
    layout: &Layout,
    mem: &GuestMem,
    balloon: &BalloonHandle,
    vm_done: &AtomicBool,
    run_for: Duration,
    stop_guest: bool,
) -> Driven {
    let g = Guest { mem, layout };
    let mut rng = Rng::new(cfg.seed ^ 0x5eed_d21e ^ run_for.as_nanos() as u64);
    let mut done = Driven::default();
    let start = Instant::now();
    let chunks = layout.ram.pages / CHUNK;
    let steps = layout.window.pages * 4096 / RESIZE_STEP;
    // Where the window stands (a second leg starts where the first left it).
    let mut limit = g.load(CTRL + ctrl::LIMIT);
    let mut next_target = Duration::ZERO;
    let mut next_resize = Duration::from_millis(100);
    let mut next_progress = Duration::from_secs(5);
    let gone = || vm_done.load(Ordering::Acquire) || g.all_exited();
    while start.elapsed() < run_for && !gone() {
        let now = start.elapsed();
        g.store(
            CTRL + ctrl::HOT,
            rng.below(chunks.saturating_sub(HOT_SPAN - 1).max(1)),
        );
        if now >= next_target {
            // Up to half the pool, sometimes nothing.
            let pages = rng.below(layout.ram.pages / 2 + 1) * rng.below(2);
            balloon.set_target_pages(pages as u32);
            done.target_changes += 1;
            next_target = now + Duration::from_millis(50 + rng.below(200));
        }
        if steps > 0 && now >= next_resize {
            let new = (1 + rng.below(steps)) * RESIZE_STEP / 4096;
            resize(&g, &mut done, &mut limit, new);
            next_resize = now + Duration::from_millis(100 + rng.below(300));
        }
        if cfg.progress && now >= next_progress {
            let writes: u64 = (0..layout.vcpus).map(|id| g.stat(id, stat::WRITES)).sum();
            let s = mem.stats();
            eprintln!(
                "stress: {:>4.0} s  writes {writes}  balloon {} pages  window {} MiB  \
                 faults {}  retries {}",
                now.as_secs_f64(),
                g.load(CTRL + ctrl::ACTUAL),
                (limit * 4096) >> 20,
                s.faults,
                s.retries
            );
            next_progress += Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !stop_guest {
        return done;
    }
    g.store(CTRL + ctrl::STOP, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !gone() {
        done.stuck_vcpus = (0..layout.vcpus)
            .filter(|&id| g.stat(id, stat::EXITED) == 0)
            .count() as u64;
        // Whoever waits for the device gives up (exit code 5).
        g.store(CTRL + ctrl::STOP, 2);
    }
    done
}

/// Shrink: publish the lower limit, wait until every vCPU saw it, then
/// truncate and mark what went as zero. Grow: extend first, then publish.
fn resize(g: &Guest, done: &mut Driven, limit: &mut u64, new: u64) {
    use std::cmp::Ordering::*;
    match new.cmp(limit) {
        Less => {
            let epoch = g.publish_limit(new);
            let Some(waited) = g.wait_ack(epoch, Duration::from_secs(10)) else {
                done.ack_timeouts += 1;
                // Not acknowledged: the old limit still stands.
                g.publish_limit(*limit);
                return;
            };
            done.max_ack_wait = done.max_ack_wait.max(waited);
            if let Err(e) = g.mem.resize(WINDOW_REGION, new * 4096) {
                done.resize_errors
                    .push(format!("shrink to {new} pages: {e}"));
                g.publish_limit(*limit);
                return;
            }
            g.mark_zero(new, *limit);
            done.shrinks += 1;
        }
        Greater => {
            if let Err(e) = g.mem.resize(WINDOW_REGION, new * 4096) {
                done.resize_errors.push(format!("grow to {new} pages: {e}"));
                return;
            }
            g.publish_limit(new);
            done.grows += 1;
        }
        Equal => return,
    }
    *limit = new;
}

impl Driven {
    /// Adds a later leg's doings to these.
    pub fn merge(&mut self, later: Driven) {
        self.restores += later.restores;
        self.target_changes += later.target_changes;
        self.shrinks += later.shrinks;
        self.grows += later.grows;
        self.ack_timeouts += later.ack_timeouts;
        self.resize_errors.extend(later.resize_errors);
        self.stuck_vcpus += later.stuck_vcpus;
        self.max_ack_wait = self.max_ack_wait.max(later.max_ack_wait);
    }
}
