use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::state::{check_version, StateError};

/// The version of [`SerialConsoleState`] this build writes and reads.
pub const SERIAL_STATE_VERSION: u32 = 1;
/// Bytes the UART's receive FIFO holds.
const FIFO_SIZE: usize = 64;

/// Raises an interrupt by writing to an eventfd (wired to an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550A UART whose output goes to a writer (stdout or a file).
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// The standard COM1 port base.
    pub const COM1: u64 = 0x3f8;
    /// The standard COM1 interrupt line.
    pub const COM1_IRQ: u32 = 4;

    /// A UART raising `irq` and writing its output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn save(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            version: SERIAL_STATE_VERSION,
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART as `state` left it, raising `irq` and writing to `out`. An
    /// interrupt the state has pending is raised again.
    pub fn restore(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        state: &SerialConsoleState,
    ) -> Result<Self, StateError> {
        check_version("serial", state.version, SERIAL_STATE_VERSION)?;
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(StateError::invalid(
                "serial",
                format!(
                    "{} bytes of input, the FIFO holds {FIFO_SIZE}",
                    state.in_buffer.len()
                ),
            ));
        }
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, EventFdTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| StateError::invalid("serial", format!("{e:?}")))?;
        Ok(SerialConsole { uart })
    }
}

/// The saved state of a [`SerialConsole`]: vm-superio's `SerialState`, as
/// `serde` can write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// [`SERIAL_STATE_VERSION`].
    pub version: u32,
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input the guest has not read yet (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> SerialConsole {
        SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Box::new(std::io::sink()),
        )
    }

    #[test]
    fn registers_survive_save_and_restore() {
        let mut c = console();
        c.write(7, &[0x5a]); // scratch
        c.write(3, &[0x83]); // DLAB on, 8 bits
        c.write(0, &[0x0c]); // divisor low: 9600 baud
        c.write(3, &[0x03]);
        c.write(1, &[0x01]); // receive interrupts on
        let saved = c.save();
        let json = serde_json::to_string(&saved).unwrap();
        let state: SerialConsoleState = serde_json::from_str(&json).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r = SerialConsole::restore(irq, Box::new(std::io::sink()), &state).unwrap();
        assert_eq!(r.save(), saved);
        for offset in [1, 3, 7] {
            let (mut a, mut b) = ([0u8], [0u8]);
            c.read(offset, &mut a);
            r.read(offset, &mut b);
            assert_eq!(a, b, "register {offset}");
        }
    }

    #[test]
    fn bad_states_are_refused() {
        let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = console().save();
        s.in_buffer = vec![0; FIFO_SIZE + 1];
        let e = SerialConsole::restore(irq(), Box::new(std::io::sink()), &s).err();
        assert!(matches!(e, Some(StateError::Invalid { .. })), "{e:?}");
        let mut s = console().save();
        s.version = 9;
        let e = SerialConsole::restore(irq(), Box::new(std::io::sink()), &s).err();
        assert!(
            matches!(e, Some(StateError::Version { found: 9, .. })),
            "{e:?}"
        );
    }
}
