use serde::{Deserialize, Serialize};
use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::bus::BusDevice;
use crate::state::{check_version, StateError};

/// The version of [`I8042State`] this build writes and reads.
pub const I8042_STATE_VERSION: u32 = 1;

/// The saved state of the [`I8042`]: nothing but its version (the device
/// only forwards a reset command), kept so that every device has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// [`I8042_STATE_VERSION`].
    pub version: u32,
}

/// The keyboard controller, present so that the guest can reset the machine
/// (command 0xFE on port 0x64), which the VMM treats as the guest stopping.
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// Its port base (0x60; the command port is base + 4).
    pub const BASE: u64 = 0x60;
    /// Ports 0x60..=0x64.
    pub const LEN: u64 = 5;

    /// A controller that signals `reset` when the guest asks for a reset.
    pub fn new(reset: EventFd) -> Self {
        I8042 {
            dev: I8042Device::new(EventFdTrigger(reset)),
        }
    }

    /// Its state, for a snapshot.
    pub fn save(&self) -> I8042State {
        I8042State {
            version: I8042_STATE_VERSION,
        }
    }

    /// A controller as `state` left it, signalling `reset`.
    pub fn restore(reset: EventFd, state: &I8042State) -> Result<Self, StateError> {
        check_version("i8042", state.version, I8042_STATE_VERSION)?;
        Ok(I8042::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 {
            data[0] = self.dev.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            if let Err(e) = self.dev.write(offset as u8, data[0]) {
                log::warn!("i8042: signalling reset failed: {e:?}");
            }
        }
    }
}
