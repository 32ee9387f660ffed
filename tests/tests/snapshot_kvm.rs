//! Snapshot and restore of a CPL3 payload guest on this machine's
//! /dev/kvm: the guest writes stamps over its memory and verifies them in
//! rounds, counting rounds in a register; it is paused and saved mid-run,
//! and restored (lazily and eagerly, two VMs from one snapshot at once) it
//! carries on counting where it stopped and finds every stamp.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::GuestMem;
use integration_tests::payload::{mailbox, snapshot_payload};
use integration_tests::{kvm_available, payload_vm_config};
use vmm::builder::{RestoreConfig, RestoreMode};
use vmm::control::{ControlError, ControlRequest, RunState, VmControl};
use vmm::vcpu::PayloadArgs;
use vmm::{ExitReason, RunOutcome, SerialOut, Vm};

const LOAD: u64 = 0x10_0000;
const MAILBOXES: u64 = 0x20_0000;
const SLICES_START: u64 = 8 << 20;
const MEMORY: u64 = 128 << 20;
/// The guest stamps this much, a quarter of its memory.
const STAMPED: u64 = 32 << 20;
const VCPUS: u8 = 2;
const WAIT: Duration = Duration::from_secs(60);

fn mailbox(id: u8) -> u64 {
    MAILBOXES + u64::from(id) * 0x100
}

fn read(mem: &GuestMem, addr: u64) -> u64 {
    mem.memory().memory().read_obj(GuestAddress(addr)).unwrap()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Running {
    mem: Arc<GuestMem>,
    control: Arc<VmControl>,
    thread: JoinHandle<RunOutcome>,
}

fn start(vm: Vm) -> Running {
    let mem = vm.memory().clone();
    let control = vm.control();
    let thread = std::thread::spawn(move || vm.run().expect("running the VM"));
    Running {
        mem,
        control,
        thread,
    }
}

impl Running {
    fn ask(&self, req: ControlRequest) -> Result<(), ControlError> {
        self.control.request(req, Duration::from_secs(30))
    }

    fn rounds(&self) -> Vec<u64> {
        (0..VCPUS)
            .map(|id| read(&self.mem, mailbox(id) + mailbox::ROUNDS))
            .collect()
    }

    /// Asks every vCPU to finish; returns the rounds each reports.
    fn finish(self) -> Vec<u64> {
        for id in 0..VCPUS {
            self.mem
                .memory()
                .memory()
                .write_obj(1u64, GuestAddress(mailbox(id) + mailbox::FINISH))
                .unwrap();
        }
        let outcome = self.thread.join().expect("the VM thread");
        outcome
            .reasons
            .iter()
            .enumerate()
            .map(|(id, r)| match r {
                ExitReason::PayloadDone {
                    code: 0, detail, ..
                } => detail[0],
                other => panic!("vCPU {id}: {other}"),
            })
            .collect()
    }
}

fn booted() -> Running {
    let mut vm = Vm::new(payload_vm_config(MEMORY, VCPUS)).unwrap();
    let per = (STAMPED / u64::from(VCPUS)) & !0xfff;
    vm.load_payload(&snapshot_payload(LOAD), LOAD, true, |id| {
        let start = SLICES_START + per * u64::from(id);
        PayloadArgs {
            entry: LOAD,
            stack: LOAD - u64::from(id) * 0x1000,
            args: [u64::from(id), start, start + per, mailbox(id), 0, 0],
        }
    })
    .unwrap();
    start(vm)
}

fn restored(dir: &Path, mode: RestoreMode) -> Running {
    start(
        Vm::restore(RestoreConfig {
            dir: dir.to_path_buf(),
            mode,
            fault: Default::default(),
            serial: SerialOut::Sink,
            api_socket: None,
            seccomp: true,
        })
        .unwrap_or_else(|e| panic!("restoring {mode:?}: {e}")),
    )
}

fn file_digest(path: &Path) -> (u64, u32) {
    let data = std::fs::read(path).unwrap();
    (data.len() as u64, crc32fast::hash(&data))
}

#[test]
fn a_paused_payload_is_saved_and_carries_on_after_lazy_and_eager_restores() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");

    let vm = booted();
    wait_for("the stamps and a few rounds", || {
        (0..VCPUS).all(|id| read(&vm.mem, mailbox(id) + mailbox::ROUNDS) >= 2)
    });
    assert!(
        matches!(
            vm.ask(ControlRequest::Snapshot(dir.clone())),
            Err(ControlError::Conflict(_))
        ),
        "a running VM is not saved"
    );
    vm.ask(ControlRequest::Pause).unwrap();
    assert_eq!(vm.control.state(), RunState::Paused);
    let at_pause = vm.rounds();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.rounds(), at_pause, "paused vCPUs do not run");
    vm.ask(ControlRequest::Snapshot(dir.clone())).unwrap();
    assert!(
        matches!(
            vm.ask(ControlRequest::Snapshot(dir.clone())),
            Err(ControlError::Invalid(_))
        ),
        "an existing directory is not overwritten"
    );
    vm.ask(ControlRequest::Resume).unwrap();
    wait_for("rounds after the resume", || {
        vm.rounds().iter().zip(&at_pause).all(|(r, p)| r > p)
    });
    let original = vm.finish();

    // Sparse: the pages the guest wrote (and the payload, page tables,
    // mailboxes below them), not all of its memory.
    let memory = dir.join(vmm::snapshot::MEMORY_FILE);
    let (snap, _) = vmm::snapshot::read(&dir).unwrap();
    assert!(
        (STAMPED..STAMPED + SLICES_START).contains(&snap.memory.data_bytes),
        "{} bytes of data for {} MiB of guest memory",
        snap.memory.data_bytes,
        MEMORY >> 20
    );
    let digest = file_digest(&memory);

    // Two VMs from one snapshot at once.
    let lazy = restored(&dir, RestoreMode::Lazy);
    let eager = restored(&dir, RestoreMode::Eager);
    for vm in [&lazy, &eager] {
        wait_for("rounds after the restore", || {
            vm.rounds().iter().zip(&at_pause).all(|(r, p)| r > p)
        });
    }
    let fetched = lazy.mem.stats();
    let lazy_rounds = lazy.finish();
    let eager_rounds = eager.finish();
    for (name, rounds) in [("lazy", &lazy_rounds), ("eager", &eager_rounds)] {
        for (id, (r, p)) in rounds.iter().zip(&at_pause).enumerate() {
            // Counting on from the saved register, not from zero: more
            // rounds than it had at the pause.
            assert!(
                r > p,
                "{name}: vCPU {id} reports {r} rounds, {p} at the pause"
            );
        }
    }
    assert!(
        fetched.faults > 0,
        "lazy pages come through the fault handler: {fetched}"
    );
    assert_eq!(
        file_digest(&memory),
        digest,
        "restores never modify the snapshot"
    );
    eprintln!("original {original:?}, lazy {lazy_rounds:?}, eager {eager_rounds:?}; {fetched}");
}

#[test]
fn bad_snapshots_are_refused_with_the_reason() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let vm = booted();
    wait_for("the stamps", || {
        read(&vm.mem, mailbox(0) + mailbox::WRITTEN) == 1
    });
    vm.ask(ControlRequest::Pause).unwrap();
    vm.ask(ControlRequest::Snapshot(dir.clone())).unwrap();
    // A paused VM can be ended without resuming it.
    vm.ask(ControlRequest::Stop).unwrap();
    let outcome = vm.thread.join().unwrap();
    assert_eq!(outcome.reason, ExitReason::Stopped, "{outcome:?}");
    assert_eq!(vm.control.state(), RunState::Stopped);

    let restore = |d: &Path| {
        Vm::restore(RestoreConfig {
            dir: d.to_path_buf(),
            mode: RestoreMode::Lazy,
            fault: Default::default(),
            serial: SerialOut::Sink,
            api_socket: None,
            seccomp: false,
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| "accepted".into())
    };
    let state = std::fs::read(dir.join(vmm::snapshot::STATE_FILE)).unwrap();
    let copy = |name: &str, state: &[u8], memory_len: Option<u64>| {
        let d = tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join(vmm::snapshot::STATE_FILE), state).unwrap();
        let m = d.join(vmm::snapshot::MEMORY_FILE);
        std::fs::copy(dir.join(vmm::snapshot::MEMORY_FILE), &m).unwrap();
        if let Some(len) = memory_len {
            std::fs::File::options()
                .write(true)
                .open(&m)
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        d
    };
    let nl = state.iter().position(|&b| b == b'\n').unwrap();
    let mut corrupt = state.clone();
    let mid = nl + (state.len() - nl) / 2;
    corrupt[mid] ^= 0x20;
    let header = String::from_utf8(state[..nl].to_vec()).unwrap();
    let other_version = [
        header.replace("\"version\":1", "\"version\":99").as_bytes(),
        &state[nl..],
    ]
    .concat();
    let cases: Vec<(&str, std::path::PathBuf, &str)> = vec![
        ("missing", tmp.path().join("nope"), "No such file"),
        (
            "truncated state",
            copy("t", &state[..state.len() - 100], None),
            "truncated",
        ),
        ("corrupt state", copy("c", &corrupt, None), "checksum"),
        (
            "other version",
            copy("v", &other_version, None),
            "version 99",
        ),
        (
            "not a snapshot",
            copy("n", b"hello\nworld", None),
            "not a snapshot",
        ),
        (
            "short memory file",
            copy("m", &state, Some(4096)),
            "truncated or from another",
        ),
    ];
    for (what, d, expect) in cases {
        let e = restore(&d);
        assert!(e.contains(expect), "{what}: {e}");
    }
    // Nothing was modified.
    assert_eq!(
        std::fs::read(dir.join(vmm::snapshot::STATE_FILE)).unwrap(),
        state
    );
}

/// A snapshot that fails halfway (guest memory that cannot be saved: a
/// private mapping) leaves nothing behind: no directory that looks valid,
/// no partial one. The VM carries on.
#[test]
fn a_failed_snapshot_leaves_no_directory() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let mut rc = guest_mem::RegionConfig::new(0, MEMORY);
    rc.private = true;
    let mem = GuestMem::builder().region(rc).build().unwrap();
    let mut vm = Vm::with_memory(payload_vm_config(MEMORY, 1), mem).unwrap();
    vm.load_payload(&snapshot_payload(LOAD), LOAD, true, |_| PayloadArgs {
        entry: LOAD,
        stack: LOAD,
        args: [0, SLICES_START, SLICES_START + (4 << 20), mailbox(0), 0, 0],
    })
    .unwrap();
    let vm = start(vm);
    wait_for("the stamps", || {
        read(&vm.mem, mailbox(0) + mailbox::WRITTEN) == 1
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    vm.ask(ControlRequest::Pause).unwrap();
    let e = vm.ask(ControlRequest::Snapshot(dir.clone())).unwrap_err();
    assert!(e.to_string().contains("private"), "{e}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    vm.ask(ControlRequest::Resume).unwrap();
    let rounds = vm.finish();
    assert!(rounds[0] > 0);
}
