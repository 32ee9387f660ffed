//! The hostile-guest suite: a CPL3 guest on this machine's `/dev/kvm` that
//! abuses the real virtio-mmio devices (balloon and virtio-mem) through
//! their registers and rings. Each case is a script the guest carries out
//! ([`script`]), plus rings and buffers laid out in guest RAM as a hostile
//! driver would lay them. After each: the VMM has kept running (the run
//! ends with the guest's own verdict), the refusals were counted, the
//! guest's other pages kept their contents, and the VMM's anonymous memory
//! grew by a bounded amount.

pub mod script;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::GuestMem;
use virtio_bindings::virtio_mmio as m;
use vmm::layout::{hotplug_base, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use vmm::vcpu::PayloadArgs;
use vmm::{ExitReason, RunOutcome, SerialOut, Vm, VmConfig};

use script::Op;

/// Guest RAM.
pub const RAM: u64 = 64 << 20;
/// The virtio-mem window (above 4 GiB).
pub const WINDOW: u64 = 128 << 20;
/// Where the interpreter runs.
pub const LOAD: u64 = 0x10_0000;
/// Where the script lives.
pub const SCRIPT: u64 = 0x20_0000;
/// Where a second vCPU's script goes (the first's ends below it).
pub const SCRIPT2: u64 = 0x28_0000;
/// Rings: queue `i` at `RINGS + i * 0x1_0000` (table, avail +0x4000, used
/// +0x8000).
pub const RINGS: u64 = 0x30_0000;
/// Request and PFN buffers.
pub const BUFFERS: u64 = 0x40_0000;
/// Pages no case touches: filled before, checked after.
pub const CANARY: (u64, u64) = (0x80_0000, 0xc0_0000);

/// The balloon's registers (slot 0).
pub const BALLOON: u64 = VIRTIO_MMIO_BASE;
/// virtio-mem's registers (slot 1).
pub const VMEM: u64 = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Register `r` of the device at `base`.
pub fn reg(base: u64, r: u32) -> u64 {
    base + u64::from(r)
}

/// Queue `i`'s rings.
pub fn rings(i: u64) -> (u64, u64, u64) {
    let t = RINGS + i * 0x1_0000;
    (t, t + 0x4000, t + 0x8000)
}

/// The driver's side of a device start: reset, acknowledge, features,
/// queues (index, size, table, avail, used), DRIVER_OK.
pub fn start_device(base: u64, features: u64, queues: &[(u32, u32, u64, u64, u64)]) -> Vec<Op> {
    let w = |r: u32, v: u64| Op::Write(4, reg(base, r), v);
    let mut ops = vec![
        w(m::VIRTIO_MMIO_STATUS, 0),
        w(m::VIRTIO_MMIO_STATUS, 1),
        w(m::VIRTIO_MMIO_STATUS, 3),
        w(m::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
        w(m::VIRTIO_MMIO_DRIVER_FEATURES, features >> 32),
        w(m::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0),
        w(m::VIRTIO_MMIO_DRIVER_FEATURES, features & 0xffff_ffff),
        w(m::VIRTIO_MMIO_STATUS, 0xb),
    ];
    for &(q, size, table, avail, used) in queues {
        ops.extend([
            w(m::VIRTIO_MMIO_QUEUE_SEL, u64::from(q)),
            w(m::VIRTIO_MMIO_QUEUE_NUM, u64::from(size)),
            w(m::VIRTIO_MMIO_QUEUE_DESC_LOW, table & 0xffff_ffff),
            w(m::VIRTIO_MMIO_QUEUE_DESC_HIGH, table >> 32),
            w(m::VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail & 0xffff_ffff),
            w(m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, avail >> 32),
            w(m::VIRTIO_MMIO_QUEUE_USED_LOW, used & 0xffff_ffff),
            w(m::VIRTIO_MMIO_QUEUE_USED_HIGH, used >> 32),
            w(m::VIRTIO_MMIO_QUEUE_READY, 1),
        ]);
    }
    ops.push(w(m::VIRTIO_MMIO_STATUS, 0xf));
    ops
}

/// Balloon features: VERSION_1, stats, reporting.
pub const BALLOON_FEATURES: u64 = (1 << 32) | (1 << 1) | (1 << 5);

/// The four balloon queues of size 16 at their usual rings.
pub fn balloon_queues() -> Vec<(u32, u32, u64, u64, u64)> {
    (0..4)
        .map(|i| {
            let (t, a, u) = rings(i);
            (i as u32, 16, t, a, u)
        })
        .collect()
}

/// Writes descriptor `index` of the table at `table`.
pub fn put_desc(mem: &GuestMem, table: u64, index: u16, d: (u64, u32, u16, u16)) {
    let ram = mem.memory().memory();
    let at = table + u64::from(index) * 16;
    ram.write_obj(d.0, GuestAddress(at)).unwrap();
    ram.write_obj(d.1, GuestAddress(at + 8)).unwrap();
    ram.write_obj(d.2, GuestAddress(at + 12)).unwrap();
    ram.write_obj(d.3, GuestAddress(at + 14)).unwrap();
}

/// Publishes `heads` in the avail ring at `avail` (index = heads.len()).
pub fn publish(mem: &GuestMem, avail: u64, heads: &[u16]) {
    let ram = mem.memory().memory();
    for (i, h) in heads.iter().enumerate() {
        ram.write_obj(*h, GuestAddress(avail + 4 + 2 * i as u64))
            .unwrap();
    }
    ram.write_obj(heads.len() as u16, GuestAddress(avail + 2))
        .unwrap();
}

/// What a case saw, for its checks.
pub struct Seen<'a> {
    /// How the run ended.
    pub outcome: &'a RunOutcome,
    /// The VM (its devices' state and counters).
    pub vm_mem: &'a Arc<GuestMem>,
    /// The balloon's counters.
    pub balloon: &'a devices::virtio::balloon::BalloonCounters,
    /// The balloon transport's refused register accesses.
    pub balloon_rejected: u64,
    /// Whether the balloon is activated at the end.
    pub balloon_active: bool,
    /// virtio-mem's counters.
    pub vmem: &'a devices::virtio::mem::MemCounters,
    /// virtio-mem's transport's refused register accesses.
    pub vmem_rejected: u64,
    /// Slot `i` of the script (what read step `i` read).
    pub slots: Vec<u64>,
}

/// One hostile case.
pub struct Case {
    /// What it does.
    pub name: &'static str,
    /// Lays out rings and buffers in guest RAM before the run.
    pub prepare: fn(&GuestMem),
    /// The guest's script.
    pub script: fn() -> Vec<Op>,
    /// A second vCPU's script, run beside the first (at [`SCRIPT2`]);
    /// the case ends when the first one does.
    pub helper: Option<fn() -> Vec<Op>>,
    /// Whether the guest may end other than cleanly (it asked the device
    /// to take its own code or page tables).
    pub guest_may_crash: bool,
    /// Guard the virtio-mem window by protection (the fault handler
    /// reports what it cannot serve, so the window cannot be guarded by
    /// poisoning); else the guard this host allows. The VM may then stop
    /// with the error of a guest touching memory it has not plugged.
    pub protection_guard: bool,
    /// Checks what the devices counted; an error says what is wrong.
    pub check: fn(&Seen) -> Result<(), String>,
}

/// The result of one case.
pub struct CaseResult {
    /// The case.
    pub name: &'static str,
    /// The second API client's slowest answer, if the VM ran long enough
    /// for it to connect.
    pub api_latency: Option<std::time::Duration>,
    /// Whether every check held.
    pub survived: Result<(), String>,
    /// Growth of the VMM's anonymous memory over the case, in MiB.
    pub rss_growth_mib: f64,
    /// Seconds the case took.
    pub seconds: f64,
}

/// The VMM's anonymous resident memory (heap, stacks), in KiB.
pub fn rss_anon_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn fill_canary(mem: &GuestMem) {
    let ram = mem.memory().memory();
    for a in (CANARY.0..CANARY.1).step_by(4096) {
        ram.write_obj(a ^ 0xc0ff_ee00_0000_0000, GuestAddress(a))
            .unwrap();
    }
}

fn canary_intact(mem: &GuestMem) -> Result<(), String> {
    let ram = mem.memory().memory();
    for a in (CANARY.0..CANARY.1).step_by(4096) {
        let v: u64 = ram.read_obj(GuestAddress(a)).map_err(|e| e.to_string())?;
        if v != a ^ 0xc0ff_ee00_0000_0000 {
            return Err(format!("canary page {a:#x} holds {v:#x}"));
        }
    }
    Ok(())
}

/// Runs one case in a fresh VM (balloon, a virtio-mem window, an API
/// socket at `api_sock`); `during` runs on another thread while the guest
/// does (a second API client).
pub fn run_case<F>(case: &Case, api_sock: &std::path::Path, during: F) -> CaseResult
where
    F: FnOnce(Arc<std::sync::atomic::AtomicBool>) -> Result<Option<std::time::Duration>, String>
        + Send
        + 'static,
{
    let started = std::time::Instant::now();
    let rss_before = rss_anon_kib();
    let _ = std::fs::remove_file(api_sock);
    let mut vm = Vm::new(VmConfig {
        memory: RAM,
        vcpus: 1 + u8::from(case.helper.is_some()),
        backend: vmm::MemBackend::Memfd,
        fault: guest_mem::FaultConfig {
            on_unservable: if case.protection_guard {
                guest_mem::Unservable::Report
            } else {
                guest_mem::Unservable::Poison
            },
            ..Default::default()
        },
        serial: SerialOut::Sink,
        balloon: Some(Default::default()),
        hotplug: Some(WINDOW),
        api_socket: Some(api_sock.to_path_buf()),
        seccomp: true,
    })
    .expect("creating the VM");
    let mem = vm.memory().clone();
    fill_canary(&mem);
    (case.prepare)(&mem);
    let ops = (case.script)();
    let encoded = script::encode(&ops, SCRIPT);
    assert!(
        SCRIPT + encoded.len() as u64 <= SCRIPT2,
        "{}: the script runs into the second one's place",
        case.name
    );
    let ram = mem.memory();
    ram.memory()
        .write_slice(&encoded, GuestAddress(SCRIPT))
        .expect("writing the script");
    if let Some(helper) = case.helper {
        ram.memory()
            .write_slice(&script::encode(&helper(), SCRIPT2), GuestAddress(SCRIPT2))
            .expect("writing the second script");
    }
    drop(ram);
    // Each vCPU its own script and its own stack page.
    vm.load_payload(&script::interpreter(LOAD), LOAD, true, |vcpu| PayloadArgs {
        entry: LOAD,
        stack: LOAD - 0x1000 - u64::from(vcpu) * 0x2000,
        args: [0, if vcpu == 0 { SCRIPT } else { SCRIPT2 }, 0, 0, 0, 0],
    })
    .expect("loading the interpreter");
    let balloon = vm.balloon().cloned().expect("a balloon");
    let vmem = vm.hotplug().cloned().expect("virtio-mem");
    // Let the guest plug up to half the window.
    vmem.set_requested(WINDOW / 2);
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let client = {
        let running = running.clone();
        std::thread::spawn(move || during(running))
    };
    let outcome = vm.run().expect("running the VM");
    running.store(false, Ordering::SeqCst);
    let client = client
        .join()
        .unwrap_or_else(|_| Err("the client panicked".into()));
    let api_latency = client.as_ref().ok().copied().flatten();
    let ram = mem.memory().memory();
    let slots = (0..ops.len() as u64)
        .map(|i| {
            ram.read_obj::<u64>(GuestAddress(SCRIPT + i * script::STEP + 24))
                .unwrap_or(0)
        })
        .collect();
    let lock = |t: &std::sync::Mutex<devices::virtio::mmio::MmioTransport>| {
        let t = t.lock().unwrap_or_else(|p| p.into_inner());
        (t.rejected(), t.is_activated())
    };
    let (balloon_rejected, balloon_active) = lock(&balloon.transport);
    let (vmem_rejected, _) = lock(&vmem.transport);
    let seen = Seen {
        outcome: &outcome,
        vm_mem: &mem,
        balloon: &balloon.state.counters,
        balloon_rejected,
        balloon_active,
        vmem: &vmem.state.counters,
        vmem_rejected,
        slots,
    };
    let ended = match &outcome.reason {
        ExitReason::PayloadDone { code: 0, .. } => Ok(()),
        other if case.guest_may_crash && !matches!(other, ExitReason::Error(_)) => Ok(()),
        // Under the protection guard (no poisoning here), a guest touch of
        // a block it has not plugged stops the VM: the cases' checks say
        // whether that was the expected end.
        ExitReason::Error(e)
            if e.contains(UNPLUGGED_TOUCH)
                && mem.unservable() != Some(guest_mem::Unservable::Poison) =>
        {
            Ok(())
        }
        other => Err(format!("the run ended with {other}")),
    };
    let survived = ended
        .and_then(|()| (case.check)(&seen))
        .and_then(|()| {
            if case.guest_may_crash {
                Ok(())
            } else {
                canary_intact(&mem)
            }
        })
        .and_then(|()| client.map(|_| ()));
    drop(seen);
    drop(ram);
    drop(mem);
    let growth = rss_anon_kib().saturating_sub(rss_before) as f64 / 1024.0;
    CaseResult {
        name: case.name,
        api_latency,
        survived,
        rss_growth_mib: growth,
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn at_least(what: &str, got: u64, want: u64) -> Result<(), String> {
    if got >= want {
        Ok(())
    } else {
        Err(format!("{what}: {got}, expected at least {want}"))
    }
}

fn bad_queue_script(size: u64, table: u64, avail: u64, used: u64) -> Vec<Op> {
    let mut q = balloon_queues();
    q[0] = (0, size as u32, table, avail, used);
    let mut ops = start_device(BALLOON, BALLOON_FEATURES, &q);
    ops.push(Op::Write(4, reg(BALLOON, m::VIRTIO_MMIO_QUEUE_NOTIFY), 0));
    ops.push(Op::Read(4, reg(BALLOON, m::VIRTIO_MMIO_STATUS)));
    ops.push(Op::End);
    ops
}

fn not_activated(s: &Seen) -> Result<(), String> {
    if s.balloon_active {
        return Err("the device ran on a queue it should have refused".into());
    }
    let status = s.slots[s.slots.len() - 2];
    if status & u64::from(virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET) == 0 {
        return Err(format!("status {status:#x} without NEEDS_RESET"));
    }
    Ok(())
}

fn nothing(_: &GuestMem) {}

/// Every case of the suite.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "queue size 0",
            prepare: nothing,
            script: || {
                let (t, a, u) = rings(0);
                bad_queue_script(0, t, a, u)
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: not_activated,
        },
        Case {
            name: "queue size past the maximum",
            prepare: nothing,
            script: || {
                let (t, a, u) = rings(0);
                bad_queue_script(1024, t, a, u)
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: not_activated,
        },
        Case {
            name: "queue size not a power of two",
            prepare: nothing,
            script: || {
                let (t, a, u) = rings(0);
                bad_queue_script(3, t, a, u)
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: not_activated,
        },
        Case {
            name: "descriptor table outside RAM",
            prepare: nothing,
            script: || {
                let (_, a, u) = rings(0);
                bad_queue_script(16, 0xffff_ffff_f000, a, u)
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: not_activated,
        },
        Case {
            name: "avail ring in the MMIO gap",
            prepare: nothing,
            script: || {
                let (t, _, u) = rings(0);
                bad_queue_script(16, t, 0xd000_0000, u)
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: not_activated,
        },
        Case {
            name: "used ring straddling the end of RAM",
            prepare: nothing,
            script: || {
                let (t, a, _) = rings(0);
                bad_queue_script(16, t, a, RAM - 64)
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: not_activated,
        },
        Case {
            name: "status bits out of order",
            prepare: nothing,
            script: || {
                let st = reg(BALLOON, m::VIRTIO_MMIO_STATUS);
                vec![
                    Op::Write(4, st, 4),
                    Op::Write(4, st, 8),
                    Op::Write(4, st, 1),
                    Op::Write(4, st, 0xf),
                    Op::Write(4, st, 3),
                    Op::Write(4, st, 1),
                    Op::Write(4, st, 0x80),
                    Op::Write(4, st, 0xff),
                    Op::Write(4, st, 0),
                    Op::Read(4, st),
                    Op::End,
                ]
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: |s| {
                at_least("refused register accesses", s.balloon_rejected, 3)?;
                if s.balloon_active {
                    return Err("activated out of order".into());
                }
                Ok(())
            },
        },
        Case {
            name: "odd-width and unaligned register accesses",
            prepare: nothing,
            script: || {
                let mut ops = Vec::new();
                for dev in [BALLOON, VMEM] {
                    for off in 0..0x100u64 {
                        ops.push(Op::Write(1, dev + off, 0xff));
                        ops.push(Op::Write(2, dev + off, 0xffff));
                        ops.push(Op::Write(8, dev + off, u64::MAX));
                        ops.push(Op::Read(1, dev + off));
                        ops.push(Op::Read(2, dev + off));
                        ops.push(Op::Read(8, dev + off));
                        if off % 4 != 0 {
                            ops.push(Op::Write(4, dev + off, 0xffff_ffff));
                            ops.push(Op::Read(4, dev + off));
                        }
                    }
                }
                ops.push(Op::End);
                ops
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: |s| {
                at_least("balloon refusals", s.balloon_rejected, 0x100 * 4)?;
                at_least("virtio-mem refusals", s.vmem_rejected, 0x100 * 4)
            },
        },
        Case {
            name: "config space read past its end",
            prepare: nothing,
            script: || {
                let mut ops = Vec::new();
                for off in [0x140, 0x1ff, 0x400, 0xff8] {
                    for w in [1, 2, 4, 8] {
                        ops.push(Op::Read(w, BALLOON + off));
                        ops.push(Op::Read(w, VMEM + off));
                    }
                }
                // Reads across the end of the window into the next (or
                // into nothing, which reads all ones): not checked, only
                // survived.
                for w in [2, 4, 8] {
                    ops.push(Op::Read(w, BALLOON + 0xfff));
                    ops.push(Op::Read(w, VMEM + 0xfff));
                }
                ops.push(Op::End);
                ops
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: |s| {
                let inside = 4 * 4 * 2;
                match s.slots[..inside].iter().position(|&v| v != 0) {
                    Some(i) => Err(format!(
                        "read step {i} past the config read {:#x}",
                        s.slots[i]
                    )),
                    None => Ok(()),
                }
            },
        },
        Case {
            name: "looping, over-long, indirect and zero-length chains",
            prepare: |mem| {
                let (t, a, _) = rings(0);
                // 0 -> 1 -> 0: a loop.
                put_desc(mem, t, 0, (BUFFERS, 4, VRING_DESC_F_NEXT, 1));
                put_desc(mem, t, 1, (BUFFERS, 4, VRING_DESC_F_NEXT, 0));
                // An indirect table of 65,535 entries.
                put_desc(mem, t, 2, (BUFFERS, 0xffff * 16, VRING_DESC_F_INDIRECT, 0));
                // 20 zero-length descriptors, then a PFN: past the 16 a
                // PFN chain may have, zero-length ones included.
                for i in 3..23 {
                    put_desc(mem, t, i, (BUFFERS, 0, VRING_DESC_F_NEXT, i + 1));
                }
                put_desc(mem, t, 23, (BUFFERS, 4, 0, 0));
                mem.memory()
                    .memory()
                    .write_obj(0x700u32, GuestAddress(BUFFERS))
                    .unwrap();
                publish(mem, a, &[0, 2, 3]);
            },
            script: || {
                let mut q = balloon_queues();
                q[0].1 = 64;
                let mut ops = start_device(BALLOON, BALLOON_FEATURES, &q);
                let (_, _, u) = rings(0);
                ops.push(Op::Write(4, reg(BALLOON, m::VIRTIO_MMIO_QUEUE_NOTIFY), 0));
                ops.push(Op::Wait16(u + 2, 3));
                ops.push(Op::End);
                ops
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: |s| {
                at_least(
                    "refused chains",
                    s.balloon.rejected_chains.load(Ordering::Relaxed),
                    3,
                )?;
                let inflated = s.balloon.inflated_pages.load(Ordering::Relaxed);
                if inflated != 0 {
                    return Err(format!("{inflated} pages inflated from refused chains"));
                }
                Ok(())
            },
        },
        Case {
            name: "free page report flood",
            prepare: |mem| {
                let (t, a, _) = rings(3);
                // One report of one free page, named by every ring slot.
                put_desc(mem, t, 0, (0x60_0000, 4096, VRING_DESC_F_WRITE, 0));
                publish(mem, a, &[0; 16]);
                mem.memory()
                    .memory()
                    .write_obj(0u16, GuestAddress(a + 2))
                    .unwrap();
            },
            script: || {
                let mut ops = start_device(BALLOON, BALLOON_FEATURES, &balloon_queues());
                let (_, a, u) = rings(3);
                let notify = Op::Write(4, reg(BALLOON, m::VIRTIO_MMIO_QUEUE_NOTIFY), 3);
                // One report served for sure, then the flood, which outruns
                // the device (it refuses an avail index too far ahead).
                ops.push(Op::Add16(a + 2, 1));
                ops.push(notify);
                ops.push(Op::Wait16(u + 2, 1));
                let at = ops.len();
                ops.push(Op::Add16(a + 2, 1));
                ops.push(notify);
                ops.push(Op::Repeat {
                    to: at,
                    times: 50_000,
                });
                ops.push(Op::End);
                ops
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: |s| {
                at_least(
                    "reported bytes",
                    s.balloon.reported_bytes.load(Ordering::Relaxed),
                    4096,
                )
            },
        },
        Case {
            name: "notify storm on used, unused and missing queues",
            prepare: nothing,
            script: || {
                let mut ops = start_device(BALLOON, BALLOON_FEATURES, &balloon_queues());
                let notify = reg(BALLOON, m::VIRTIO_MMIO_QUEUE_NOTIFY);
                let at = ops.len();
                for q in [0, 1, 2, 3, 7, 99] {
                    ops.push(Op::Write(4, notify, q));
                }
                ops.push(Op::Repeat {
                    to: at,
                    times: 30_000,
                });
                ops.push(Op::End);
                ops
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: |s| at_least("refused notifies", s.balloon_rejected, 30_000),
        },
        Case {
            name: "inflating the guest's own code and page tables",
            prepare: |mem| {
                let (t, a, _) = rings(0);
                let pfns: [u32; 4] = [
                    (LOAD >> 12) as u32,
                    (vmm::layout::PML4 >> 12) as u32,
                    (SCRIPT >> 12) as u32,
                    (RINGS >> 12) as u32,
                ];
                let ram = mem.memory().memory();
                for (i, p) in pfns.iter().enumerate() {
                    ram.write_obj(*p, GuestAddress(BUFFERS + 4 * i as u64))
                        .unwrap();
                }
                put_desc(mem, t, 0, (BUFFERS, 16, 0, 0));
                publish(mem, a, &[0]);
            },
            script: || {
                let mut ops = start_device(BALLOON, BALLOON_FEATURES, &balloon_queues());
                ops.push(Op::Write(4, reg(BALLOON, m::VIRTIO_MMIO_QUEUE_NOTIFY), 0));
                let at = ops.len();
                ops.push(Op::Read(4, CANARY.0));
                ops.push(Op::Repeat {
                    to: at,
                    times: 1_000_000,
                });
                ops.push(Op::End);
                ops
            },
            helper: None,
            guest_may_crash: true,
            protection_guard: false,
            check: |_| Ok(()),
        },
        Case {
            name: "virtio-mem unplug of the block holding its answer, ranges past the window",
            prepare: |mem| {
                let base = hotplug_base(RAM);
                let (t, a, _) = rings(0);
                let ram = mem.memory().memory();
                let req = |at: u64, kind: u16, addr: u64, n: u16| {
                    ram.write_obj(kind, GuestAddress(at)).unwrap();
                    ram.write_obj(addr, GuestAddress(at + 8)).unwrap();
                    ram.write_obj(n, GuestAddress(at + 16)).unwrap();
                };
                // 0: plug two blocks (answer in RAM); 1: unplug block 1
                // with its answer inside block 1; 2: plug past the
                // window; 3: plug 65,535 blocks.
                req(BUFFERS, 0, base, 2);
                req(BUFFERS + 0x100, 1, base + (2 << 20), 1);
                req(BUFFERS + 0x200, 0, base + WINDOW, 1);
                req(BUFFERS + 0x300, 0, base, 0xffff);
                let answers = [
                    BUFFERS + 0x800,
                    base + (2 << 20) + 0x100,
                    BUFFERS + 0xa00,
                    BUFFERS + 0xb00,
                ];
                for (i, ans) in answers.iter().enumerate() {
                    let i = i as u16;
                    put_desc(
                        mem,
                        t,
                        2 * i,
                        (
                            BUFFERS + 0x100 * u64::from(i),
                            24,
                            VRING_DESC_F_NEXT,
                            2 * i + 1,
                        ),
                    );
                    put_desc(mem, t, 2 * i + 1, (*ans, 10, VRING_DESC_F_WRITE, 0));
                }
                drop(ram);
                // The plug is published first, alone; the rest after it.
                publish(mem, a, &[0]);
            },
            script: || {
                let (t, a, u) = rings(0);
                let mut ops = start_device(VMEM, 1 << 32, &[(0, 16, t, a, u)]);
                let notify = reg(VMEM, m::VIRTIO_MMIO_QUEUE_NOTIFY);
                ops.push(Op::Write(4, notify, 0));
                ops.push(Op::Wait16(u + 2, 1));
                // Now the window's first two blocks are plugged: the
                // guest may touch block 1, and asks to unplug it.
                ops.push(Op::Write(2, a + 4 + 2, 2));
                ops.push(Op::Write(2, a + 4 + 4, 4));
                ops.push(Op::Write(2, a + 4 + 6, 6));
                ops.push(Op::Write(2, a + 2, 4));
                ops.push(Op::Write(4, notify, 0));
                ops.push(Op::Wait16(u + 2, 4));
                ops.push(Op::End);
                ops
            },
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: |s| {
                let ram = s.vm_mem.memory().memory();
                let kind = |at: u64| ram.read_obj::<u16>(GuestAddress(at)).unwrap_or(u16::MAX);
                let base = hotplug_base(RAM);
                let got = [
                    kind(BUFFERS + 0x800),
                    kind(base + (2 << 20) + 0x100),
                    kind(BUFFERS + 0xa00),
                    kind(BUFFERS + 0xb00),
                ];
                // ACK, ERROR (its own answer), ERROR, ERROR.
                if got != [0, 3, 3, 3] {
                    return Err(format!("answers {got:?}, expected [0, 3, 3, 3]"));
                }
                at_least(
                    "self-unplugs refused",
                    s.vmem.self_unplug_refused.load(Ordering::Relaxed),
                    1,
                )
            },
        },
        Case {
            name: "touching virtio-mem blocks that are not plugged, protection guard: VM stops",
            prepare: plug_block_3,
            script: touch_unplugged_blocks,
            helper: None,
            guest_may_crash: false,
            protection_guard: true,
            check: |s| {
                window_backs_one_block(s)?;
                match &s.outcome.reason {
                    ExitReason::Error(e) if e.contains(UNPLUGGED_TOUCH) => Ok(()),
                    other => Err(format!(
                        "ended with {other}: the guest reached blocks it never plugged"
                    )),
                }
            },
        },
        Case {
            name: "touching virtio-mem blocks that are not plugged, poison guard: machine check",
            prepare: plug_block_3,
            script: touch_unplugged_blocks,
            helper: None,
            guest_may_crash: true,
            protection_guard: false,
            check: |s| {
                window_backs_one_block(s)?;
                // Where the handler poisons, the first touch of an
                // unplugged block is poisoned and the guest, which cannot
                // take a machine check, shuts down; elsewhere the window is
                // guarded by protection and the touch stops the VM.
                let stats = s.vm_mem.stats();
                match (&s.outcome.reason, s.vm_mem.unservable()) {
                    (ExitReason::TripleFault { .. }, Some(guest_mem::Unservable::Poison))
                        if stats.unreachable >= 1 && s.vm_mem.poisoned_pages() >= 1 =>
                    {
                        Ok(())
                    }
                    (ExitReason::Error(e), u)
                        if e.contains(UNPLUGGED_TOUCH)
                            && u != Some(guest_mem::Unservable::Poison) =>
                    {
                        Ok(())
                    }
                    (reason, u) => Err(format!(
                        "ended with {reason} ({u:?}), {} unreachable faults, {} pages poisoned",
                        stats.unreachable,
                        s.vm_mem.poisoned_pages()
                    )),
                }
            },
        },
        Case {
            name: "virtio-mem churn, protection guard: 64 blocks in and out, one kept",
            prepare: churn_descriptors,
            script: churn_script,
            helper: None,
            guest_may_crash: false,
            protection_guard: true,
            check: churned,
        },
        Case {
            name: "virtio-mem churn, guard this host allows: 64 blocks in and out, one kept",
            prepare: churn_descriptors,
            script: churn_script,
            helper: None,
            guest_may_crash: false,
            protection_guard: false,
            check: churned,
        },
        Case {
            name: "virtio-mem churn, protection guard, a second vCPU faulting in the kept block",
            prepare: churn_descriptors,
            script: churn_script,
            helper: Some(kept_block_filler),
            guest_may_crash: false,
            protection_guard: true,
            check: churned,
        },
        Case {
            name:
                "virtio-mem churn, guard this host allows, a second vCPU faulting in the kept block",
            prepare: churn_descriptors,
            script: churn_script,
            helper: Some(kept_block_filler),
            guest_may_crash: false,
            protection_guard: false,
            check: churned,
        },
    ]
}

/// What the VM's error says when a guest touched a block it has not
/// plugged under the protection guard.
const UNPLUGGED_TOUCH: &str = "touched memory that is not plugged";

/// Plugs block 3 of the window only (the file then reaches past blocks
/// 0-2): the request, queued for the guest to notify.
fn plug_block_3(mem: &GuestMem) {
    let base = hotplug_base(RAM);
    let (t, a, _) = rings(0);
    let ram = mem.memory().memory();
    ram.write_obj(0u16, GuestAddress(BUFFERS)).unwrap();
    ram.write_obj(base + 3 * (2 << 20), GuestAddress(BUFFERS + 8))
        .unwrap();
    ram.write_obj(1u16, GuestAddress(BUFFERS + 16)).unwrap();
    drop(ram);
    put_desc(mem, t, 0, (BUFFERS, 24, VRING_DESC_F_NEXT, 1));
    put_desc(mem, t, 1, (BUFFERS + 0x800, 10, VRING_DESC_F_WRITE, 0));
    publish(mem, a, &[0]);
}

/// Notifies the plug of [`plug_block_3`], uses the plugged block, then
/// writes and reads blocks 0-2, 5 and 40, which it never plugged.
fn touch_unplugged_blocks() -> Vec<Op> {
    let base = hotplug_base(RAM);
    let (t, a, u) = rings(0);
    let mut ops = start_device(VMEM, 1 << 32, &[(0, 16, t, a, u)]);
    ops.push(Op::Write(4, reg(VMEM, m::VIRTIO_MMIO_QUEUE_NOTIFY), 0));
    ops.push(Op::Wait16(u + 2, 1));
    // The plugged block is the guest's; the others are not.
    ops.push(Op::Write(8, base + 3 * (2 << 20), 0x1234));
    ops.push(Op::Expect32(base + 3 * (2 << 20), 0x1234));
    for block in [0u64, 1, 2, 5, 40] {
        for page in (0..(2 << 20)).step_by(64 << 10) {
            ops.push(Op::Write(8, base + block * (2 << 20) + page, u64::MAX));
            ops.push(Op::Read(8, base + block * (2 << 20) + page));
        }
    }
    ops.push(Op::End);
    ops
}

/// Churn: plug and unplug requests the script makes.
const CHURN_ROUNDS: u64 = 64;

/// One request chain for the churn, reused for every request: the request
/// at `BUFFERS`, the answer at `BUFFERS + 0x800`.
fn churn_descriptors(mem: &GuestMem) {
    let (t, _, _) = rings(0);
    put_desc(mem, t, 0, (BUFFERS, 24, VRING_DESC_F_NEXT, 1));
    put_desc(mem, t, 1, (BUFFERS + 0x800, 10, VRING_DESC_F_WRITE, 0));
}

/// Plugs block 1 and writes it, then [`CHURN_ROUNDS`] times plugs another
/// block, writes and reads it, unplugs it and reads block 1 back: every
/// plugged block must stay reachable and keep its contents while its
/// neighbours come and go.
fn churn_script() -> Vec<Op> {
    const BLOCK: u64 = 2 << 20;
    const PLUG: u64 = 0;
    const UNPLUG: u64 = 1;
    let base = hotplug_base(RAM);
    let (t, a, u) = rings(0);
    let mut ops = start_device(VMEM, 1 << 32, &[(0, 16, t, a, u)]);
    let notify = reg(VMEM, m::VIRTIO_MMIO_QUEUE_NOTIFY);
    let mut sent = 0u16;
    let mut ask = |ops: &mut Vec<Op>, kind: u64, block: u64| {
        ops.push(Op::Write(2, BUFFERS, kind));
        ops.push(Op::Write(8, BUFFERS + 8, base + block * BLOCK));
        ops.push(Op::Write(2, BUFFERS + 16, 1));
        ops.push(Op::Write(4, BUFFERS + 0x800, u64::from(u32::MAX)));
        ops.push(Op::Write(2, a + 4 + 2 * u64::from(sent % 16), 0));
        ops.push(Op::Add16(a + 2, 1));
        ops.push(Op::Write(4, notify, 0));
        sent += 1;
        ops.push(Op::Wait16(u + 2, sent));
        // ACK (type 0, then padding).
        ops.push(Op::Expect32(BUFFERS + 0x800, 0));
    };
    let kept = base + BLOCK + 0x1000;
    ask(&mut ops, PLUG, 1);
    ops.push(Op::Write(4, kept, 0x6b65_7074));
    // Block 1 is in: a second vCPU may fill it now.
    ops.push(Op::Write(2, KEPT_PLUGGED, 1));
    for round in 0..CHURN_ROUNDS {
        let block = 2 + round % 8;
        let at = base + block * BLOCK + (round % 512) * 4096;
        ask(&mut ops, PLUG, block);
        ops.push(Op::Write(4, at, round + 1));
        ops.push(Op::Expect32(at, round as u32 + 1));
        ask(&mut ops, UNPLUG, block);
        ops.push(Op::Expect32(kept, 0x6b65_7074));
    }
    ops.push(Op::Write(2, CHURN_DONE, 1));
    ops.push(Op::End);
    ops
}

/// The word the churn sets once its kept block (block 1) is plugged.
const KEPT_PLUGGED: u64 = BUFFERS + 0x1000;
/// The word the churn sets when it is done.
const CHURN_DONE: u64 = BUFFERS + 0x1008;

/// Read-back sweeps of the kept block by [`kept_block_filler`].
const FILLER_SWEEPS: u64 = 32;

/// A second vCPU beside the churn: once block 1 is plugged, writes a word
/// into each of its 4 KiB pages (each one's first touch a fault, served
/// while the neighbouring blocks' protections change, their mappings
/// split from and merged with this block's), then reads them all back,
/// [`FILLER_SWEEPS`] times, and waits for the churn to end (a payload VM
/// runs until every vCPU is done). A page of the block left unreachable
/// stops the VM; a lost write fails the script.
fn kept_block_filler() -> Vec<Op> {
    const BLOCK: u64 = 2 << 20;
    let block = hotplug_base(RAM) + BLOCK;
    let word = |page: u64| block + page * 4096 + 8;
    let mut ops = vec![Op::Wait16(KEPT_PLUGGED, 1)];
    ops.extend((0..BLOCK / 4096).map(|p| Op::Write(4, word(p), 0x1000 + p)));
    let check = ops.len();
    ops.extend((0..BLOCK / 4096).map(|p| Op::Expect32(word(p), 0x1000 + p as u32)));
    ops.push(Op::Repeat {
        to: check,
        times: FILLER_SWEEPS - 1,
    });
    ops.push(Op::Wait16(CHURN_DONE, 1));
    ops.push(Op::End);
    ops
}

/// After the churn: it ran to its end, every request answered, and the
/// host backs the kept block only.
fn churned(s: &Seen) -> Result<(), String> {
    // Every block the guests touched was plugged: no stop for an
    // unplugged touch (which the run itself lets pass under protection).
    if !matches!(s.outcome.reason, ExitReason::PayloadDone { code: 0, .. }) {
        return Err(format!("the run ended with {}", s.outcome.reason));
    }
    window_backs_one_block(s)?;
    let (plugs, unplugs) = (
        s.vmem.plugs.load(Ordering::Relaxed),
        s.vmem.unplugs.load(Ordering::Relaxed),
    );
    if (plugs, unplugs) != (CHURN_ROUNDS + 1, CHURN_ROUNDS) {
        return Err(format!(
            "{plugs} plugs and {unplugs} unplugs acknowledged, expected {} and {CHURN_ROUNDS}",
            CHURN_ROUNDS + 1
        ));
    }
    Ok(())
}

/// The host backs at most the one block [`plug_block_3`] plugged.
fn window_backs_one_block(s: &Seen) -> Result<(), String> {
    let window = s.vm_mem.regions().last().expect("the window");
    let allocated = window.backing().allocated_bytes().unwrap_or(u64::MAX);
    if allocated > 2 << 20 {
        return Err(format!(
            "the host backs {} KiB of the window for one plugged block",
            allocated >> 10
        ));
    }
    Ok(())
}
