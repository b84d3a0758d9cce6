//! PCI Express: an ECAM host bridge on bus 0 with a row of root ports, each a slot that holds
//! at most one device (bus N, device 0, function 0 behind it). Devices get MSI-X through the
//! GICv3 ITS (`msix`), or on a GICv2 through a GICv2m frame (`gicv2m`).

pub mod config;
pub mod gicv2m;
pub mod host;
pub mod mirror;
pub mod msix;
pub mod root_port;

/// A PCI function as the configuration space sees it.
pub trait PciDevice: Send {
    /// A guest read of `data.len()` (1, 2 or 4) bytes at `offset` into configuration space;
    /// `bus` is the bus number the guest gave the slot (the function is device 0 on it).
    fn config_read(&mut self, bus: u8, offset: usize, data: &mut [u8]);
    /// A guest write at `offset` into configuration space.
    fn config_write(&mut self, bus: u8, offset: usize, data: &[u8]);
    /// The VM is being rebooted: back to the power-on state, wired to the new VM.
    fn reset(&mut self, vm: &std::sync::Arc<crate::irq::VmInterrupts>);
    /// A short name for logs.
    fn name(&self) -> String;
}

/// PCI requester ID (bus, device, function) of function 0 of `device` on `bus`.
pub fn requester_id(bus: u8, device: u8) -> u32 {
    (u32::from(bus) << 8) | (u32::from(device) << 3)
}
