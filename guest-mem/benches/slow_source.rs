//! Fault and discard latency with a slow page source under a discard storm.
//!
//! A lazily restored guest whose pages come from a slow source (10 ms per
//! fetch: a disk under load, a network) while its balloon keeps giving
//! pages back. Four threads first-touch pages of the lower half of the
//! region (each touch a fault and a fetch, no readahead); one thread
//! discards random pages of the upper half as fast as it can, far more
//! than the invalidation log holds during one fetch. Printed as a table and merged into
//! `target/bench/hardening.json` (`slow_source_fault_p50_ms`,
//! `slow_source_fault_p99_ms`, `slow_source_discard_p50_ms`,
//! `slow_source_discard_p99_ms`, with counts). The figures that matter: a
//! discard never waits for a fetch, and a fault costs about one fetch.
//!
//! `cargo bench -p guest-mem --bench slow_source [-- --seconds N --fetch-ms N]`

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{FaultConfig, GuestMem, PageSource, RegionConfig, RegionSource};

const PAGE: u64 = 4096;
const PAGES: u64 = 64 * 1024; // 256 MiB
const TOUCHERS: u64 = 4;

#[derive(Debug)]
struct SlowSource {
    delay: Duration,
}

impl PageSource for SlowSource {
    fn size(&self) -> Option<u64> {
        None
    }
    fn is_zero(&self, _: u64, _: u64) -> bool {
        false
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::thread::sleep(self.delay);
        buf.fill((offset / PAGE) as u8 | 1);
        Ok(())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let seconds = arg("--seconds", 3);
    let fetch_ms = arg("--fetch-ms", 10);
    let mut rc = RegionConfig::new(0, PAGES * PAGE);
    rc.source = Some(RegionSource {
        source: Arc::new(SlowSource {
            delay: Duration::from_millis(fetch_ms),
        }),
        offset: 0,
    });
    let mem = Arc::new(
        GuestMem::builder()
            .region(rc)
            .fault_config(FaultConfig {
                threads: 4,
                readahead: guest_mem::Readahead::NONE,
                ..FaultConfig::default()
            })
            .build()
            .expect("building guest memory"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let touchers: Vec<_> = (0..TOUCHERS)
        .map(|t| {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || {
                let ram = mem.memory();
                let mut lat = Vec::new();
                // Every fourth page of the lower half, from this thread's
                // offset: each touch is a first touch.
                let mut page = t;
                while !stop.load(Ordering::Relaxed) && page < PAGES / 2 {
                    let start = Instant::now();
                    let _: u8 = ram
                        .memory()
                        .read_obj(GuestAddress(page * PAGE))
                        .expect("reading guest memory");
                    lat.push(start.elapsed());
                    page += TOUCHERS;
                }
                lat
            })
        })
        .collect();
    let storm = {
        let (mem, stop) = (mem.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut seed = 0xdead_beef_u64;
            while !stop.load(Ordering::Relaxed) {
                let page = PAGES / 2 + xorshift(&mut seed) % (PAGES / 2);
                let start = Instant::now();
                mem.discard(GuestAddress(page * PAGE), PAGE)
                    .expect("discarding");
                lat.push(start.elapsed());
            }
            lat
        })
    };
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut faults: Vec<Duration> = touchers
        .into_iter()
        .flat_map(|t| t.join().expect("toucher"))
        .collect();
    let mut discards = storm.join().expect("discarder");
    faults.sort();
    discards.sort();
    let stats = mem.settled_stats(Duration::from_secs(1));
    let row = |what: &str, v: &[Duration]| {
        println!(
            "{what:<28} {:>9} {:>10.3} {:>10.3} {:>10.3}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
        );
    };
    println!(
        "slow source ({fetch_ms} ms per fetch), discard storm, {seconds} s, 4 touchers, 4 handler threads"
    );
    println!(
        "{:<28} {:>9} {:>10} {:>10} {:>10}",
        "", "count", "p50 ms", "p99 ms", "max ms"
    );
    row("first touch (fault + fetch)", &faults);
    row("discard (4 KiB)", &discards);
    let slow = discards
        .iter()
        .filter(|d| **d > Duration::from_millis(1))
        .count();
    println!("discards that waited over 1 ms: {slow}");
    println!(
        "faults {}, retries {}, settled under the lock {}, source fetches ~{}",
        stats.faults, stats.retries, stats.resolved_under_lock, stats.installs_copy
    );

    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/hardening.json");
    // Other keys (the hostile-guest suite's) are kept.
    let mut json: serde_json::Map<String, serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for (k, v) in [
        ("slow_source_fetch_ms", fetch_ms as f64),
        ("slow_source_fault_p50_ms", percentile(&faults, 0.5)),
        ("slow_source_fault_p99_ms", percentile(&faults, 0.99)),
        ("slow_source_discard_p50_ms", percentile(&discards, 0.5)),
        ("slow_source_discard_p99_ms", percentile(&discards, 0.99)),
        ("slow_source_discards", discards.len() as f64),
        ("slow_source_discards_over_1ms", slow as f64),
        ("slow_source_touches", faults.len() as f64),
        ("slow_source_faults", stats.faults as f64),
    ] {
        json.insert(k.to_string(), v.into());
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let text = serde_json::to_string_pretty(&json).unwrap_or_default();
    match std::fs::write(&path, text) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("writing {}: {e}", path.display()),
    }
}
