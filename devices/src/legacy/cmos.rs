use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::state::{check_version, StateError};

/// The version of [`CmosState`] this build writes and reads.
pub const CMOS_STATE_VERSION: u32 = 1;

/// The saved state of the [`Cmos`]: the selected index and the NVRAM (the
/// clock registers read the host's time, so they need no saving).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// [`CMOS_STATE_VERSION`].
    pub version: u32,
    /// The register the index port selected (0..=0x7f).
    pub index: u8,
    /// The 128 bytes of NVRAM.
    pub nvram: Vec<u8>,
}

/// A read-mostly MC146818 CMOS: the real-time clock in BCD from the host's
/// UTC clock, status registers that say "valid, not updating", and 128 bytes
/// of NVRAM. Writes to the clock are accepted and ignored.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// Ports 0x70 (index) and 0x71 (data).
    pub const BASE: u64 = 0x70;
    /// Two ports.
    pub const LEN: u64 = 2;

    /// A CMOS with zeroed NVRAM.
    pub fn new() -> Self {
        Cmos {
            index: 0,
            nvram: [0; 128],
        }
    }

    /// Its state, for a snapshot.
    pub fn save(&self) -> CmosState {
        CmosState {
            version: CMOS_STATE_VERSION,
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// A CMOS as `state` left it.
    pub fn restore(state: &CmosState) -> Result<Self, StateError> {
        check_version("cmos", state.version, CMOS_STATE_VERSION)?;
        let nvram = <[u8; 128]>::try_from(state.nvram.as_slice()).map_err(|_| {
            StateError::invalid(
                "cmos",
                format!("{} bytes of NVRAM, 128 expected", state.nvram.len()),
            )
        })?;
        if state.index > 0x7f {
            return Err(StateError::invalid(
                "cmos",
                format!("index {:#x} past 0x7f", state.index),
            ));
        }
        Ok(Cmos {
            index: state.index,
            nvram,
        })
    }

    fn register(&self, index: u8, now_secs: u64) -> u8 {
        let days = (now_secs / 86_400) as i64;
        let secs = now_secs % 86_400;
        let (year, month, day) = civil(days);
        match index {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(((days + 4) % 7 + 1) as u64), // 1970-01-01 was a Thursday
            0x07 => bcd(day),
            0x08 => bcd(month),
            0x09 => bcd(year.rem_euclid(100) as u64),
            0x32 => bcd((year / 100) as u64),
            0x0a => 0x26, // 32.768 kHz base, 1024 Hz rate, no update in progress
            0x0b => 0x02, // 24-hour mode, BCD
            0x0c => 0x00, // no interrupt flags
            0x0d => 0x80, // clock and RAM valid
            i => self.nvram[(i & 0x7f) as usize],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            0 => self.index,
            _ => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                self.register(self.index, now)
            }
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            // Bit 7 of the index port masks NMIs; the index is the rest.
            0 => self.index = data[0] & 0x7f,
            _ if self.index >= 0x0e => self.nvram[self.index as usize] = data[0],
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_registers_are_bcd_of_the_date() {
        let c = Cmos::new();
        // 2026-11-24 13:45:07 UTC
        let t = 1_795_527_907;
        assert_eq!(c.register(0x00, t), 0x07);
        assert_eq!(c.register(0x02, t), 0x45);
        assert_eq!(c.register(0x04, t), 0x13);
        assert_eq!(c.register(0x07, t), 0x24);
        assert_eq!(c.register(0x08, t), 0x11);
        assert_eq!(c.register(0x09, t), 0x26);
        assert_eq!(c.register(0x32, t), 0x20);
        assert_eq!(c.register(0x0d, t), 0x80);
    }

    #[test]
    fn index_port_selects_and_nvram_keeps_writes() {
        let mut c = Cmos::new();
        c.write(0, &[0x80 | 0x20]);
        c.write(1, &[0x5a]);
        let mut b = [0u8];
        c.read(0, &mut b);
        assert_eq!(b[0], 0x20);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
        // Odd-sized accesses are ignored, not a panic.
        let mut w = [1u8; 4];
        c.read(1, &mut w);
        assert_eq!(w, [0; 4]);
        c.write(1, &[1, 2]);
    }

    #[test]
    fn nvram_and_index_survive_save_and_restore_and_bad_states_are_refused() {
        let mut c = Cmos::new();
        c.write(0, &[0x20]);
        c.write(1, &[0x5a]);
        c.write(0, &[0x21]);
        let json = serde_json::to_string(&c.save()).unwrap();
        let mut r = Cmos::restore(&serde_json::from_str(&json).unwrap()).unwrap();
        let mut b = [0u8];
        r.read(0, &mut b);
        assert_eq!(b[0], 0x21, "the index");
        r.write(0, &[0x20]);
        r.read(1, &mut b);
        assert_eq!(b[0], 0x5a, "the NVRAM");
        let mut s = c.save();
        s.nvram.pop();
        assert!(Cmos::restore(&s).is_err(), "short NVRAM");
        let mut s = c.save();
        s.index = 0x80;
        assert!(Cmos::restore(&s).is_err(), "index past the NVRAM");
        let mut s = c.save();
        s.version = 0;
        assert!(matches!(Cmos::restore(&s), Err(StateError::Version { .. })));
    }
}
