//! The process-wide `SIGBUS` handler: a poisoned guest page becomes a
//! machine check for the guest when a vCPU touches it, and a clear message
//! and exit status (never a silent crash) when any other thread does.
//!
//! The fault handler poisons a guest page it cannot serve
//! ([`guest_mem::Unservable::Poison`]). KVM answers a vCPU's touch of it
//! with `SIGBUS` (`BUS_MCEERR_AR`, `si_addr` = host address) on the vCPU
//! thread. The handler records the address in that vCPU's slot and
//! returns; `KVM_RUN` returns `EINTR`, and the vCPU loop takes the slot
//! ([`take`]) and injects a machine check ([`crate::mce`]).
//!
//! Any other `SIGBUS` — a VMM thread that touched a poisoned page despite
//! the device-memory checks (a race with the poisoning), or an address
//! outside guest RAM — writes one line naming the thread, the address and
//! the guest page, and ends the process with [`SIGBUS_EXIT_CODE`].
//!
//! Everything the handler reads is in fixed static tables of atomics,
//! filled before the vCPUs run (each VM of the process adds its own RAM and
//! vCPU threads); it calls only `gettid`, `write` and
//! `_exit`, which are async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Once;

/// The exit status of a process one of whose threads other than a vCPU
/// got `SIGBUS` (128 + SIGBUS).
pub const SIGBUS_EXIT_CODE: i32 = 128 + libc::SIGBUS;

/// vCPU threads the handler knows (of every VM in the process).
const SLOTS: usize = 1024;
/// Guest RAM ranges the handler knows (of every VM in the process).
const RANGES: usize = 256;

struct Slot {
    /// The vCPU thread's id (0: free).
    tid: AtomicI32,
    /// The host address of the last machine check error (0: none).
    addr: AtomicU64,
    /// Its `si_code`.
    code: AtomicI32,
}

struct Range {
    /// [`FREE`], [`CLAIMED`] (being written) or [`LIVE`].
    state: AtomicU8,
    host: AtomicU64,
    len: AtomicU64,
    guest: AtomicU64,
}

static VCPUS: [Slot; SLOTS] = [const {
    Slot {
        tid: AtomicI32::new(0),
        addr: AtomicU64::new(0),
        code: AtomicI32::new(0),
    }
}; SLOTS];
static RAM: [Range; RANGES] = [const {
    Range {
        state: AtomicU8::new(FREE),
        host: AtomicU64::new(0),
        len: AtomicU64::new(0),
        guest: AtomicU64::new(0),
    }
}; RANGES];
static INSTALLED: AtomicBool = AtomicBool::new(false);

const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const LIVE: u8 = 2;

/// A machine check error a vCPU thread received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryError {
    /// The host address (`si_addr`).
    pub host_addr: u64,
    /// `BUS_MCEERR_AR` (action required: the vCPU consumed the data) or
    /// `BUS_MCEERR_AO`.
    pub code: i32,
}

/// Installs the handler (once per process). Call it before any vCPU runs.
pub fn install() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid value. The
        // handler only touches atomics and makes async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                result = Err(std::io::Error::last_os_error());
                return;
            }
        }
        INSTALLED.store(true, Ordering::Release);
    });
    result
}

/// Whether [`install`] succeeded in this process.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// Tells the handler where a VM's guest RAM is: `(host address, length,
/// guest address)` per region, until the registration is dropped. Ranges
/// that do not fit in the table are left out (a touch there is then
/// treated as outside guest RAM).
pub fn add_guest_ram(ranges: impl IntoIterator<Item = (u64, u64, u64)>) -> RamRegistration {
    let mut held = Vec::new();
    for (host, len, guest) in ranges {
        let Some(i) = RAM.iter().position(|r| {
            r.state
                .compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        }) else {
            log::error!("too many guest RAM ranges for the SIGBUS handler; {host:#x} left out");
            continue;
        };
        RAM[i].host.store(host, Ordering::Relaxed);
        RAM[i].len.store(len, Ordering::Relaxed);
        RAM[i].guest.store(guest, Ordering::Relaxed);
        RAM[i].state.store(LIVE, Ordering::Release);
        held.push(i);
    }
    RamRegistration(held)
}

/// Guest RAM the handler knows of; forgotten when dropped.
#[derive(Debug)]
pub struct RamRegistration(Vec<usize>);

impl Drop for RamRegistration {
    fn drop(&mut self) {
        for &i in &self.0 {
            RAM[i].state.store(FREE, Ordering::Release);
        }
    }
}

/// The guest-physical address of a host address inside guest RAM (of any
/// VM registered with [`add_guest_ram`]).
pub fn guest_address(host: u64) -> Option<u64> {
    guest_of(host)
}

fn guest_of(host: u64) -> Option<u64> {
    RAM.iter().find_map(|r| {
        if r.state.load(Ordering::Acquire) != LIVE {
            return None;
        }
        let start = r.host.load(Ordering::Relaxed);
        let len = r.len.load(Ordering::Relaxed);
        (host >= start && host - start < len)
            .then(|| r.guest.load(Ordering::Relaxed) + (host - start))
    })
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Marks the calling thread as a vCPU thread until the guard is dropped.
pub fn register_vcpu() -> VcpuRegistration {
    let tid = gettid();
    let slot = VCPUS.iter().position(|s| {
        s.tid
            .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    });
    match slot {
        Some(i) => VCPUS[i].addr.store(0, Ordering::Release),
        None => log::error!("too many vCPU threads for the SIGBUS handler"),
    }
    VcpuRegistration(slot)
}

/// Keeps a thread registered as a vCPU; unregisters it when dropped.
#[derive(Debug)]
pub struct VcpuRegistration(Option<usize>);

impl Drop for VcpuRegistration {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            VCPUS[i].tid.store(0, Ordering::Release);
        }
    }
}

/// The machine check error the calling vCPU thread received since the
/// last call, if any.
pub fn take() -> Option<MemoryError> {
    let tid = gettid();
    let slot = VCPUS
        .iter()
        .find(|s| s.tid.load(Ordering::Acquire) == tid)?;
    let host_addr = slot.addr.swap(0, Ordering::AcqRel);
    (host_addr != 0).then(|| MemoryError {
        host_addr,
        code: slot.code.load(Ordering::Acquire),
    })
}

/// A fixed buffer formatted without allocating (async-signal-safe).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn str(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    fn hex(&mut self, v: u64) -> &mut Self {
        self.str("0x");
        let digits = if v == 0 {
            1
        } else {
            (64 - v.leading_zeros()).div_ceil(4)
        };
        for i in (0..digits).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            let c = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            self.str(std::str::from_utf8(&[c]).unwrap_or("?"));
        }
        self
    }

    fn dec(&mut self, v: i64) -> &mut Self {
        if v < 0 {
            self.str("-");
        }
        let mut digits = [0u8; 20];
        let mut n = v.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.str(std::str::from_utf8(&digits[i..]).unwrap_or("?"))
    }
}

/// The line a fatal `SIGBUS` prints.
fn fatal_message(tid: i32, code: i32, addr: u64, vcpu: bool) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.str("vmm: SIGBUS (si_code ").dec(code.into());
    l.str(") at host address ").hex(addr);
    match guest_of(addr) {
        Some(gpa) => {
            l.str(", guest page ").hex(gpa & !0xfff);
            l.str(" (a page that could not be served)");
        }
        None => {
            l.str(", outside guest RAM");
        }
    }
    l.str(", on ");
    if vcpu {
        l.str("a vCPU thread");
    } else {
        l.str("VMM thread ").dec(tid.into()).str(", not a vCPU");
    }
    l.str("; exiting\n");
    l
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo; for
    // SIGBUS si_addr is the faulting address.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    let tid = gettid();
    let slot = VCPUS
        .iter()
        .find(|s| s.tid.load(Ordering::Acquire) == tid && tid != 0);
    let memory_error = code == libc::BUS_MCEERR_AR || code == libc::BUS_MCEERR_AO;
    if let Some(slot) = slot {
        if memory_error && guest_of(addr).is_some() {
            slot.code.store(code, Ordering::Release);
            slot.addr.store(addr, Ordering::Release);
            return;
        }
    }
    let line = fatal_message(tid, code, addr, slot.is_some());
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(SIGBUS_EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fatal_line_names_the_thread_the_address_and_the_guest_page() {
        let _ram = add_guest_ram([(0x7f00_0000_0000, 0x10_0000, 0x4000_0000)]);
        let l = fatal_message(1234, libc::BUS_MCEERR_AR, 0x7f00_0000_5010, false);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert_eq!(
            s,
            "vmm: SIGBUS (si_code 4) at host address 0x7f0000005010, guest page 0x40005000 \
             (a page that could not be served), on VMM thread 1234, not a vCPU; exiting\n"
        );
        let l = fatal_message(7, 2, 0x10, true);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(
            s.contains("0x10, outside guest RAM, on a vCPU thread"),
            "{s}"
        );
    }
}
