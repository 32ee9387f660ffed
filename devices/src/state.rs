//! Saved device state, for whole-VM snapshots.
//!
//! Each device saves a plain `serde` struct of its own, next to its code
//! (`SerialConsoleState`, `CmosState`, `MmioTransportState`,
//! `BalloonDeviceState`, `VirtioMemDeviceState`, ...), with a `version`
//! field, and restores from one. The VMM stores them in its JSON state
//! file. A state file is untrusted input (a snapshot may come from anywhere
//! and be corrupt): every restore validates what it is given against the
//! device it restores into and answers a [`StateError`], never a panic.
//!
//! A virtio device's state travels inside its transport's, as a
//! `serde_json::Value` ([`VirtioDevice::save_state`] and
//! [`VirtioDevice::restore_state`](crate::virtio::VirtioDevice::restore_state)),
//! rather than as a closed enum of the devices this crate has: the
//! transport stays ignorant of device kinds, a device from another crate
//! saves its state the same way, and the file stays self-describing. Each
//! device parses the value into its own typed struct and checks it.
//!
//! [`VirtioDevice::save_state`]: crate::virtio::VirtioDevice::save_state

use serde::de::DeserializeOwned;

/// Why a saved state was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A state of a version this build does not read.
    #[error("{device}: state version {found}, this build reads version {expected}")]
    Version {
        /// The device.
        device: &'static str,
        /// The version in the state.
        found: u32,
        /// The version this build writes and reads.
        expected: u32,
    },
    /// A state that does not fit the device it is restored into, or is
    /// inconsistent in itself.
    #[error("{device}: {what}")]
    Invalid {
        /// The device.
        device: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A state that is not the device's state at all.
    #[error("{device}: malformed state: {source}")]
    Malformed {
        /// The device.
        device: &'static str,
        /// What the parser found.
        source: serde_json::Error,
    },
}

impl StateError {
    /// A state of `device` that is wrong in the way `what` says.
    pub fn invalid(device: &'static str, what: impl Into<String>) -> Self {
        StateError::Invalid {
            device,
            what: what.into(),
        }
    }
}

/// Refuses a state whose `found` version is not `expected`.
pub fn check_version(device: &'static str, found: u32, expected: u32) -> Result<(), StateError> {
    if found == expected {
        Ok(())
    } else {
        Err(StateError::Version {
            device,
            found,
            expected,
        })
    }
}

/// Parses `value` as `device`'s typed state.
pub fn parse<T: DeserializeOwned>(
    device: &'static str,
    value: &serde_json::Value,
) -> Result<T, StateError> {
    T::deserialize(value).map_err(|source| StateError::Malformed { device, source })
}

/// Declares `$state`, a `serde` copy of the counters struct `$counters`
/// (atomic `u64` fields `$field...`), with `save` and `restore` between
/// the two, so that a device's counters carry on across a snapshot.
macro_rules! saved_counters {
    ($(#[$doc:meta])* $state:ident for $counters:ty { $($field:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[allow(missing_docs)]
        pub struct $state {
            $(pub $field: u64,)*
        }

        impl $state {
            /// The counters' values now.
            pub fn save(c: &$counters) -> Self {
                $state {
                    $($field: c.$field.load(std::sync::atomic::Ordering::Relaxed),)*
                }
            }

            /// Sets the counters to the saved values.
            pub fn restore(&self, c: &$counters) {
                $(c.$field.store(self.$field, std::sync::atomic::Ordering::Relaxed);)*
            }
        }
    };
}
pub(crate) use saved_counters;
