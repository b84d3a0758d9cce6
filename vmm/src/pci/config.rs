//! A PCI configuration space: 4 KiB of registers with per-bit write masks and
//! write-1-to-clear bits, and a capability list builder.
//!
//! BAR sizing falls out of the masks: a BAR's address bits below its size are read-only, so
//! the guest's all-ones write reads back as the size mask, as on hardware.

/// Size of a PCIe configuration space.
pub const CONFIG_SIZE: usize = 4096;

/// Standard header registers (byte offsets).
pub const VENDOR_ID: usize = 0x00;
/// Command register.
pub const COMMAND: usize = 0x04;
/// Status register.
pub const STATUS: usize = 0x06;
/// Revision ID, then class code (3 bytes).
pub const REVISION: usize = 0x08;
/// Header type.
pub const HEADER_TYPE: usize = 0x0e;
/// First BAR.
pub const BAR0: usize = 0x10;
/// Subsystem vendor ID (type 0 headers).
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Interrupt line.
pub const INTERRUPT_LINE: usize = 0x3c;

/// Command: memory space decoding enabled.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus mastering enabled.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: capabilities list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// A configuration space's registers and what a guest may change in them.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Box<[u8; CONFIG_SIZE]>,
    writable: Box<[u8; CONFIG_SIZE]>,
    w1c: Box<[u8; CONFIG_SIZE]>,
    /// Offset of the last capability added in the standard (first 256 bytes) list.
    last_cap: Option<usize>,
    /// Where the next capability goes.
    next_cap: usize,
    /// Offset of the last extended capability.
    last_ext_cap: Option<usize>,
    next_ext_cap: usize,
}

impl ConfigSpace {
    /// An empty configuration space (all registers read-only zeros).
    pub fn new() -> Self {
        Self {
            regs: Box::new([0; CONFIG_SIZE]),
            writable: Box::new([0; CONFIG_SIZE]),
            w1c: Box::new([0; CONFIG_SIZE]),
            last_cap: None,
            next_cap: 0x40,
            last_ext_cap: None,
            next_ext_cap: 0x100,
        }
    }

    /// Sets read-only bytes.
    pub fn set(&mut self, offset: usize, bytes: &[u8]) {
        self.regs[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Sets a read-only 16-bit register.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Sets a read-only 32-bit register.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Marks bits of a 16-bit register guest-writable.
    pub fn writable_u16(&mut self, offset: usize, mask: u16) {
        self.writable[offset..offset + 2].copy_from_slice(&mask.to_le_bytes());
    }

    /// Marks bits of a 32-bit register guest-writable.
    pub fn writable_u32(&mut self, offset: usize, mask: u32) {
        self.writable[offset..offset + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Marks bits of a 16-bit register write-1-to-clear.
    pub fn w1c_u16(&mut self, offset: usize, mask: u16) {
        self.w1c[offset..offset + 2].copy_from_slice(&mask.to_le_bytes());
    }

    /// Every register, as the guest reads them.
    pub fn regs(&self) -> &[u8; CONFIG_SIZE] {
        &self.regs
    }

    /// Reads a byte range (out-of-range bytes read as zero).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Reads a 16-bit register.
    pub fn u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a 32-bit register.
    pub fn u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets bits of a 16-bit register from the device side, whatever the masks say.
    pub fn set_bits_u16(&mut self, offset: usize, bits: u16, on: bool) {
        let v = self.u16(offset);
        self.set_u16(offset, if on { v | bits } else { v & !bits });
    }

    /// A guest write: only writable bits change, write-1-to-clear bits clear.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i;
            if o >= CONFIG_SIZE {
                break;
            }
            let w = self.writable[o];
            let c = self.w1c[o];
            self.regs[o] = (self.regs[o] & !w) | (b & w);
            self.regs[o] &= !(b & c);
        }
    }

    /// Type 0/1 header basics: IDs, class, header type, capability list flag.
    pub fn header(&mut self, vendor: u16, device: u16, class: u32, revision: u8, header_type: u8) {
        self.set_u16(VENDOR_ID, vendor);
        self.set_u16(VENDOR_ID + 2, device);
        self.set_u32(REVISION, (class << 8) | u32::from(revision));
        self.regs[HEADER_TYPE] = header_type;
        // Memory space, bus master and INTx disable are the command bits a guest may set.
        self.writable_u16(
            COMMAND,
            COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
        );
        // Interrupt line is scratch space for the guest.
        self.writable[INTERRUPT_LINE] = 0xff;
    }

    /// Adds a standard capability with `body` (the bytes after ID and next pointer);
    /// returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let offset = self.next_cap;
        let len = (2 + body.len()).next_multiple_of(4);
        assert!(
            offset + len <= 0x100,
            "capabilities overflow the standard header"
        );
        self.regs[offset] = id;
        self.regs[offset + 1] = 0;
        self.regs[offset + 2..offset + 2 + body.len()].copy_from_slice(body);
        match self.last_cap {
            Some(last) => self.regs[last + 1] = offset as u8,
            None => self.regs[CAPABILITIES_POINTER] = offset as u8,
        }
        self.set_bits_u16(STATUS, STATUS_CAP_LIST, true);
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        offset
    }

    /// Adds a PCIe extended capability (in the space past 256 bytes); returns its offset.
    pub fn add_extended_capability(&mut self, id: u16, version: u8, body: &[u8]) -> usize {
        let offset = self.next_ext_cap;
        let len = (4 + body.len()).next_multiple_of(4);
        assert!(
            offset + len <= CONFIG_SIZE,
            "extended capabilities overflow"
        );
        self.set_u32(offset, u32::from(id) | (u32::from(version) << 16));
        self.regs[offset + 4..offset + 4 + body.len()].copy_from_slice(body);
        if let Some(last) = self.last_ext_cap {
            let hdr = self.u32(last);
            self.set_u32(last, (hdr & 0x000f_ffff) | ((offset as u32) << 20));
        }
        self.last_ext_cap = Some(offset);
        self.next_ext_cap = offset + len;
        offset
    }
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

/// A 32-bit memory BAR of a power-of-two size at config offset `BAR0 + 4 * index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR number.
    pub index: usize,
    /// Size in bytes (a power of two, at least 4 KiB).
    pub size: u32,
}

impl Bar {
    /// Declares the BAR in `config`: address bits above the size are writable.
    pub fn declare(&self, config: &mut ConfigSpace) {
        debug_assert!(self.size.is_power_of_two() && self.size >= 4096);
        config.set_u32(BAR0 + 4 * self.index, 0);
        config.writable_u32(BAR0 + 4 * self.index, !(self.size - 1));
    }

    /// Where the guest put the BAR, if memory decoding is on and it has been placed.
    pub fn address(&self, config: &ConfigSpace) -> Option<u64> {
        let addr = config.u32(BAR0 + 4 * self.index) & !(self.size - 1);
        let decoding = config.u16(COMMAND) & COMMAND_MEMORY != 0;
        (decoding && addr != 0).then_some(u64::from(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_config_bar_sizing_reads_back_size_mask() {
        let mut c = ConfigSpace::new();
        c.header(0x1af4, 0x1042, 0x01_00_00, 1, 0);
        let bar = Bar {
            index: 0,
            size: 0x1_0000,
        };
        bar.declare(&mut c);
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.u32(BAR0), 0xffff_0000);
        c.write(BAR0, &0x1234_5678u32.to_le_bytes());
        assert_eq!(c.u32(BAR0), 0x1234_0000);
        assert_eq!(bar.address(&c), None, "memory decoding is off");
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(bar.address(&c), Some(0x1234_0000));
    }

    #[test]
    fn test_config_read_only_and_out_of_range_bytes() {
        let mut c = ConfigSpace::new();
        c.header(0x1af4, 0x1042, 0x01_00_00, 1, 0);
        c.write(VENDOR_ID, &[0, 0, 0, 0]);
        assert_eq!(c.u32(VENDOR_ID), 0x1042_1af4);
        c.write(CONFIG_SIZE - 2, &[1, 2, 3, 4]); // straddles the end: no panic
        let mut d = [0xffu8; 4];
        c.read(CONFIG_SIZE - 2, &mut d);
        assert_eq!(d, [0, 0, 0, 0]);
    }

    #[test]
    fn test_config_w1c_bits_clear_on_one() {
        let mut c = ConfigSpace::new();
        c.set_u16(0x50, 0b1011);
        c.w1c_u16(0x50, 0b0011);
        c.write(0x50, &0b0001u16.to_le_bytes());
        assert_eq!(c.u16(0x50), 0b1010);
    }

    #[test]
    fn test_config_capability_chain() {
        let mut c = ConfigSpace::new();
        let a = c.add_capability(0x10, &[0; 58]);
        let b = c.add_capability(0x11, &[0; 10]);
        assert_eq!(c.u16(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        assert_eq!(usize::from(c.regs[CAPABILITIES_POINTER]), a);
        assert_eq!(usize::from(c.regs[a + 1]), b);
        assert_eq!(c.regs[b + 1], 0);
        assert_eq!(b % 4, 0);
        let e1 = c.add_extended_capability(0x1, 1, &[0; 8]);
        let e2 = c.add_extended_capability(0x2, 1, &[0; 8]);
        assert_eq!(e1, 0x100);
        assert_eq!((c.u32(e1) >> 20) as usize, e2);
    }
}
