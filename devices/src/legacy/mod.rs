//! Legacy PC devices: the 8250 serial console, the i8042 (for reset) and a
//! CMOS clock (so that Linux finds an RTC instead of probing for seconds).

mod acpi_sleep;
mod cmos;
mod i8042;
mod serial;

pub use acpi_sleep::AcpiSleep;
pub use cmos::Cmos;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialConsole};
