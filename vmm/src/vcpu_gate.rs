//! Pausing vCPUs: a gate every vCPU thread passes before it enters the
//! guest. While the gate is closed a vCPU parks on it, with its pending
//! I/O completed, and carries out what the VMM asks of it there (saving
//! its state: the vCPU fd belongs to its thread).
//!
//! A vCPU inside `KVM_RUN` does not see the gate close: the closer kicks it
//! out with a signal (`EINTR`) until every vCPU has parked or exited. A
//! kick that lands just before a vCPU enters the guest is lost, so the
//! closer keeps kicking rather than kick once.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use crate::vcpu_state::{self, VcpuState};

/// Something a parked vCPU does on its own thread.
type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Default)]
struct GateState {
    closed: bool,
    /// Bumped on every close: a vCPU that parked for an earlier close does
    /// not count as parked for this one.
    epoch: u64,
    /// Per vCPU: the epoch it is parked in.
    parked: Vec<Option<u64>>,
    exited: Vec<bool>,
    jobs: Vec<Option<Job>>,
    /// Jobs taken and still running.
    busy: usize,
}

/// The gate of one VM's vCPUs.
pub struct VcpuGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

/// Why vCPUs could not be paused or asked.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Not every vCPU parked in time.
    #[error("{0} vCPU(s) did not pause within {1:?}")]
    Timeout(usize, Duration),
    /// The gate is open: the vCPUs run.
    #[error("the vCPUs are not paused")]
    NotPaused,
    /// A vCPU exited (the VM is stopping).
    #[error("vCPU {0} has exited")]
    Exited(usize),
    /// Saving a vCPU's state failed.
    #[error("vCPU {id}: {why}")]
    Save {
        /// The vCPU.
        id: usize,
        /// What failed.
        why: String,
    },
}

impl VcpuGate {
    /// An open gate for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        VcpuGate {
            state: Mutex::new(GateState {
                parked: vec![None; vcpus],
                exited: vec![false; vcpus],
                jobs: (0..vcpus).map(|_| None).collect(),
                ..Default::default()
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the gate is closed (the VM is paused or pausing).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Called by vCPU `id`'s thread before each entry into the guest:
    /// returns at once while the gate is open; otherwise completes the
    /// vCPU's pending I/O, parks it until the gate opens (or `stopping`
    /// says the VM ends), running the jobs it is given meanwhile.
    pub fn pass(&self, id: usize, vcpu: &mut VcpuFd, stopping: &dyn Fn() -> bool) {
        let mut s = self.lock();
        if !s.closed {
            return;
        }
        drop(s);
        // An exit for port or MMIO I/O is completed by the next KVM_RUN
        // (the read data is written back, rip moves on). With
        // immediate_exit set, KVM_RUN does only that and returns EINTR, so
        // the state a snapshot saves has the access done.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        s = self.lock();
        while s.closed && !stopping() {
            s.parked[id] = Some(s.epoch);
            if let Some(job) = s.jobs[id].take() {
                s.busy += 1;
                drop(s);
                job(vcpu);
                s = self.lock();
                s.busy -= 1;
                self.changed.notify_all();
                continue;
            }
            self.changed.notify_all();
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.parked[id] = None;
    }

    /// Marks vCPU `id` as gone for good (its thread returned).
    pub fn exited(&self, id: usize) {
        let mut s = self.lock();
        s.exited[id] = true;
        s.parked[id] = None;
        self.changed.notify_all();
    }

    /// Wakes parked vCPUs so that they look at the VM's stop flag.
    pub fn wake_all(&self) {
        self.changed.notify_all();
    }

    /// Closes the gate and waits until every vCPU that has not exited is
    /// parked, calling `kick` every 10 ms meanwhile (to get vCPUs out of
    /// `KVM_RUN`). On timeout the gate opens again.
    pub fn pause(&self, timeout: Duration, kick: &dyn Fn()) -> Result<(), GateError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        if !s.closed {
            s.closed = true;
            s.epoch += 1;
        }
        loop {
            let epoch = s.epoch;
            let missing = (0..s.parked.len())
                .filter(|&i| !s.exited[i] && s.parked[i] != Some(epoch))
                .count();
            if missing == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                s.closed = false;
                self.changed.notify_all();
                return Err(GateError::Timeout(missing, timeout));
            }
            drop(s);
            kick();
            s = self.lock();
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Opens the gate: parked vCPUs go back into the guest.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.closed = false;
        self.changed.notify_all();
    }

    /// Runs `job` on every parked vCPU's own thread and returns what each
    /// returned, in vCPU order. Every vCPU must be parked.
    fn on_each<T: Send + 'static>(
        &self,
        job: impl Fn(usize, &mut VcpuFd) -> T + Send + Sync + Clone + 'static,
    ) -> Result<Vec<T>, GateError> {
        let results: std::sync::Arc<Mutex<Vec<Option<T>>>> = Default::default();
        let mut s = self.lock();
        if !s.closed {
            return Err(GateError::NotPaused);
        }
        if let Some(id) = s.exited.iter().position(|&e| e) {
            return Err(GateError::Exited(id));
        }
        let n = s.parked.len();
        results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resize_with(n, || None);
        for id in 0..n {
            let (job, results) = (job.clone(), results.clone());
            s.jobs[id] = Some(Box::new(move |fd: &mut VcpuFd| {
                let r = job(id, fd);
                results.lock().unwrap_or_else(|p| p.into_inner())[id] = Some(r);
            }));
        }
        self.changed.notify_all();
        let done = |s: &GateState| s.busy == 0 && s.jobs.iter().all(Option::is_none);
        while !done(&s) {
            if let Some(id) = s.exited.iter().position(|&e| e) {
                s.jobs.iter_mut().for_each(|j| *j = None);
                return Err(GateError::Exited(id));
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(s);
        // A finished job stored its result before its vCPU relocked the
        // gate and lowered `busy`.
        let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
        Ok(r.iter_mut().filter_map(Option::take).collect())
    }

    /// Saves every (parked) vCPU's state, on its own thread.
    pub fn save_states(&self, msrs: &[u32]) -> Result<Vec<VcpuState>, GateError> {
        let msrs = std::sync::Arc::new(msrs.to_vec());
        self.on_each(move |id, fd| vcpu_state::save(fd, id as u8, &msrs))?
            .into_iter()
            .enumerate()
            .map(|(id, r)| {
                r.map_err(|e| GateError::Save {
                    id,
                    why: e.to_string(),
                })
            })
            .collect()
    }
}
