//! The GICv2m MSI frame a GICv2 guest sees (`arm,gic-v2m-frame` in the device tree): the MSI
//! controller PCI devices use where there is no ITS. Its registers say which SPIs it hands
//! out; an MSI is a write of an SPI's interrupt ID to MSI_SETSPI_NS. The functions' MSIs never
//! reach this frame: the VMM routes each MSI-X vector (a KVM irqchip route, `irq.rs`) and each
//! root port MSI (`VmInterrupts::signal_msi`) straight to the SPI it names.

use bulkhead_firmware::layout::{GIC_V2M_SPI_COUNT, GIC_V2M_SPI_FIRST, SPI_BASE};
use log::debug;

use crate::mmio::MmioDevice;

/// MSI_TYPER: first SPI's interrupt ID (bits 25:16) and number of SPIs (bits 9:0).
const MSI_TYPER: u64 = 0x008;
/// MSI_IIDR: implementer (0: no known quirk applies).
const MSI_IIDR: u64 = 0xfcc;

/// The frame's registers.
#[derive(Debug, Default)]
pub struct Gicv2mFrame;

impl MmioDevice for Gicv2mFrame {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            MSI_TYPER => ((SPI_BASE + GIC_V2M_SPI_FIRST) << 16) | GIC_V2M_SPI_COUNT,
            MSI_IIDR => 0,
            _ => 0,
        };
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        // A CPU write to the doorbell: no device's MSI comes this way (see above).
        debug!(
            "GICv2m frame: write of {} bytes at {offset:#x} ignored",
            data.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gicv2m_frame_typer_names_the_spis() {
        let mut d = [0u8; 4];
        Gicv2mFrame.read(MSI_TYPER, &mut d);
        let typer = u32::from_le_bytes(d);
        assert_eq!(typer >> 16, SPI_BASE + GIC_V2M_SPI_FIRST);
        assert_eq!(typer & 0x3ff, GIC_V2M_SPI_COUNT);
        Gicv2mFrame.read(MSI_IIDR, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
