//! ARM PrimeCell PL031 real-time clock: the guest's wall clock (Linux's rtc-pl031, edk2's
//! PL031RealTimeClockLib, which ArmVirtQemu cannot start without).
//!
//! The data register counts seconds: the host's wall clock plus an offset that a guest write
//! to the load register sets, so a guest that sets its clock moves only its own. The match
//! register is kept but raises no alarm interrupt (no timer thread); Linux's driver works
//! without one, and edk2 does not use it.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::mmio::MmioDevice;

/// Data register: current time in seconds (read only).
const RTCDR: u64 = 0x00;
/// Match register.
const RTCMR: u64 = 0x04;
/// Load register: writing sets the time.
const RTCLR: u64 = 0x08;
/// Control register: bit 0 starts the counter (it always runs here).
const RTCCR: u64 = 0x0c;
/// Interrupt mask set/clear.
const RTCIMSC: u64 = 0x10;
/// Raw interrupt status.
const RTCRIS: u64 = 0x14;
/// Masked interrupt status.
const RTCMIS: u64 = 0x18;
/// Interrupt clear.
const RTCICR: u64 = 0x1c;
/// Peripheral and PrimeCell identification registers, one byte in each word from 0xfe0:
/// part number 0x031, designer ARM (0x41), revision 1; PrimeCell id 0xb105f00d.
const ID_REGS: [(u64, u32); 8] = [
    (0xfe0, 0x31),
    (0xfe4, 0x10),
    (0xfe8, 0x14),
    (0xfec, 0x00),
    (0xff0, 0x0d),
    (0xff4, 0xf0),
    (0xff8, 0x05),
    (0xffc, 0xb1),
];

#[derive(Debug, Default)]
struct State {
    /// Seconds added to the host's wall clock.
    offset: i64,
    /// Last value written to the load register.
    load: u32,
    /// Match register.
    matched: u32,
    /// Interrupt mask.
    mask: u32,
}

/// A PL031 whose time is the host's wall clock plus what the guest set.
pub struct Pl031 {
    state: Mutex<State>,
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Default for Pl031 {
    fn default() -> Self {
        Self::with_clock(host_now)
    }
}

impl Pl031 {
    /// A PL031 reading time from `now` (seconds since the epoch).
    fn with_clock(now: fn() -> i64) -> Self {
        Self {
            state: Mutex::new(State::default()),
            now,
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            // The register is 32 bits: the time wraps in 2106, as on the hardware.
            RTCDR => ((self.now)() + s.offset) as u32,
            RTCMR => s.matched,
            RTCLR => s.load,
            RTCCR => 1,
            RTCIMSC => s.mask,
            RTCRIS | RTCMIS => 0,
            _ => ID_REGS
                .iter()
                .find(|(o, _)| *o == offset)
                .map_or(0, |(_, v)| *v),
        }
    }

    fn write_reg(&self, offset: u64, value: u32) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            RTCLR => {
                s.load = value;
                s.offset = i64::from(value) - (self.now)();
            }
            RTCMR => s.matched = value,
            RTCIMSC => s.mask = value & 1,
            RTCCR | RTCICR => {}
            _ => log::debug!("pl031: write of {value:#x} to read-only offset {offset:#x}"),
        }
    }
}

impl MmioDevice for Pl031 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // Registers are 32-bit words; a narrower read gets the low bytes of its word.
        let word = self.read_reg(offset & !3).to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = word.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || data.len() != 4 {
            log::debug!("pl031: ignoring a {}-byte write at {offset:#x}", data.len());
            return;
        }
        self.write_reg(
            offset,
            u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(rtc: &Pl031, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        rtc.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn test_pl031_reads_host_clock_and_ids() {
        let rtc = Pl031::with_clock(|| 1_700_000_000);
        assert_eq!(read32(&rtc, RTCDR), 1_700_000_000);
        assert_eq!(read32(&rtc, RTCCR), 1);
        let ids: Vec<u32> = (0..8).map(|i| read32(&rtc, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, vec![0x31, 0x10, 0x14, 0, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn test_pl031_load_sets_guest_time_only() {
        let rtc = Pl031::with_clock(|| 1_700_000_000);
        rtc.write(RTCLR, &1_000u32.to_le_bytes());
        assert_eq!(read32(&rtc, RTCDR), 1_000);
        assert_eq!(read32(&rtc, RTCLR), 1_000);
        rtc.write(RTCMR, &5u32.to_le_bytes());
        assert_eq!(read32(&rtc, RTCMR), 5);
        // The data register is read only.
        rtc.write(RTCDR, &7u32.to_le_bytes());
        assert_eq!(read32(&rtc, RTCDR), 1_000);
    }

    #[test]
    fn test_pl031_host_clock_is_recent() {
        let rtc = Pl031::default();
        // After 2023-11-14: the host clock, not zero.
        assert!(read32(&rtc, RTCDR) > 1_700_000_000);
    }
}
