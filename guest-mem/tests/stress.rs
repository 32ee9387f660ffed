//! Bounded concurrent stress: toucher threads standing in for vCPUs write,
//! verify and give back interleaved pages of one region (so every readahead
//! window crosses pages other threads are discarding), while a resizer
//! shrinks and regrows a second region under a toucher working just below
//! its smallest size. At the end every discarded page is a hole, every
//! surviving page holds what was last written, and regrown memory is zero.
//!
//! `STRESS_SECONDS` (default 3) and `STRESS_SEED` tune a run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{FaultConfig, GuestMem, Readahead, RegionConfig, RegionSource};

const A_PAGES: u64 = 4096; // 16 MiB
const B_BASE: u64 = 1 << 30;
const B_PAGES: u64 = 1024; // 4 MiB
const B_MIN: u64 = 256; // 1 MiB always plugged
const TOUCHERS: u64 = 3;
const C_BASE: u64 = 2 << 30;
const C_PAGES: u64 = 16384; // 64 MiB, zero-filled

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PageState {
    Fresh,
    Written(u64),
    Discarded,
}

fn expected(page: u64, state: PageState) -> u64 {
    match state {
        PageState::Fresh => pattern_word(page),
        PageState::Written(v) => v,
        PageState::Discarded => 0,
    }
}

fn build(skip_recheck: bool, fetch_delay: Duration) -> GuestMem {
    let source = |pages: u64| {
        Some(RegionSource {
            source: Arc::new(PatternSource { len: pages * PAGE }),
            offset: 0,
        })
    };
    let mut a = RegionConfig::new(0, A_PAGES * PAGE);
    a.source = source(A_PAGES);
    let mut b = RegionConfig::new(B_BASE, B_PAGES * PAGE);
    b.max_size = Some(B_PAGES * PAGE);
    b.source = source(B_PAGES);
    let mut c = RegionConfig::new(C_BASE, C_PAGES * PAGE);
    c.max_size = Some(C_PAGES * PAGE);
    GuestMem::builder()
        .region(a)
        .region(b)
        .region(c)
        .fault_config(FaultConfig {
            threads: 2,
            readahead: Readahead::default(),
            skip_recheck,
            fetch_delay,
            ..FaultConfig::default()
        })
        .build()
        .unwrap()
}

fn read(mem: &GuestMem, gpa: u64) -> u64 {
    mem.memory().memory().read_obj(GuestAddress(gpa)).unwrap()
}

fn write(mem: &GuestMem, gpa: u64, v: u64) {
    mem.memory()
        .memory()
        .write_obj(v, GuestAddress(gpa))
        .unwrap()
}

/// Works on pages `p` with `p % TOUCHERS == id`; returns its view of them
/// and the mismatches it saw.
fn toucher(mem: &GuestMem, id: u64, seed: u64, stop: &AtomicBool) -> (Vec<PageState>, Vec<String>) {
    let mut rng = Rng(seed ^ (id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut state = vec![PageState::Fresh; A_PAGES as usize];
    let mut errors = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let page = rng.below(A_PAGES / TOUCHERS) * TOUCHERS + id;
        let gpa = page * PAGE;
        if rng.below(100) < 80 {
            let want = expected(page, state[page as usize]);
            let got = read(mem, gpa);
            if got != want && errors.len() < 10 {
                errors.push(format!(
                    "page {page:#x}: expected {want:#x}, found {got:#x} (state {:?})",
                    state[page as usize]
                ));
            }
            seq += 1;
            let stamp = (id + 1) << 56 | seq << 16 | (page & 0xffff);
            write(mem, gpa, stamp);
            state[page as usize] = PageState::Written(stamp);
        } else {
            // Give back a run of 1-4 own pages (balloon-like), one discard each.
            for k in 0..=rng.below(4) {
                let p = page + k * TOUCHERS;
                if p < A_PAGES {
                    mem.discard(GuestAddress(p * PAGE), PAGE).unwrap();
                    state[p as usize] = PageState::Discarded;
                }
            }
        }
    }
    (state, errors)
}

/// Shrinks and regrows region 1 while reading regrown memory back.
fn resizer(mem: &GuestMem, seed: u64, stop: &AtomicBool) -> (u64, Vec<String>) {
    let mut rng = Rng(seed ^ 0xD1B5_4A32_D192_ED03);
    let mut truncated = vec![false; B_PAGES as usize];
    let mut errors = Vec::new();
    let mut cycles = 0;
    while !stop.load(Ordering::Relaxed) {
        let plugged = mem.regions()[1].backed_size() / PAGE;
        let small = B_MIN + rng.below(plugged - B_MIN + 1);
        mem.resize(guest_mem::RegionIndex(1), small * PAGE).unwrap();
        for t in &mut truncated[small as usize..plugged as usize] {
            *t = true;
        }
        let big = small + rng.below(B_PAGES - small + 1);
        mem.resize(guest_mem::RegionIndex(1), big * PAGE).unwrap();
        for _ in 0..16 {
            let p = B_MIN + rng.below(big - B_MIN);
            let want = if truncated[p as usize] {
                0
            } else {
                pattern_word(p)
            };
            let got = read(mem, B_BASE + p * PAGE);
            if got != want && errors.len() < 10 {
                errors.push(format!(
                    "region 1 page {p:#x}: expected {want:#x}, found {got:#x}"
                ));
            }
        }
        cycles += 1;
    }
    (cycles, errors)
}

/// Hammers the pages just below region 1's smallest size, so that
/// readahead windows reach into the range being truncated.
fn edge_toucher(mem: &GuestMem, seed: u64, stop: &AtomicBool) -> Vec<String> {
    let mut rng = Rng(seed ^ 0x94D0_49BB_1331_11EB);
    let mut last = vec![None; B_MIN as usize];
    let mut errors = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let p = B_MIN - 1 - rng.below(32);
        let gpa = B_BASE + p * PAGE;
        let want = last[p as usize].unwrap_or(pattern_word(p));
        let got = read(mem, gpa);
        if got != want && errors.len() < 10 {
            errors.push(format!(
                "region 1 page {p:#x}: expected {want:#x}, found {got:#x}"
            ));
        }
        n += 1;
        write(mem, gpa, n);
        last[p as usize] = Some(n);
        if n % 64 == 0 {
            // Give the edge back now and then so it faults again.
            let q = B_MIN - 32;
            mem.discard(GuestAddress(B_BASE + q * PAGE), 32 * PAGE)
                .unwrap();
            for s in &mut last[q as usize..B_MIN as usize] {
                *s = Some(0);
            }
        }
    }
    errors
}

const FRESH: u8 = 0;
const TOUCHED: u8 = 1;
const TAKEN: u8 = 2;

/// A sequential first-touch stream over region 2 (readahead grows to 2 MiB
/// windows) with a balloon taking free pages just ahead of it: the race
/// between readahead installs and inflates. Each page is claimed by exactly
/// one side, so any taken page with data is a stray install. Between passes
/// the region is unplugged and replugged to make its memory fresh again.
/// Returns (passes, pages taken, stray pages).
fn stream_vs_balloon(mem: &GuestMem, seed: u64, stop: &AtomicBool) -> (u64, u64, Vec<u64>) {
    let states: Vec<AtomicU8> = (0..C_PAGES).map(|_| AtomicU8::new(FRESH)).collect();
    let pos = AtomicU64::new(0);
    let (mut passes, mut taken_total, mut stray) = (0u64, 0u64, Vec::new());
    let region = mem.regions()[2].clone();
    while !stop.load(Ordering::Relaxed) {
        let pass_done = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| {
                let mut rng = Rng(seed ^ passes.wrapping_mul(0xA24B_AED4_963E_E407) | 1);
                while !pass_done.load(Ordering::Relaxed) {
                    let p = pos.load(Ordering::Relaxed) + 1 + rng.below(512);
                    if p < C_PAGES
                        && states[p as usize]
                            .compare_exchange(FRESH, TAKEN, Ordering::AcqRel, Ordering::Relaxed)
                            .is_ok()
                    {
                        mem.discard(GuestAddress(C_BASE + p * PAGE), PAGE).unwrap();
                    }
                }
            });
            for p in 0..C_PAGES {
                pos.store(p, Ordering::Relaxed);
                if states[p as usize]
                    .compare_exchange(FRESH, TOUCHED, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    write(mem, C_BASE + p * PAGE, p);
                }
            }
            pass_done.store(true, Ordering::Relaxed);
        });
        for (p, st) in states.iter().enumerate() {
            if st.load(Ordering::Relaxed) == TAKEN {
                taken_total += 1;
                let range = region.file_range(p as u64 * PAGE, PAGE);
                if region.backing().has_data(range).unwrap() && stray.len() < 100 {
                    stray.push(p as u64);
                }
            }
            st.store(FRESH, Ordering::Relaxed);
        }
        mem.resize(guest_mem::RegionIndex(2), 0).unwrap();
        mem.resize(guest_mem::RegionIndex(2), C_PAGES * PAGE)
            .unwrap();
        passes += 1;
    }
    (passes, taken_total, stray)
}

/// What a stress run found.
struct Verdict {
    errors: Vec<String>,
    stray: Vec<usize>,
    lost: Vec<(usize, PageState, u64)>,
    holes: u64,
    cycles: u64,
    stats: guest_mem::StatsSnapshot,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn run(seconds: f64, seed: u64, skip_recheck: bool, fetch_delay: Duration) -> Verdict {
    let mem = Arc::new(build(skip_recheck, fetch_delay));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();

    let touchers: Vec<_> = (0..TOUCHERS)
        .map(|id| {
            let (mem, stop) = (mem.clone(), stop.clone());
            thread::spawn(move || toucher(&mem, id, seed, &stop))
        })
        .collect();
    let resize = {
        let (mem, stop) = (mem.clone(), stop.clone());
        thread::spawn(move || resizer(&mem, seed, &stop))
    };
    let edge = {
        let (mem, stop) = (mem.clone(), stop.clone());
        thread::spawn(move || edge_toucher(&mem, seed, &stop))
    };
    let stream = {
        let (mem, stop) = (mem.clone(), stop.clone());
        thread::spawn(move || stream_vs_balloon(&mem, seed, &stop))
    };
    thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);

    let mut errors = Vec::new();
    let mut states = vec![PageState::Fresh; A_PAGES as usize];
    for (id, t) in touchers.into_iter().enumerate() {
        let (state, errs) = t.join().unwrap();
        errors.extend(errs);
        for p in (id as u64..A_PAGES).step_by(TOUCHERS as usize) {
            states[p as usize] = state[p as usize];
        }
    }
    let (cycles, errs) = resize.join().unwrap();
    errors.extend(errs);
    errors.extend(edge.join().unwrap());
    let (passes, taken, stream_stray) = stream.join().unwrap();
    let elapsed = start.elapsed();

    // Verdict. Holes first: reading a page faults it back in.
    let region = &mem.regions()[0];
    let mut holes = 0;
    let mut stray = Vec::new();
    for (p, s) in states.iter().enumerate() {
        if *s == PageState::Discarded {
            holes += 1;
            let has_data = region
                .backing()
                .has_data(region.file_range(p as u64 * PAGE, PAGE))
                .unwrap();
            if has_data {
                stray.push(p);
            }
        }
    }
    for p in stream_stray {
        stray.push((C_BASE / PAGE + p) as usize);
    }
    let mut lost = Vec::new();
    for (p, s) in states.iter().enumerate() {
        let got = read(&mem, p as u64 * PAGE);
        if got != expected(p as u64, *s) {
            lost.push((p, *s, got));
        }
    }
    let stats = mem.stats();
    eprintln!(
        "stress: {:.1}s seed {seed:#x} recheck {} delay {fetch_delay:?}: {holes} discarded \
         pages checked, {cycles} resize cycles, {passes} stream passes with {taken} pages \
         ballooned, {} mismatches, {} stray, {} lost\n{stats}",
        elapsed.as_secs_f64(),
        if skip_recheck { "off" } else { "on" },
        errors.len(),
        stray.len(),
        lost.len(),
    );
    Verdict {
        errors,
        stray,
        lost,
        holes,
        cycles,
        stats,
    }
}

#[test]
fn concurrent_touch_discard_and_resize_lose_nothing() {
    let seconds = env_or("STRESS_SECONDS", 3.0);
    let seed = env_or("STRESS_SEED", 0x5EED);
    // Half the run with a slow fetch (a wide race window), half without.
    for delay in [Duration::ZERO, Duration::from_micros(50)] {
        let v = run(seconds / 2.0, seed, false, delay);
        assert!(
            v.errors.is_empty(),
            "mismatches during the run: {:#?}",
            v.errors
        );
        assert!(
            v.stray.is_empty(),
            "discarded pages filled again: {:?}",
            v.stray
        );
        assert!(
            v.lost.is_empty(),
            "pages not holding their last write: {:?}",
            v.lost
        );
        assert!(v.holes > 0 && v.cycles > 0 && v.stats.faults > 0 && v.stats.discards > 0);
    }
}

#[test]
fn without_the_recheck_the_stress_finds_stray_pages() {
    let seed = env_or("STRESS_SEED", 0x5EED);
    let v = run(2.0, seed, true, Duration::from_micros(50));
    assert!(
        !(v.errors.is_empty() && v.stray.is_empty() && v.lost.is_empty()),
        "the suite must catch the race when the re-check is off"
    );
}
