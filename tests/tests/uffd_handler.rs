//! The external page-fault handler (`uffd-handler`'s server over
//! `guest-mem`'s external fault path) serving a peer that behaves as
//! Firecracker does on a snapshot restore with `mem_backend` `"Uffd"`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use guest_mem::{FaultConfig, Readahead, TestHook};
use integration_tests::external_guest::{ExternalGuest, GUEST_BASE, LOAD};
use integration_tests::kvm_available;
use integration_tests::payload::file_check_payload;
use integration_tests::uffd_peer::{file_word, memory_file, send, FirecrackerLike};
use uffd_handler::server::{Peer, Refused, Server};
use userfaultfd::FeatureFlags;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("uffd-handler-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Accepted = Result<Peer, (u64, Refused)>;

/// A server over a fresh memory file of `len` bytes whose accept loop
/// sends every outcome down the channel.
fn server(dir: &Dir, len: u64, fault: FaultConfig) -> (PathBuf, mpsc::Receiver<Accepted>) {
    let (sock, mem) = (dir.path("uffd.sock"), dir.path("snapshot.mem"));
    memory_file(&mem, len).unwrap();
    let server = Server::bind(&sock, &mem, fault).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(r) = server.accept() {
            if tx.send(r).is_err() {
                break;
            }
        }
    });
    (sock, rx)
}

fn accepted(rx: &mpsc::Receiver<Accepted>) -> Accepted {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the server answers within 10 s")
}

/// Waits (at most 10 s) for the peer's service to end; returns its line.
fn ended(peer: Peer) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(peer.wait()));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the service ends once the peer hangs up")
}

fn wait_for(what: impl Fn() -> bool) {
    let t = Instant::now();
    while !what() {
        assert!(t.elapsed() < Duration::from_secs(10), "waited 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn userfaultfd_usable() -> bool {
    FirecrackerLike::new(&[2 * MIB], PAGE, FeatureFlags::empty()).is_ok()
}

/// Whether the page at `addr` holds the memory file's words (at 0, the
/// middle and the end).
fn holds_file(peer: &FirecrackerLike, addr: u64) -> bool {
    [0, 0x800, 0xff8]
        .iter()
        .any(|o| peer.read(addr + o) == file_word(peer.file_offset(addr) + o))
}

#[test]
fn a_cpl3_guest_reads_the_memory_file_through_the_handler_which_ends_on_hang_up() {
    if !kvm_available() || !userfaultfd_usable() {
        eprintln!("skipped: /dev/kvm or userfaultfd is not available");
        return;
    }
    let dir = Dir::new("payload");
    let sizes = [32 * MIB, 16 * MIB];
    let fault = FaultConfig {
        threads: 2,
        ..FaultConfig::default()
    };
    let (sock, rx) = server(&dir, 48 * MIB, fault);
    let mut fc = FirecrackerLike::new(&sizes, PAGE, FeatureFlags::empty()).unwrap();
    fc.connect(&sock).unwrap();
    let peer = accepted(&rx).map_err(|(_, e)| e).unwrap();
    assert_eq!(peer.regions.len(), 2);
    assert_eq!(peer.pid, Some(std::process::id() as i32));

    let guest = ExternalGuest::new(
        &fc.regions
            .iter()
            .map(|r| (r.host, r.size))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    // Guest address g holds file offset g - GUEST_BASE: regions are laid
    // out in file order.
    let delta = 0u64.wrapping_sub(GUEST_BASE);
    let verdicts = guest
        .run(
            &file_check_payload(LOAD),
            &[
                [0, GUEST_BASE, GUEST_BASE + sizes[0], delta, 0, 0],
                [1, GUEST_BASE + sizes[0], GUEST_BASE + 48 * MIB, delta, 0, 0],
            ],
        )
        .unwrap();
    for (id, (v, size)) in verdicts.iter().zip(sizes).enumerate() {
        assert_eq!(v.code, 0, "vCPU {id}: {v:x?}");
        assert_eq!(v.regs[0], size / PAGE, "vCPU {id}: pages holding the file");
    }
    // And every word of every page, from the host.
    for r in &fc.regions {
        for a in (r.host..r.host + r.size).step_by(64) {
            assert_eq!(fc.read(a), file_word(fc.file_offset(a)), "{a:#x}");
        }
    }
    let s = peer.handler.settled_stats(Duration::from_secs(5));
    assert_eq!(s.pages_installed, 48 * MIB / PAGE, "{s}");
    assert!(s.faults * 10 < s.pages_installed, "readahead batches: {s}");
    assert_eq!(
        s.out_of_range + s.unknown_address + s.install_errors,
        0,
        "{s}"
    );
    assert!(peer.handler.failure().message().is_none());
    fc.hang_up();
    let line = ended(peer);
    assert!(line.contains("the peer closed its socket"), "{line}");
    eprintln!("{line}");
}

/// What one run of the remove race left.
#[derive(Debug)]
struct RaceOutcome {
    removed: u64,
    /// Removed pages that hold the memory file's contents afterwards.
    stale: u64,
    /// Pages the guest found zero.
    guest_zero: u64,
}

/// A CPL3 guest reads a region page by page while a second thread gives
/// pages back (`MADV_DONTNEED`, the balloon). Every fault's fetch is held
/// 50 ms (test switch) and a window of 16 pages is read ahead: the remover
/// waits for each fault to be read, then removes pages 8..12 of its window,
/// so the remove event is read (by the second handler thread) while the
/// fault's contents are fetched and before they are installed — the order
/// "fault read before its remove event", every time.
fn remove_race(recheck: bool) -> RaceOutcome {
    let dir = Dir::new(if recheck { "race-on" } else { "race-off" });
    let size = 256 * KIB;
    let pages = size / PAGE;
    let fault = FaultConfig {
        threads: 2,
        readahead: Readahead::fixed(16 * PAGE),
        skip_recheck: !recheck,
        fetch_delay: Duration::from_millis(50),
        ..FaultConfig::default()
    };
    let (sock, rx) = server(&dir, size, fault);
    let mut fc = FirecrackerLike::new(&[size], PAGE, FeatureFlags::empty()).unwrap();
    fc.connect(&sock).unwrap();
    let peer = Arc::new(accepted(&rx).map_err(|(_, e)| e).unwrap());
    let fc = Arc::new(fc);
    let base = fc.regions[0].host;
    let done = Arc::new(AtomicBool::new(false));

    let remover = {
        let (peer, fc, done) = (peer.clone(), fc.clone(), done.clone());
        std::thread::spawn(move || {
            let mut removed = std::collections::BTreeSet::new();
            let mut seen = 0;
            while !done.load(Ordering::Acquire) {
                let s = peer.handler.stats();
                if s.faults == seen {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                seen = s.faults;
                // The pages before the fault are all installed by now (the
                // guest walks in order): the fault is at the next one.
                std::thread::sleep(Duration::from_millis(2));
                let p = peer.handler.stats().pages_installed;
                if removed.contains(&p) || p + 12 > pages {
                    continue;
                }
                fc.remove(base + (p + 8) * PAGE, 4 * PAGE).unwrap();
                removed.extend(p + 8..p + 12);
            }
            removed
        })
    };
    let guest = ExternalGuest::new(&[(base, size)]).unwrap();
    let v = guest
        .run(
            &file_check_payload(LOAD),
            &[[
                0,
                GUEST_BASE,
                GUEST_BASE + size,
                0u64.wrapping_sub(GUEST_BASE),
                1,
                0,
            ]],
        )
        .unwrap()[0];
    done.store(true, Ordering::Release);
    let removed = remover.join().unwrap();
    assert_eq!(
        v.code, 0,
        "the guest found a page neither the file's nor zero: {v:x?}"
    );
    let stale = removed
        .iter()
        .filter(|&&p| holds_file(&fc, base + p * PAGE))
        .count() as u64;
    let zero_everywhere = removed.iter().all(|&p| {
        let a = base + p * PAGE;
        (0..PAGE).step_by(8).all(|o| fc.read(a + o) == 0)
    });
    assert!(
        stale > 0 || zero_everywhere,
        "a removed page is neither zero nor stale"
    );
    eprintln!(
        "recheck {}: {} pages removed, {stale} stale; guest saw {} zero pages; {}",
        if recheck { "on" } else { "off" },
        removed.len(),
        v.regs[1],
        peer.handler.stats().to_string().replace('\n', "; ")
    );
    RaceOutcome {
        removed: removed.len() as u64,
        stale,
        guest_zero: v.regs[1],
    }
}

#[test]
fn a_page_removed_while_its_fault_is_fetched_reads_zero_and_without_the_recheck_it_would_not() {
    if !kvm_available() || !userfaultfd_usable() {
        eprintln!("skipped: /dev/kvm or userfaultfd is not available");
        return;
    }
    let on = remove_race(true);
    assert!(on.removed >= 8, "{on:?}");
    assert_eq!(
        on.stale, 0,
        "with the re-check no removed page holds the file: {on:?}"
    );
    assert_eq!(
        on.guest_zero, on.removed,
        "the guest read every removed page as zero: {on:?}"
    );
    // The same run with the re-check switched off installs the fetched
    // window over the removed pages: the snapshot's contents come back.
    let off = remove_race(false);
    assert!(off.removed > 0, "{off:?}");
    assert!(
        off.stale > 0,
        "without the re-check removed pages hold the file: {off:?}"
    );
}

#[test]
fn an_install_held_back_by_a_pending_remove_reads_it_and_installs_zero() {
    if !userfaultfd_usable() {
        eprintln!("skipped: userfaultfd is not available");
        return;
    }
    // One handler thread: the remove event can only be read by the thread
    // whose install the kernel holds back (EAGAIN) while it is pending.
    let dir = Dir::new("eagain");
    let mut fc = FirecrackerLike::new(&[MIB], PAGE, FeatureFlags::empty()).unwrap();
    // The first install waits until the remove is queued on the
    // userfaultfd: the toucher's fault has been read by then, so the
    // descriptor turns readable only for the remove event. No timing.
    let (uffd, armed) = (fc.uffd.as_raw_fd(), AtomicBool::new(true));
    let fault = FaultConfig {
        threads: 1,
        readahead: Readahead::NONE,
        after_fetch: Some(TestHook::new(move || {
            if armed.swap(false, Ordering::SeqCst) {
                let mut p = libc::pollfd {
                    fd: uffd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, read and written by poll only.
                let n = unsafe { libc::poll(&mut p, 1, 10_000) };
                assert_eq!(n, 1, "the remove was never queued");
            }
        })),
        ..FaultConfig::default()
    };
    let (sock, rx) = server(&dir, MIB, fault);
    fc.connect(&sock).unwrap();
    let peer = accepted(&rx).map_err(|(_, e)| e).unwrap();
    let fc = Arc::new(fc);
    let page = fc.regions[0].host + 10 * PAGE;
    let toucher = {
        let fc = fc.clone();
        std::thread::spawn(move || fc.read(page))
    };
    let t0 = Instant::now();
    while peer.handler.stats().faults == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the fault was never read"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let t = Instant::now();
    fc.remove(page, PAGE).unwrap();
    let took = t.elapsed();
    assert_eq!(toucher.join().unwrap(), 0, "the removed page reads zero");
    assert_eq!(fc.read(page + 0x800), 0);
    let s = peer.handler.settled_stats(Duration::from_secs(5));
    eprintln!(
        "remove took {took:?}; {}",
        s.to_string().replace('\n', "; ")
    );
    assert!(
        took < Duration::from_secs(5),
        "the remove was not left waiting"
    );
    assert!(s.installs_held_back >= 1, "{s}");
    assert_eq!((s.remove_events, s.pages_removed), (1, 1), "{s}");
    assert!(s.resolved_under_lock >= 1, "the re-check settled it: {s}");
    assert_eq!(s.pages_installed, 1, "{s}");
}

#[test]
fn readahead_never_refills_a_removed_page_and_a_later_touch_reads_zero() {
    if !userfaultfd_usable() {
        eprintln!("skipped: userfaultfd is not available");
        return;
    }
    let dir = Dir::new("readahead");
    let (sock, rx) = server(&dir, 4 * MIB, FaultConfig::default());
    let mut fc = FirecrackerLike::new(&[4 * MIB], PAGE, FeatureFlags::empty()).unwrap();
    fc.connect(&sock).unwrap();
    let peer = accepted(&rx).map_err(|(_, e)| e).unwrap();
    let base = fc.regions[0].host;
    // Given back before anything was touched, then the whole region read
    // in order with 2 MiB adaptive readahead.
    let (hole, hole_len) = (base + MIB + 5 * PAGE, 64 * KIB);
    fc.remove(hole, hole_len).unwrap();
    for a in (base..base + 4 * MIB).step_by(PAGE as usize) {
        let in_hole = a >= hole && a < hole + hole_len;
        let w = fc.read(a + 16);
        if in_hole {
            assert_eq!(w, 0, "{a:#x} was removed");
        } else {
            assert_eq!(w, file_word(fc.file_offset(a) + 16), "{a:#x}");
        }
    }
    let s = peer.handler.settled_stats(Duration::from_secs(5));
    assert_eq!(s.pages_removed, hole_len / PAGE, "{s}");
    assert_eq!(s.pages_installed, 4 * MIB / PAGE, "{s}");
    assert_eq!(
        s.installs_zero,
        hole_len / PAGE,
        "one zero page per removed page: {s}"
    );
    assert!(s.readahead_pages > 900, "{s}");
    assert_eq!(
        peer.handler.removed_pages(),
        0,
        "touched again: no longer owed zero"
    );
}

#[test]
fn unmap_and_remap_events_edit_the_region_table() {
    if !userfaultfd_usable() {
        eprintln!("skipped: userfaultfd is not available");
        return;
    }
    let dir = Dir::new("remap");
    let fault = FaultConfig {
        readahead: Readahead::NONE,
        ..FaultConfig::default()
    };
    let (sock, rx) = server(&dir, 4 * MIB, fault);
    let mut fc = FirecrackerLike::new(
        &[4 * MIB],
        PAGE,
        FeatureFlags::EVENT_UNMAP | FeatureFlags::EVENT_REMAP,
    )
    .unwrap();
    fc.connect(&sock).unwrap();
    let peer = accepted(&rx).map_err(|(_, e)| e).unwrap();
    let base = fc.regions[0].host;
    assert_eq!(fc.read(base), file_word(0));

    // SAFETY: the second MiB of the peer's own mapping; nothing refers to it.
    let rc = unsafe { libc::munmap((base + MIB) as *mut _, MIB as usize) };
    assert_eq!(rc, 0);
    // munmap returns once the event is read; it is applied just after.
    wait_for(|| peer.handler.stats().unmap_events == 1);
    let regions = peer.handler.regions();
    assert_eq!(
        regions
            .iter()
            .map(|r| (r.host_addr - base, r.size, r.offset))
            .collect::<Vec<_>>(),
        [(0, MIB, 0), (2 * MIB, 2 * MIB, 2 * MIB)]
    );

    // Move the third MiB elsewhere; its file offsets go with it.
    // SAFETY: a fresh reservation the remap below replaces.
    let to = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MIB as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(to, libc::MAP_FAILED);
    // SAFETY: moves one MiB of the peer's own mapping onto the reservation.
    let moved = unsafe {
        libc::mremap(
            (base + 2 * MIB) as *mut _,
            MIB as usize,
            MIB as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to,
        )
    };
    assert_eq!(moved, to);
    let to = to as u64;
    wait_for(|| peer.handler.stats().remap_events == 1);
    let s = peer.handler.stats();
    // The kernel also reports the old range's unmap (after the remap).
    assert_eq!(s.remap_events, 1, "{s}");
    assert!(peer
        .handler
        .regions()
        .iter()
        .any(|r| r.host_addr == to && r.size == MIB && r.offset == 2 * MIB));
    // SAFETY: a word of the moved mapping; the handler serves the fault at
    // its new address from the same file offset.
    let w = unsafe { std::ptr::read_volatile((to + 3 * PAGE) as *const u64) };
    assert_eq!(w, file_word(2 * MIB + 3 * PAGE));
    assert_eq!(fc.read(base + 3 * MIB), file_word(3 * MIB));
    assert_eq!(peer.handler.stats().unknown_address, 0);
    // SAFETY: the moved mapping, which nothing refers to any more.
    unsafe { libc::munmap(to as *mut _, MIB as usize) };
}

fn refusal(sock: &Path, rx: &mpsc::Receiver<Accepted>, body: &str, fd: Option<i32>) -> String {
    let stream = std::os::unix::net::UnixStream::connect(sock).unwrap();
    send(&stream, body.as_bytes(), fd).unwrap();
    match accepted(rx) {
        Ok(peer) => panic!("{body}: served ({} regions)", peer.regions.len()),
        Err((_, e)) => e.to_string(),
    }
}

#[test]
fn bad_handshakes_are_refused_with_a_clear_error_and_the_server_keeps_listening() {
    if !userfaultfd_usable() {
        eprintln!("skipped: userfaultfd is not available");
        return;
    }
    let dir = Dir::new("handshakes");
    let (sock, rx) = server(&dir, 8 * MIB, FaultConfig::default());
    let region = |base: u64, size: u64, offset: u64, page: u64| {
        format!(
            r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{page},"page_size_kib":{page}}}"#
        )
    };
    let not_uffd = guest_mem::backing::memfd_file("not-a-uffd", false).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&not_uffd);
    let base = 0x7f00_0000_0000u64;
    let fc = FirecrackerLike::new(&[2 * MIB], PAGE, FeatureFlags::empty()).unwrap();
    let uffd = std::os::fd::AsRawFd::as_raw_fd(&fc.uffd);
    for (body, fd, expect) in [
        ("not json".to_string(), Some(uffd), "not a JSON array"),
        (
            format!("[{}]", region(base, 2 * MIB, 0, PAGE)),
            None,
            "carries no userfaultfd",
        ),
        (
            format!(
                "[{},{}]",
                region(base, 2 * MIB, 0, PAGE),
                region(base + MIB, 2 * MIB, 2 * MIB, PAGE)
            ),
            Some(uffd),
            "region 1: overlaps region 0 in host bytes",
        ),
        (
            format!("[{}]", region(base, 8 * MIB, 2 * MIB, PAGE)),
            Some(uffd),
            "past the memory file's 0x800000 bytes",
        ),
        (
            format!("[{}]", region(base, 2 * MIB, 0, 64 * KIB)),
            Some(uffd),
            "page size 65536 is neither 4 KiB nor 2 MiB",
        ),
        (
            format!("[{}]", region(base, 2 * MIB, 0, PAGE)),
            Some(fd),
            "the descriptor is not a userfaultfd",
        ),
    ] {
        let e = refusal(&sock, &rx, &body, fd);
        assert!(e.contains(expect), "{body}: {e}");
        eprintln!("refused: {e}");
    }
    // Still listening: a good peer is served.
    let mut good = FirecrackerLike::new(&[2 * MIB], PAGE, FeatureFlags::empty()).unwrap();
    good.connect(&sock).unwrap();
    let peer = accepted(&rx).map_err(|(_, e)| e).unwrap();
    let a = good.regions[0].host + 5 * PAGE + 8;
    assert_eq!(good.read(a), file_word(5 * PAGE + 8));
    drop(good);
    assert!(ended(peer).contains("the peer closed its socket"));
}

#[test]
fn two_mib_pages_are_served_and_removed_whole() {
    if !userfaultfd_usable() {
        eprintln!("skipped: userfaultfd is not available");
        return;
    }
    const HUGE: u64 = 2 * MIB;
    let Some(_pool) = integration_tests::uffd_peer::reserve_huge_pages(8) else {
        eprintln!("skipped: no huge pages");
        return;
    };
    let dir = Dir::new("huge");
    let (sock, rx) = server(&dir, 16 * MIB, FaultConfig::default());
    let mut fc = FirecrackerLike::new(&[16 * MIB], HUGE, FeatureFlags::empty()).unwrap();
    fc.connect(&sock).unwrap();
    let peer = accepted(&rx).map_err(|(_, e)| e).unwrap();
    let base = fc.regions[0].host;
    fc.remove(base + 3 * HUGE, HUGE).unwrap();
    for h in 0..8 {
        for o in [0, 5 * PAGE + 8, HUGE - 8] {
            let a = base + h * HUGE + o;
            let want = if h == 3 { 0 } else { file_word(h * HUGE + o) };
            assert_eq!(fc.read(a), want, "huge page {h} offset {o:#x}");
        }
    }
    // A page served, then given back: zero from then on.
    fc.remove(base + 5 * HUGE, HUGE).unwrap();
    assert_eq!(fc.read(base + 5 * HUGE + 64), 0);
    let s = peer.handler.settled_stats(Duration::from_secs(5));
    assert_eq!(s.pages_removed, 2, "{s}");
    assert_eq!(
        s.pages_installed, 9,
        "8 pages and the one removed after use: {s}"
    );
    assert_eq!(s.install_errors + s.out_of_range, 0, "{s}");
}
