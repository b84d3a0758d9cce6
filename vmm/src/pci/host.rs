//! The PCIe host bridge: ECAM configuration access for bus 0 (the host bridge function and
//! the root ports) and for the one device behind each root port.

use std::sync::{Arc, Mutex};

use log::{debug, info, warn};

use super::config::ConfigSpace;
use super::mirror::EcamMirror;
use super::root_port::{RootPort, VENDOR_REDHAT};
use super::PciDevice;
use crate::irq::VmInterrupts;
use crate::mmio::MmioDevice;

/// Device ID of a generic PCIe host bridge.
const DEVICE_HOST_BRIDGE: u16 = 0x0008;
/// Class code of a host bridge.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// Errors building the PCIe topology.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// No free slot.
    #[error("all {0} PCIe slots are taken")]
    NoFreeSlot(usize),
    /// Too many slots asked for.
    #[error("{0} PCIe slots asked for; bus 0 has room for 1 to 31")]
    SlotCount(usize),
}

struct Topology {
    host_bridge: ConfigSpace,
    /// Bus 0's registers where the guest reads them without an exit (see [`EcamMirror`]).
    mirror: Option<Arc<EcamMirror>>,
    ports: Vec<RootPort>,
    /// Slots whose attention button was pressed for an unplug: their power-off is reported.
    unplugging: Vec<bool>,
    /// The running VM's interrupts (a hot-plugged function is wired to them).
    irq: Option<Arc<VmInterrupts>>,
}

/// What to call when the guest powers off a slot being unplugged (with the slot).
pub type PowerOffNotify = Box<dyn Fn(usize) + Send>;

/// The host bridge and everything below it.
pub struct PcieHost {
    inner: Mutex<Topology>,
    on_power_off: Mutex<Option<PowerOffNotify>>,
}

/// Bus, device, function and register of an ECAM offset.
fn decode(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

enum Target {
    HostBridge,
    Port(usize),
    Device(usize),
    None,
}

impl Topology {
    fn target(&self, bus: u8, dev: u8, func: u8) -> Target {
        if func != 0 {
            return Target::None;
        }
        if bus == 0 {
            return match dev {
                0 => Target::HostBridge,
                d if usize::from(d) <= self.ports.len() => Target::Port(usize::from(d) - 1),
                _ => Target::None,
            };
        }
        if dev != 0 {
            return Target::None;
        }
        self.ports
            .iter()
            .position(|p| p.secondary_bus() == Some(bus) && p.device.is_some())
            .map_or(Target::None, Target::Device)
    }
}

impl PcieHost {
    /// A host bridge with `slots` empty root ports (devices 1 to `slots` on bus 0).
    pub fn new(slots: usize) -> Result<Self, PciError> {
        if !(1..=bulkhead_firmware::layout::MAX_PCI_SLOTS).contains(&slots) {
            return Err(PciError::SlotCount(slots));
        }
        let mut host_bridge = ConfigSpace::new();
        host_bridge.header(VENDOR_REDHAT, DEVICE_HOST_BRIDGE, CLASS_HOST_BRIDGE, 0, 0);
        let mut ports: Vec<RootPort> = (0..slots).map(|s| RootPort::new(s as u8)).collect();
        // The host bridge is device 0, the root ports 1 to `slots`.
        let mirror = match EcamMirror::new(slots + 1) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                warn!("cannot map memory for bus 0's configuration registers ({e}): every read of them is an exit");
                None
            }
        };
        if let Some(m) = &mirror {
            m.publish(0, host_bridge.regs());
            for p in &mut ports {
                p.set_mirror(m.clone());
            }
        }
        Ok(Self {
            inner: Mutex::new(Topology {
                host_bridge,
                mirror,
                ports,
                unplugging: vec![false; slots],
                irq: None,
            }),
            on_power_off: Mutex::new(None),
        })
    }

    /// Gives a new VM bus 0's configuration registers as read-only memory at the ECAM window
    /// `ecam` (see [`EcamMirror`]); without KVM's read-only slots, or if KVM refuses them,
    /// every access exits as before.
    pub fn map_mirror(&self, kvm: &kvm_ioctls::Kvm, vm: &kvm_ioctls::VmFd, ecam: u64) {
        let t = self.lock();
        let Some(m) = &t.mirror else { return };
        if !kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
            info!("KVM has no read-only memory slots: every PCI configuration access is an exit");
            return;
        }
        match m.map(vm, ecam) {
            Ok(n) => info!(
                "PCI: bus 0's configuration registers are read from memory ({n} read-only slot(s)); writes exit"
            ),
            Err(e) => warn!(
                "KVM refused bus 0's configuration registers as memory ({e}): every PCI configuration access is an exit"
            ),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of root ports.
    pub fn slots(&self) -> usize {
        self.lock().ports.len()
    }

    /// The PCI device number of the first empty slot's root port on bus 0, if any.
    /// A slot settling from a power-off is taken only when no other is free (a plug into it
    /// is announced late, see [`RootPort::hot_plug`]).
    pub fn free_slot(&self) -> Option<usize> {
        let t = self.lock();
        let free = |settling: bool| {
            t.ports
                .iter()
                .position(|p| p.device.is_none() && p.settling() == settling)
        };
        free(false).or_else(|| free(true))
    }

    /// Plugs `device` into slot `slot`.
    pub fn plug(&self, slot: usize, device: Box<dyn PciDevice>) -> Result<(), PciError> {
        let mut t = self.lock();
        let n = t.ports.len();
        match t.ports.get_mut(slot) {
            Some(p) if p.device.is_none() => {
                p.plug(device);
                Ok(())
            }
            _ => Err(PciError::NoFreeSlot(n)),
        }
    }

    /// Unplugs every device (the VM is shutting down); dropping them closes their device
    /// processes' connections.
    pub fn unplug_all(&self) -> Vec<Box<dyn PciDevice>> {
        self.lock()
            .ports
            .iter_mut()
            .filter_map(|p| p.device.take())
            .collect()
    }

    /// The bus number the guest gave the device in `slot` (its root port's secondary bus),
    /// if the slot holds a device and the guest enumerated it. For `vm.info`.
    pub fn device_bus(&self, slot: usize) -> Option<u8> {
        let t = self.lock();
        let p = t.ports.get(slot)?;
        p.device.as_ref()?;
        p.secondary_bus()
    }

    /// Back to power-on state for a new VM: bus numbers unassigned, devices reset, no
    /// unplug under way.
    pub fn reset(&self, vm: &Arc<VmInterrupts>) {
        let mut t = self.lock();
        for (slot, p) in t.ports.iter_mut().enumerate() {
            p.reset(slot as u8, vm);
        }
        t.unplugging.fill(false);
        t.irq = Some(vm.clone());
    }

    /// The running VM's GSIs held and MSI routes set (none before the first boot).
    pub fn interrupt_usage(&self) -> Option<(usize, usize)> {
        self.lock().irq.as_ref().map(|irq| irq.usage())
    }

    /// Sets what is called (outside the host's lock, on the vCPU thread that made the
    /// write) when the guest powers off a slot whose unplug was requested.
    pub fn set_power_off_notify(&self, notify: PowerOffNotify) {
        *self.on_power_off.lock().unwrap_or_else(|e| e.into_inner()) = Some(notify);
    }

    /// Plugs `device` into empty slot `slot` of the running guest, wired to its interrupts,
    /// and announces it (presence and link up, both changes reported); `Ok(true)`: the slot is
    /// settling from a power-off and the announcement is held (see [`RootPort::hot_plug`]).
    pub fn hot_plug(&self, slot: usize, mut device: Box<dyn PciDevice>) -> Result<bool, PciError> {
        let mut t = self.lock();
        let n = t.ports.len();
        if t.ports.get(slot).is_none_or(|p| p.device.is_some()) {
            return Err(PciError::NoFreeSlot(n));
        }
        if let Some(irq) = t.irq.clone() {
            device.reset(&irq);
        }
        Ok(t.ports[slot].hot_plug(device))
    }

    /// Reports slot `slot`'s held plug, if it has one (see [`RootPort::hot_plug`]).
    pub fn release(&self, slot: usize) {
        if let Some(p) = self.lock().ports.get_mut(slot) {
            p.release();
        }
    }

    /// Presses slot `slot`'s attention button to ask the guest to release its device; the
    /// guest powering the slot off is then reported. False if the slot is empty.
    pub fn request_unplug(&self, slot: usize) -> bool {
        let mut t = self.lock();
        if t.ports.get(slot).is_none_or(|p| p.device.is_none()) {
            return false;
        }
        t.unplugging[slot] = true;
        t.ports[slot].press_button();
        true
    }

    /// Takes the device out of slot `slot` (presence and link down, reported to the guest).
    pub fn remove(&self, slot: usize) -> Option<Box<dyn PciDevice>> {
        let mut t = self.lock();
        if let Some(u) = t.unplugging.get_mut(slot) {
            *u = false;
        }
        t.ports.get_mut(slot).and_then(RootPort::remove)
    }

    /// Whether slot `slot`'s power is on.
    pub fn powered(&self, slot: usize) -> bool {
        self.lock().ports.get(slot).is_some_and(RootPort::powered)
    }

    /// The guest's address of the function in slot `slot`: `0000:BB:00.0` with the secondary
    /// bus the guest gave the slot's root port (`None` while it has not numbered it).
    pub fn bdf(&self, slot: usize) -> Option<String> {
        let bus = self.lock().ports.get(slot)?.secondary_bus()?;
        Some(format!("0000:{bus:02x}:00.0"))
    }
}

impl MmioDevice for PcieHost {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = decode(offset);
        let mut t = self.lock();
        data.fill(0xff);
        match t.target(bus, dev, func) {
            Target::HostBridge => t.host_bridge.read(reg, data),
            Target::Port(i) => t.ports[i].config_read(reg, data),
            Target::Device(i) => {
                if let Some(d) = t.ports[i].device.as_mut() {
                    d.config_read(bus, reg, data)
                }
            }
            Target::None => {}
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = decode(offset);
        let mut t = self.lock();
        match t.target(bus, dev, func) {
            Target::HostBridge => {
                t.host_bridge.write(reg, data);
                if let Some(m) = &t.mirror {
                    m.publish(0, t.host_bridge.regs());
                }
            }
            Target::Port(i) => {
                let w = t.ports[i].config_write(reg, data);
                if w.powered_off && t.unplugging[i] {
                    t.ports[i].begin_settling();
                    drop(t);
                    if let Some(notify) = self
                        .on_power_off
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                    {
                        notify(i);
                    }
                }
            }
            Target::Device(i) => {
                if let Some(d) = t.ports[i].device.as_mut() {
                    d.config_write(bus, reg, data)
                }
            }
            Target::None => debug!("config write to absent {bus:02x}:{dev:02x}.{func}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::root_port::{SLTCTL_ABPE, SLTCTL_HPIE, SLTCTL_PDCE, SLTSTA_DLLSC, SLTSTA_PDC};

    fn ecam(bus: u8, dev: u8, func: u8, reg: u64) -> u64 {
        (u64::from(bus) << 20) | (u64::from(dev) << 15) | (u64::from(func) << 12) | reg
    }

    fn read32(h: &PcieHost, off: u64) -> u32 {
        let mut d = [0u8; 4];
        h.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    struct Dummy(ConfigSpace);
    impl PciDevice for Dummy {
        fn config_read(&mut self, _bus: u8, offset: usize, data: &mut [u8]) {
            self.0.read(offset, data)
        }
        fn config_write(&mut self, _bus: u8, offset: usize, data: &[u8]) {
            self.0.write(offset, data)
        }
        fn reset(&mut self, _vm: &std::sync::Arc<VmInterrupts>) {}
        fn name(&self) -> String {
            "dummy".into()
        }
    }

    #[test]
    fn test_pcie_host_enumeration_through_root_port() {
        let h = PcieHost::new(2).expect("host");
        assert_eq!(read32(&h, ecam(0, 0, 0, 0)), 0x0008_1b36);
        assert_eq!(read32(&h, ecam(0, 1, 0, 0)), 0x000c_1b36);
        assert_eq!(read32(&h, ecam(0, 2, 0, 0)), 0x000c_1b36);
        assert_eq!(read32(&h, ecam(0, 3, 0, 0)), 0xffff_ffff, "no third port");
        assert_eq!(read32(&h, ecam(0, 1, 1, 0)), 0xffff_ffff, "no function 1");
        let mut c = ConfigSpace::new();
        c.header(0x1af4, 0x1042, 0x01_00_00, 1, 0);
        h.plug(1, Box::new(Dummy(c))).expect("plug");
        assert!(h.plug(1, Box::new(Dummy(ConfigSpace::new()))).is_err());
        // Behind an unnumbered bridge nothing answers.
        assert_eq!(read32(&h, ecam(2, 0, 0, 0)), 0xffff_ffff);
        // The guest numbers port 2's secondary bus 2.
        h.write(ecam(0, 2, 0, 0x18), &[0, 2, 2, 0]);
        assert_eq!(read32(&h, ecam(2, 0, 0, 0)), 0x1042_1af4);
        assert_eq!(read32(&h, ecam(2, 1, 0, 0)), 0xffff_ffff);
        assert_eq!(read32(&h, ecam(3, 0, 0, 0)), 0xffff_ffff);
        assert_eq!(h.free_slot(), Some(0));
    }

    #[test]
    fn test_pcie_host_power_off_reported_only_for_a_requested_unplug() {
        let h = PcieHost::new(2).expect("host");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        h.set_power_off_notify(Box::new(move |slot| {
            record.lock().expect("lock").push(slot)
        }));
        h.plug(0, Box::new(Dummy(ConfigSpace::new())))
            .expect("plug");
        h.plug(1, Box::new(Dummy(ConfigSpace::new())))
            .expect("plug");
        // Slot Control of the root ports 00:01.0 and 00:02.0 (PCIe capability at 0x40).
        let sltctl = |dev| ecam(0, dev, 0, 0x40 + 0x18);
        let power_off = (1u16 << 10).to_le_bytes();
        let power_on = 0u16.to_le_bytes();
        // pciehp powering off a slot nobody asked to unplug: nothing happens.
        h.write(sltctl(1), &power_off);
        assert!(seen.lock().expect("lock").is_empty());
        assert!(!h.powered(0));
        h.write(sltctl(1), &power_on);
        assert!(h.request_unplug(1));
        h.write(sltctl(2), &(3u16 << 8).to_le_bytes()); // indicators only
        h.write(sltctl(2), &power_off);
        h.write(sltctl(2), &power_off); // already off: no second report
        assert_eq!(*seen.lock().expect("lock"), [1]);
        assert!(h.remove(1).is_some());
        assert!(h.remove(1).is_none());
        assert!(!h.request_unplug(1), "an empty slot has nothing to unplug");
        assert_eq!(h.free_slot(), Some(1));
        // The slot's power coming back and going again is no report: no unplug asked.
        h.write(sltctl(2), &power_on);
        h.write(sltctl(2), &power_off);
        assert_eq!(*seen.lock().expect("lock"), [1]);
    }

    #[test]
    fn test_pcie_host_plug_avoids_then_waits_out_a_settling_slot() {
        let h = PcieHost::new(3).expect("host");
        h.plug(0, Box::new(Dummy(ConfigSpace::new())))
            .expect("plug");
        let sltctl = |dev| ecam(0, dev, 0, 0x40 + 0x18);
        let sltsta = |dev| ecam(0, dev, 0, 0x40 + 0x1a);
        let changes = |dev| {
            let mut d = [0u8; 2];
            h.read(sltsta(dev), &mut d);
            u16::from_le_bytes(d) & (SLTSTA_PDC | SLTSTA_DLLSC)
        };
        // pciehp powers slot 0 off (power indicator blinking) and is in its 1 s wait.
        assert!(h.request_unplug(0));
        h.write(sltctl(1), &((1u16 << 10) | (2 << 8)).to_le_bytes());
        assert!(h.remove(0).is_some());
        h.write(sltsta(1), &0xffffu16.to_le_bytes());
        // Another free slot is taken first, and announced at once.
        assert_eq!(h.free_slot(), Some(1));
        assert!(!h
            .hot_plug(1, Box::new(Dummy(ConfigSpace::new())))
            .expect("plug"));
        assert_ne!(changes(2), 0);
        // With only the settling slot left, the plug goes there, held.
        assert_eq!(h.free_slot(), Some(2));
        h.plug(2, Box::new(Dummy(ConfigSpace::new())))
            .expect("plug");
        assert_eq!(h.free_slot(), Some(0));
        assert!(h
            .hot_plug(0, Box::new(Dummy(ConfigSpace::new())))
            .expect("plug"));
        assert_eq!(changes(1), 0);
        // pciehp turns the power indicator off: the plug is announced.
        h.write(sltctl(1), &((1u16 << 10) | (3 << 8)).to_le_bytes());
        assert_eq!(changes(1), SLTSTA_PDC | SLTSTA_DLLSC);
    }

    #[test]
    fn test_pcie_host_empty_slot_powered_off_at_bind_plugs_at_once() {
        let h = PcieHost::new(1).expect("host");
        // pciehp binding an empty, powered slot powers it off (no unplug was asked).
        h.write(ecam(0, 1, 0, 0x40 + 0x18), &(1u16 << 10).to_le_bytes());
        assert!(!h.powered(0));
        assert!(!h
            .hot_plug(0, Box::new(Dummy(ConfigSpace::new())))
            .expect("plug"));
    }

    /// The registers the guest reads from memory are the ones the emulation answers, after
    /// every kind of change: guest writes, a hot-plug, an unplug request, a removal.
    #[test]
    fn test_pcie_host_mirror_follows_every_change() {
        let h = PcieHost::new(3).expect("host");
        let same = |h: &PcieHost, when: &str| {
            let t = h.lock();
            let m = t.mirror.clone().expect("mirror");
            drop(t);
            for dev in 0..=3u8 {
                let mut want = vec![0u8; 4096];
                for (i, w) in want.chunks_exact_mut(4).enumerate() {
                    h.read(ecam(0, dev, 0, 4 * i as u64), w);
                }
                assert_eq!(
                    m.published(usize::from(dev)),
                    &want[..],
                    "00:{dev:02x}.0 {when}"
                );
            }
        };
        same(&h, "at start");
        h.write(ecam(0, 0, 0, 4), &[6, 0]);
        h.write(ecam(0, 2, 0, 0x18), &[0, 2, 2, 0]);
        let sltctl = |dev| ecam(0, dev, 0, 0x40 + 0x18);
        h.write(
            sltctl(2),
            &(SLTCTL_HPIE | SLTCTL_PDCE | SLTCTL_ABPE).to_le_bytes(),
        );
        same(&h, "after guest writes");
        h.hot_plug(1, Box::new(Dummy(ConfigSpace::new())))
            .expect("plug");
        same(&h, "after a hot-plug");
        assert!(h.request_unplug(1));
        same(&h, "after an unplug request");
        assert!(h.remove(1).is_some());
        same(&h, "after a removal");
        // Change bits cleared by the guest (write 1 to clear).
        h.write(ecam(0, 2, 0, 0x40 + 0x1a), &0xffffu16.to_le_bytes());
        same(&h, "after clearing change bits");
    }

    #[test]
    fn test_pcie_host_slot_count_bounds() {
        assert!(PcieHost::new(0).is_err());
        assert!(PcieHost::new(32).is_err());
        assert!(PcieHost::new(31).is_ok());
    }
}
