//! Fault service benchmark: what serving first touches in userspace costs
//! next to the kernel's own demand faulting, what the truncate-generation
//! re-check adds, how often the per-file and the range-log retry policies
//! drop fetched contents under a discard stream, how fast discards are, and
//! what placing a boot image through the backing file (`ImageFile`) saves
//! over writing it through the fault-managed mapping.
//!
//! Run with `cargo bench -p guest-mem`. Prints a table on stdout, progress on
//! stderr, and writes `target/bench/guest-mem.json` (under `CARGO_TARGET_DIR`
//! when set). `BENCH_SCALE` (a float, default 1.0) scales every size.
//!
//! Every measurement is repeated [`REPS`] times, interleaved with the others,
//! and the median is reported: the machine this runs on is shared and noisy.
//! Nothing here asserts on a time.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Seek;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use guest_mem::generation::{FileRange, TruncateGen};
use guest_mem::image::ImageFile;
use guest_mem::source::PageSource;
use guest_mem::stats::StatsSnapshot;
use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{
    FaultConfig, FaultMode, FileSource, GuestMem, Readahead, RegionConfig, RegionSource,
    RetryPolicy,
};

/// Repetitions of every measurement; the median is reported.
const REPS: usize = 3;
/// Alternating on/off pairs for the end-to-end re-check comparison.
const RECHECK_PAIRS: usize = 8;
/// Operations per timing of the isolated re-check.
const RECHECK_OPS: u64 = 2_000_000;
const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// The byte every page of the file source holds.
const SOURCE_BYTE: u8 = 0x5a;

// ---------------------------------------------------------------------------
// Sizes and helpers
// ---------------------------------------------------------------------------

fn scale() -> f64 {
    match std::env::var("BENCH_SCALE") {
        Ok(s) => match s.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => v,
            _ => {
                eprintln!("[bench] ignoring BENCH_SCALE={s:?} (want a positive number)");
                1.0
            }
        },
        Err(_) => 1.0,
    }
}

/// `mib` MiB scaled, rounded to a multiple of 2 MiB, at least `min_mib`.
fn sized(scale: f64, mib: u64, min_mib: u64) -> u64 {
    let bytes = (mib as f64 * scale * MIB as f64) as u64;
    let two = 2 * MIB;
    (bytes / two * two).max(min_mib * MIB)
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The element whose `key` is the median (the middle one of an odd count).
fn median_by<T>(mut items: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    items.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = (items.len() - 1) / 2;
    items.swap_remove(mid)
}

/// A small xorshift64* generator (the bench needs no crate for this).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn memfd(name: &str) -> File {
    guest_mem::backing::memfd_file(name, false).expect("memfd_create")
}

/// A memfd of `len` bytes, every MiB of it a copy of `chunk` (1 MiB).
fn filled_memfd(name: &str, len: u64, chunk: &[u8]) -> File {
    let f = memfd(name);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], at).expect("filling the image");
        at += n as u64;
    }
    f
}

/// A memory image of `len` bytes, every byte [`SOURCE_BYTE`], in a memfd.
fn file_source(len: u64) -> Arc<FileSource> {
    let f = filled_memfd("bench-image", len, &vec![SOURCE_BYTE; MIB as usize]);
    Arc::new(FileSource::from_file(f).expect("opening the image"))
}

/// One memfd-backed region of `bytes` at guest-physical 0.
fn build(
    bytes: u64,
    mode: FaultMode,
    readahead: Readahead,
    source: Option<&Arc<FileSource>>,
    tweak: impl FnOnce(&mut FaultConfig),
) -> GuestMem {
    let mut rc = RegionConfig::new(0, bytes);
    rc.source = source.map(|s| RegionSource {
        source: s.clone() as Arc<dyn PageSource>,
        offset: 0,
    });
    let mut fault = FaultConfig {
        mode,
        readahead,
        ..FaultConfig::default()
    };
    tweak(&mut fault);
    let mem = GuestMem::builder()
        .region(rc)
        .fault_config(fault)
        .build()
        .expect("building guest memory");
    assert_eq!(
        mem.userfault_enabled(),
        mode == FaultMode::Userfault,
        "fault mode not as requested"
    );
    mem
}

/// How a boot image gets into guest memory.
#[derive(Clone, Copy, Debug)]
enum Placement {
    /// `ImageFile`: spliced into the backing memfd (userfaultfd on).
    ImageFile,
    /// A plain read through the mapping, faults served by userfaultfd.
    MappingUffd,
    /// A plain read through the mapping, the kernel's demand faults.
    MappingKernel,
}

/// Places the `len`-byte `image` at guest-physical 0 of a fresh region the
/// way `how` says; returns (seconds, faults served by the handler).
fn place_image(image: &File, len: u64, how: Placement) -> (f64, u64) {
    let mode = match how {
        Placement::MappingKernel => FaultMode::Kernel,
        _ => FaultMode::Userfault,
    };
    let mem = build(len, mode, Readahead::default(), None, |_| {});
    let mut file = image.try_clone().expect("duplicating the image fd");
    file.rewind().expect("rewinding the image");
    let guard = mem.memory();
    let ram = guard.memory();
    let start = Instant::now();
    match how {
        Placement::ImageFile => {
            let mut reader = ImageFile::new(&mem, file);
            ram.read_exact_volatile_from(GuestAddress(0), &mut reader, len as usize)
        }
        _ => ram.read_exact_volatile_from(GuestAddress(0), &mut file, len as usize),
    }
    .expect("placing the image");
    (start.elapsed().as_secs_f64(), mem.stats().faults)
}

/// Writes one byte at the start of every page of `[offset, offset + len)`
/// of region 0, in order: the first touch of each page.
fn touch(mem: &GuestMem, offset: u64, len: u64) {
    let region = &mem.regions()[0];
    let end = offset + len;
    assert!(
        end <= region.backed_size(),
        "touching past the plugged size"
    );
    let page = region.page_size();
    let base = region.host_addr() as *mut u8;
    let mut at = offset;
    while at < end {
        // SAFETY: `base` is the start of region 0's mapping, which `mem`
        // keeps mapped (read-write, MAP_SHARED) for at least as long as the
        // borrow we hold. `at < end <= backed_size <= max_size`, so the byte
        // lies inside the mapping and inside the backing file (no SIGBUS);
        // the fault, if any, is served by the kernel or the handler thread.
        // Guest memory is plain bytes that no Rust reference points into (it
        // is only ever accessed through raw pointers or volatile slices), so
        // a volatile byte store cannot alias anything the compiler assumes.
        unsafe { base.add(at as usize).write_volatile(1) };
        at += page;
    }
}

/// Reads the byte at `offset` of region 0 (a sanity check after the timed
/// part).
fn peek(mem: &GuestMem, offset: u64) -> u8 {
    let region = &mem.regions()[0];
    assert!(offset < region.backed_size());
    // SAFETY: as in `touch`: the byte lies in the plugged part of the live
    // mapping that `mem` owns, and guest memory is only accessed through raw
    // pointers, so a volatile read aliases no Rust reference.
    unsafe {
        (region.host_addr() as *const u8)
            .add(offset as usize)
            .read_volatile()
    }
}

// ---------------------------------------------------------------------------
// 1 + 2: first touch, kernel and userfaultfd
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct TouchCfg {
    key: &'static str,
    label: &'static str,
    mode: FaultMode,
    readahead: Readahead,
    file: bool,
    bytes: u64,
}

struct TouchRun {
    secs: f64,
    pages: u64,
    stats: StatsSnapshot,
}

impl TouchRun {
    fn us_per_page(&self) -> f64 {
        self.secs * 1e6 / self.pages as f64
    }

    fn pages_per_s(&self) -> f64 {
        self.pages as f64 / self.secs
    }
}

fn first_touch(
    cfg: &TouchCfg,
    source: &Arc<FileSource>,
    tweak: impl FnOnce(&mut FaultConfig),
) -> TouchRun {
    let mem = build(
        cfg.bytes,
        cfg.mode,
        cfg.readahead,
        cfg.file.then_some(source),
        tweak,
    );
    let page = mem.regions()[0].page_size();
    let start = Instant::now();
    touch(&mem, 0, cfg.bytes);
    let secs = start.elapsed().as_secs_f64();
    let pages = cfg.bytes / page;
    let stats = if cfg.mode == FaultMode::Userfault {
        mem.settled_stats(std::time::Duration::from_secs(2))
    } else {
        mem.stats()
    };
    // Untimed sanity: the contents came from where they should.
    let want = if cfg.file { SOURCE_BYTE } else { 0 };
    for off in [8, cfg.bytes / 2 + 8, cfg.bytes - page + 8] {
        let got = peek(&mem, off);
        assert_eq!(got, want, "{}: byte at {off:#x} is {got:#x}", cfg.label);
    }
    if cfg.mode == FaultMode::Userfault {
        assert_eq!(
            stats.pages_installed, pages,
            "{}: not every page was installed by the handler",
            cfg.label
        );
    }
    TouchRun { secs, pages, stats }
}

// ---------------------------------------------------------------------------
// 3: the re-check
// ---------------------------------------------------------------------------

/// ns per sample + lock_install + recheck when nothing changed.
fn recheck_unchanged_ns() -> f64 {
    let gen = TruncateGen::new();
    let range = FileRange::new(64 << 10, 4096);
    let start = Instant::now();
    for _ in 0..RECHECK_OPS {
        let s = gen.sample();
        let guard = gen.lock_install();
        std::hint::black_box(guard.recheck(s, std::hint::black_box(range)));
    }
    start.elapsed().as_nanos() as f64 / RECHECK_OPS as f64
}

/// The same when 8 invalidations elsewhere ran since the sample (the range
/// log is scanned: the `ChangedElsewhere` verdict).
fn recheck_changed_ns() -> f64 {
    let gen = TruncateGen::new();
    let range = FileRange::new(64 << 10, 4096);
    let stale = gen.sample();
    for i in 0..8 {
        gen.invalidate(FileRange::new((1 << 30) + i * 4096, 4096), || ());
    }
    let start = Instant::now();
    for _ in 0..RECHECK_OPS {
        std::hint::black_box(gen.sample());
        let guard = gen.lock_install();
        std::hint::black_box(guard.recheck(stale, std::hint::black_box(range)));
    }
    start.elapsed().as_nanos() as f64 / RECHECK_OPS as f64
}

// ---------------------------------------------------------------------------
// CPU affinity (for the discard stream)
// ---------------------------------------------------------------------------

/// The calling thread's CPU affinity mask.
fn affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is writable storage of the
    // size we pass.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (rc == 0).then_some(set)
}

/// Sets the calling thread's CPU affinity mask (new threads inherit it).
fn set_affinity(set: &libc::cpu_set_t) {
    // SAFETY: pid 0 is the calling thread; `set` is a valid mask of the size
    // we pass, which the kernel only reads.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        eprintln!(
            "[bench] sched_setaffinity failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn cpus_of(set: &libc::cpu_set_t) -> Vec<usize> {
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, so the bit lies inside `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, set) })
        .collect()
}

fn only_cpu(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: callers pass a CPU taken from a mask, so below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

// ---------------------------------------------------------------------------
// 4: retries under a discard stream
// ---------------------------------------------------------------------------

const TOUCHERS: u64 = 2;

struct SpuriousRun {
    policy: RetryPolicy,
    stats: StatsSnapshot,
    discards: u64,
    touched_pages: u64,
    secs: f64,
    pinned: bool,
}

impl SpuriousRun {
    fn spurious_pct(&self) -> f64 {
        self.stats.spurious_retries as f64 / self.stats.faults as f64 * 100.0
    }

    fn retry_pct(&self) -> f64 {
        self.stats.retries as f64 / self.stats.faults as f64 * 100.0
    }

    fn us_per_page(&self) -> f64 {
        self.secs * 1e6 / self.touched_pages as f64
    }
}

/// Touchers first-touch the lower half of a region (each its own aligned
/// share, sequentially, 64 KiB readahead, contents from a file) while a
/// discarder gives back random 4 KiB pages of the upper half, past a 2 MiB
/// gap, until the touchers are done. No install range ever overlaps a
/// discard, so every retry this run makes is a spurious one.
///
/// With two or more CPUs, the handler thread and the touchers run on one CPU
/// and the discarder on another. Left to the scheduler, the discarder often
/// shares a CPU with the handler, runs only while the handler sleeps, and no
/// invalidation ever lands inside a fault's fetch: the run then measures
/// nothing.
fn discard_stream(
    bytes: u64,
    policy: RetryPolicy,
    source: &Arc<FileSource>,
    seed: u64,
) -> SpuriousRun {
    let readahead = 64 << 10;
    let saved = affinity();
    let pins = saved
        .as_ref()
        .map(cpus_of)
        .filter(|cpus| cpus.len() >= 2)
        .map(|cpus| (only_cpu(cpus[0]), only_cpu(cpus[1])));
    if let Some((handler_cpu, _)) = &pins {
        // The handler thread inherits this mask when `build` spawns it.
        set_affinity(handler_cpu);
    }
    let mem = build(
        bytes,
        FaultMode::Userfault,
        Readahead::fixed(readahead),
        Some(source),
        |c| c.retry_policy = policy,
    );
    if let Some(saved) = &saved {
        set_affinity(saved);
    }
    let region = &mem.regions()[0];
    let page = region.page_size();
    let half = bytes / 2;
    let share = half / TOUCHERS;
    assert_eq!(
        share % readahead,
        0,
        "toucher shares must be window-aligned"
    );
    let zone_start = half + 2 * MIB;
    let zone_pages = (bytes - zone_start) / page;
    assert!(zone_pages > 0, "region too small for a discard zone");
    // Give the discard zone contents through the file, not the mapping, so
    // that populating it takes no fault.
    let file = region.backing().file().clone();
    let file_off = region.file_offset();
    let chunk = vec![0x33u8; MIB as usize];
    let mut at = zone_start;
    while at < bytes {
        let n = (bytes - at).min(MIB);
        file.write_all_at(&chunk[..n as usize], file_off + at)
            .expect("populating the discard zone");
        at += n;
    }
    let done = AtomicBool::new(false);
    let cap = 64 * half / page;
    let (secs, discards) = thread::scope(|s| {
        let discarder = s.spawn(|| {
            if let Some((_, cpu)) = &pins {
                set_affinity(cpu);
            }
            let mut rng = Rng(seed | 1);
            let mut n = 0u64;
            while !done.load(Ordering::Acquire) && n < cap {
                let off = zone_start + rng.below(zone_pages) * page;
                // Put a page back first (as a guest reusing freed memory
                // would) so that every discard frees a real page rather than
                // punching a hole into a hole.
                file.write_all_at(&[1], file_off + off)
                    .expect("repopulating a page");
                mem.discard(GuestAddress(off), page).expect("discard");
                n += 1;
            }
            n
        });
        let start = Instant::now();
        let touchers: Vec<_> = (0..TOUCHERS)
            .map(|i| {
                let (mem, pins) = (&mem, &pins);
                s.spawn(move || {
                    if let Some((cpu, _)) = pins {
                        set_affinity(cpu);
                    }
                    touch(mem, i * share, share)
                })
            })
            .collect();
        for t in touchers {
            t.join().expect("toucher panicked");
        }
        let secs = start.elapsed().as_secs_f64();
        done.store(true, Ordering::Release);
        (secs, discarder.join().expect("discarder panicked"))
    });
    let stats = mem.settled_stats(std::time::Duration::from_secs(2));
    assert_eq!(
        stats.pages_installed,
        half / page,
        "the touchers' pages were not all installed"
    );
    for off in [8, half / 2 + 8, half - page + 8] {
        assert_eq!(peek(&mem, off), SOURCE_BYTE, "wrong contents at {off:#x}");
    }
    SpuriousRun {
        policy,
        stats,
        discards,
        touched_pages: half / page,
        secs,
        pinned: pins.is_some(),
    }
}

// ---------------------------------------------------------------------------
// 5: discard throughput
// ---------------------------------------------------------------------------

/// GiB/s of discarding a fully populated region in `chunk`-byte pieces.
fn discard_throughput(mem: &GuestMem, bytes: u64, chunk: u64) -> f64 {
    touch(mem, 0, bytes);
    let before = mem.allocated_bytes();
    let start = Instant::now();
    let mut at = 0;
    while at < bytes {
        mem.discard(GuestAddress(at), chunk).expect("discard");
        at += chunk;
    }
    let secs = start.elapsed().as_secs_f64();
    let after = mem.allocated_bytes();
    assert!(
        before >= bytes && after == 0,
        "discard did not free the region: {before} bytes before, {after} after"
    );
    bytes as f64 / GIB / secs
}

// ---------------------------------------------------------------------------
// JSON: a small tree for the figures, written with serde_json
// ---------------------------------------------------------------------------

enum Json {
    Bool(bool),
    Num(f64),
    Int(u64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

fn obj<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Json)>) -> Json {
    Json::Obj(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn num(v: f64) -> Json {
    Json::Num(v)
}

impl Json {
    fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            // Four decimals are plenty; NaN and infinities have no JSON form.
            Json::Num(v) => serde_json::Number::from_f64((v * 1e4).round() / 1e4)
                .map_or(Value::Null, Value::Number),
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(v) => Value::from(*v),
            Json::Str(s) => Value::String(s.clone()),
            Json::Arr(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Obj(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

fn output_path() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                // Relative to the workspace root, where cargo is usually run.
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(dir)
            }
        }
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
    };
    target.join("bench").join("guest-mem.json")
}

fn latency_json(s: &StatsSnapshot) -> Json {
    let h = &s.fault_latency;
    obj([
        ("count", Json::Int(h.count)),
        ("mean_ns", Json::Int(h.mean_ns)),
        ("p50_ns", Json::Int(h.p50_ns)),
        ("p99_ns", Json::Int(h.p99_ns)),
        ("max_ns", Json::Int(h.max_ns)),
    ])
}

fn spurious_json(r: &SpuriousRun) -> Json {
    let s = &r.stats;
    obj([
        ("faults", Json::Int(s.faults)),
        ("retries", Json::Int(s.retries)),
        ("spurious_retries", Json::Int(s.spurious_retries)),
        ("retries_avoided", Json::Int(s.retries_avoided)),
        ("resolved_under_lock", Json::Int(s.resolved_under_lock)),
        ("discards", Json::Int(r.discards)),
        ("touched_pages", Json::Int(r.touched_pages)),
        ("spurious_retry_pct", num(r.spurious_pct())),
        ("retry_pct", num(r.retry_pct())),
        ("pinned", Json::Bool(r.pinned)),
        ("us_per_page", num(r.us_per_page())),
        ("fault_latency", latency_json(s)),
    ])
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

fn fmt_us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or other flags mean nothing here.
    let scale = scale();
    let started = Instant::now();
    let page = guest_mem::backing::host_page_size();
    let big = sized(scale, 256, 4);
    let small = sized(scale, 64, 2);
    let recheck_bytes = sized(scale, 16, 2);
    let spurious_bytes = sized(scale, 128, 8);
    eprintln!(
        "[bench] guest-mem fault_service: scale {scale}, {REPS} reps, page {page} B, \
         {} MiB regions ({} MiB for 4 KiB readahead)",
        big / MIB,
        small / MIB
    );

    eprintln!(
        "[bench] filling a {} MiB image for the file source",
        big / MIB
    );
    let source = file_source(big);

    let uffd = |key, label, readahead, file, bytes| TouchCfg {
        key,
        label,
        mode: FaultMode::Userfault,
        readahead,
        file,
        bytes,
    };
    let configs = [
        TouchCfg {
            key: "kernel",
            label: "kernel demand fault",
            mode: FaultMode::Kernel,
            readahead: Readahead::default(),
            file: false,
            bytes: big,
        },
        uffd(
            "zero_4k",
            "uffd zero, 4k",
            Readahead::fixed(4096),
            false,
            small,
        ),
        uffd(
            "zero_64k",
            "uffd zero, 64k",
            Readahead::fixed(64 << 10),
            false,
            big,
        ),
        uffd(
            "zero_2m",
            "uffd zero, 2m",
            Readahead::fixed(2 << 20),
            false,
            big,
        ),
        uffd(
            "zero_adaptive",
            "uffd zero, adaptive",
            Readahead::default(),
            false,
            big,
        ),
        uffd(
            "file_4k",
            "uffd file, 4k",
            Readahead::fixed(4096),
            true,
            small,
        ),
        uffd(
            "file_64k",
            "uffd file, 64k",
            Readahead::fixed(64 << 10),
            true,
            big,
        ),
        uffd(
            "file_2m",
            "uffd file, 2m",
            Readahead::fixed(2 << 20),
            true,
            big,
        ),
        uffd(
            "file_adaptive",
            "uffd file, adaptive",
            Readahead::default(),
            true,
            big,
        ),
    ];

    // 1 + 2, interleaved so that drift in the machine's load hits every
    // configuration alike.
    let mut touch_runs: Vec<Vec<TouchRun>> = configs.iter().map(|_| Vec::new()).collect();
    for rep in 0..REPS {
        for (cfg, runs) in configs.iter().zip(&mut touch_runs) {
            let r = first_touch(cfg, &source, |_| {});
            eprintln!(
                "[bench] rep {}/{REPS} first touch {:<20} {:>4} MiB {:>7.3} s  {:>6.2} us/page",
                rep + 1,
                cfg.label,
                cfg.bytes / MIB,
                r.secs,
                r.us_per_page()
            );
            runs.push(r);
        }
    }
    let touch_reps: Vec<Vec<f64>> = touch_runs
        .iter()
        .map(|runs| runs.iter().map(TouchRun::us_per_page).collect())
        .collect();
    let touch_med: Vec<TouchRun> = touch_runs
        .into_iter()
        .map(|runs| median_by(runs, TouchRun::us_per_page))
        .collect();
    let by_key = |key: &str| {
        let i = configs.iter().position(|c| c.key == key).expect("config");
        &touch_med[i]
    };

    // 3: re-check, end to end (alternating, ABBA) and in isolation.
    let recheck_cfg = TouchCfg {
        bytes: recheck_bytes,
        ..configs[1]
    };
    let mut on_us = Vec::new();
    let mut off_us = Vec::new();
    for pair in 0..RECHECK_PAIRS {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for skip in order {
            let r = first_touch(&recheck_cfg, &source, |c| c.skip_recheck = skip);
            eprintln!(
                "[bench] pair {}/{RECHECK_PAIRS} re-check {:<3} {:>4} MiB {:>6.2} us/page",
                pair + 1,
                if skip { "off" } else { "on" },
                recheck_bytes / MIB,
                r.us_per_page()
            );
            if skip {
                off_us.push(r.us_per_page());
            } else {
                on_us.push(r.us_per_page());
            }
        }
    }
    let (on_mean, off_mean) = (mean(&on_us), mean(&off_us));
    let recheck_on_off_pct = (on_mean - off_mean) / off_mean * 100.0;
    // Per pair, the two runs are back to back, so their ratio is less
    // exposed to the machine's load drifting over the whole series.
    let pair_pcts: Vec<f64> = on_us
        .iter()
        .zip(&off_us)
        .map(|(on, off)| (on - off) / off * 100.0)
        .collect();
    let recheck_pair_median_pct = median(&pair_pcts);
    let mut unchanged = Vec::new();
    let mut changed = Vec::new();
    for rep in 0..REPS {
        unchanged.push(recheck_unchanged_ns());
        changed.push(recheck_changed_ns());
        eprintln!(
            "[bench] rep {}/{REPS} isolated re-check: {:.1} ns unchanged, {:.1} ns changed elsewhere",
            rep + 1,
            unchanged[rep],
            changed[rep]
        );
    }
    let recheck_ns = median(&unchanged);
    let recheck_changed = median(&changed);
    let service = |key: &str| by_key(key).stats.fault_latency.mean_ns as f64;
    let fault_service_ns = service("zero_4k");
    let recheck_overhead_pct = recheck_ns / fault_service_ns * 100.0;

    // 4: retries under a discard stream.
    let mut per_file = Vec::new();
    let mut range_log = Vec::new();
    for rep in 0..REPS {
        for policy in [RetryPolicy::AnyInvalidation, RetryPolicy::Overlapping] {
            let seed = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(rep as u64 + 1);
            let r = discard_stream(spurious_bytes, policy, &source, seed);
            eprintln!(
                "[bench] rep {}/{REPS} discard stream {:<15?} faults {:>5} retries {:>5} \
                 spurious {:>5} avoided {:>5} slow {:>4} discards {:>6}  {:>6.2} us/page",
                rep + 1,
                r.policy,
                r.stats.faults,
                r.stats.retries,
                r.stats.spurious_retries,
                r.stats.retries_avoided,
                r.stats.resolved_under_lock,
                r.discards,
                r.us_per_page()
            );
            match policy {
                RetryPolicy::AnyInvalidation => per_file.push(r),
                RetryPolicy::Overlapping => range_log.push(r),
            }
        }
    }
    let per_file = median_by(per_file, SpuriousRun::spurious_pct);
    let range_log = median_by(range_log, SpuriousRun::retry_pct);

    // 5: discard throughput.
    let mut d4k = Vec::new();
    let mut d2m = Vec::new();
    for rep in 0..REPS {
        let mem = build(big, FaultMode::Kernel, Readahead::default(), None, |_| {});
        d4k.push(discard_throughput(&mem, big, 4096));
        d2m.push(discard_throughput(&mem, big, 2 << 20));
        eprintln!(
            "[bench] rep {}/{REPS} discard {} MiB: {:.2} GiB/s in 4 KiB chunks, {:.2} GiB/s in 2 MiB chunks",
            rep + 1,
            big / MIB,
            d4k[rep],
            d2m[rep]
        );
    }
    let (discard_4k, discard_2m) = (median(&d4k), median(&d2m));

    // 6: placing a boot image (the size of a distribution kernel).
    let image_bytes = sized(scale, 48, 4);
    let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let image = filled_memfd("bench-kernel", image_bytes, &pattern);
    let placements = [
        Placement::ImageFile,
        Placement::MappingUffd,
        Placement::MappingKernel,
    ];
    let mut place_s = vec![Vec::new(); placements.len()];
    let mut place_faults = vec![0u64; placements.len()];
    for rep in 0..REPS {
        for (i, how) in placements.iter().enumerate() {
            let (secs, faults) = place_image(&image, image_bytes, *how);
            place_s[i].push(secs);
            place_faults[i] = faults;
            eprintln!(
                "[bench] rep {}/{REPS} place a {} MiB image ({how:?}): {:.1} ms, {faults} faults",
                rep + 1,
                image_bytes / MIB,
                secs * 1e3
            );
        }
    }
    let place_ms: Vec<f64> = place_s.iter().map(|v| median(v) * 1e3).collect();

    // ---- report -----------------------------------------------------------
    let kernel_us = by_key("kernel").us_per_page();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nguest-mem fault service (scale {scale}, median of {REPS}, {} KiB pages)",
        page / 1024
    );
    let _ = writeln!(
        t,
        "\n{:<22} {:>7} {:>9} {:>10} {:>7} {:>8} {:>8} {:>8} {:>9}",
        "first touch",
        "MiB",
        "us/page",
        "pages/s",
        "faults",
        "p50 us",
        "p99 us",
        "mean us",
        "vs kernel"
    );
    for (cfg, r) in configs.iter().zip(&touch_med) {
        let h = &r.stats.fault_latency;
        let uffd = cfg.mode == FaultMode::Userfault;
        let cell = |v: u64| if uffd { fmt_us(v) } else { "-".into() };
        let _ = writeln!(
            t,
            "{:<22} {:>7} {:>9.2} {:>10.0} {:>7} {:>8} {:>8} {:>8} {:>8.2}x",
            cfg.label,
            cfg.bytes / MIB,
            r.us_per_page(),
            r.pages_per_s(),
            if uffd {
                r.stats.faults.to_string()
            } else {
                "-".into()
            },
            cell(h.p50_ns),
            cell(h.p99_ns),
            cell(h.mean_ns),
            kernel_us / r.us_per_page()
        );
    }
    let _ = writeln!(
        t,
        "(p50/p99/mean: handler service time from reading the event to the install, \
         histogram bucket midpoints; vs kernel > 1 means faster than kernel faults)"
    );
    let _ = writeln!(t, "\nre-check");
    let _ = writeln!(
        t,
        "  isolated sample+lock_install+recheck  {recheck_ns:>8.1} ns (unchanged), \
         {recheck_changed:.1} ns (8 invalidations elsewhere)"
    );
    let _ = writeln!(
        t,
        "  mean fault service (uffd zero, 4k)    {:>8.1} ns  -> recheck_overhead_pct {:.3}%",
        fault_service_ns, recheck_overhead_pct
    );
    let _ = writeln!(
        t,
        "  end to end, {} pairs ABBA, {} MiB     on {:.2} us/page, off {:.2} us/page \
         -> recheck_on_off_pct {:+.2}% (median of pairs {:+.2}%)",
        RECHECK_PAIRS,
        recheck_bytes / MIB,
        on_mean,
        off_mean,
        recheck_on_off_pct,
        recheck_pair_median_pct
    );
    let _ = writeln!(
        t,
        "  (skip_recheck only ignores the verdict: sample, lock_install and recheck still run, \
         so the end-to-end difference is noise around the cost of one branch)"
    );
    let _ = writeln!(
        t,
        "\ndiscard stream ({} MiB region, file source, 64k readahead, {TOUCHERS} touchers on the \
         lower half, random 4 KiB discards in the upper half)",
        spurious_bytes / MIB
    );
    let _ = writeln!(
        t,
        "  {:<18} {:>6} {:>7} {:>8} {:>8} {:>6} {:>8} {:>10} {:>9} {:>8}",
        "policy",
        "faults",
        "retries",
        "spurious",
        "avoided",
        "slow",
        "discards",
        "spurious%",
        "retries%",
        "us/page"
    );
    for (name, r) in [("per_file", &per_file), ("range_log", &range_log)] {
        let s = &r.stats;
        let _ = writeln!(
            t,
            "  {:<18} {:>6} {:>7} {:>8} {:>8} {:>6} {:>8} {:>9.1}% {:>8.1}% {:>8.2}",
            format!("{name} ({:?})", r.policy)
                .chars()
                .take(18)
                .collect::<String>(),
            s.faults,
            s.retries,
            s.spurious_retries,
            s.retries_avoided,
            s.resolved_under_lock,
            r.discards,
            r.spurious_pct(),
            r.retry_pct(),
            r.us_per_page()
        );
    }
    let _ = writeln!(
        t,
        "  (no install range overlaps a discard here, so every retry is unneeded: retries% \
         counts them all, spurious% only those the stats class as spurious; handler and \
         discarder pinned to separate CPUs: {})",
        per_file.pinned
    );
    let _ = writeln!(
        t,
        "\ndiscard throughput ({} MiB populated): {:.2} GiB/s in 4 KiB chunks ({:.2} us each), \
         {:.2} GiB/s in 2 MiB chunks",
        big / MIB,
        discard_4k,
        4096.0 / (discard_4k * GIB) * 1e6,
        discard_2m
    );
    let _ = writeln!(
        t,
        "\nplacing a {} MiB boot image: through the backing file (ImageFile) {:.1} ms, \
         {} faults; through the mapping with userfaultfd {:.1} ms, {} faults ({:.2}x the \
         time); through the mapping with kernel faults {:.1} ms ({:.2}x)",
        image_bytes / MIB,
        place_ms[0],
        place_faults[0],
        place_ms[1],
        place_faults[1],
        place_ms[1] / place_ms[0],
        place_ms[2],
        place_ms[2] / place_ms[0]
    );
    let best = ["zero_2m", "file_2m", "zero_adaptive", "file_adaptive"]
        .iter()
        .map(|k| (*k, by_key(k).us_per_page()))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("configs");
    let _ = writeln!(
        t,
        "\nkernel demand fault {kernel_us:.2} us/page; fastest uffd ({}) {:.2} us/page = {:.2}x \
         the kernel's speed",
        best.0,
        best.1,
        kernel_us / best.1
    );
    print!("{t}");

    // ---- JSON -------------------------------------------------------------
    let keyed = |prefix: &str, f: &dyn Fn(&TouchRun) -> f64| {
        obj(["4k", "64k", "2m"]
            .into_iter()
            .map(|k| (k, num(f(by_key(&format!("{prefix}_{k}")))))))
    };
    let json = obj([
        ("bench", Json::Str("guest-mem fault_service".into())),
        ("scale", num(scale)),
        ("reps", Json::Int(REPS as u64)),
        ("page_size", Json::Int(page)),
        ("kernel_fault_us", num(kernel_us)),
        ("uffd_fault_us", keyed("zero", &TouchRun::us_per_page)),
        ("uffd_fault_file_us", keyed("file", &TouchRun::us_per_page)),
        (
            "uffd_adaptive_us",
            num(by_key("zero_adaptive").us_per_page()),
        ),
        (
            "uffd_adaptive_file_us",
            num(by_key("file_adaptive").us_per_page()),
        ),
        (
            "pages_per_s",
            obj(configs
                .iter()
                .zip(&touch_med)
                .map(|(c, r)| (c.key, num(r.pages_per_s())))),
        ),
        (
            "fault_latency",
            obj(configs
                .iter()
                .zip(&touch_med)
                .filter(|(c, _)| c.mode == FaultMode::Userfault)
                .map(|(c, r)| (c.key, latency_json(&r.stats)))),
        ),
        (
            "first_touch",
            obj(configs
                .iter()
                .zip(&touch_med)
                .zip(&touch_reps)
                .map(|((c, r), reps)| {
                    (
                        c.key,
                        obj([
                            ("region_bytes", Json::Int(c.bytes)),
                            ("us_per_page", num(r.us_per_page())),
                            (
                                "reps_us_per_page",
                                Json::Arr(reps.iter().map(|&v| num(v)).collect()),
                            ),
                            ("faults", Json::Int(r.stats.faults)),
                            ("readahead_pages", Json::Int(r.stats.readahead_pages)),
                        ]),
                    )
                })),
        ),
        ("recheck_ns", num(recheck_ns)),
        ("recheck_changed_elsewhere_ns", num(recheck_changed)),
        ("fault_service_ns", num(fault_service_ns)),
        ("recheck_overhead_pct", num(recheck_overhead_pct)),
        ("recheck_on_off_pct", num(recheck_on_off_pct)),
        (
            "recheck_on_off_pair_median_pct",
            num(recheck_pair_median_pct),
        ),
        (
            "recheck_on_us",
            Json::Arr(on_us.iter().map(|&v| num(v)).collect()),
        ),
        (
            "recheck_off_us",
            Json::Arr(off_us.iter().map(|&v| num(v)).collect()),
        ),
        (
            "spurious_retry_pct",
            obj([
                ("per_file", num(per_file.spurious_pct())),
                ("range_log", num(range_log.spurious_pct())),
            ]),
        ),
        (
            "discard_stream",
            obj([
                ("region_bytes", Json::Int(spurious_bytes)),
                ("per_file", spurious_json(&per_file)),
                ("range_log", spurious_json(&range_log)),
            ]),
        ),
        (
            "discard_gib_s",
            obj([("4k", num(discard_4k)), ("2m", num(discard_2m))]),
        ),
        (
            "image_placement",
            obj([
                ("image_bytes", Json::Int(image_bytes)),
                ("image_file_ms", num(place_ms[0])),
                ("mapping_uffd_ms", num(place_ms[1])),
                ("mapping_kernel_ms", num(place_ms[2])),
                ("image_file_faults", Json::Int(place_faults[0])),
                ("mapping_uffd_faults", Json::Int(place_faults[1])),
                (
                    "mapping_uffd_over_image_file",
                    num(place_ms[1] / place_ms[0]),
                ),
            ]),
        ),
        ("elapsed_s", num(started.elapsed().as_secs_f64())),
    ]);
    let mut text = serde_json::to_string_pretty(&json.to_value()).unwrap_or_default();
    text.push('\n');
    let path = output_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("creating the bench output directory");
    }
    std::fs::write(&path, text).expect("writing the bench JSON");
    eprintln!(
        "[bench] wrote {} ({:.1} s in all)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
}
