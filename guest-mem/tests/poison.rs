//! A page whose fetch keeps failing is poisoned (`UFFDIO_POISON`), not a
//! stopped VM: the thread that touches it gets `SIGBUS`, the VMM's own
//! accesses of it are refused, every other page still serves, and once the
//! guest gives it back (a discard, a shrink) it is served again. With the
//! `Report` policy it is reported as before.

mod common;

use std::arch::asm;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{
    FaultConfig, GuestMem, PageSource, Readahead, RegionConfig, RegionIndex, RegionSource,
    Unservable,
};

const PAGE: u64 = 4096;
const BAD: u64 = 5 * PAGE;

/// Pages read 0xab, but `BAD` cannot be read (EIO every time).
#[derive(Debug)]
struct FailsAt {
    bad: u64,
    fetches_of_bad: AtomicU64,
}

impl PageSource for FailsAt {
    fn size(&self) -> Option<u64> {
        None
    }
    fn is_zero(&self, _: u64, _: u64) -> bool {
        false
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset <= self.bad && self.bad < offset + buf.len() as u64 {
            self.fetches_of_bad.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf.fill(0xab);
        Ok(())
    }
}

fn memory(policy: Unservable, max: Option<u64>) -> (Arc<GuestMem>, Arc<FailsAt>) {
    let src = Arc::new(FailsAt {
        bad: BAD,
        fetches_of_bad: AtomicU64::new(0),
    });
    let mut rc = RegionConfig::new(0, 64 * PAGE);
    rc.max_size = max;
    rc.source = Some(RegionSource {
        source: src.clone(),
        offset: 0,
    });
    let mem = GuestMem::builder()
        .region(rc)
        .fault_config(FaultConfig {
            readahead: Readahead::NONE,
            on_unservable: policy,
            ..FaultConfig::default()
        })
        .build()
        .unwrap();
    (Arc::new(mem), src)
}

/// Whether this kernel poisons (else the tests that need it skip).
fn poisons(mem: &GuestMem) -> bool {
    match mem.unservable() {
        Some(Unservable::Poison) => true,
        other => {
            eprintln!("skipped: this kernel's userfaultfd cannot poison ({other:?})");
            false
        }
    }
}

// --- Touching a page and surviving its SIGBUS ------------------------------

static ARMED: AtomicBool = AtomicBool::new(false);
static CODE: AtomicI32 = AtomicI32::new(0);
static ADDR: AtomicU64 = AtomicU64::new(0);
/// One probe at a time (the handler's state is global).
static PROBE: Mutex<()> = Mutex::new(());

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if !ARMED.swap(false, Ordering::SeqCst) {
        // Not a probe: let the default action end the process (a test
        // failure, loudly).
        // SAFETY: resetting a signal's disposition is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        return;
    }
    // SAFETY: the kernel passes a valid siginfo and ucontext to an
    // SA_SIGINFO handler; si_addr is valid for SIGBUS.
    unsafe {
        CODE.store((*info).si_code, Ordering::SeqCst);
        ADDR.store((*info).si_addr() as u64, Ordering::SeqCst);
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        // Resume at the probe's recovery label, which it left in r11.
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] = uc.uc_mcontext.gregs[libc::REG_R11 as usize];
    }
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data (zeroed is valid); the handler is
        // async-signal-safe (atomics and register edits only).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
        }
    });
}

/// Reads the byte at `addr` on this thread: `Ok(byte)`, or the `SIGBUS`
/// it raised as `Err((si_code, si_addr))`.
fn probe(addr: u64) -> Result<u8, (i32, u64)> {
    install_handler();
    let _one = PROBE.lock().unwrap_or_else(|p| p.into_inner());
    ARMED.store(true, Ordering::SeqCst);
    let faulted: u64;
    let value: u64;
    // SAFETY: addr lies in a live guest memory mapping owned by the test;
    // the read either completes or raises SIGBUS, whose handler (armed
    // above) resumes at label 2 with `faulted` still 1. r11 is declared
    // clobbered.
    unsafe {
        asm!(
            "lea r11, [rip + 2f]",
            "mov {f}, 1",
            "xor {v}, {v}",
            "mov {v:l}, byte ptr [{a}]",
            "xor {f}, {f}",
            "2:",
            a = in(reg) addr,
            f = out(reg) faulted,
            v = out(reg) value,
            out("r11") _,
        );
    }
    ARMED.store(false, Ordering::SeqCst);
    if faulted != 0 {
        Err((CODE.load(Ordering::SeqCst), ADDR.load(Ordering::SeqCst)))
    } else {
        Ok(value as u8)
    }
}

/// A touch of a poisoned page: BUS_MCEERR_AR where the kernel reports
/// memory failures (`CONFIG_MEMORY_FAILURE`); a kernel without it reports
/// the same poison marker as BUS_ADRERR to a plain (non-KVM) access.
fn is_poison_sigbus(code: i32) -> bool {
    code == libc::BUS_MCEERR_AR || code == libc::BUS_ADRERR
}

fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) == 1 }
}

/// Touches `BAD` from another thread: the fault is retried, then poisoned,
/// and the thread takes SIGBUS at the page.
fn poison_bad_page(mem: &GuestMem) {
    let host = mem.regions()[0].host_addr() + BAD;
    let started = Instant::now();
    let touched = std::thread::spawn(move || probe(host + 0x10))
        .join()
        .unwrap();
    let (code, addr) = touched.expect_err("a poisoned page must raise SIGBUS");
    assert!(is_poison_sigbus(code), "si_code {code}");
    assert_eq!(addr & !(PAGE - 1), host, "si_addr {addr:#x}");
    assert!(
        started.elapsed() >= Duration::from_millis(15),
        "retried with pauses before poisoning"
    );
}

#[test]
fn an_unservable_page_is_poisoned_and_only_it() {
    let (mem, src) = memory(Unservable::Poison, None);
    if !poisons(&mem) {
        return;
    }
    let failure = mem.fault_failure().unwrap().clone();
    poison_bad_page(&mem);
    assert_eq!(src.fetches_of_bad.load(Ordering::SeqCst), 5);
    // Reported as poisoned, not as a failure that stops the VM.
    assert!(wait_readable(failure.poison_event_fd(), Duration::ZERO));
    assert!(!wait_readable(failure.event_fd(), Duration::ZERO));
    assert_eq!(failure.count(), 0);
    assert_eq!(failure.poisoned_count(), 1);
    let p = &failure.poisoned_pages()[0];
    assert_eq!((p.region, p.offset, p.len), (0, BAD, PAGE));
    assert!(p.cause.contains("Input/output error"), "{}", p.cause);
    assert_eq!(mem.stats().pages_poisoned, 1);
    assert_eq!(mem.poisoned_pages(), 1);
    assert!(mem.regions()[0].is_poisoned(BAD, 1));
    assert!(!mem.regions()[0].is_poisoned(BAD + PAGE, PAGE));
    // Touched again, it is not fetched again: the marker answers.
    let host = mem.regions()[0].host_addr() + BAD;
    assert!(probe(host).is_err());
    assert_eq!(src.fetches_of_bad.load(Ordering::SeqCst), 5);
    // The VMM's own accesses are refused, not faulted: any range that
    // holds the page, through either map.
    let dev = mem.device_memory();
    assert!(dev.memory().read_obj::<u8>(GuestAddress(BAD)).is_err());
    let mut buf = [0u8; 32];
    assert!(dev
        .memory()
        .read_slice(&mut buf, GuestAddress(BAD - 16))
        .is_err());
    assert!(dev
        .memory()
        .write_obj(1u64, GuestAddress(BAD + PAGE - 4))
        .is_err());
    assert!(mem
        .memory()
        .memory()
        .read_obj::<u8>(GuestAddress(BAD + 100))
        .is_err());
    // Every other page serves as before.
    for p in [0, 4, 6, 63] {
        let v: u8 = dev.memory().read_obj(GuestAddress(p * PAGE)).unwrap();
        assert_eq!(v, 0xab, "page {p}");
    }
    let v = probe(mem.regions()[0].host_addr() + 7 * PAGE).unwrap();
    assert_eq!(v, 0xab);
}

#[test]
fn a_poisoned_page_given_back_is_served_again() {
    let (mem, _src) = memory(Unservable::Poison, None);
    if !poisons(&mem) {
        return;
    }
    poison_bad_page(&mem);
    assert_eq!(mem.poisoned_pages(), 1);
    // The guest gives it back (a balloon inflate): the set forgets it and
    // the marker goes with it. A hole punch alone would keep the marker.
    mem.discard(GuestAddress(BAD), PAGE).unwrap();
    assert_eq!(mem.poisoned_pages(), 0);
    assert!(!mem.regions()[0].is_poisoned(BAD, PAGE));
    // Touched again it faults to the handler, which installs zero (a
    // discarded page reads zero whatever the source says).
    let host = mem.regions()[0].host_addr() + BAD;
    let v = std::thread::spawn(move || probe(host)).join().unwrap();
    assert_eq!(v, Ok(0), "the page is served again");
    let dev = mem.device_memory();
    dev.memory().write_obj(7u8, GuestAddress(BAD)).unwrap();
    assert_eq!(dev.memory().read_obj::<u8>(GuestAddress(BAD)).unwrap(), 7);
    assert_eq!(mem.fault_failure().unwrap().poisoned_count(), 1);
}

#[test]
fn a_poisoned_page_unplugged_and_plugged_again_is_served() {
    let (mem, _src) = memory(Unservable::Poison, Some(64 * PAGE));
    if !poisons(&mem) {
        return;
    }
    poison_bad_page(&mem);
    mem.resize(RegionIndex(0), 4 * PAGE).unwrap();
    assert_eq!(mem.poisoned_pages(), 0);
    mem.resize(RegionIndex(0), 64 * PAGE).unwrap();
    let host = mem.regions()[0].host_addr() + BAD;
    let v = std::thread::spawn(move || probe(host)).join().unwrap();
    assert_eq!(v, Ok(0), "the page is served again");
}

#[test]
fn the_report_policy_reports_the_page_and_poisons_nothing() {
    let (mem, src) = memory(Unservable::Report, None);
    assert_eq!(mem.unservable(), Some(Unservable::Report));
    let failure = mem.fault_failure().unwrap().clone();
    // The toucher stays on the failing page until the memory goes.
    let snapshot = mem.memory().memory();
    let toucher = std::thread::spawn(move || snapshot.read_obj::<u8>(GuestAddress(BAD)));
    assert!(wait_readable(failure.event_fd(), Duration::from_secs(5)));
    let msg = failure.message().unwrap();
    assert!(msg.contains("offset 0x5000"), "{msg}");
    assert!(msg.contains("could not be served"), "{msg}");
    assert_eq!(failure.poisoned_count(), 0);
    assert_eq!(mem.poisoned_pages(), 0);
    assert_eq!(mem.stats().pages_poisoned, 0);
    assert!(src.fetches_of_bad.load(Ordering::SeqCst) >= 5);
    drop(mem);
    assert_eq!(toucher.join().unwrap().unwrap(), 0);
}

// --- A window whose file spans it: what is not plugged is never served ------

const MIB: u64 = 1 << 20;

/// 1 MiB of RAM and an 8 MiB window spanned by its file: 4 MiB backed,
/// of which only the first 2 MiB are plugged.
fn spanning_window() -> (Arc<GuestMem>, guest_mem::backend::HotplugRegion) {
    let mem = common::ram_and_window(8 * MIB);
    let window = guest_mem::backend::HotplugRegion::spanning(mem.clone(), RegionIndex(1)).unwrap();
    window.set_backed_size(4 * MIB).unwrap();
    window.set_plugged(0, 2 * MIB, true).unwrap();
    (mem, window)
}

fn touch(mem: &GuestMem, offset: u64) -> Result<u8, (i32, u64)> {
    let host = mem.regions()[1].host_addr() + offset;
    std::thread::spawn(move || probe(host)).join().unwrap()
}

#[test]
fn memory_that_is_not_plugged_is_poisoned_when_touched_and_never_allocated() {
    let (mem, window) = spanning_window();
    if !poisons(&mem) {
        return;
    }
    // The last page of the plugged block: served, and readahead stops at
    // the block's end.
    assert_eq!(touch(&mem, 2 * MIB - PAGE), Ok(0));
    // Backed but not plugged, and past the backed size: poisoned.
    for offset in [2 * MIB, 3 * MIB + 5 * PAGE, 6 * MIB] {
        let (code, addr) = touch(&mem, offset).expect_err("not plugged");
        assert!(is_poison_sigbus(code), "si_code {code}");
        assert_eq!(addr, mem.regions()[1].host_addr() + offset);
    }
    assert_eq!(mem.stats().unreachable, 3);
    assert_eq!(mem.poisoned_pages(), 3);
    assert!(
        window.allocated_bytes() <= 2 * MIB,
        "{} bytes allocated for one plugged block",
        window.allocated_bytes()
    );
    // Not a failure of the memory: nothing is reported as unservable.
    assert_eq!(mem.fault_failure().unwrap().poisoned_count(), 0);
    // Plugging drops the markers of what it plugs, and only those.
    window.set_plugged(2 * MIB, 2 * MIB, true).unwrap();
    assert_eq!(mem.poisoned_pages(), 1);
    assert_eq!(touch(&mem, 2 * MIB), Ok(0));
    assert_eq!(touch(&mem, 3 * MIB + 5 * PAGE), Ok(0));
    assert!(touch(&mem, 6 * MIB).is_err());
    window.set_backed_size(8 * MIB).unwrap();
    window.set_plugged(4 * MIB, 4 * MIB, true).unwrap();
    assert_eq!(mem.poisoned_pages(), 0);
    assert_eq!(touch(&mem, 6 * MIB), Ok(0));
}

#[test]
fn unplugging_a_spanning_window_punches_without_truncating() {
    let (mem, window) = spanning_window();
    let dev = mem.device_memory();
    let at = GuestAddress(common::WINDOW_BASE + MIB);
    dev.memory().write_obj(0x5au8, at).unwrap();
    assert!(window.allocated_bytes() > 0);
    window.set_plugged(0, 2 * MIB, false).unwrap();
    window.set_backed_size(0).unwrap();
    assert_eq!(window.backed_size(), 0);
    assert_eq!(mem.regions()[1].backing().size(), 8 * MIB);
    assert_eq!(window.allocated_bytes(), 0);
    assert!(dev.memory().read_obj::<u8>(at).is_err(), "out of reach");
    window.set_backed_size(2 * MIB).unwrap();
    window.set_plugged(0, 2 * MIB, true).unwrap();
    assert_eq!(
        dev.memory().read_obj::<u8>(at).unwrap(),
        0,
        "reads zero again"
    );
    assert!(window.set_backed_size(9 * MIB).is_err());
    assert!(window.set_backed_size(MIB + 1).is_err());
}
