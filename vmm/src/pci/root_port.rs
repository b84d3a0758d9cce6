//! A PCIe root port: a type 1 (bridge) header whose secondary bus is one slot, with a PCI
//! Express capability describing a hot-plug capable slot, and the slot's hot-plug controller
//! as Linux's pciehp drives it: presence detect and Data Link Layer Link Active (both change
//! bits set together on a plug), attention button, power controller and indicators, no
//! command completed (advertised: commands complete at once), write-1-to-clear change bits,
//! and an MSI sent when an enabled event becomes pending while hot-plug interrupts are on.

use std::sync::Arc;

use log::warn;

use super::config::*;
use super::mirror::EcamMirror;
use super::PciDevice;
use crate::irq::{IrqError, MsiMessage};

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
/// Slot control: attention button pressed enable.
pub const SLTCTL_ABPE: u16 = 1 << 0;
/// Slot control: power fault detected enable.
const SLTCTL_PFDE: u16 = 1 << 1;
/// Slot control: MRL sensor changed enable.
const SLTCTL_MRLSCE: u16 = 1 << 2;
/// Slot control: presence detect changed enable.
pub const SLTCTL_PDCE: u16 = 1 << 3;
/// Slot control: command completed interrupt enable.
const SLTCTL_CCIE: u16 = 1 << 4;
/// Slot control: hot-plug interrupt enable.
pub const SLTCTL_HPIE: u16 = 1 << 5;
/// Slot control: power indicator control (bits 9:8; 11b: off).
const SLTCTL_PIC: u16 = 0b11 << 8;
/// Slot control: power indicator off.
pub const SLTCTL_PIC_OFF: u16 = 0b11 << 8;
/// Slot control: power controller control (1: power off).
pub const SLTCTL_PCC: u16 = 1 << 10;
/// Slot control: data link layer state changed enable.
pub const SLTCTL_DLLSCE: u16 = 1 << 12;
/// Slot status: write-1-to-clear change bits.
const SLTSTA_W1C: u16 = 0x1f | (1 << 8);
/// Slot status: attention button pressed.
pub const SLTSTA_ABP: u16 = 1 << 0;
const SLTSTA_PFD: u16 = 1 << 1;
const SLTSTA_MRLSC: u16 = 1 << 2;
/// Slot status: presence detect changed.
pub const SLTSTA_PDC: u16 = 1 << 3;
const SLTSTA_CC: u16 = 1 << 4;
/// Slot status: presence detect state.
pub const SLTSTA_PRESENCE: u16 = 1 << 6;
/// Slot status: data link layer state changed.
pub const SLTSTA_DLLSC: u16 = 1 << 8;

/// Where a root port's MSIs go: KVM_SIGNAL_MSI on the VM (`VmInterrupts`), a recorder in tests.
pub trait MsiSignal: Send + Sync {
    /// Sends one message.
    fn signal_msi(&self, msg: MsiMessage) -> Result<(), IrqError>;
}

/// What a guest write to a root port's configuration space did to its slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotWrite {
    /// The guest turned the slot's power off (power controller control went 0 to 1).
    pub powered_off: bool,
}

/// One root port and the slot behind it.
pub struct RootPort {
    config: ConfigSpace,
    pcie_cap: usize,
    msi_cap: usize,
    /// PCI device number on bus 0 (slot + 1): the port's requester ID is `00:dev.0`.
    device_number: u8,
    /// Whether the hot-plug interrupt condition is asserted (an enabled event is pending);
    /// an MSI goes out only when it goes from deasserted to asserted (PCIe 6.7.3.4).
    asserted: bool,
    /// Where the MSI goes (none before the first boot).
    msi: Option<Arc<dyn MsiSignal>>,
    /// What is plugged into the slot.
    pub device: Option<Box<dyn PciDevice>>,
    /// The guest powered the slot off to release a device (an unplug the VMM asked for, see
    /// [`Self::begin_settling`]) and has not turned its power indicator off yet. Linux's
    /// pciehp sleeps 1 s after powering a slot off and then drops every presence and link
    /// change reported meanwhile (`remove_board`: "ignore link or presence changes caused by
    /// power off"); only then does it turn the indicator off. A device plugged in that window
    /// and announced at once would never be seen. The power-off pciehp makes of every empty
    /// slot when it binds (`pcie_init`) has no such window, and no indicator write after it:
    /// it starts no settling.
    settling: bool,
    /// A device was hot-plugged while the slot was settling: its presence and link are up,
    /// their change report waits for the end of settling ([`Self::release`]).
    held: bool,
    /// Where the guest reads the port's registers without an exit, if anywhere.
    mirror: Option<Arc<EcamMirror>>,
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
            msi_cap,
            device_number: slot + 1,
            asserted: false,
            msi: None,
            device: None,
            settling: false,
            held: false,
            mirror: None,
        }
    }

    /// Publishes the port's registers to `mirror` from now on (see [`EcamMirror`]).
    pub fn set_mirror(&mut self, mirror: Arc<EcamMirror>) {
        self.mirror = Some(mirror);
        self.publish();
    }

    /// Copies the registers to where the guest reads them; after every change, before any
    /// interrupt that makes the guest read them.
    fn publish(&self) {
        if let Some(m) = &self.mirror {
            m.publish(usize::from(self.device_number), self.config.regs());
        }
    }

    /// Plugs `device` into the slot before the guest runs (cold plug): presence detected,
    /// link up, no change reported.
    pub fn plug(&mut self, device: Box<dyn PciDevice>) {
        self.device = Some(device);
        self.config
            .set_bits_u16(self.pcie_cap + PCIE_SLTSTA, SLTSTA_PRESENCE, true);
        self.config
            .set_bits_u16(self.pcie_cap + PCIE_LNKSTA, LNKSTA_DLLLA, true);
        self.publish();
    }

    /// Plugs `device` into the running guest's slot: presence and link come up together, and
    /// both change bits are reported at once, so pciehp powers the slot on and enumerates it
    /// without waiting on the attention button. Into a slot still settling from a power-off
    /// the report is held until the guest turns the power indicator off or powers the slot
    /// on, or [`Self::release`] is called; returns whether it was held.
    pub fn hot_plug(&mut self, device: Box<dyn PciDevice>) -> bool {
        self.plug(device);
        if self.settling {
            self.held = true;
        } else {
            self.set_status(SLTSTA_PDC | SLTSTA_DLLSC);
        }
        self.held
    }

    /// The guest just powered the slot off to release its device (the unplug the VMM asked
    /// for): the slot settles until the guest turns the power indicator off (at once if it
    /// already is) or powers the slot on again.
    pub fn begin_settling(&mut self) {
        self.settling = self.slot_control() & SLTCTL_PIC != SLTCTL_PIC_OFF && !self.powered();
    }

    /// Ends settling (the guest did not turn the power indicator off in time, or did) and
    /// reports a held plug.
    pub fn release(&mut self) {
        self.settling = false;
        if std::mem::take(&mut self.held) && self.device.is_some() {
            self.set_status(SLTSTA_PDC | SLTSTA_DLLSC);
        }
    }

    /// Whether the slot is settling from a power-off (a plug into it would be held).
    pub fn settling(&self) -> bool {
        self.settling
    }

    /// Presses the attention button: the guest's request to release the device.
    pub fn press_button(&mut self) {
        self.set_status(SLTSTA_ABP);
    }

    /// Takes the device out of the slot: presence and link go down and both changes are
    /// reported (to a guest that powered the slot off, pciehp ignores them; to one that did
    /// not, this is a surprise removal).
    pub fn remove(&mut self) -> Option<Box<dyn PciDevice>> {
        self.held = false;
        let device = self.device.take();
        self.config
            .set_bits_u16(self.pcie_cap + PCIE_SLTSTA, SLTSTA_PRESENCE, false);
        self.config
            .set_bits_u16(self.pcie_cap + PCIE_LNKSTA, LNKSTA_DLLLA, false);
        self.set_status(SLTSTA_PDC | SLTSTA_DLLSC);
        device
    }

    /// Whether the slot's power is on (power controller control 0).
    pub fn powered(&self) -> bool {
        self.slot_control() & SLTCTL_PCC == 0
    }

    fn slot_control(&self) -> u16 {
        self.config.u16(self.pcie_cap + PCIE_SLTCTL)
    }

    fn slot_status(&self) -> u16 {
        self.config.u16(self.pcie_cap + PCIE_SLTSTA)
    }

    /// Sets change bits of the slot status and raises the interrupt if that asserts it.
    fn set_status(&mut self, bits: u16) {
        self.config
            .set_bits_u16(self.pcie_cap + PCIE_SLTSTA, bits, true);
        self.publish();
        self.update_interrupt();
    }

    /// Whether an event the guest enabled is pending with hot-plug interrupts on.
    fn interrupt_condition(&self) -> bool {
        let ctl = self.slot_control();
        if ctl & SLTCTL_HPIE == 0 {
            return false;
        }
        let enabled = [
            (SLTCTL_ABPE, SLTSTA_ABP),
            (SLTCTL_PFDE, SLTSTA_PFD),
            (SLTCTL_MRLSCE, SLTSTA_MRLSC),
            (SLTCTL_PDCE, SLTSTA_PDC),
            (SLTCTL_CCIE, SLTSTA_CC),
            (SLTCTL_DLLSCE, SLTSTA_DLLSC),
        ]
        .iter()
        .filter(|(enable, _)| ctl & enable != 0)
        .fold(0, |acc, (_, event)| acc | event);
        self.slot_status() & enabled != 0
    }

    /// Re-evaluates the interrupt condition; sends the MSI on its rising edge.
    fn update_interrupt(&mut self) {
        let now = self.interrupt_condition();
        if now && !self.asserted {
            self.send_msi();
        }
        self.asserted = now;
    }

    /// The MSI the guest programmed, if it enabled MSI.
    pub fn msi_message(&self) -> Option<MsiMessage> {
        let c = self.msi_cap;
        if self.config.u16(c + MSI_CONTROL) & 1 == 0 {
            return None;
        }
        let address = u64::from(self.config.u32(c + MSI_ADDRESS_LO))
            | (u64::from(self.config.u32(c + MSI_ADDRESS_HI)) << 32);
        Some(MsiMessage {
            address,
            data: u32::from(self.config.u16(c + MSI_DATA)),
            devid: super::requester_id(0, self.device_number),
        })
    }

    fn send_msi(&self) {
        let (Some(msg), Some(sink)) = (self.msi_message(), self.msi.as_ref()) else {
            return;
        };
        if let Err(e) = sink.signal_msi(msg) {
            warn!(
                "root port 00:{:02x}.0: hot-plug MSI: {e}",
                self.device_number
            );
        }
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

    /// Guest write to the port's own configuration space. Slot control and status writes
    /// take effect at once (no command completed wait is advertised); clearing change bits
    /// or enabling events re-evaluates the interrupt.
    pub fn config_write(&mut self, offset: usize, data: &[u8]) -> SlotWrite {
        let was_powered = self.powered();
        self.config.write(offset, data);
        self.publish();
        let end = offset + data.len();
        let slot_regs = self.pcie_cap + PCIE_SLTCTL..self.pcie_cap + PCIE_SLTSTA + 2;
        let msi_control = self.msi_cap + MSI_CONTROL;
        if offset < slot_regs.end && slot_regs.start < end
            || offset < msi_control + 2 && msi_control < end
        {
            self.update_interrupt();
        }
        let indicator_off = self.slot_control() & SLTCTL_PIC == SLTCTL_PIC_OFF;
        if self.settling && (indicator_off || self.powered()) {
            self.release();
        }
        SlotWrite {
            powered_off: was_powered && !self.powered(),
        }
    }

    /// Back to power-on state (bus numbers and windows unassigned) wired to a new VM's MSIs;
    /// a plugged device stays.
    pub fn reset(&mut self, slot: u8, vm: &Arc<crate::irq::VmInterrupts>) {
        let device = self.device.take();
        let mirror = self.mirror.take();
        *self = Self::new(slot);
        self.msi = Some(vm.clone());
        self.mirror = mirror;
        self.publish();
        if let Some(mut d) = device {
            d.reset(vm);
            self.plug(d);
        }
    }

    /// Wires the port's MSIs to `sink` (tests).
    #[cfg(test)]
    fn set_msi_signal(&mut self, sink: Arc<dyn MsiSignal>) {
        self.msi = Some(sink);
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

    /// Records the MSIs a port sends.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<MsiMessage>>);
    impl MsiSignal for Recorder {
        fn signal_msi(&self, msg: MsiMessage) -> Result<(), IrqError> {
            self.0.lock().expect("lock").push(msg);
            Ok(())
        }
    }

    struct Nothing;
    impl PciDevice for Nothing {
        fn config_read(&mut self, _bus: u8, _offset: usize, data: &mut [u8]) {
            data.fill(0)
        }
        fn config_write(&mut self, _bus: u8, _offset: usize, _data: &[u8]) {}
        fn reset(&mut self, _vm: &Arc<crate::irq::VmInterrupts>) {}
        fn name(&self) -> String {
            "nothing".into()
        }
    }

    /// A port on slot 2 (device 00:03.0) whose MSI the guest programmed and enabled.
    fn port_with_msi() -> (RootPort, Arc<Recorder>) {
        let mut rp = RootPort::new(2);
        let rec = Arc::new(Recorder::default());
        rp.set_msi_signal(rec.clone());
        let msi = rp.msi_cap;
        rp.config_write(msi + MSI_ADDRESS_LO, &0x0809_0040u32.to_le_bytes());
        rp.config_write(msi + MSI_DATA, &0x0007u16.to_le_bytes());
        rp.config_write(msi + MSI_CONTROL, &1u16.to_le_bytes());
        (rp, rec)
    }

    fn sent(rec: &Recorder) -> usize {
        rec.0.lock().expect("lock").len()
    }

    fn write_ctl(rp: &mut RootPort, v: u16) -> SlotWrite {
        let off = rp.pcie_cap + PCIE_SLTCTL;
        rp.config_write(off, &v.to_le_bytes())
    }

    fn clear_sta(rp: &mut RootPort, v: u16) {
        let off = rp.pcie_cap + PCIE_SLTSTA;
        rp.config_write(off, &v.to_le_bytes());
    }

    const PCIEHP_ENABLES: u16 = SLTCTL_ABPE | SLTCTL_PDCE | SLTCTL_HPIE | SLTCTL_DLLSCE;

    #[test]
    fn test_root_port_slot_advertises_what_pciehp_needs() {
        let rp = RootPort::new(0);
        let sltcap = rp.config.u32(rp.pcie_cap + PCIE_SLTCAP);
        // Attention button, power controller, attention and power indicators, surprise,
        // hot-plug capable, no command completed.
        for bit in [0, 1, 3, 4, 5, 6, 18] {
            assert_ne!(sltcap & (1 << bit), 0, "slot capability bit {bit}");
        }
        let lnkcap = rp.config.u32(rp.pcie_cap + PCIE_LNKCAP);
        assert_ne!(lnkcap & (1 << 20), 0, "DLLLARC: Linux does not sleep 1.1 s");
        assert!(rp.powered(), "slots power up on");
    }

    #[test]
    fn test_root_port_hot_plug_raises_presence_and_link_with_one_msi() {
        let (mut rp, rec) = port_with_msi();
        write_ctl(&mut rp, PCIEHP_ENABLES);
        assert_eq!(sent(&rec), 0, "nothing pending");
        rp.hot_plug(Box::new(Nothing));
        let sta = rp.slot_status();
        assert_eq!(
            sta & (SLTSTA_PRESENCE | SLTSTA_PDC | SLTSTA_DLLSC),
            SLTSTA_PRESENCE | SLTSTA_PDC | SLTSTA_DLLSC
        );
        assert_ne!(rp.config.u16(rp.pcie_cap + PCIE_LNKSTA) & LNKSTA_DLLLA, 0);
        assert_eq!(sent(&rec), 1, "both changes, one MSI");
        let msg = rec.0.lock().expect("lock")[0];
        assert_eq!(
            msg,
            MsiMessage {
                address: 0x0809_0040,
                data: 7,
                devid: 0x18, // 00:03.0
            }
        );
        // Write-1-to-clear: clearing one change bit leaves the other pending, no new MSI
        // (all event bits must be zero before the port sends another).
        clear_sta(&mut rp, SLTSTA_PDC);
        assert_eq!(rp.slot_status() & (SLTSTA_PDC | SLTSTA_DLLSC), SLTSTA_DLLSC);
        // Writing 0 to a change bit or to presence changes nothing.
        clear_sta(&mut rp, 0);
        assert_ne!(rp.slot_status() & SLTSTA_DLLSC, 0);
        assert_ne!(
            rp.slot_status() & SLTSTA_PRESENCE,
            0,
            "presence is read-only"
        );
        clear_sta(&mut rp, SLTSTA_DLLSC | SLTSTA_PRESENCE);
        assert_eq!(rp.slot_status(), SLTSTA_PRESENCE);
        assert_eq!(sent(&rec), 1);
        // A new event after all bits cleared interrupts again.
        rp.press_button();
        assert_eq!(sent(&rec), 2);
    }

    #[test]
    fn test_root_port_events_interrupt_only_while_enabled() {
        let (mut rp, rec) = port_with_msi();
        // Hot-plug interrupts off: the status bits are set, no MSI.
        write_ctl(&mut rp, SLTCTL_PDCE | SLTCTL_DLLSCE);
        rp.hot_plug(Box::new(Nothing));
        assert_eq!(sent(&rec), 0);
        // Enabling HPIE with an enabled event pending asserts the condition: one MSI.
        write_ctl(&mut rp, SLTCTL_PDCE | SLTCTL_DLLSCE | SLTCTL_HPIE);
        assert_eq!(sent(&rec), 1);
        clear_sta(&mut rp, SLTSTA_PDC | SLTSTA_DLLSC);
        // The button's event is not enabled: no MSI for it.
        rp.press_button();
        assert_eq!(sent(&rec), 1);
        assert_ne!(rp.slot_status() & SLTSTA_ABP, 0);
        clear_sta(&mut rp, SLTSTA_ABP);
        // MSI disabled: nothing is sent even with everything enabled.
        let msi = rp.msi_cap;
        rp.config_write(msi + MSI_CONTROL, &0u16.to_le_bytes());
        write_ctl(&mut rp, PCIEHP_ENABLES);
        rp.press_button();
        assert_eq!(sent(&rec), 1);
    }

    #[test]
    fn test_root_port_power_off_is_reported_once_and_removal_clears_presence() {
        let (mut rp, rec) = port_with_msi();
        rp.plug(Box::new(Nothing));
        write_ctl(&mut rp, PCIEHP_ENABLES);
        assert_eq!(sent(&rec), 0, "a cold-plugged device reports no change");
        rp.press_button();
        assert_eq!(sent(&rec), 1);
        clear_sta(&mut rp, SLTSTA_ABP);
        // pciehp blinks the power indicator (power stays on), then powers the slot off.
        let blink = PCIEHP_ENABLES | (2 << 8);
        assert_eq!(write_ctl(&mut rp, blink), SlotWrite::default());
        let off = PCIEHP_ENABLES | (3 << 8) | SLTCTL_PCC;
        assert!(write_ctl(&mut rp, off).powered_off);
        assert!(!rp.powered());
        assert!(!write_ctl(&mut rp, off).powered_off, "already off");
        assert!(rp.remove().is_some());
        assert_eq!(rp.slot_status() & SLTSTA_PRESENCE, 0);
        assert_eq!(rp.config.u16(rp.pcie_cap + PCIE_LNKSTA) & LNKSTA_DLLLA, 0);
        assert_eq!(
            rp.slot_status() & (SLTSTA_PDC | SLTSTA_DLLSC),
            SLTSTA_PDC | SLTSTA_DLLSC
        );
        assert_eq!(sent(&rec), 2);
        // Power back on (pciehp does before enumerating a new card).
        assert!(!write_ctl(&mut rp, PCIEHP_ENABLES).powered_off);
        assert!(rp.powered());
    }

    /// Linux's pciehp after an unplug: power off (indicator blinking), 1 s during which it
    /// drops presence and link changes, then power indicator off.
    fn unplug_like_pciehp(rp: &mut RootPort) {
        rp.press_button();
        clear_sta(rp, SLTSTA_ABP);
        let blink = PCIEHP_ENABLES | (2 << 8);
        write_ctl(rp, blink);
        assert!(write_ctl(rp, blink | SLTCTL_PCC).powered_off);
        // The host's part: the power-off of a slot whose unplug it asked for.
        rp.begin_settling();
        assert!(rp.remove().is_some());
        clear_sta(rp, SLTSTA_PDC | SLTSTA_DLLSC);
        assert!(rp.settling());
    }

    #[test]
    fn test_root_port_empty_slot_powered_off_at_bind_does_not_settle() {
        let (mut rp, rec) = port_with_msi();
        // pciehp's pcie_init: an empty slot that is powered is powered off, notifications
        // off, no indicator write.
        assert!(write_ctl(&mut rp, SLTCTL_PCC).powered_off);
        write_ctl(&mut rp, PCIEHP_ENABLES | SLTCTL_PCC);
        assert!(!rp.settling());
        assert!(!rp.hot_plug(Box::new(Nothing)), "announced at once");
        assert_eq!(sent(&rec), 1);
    }

    #[test]
    fn test_root_port_plug_into_settling_slot_held_until_indicator_off() {
        let (mut rp, rec) = port_with_msi();
        rp.plug(Box::new(Nothing));
        write_ctl(&mut rp, PCIEHP_ENABLES);
        unplug_like_pciehp(&mut rp);
        let before = sent(&rec);
        // Plugged during pciehp's 1 s: presence and link up, no change reported yet.
        assert!(rp.hot_plug(Box::new(Nothing)), "held");
        assert_ne!(rp.slot_status() & SLTSTA_PRESENCE, 0);
        assert_eq!(rp.slot_status() & (SLTSTA_PDC | SLTSTA_DLLSC), 0);
        assert_eq!(sent(&rec), before);
        // The guest turns the power indicator off: it is done, the plug is reported.
        write_ctl(&mut rp, PCIEHP_ENABLES | SLTCTL_PIC_OFF | SLTCTL_PCC);
        assert!(!rp.settling());
        assert_eq!(
            rp.slot_status() & (SLTSTA_PDC | SLTSTA_DLLSC),
            SLTSTA_PDC | SLTSTA_DLLSC
        );
        assert_eq!(sent(&rec), before + 1);
        // Later writes report nothing more.
        clear_sta(&mut rp, SLTSTA_PDC | SLTSTA_DLLSC);
        write_ctl(&mut rp, PCIEHP_ENABLES | SLTCTL_PIC_OFF | SLTCTL_PCC);
        assert_eq!(sent(&rec), before + 1);
    }

    #[test]
    fn test_root_port_held_plug_released_by_bound_or_power_on_once() {
        let (mut rp, rec) = port_with_msi();
        rp.plug(Box::new(Nothing));
        write_ctl(&mut rp, PCIEHP_ENABLES);
        unplug_like_pciehp(&mut rp);
        let before = sent(&rec);
        assert!(rp.hot_plug(Box::new(Nothing)));
        // A guest that never turns the indicator off: the bound releases the report.
        rp.release();
        assert_eq!(sent(&rec), before + 1);
        rp.release();
        assert_eq!(sent(&rec), before + 1, "reported once");
        // A plug into a slot that is not settling is reported at once; a power-on ends
        // settling too.
        clear_sta(&mut rp, SLTSTA_PDC | SLTSTA_DLLSC);
        write_ctl(&mut rp, PCIEHP_ENABLES);
        assert!(rp.powered());
        assert!(rp.remove().is_some());
        clear_sta(&mut rp, SLTSTA_PDC | SLTSTA_DLLSC);
        assert!(!rp.hot_plug(Box::new(Nothing)));
        assert_eq!(sent(&rec), before + 3);
        // Unplugged while held: nothing is reported for the device that went.
        clear_sta(&mut rp, SLTSTA_PDC | SLTSTA_DLLSC);
        let blink = PCIEHP_ENABLES | (2 << 8);
        assert!(write_ctl(&mut rp, blink | SLTCTL_PCC).powered_off);
        rp.begin_settling();
        assert!(rp.remove().is_some());
        clear_sta(&mut rp, SLTSTA_PDC | SLTSTA_DLLSC);
        assert!(rp.hot_plug(Box::new(Nothing)));
        assert!(rp.remove().is_some());
        clear_sta(&mut rp, SLTSTA_PDC | SLTSTA_DLLSC);
        rp.release();
        assert_eq!(rp.slot_status() & (SLTSTA_PDC | SLTSTA_DLLSC), 0);
    }

    /// Reads the slot status the guest would read from memory when the MSI goes out.
    struct Reader(Arc<EcamMirror>, usize, std::sync::Mutex<Vec<u16>>);
    impl MsiSignal for Reader {
        fn signal_msi(&self, _msg: MsiMessage) -> Result<(), IrqError> {
            let regs = self.0.published(3);
            let status = u16::from_le_bytes([regs[self.1], regs[self.1 + 1]]);
            self.2.lock().expect("lock").push(status);
            Ok(())
        }
    }

    #[test]
    fn test_root_port_publishes_its_registers_before_the_hot_plug_msi() {
        let mirror = Arc::new(EcamMirror::new(4).expect("mirror"));
        let (mut rp, _) = port_with_msi();
        rp.set_mirror(mirror.clone());
        let reader = Arc::new(Reader(
            mirror.clone(),
            rp.pcie_cap + PCIE_SLTSTA,
            std::sync::Mutex::new(Vec::new()),
        ));
        rp.set_msi_signal(reader.clone());
        write_ctl(
            &mut rp,
            SLTCTL_HPIE | SLTCTL_PDCE | SLTCTL_DLLSCE | SLTCTL_ABPE,
        );
        rp.hot_plug(Box::new(Nothing));
        rp.config_write(rp.pcie_cap + PCIE_SLTSTA, &0xffffu16.to_le_bytes());
        rp.press_button();
        let seen = reader.2.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2, "{seen:x?}");
        assert_eq!(
            seen[0] & (SLTSTA_PDC | SLTSTA_DLLSC),
            SLTSTA_PDC | SLTSTA_DLLSC
        );
        assert_eq!(seen[1] & SLTSTA_ABP, SLTSTA_ABP);
        let published = mirror.published(3);
        assert_eq!(published, &rp.config.regs()[..]);
    }
}
