//! Restore-style first touch of a memory image through the handler, next
//! to the kernel serving a private file mapping of the same image
//! (Firecracker's `File` memory backend) and to a minimal handler that
//! serves one page per fault as Firecracker's example does; each with and
//! without a concurrent remove stream (a balloon giving 64 KiB ranges back
//! with `MADV_DONTNEED` every 200 µs).
//!
//! The peer is this process: it maps anonymous memory, registers it with a
//! userfaultfd (`EVENT_REMOVE`) and hands it to the server over its socket,
//! as Firecracker does; one thread then reads the first word of every
//! 4 KiB page and writes the second. Afterwards every page the remove
//! stream gave back is checked: it must read zero, and a page holding the
//! image's contents is a stale page.
//!
//! Run with `cargo bench -p uffd-handler`. Prints a table, writes
//! `target/bench/uffd-handler.json` (under `CARGO_TARGET_DIR` when set).
//! `BENCH_SCALE` scales the 256 MiB image. Every figure is the median of
//! three runs; nothing here asserts on a time.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mem::{FaultConfig, Readahead};
use serde_json::{json, Value};
use uffd_handler::server::Server;
use userfaultfd::{Event, FeatureFlags, Uffd, UffdBuilder};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const HUGE: u64 = 2 * MIB;
const REPS: usize = 3;
/// Bytes each removal gives back.
const REMOVE_LEN: u64 = 64 << 10;
const REMOVE_EVERY: Duration = Duration::from_micros(200);

fn file_word(off: u64) -> u64 {
    off ^ 0xf11e_0000_0000_0000
}

fn image(path: &Path, len: u64) {
    let mut f = std::io::BufWriter::new(File::create(path).unwrap());
    let mut chunk = vec![0u8; MIB as usize];
    for at in (0..len).step_by(MIB as usize) {
        for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&file_word(at + i as u64 * 8).to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
    f.flush().unwrap();
}

/// An anonymous (or file) mapping of `len` bytes, unmapped on drop.
struct Mapping {
    addr: u64,
    len: u64,
}

impl Mapping {
    fn anonymous(len: u64, huge: bool) -> Option<Mapping> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if huge {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        }
        Self::map(len, flags, -1)
    }

    fn private_file(file: &File, len: u64) -> Option<Mapping> {
        Self::map(len, libc::MAP_PRIVATE, file.as_raw_fd())
    }

    fn map(len: u64, flags: i32, fd: i32) -> Option<Mapping> {
        // SAFETY: a new mapping at an address the kernel picks, of a file
        // we hold open or anonymous; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(Mapping {
            addr: p as u64,
            len,
        })
    }

    fn read(&self, off: u64) -> u64 {
        assert!(off + 8 <= self.len);
        // SAFETY: inside the mapping; the fault is served by whoever
        // manages it.
        unsafe { std::ptr::read_volatile((self.addr + off) as *const u64) }
    }

    fn write(&self, off: u64, v: u64) {
        assert!(off + 8 <= self.len);
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile((self.addr + off) as *mut u64, v) }
    }

    fn remove(&self, off: u64, len: u64) {
        assert!(off + len <= self.len);
        // SAFETY: a range of our own mapping; nothing holds a reference
        // into it (accesses are volatile reads and writes).
        unsafe {
            libc::madvise(
                (self.addr + off) as *mut _,
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`.
        unsafe { libc::munmap(self.addr as *mut _, self.len as usize) };
    }
}

fn uffd_over(m: &Mapping) -> Uffd {
    let uffd = UffdBuilder::new()
        .require_features(FeatureFlags::EVENT_REMOVE)
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .expect("a userfaultfd (root, or vm.unprivileged_userfaultfd)");
    uffd.register(m.addr as *mut _, m.len as usize).unwrap();
    uffd
}

/// What one run measured.
#[derive(Clone, Copy, Default)]
struct Run {
    us_per_page: f64,
    removed: u64,
    stale: u64,
}

/// Touches every 4 KiB page of `m` in order (read the first word, write
/// the second) while, with `removes`, another thread gives 64 KiB ranges
/// back; then counts removed pages holding the image's contents.
fn touch(m: &Mapping, removes: bool) -> Run {
    let pages = m.len / PAGE;
    let removed: Arc<Vec<AtomicU64>> =
        Arc::new((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let (addr, len) = (m.addr, m.len);
    let remover = removes.then(|| {
        let (removed, done) = (removed.clone(), done.clone());
        std::thread::spawn(move || {
            let m = Mapping { addr, len };
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !done.load(Ordering::Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (len / REMOVE_LEN)) * REMOVE_LEN;
                m.remove(off, REMOVE_LEN);
                let first = off / PAGE;
                for p in first..first + REMOVE_LEN / PAGE {
                    removed[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
                }
                std::thread::sleep(REMOVE_EVERY);
            }
            std::mem::forget(m); // the caller's mapping, not ours to unmap
        })
    });
    let t = Instant::now();
    for p in 0..pages {
        let v = m.read(p * PAGE);
        m.write(p * PAGE + 8, !v);
    }
    let took = t.elapsed();
    done.store(true, Ordering::Release);
    if let Some(r) = remover {
        r.join().unwrap();
    }
    let mut run = Run {
        us_per_page: took.as_secs_f64() * 1e6 / pages as f64,
        ..Run::default()
    };
    for p in 0..pages {
        if removed[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0 {
            run.removed += 1;
            if m.read(p * PAGE) == file_word(p * PAGE) {
                run.stale += 1;
            }
        }
    }
    run
}

/// Through the handler's server, as Firecracker hands its memory over.
fn through_handler(server: &Server, len: u64, huge: bool, removes: bool) -> Option<Run> {
    let m = Mapping::anonymous(len, huge)?;
    let uffd = uffd_over(&m);
    let page = if huge { HUGE } else { PAGE };
    let body = format!(
        r#"[{{"base_host_virt_addr":{},"size":{len},"offset":0,"page_size":{page},"page_size_kib":{page}}}]"#,
        m.addr
    );
    let stream = UnixStream::connect(server.path()).unwrap();
    stream
        .send_with_fd(body.as_bytes(), uffd.as_raw_fd())
        .unwrap();
    let peer = server.accept().unwrap().map_err(|(_, e)| e).unwrap();
    let run = touch(&m, removes);
    drop(stream);
    let s = peer.handler.wait().stats;
    eprintln!(
        "[bench] handler {} {}: {:.2} us/page, {} faults, {} pages removed, {} stale",
        if huge { "2M" } else { "4K" },
        if removes { "+removes" } else { "" },
        run.us_per_page,
        s.faults,
        run.removed,
        run.stale
    );
    Some(run)
}

fn kernel_private_file(file: &File, len: u64, removes: bool) -> Run {
    let m = Mapping::private_file(file, len).unwrap();
    let mut run = touch(&m, removes);
    // A private file mapping reads the file again where pages were
    // dropped: stale pages are what it does, not a race.
    run.stale = 0;
    run
}

/// One page per fault, as Firecracker's example: read every pending event,
/// copy one page for a fault (deferred on EAGAIN), unregister a removed
/// range.
fn one_page_handler(file: &File, len: u64, removes: bool) -> Run {
    let m = Mapping::anonymous(len, false).unwrap();
    let uffd = Arc::new(uffd_over(&m));
    let src = Mapping::map(
        len,
        libc::MAP_PRIVATE | libc::MAP_POPULATE,
        file.as_raw_fd(),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, stop, base, src_addr) = (uffd.clone(), stop.clone(), m.addr, src.addr);
        std::thread::spawn(move || {
            let mut deferred: Vec<u64> = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let mut events: Vec<Event> = Vec::new();
                while let Ok(Some(e)) = uffd.read_event() {
                    events.push(e);
                }
                if events.is_empty() && deferred.is_empty() {
                    let mut fd = libc::pollfd {
                        fd: uffd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; a 10 ms timeout lets the
                    // loop see `stop`.
                    unsafe { libc::poll(&mut fd, 1, 10) };
                    continue;
                }
                let mut faults = std::mem::take(&mut deferred);
                for e in events {
                    match e {
                        Event::Pagefault { addr, .. } => faults.push(addr as u64 & !(PAGE - 1)),
                        Event::Remove { start, end } => {
                            let _ = uffd.unregister(start, end as usize - start as usize);
                        }
                        _ => {}
                    }
                }
                for dst in faults {
                    let src = src_addr + (dst - base);
                    // SAFETY: src is a page of the image mapping, dst a
                    // page of the registered range.
                    match unsafe { uffd.copy(src as *const _, dst as *mut _, PAGE as usize, true) }
                    {
                        Ok(_) => {}
                        Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {}
                        Err(_) => deferred.push(dst),
                    }
                }
            }
        })
    };
    let run = touch(&m, removes);
    stop.store(true, Ordering::Release);
    handler.join().unwrap();
    drop(src);
    run
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn scale() -> f64 {
    std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .unwrap_or(1.0)
}

fn out_path() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
    };
    target.join("bench").join("uffd-handler.json")
}

const POOL: &str = "/proc/sys/vm/nr_hugepages";

/// Reserves `pages` huge pages when allowed; the pool to restore, or why
/// not.
fn reserve_huge(pages: u64) -> Result<Option<u64>, String> {
    let free = guest_mem::backing::free_huge_pages(HUGE).unwrap_or(0);
    if free >= pages {
        return Ok(None);
    }
    let total: u64 = std::fs::read_to_string(POOL)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    std::fs::write(POOL, (total + pages - free).to_string())
        .map_err(|e| format!("{POOL} is not writable: {e}"))?;
    if guest_mem::backing::free_huge_pages(HUGE).unwrap_or(0) < pages {
        let _ = std::fs::write(POOL, total.to_string());
        return Err(format!("the kernel could not reserve {pages} huge pages"));
    }
    Ok(Some(total))
}

fn main() {
    let len = ((256.0 * scale()) as u64).max(4) * MIB / HUGE * HUGE;
    let dir = std::env::temp_dir().join(format!("uffd-handler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mem = dir.join("snapshot.mem");
    image(&mem, len);
    let file = File::open(&mem).unwrap();
    let fault = FaultConfig {
        threads: 2,
        readahead: Readahead::default(),
        ..FaultConfig::default()
    };
    let server = Server::bind(&dir.join("uffd.sock"), &mem, fault).unwrap();
    let huge = reserve_huge(len / HUGE);
    let huge_note = match &huge {
        Ok(_) => "2 MiB pages from the hugetlb pool".to_string(),
        Err(e) => format!("no 2 MiB run: {e}"),
    };

    let mut runs: Vec<(&str, bool, Vec<Run>)> = Vec::new();
    for (name, removes) in [
        ("handler", false),
        ("handler_2m", false),
        ("kernel_private_file", false),
        ("one_page_handler", false),
        ("handler", true),
        ("kernel_private_file", true),
        ("one_page_handler", true),
    ] {
        runs.push((name, removes, Vec::new()));
    }
    for rep in 0..REPS {
        eprintln!("[bench] repetition {}/{REPS}", rep + 1);
        for (name, removes, results) in runs.iter_mut() {
            let r = match *name {
                "handler" => through_handler(&server, len, false, *removes),
                "handler_2m" if huge.is_ok() => through_handler(&server, len, true, *removes),
                "kernel_private_file" => Some(kernel_private_file(&file, len, *removes)),
                "one_page_handler" => Some(one_page_handler(&file, len, *removes)),
                _ => None,
            };
            results.extend(r);
        }
    }
    if let Ok(Some(total)) = huge {
        let _ = std::fs::write(POOL, total.to_string());
    }

    let pages = len / PAGE;
    let mut table = format!(
        "first touch of a {} MiB image, one thread, per 4 KiB page (median of {REPS})\n\
         {:<34} {:>10} {:>9} {:>8} {:>7}\n",
        len >> 20,
        "",
        "us/page",
        "vs kernel",
        "removed",
        "stale"
    );
    let kernel = |removes: bool| {
        runs.iter()
            .find(|(n, r, _)| *n == "kernel_private_file" && *r == removes)
            .map(|(_, _, v)| median(v.iter().map(|r| r.us_per_page).collect()))
            .unwrap_or(f64::NAN)
    };
    let mut plain = serde_json::Map::new();
    let mut with_removes = serde_json::Map::new();
    for (name, removes, results) in &runs {
        let label = format!("{name}{}", if *removes { " + removes" } else { "" });
        if results.is_empty() {
            table.push_str(&format!("{label:<34} {:>10}\n", "n/a"));
            continue;
        }
        let us = median(results.iter().map(|r| r.us_per_page).collect());
        let removed: u64 = results.iter().map(|r| r.removed).sum::<u64>() / results.len() as u64;
        let stale: u64 = results.iter().map(|r| r.stale).sum();
        table.push_str(&format!(
            "{label:<34} {us:>10.2} {:>8.2}x {removed:>8} {stale:>7}\n",
            kernel(*removes) / us
        ));
        let map = if *removes {
            &mut with_removes
        } else {
            &mut plain
        };
        map.insert(format!("{name}_us_per_page"), json!(us));
        if *removes {
            map.insert(format!("{name}_removed_pages"), json!(removed));
            map.insert(format!("{name}_stale_pages"), json!(stale));
        }
    }
    print!("{table}");
    println!("{huge_note}");
    let get =
        |m: &serde_json::Map<String, Value>, k: &str| m.get(k).cloned().unwrap_or(Value::Null);
    let out = json!({
        "image_mib": len >> 20,
        "pages": pages,
        "repetitions": REPS,
        "touch": "one thread: read the first word, write the second, of every 4 KiB page in order",
        "handler": "uffd-handler server, 2 threads, adaptive readahead up to 2 MiB",
        "remove_stream": format!("64 KiB MADV_DONTNEED every {} us at random", REMOVE_EVERY.as_micros()),
        "handler_us_per_page": get(&plain, "handler_us_per_page"),
        "handler_2m_us_per_page": get(&plain, "handler_2m_us_per_page"),
        "hugetlb": huge_note,
        "kernel_private_file_us_per_page": get(&plain, "kernel_private_file_us_per_page"),
        "one_page_handler_us_per_page": get(&plain, "one_page_handler_us_per_page"),
        "removed_pages": get(&with_removes, "handler_removed_pages"),
        "stale_pages": get(&with_removes, "handler_stale_pages"),
        "with_removes": Value::Object(with_removes.clone()),
    });
    let path = out_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {}", path.display());
    let _ = std::fs::remove_dir_all(&dir);
}
