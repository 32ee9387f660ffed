//! The sleep control/status register of a hardware-reduced ACPI platform.
//!
//! Without the fixed PM1 register blocks, the FADT points the guest at two
//! 8-bit registers instead (ACPI 6.x, 4.8.3.7 and 4.8.3.8). This device
//! implements both at one I/O port: writes are the sleep control register,
//! reads the sleep status register. Linux enters S5 (power off) by writing
//! `SLP_EN | (SLP_TYP << 2)` with the `SLP_TYP` of the DSDT's `_S5_` object;
//! this device turns that into an eventfd signal for the VMM.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::state::{check_version, StateError};

/// The version of [`AcpiSleepState`] this build writes and reads.
pub const ACPI_SLEEP_STATE_VERSION: u32 = 1;

/// The saved state of [`AcpiSleep`]: nothing but its version (the register
/// reads zero and a write acts at once), kept so that every device has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiSleepState {
    /// [`ACPI_SLEEP_STATE_VERSION`].
    pub version: u32,
}

/// `SLP_EN` in the sleep control register: enter the sleep state now.
const SLP_EN: u8 = 1 << 5;
/// Position of the 3-bit `SLP_TYP` field in the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
/// Mask of `SLP_TYP` once shifted down.
const SLP_TYP_MASK: u8 = 0x7;

/// The hardware-reduced ACPI sleep control/status register. A guest write
/// of `SLP_EN` with `SLP_TYP` [`AcpiSleep::S5_SLP_TYP`] (S5, soft-off)
/// signals the power-off eventfd; every other write is ignored. Reads return
/// 0 (no wake status).
pub struct AcpiSleep {
    power_off: EventFd,
}

impl AcpiSleep {
    /// Its I/O port (what the FADT's sleep control and status registers say).
    pub const BASE: u64 = 0x3c0;
    /// One port.
    pub const LEN: u64 = 1;
    /// The `SLP_TYP` value for S5 (must match the DSDT's `_S5_` package).
    pub const S5_SLP_TYP: u8 = 5;

    /// A register that signals `power_off` when the guest enters S5.
    pub fn new(power_off: EventFd) -> Self {
        AcpiSleep { power_off }
    }

    /// Its state, for a snapshot.
    pub fn save(&self) -> AcpiSleepState {
        AcpiSleepState {
            version: ACPI_SLEEP_STATE_VERSION,
        }
    }

    /// A sleep register as `state` left it, signalling `power_off`.
    pub fn restore(power_off: EventFd, state: &AcpiSleepState) -> Result<Self, StateError> {
        check_version("acpi sleep", state.version, ACPI_SLEEP_STATE_VERSION)?;
        Ok(AcpiSleep::new(power_off))
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS clear, nothing else implemented.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else {
            log::debug!(
                "acpi sleep: ignoring {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        if offset != 0 {
            return;
        }
        let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if value & SLP_EN != 0 && slp_typ == Self::S5_SLP_TYP {
            log::info!("acpi sleep: guest entered S5, powering off");
            if let Err(e) = self.power_off.write(1) {
                log::error!("acpi sleep: signalling power-off failed: {e}");
            }
        } else {
            log::debug!("acpi sleep: ignoring write of {value:#04x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiSleep, EventFd) {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = AcpiSleep::new(fd.try_clone().unwrap());
        (dev, fd)
    }

    fn signalled(fd: &EventFd) -> bool {
        match fd.read() {
            Ok(n) => n > 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("eventfd read: {e}"),
        }
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, fd) = device();
        // What Linux's acpi_hw_extended_sleep writes for SLP_TYP 5.
        dev.write(0, &[0x34]);
        assert!(signalled(&fd));
        assert!(!signalled(&fd));
    }

    #[test]
    fn other_writes_are_ignored() {
        let (mut dev, fd) = device();
        // S5 without SLP_EN, SLP_EN with SLP_TYP 1, clearing WAK_STS.
        for v in [0x14, 0x24, 0x80, 0x00, 0x20] {
            dev.write(0, &[v]);
            assert!(!signalled(&fd), "value {v:#x}");
        }
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut dev, fd) = device();
        dev.write(0, &[0x34, 0x34]);
        dev.write(0, &[0x34, 0, 0, 0]);
        dev.write(0, &[]);
        dev.write(3, &[0x34]);
        assert!(!signalled(&fd));

        let mut buf = [0xffu8; 4];
        dev.read(0, &mut buf);
        assert_eq!(buf, [0; 4]);
        let mut one = [0xffu8];
        dev.read(0, &mut one);
        assert_eq!(one, [0]);
        dev.read(0, &mut []);
    }
}
