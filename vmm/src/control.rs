//! Requests that change a running VM as a whole (pause, resume, snapshot),
//! carried from whoever asks (the API thread, an embedder) to the event
//! loop, which alone owns the vCPU gate and the devices' event processing:
//! between two rounds of queue notifications no device is halfway through
//! a chain, so that is where a snapshot is taken.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// What to do to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest {
    /// Park every vCPU and stop serving queue notifications.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Save the paused VM to a new directory.
    Snapshot(PathBuf),
    /// End the VM (paused or running), as a stop signal does.
    Stop,
}

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are parked; the VM can be saved.
    Paused,
    /// The VM has stopped (or is stopping).
    Stopped,
}

/// Why a request was not carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// Not in this state (a snapshot of a running VM): 409.
    #[error("{0}")]
    Conflict(String),
    /// A bad argument (a directory that exists): 400.
    #[error("{0}")]
    Invalid(String),
    /// It was tried and failed: 500.
    #[error("{0}")]
    Failed(String),
}

type Reply = mpsc::Sender<Result<(), ControlError>>;

/// Where the answer to one request goes.
pub struct Answer(Reply);

impl Answer {
    /// Answers the request (the asker may have given up waiting).
    pub fn send(self, r: Result<(), ControlError>) {
        let _ = self.0.send(r);
    }
}

/// The handle that asks; cheap to share.
pub struct VmControl {
    tx: Mutex<mpsc::Sender<(ControlRequest, Reply)>>,
    wake: EventFd,
    state: Arc<AtomicU8>,
    wakeups: Arc<AtomicU64>,
}

/// The event loop's end.
pub struct ControlInbox {
    rx: mpsc::Receiver<(ControlRequest, Reply)>,
    /// Written on every request, so that the loop wakes at once.
    pub wake: EventFd,
    state: Arc<AtomicU8>,
    wakeups: Arc<AtomicU64>,
}

fn encode(s: RunState) -> u8 {
    s as u8
}

fn decode(v: u8) -> RunState {
    match v {
        0 => RunState::Running,
        1 => RunState::Paused,
        _ => RunState::Stopped,
    }
}

/// A connected pair.
pub fn channel() -> std::io::Result<(Arc<VmControl>, ControlInbox)> {
    let (tx, rx) = mpsc::channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    let state = Arc::new(AtomicU8::new(encode(RunState::Running)));
    let wakeups = Arc::new(AtomicU64::new(0));
    Ok((
        Arc::new(VmControl {
            tx: Mutex::new(tx),
            wake: wake.try_clone()?,
            state: state.clone(),
            wakeups: wakeups.clone(),
        }),
        ControlInbox {
            rx,
            wake,
            state,
            wakeups,
        },
    ))
}

impl VmControl {
    /// Asks for `req` and waits up to `timeout` for it to be carried out.
    pub fn request(&self, req: ControlRequest, timeout: Duration) -> Result<(), ControlError> {
        let (reply, answer) = mpsc::channel();
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((req, reply));
        if sent.is_err() {
            return Err(ControlError::Conflict("the VM has stopped".into()));
        }
        let _ = self.wake.write(1);
        match answer.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ControlError::Failed(format!(
                "no answer within {timeout:?} (the request may still complete)"
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(ControlError::Conflict("the VM has stopped".into()))
            }
        }
    }

    /// The VM's state as the event loop last set it.
    pub fn state(&self) -> RunState {
        decode(self.state.load(Ordering::Acquire))
    }

    /// How many times the event loop has woken up: only for something to
    /// do (an idle VM's loop sleeps).
    pub fn event_loop_wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
}

impl ControlInbox {
    /// The next request, if one is waiting.
    pub fn next(&self) -> Option<(ControlRequest, Answer)> {
        let _ = self.wake.read();
        self.rx
            .try_recv()
            .ok()
            .map(|(req, reply)| (req, Answer(reply)))
    }

    /// Counts one wake-up of the event loop.
    pub fn count_wakeup(&self) {
        self.wakeups.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes the VM's state.
    pub fn set_state(&self, s: RunState) {
        self.state.store(encode(s), Ordering::Release);
    }
}
