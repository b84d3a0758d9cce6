//! ARM PrimeCell PL061 GPIO controller: eight lines, as on QEMU `virt`, where line 3 is the
//! power button (a `gpio-keys` node in the device tree gives it KEY_POWER). `vm.power-button`
//! pulses that line: high, then low [`POWER_BUTTON_PULSE`] later, as QEMU's `gpio-key` does, so
//! a `gpio-keys` driver sees a press and a release.
//!
//! The register model follows the PL061 TRM (ARM DDI 0190): GPIODATA is read and written
//! through an address mask (bits 9:2 of the offset select the lines an access touches),
//! writes reach only lines set as outputs in GPIODIR; GPIOIS/IBE/IEV pick level or edge
//! sensitivity, both edges, and which edge or level; GPIORIS latches edges and follows
//! levels, GPIOMIS is RIS masked by GPIOIE, GPIOIC clears latched edges. The controller's one
//! interrupt line (level-high SPI) is raised while GPIOMIS is not zero.

use std::sync::Mutex;
use std::time::Duration;

use crate::legacy::pl011::IrqLine;
use crate::mmio::MmioDevice;

/// The line QEMU `virt` wires to its power button (`gpios = <&pl061 3 0>`).
pub const POWER_BUTTON_LINE: u8 = 3;
/// How long a power-button press holds the line high (QEMU's gpio-key: 100 ms). Long enough
/// for gpio-keys' 5 ms debounce to read it pressed.
pub const POWER_BUTTON_PULSE: Duration = Duration::from_millis(100);

/// GPIODATA: 256 words, the word's address bits 9:2 masking the lines.
const DATA_END: u64 = 0x400;
/// Direction: 1 = output.
const GPIODIR: u64 = 0x400;
/// Interrupt sense: 1 = level, 0 = edge.
const GPIOIS: u64 = 0x404;
/// Interrupt both edges: 1 = both (GPIOIEV ignored).
const GPIOIBE: u64 = 0x408;
/// Interrupt event: 1 = rising edge or high level, 0 = falling edge or low level.
const GPIOIEV: u64 = 0x40c;
/// Interrupt mask: 1 = the line's interrupt reaches the controller's output.
const GPIOIE: u64 = 0x410;
/// Raw interrupt status (read only).
const GPIORIS: u64 = 0x414;
/// Masked interrupt status (read only).
const GPIOMIS: u64 = 0x418;
/// Interrupt clear (write only): 1 clears a latched edge.
const GPIOIC: u64 = 0x41c;
/// Mode control select (hardware control); kept, has no effect here.
const GPIOAFSEL: u64 = 0x420;
/// Peripheral and PrimeCell identification registers, one byte in each word from 0xfe0:
/// part number 0x061, designer ARM (0x41), revision 1 (Linux's amba bus matches 0x00041061);
/// PrimeCell id 0xb105f00d.
const ID_REGS: [(u64, u32); 8] = [
    (0xfe0, 0x61),
    (0xfe4, 0x10),
    (0xfe8, 0x04),
    (0xfec, 0x00),
    (0xff0, 0x0d),
    (0xff4, 0xf0),
    (0xff8, 0x05),
    (0xffc, 0xb1),
];

/// The register model of one PL061.
pub struct Pl061 {
    /// Output values written through GPIODATA (for lines that are outputs).
    out: u8,
    /// Levels driven onto the input lines from outside (the power button).
    input: u8,
    dir: u8,
    is: u8,
    ibe: u8,
    iev: u8,
    ie: u8,
    /// Edge-triggered interrupts latched and not yet cleared.
    edges: u8,
    afsel: u8,
    /// The lines' values at the last update, for edge detection.
    last: u8,
    irq: Box<dyn IrqLine>,
    irq_level: bool,
}

impl Pl061 {
    /// A controller in its reset state (all lines inputs, low; interrupts masked) signalling
    /// on `irq`.
    pub fn new(irq: Box<dyn IrqLine>) -> Self {
        Self {
            out: 0,
            input: 0,
            dir: 0,
            is: 0,
            ibe: 0,
            iev: 0,
            ie: 0,
            edges: 0,
            afsel: 0,
            last: 0,
            irq,
            irq_level: false,
        }
    }

    /// Back to the reset state, wired to a new interrupt line (a new boot's VM).
    pub fn reset(&mut self, irq: Box<dyn IrqLine>) {
        *self = Self::new(irq);
    }

    /// The lines' values: outputs as written, inputs as driven.
    fn lines(&self) -> u8 {
        (self.out & self.dir) | (self.input & !self.dir)
    }

    /// Lines whose level interrupt condition holds now.
    fn levels(&self) -> u8 {
        self.is & !(self.lines() ^ self.iev)
    }

    fn ris(&self) -> u8 {
        (self.edges & !self.is) | self.levels()
    }

    fn mis(&self) -> u8 {
        self.ris() & self.ie
    }

    /// Latches the edges since the last update and drives the interrupt line.
    fn update(&mut self) {
        let now = self.lines();
        let changed = now ^ self.last;
        self.last = now;
        let rising = changed & now;
        let falling = changed & !now;
        let single = (rising & self.iev) | (falling & !self.iev);
        let hit = (changed & self.ibe) | (single & !self.ibe);
        self.edges |= hit & !self.is;
        let level = self.mis() != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// Drives input line `line` (0-7) high or low from outside; out-of-range lines are
    /// ignored.
    pub fn set_input(&mut self, line: u8, high: bool) {
        let Some(bit) = 1u8.checked_shl(u32::from(line)) else {
            return;
        };
        if high {
            self.input |= bit;
        } else {
            self.input &= !bit;
        }
        self.update();
    }

    /// A 32-bit register read at `offset`.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            o if o < DATA_END => u32::from(self.lines() & ((o >> 2) as u8)),
            GPIODIR => self.dir.into(),
            GPIOIS => self.is.into(),
            GPIOIBE => self.ibe.into(),
            GPIOIEV => self.iev.into(),
            GPIOIE => self.ie.into(),
            GPIORIS => self.ris().into(),
            GPIOMIS => self.mis().into(),
            GPIOAFSEL => self.afsel.into(),
            o => ID_REGS
                .iter()
                .find(|(reg, _)| *reg == o)
                .map_or(0, |(_, v)| *v),
        }
    }

    /// A 32-bit register write at `offset` (only the low 8 bits mean anything).
    pub fn write(&mut self, offset: u64, value: u32) {
        let v = value as u8;
        match offset {
            o if o < DATA_END => {
                let mask = ((o >> 2) as u8) & self.dir;
                self.out = (self.out & !mask) | (v & mask);
            }
            GPIODIR => self.dir = v,
            GPIOIS => self.is = v,
            GPIOIBE => self.ibe = v,
            GPIOIEV => self.iev = v,
            GPIOIE => self.ie = v,
            GPIOIC => self.edges &= !v,
            GPIOAFSEL => self.afsel = v,
            // Read-only registers, the ID registers and holes: ignored.
            _ => return,
        }
        self.update();
    }
}

/// A PL061 shared between vCPU threads (MMIO) and the main loop (the power button).
pub struct SharedPl061(Mutex<Pl061>);

impl SharedPl061 {
    /// Wraps a controller.
    pub fn new(pl061: Pl061) -> Self {
        Self(Mutex::new(pl061))
    }

    /// The controller, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Pl061> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MmioDevice for SharedPl061 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // Word registers; a narrower read gets the low bytes of the word.
        let word = self.lock().read(offset & !3).to_le_bytes();
        let shift = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = word.get(shift + i).copied().unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || data.is_empty() {
            return;
        }
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        self.lock().write(offset, u32::from_le_bytes(word));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Line(Arc<Mutex<Vec<bool>>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().expect("lock").push(high);
        }
    }
    impl Line {
        fn changes(&self) -> Vec<bool> {
            self.0.lock().expect("lock").clone()
        }
    }

    fn gpio() -> (Pl061, Line) {
        let line = Line::default();
        (Pl061::new(Box::new(line.clone())), line)
    }

    #[test]
    fn test_pl061_id_registers_match_linux_amba_id() {
        let (g, _) = gpio();
        let byte = |o| g.read(o) & 0xff;
        let periph = byte(0xfe0) | byte(0xfe4) << 8 | byte(0xfe8) << 16 | byte(0xfec) << 24;
        assert_eq!(periph & 0x000f_ffff, 0x0004_1061);
        let cell = byte(0xff0) | byte(0xff4) << 8 | byte(0xff8) << 16 | byte(0xffc) << 24;
        assert_eq!(cell, 0xb105_f00d);
        assert_eq!(g.read(0xfdc), 0);
        assert_eq!(g.read(0x800), 0);
    }

    #[test]
    fn test_pl061_data_address_mask_reads_and_writes_outputs_only() {
        let (mut g, _) = gpio();
        g.write(GPIODIR, 0x0f);
        // Mask 0xff (offset 0x3fc): writes every output line; inputs 4-7 stay as driven.
        g.write(0x3fc, 0xff);
        assert_eq!(g.read(0x3fc), 0x0f);
        // Mask 0x01 (offset 0x004): only line 0 changes.
        g.write(0x004, 0x00);
        assert_eq!(g.read(0x3fc), 0x0e);
        // A read through mask 0x06 (offset 0x018) sees lines 1 and 2 only.
        assert_eq!(g.read(0x018), 0x06);
        assert_eq!(g.read(0x000), 0);
        g.set_input(5, true);
        assert_eq!(g.read(0x3fc), 0x2e);
        assert_eq!(g.read(0x080), 0x20);
        // A write to an input line does nothing.
        g.write(0x080, 0x00);
        assert_eq!(g.read(0x080), 0x20);
        g.set_input(9, true);
        assert_eq!(g.read(0x3fc), 0x2e);
    }

    #[test]
    fn test_pl061_rising_edge_latches_until_cleared() {
        let (mut g, line) = gpio();
        // Linux's pl061 for IRQ_TYPE_EDGE_RISING: IS=0, IBE=0, IEV=1, then unmask.
        g.write(GPIOIEV, 1 << 3);
        g.write(GPIOIE, 1 << 3);
        assert_eq!(g.read(GPIORIS), 0);
        g.set_input(3, true);
        assert_eq!(g.read(GPIORIS), 1 << 3);
        assert_eq!(g.read(GPIOMIS), 1 << 3);
        assert_eq!(line.changes(), [true]);
        // The release is a falling edge: not latched, the rising one stays until cleared.
        g.set_input(3, false);
        assert_eq!(g.read(GPIOMIS), 1 << 3);
        g.write(GPIOIC, 1 << 3);
        assert_eq!(g.read(GPIORIS), 0);
        assert_eq!(line.changes(), [true, false]);
    }

    #[test]
    fn test_pl061_falling_and_both_edges() {
        let (mut g, line) = gpio();
        g.set_input(3, true);
        // Falling edge (IEV=0).
        g.write(GPIOIE, 1 << 3);
        assert_eq!(g.read(GPIOMIS), 0);
        g.set_input(3, false);
        assert_eq!(g.read(GPIOMIS), 1 << 3);
        g.write(GPIOIC, 0xff);
        // Both edges: a press and a release each latch.
        g.write(GPIOIBE, 1 << 3);
        g.set_input(3, true);
        assert_eq!(g.read(GPIOMIS), 1 << 3);
        g.write(GPIOIC, 1 << 3);
        assert_eq!(g.read(GPIOMIS), 0);
        g.set_input(3, false);
        assert_eq!(g.read(GPIOMIS), 1 << 3);
        assert_eq!(line.changes(), [true, false, true, false, true]);
    }

    #[test]
    fn test_pl061_masked_edge_is_raw_only_then_raises_on_unmask() {
        let (mut g, line) = gpio();
        g.write(GPIOIEV, 0xff);
        g.set_input(3, true);
        assert_eq!(g.read(GPIORIS), 1 << 3);
        assert_eq!(g.read(GPIOMIS), 0);
        assert!(line.changes().is_empty());
        g.write(GPIOIE, 1 << 3);
        assert_eq!(line.changes(), [true]);
    }

    #[test]
    fn test_pl061_level_interrupt_follows_the_line() {
        let (mut g, line) = gpio();
        // High level on line 3: IS=1, IEV=1.
        g.write(GPIOIS, 1 << 3);
        g.write(GPIOIEV, 1 << 3);
        g.write(GPIOIE, 1 << 3);
        g.set_input(3, true);
        assert_eq!(g.read(GPIOMIS), 1 << 3);
        // GPIOIC does not clear a level interrupt whose condition holds.
        g.write(GPIOIC, 1 << 3);
        assert_eq!(g.read(GPIOMIS), 1 << 3);
        g.set_input(3, false);
        assert_eq!(g.read(GPIOMIS), 0);
        // Low level: IEV=0 raises it while the line is low.
        g.write(GPIOIEV, 0);
        assert_eq!(g.read(GPIOMIS), 1 << 3);
        assert_eq!(line.changes(), [true, false, true]);
    }

    #[test]
    fn test_pl061_mmio_narrow_access_and_reset() {
        let line = Line::default();
        let g = SharedPl061::new(Pl061::new(Box::new(line.clone())));
        g.write(GPIODIR, &[0xff, 0, 0, 0]);
        let mut b = [0u8; 1];
        MmioDevice::read(&g, GPIODIR, &mut b);
        assert_eq!(b, [0xff]);
        let mut w = [0u8; 4];
        MmioDevice::read(&g, 0xfe0, &mut w);
        assert_eq!(w, [0x61, 0, 0, 0]);
        // Unaligned writes are ignored.
        g.write(GPIODIR + 1, &[0]);
        MmioDevice::read(&g, GPIODIR, &mut b);
        assert_eq!(b, [0xff]);
        g.lock().reset(Box::new(line));
        MmioDevice::read(&g, GPIODIR, &mut b);
        assert_eq!(b, [0]);
    }
}
