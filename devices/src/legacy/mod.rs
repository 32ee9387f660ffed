//! Legacy PC devices: the 8250 serial console, the i8042 (for reset) and a
//! CMOS clock (so that Linux finds an RTC instead of probing for seconds).

mod acpi_sleep;
mod cmos;
mod i8042;
mod serial;

pub use acpi_sleep::{AcpiSleep, AcpiSleepState, ACPI_SLEEP_STATE_VERSION};
pub use cmos::{Cmos, CmosState, CMOS_STATE_VERSION};
pub use i8042::{I8042State, I8042, I8042_STATE_VERSION};
pub use serial::{EventFdTrigger, SerialConsole, SerialConsoleState, SERIAL_STATE_VERSION};
