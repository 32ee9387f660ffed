//! Why a VM stopped.

use std::fmt;

/// Why a vCPU (and with it the VM) stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (Linux `reboot`).
    Reset,
    /// The guest powered off (a KVM shutdown system event).
    PowerOff,
    /// A triple fault.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
        /// Where it was.
        rip: u64,
    },
    /// A guest crash event.
    Crash {
        /// The vCPU.
        vcpu: u8,
    },
    /// A vCPU halted with no interrupt controller to wake it.
    Halted {
        /// The vCPU.
        vcpu: u8,
    },
    /// A payload vCPU wrote its verdict to the exit port.
    PayloadDone {
        /// The vCPU.
        vcpu: u8,
        /// 0 for success.
        code: u32,
        /// rbx, rcx, rdx at the time (failure details).
        detail: [u64; 3],
    },
    /// The VMM stopped the vCPU.
    Stopped,
    /// The VMM was asked to stop (SIGTERM, SIGINT: see
    /// [`ShutdownSignals`](crate::signals::ShutdownSignals)).
    Signal(i32),
    /// Something went wrong.
    Error(String),
}

impl ExitReason {
    /// Whether this is how a guest ends a normal run.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::PayloadDone { code: 0, .. }
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "the guest reset the machine (i8042)"),
            ExitReason::PowerOff => write!(f, "the guest powered off"),
            ExitReason::TripleFault { vcpu, rip } => {
                write!(f, "triple fault on vCPU {vcpu} at rip {rip:#x}")
            }
            ExitReason::Crash { vcpu } => write!(f, "guest crash reported by vCPU {vcpu}"),
            ExitReason::Halted { vcpu } => write!(f, "vCPU {vcpu} halted"),
            ExitReason::PayloadDone { vcpu, code: 0, .. } => {
                write!(f, "payload on vCPU {vcpu} finished successfully")
            }
            ExitReason::PayloadDone { vcpu, code, detail } => write!(
                f,
                "payload on vCPU {vcpu} failed with code {code} \
                 (rbx={:#x} rcx={:#x} rdx={:#x})",
                detail[0], detail[1], detail[2]
            ),
            ExitReason::Stopped => write!(f, "stopped by the VMM"),
            ExitReason::Signal(n) => {
                write!(f, "stopped on {}", crate::signals::signal_name(*n))
            }
            ExitReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}
