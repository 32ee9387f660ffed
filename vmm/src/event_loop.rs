//! Running a VM: the vCPU threads, the event loop that serves virtio
//! notifications and watches for the guest (or the host) stopping the VM,
//! the control API beside it, and the teardown.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::api::{ApiContext, ApiServer, VirtioTransport};
use crate::control::{ControlError, ControlRequest, RunState};
use crate::device_manager::DeviceManager;
use crate::error::{io_err, VmError};
use crate::exit::ExitReason;
use crate::kvm_vm;
use crate::seccomp::{install, ThreadKind};
use crate::signals::ShutdownSignals;
use crate::snapshot::{MachineConfig, MemoryState, SnapshotWriter, VmSnapshot};
use crate::vcpu::{self, VcpuContext};
use crate::vcpu_gate::VcpuGate;
use crate::vm::Vm;

/// How long [`Vm::run`] waits for the VM to stop after guest memory could
/// not be served before it ends the process.
pub const FAILURE_GRACE: Duration = Duration::from_secs(5);
/// How often the caller of [`Vm::run`] looks for such a failure.
const FAILURE_CHECK: Duration = Duration::from_secs(1);

/// Wakes the event loop when the guest resets (i8042) or powers off
/// (ACPI sleep register), a vCPU stops, or the VMM gets a stop signal.
struct ExitWatcher {
    reset: EventFd,
    power_off: EventFd,
    exited: EventFd,
    signals: Option<ShutdownSignals>,
    /// Guest memory the fault handler could not serve: the VM stops.
    fault_failure: Option<Arc<guest_mem::FaultFailure>>,
    /// A pause, resume or snapshot request waits (the loop reads it).
    control: EventFd,
    fired: Option<ExitReason>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for (evt, data) in [(&self.reset, 0), (&self.power_off, 1), (&self.exited, 2)] {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("watching VM exit events: {e:?}");
            }
        }
        if let Some(s) = &self.signals {
            if let Err(e) = ops.add(Events::with_data(s, 3, EventSet::IN)) {
                log::error!("watching the stop signals: {e:?}");
            }
        }
        if let Some(f) = &self.fault_failure {
            if let Err(e) = ops.add(Events::with_data_raw(f.event_fd(), 4, EventSet::IN)) {
                log::error!("watching fault handler failures: {e:?}");
            }
            if let Err(e) = ops.add(Events::with_data_raw(f.poison_event_fd(), 6, EventSet::IN)) {
                log::error!("watching poisoned pages: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.control, 5, EventSet::IN)) {
            log::error!("watching control requests: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            0 => {
                let _ = self.reset.read();
                self.fired.get_or_insert(ExitReason::Reset);
            }
            1 => {
                let _ = self.power_off.read();
                self.fired.get_or_insert(ExitReason::PowerOff);
            }
            3 => {
                while let Some(n) = self.signals.as_ref().and_then(ShutdownSignals::read) {
                    log::info!("{}: stopping the VM", crate::signals::signal_name(n));
                    self.fired.get_or_insert(ExitReason::Signal(n));
                }
            }
            4 => {
                if let Some(f) = &self.fault_failure {
                    f.acknowledge();
                    let why = f.message().unwrap_or_else(|| "unknown".into());
                    self.fired.get_or_insert(ExitReason::Error(format!(
                        "guest memory could not be served: {why}"
                    )));
                }
            }
            // The loop reads the control requests (and their eventfd).
            5 => {}
            // A page that could not be served was poisoned: the guest gets
            // a machine check when it touches it; the VM goes on.
            6 => {
                if let Some(f) = &self.fault_failure {
                    f.acknowledge_poisoned();
                    log::warn!(
                        "guest memory: {} page(s) poisoned so far (not served; a vCPU that \
                         touches one gets a machine check)",
                        f.poisoned_count()
                    );
                }
            }
            _ => {
                let _ = self.exited.read();
            }
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why each vCPU stopped (index = vCPU id), or why the VM did.
    pub reasons: Vec<ExitReason>,
    /// The first reason that stopped the VM.
    pub reason: ExitReason,
    /// Port and MMIO accesses no device claimed.
    pub unhandled_io: u64,
}

impl Vm {
    /// Runs the vCPUs until the guest stops (Linux: the first vCPU that
    /// stops, or an i8042 reset, ends the VM; payloads: every vCPU reports,
    /// or one fails). The event loop of the virtio queue notifications runs
    /// on a thread of its own (`vmm-events`), so that its seccomp filter
    /// does not confine the caller; the control API, if any, runs on
    /// another (`api`). Both are stopped before this returns.
    ///
    /// Guest memory the fault handler cannot serve stops the VM through the
    /// event loop. Should the event loop itself be stuck on such a page (a
    /// device reading a queue from it), nothing else could stop the VM: if
    /// it has not stopped [`FAILURE_GRACE`] after the failure, the process
    /// exits with the failure's message and status 1.
    pub fn run(self) -> Result<RunOutcome, VmError> {
        let failure = self.mem.fault_failure().cloned();
        let (tx, rx) = mpsc::channel();
        let events = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                let _ = tx.send(self.run_events());
            })
            .map_err(io_err("spawning the event loop thread"))?;
        // The outcome arrives the moment the event loop ends; meanwhile the
        // caller looks at the failure count once a second (a VM whose
        // memory the kernel serves cannot fail so: it just waits).
        let mut failed_at = None;
        let outcome = loop {
            let got = if failure.is_some() {
                rx.recv_timeout(FAILURE_CHECK)
            } else {
                rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            };
            match got {
                Ok(outcome) => break outcome,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Err(VmError::Config("the event loop thread panicked".into()))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let Some(f) = failure.as_ref().filter(|f| f.count() > 0) else {
                continue;
            };
            let since = *failed_at.get_or_insert_with(Instant::now);
            if since.elapsed() > FAILURE_GRACE {
                if let Ok(outcome) = rx.try_recv() {
                    break outcome; // it stopped after all
                }
                let why = f.message().unwrap_or_default();
                eprintln!(
                    "vmm: guest memory could not be served ({why}) and the VM did not stop \
                     within {} s; exiting",
                    FAILURE_GRACE.as_secs()
                );
                std::process::exit(1);
            }
        };
        let _ = events.join();
        outcome
    }

    fn run_events(self) -> Result<RunOutcome, VmError> {
        static SIGNAL: Once = Once::new();
        SIGNAL.call_once(|| {
            extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
            if let Err(e) = register_signal_handler(SIGRTMIN(), kick) {
                log::error!("registering the vCPU kick signal failed: {e}");
            }
        });
        // A poisoned guest page: a machine check for a vCPU, a clear exit
        // for any other thread (see crate::sigbus).
        if let Err(e) = crate::sigbus::install() {
            log::error!("installing the SIGBUS handler failed: {e}");
        }
        let Vm {
            vcpus,
            fd,
            mem,
            mce,
            devices:
                DeviceManager {
                    legacy,
                    pio,
                    mmio,
                    console,
                    reset_evt,
                    power_off_evt,
                    virtio,
                    balloon,
                    hotplug,
                },
            payload,
            vcpu_count,
            ram_size,
            backend_desc,
            api_socket,
            api_config,
            shutdown,
            seccomp,
            machine,
            msrs,
            control,
            inbox,
            ..
        } = self;
        let io = |what: &str| {
            let what = what.to_string();
            move |source| VmError::Io { what, source }
        };
        let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| VmError::Config(format!("creating the event loop: {e:?}")))?;
        let transports: Vec<VirtioTransport> = virtio
            .iter()
            .map(|slot| {
                let t = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
                VirtioTransport {
                    name: VirtioTransport::device_name(t.device().device_type()),
                    mmio_base: slot.base,
                    transport: slot.transport.clone(),
                }
            })
            .collect();
        let device_transports: Vec<_> = virtio.iter().map(|s| s.transport.clone()).collect();
        for slot in virtio {
            events.add_subscriber(Arc::new(Mutex::new(slot)));
        }
        let writer = SnapshotWriter::spawn(mem.clone(), seccomp)
            .map_err(io("spawning the snapshot thread"))?;
        // Dropping the handle (also on the error returns below) stops the
        // thread and removes the socket.
        let api = match &api_socket {
            Some(path) => {
                let ctx = Arc::new(ApiContext {
                    mem: mem.clone(),
                    vcpus: vcpu_count,
                    memory: ram_size,
                    backend: backend_desc,
                    balloon,
                    hotplug,
                    virtio: transports,
                    control: Some(control.clone()),
                });
                let server = ApiServer::with_config(path, ctx, api_config)
                    .map_err(io(&format!("creating the API socket {}", path.display())))?;
                Some(
                    server
                        .spawn_sandboxed(seccomp)
                        .map_err(io("spawning the API thread"))?,
                )
            }
            None => None,
        };
        let _ram = crate::sigbus::add_guest_ram(
            mem.regions()
                .iter()
                .map(|r| (r.host_addr(), r.max_size(), r.guest_base().0)),
        );
        let exited = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        let watcher = Arc::new(Mutex::new(ExitWatcher {
            reset: reset_evt,
            power_off: power_off_evt,
            exited: exited.try_clone().map_err(io("eventfd"))?,
            signals: shutdown,
            fault_failure: mem.fault_failure().cloned(),
            control: inbox.wake.try_clone().map_err(io("eventfd"))?,
            fired: None,
        }));
        events.add_subscriber(watcher.clone());

        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(VcpuGate::new(vcpus.len()));
        let (tx, rx) = mpsc::channel::<(u8, ExitReason)>();
        log::debug!("starting the vCPUs");
        let mut handles = Vec::new();
        for (id, mut v) in vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                id: id as u8,
                pio: pio.clone(),
                mmio: mmio.clone(),
                stop: stop.clone(),
                gate: gate.clone(),
                console: Some(console.clone()),
                payload,
                mce,
                mem: mem.clone(),
            };
            let tx = tx.clone();
            let exited = exited.try_clone().map_err(io("eventfd"))?;
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let _sigbus = crate::sigbus::register_vcpu();
                    let reason = match seccomp.then(|| install(ThreadKind::Vcpu)) {
                        Some(Err(e)) => ExitReason::Error(format!("vCPU {id}: {e}")),
                        _ => vcpu::run(&mut v, &ctx),
                    };
                    ctx.gate.exited(usize::from(ctx.id));
                    let _ = tx.send((ctx.id, reason));
                    let _ = exited.write(1);
                })
                .map_err(io("spawning a vCPU thread"))?;
            handles.push(h);
        }
        drop(tx);
        let n = handles.len();
        let mut reasons: Vec<Option<ExitReason>> = vec![None; n];
        let mut first: Option<ExitReason> = None;
        // Everything that opens, maps or spawns is done: from here on the
        // loop only serves the guest and tears the VM down.
        if seccomp {
            if let Err(e) = install(ThreadKind::EventLoop) {
                first = Some(ExitReason::Error(e.to_string()));
            }
        }
        // A restored driver may have published chains whose notification
        // went with the old process: serve every running queue once (a
        // booted VM's devices are not running yet: nothing to do).
        for t in &device_transports {
            t.lock().unwrap_or_else(|p| p.into_inner()).kick_queues();
        }
        let mut done = 0;
        // Every way out and every request arrives as an event (an eventfd
        // or the signal fd): the loop sleeps until one does, so an idle VM
        // costs no wake-ups (each one an interrupt, and an exit for a guest
        // running on the same CPU).
        while done < n && first.is_none() {
            if let Err(e) = events.run() {
                log::error!("event loop: {e:?}");
            }
            inbox.count_wakeup();
            while let Some((req, reply)) = inbox.next() {
                if req == ControlRequest::Stop {
                    log::info!("stopping the VM on request");
                    first.get_or_insert(ExitReason::Stopped);
                    reply.send(Ok(()));
                    continue;
                }
                let ctl = Controlled {
                    gate: &gate,
                    handles: &handles,
                    fd: &fd,
                    msrs: &msrs,
                    machine: &machine,
                    legacy: &legacy,
                    transports: &device_transports,
                    writer: &writer,
                };
                let r = ctl.carry_out(req, &mut events);
                inbox.set_state(if gate.is_closed() {
                    RunState::Paused
                } else {
                    RunState::Running
                });
                reply.send(r);
            }
            let requested = watcher
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fired
                .take();
            while let Ok((id, reason)) = rx.try_recv() {
                done += 1;
                let ends_vm = !payload || !reason.is_clean();
                if ends_vm && first.is_none() {
                    first = Some(reason.clone());
                }
                reasons[usize::from(id)] = Some(reason);
            }
            if first.is_none() {
                first = requested;
            }
        }
        // No more requests while the VM stops; the socket goes.
        if let Some(api) = api {
            api.stop();
        }
        // Stop whatever still runs: flag, then kick until every thread is out.
        inbox.set_state(RunState::Stopped);
        stop.store(true, Ordering::Release);
        gate.wake_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        while done < n && Instant::now() < deadline {
            for h in &handles {
                if !h.is_finished() {
                    let _ = h.kill(SIGRTMIN());
                }
            }
            if let Ok((id, reason)) = rx.recv_timeout(Duration::from_millis(10)) {
                reasons[usize::from(id)] = Some(reason);
                done += 1;
            }
        }
        // A vCPU that reported its reason is on its way out: join it. One
        // that never reported may still be in the guest.
        let mut stuck = 0;
        for (id, h) in handles.into_iter().enumerate() {
            if reasons[id].is_some() || h.is_finished() {
                let _ = h.join();
            } else {
                stuck += 1;
            }
        }
        if stuck > 0 {
            // A vCPU thread that did not stop may still enter the guest: its
            // memslots point into guest memory, which must stay mapped for
            // as long as it can run. Leak the mappings rather than unmap
            // them under it.
            log::error!("{stuck} vCPU thread(s) did not stop; guest memory stays mapped");
            std::mem::forget(mem.clone());
        }
        let _ = console.lock().map(|mut c| c.flush());
        let reasons: Vec<ExitReason> = reasons
            .into_iter()
            .map(|r| r.unwrap_or_else(|| ExitReason::Error("vCPU did not stop".into())))
            .collect();
        let reason = first.unwrap_or_else(|| {
            reasons
                .iter()
                .find(|r| !r.is_clean())
                .cloned()
                .unwrap_or_else(|| reasons[0].clone())
        });
        drop(events);
        drop(fd);
        drop(mem);
        Ok(RunOutcome {
            reasons,
            reason,
            unhandled_io: pio.unhandled() + mmio.unhandled(),
        })
    }
}

/// How long vCPUs get to park when the VM is paused.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

type Subscribers = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// What the event loop lends to carry out a control request.
struct Controlled<'a> {
    gate: &'a VcpuGate,
    handles: &'a [std::thread::JoinHandle<()>],
    fd: &'a kvm_ioctls::VmFd,
    msrs: &'a [u32],
    machine: &'a MachineConfig,
    legacy: &'a crate::device_manager::LegacyDevices,
    transports: &'a [Arc<Mutex<devices::virtio::mmio::MmioTransport>>],
    writer: &'a SnapshotWriter,
}

impl Controlled<'_> {
    fn carry_out(&self, req: ControlRequest, events: &mut Subscribers) -> Result<(), ControlError> {
        match req {
            ControlRequest::Pause => {
                if self.gate.is_closed() {
                    return Ok(());
                }
                self.gate
                    .pause(PAUSE_TIMEOUT, &|| {
                        for h in self.handles {
                            if !h.is_finished() {
                                let _ = h.kill(SIGRTMIN());
                            }
                        }
                    })
                    .map_err(|e| ControlError::Failed(e.to_string()))?;
                // Notifications the vCPUs made before they parked are
                // served now, so that a snapshot finds no chain published
                // and unseen. Nothing new comes while they are parked.
                if let Err(e) = events.run_with_timeout(0) {
                    log::error!("event loop: {e:?}");
                }
                log::info!("VM paused");
                Ok(())
            }
            // The loop itself ends the VM.
            ControlRequest::Stop => Ok(()),
            ControlRequest::Resume => {
                self.gate.resume();
                log::info!("VM resumed");
                Ok(())
            }
            ControlRequest::Snapshot(dir) => {
                if !self.gate.is_closed() {
                    return Err(ControlError::Conflict(
                        "the VM is running; pause it first (PUT /vm {\"state\": \"paused\"})"
                            .into(),
                    ));
                }
                let started = Instant::now();
                let vcpus = self
                    .gate
                    .save_states(self.msrs)
                    .map_err(|e| ControlError::Failed(e.to_string()))?;
                let kvm =
                    kvm_vm::save_state(self.fd).map_err(|e| ControlError::Failed(e.to_string()))?;
                let devices = crate::device_manager::save_devices(self.legacy, self.transports)
                    .map_err(ControlError::Failed)?;
                let snap = VmSnapshot {
                    machine: self.machine.clone(),
                    memory: MemoryState {
                        regions: Vec::new(),
                        file_len: 0,
                        data_bytes: 0,
                    },
                    vcpus,
                    kvm,
                    devices,
                };
                let w = self.writer.write(&dir, snap).map_err(|e| match e {
                    crate::snapshot::SnapshotError::Invalid { .. } => {
                        ControlError::Invalid(e.to_string())
                    }
                    e => ControlError::Failed(e.to_string()),
                })?;
                log::info!(
                    "snapshot {}: {} MiB of memory, {} KiB of state, {:.2} s",
                    dir.display(),
                    w.memory_bytes >> 20,
                    w.state_bytes >> 10,
                    started.elapsed().as_secs_f64()
                );
                Ok(())
            }
        }
    }
}
