//! Faults that cannot be served get a bounded number of attempts and, under
//! the `Report` policy, a reported failure, never a silent wake-and-refault loop; a handler thread
//! that stops is reported too.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{
    FaultConfig, GuestMem, PageSource, Readahead, RegionConfig, RegionSource, Unservable,
};

const PAGE: u64 = 4096;

/// Fails its first `failures` fetches with EIO, then reads 0xab.
#[derive(Debug)]
struct Flaky {
    failures: u64,
    fetches: AtomicU64,
}

impl PageSource for Flaky {
    fn size(&self) -> Option<u64> {
        None
    }
    fn is_zero(&self, _: u64, _: u64) -> bool {
        false
    }
    fn fetch(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.fetches.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf.fill(0xab);
        Ok(())
    }
}

fn memory(source: Arc<Flaky>, fault: FaultConfig) -> Arc<GuestMem> {
    let mut rc = RegionConfig::new(0, 64 * PAGE);
    rc.source = Some(RegionSource { source, offset: 0 });
    Arc::new(
        GuestMem::builder()
            .region(rc)
            .fault_config(FaultConfig {
                readahead: Readahead::NONE,
                ..fault
            })
            .build()
            .unwrap(),
    )
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

#[test]
fn a_source_that_keeps_failing_is_reported_with_the_page_not_looped_on() {
    let src = Arc::new(Flaky {
        failures: u64::MAX,
        fetches: AtomicU64::new(0),
    });
    // Reported, not poisoned (see tests/poison.rs for the default).
    let mem = memory(
        src.clone(),
        FaultConfig {
            on_unservable: Unservable::Report,
            ..FaultConfig::default()
        },
    );
    let failure = mem.fault_failure().expect("userfaultfd in use").clone();
    // The toucher stays on a failing page until the memory goes.
    let snapshot = mem.memory().memory();
    let toucher = std::thread::spawn(move || snapshot.read_obj::<u8>(GuestAddress(5 * PAGE)));
    let start = Instant::now();
    assert!(
        wait_readable(failure.event_fd(), Duration::from_secs(5)),
        "no failure reported"
    );
    let msg = failure.message().unwrap();
    assert!(msg.contains("offset 0x5000"), "{msg}");
    assert!(msg.contains("Input/output error"), "{msg}");
    assert!(
        start.elapsed() >= Duration::from_millis(15),
        "retried with pauses"
    );
    // A second of it costs about ten attempts, not a CPU spinning.
    let before = src.fetches.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    let per_second = src.fetches.load(Ordering::SeqCst) - before;
    assert!(per_second < 40, "{per_second} fetches in a second");
    assert!(mem.stats().fetch_errors >= 5);
    // Dropping the memory unregisters it: the toucher reads the file (zero)
    // and ends.
    drop(mem);
    assert_eq!(toucher.join().unwrap().unwrap(), 0);
}

#[test]
fn a_failure_that_clears_within_the_attempts_is_served() {
    let src = Arc::new(Flaky {
        failures: 2,
        fetches: AtomicU64::new(0),
    });
    let mem = memory(src, FaultConfig::default());
    let v: u8 = mem
        .memory()
        .memory()
        .read_obj(GuestAddress(3 * PAGE))
        .unwrap();
    assert_eq!(v, 0xab);
    let failure = mem.fault_failure().unwrap();
    assert_eq!(failure.count(), 0);
    assert!(!wait_readable(failure.event_fd(), Duration::ZERO));
    assert_eq!(mem.stats().fetch_errors, 2);
}

#[test]
fn a_handler_thread_that_stops_is_reported() {
    let src = Arc::new(Flaky {
        failures: 0,
        fetches: AtomicU64::new(0),
    });
    let mem = memory(
        src,
        FaultConfig {
            stop_after_faults: Some(1),
            ..FaultConfig::default()
        },
    );
    let v: u8 = mem.memory().memory().read_obj(GuestAddress(0)).unwrap();
    assert_eq!(v, 0xab);
    let failure = mem.fault_failure().unwrap();
    assert!(wait_readable(failure.event_fd(), Duration::from_secs(5)));
    let msg = failure.message().unwrap();
    assert!(msg.contains("uffd-0 stopped"), "{msg}");
    // A handler dropped on purpose reports nothing.
    let quiet = memory(
        Arc::new(Flaky {
            failures: 0,
            fetches: AtomicU64::new(0),
        }),
        FaultConfig::default(),
    );
    let f = quiet.fault_failure().unwrap().clone();
    drop(quiet);
    assert_eq!(f.count(), 0);
}

/// The start hook runs once on every handler thread, on that thread; one
/// that fails stops its thread, and the failure says why.
#[test]
fn the_thread_start_hook_runs_on_each_handler_thread_and_its_failure_is_reported() {
    let names = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hook = {
        let names = names.clone();
        guest_mem::ThreadStartHook::new(move || {
            let name = std::thread::current().name().map(str::to_owned);
            names.lock().unwrap().push(name);
            Ok(())
        })
    };
    let src = || {
        Arc::new(Flaky {
            failures: 0,
            fetches: AtomicU64::new(0),
        })
    };
    let mem = memory(
        src(),
        FaultConfig {
            threads: 2,
            on_thread_start: Some(hook),
            ..FaultConfig::default()
        },
    );
    assert_eq!(
        mem.memory()
            .memory()
            .read_obj::<u8>(GuestAddress(0))
            .unwrap(),
        0xab
    );
    drop(mem);
    let mut seen = names.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, [Some("uffd-0".into()), Some("uffd-1".into())]);

    let failing = guest_mem::ThreadStartHook::new(|| Err("no filter for you".into()));
    let mem = memory(
        src(),
        FaultConfig {
            on_thread_start: Some(failing),
            ..FaultConfig::default()
        },
    );
    let failure = mem.fault_failure().expect("userfaultfd in use").clone();
    assert!(wait_readable(failure.event_fd(), Duration::from_secs(5)));
    let msg = failure.message().unwrap();
    assert!(
        msg.contains("start hook failed: no filter for you"),
        "{msg}"
    );
}
