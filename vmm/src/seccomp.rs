//! seccomp-bpf filters, one per kind of VMM thread, installed before the
//! guest runs: a guest that takes over a thread (a device bug, a KVM exit
//! handler bug) can only make the system calls that thread needs.
//!
//! The rules are built with seccompiler's Rust API rather than JSON: they
//! refer to the real constants (`libc::SYS_*`, the KVM and userfaultfd ioctl
//! numbers) checked by the compiler, need no build script, and the tests
//! build the same rules with another mismatch action.
//!
//! A call outside a filter traps: the SIGSYS handler prints the thread, its
//! kind and the system call number, and the process exits with status 159
//! (128 + SIGSYS), as clear an error as the kernel lets a filter give.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status of a process one of whose threads made a refused call.
pub const SECCOMP_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// The kinds of VMM thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// `vcpuN`: KVM_RUN and the exits it handles (port and MMIO devices,
    /// queue notifications trapped rather than signalled).
    Vcpu,
    /// `uffd-N`: reads the userfaultfd, fetches pages, installs them.
    FaultHandler,
    /// `vmm-events`: virtio queue processing (discards, resizes), the stop
    /// signals, and tearing the VM down.
    EventLoop,
    /// `api`: the control socket, and the balloon and virtio-mem requests
    /// it carries out.
    Api,
    /// `snapshot`: writes snapshot directories (state and memory files).
    Snapshot,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::FaultHandler => "fault handler",
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Api => "api",
            ThreadKind::Snapshot => "snapshot",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
#[error("seccomp filter for the {kind} thread: {source}")]
pub struct SeccompError {
    kind: &'static str,
    source: seccompiler::Error,
}

/// The KVM vCPU ioctls a running vCPU makes.
mod kvm_nr {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
    // virtio-mem plugs and unplugs move the window's memory slots.
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_bindings::kvm_userspace_memory_region
    );
    // A parked vCPU saves its state for a snapshot, on its own thread.
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    // The event loop saves the in-kernel devices' state.
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

    /// What saving a vCPU's state asks of KVM.
    pub fn vcpu_save() -> Vec<u64> {
        vec![
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_TSC_KHZ(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
        ]
    }

    /// What saving the VM's in-kernel devices asks of KVM.
    pub fn vm_save() -> Vec<u64> {
        vec![KVM_GET_IRQCHIP(), KVM_GET_CLOCK(), KVM_GET_PIT2()]
    }
}
use kvm_nr::{KVM_RUN, KVM_SET_USER_MEMORY_REGION};

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("argument index below 6")
}

/// One rule per value: argument `arg` equals one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|v| SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, *v)]).expect("one condition"))
        .collect()
}

fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for nr in calls {
        rules.insert(*nr, Vec::new());
    }
}

/// What every thread needs to live and die: locks, the allocator, logging
/// to stderr, sleeping, signal return (the vCPU kick), Rust's and glibc's
/// thread exit (alternate stack, stack unmapping).
fn base_rules() -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_futex,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_getrandom,
            libc::SYS_gettid,
            libc::SYS_getpid,
        ],
    );
    // The allocator maps and protects memory, never executable.
    let no_exec = || {
        vec![SeccompRule::new(vec![cond(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )])
        .expect("one condition")]
    };
    r.insert(libc::SYS_mmap, no_exec());
    r.insert(libc::SYS_mprotect, no_exec());
    r
}

/// Device work: a balloon discard, a free page report or a virtio-mem
/// (un)plug, run from a queue notification on the event loop, or on a vCPU
/// when the notify write traps instead of reaching the ioeventfd.
fn device_rules(r: &mut Rules) {
    allow(
        r,
        &[
            // A hugetlbfs resize reads the free page count; the deny layer
            // turns it into EACCES (see `deny_rules`).
            libc::SYS_openat,
            libc::SYS_read,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_fstatfs,
            libc::SYS_epoll_ctl,
        ],
    );
    fstatat(r);
}

/// glibc's `fstat` is `newfstatat(fd, "", buf, AT_EMPTY_PATH)`: allowed
/// with that flag only, which names the descriptor and looks up no path.
fn fstatat(r: &mut Rules) {
    let empty = libc::AT_EMPTY_PATH as u64;
    r.insert(
        libc::SYS_newfstatat,
        vec![
            SeccompRule::new(vec![cond(3, SeccompCmpOp::MaskedEq(empty), empty)])
                .expect("one condition"),
        ],
    );
}

/// The userfaultfd ioctls a discard of private memory makes: zero pages
/// over what it dropped, and a wake.
const UFFD_DISCARD: [u32; 2] = [
    userfaultfd_sys::UFFDIO_ZEROPAGE,
    userfaultfd_sys::UFFDIO_WAKE,
];

/// `UFFDIO_POISON` (Linux 6.6; not in `userfaultfd-sys` 0.6):
/// `_IOWR(0xAA, 0x08, struct uffdio_poison)`.
const UFFDIO_POISON: u64 = 0xc020_aa08;

fn ioctls(r: &mut Rules, requests: &[u64]) {
    // Logging may ask whether stderr is a terminal.
    let mut all = vec![libc::TCGETS];
    all.extend_from_slice(requests);
    r.insert(libc::SYS_ioctl, one_of(1, &all));
}

fn rules(kind: ThreadKind) -> Rules {
    let mut r = base_rules();
    let uffd_discard = UFFD_DISCARD.map(u64::from);
    match kind {
        ThreadKind::Vcpu => {
            device_rules(&mut r);
            let mut req = vec![KVM_RUN(), KVM_SET_USER_MEMORY_REGION()];
            // A poisoned guest page becomes a machine check.
            req.push(crate::mce::set_mce_request());
            req.extend(kvm_nr::vcpu_save());
            req.extend_from_slice(&uffd_discard);
            ioctls(&mut r, &req);
        }
        ThreadKind::FaultHandler => {
            allow(
                &mut r,
                &[
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_read,
                    // Pages from a file source; SEEK_DATA to skip holes.
                    libc::SYS_pread64,
                    libc::SYS_preadv,
                    libc::SYS_lseek,
                    libc::SYS_fstat,
                ],
            );
            fstatat(&mut r);
            ioctls(
                &mut r,
                &[
                    u64::from(userfaultfd_sys::UFFDIO_COPY),
                    u64::from(userfaultfd_sys::UFFDIO_ZEROPAGE),
                    u64::from(userfaultfd_sys::UFFDIO_CONTINUE),
                    u64::from(userfaultfd_sys::UFFDIO_WAKE),
                    // A page that cannot be served is poisoned.
                    UFFDIO_POISON,
                ],
            );
        }
        ThreadKind::EventLoop => {
            device_rules(&mut r);
            allow(
                &mut r,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_timerfd_settime,
                    libc::SYS_timerfd_gettime,
                    // Kicking vCPUs out of KVM_RUN.
                    libc::SYS_tgkill,
                ],
            );
            // Dropping the last reference to guest memory unregisters it;
            // virtio-mem moves the window's memory slots.
            let mut req = uffd_discard.to_vec();
            req.push(u64::from(userfaultfd_sys::UFFDIO_UNREGISTER));
            req.push(KVM_SET_USER_MEMORY_REGION());
            req.extend(kvm_nr::vm_save());
            ioctls(&mut r, &req);
        }
        ThreadKind::Api => {
            device_rules(&mut r);
            allow(
                &mut r,
                &[
                    libc::SYS_accept4,
                    libc::SYS_accept,
                    libc::SYS_recvfrom,
                    libc::SYS_recvmsg,
                    libc::SYS_sendto,
                    libc::SYS_sendmsg,
                    libc::SYS_shutdown,
                    libc::SYS_fcntl,
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_timerfd_settime,
                    libc::SYS_timerfd_gettime,
                    // Removing the socket when the server stops.
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                ],
            );
            let mut req = uffd_discard.to_vec();
            // Non-blocking connections (std sets it with FIONBIO).
            req.push(libc::FIONBIO);
            // The server may hold the last reference to guest memory.
            req.push(u64::from(userfaultfd_sys::UFFDIO_UNREGISTER));
            ioctls(&mut r, &req);
        }
        ThreadKind::Snapshot => {
            // A new directory written under a temporary name, synced and
            // renamed; the memory file copied extent by extent from the
            // backing files (SEEK_DATA/SEEK_HOLE).
            allow(
                &mut r,
                &[
                    libc::SYS_openat,
                    libc::SYS_read,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_lseek,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_mkdir,
                    libc::SYS_mkdirat,
                    libc::SYS_rename,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    libc::SYS_rmdir,
                    libc::SYS_getdents64,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_ftruncate,
                    libc::SYS_fcntl,
                ],
            );
            // It may hold the last reference to guest memory.
            ioctls(&mut r, &[u64::from(userfaultfd_sys::UFFDIO_UNREGISTER)]);
        }
    }
    r
}

/// A layer under the main filter that makes `openat` fail with EACCES:
/// after start-up no file is opened, but a hugetlbfs resize looks at the
/// free huge page count in sysfs and copes without it. Filters stack and
/// the strictest verdict wins, so the main filter lets `openat` through to
/// this one.
fn deny_rules(kind: ThreadKind) -> Option<Rules> {
    match kind {
        ThreadKind::Vcpu | ThreadKind::EventLoop | ThreadKind::Api => {
            let mut r = Rules::new();
            allow(&mut r, &[libc::SYS_openat]);
            Some(r)
        }
        ThreadKind::FaultHandler | ThreadKind::Snapshot => None,
    }
}

fn arch() -> TargetArch {
    TargetArch::x86_64
}

/// The filters for `kind`, in installation order, with `mismatch` for the
/// system calls outside it (production: [`SeccompAction::Trap`]).
pub fn filters(kind: ThreadKind, mismatch: SeccompAction) -> Result<Vec<BpfProgram>, SeccompError> {
    let err = |e| SeccompError {
        kind: kind.name(),
        source: seccompiler::Error::Backend(e),
    };
    let mut out = Vec::new();
    if let Some(deny) = deny_rules(kind) {
        let f = SeccompFilter::new(
            deny,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch(),
        )
        .map_err(err)?;
        out.push(f.try_into().map_err(err)?);
    }
    let main =
        SeccompFilter::new(rules(kind), mismatch, SeccompAction::Allow, arch()).map_err(err)?;
    out.push(main.try_into().map_err(err)?);
    Ok(out)
}

/// Installs `programs` on the calling thread (seccompiler sets
/// `no_new_privs` first, which an unprivileged process needs).
pub fn apply(kind: ThreadKind, programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(|source| SeccompError {
            kind: kind.name(),
            source,
        })?;
    }
    Ok(())
}

/// Installs the production filter for `kind` on the calling thread: from
/// then on, a call outside it ends the process with a message naming the
/// thread and the call. Permanent for this thread (and threads it spawns).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    install_sigsys_handler();
    remember_thread(kind);
    apply(kind, &filters(kind, SeccompAction::Trap)?)
}

/// The hook that installs the fault handler filter on guest-mem's `uffd-N`
/// threads (for [`guest_mem::FaultConfig::on_thread_start`]).
pub fn fault_thread_hook() -> guest_mem::ThreadStartHook {
    guest_mem::ThreadStartHook::new(|| install(ThreadKind::FaultHandler).map_err(|e| e.to_string()))
}

thread_local! {
    // Read by the SIGSYS handler: const-initialised, no destructor, so
    // reading them there allocates nothing and takes no lock.
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

fn remember_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(name.len());
        name[..len].copy_from_slice(&n[..len]);
    }
    THREAD_NAME.with(|c| c.set(name));
    THREAD_KIND.with(|c| c.set(kind.name()));
}

fn install_sigsys_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys) {
            log::error!("registering the SIGSYS handler: {e}; refused calls kill silently");
        }
    });
}

/// A fixed buffer for the message: no allocation in a signal handler.
struct Msg {
    buf: [u8; 160],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64: three ints,
/// padding to 8, then `_sigsys { void *_call_addr; int _syscall; ... }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSYS handler a valid siginfo_t, whose
    // union holds the _sigsys member; the int at this offset is in bounds
    // of the 128-byte structure and aligned.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    // Only what every filter allows from here: write and exit_group.
    let mut m = Msg {
        buf: [0; 160],
        len: 0,
    };
    m.push(b"vmm: seccomp: thread '");
    let name = THREAD_NAME.with(Cell::get);
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    m.push(&name[..end]);
    m.push(b"' (");
    m.push(THREAD_KIND.with(Cell::get).as_bytes());
    m.push(b" filter) made system call ");
    m.number(nr as u32);
    m.push(b", which it does not allow; stopping\n");
    // SAFETY: writes m.len initialised bytes of m.buf to stderr, then ends
    // the process without running anything else (async-signal-safe).
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::_exit(SECCOMP_EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    const EPERM: SeccompAction = SeccompAction::Errno(libc::EPERM as u32);

    fn errno<T: Into<i64>>(rc: T) -> i32 {
        if rc.into() >= 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }
    }

    /// Runs `f` on a new thread under `kind`'s rules, with EPERM for what
    /// they do not allow; the thread then has to exit and be joined under
    /// the filter too.
    fn under_filter<R: Send + 'static>(
        kind: ThreadKind,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> R {
        std::thread::Builder::new()
            .name(format!("test-{}", kind.name()))
            .spawn(move || {
                apply(kind, &filters(kind, EPERM).unwrap()).unwrap();
                f()
            })
            .unwrap()
            .join()
            .unwrap()
    }

    fn socket() -> i32 {
        // SAFETY: creates a descriptor or fails; no memory is passed.
        errno(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) })
    }

    fn ioctl(fd: i32, request: u64) -> i32 {
        // SAFETY: every request tried here is refused by the filter or
        // fails on `fd` (not a KVM or userfaultfd descriptor) before the
        // kernel reads the null argument.
        errno(unsafe { libc::ioctl(fd, request as libc::c_ulong, std::ptr::null_mut::<u8>()) })
    }

    fn eventfd_write(fd: i32) -> i32 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd.
        errno(unsafe { libc::write(fd, one.as_ptr().cast(), 8) } as i64)
    }

    fn open_etc_hostname() -> i32 {
        // SAFETY: a NUL-terminated path; the descriptor, if any, is closed.
        let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
        let e = errno(fd);
        if fd >= 0 {
            // SAFETY: fd was just opened here.
            unsafe { libc::close(fd) };
        }
        e
    }

    fn punch_hole(fd: i32) -> i32 {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on an open descriptor; no memory is passed.
        errno(unsafe { libc::fallocate(fd, mode, 0, 4096) })
    }

    /// fstat of `fd`, and a stat by path (not an fd's).
    fn stat(fd: i32) -> (i32, i32) {
        // SAFETY: stat is plain data; zeroed is a valid value for it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: an open descriptor and a stat we own.
        let by_fd = errno(unsafe { libc::fstat(fd, &mut st) });
        // SAFETY: a NUL-terminated path and a stat we own.
        let by_path = errno(unsafe { libc::stat(c"/etc/hostname".as_ptr(), &mut st) });
        (by_fd, by_path)
    }

    fn memfd() -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        f
    }

    #[test]
    fn vcpu_threads_run_kvm_and_nothing_else() {
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let fd = evt.as_raw_fd();
        let (sock, run, create_vm, write, alloc) = under_filter(ThreadKind::Vcpu, move || {
            let v = vec![7u8; 8 << 20]; // mmap'd by the allocator
            (
                socket(),
                ioctl(fd, KVM_RUN()),
                ioctl(fd, 0xAE01), // KVM_CREATE_VM
                eventfd_write(fd),
                v.iter().map(|b| u64::from(*b)).sum::<u64>(),
            )
        });
        assert_eq!(sock, libc::EPERM, "socket()");
        // KVM_RUN passes the filter and fails on a non-vCPU fd.
        assert_eq!(run, libc::ENOTTY, "KVM_RUN");
        assert_eq!(create_vm, libc::EPERM, "another KVM ioctl");
        assert_eq!(write, 0, "writing an eventfd");
        assert_eq!(alloc, 7 * (8 << 20));
    }

    #[test]
    fn fault_handler_threads_install_pages_and_nothing_else() {
        let file = memfd();
        let fd = file.as_raw_fd();
        let (sock, copy, run, punch, exec) = under_filter(ThreadKind::FaultHandler, move || {
            // SAFETY: null-terminated argv and envp; refused before the
            // kernel reads them.
            let exec = errno(unsafe {
                libc::execve(
                    c"/bin/true".as_ptr(),
                    [std::ptr::null()].as_ptr(),
                    [std::ptr::null()].as_ptr(),
                )
            });
            (
                socket(),
                ioctl(fd, u64::from(userfaultfd_sys::UFFDIO_COPY)),
                ioctl(fd, KVM_RUN()),
                punch_hole(fd),
                exec,
            )
        });
        assert_eq!(sock, libc::EPERM, "socket()");
        assert_eq!(copy, libc::ENOTTY, "UFFDIO_COPY passes, on a non-uffd fd");
        assert_eq!(run, libc::EPERM, "KVM_RUN");
        assert_eq!(punch, libc::EPERM, "fallocate is not a fault handler's");
        assert_eq!(exec, libc::EPERM, "execve");
    }

    #[test]
    fn the_event_loop_discards_and_opens_nothing() {
        let file = memfd();
        let fd = file.as_raw_fd();
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let efd = evt.as_raw_fd();
        let (sock, punch, open, write, run, stat) =
            under_filter(ThreadKind::EventLoop, move || {
                (
                    socket(),
                    punch_hole(fd),
                    open_etc_hostname(),
                    eventfd_write(efd),
                    ioctl(efd, KVM_RUN()),
                    stat(fd),
                )
            });
        assert_eq!(sock, libc::EPERM, "socket()");
        assert_eq!(punch, 0, "punching a hole");
        assert_eq!(stat, (0, libc::EPERM), "fstat, and stat of a path");
        assert_eq!(open, libc::EACCES, "open: the deny layer");
        assert_eq!(write, 0, "writing an eventfd");
        assert_eq!(run, libc::EPERM, "KVM_RUN is a vCPU's");
        drop(file);
    }

    #[test]
    fn the_api_thread_serves_its_socket_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (sock, got, open, run) = under_filter(ThreadKind::Api, move || {
            let got = listener.accept().map(|(s, _)| {
                s.set_nonblocking(true).unwrap();
                let mut s = s;
                std::io::Write::write_all(&mut s, b"ok").is_ok()
            });
            (
                socket(),
                got.map_err(|e| e.to_string()),
                open_etc_hostname(),
                ioctl(listener.as_raw_fd(), KVM_RUN()),
            )
        });
        assert_eq!(sock, libc::EPERM, "socket()");
        assert_eq!(got, Ok(true), "accept, FIONBIO, write");
        assert_eq!(open, libc::EACCES, "open: the deny layer");
        assert_eq!(run, libc::EPERM, "KVM_RUN is a vCPU's");
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut &client, &mut buf).unwrap();
        assert_eq!(&buf, b"ok");
    }

    /// The production action: a refused call ends the process with the
    /// thread and the call named. Run in a child copy of this test binary.
    #[test]
    fn a_refused_call_stops_the_process_with_a_message() {
        const CHILD: &str = "VMM_SECCOMP_TRAP_CHILD";
        if std::env::var_os(CHILD).is_some() {
            std::thread::Builder::new()
                .name("vcpu7".into())
                .spawn(|| {
                    install(ThreadKind::Vcpu).unwrap();
                    socket();
                })
                .unwrap()
                .join()
                .unwrap();
            unreachable!("socket() was allowed");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::a_refused_call_stops_the_process_with_a_message",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(SECCOMP_EXIT_CODE), "{stderr}");
        let want = format!(
            "thread 'vcpu7' (vcpu filter) made system call {}",
            libc::SYS_socket
        );
        assert!(stderr.contains(&want), "{stderr}");
    }

    /// What a filter adds to each system call: `cargo test --release -p vmm
    /// --lib seccomp::tests::filter_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn filter_cost() {
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fd = evt.as_raw_fd();
        let time = move |filtered: bool| {
            std::thread::spawn(move || {
                if filtered {
                    apply(ThreadKind::Vcpu, &filters(ThreadKind::Vcpu, EPERM).unwrap()).unwrap();
                }
                const N: u32 = 1_000_000;
                let start = std::time::Instant::now();
                for _ in 0..N {
                    // Both walk the filter to the ioctl request rules.
                    ioctl(fd, libc::TCGETS);
                    ioctl(fd, KVM_RUN());
                }
                start.elapsed().as_nanos() as f64 / f64::from(2 * N)
            })
            .join()
            .unwrap()
        };
        let (off, on) = (time(false), time(true));
        eprintln!("ioctl: {off:.0} ns unfiltered, {on:.0} ns under the vCPU filter");
    }
}
