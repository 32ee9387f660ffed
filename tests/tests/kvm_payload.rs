//! CPL3 payload guests on this machine's /dev/kvm: several vCPUs write and
//! verify patterns across guest RAM whose every page is served by the
//! guest-mem fault handler.

use std::time::Duration;

use guest_mem::{FaultConfig, Readahead, Unservable};
use integration_tests::failing_source::failing_memory;
use integration_tests::payload::{pattern, pattern_payload};
use integration_tests::{kvm_available, payload_vm_config};
use vmm::vcpu::PayloadArgs;
use vmm::{ExitReason, Vm, VmConfig};

const LOAD: u64 = 0x10_0000;
const SLICES_START: u64 = 8 << 20;

fn vm(memory: u64, vcpus: u8, readahead: Readahead) -> Vm {
    Vm::new(VmConfig {
        fault: FaultConfig {
            readahead,
            ..FaultConfig::default()
        },
        ..payload_vm_config(memory, vcpus)
    })
    .expect("creating the VM")
}

/// Loads `code` to run at CPL3 from `LOAD` on every vCPU.
fn load_code(vm: &mut Vm, code: &[u8]) {
    vm.load_payload(code, LOAD, true, |_| PayloadArgs {
        entry: LOAD,
        stack: LOAD,
        args: [0; 6],
    })
    .unwrap();
}

/// A 16 MiB, one-vCPU VM that runs `code` at CPL3 from `LOAD`.
fn code_vm(code: &[u8]) -> Vm {
    let mut vm = vm(16 << 20, 1, Readahead::NONE);
    load_code(&mut vm, code);
    vm
}

/// Where a [`spin_code`] payload looks for its release.
const FLAG: u32 = 0x20_0000;

/// A payload that spins until the word at [`FLAG`] is not zero, then
/// reports success: `spin: mov eax, [FLAG]; test eax, eax; jz spin;
/// xor eax, eax; out 0xe0, eax; hlt`.
fn spin_code() -> Vec<u8> {
    let mut code = vec![0x8b, 0x04, 0x25];
    code.extend_from_slice(&FLAG.to_le_bytes());
    code.extend_from_slice(&[0x85, 0xc0, 0x74, 0xf5, 0x31, 0xc0, 0xe7, 0xe0, 0xf4]);
    code
}

/// Lets a [`spin_code`] payload end.
fn release(mem: &guest_mem::GuestMem) {
    use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    mem.memory()
        .memory()
        .write_obj(1u32, GuestAddress(u64::from(FLAG)))
        .unwrap();
}

/// Splits `[SLICES_START, memory)` among the vCPUs.
fn slice(id: u8, vcpus: u8, memory: u64) -> (u64, u64) {
    let per = ((memory - SLICES_START) / u64::from(vcpus)) & !0xfff;
    let start = SLICES_START + per * u64::from(id);
    (start, start + per)
}

fn pages_with_data(vm_mem: &guest_mem::GuestMem, from: u64, to: u64) -> u64 {
    let r = &vm_mem.regions()[0];
    (from / 4096..to / 4096)
        .filter(|p| r.backing().has_data(r.file_range(p * 4096, 4096)).unwrap())
        .count() as u64
}

/// Runs the pattern payload at CPL3 on `vcpus` vCPUs, each over its slice.
fn run_pattern(
    memory: u64,
    vcpus: u8,
    readahead: Readahead,
) -> (std::sync::Arc<guest_mem::GuestMem>, vmm::RunOutcome) {
    let mut vm = vm(memory, vcpus, readahead);
    vm.load_payload(&pattern_payload(LOAD), LOAD, true, |id| {
        let (start, end) = slice(id, vcpus, memory);
        PayloadArgs {
            entry: LOAD,
            stack: LOAD - u64::from(id) * 0x1000,
            args: [u64::from(id), start, end, 0, 0, 0],
        }
    })
    .unwrap();
    let mem = vm.memory().clone();
    (mem, vm.run().unwrap())
}

#[test]
fn cpl3_vcpus_write_and_verify_all_ram_through_the_fault_handler() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let (memory, vcpus) = (64u64 << 20, 4u8);
    let (mem, outcome) = run_pattern(memory, vcpus, Readahead::NONE);
    assert!(mem.userfault_enabled());
    for (id, r) in outcome.reasons.iter().enumerate() {
        assert!(
            matches!(r, ExitReason::PayloadDone { code: 0, .. }),
            "vCPU {id}: {r}"
        );
    }
    // The last fault's thread may run on before its bookkeeping ends.
    let stats = mem.settled_stats(Duration::from_secs(5));
    eprintln!("{stats}");
    let slice_pages = (memory - SLICES_START) / 4096;
    let touched = pages_with_data(&mem, SLICES_START, memory);
    let low = pages_with_data(&mem, 0, SLICES_START);
    assert_eq!(touched, slice_pages, "every slice page is backed");
    // One fault and one install per page the guest or the VMM touched: no
    // readahead, so the counters are exact.
    assert_eq!(stats.pages_installed, slice_pages + low, "{stats}");
    assert_eq!(stats.faults, stats.pages_installed, "{stats}");
    assert_eq!(stats.retries + stats.out_of_range + stats.install_errors, 0);
    // The guest's writes are in the backing file.
    let r = &mem.regions()[0];
    let mut word = [0u8; 8];
    let addr = SLICES_START + 0x5000;
    std::os::unix::fs::FileExt::read_at(&**r.backing().file(), &mut word, addr).unwrap();
    assert_eq!(u64::from_le_bytes(word), pattern(addr, 0));
}

#[test]
fn readahead_serves_sequential_guest_touches_in_fewer_faults() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let (memory, vcpus) = (64u64 << 20, 2u8);
    let (mem, outcome) = run_pattern(memory, vcpus, Readahead::default());
    assert!(
        outcome.reasons.iter().all(ExitReason::is_clean),
        "{outcome:?}"
    );
    let s = mem.settled_stats(Duration::from_secs(5));
    let slice_pages = (memory - SLICES_START) / 4096;
    assert!(s.pages_installed >= slice_pages, "{s}");
    assert!(s.faults * 10 < slice_pages, "readahead should batch: {s}");
}

#[test]
fn a_payload_reports_what_it_did_not_find() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    // Verify-only over fresh (zero) memory: the first page must fail, with
    // its address, the expected and the found word.
    let mut vm = vm(16 << 20, 1, Readahead::NONE);
    vm.load_payload(&pattern_payload(LOAD), LOAD, true, |_| PayloadArgs {
        entry: LOAD,
        stack: LOAD,
        args: [0, SLICES_START, 16 << 20, 1, 0, 0],
    })
    .unwrap();
    let outcome = vm.run().unwrap();
    assert_eq!(
        outcome.reason,
        ExitReason::PayloadDone {
            vcpu: 0,
            code: 1,
            detail: [SLICES_START, pattern(SLICES_START, 0), 0]
        }
    );
    assert!(!outcome.reason.is_clean());
}

/// A one-vCPU VM over memory that cannot be served from `SLICES_START`,
/// running the pattern payload over it (its first write lands there).
fn failing_vm(memory: u64, on_unservable: Unservable) -> Vm {
    let mem = failing_memory(memory, SLICES_START, on_unservable);
    let mut vm = Vm::with_memory(payload_vm_config(memory, 1), mem).unwrap();
    vm.load_payload(&pattern_payload(LOAD), LOAD, true, |_| PayloadArgs {
        entry: LOAD,
        stack: LOAD,
        args: [0, SLICES_START, memory, 0, 0, 0],
    })
    .unwrap();
    vm
}

/// A vCPU touches memory the fault handler cannot serve, under the Report
/// policy: the VM stops with an error naming the page and the cause,
/// instead of the vCPU spinning on the fault for ever.
#[test]
fn memory_that_cannot_be_served_stops_the_vm_with_the_page() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let vm = failing_vm(16 << 20, Unservable::Report);
    let start = std::time::Instant::now();
    let outcome = vm.run().unwrap();
    let ExitReason::Error(why) = &outcome.reason else {
        panic!("expected an error, got {}", outcome.reason);
    };
    assert!(why.contains("guest memory could not be served"), "{why}");
    assert!(why.contains("offset 0x800000"), "{why}");
    assert!(why.contains("Input/output error"), "{why}");
    assert!(start.elapsed() < Duration::from_secs(20));
}

/// Under the default Poison policy the page is poisoned instead: KVM sends
/// the vCPU thread SIGBUS (BUS_MCEERR_AR), the VMM turns it into a machine
/// check for the guest, and this payload (CR4.MCE clear, no IDT) cannot
/// take it, so KVM shuts it down and the VM ends with an error naming the
/// guest page. The VMM (this process) does not die of the SIGBUS, and the
/// page is counted poisoned, not reported as a failure.
#[test]
fn a_page_that_cannot_be_served_becomes_a_machine_check_not_a_crash() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let vm = failing_vm(16 << 20, Unservable::Poison);
    let mem = vm.memory().clone();
    if mem.unservable() != Some(Unservable::Poison) {
        eprintln!("skipped: this kernel's userfaultfd cannot poison");
        return;
    }
    let failure = mem.fault_failure().unwrap().clone();
    let start = std::time::Instant::now();
    let outcome = vm.run().unwrap();
    let ExitReason::Error(why) = &outcome.reason else {
        panic!("expected an error, got {}", outcome.reason);
    };
    assert!(
        why.contains("machine check for guest page 0x800000"),
        "{why}"
    );
    // Injected (KVM_X86_SET_MCE), then refused by the guest: KVM shut it
    // down, which only an injected #MC with CR4.MCE clear does here.
    assert!(
        why.contains("could not be delivered: the guest shut down"),
        "{why}"
    );
    assert!(!outcome.reason.is_clean());
    assert_eq!(failure.poisoned_count(), 1);
    assert_eq!(failure.poisoned_pages()[0].offset, SLICES_START);
    assert_eq!(failure.count(), 0, "{:?}", failure.message());
    assert_eq!(mem.poisoned_pages(), 1);
    assert!(start.elapsed() < Duration::from_secs(20));
}

/// The `Seccomp:` mode of each of this process's threads named `prefix*`
/// (2: filtered), from /proc.
fn seccomp_modes(prefix: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim().to_string();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.push((comm, mode));
    }
    out
}

/// With seccomp on, the vCPU, fault handler and event loop threads of a
/// running VM are filtered, and the thread that called `Vm::run` is not.
#[test]
fn a_running_vm_has_its_threads_filtered_and_its_caller_not() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let vm = code_vm(&spin_code());
    let mem = vm.memory().clone();
    let caller = std::thread::Builder::new()
        .name("runner".into())
        .spawn(move || (vm.run(), seccomp_modes("runner")))
        .unwrap();
    // Other tests' VMs run in this process too, under the same names and
    // with the same filters.
    let names = ["vcpu0", "uffd-0", "vmm-events"];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen: Vec<Vec<(String, u32)>> = Vec::new();
    while std::time::Instant::now() < deadline {
        seen = names.map(seccomp_modes).to_vec();
        if seen
            .iter()
            .all(|t| !t.is_empty() && t.iter().all(|(_, m)| *m == 2))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    release(&mem);
    let (outcome, caller_modes) = caller.join().unwrap();
    let outcome = outcome.unwrap();
    assert!(
        matches!(outcome.reason, ExitReason::PayloadDone { code: 0, .. }),
        "{}",
        outcome.reason
    );
    for (name, threads) in names.iter().zip(&seen) {
        assert!(!threads.is_empty(), "no {name} thread seen");
        assert!(threads.iter().all(|(_, m)| *m == 2), "{name}: {threads:?}");
    }
    assert_eq!(
        caller_modes,
        [("runner".to_string(), 0)],
        "the caller is not"
    );
}

/// A vCPU announces the TSC-deadline timer wherever KVM emulates it (so a
/// Linux guest skips calibrating its APIC timer, a 100 ms busy wait): a
/// CPL3 payload reads CPUID leaf 1 and stores ECX. (A host KVM that
/// reports the bit itself passes this without the VMM adding it; the 6.1
/// L1 does not, and `linux_l1` checks the guest ticks on it there.)
#[test]
fn the_guest_sees_the_tsc_deadline_timer_kvm_emulates() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    const RESULT: u32 = 0x20_0000;
    // mov eax, 1; xor ecx, ecx; cpuid; mov [RESULT], ecx; xor eax, eax;
    // out 0xe0, eax; hlt
    let mut code = vec![0xb8, 1, 0, 0, 0, 0x31, 0xc9, 0x0f, 0xa2, 0x89, 0x0c, 0x25];
    code.extend_from_slice(&RESULT.to_le_bytes());
    code.extend_from_slice(&[0x31, 0xc0, 0xe7, 0xe0, 0xf4]);
    let vm = code_vm(&code);
    let mem = vm.memory().clone();
    let outcome = vm.run().unwrap();
    assert!(
        matches!(outcome.reason, ExitReason::PayloadDone { code: 0, .. }),
        "{}",
        outcome.reason
    );
    use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    let ecx: u32 = mem
        .memory()
        .memory()
        .read_obj(GuestAddress(u64::from(RESULT)))
        .unwrap();
    let emulated = kvm_ioctls::Kvm::new()
        .unwrap()
        .check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    assert!(emulated, "every KVM since Linux 3.6 emulates it");
    assert_ne!(ecx & (1 << 24), 0, "CPUID.1:ECX = {ecx:#x}");
    assert_ne!(ecx & (1 << 31), 0, "the hypervisor bit, read back");
}

/// `GET /metrics` over the VM's API socket, the JSON body.
fn get_metrics(sock: &std::path::Path) -> serde_json::Value {
    let (status, body) = integration_tests::api_request(sock, "GET", "/metrics", "").unwrap();
    assert!(status.contains(" 200 "), "{status}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// A VM whose guest runs without asking anything of the VMM leaves its
/// event loop asleep: no periodic wake-up (each one an interrupt, and an
/// exit for a guest on the same CPU). The guest spins at CPL3 on a flag
/// the test sets when it has looked.
#[test]
fn an_idle_vm_leaves_its_event_loop_asleep() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let dir = std::env::temp_dir().join(format!("idle-loop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mut vm = Vm::new(VmConfig {
        api_socket: Some(sock.clone()),
        ..payload_vm_config(16 << 20, 1)
    })
    .expect("creating the VM");
    load_code(&mut vm, &spin_code());
    let mem = vm.memory().clone();
    let looker = std::thread::spawn(move || {
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Let the start settle (the vCPU's first faults, the API's first
        // connection), then watch the loop for a while.
        std::thread::sleep(Duration::from_millis(200));
        let wakeups = |m: serde_json::Value| m["event_loop_wakeups"].as_u64().expect("counted");
        let before = wakeups(get_metrics(&sock));
        std::thread::sleep(Duration::from_millis(800));
        let after = wakeups(get_metrics(&sock));
        release(&mem);
        after - before
    });
    let outcome = vm.run().unwrap();
    let idle_wakeups = looker.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        matches!(outcome.reason, ExitReason::PayloadDone { code: 0, .. }),
        "{}",
        outcome.reason
    );
    assert!(
        idle_wakeups <= 1,
        "the event loop woke {idle_wakeups} times in 800 ms with nothing to do"
    );
}
