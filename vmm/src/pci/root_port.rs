//! A PCIe root port: a type 1 (bridge) header whose secondary bus is one slot, with a PCI
//! Express capability describing a hot-plug capable slot.

use super::config::*;
use super::PciDevice;

/// PCI vendor ID used for the host bridge and root ports (Red Hat, as QEMU's generic PCIe
/// host bridge and root port use; guests have drivers for the class, not the ID).
pub const VENDOR_REDHAT: u16 = 0x1b36;
/// Device ID of a generic PCIe root port.
pub const DEVICE_ROOT_PORT: u16 = 0x000c;
/// Class code of a PCI-to-PCI bridge.
const CLASS_PCI_BRIDGE: u32 = 0x06_04_00;

const PRIMARY_BUS: usize = 0x18;
const SECONDARY_BUS: usize = 0x19;
const SECONDARY_STATUS: usize = 0x1e;
const MEMORY_BASE: usize = 0x20;
const PREF_MEMORY_BASE: usize = 0x24;
const PREF_BASE_UPPER: usize = 0x28;
const PREF_LIMIT_UPPER: usize = 0x2c;
const BRIDGE_CONTROL: usize = 0x3e;

const CAP_ID_PCIE: u8 = 0x10;
// Offsets inside the PCI Express capability.
const PCIE_CAPS: usize = 0x02;
const PCIE_DEVCTL: usize = 0x08;
const PCIE_LNKCAP: usize = 0x0c;
const PCIE_LNKCTL: usize = 0x10;
const PCIE_LNKSTA: usize = 0x12;
const PCIE_SLTCAP: usize = 0x14;
const PCIE_SLTCTL: usize = 0x18;
const PCIE_SLTSTA: usize = 0x1a;
const PCIE_RTCTL: usize = 0x1c;
const PCIE_DEVCTL2: usize = 0x28;
const PCIE_LNKCTL2: usize = 0x30;
const PCIE_CAP_LEN: usize = 0x3c;

const CAP_ID_MSI: u8 = 0x05;
// Offsets inside the MSI capability (64-bit address, no per-vector masking).
const MSI_CONTROL: usize = 0x02;
const MSI_ADDRESS_LO: usize = 0x04;
const MSI_ADDRESS_HI: usize = 0x08;
const MSI_DATA: usize = 0x0c;
const MSI_CAP_LEN: usize = 0x10;
/// Message control: one vector, 64-bit address capable.
const MSI_CONTROL_64BIT: u16 = 1 << 7;
/// Message control bits a guest may write: MSI enable (one vector: multiple message enable stays 0).
const MSI_CONTROL_WRITABLE: u16 = 0x0001;

/// Capability register: version 2, device/port type Root Port, slot implemented.
const PCIE_CAPS_ROOT_PORT: u16 = 0x2 | (0x4 << 4) | (1 << 8);
/// Link: 2.5 GT/s, x1, data link layer active reporting capable.
const LNKCAP_BASE: u32 = 0x1 | (0x1 << 4) | (1 << 20);
/// Link status: 2.5 GT/s, x1.
const LNKSTA_BASE: u16 = 0x1 | (0x1 << 4);
const LNKSTA_DLLLA: u16 = 1 << 13;
/// Slot: attention button, power controller, attention and power indicators, hot-plug
/// surprise, hot-plug capable, no command completed support (commands complete at once).
const SLTCAP_HOTPLUG: u32 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 18);
/// Slot control bits a guest may write: all of 0..=12.
const SLTCTL_WRITABLE: u16 = 0x1fff;
/// Slot status: write-1-to-clear change bits.
const SLTSTA_W1C: u16 = 0x1f | (1 << 8);
const SLTSTA_PRESENCE: u16 = 1 << 6;

/// One root port and the slot behind it.
pub struct RootPort {
    config: ConfigSpace,
    pcie_cap: usize,
    /// What is plugged into the slot.
    pub device: Option<Box<dyn PciDevice>>,
}

impl RootPort {
    /// Root port number `slot` (its physical slot number is `slot + 1`).
    pub fn new(slot: u8) -> Self {
        let mut c = ConfigSpace::new();
        c.header(VENDOR_REDHAT, DEVICE_ROOT_PORT, CLASS_PCI_BRIDGE, 0, 0x01);
        // Bus numbers and secondary latency timer.
        c.set(PRIMARY_BUS, &[0, 0, 0, 0]);
        c.writable_u32(PRIMARY_BUS, 0x00ff_ffff);
        c.w1c_u16(SECONDARY_STATUS, 0xf900);
        // Memory window; 64-bit prefetchable window. No I/O window (registers read zero).
        c.writable_u32(MEMORY_BASE, 0xfff0_fff0);
        c.set_u32(PREF_MEMORY_BASE, 0x0001_0001);
        c.writable_u32(PREF_MEMORY_BASE, 0xfff0_fff0);
        c.writable_u32(PREF_BASE_UPPER, 0xffff_ffff);
        c.writable_u32(PREF_LIMIT_UPPER, 0xffff_ffff);
        // Bridge control: parity, SERR, ISA, VGA, master abort, secondary bus reset.
        c.writable_u16(BRIDGE_CONTROL, 0x007f);

        let mut body = [0u8; PCIE_CAP_LEN - 2];
        body[PCIE_CAPS - 2..PCIE_CAPS].copy_from_slice(&PCIE_CAPS_ROOT_PORT.to_le_bytes());
        let lnkcap = LNKCAP_BASE | (u32::from(slot) << 24);
        body[PCIE_LNKCAP - 2..PCIE_LNKCAP + 2].copy_from_slice(&lnkcap.to_le_bytes());
        body[PCIE_LNKSTA - 2..PCIE_LNKSTA].copy_from_slice(&LNKSTA_BASE.to_le_bytes());
        let sltcap = SLTCAP_HOTPLUG | ((u32::from(slot) + 1) << 19);
        body[PCIE_SLTCAP - 2..PCIE_SLTCAP + 2].copy_from_slice(&sltcap.to_le_bytes());
        let cap = c.add_capability(CAP_ID_PCIE, &body);
        c.writable_u16(cap + PCIE_DEVCTL, 0xffff);
        c.writable_u16(cap + PCIE_LNKCTL, 0x0fff);
        c.writable_u16(cap + PCIE_SLTCTL, SLTCTL_WRITABLE);
        c.w1c_u16(cap + PCIE_SLTSTA, SLTSTA_W1C);
        c.writable_u16(cap + PCIE_RTCTL, 0x001f);
        c.writable_u16(cap + PCIE_DEVCTL2, 0xffff);
        c.writable_u16(cap + PCIE_LNKCTL2, 0xffff);
        // MSI, so that the port services (pciehp, PME) get an interrupt through the ITS and
        // bind: without it Linux finds no IRQ for them and pciehp fails its probe, printing two
        // errors per port on the console.
        let mut msi = [0u8; MSI_CAP_LEN - 2];
        msi[MSI_CONTROL - 2..MSI_CONTROL].copy_from_slice(&MSI_CONTROL_64BIT.to_le_bytes());
        let msi_cap = c.add_capability(CAP_ID_MSI, &msi);
        c.writable_u16(msi_cap + MSI_CONTROL, MSI_CONTROL_WRITABLE);
        c.writable_u32(msi_cap + MSI_ADDRESS_LO, 0xffff_fffc);
        c.writable_u32(msi_cap + MSI_ADDRESS_HI, 0xffff_ffff);
        c.writable_u16(msi_cap + MSI_DATA, 0xffff);
        Self {
            config: c,
            pcie_cap: cap,
            device: None,
        }
    }

    /// Plugs `device` into the slot: presence detected, link up.
    pub fn plug(&mut self, device: Box<dyn PciDevice>) {
        self.device = Some(device);
        self.config
            .set_bits_u16(self.pcie_cap + PCIE_SLTSTA, SLTSTA_PRESENCE, true);
        self.config
            .set_bits_u16(self.pcie_cap + PCIE_LNKSTA, LNKSTA_DLLLA, true);
    }

    /// The bus number the guest gave the slot, if any.
    pub fn secondary_bus(&self) -> Option<u8> {
        let mut b = [0u8; 1];
        self.config.read(SECONDARY_BUS, &mut b);
        (b[0] != 0).then_some(b[0])
    }

    /// Guest read of the port's own configuration space.
    pub fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    /// Guest write to the port's own configuration space.
    pub fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    /// Back to power-on state (bus numbers and windows unassigned); a plugged device stays.
    pub fn reset(&mut self, slot: u8, vm: &std::sync::Arc<crate::irq::VmInterrupts>) {
        let device = self.device.take();
        *self = Self::new(slot);
        if let Some(mut d) = device {
            d.reset(vm);
            self.plug(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_root_port_header_and_pcie_capability() {
        let rp = RootPort::new(2);
        let mut d = [0u8; 4];
        rp.config_read(VENDOR_ID, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x000c_1b36);
        rp.config_read(REVISION, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_04_00);
        rp.config_read(HEADER_TYPE, &mut d[..1]);
        assert_eq!(d[0], 1);
        let cap = rp.pcie_cap;
        assert_eq!(rp.config.u16(cap) & 0xff, 0x10);
        assert_eq!(rp.config.u16(cap + PCIE_CAPS), 0x0142);
        let sltcap = rp.config.u32(cap + PCIE_SLTCAP);
        assert_ne!(sltcap & (1 << 6), 0, "hot-plug capable");
        assert_eq!(sltcap >> 19, 3, "physical slot number");
        assert_eq!(rp.config.u16(cap + PCIE_SLTSTA) & SLTSTA_PRESENCE, 0);
    }

    #[test]
    fn test_root_port_msi_capability_is_chained_and_programmable() {
        let mut rp = RootPort::new(0);
        let msi = usize::from(rp.config.u16(rp.pcie_cap) >> 8);
        assert_ne!(msi, 0, "MSI follows the PCIe capability");
        assert_eq!(rp.config.u16(msi) & 0xff, u16::from(CAP_ID_MSI));
        assert_eq!(rp.config.u16(msi) >> 8, 0, "last capability");
        assert_eq!(rp.config.u16(msi + MSI_CONTROL), MSI_CONTROL_64BIT);
        // The guest programs address and data and enables MSI; capability bits stay.
        rp.config_write(msi + MSI_ADDRESS_LO, &0x0809_0043u32.to_le_bytes());
        rp.config_write(msi + MSI_ADDRESS_HI, &1u32.to_le_bytes());
        rp.config_write(msi + MSI_DATA, &0x0021u16.to_le_bytes());
        rp.config_write(msi + MSI_CONTROL, &0xffffu16.to_le_bytes());
        assert_eq!(rp.config.u32(msi + MSI_ADDRESS_LO), 0x0809_0040);
        assert_eq!(rp.config.u32(msi + MSI_ADDRESS_HI), 1);
        assert_eq!(rp.config.u16(msi + MSI_DATA), 0x0021);
        assert_eq!(rp.config.u16(msi + MSI_CONTROL), MSI_CONTROL_64BIT | 1);
    }

    #[test]
    fn test_root_port_bus_numbers_and_windows_are_writable() {
        let mut rp = RootPort::new(0);
        assert_eq!(rp.secondary_bus(), None);
        rp.config_write(PRIMARY_BUS, &[0, 3, 3, 0]);
        assert_eq!(rp.secondary_bus(), Some(3));
        rp.config_write(MEMORY_BASE, &0x1010_1000u32.to_le_bytes());
        assert_eq!(rp.config.u32(MEMORY_BASE), 0x1010_1000);
        // I/O window not implemented: reads zero whatever is written.
        rp.config_write(0x1c, &[0xf0, 0xf0]);
        assert_eq!(rp.config.u16(0x1c), 0);
        // 64-bit prefetchable window flag survives writes.
        rp.config_write(PREF_MEMORY_BASE, &0u32.to_le_bytes());
        assert_eq!(rp.config.u32(PREF_MEMORY_BASE) & 0xf, 1);
    }
}
