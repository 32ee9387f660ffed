//! Guest memory the fault handler cannot serve normally stops the VM
//! through the event loop. Here the event loop itself is the thread stuck on
//! such a page (the balloon reads a PFN list from it): the VMM must still
//! end, with the failure's message, instead of hanging for ever. The VM
//! runs in a child copy of this test, since the way out ends its process.
//!
//! Under the Poison policy the page is poisoned instead and the event loop
//! thread takes SIGBUS on it: the VMM's SIGBUS handler must end the process
//! with a clear message naming the page and a distinct status, not die
//! silently of the signal.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{FaultConfig, Unservable};
use integration_tests::failing_source::failing_memory;
use integration_tests::hostile::script::{self, Op};
use integration_tests::hostile::{
    publish, put_desc, reg, rings, start_device, BALLOON, BALLOON_FEATURES, BUFFERS, LOAD, SCRIPT,
};
use integration_tests::kvm_available;
use vmm::vcpu::PayloadArgs;
use vmm::{SerialOut, Vm, VmConfig};

const RAM: u64 = 64 << 20;
const BAD: u64 = 40 << 20;

fn child() {
    let policy = match std::env::var("STUCK_EVENT_LOOP_POLICY").as_deref() {
        Ok("poison") => Unservable::Poison,
        _ => Unservable::Report,
    };
    let mem = failing_memory(RAM, BAD, policy);
    let mut vm = Vm::with_memory(
        VmConfig {
            memory: RAM,
            vcpus: 1,
            backend: vmm::MemBackend::Memfd,
            fault: FaultConfig::default(),
            serial: SerialOut::Sink,
            balloon: Some(Default::default()),
            hotplug: None,
            api_socket: None,
            seccomp: true,
        },
        mem,
    )
    .unwrap();
    let m = vm.memory().clone();
    // An inflate whose PFN list lies in memory that cannot be served.
    let (t, a, _) = rings(0);
    put_desc(&m, t, 0, (BAD + 0x1000, 1024, 0, 0));
    publish(&m, a, &[0]);
    let mut ops = start_device(
        BALLOON,
        BALLOON_FEATURES,
        &integration_tests::hostile::balloon_queues(),
    );
    ops.push(Op::Write(
        4,
        reg(
            BALLOON,
            virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY,
        ),
        0,
    ));
    let at = ops.len();
    ops.push(Op::Read(4, BUFFERS));
    ops.push(Op::Repeat {
        to: at,
        times: u64::MAX,
    });
    m.memory()
        .memory()
        .write_slice(&script::encode(&ops, SCRIPT), GuestAddress(SCRIPT))
        .unwrap();
    vm.load_payload(&script::interpreter(LOAD), LOAD, true, |_| PayloadArgs {
        entry: LOAD,
        stack: LOAD - 0x1000,
        args: [0, SCRIPT, 0, 0, 0, 0],
    })
    .unwrap();
    let outcome = vm.run();
    // Not reached: the event loop cannot stop the VM, Vm::run ends the
    // process.
    eprintln!("child: run returned {:?}", outcome.map(|o| o.reason));
}

/// Runs `test` of this binary as the child with `policy`; returns its
/// exit status and what it wrote to stderr.
fn run_child(test: &str, policy: &str) -> (std::process::ExitStatus, String) {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env("STUCK_EVENT_LOOP_CHILD", "1")
        .env("STUCK_EVENT_LOOP_POLICY", policy)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read stderr on the side: a chatty child must not block on a full pipe.
    let mut pipe = c.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut err).unwrap();
        err
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = c.kill();
            let _ = c.wait();
            panic!("the VMM hung with its event loop stuck on unservable memory");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().unwrap())
}

#[test]
fn an_event_loop_stuck_on_unservable_memory_still_ends_the_vm() {
    const NAME: &str = "an_event_loop_stuck_on_unservable_memory_still_ends_the_vm";
    if std::env::var_os("STUCK_EVENT_LOOP_CHILD").is_some() {
        return child();
    }
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let (status, err) = run_child(NAME, "report");
    assert!(err.contains("could not be served"), "{status}: {err}");
    assert!(
        err.contains("offset 0x2801000") || err.contains("offset 0x2800000"),
        "{err}"
    );
    assert!(
        !status.success() || err.contains("child: run returned"),
        "{status}: {err}"
    );
}

#[test]
fn an_event_loop_touching_a_poisoned_page_exits_with_a_clear_message() {
    const NAME: &str = "an_event_loop_touching_a_poisoned_page_exits_with_a_clear_message";
    if std::env::var_os("STUCK_EVENT_LOOP_CHILD").is_some() {
        return child();
    }
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not available");
        return;
    }
    let (status, err) = run_child(NAME, "poison");
    if err.contains("cannot poison pages") {
        eprintln!("skipped: this kernel's userfaultfd cannot poison");
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), None, "died of a signal: {err}");
    assert_eq!(
        status.code(),
        Some(vmm::sigbus::SIGBUS_EXIT_CODE),
        "{status}: {err}"
    );
    assert!(err.contains("vmm: SIGBUS"), "{err}");
    assert!(err.contains("guest page 0x2801000"), "{err}");
    assert!(err.contains("not a vCPU"), "{err}");
}
