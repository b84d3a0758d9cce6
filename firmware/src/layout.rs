//! The guest physical memory map of Bulkhead's arm64 machine.
//!
//! It keeps QEMU `virt`'s addresses so that the edk2 ArmVirtQemu firmware and guests written
//! for `virt` find things where they expect them:
//!
//! | range                          | what                                        |
//! |--------------------------------|---------------------------------------------|
//! | `0x0000_0000..0x0400_0000`     | flash bank 0: UEFI code (`--firmware`)      |
//! | `0x0400_0000..0x0800_0000`     | flash bank 1: UEFI variables                |
//! | `0x0800_0000..0x0801_0000`     | GIC distributor                             |
//! | `0x0801_0000..0x0802_0000`     | GICv2 CPU interface (GICv2 fallback only)   |
//! | `0x0808_0000..0x080a_0000`     | GICv3 ITS                                   |
//! | `0x080a_0000..0x0900_0000`     | GICv3 redistributors, 128 KiB per vCPU      |
//! | `0x0900_0000..0x0900_1000`     | PL011 UART                                  |
//! | `0x0901_0000..0x0901_1000`     | PL031 RTC                                   |
//! | `0x0903_0000..0x0903_1000`     | PL061 GPIO (line 3: the power button)       |
//! | `0x1000_0000..0x3dff_0000`     | PCIe 32-bit MMIO window (reserved)          |
//! | `0x3dff_0000..0x3e00_0000`     | PCIe I/O window (reserved)                  |
//! | `0x3e00_0000..0x4000_0000`     | PCIe ECAM, buses 0-31 (reserved)            |
//! | `0x4000_0000..`                | RAM, up to 255 GiB                           |
//! | `0x80_0000_0000..0x100_0000_0000` | PCIe 64-bit MMIO window (reserved)       |
//!
//! Interrupts: SPI 1 is the PL011, SPI 2 the PL031, SPIs 3-6 PCIe INTx, SPI 7 the PL061 (QEMU
//! `virt`'s). PPIs follow the architecture: 9 GIC maintenance, 10 hypervisor timer, 11 virtual
//! timer, 13 secure physical timer, 14 non-secure physical timer.

/// Flash window: two CFI flash banks, as on QEMU `virt`.
pub const FLASH_START: u64 = 0;
/// Size of the flash window.
pub const FLASH_SIZE: u64 = 0x0800_0000;
/// Size of one flash bank (QEMU `virt`: 64 MiB each).
pub const FLASH_BANK_SIZE: u64 = FLASH_SIZE / 2;
/// Flash bank 0: the firmware's code, executed in place.
pub const FLASH_CODE_START: u64 = FLASH_START;
/// Flash bank 1: the firmware's variable store.
pub const FLASH_VARS_START: u64 = FLASH_START + FLASH_BANK_SIZE;
/// Erase block size of the flash banks (QEMU `virt`'s, which edk2's NorFlashQemuLib assumes).
pub const FLASH_SECTOR_SIZE: u64 = 256 << 10;
/// Bytes the flash answers per access: two 16-bit devices side by side (QEMU `virt`).
pub const FLASH_BANK_WIDTH: u32 = 4;

/// GIC distributor (v2 and v3).
pub const GIC_DIST_START: u64 = 0x0800_0000;
/// Size of the GIC distributor region.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// GICv2 CPU interface.
pub const GIC_CPU_START: u64 = 0x0801_0000;
/// Size of the GICv2 CPU interface as KVM maps it.
pub const GIC_CPU_SIZE: u64 = 0x2000;
/// GICv3 ITS.
pub const GIC_ITS_START: u64 = 0x0808_0000;
/// Size of the ITS region (control and translation frames).
pub const GIC_ITS_SIZE: u64 = 0x2_0000;
/// GICv2m MSI frame: a GICv2 guest's MSI controller (QEMU virt's address). An MSI is a
/// write of an SPI's interrupt ID to its MSI_SETSPI_NS register.
pub const GIC_V2M_START: u64 = 0x0802_0000;
/// Size of the GICv2m frame.
pub const GIC_V2M_SIZE: u64 = 0x1000;
/// Offset of MSI_SETSPI_NS in the GICv2m frame: the MSI doorbell.
pub const GIC_V2M_SETSPI_NS: u64 = 0x040;
/// First SPI (relative to the first SPI) the GICv2m frame hands out as MSIs.
pub const GIC_V2M_SPI_FIRST: u32 = 32;
/// Number of SPIs the GICv2m frame hands out.
pub const GIC_V2M_SPI_COUNT: u32 = 64;
/// GICv3 redistributors, one after the other.
pub const GIC_REDIST_START: u64 = 0x080a_0000;
/// Size of the whole redistributor window.
pub const GIC_REDIST_WINDOW: u64 = 0x00f6_0000;
/// Size of one vCPU's redistributor (RD and SGI frames).
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;

/// PL011 UART.
pub const UART_START: u64 = 0x0900_0000;
/// Size of the PL011 register window.
pub const UART_SIZE: u64 = 0x1000;

/// PL031 real-time clock.
pub const RTC_START: u64 = 0x0901_0000;
/// Size of the PL031 register window.
pub const RTC_SIZE: u64 = 0x1000;

/// PL061 GPIO controller (QEMU `virt`'s address); line 3 is the power button.
pub const GPIO_START: u64 = 0x0903_0000;
/// Size of the PL061 register window.
pub const GPIO_SIZE: u64 = 0x1000;

/// PCIe 32-bit MMIO window.
pub const PCIE_MMIO32_START: u64 = 0x1000_0000;
/// Size of the PCIe 32-bit MMIO window.
pub const PCIE_MMIO32_SIZE: u64 = 0x2dff_0000;
/// PCIe I/O window (described to UEFI firmware only: edk2's FdtPciHostBridgeLib requires one).
pub const PCIE_IO_START: u64 = 0x3dff_0000;
/// Size of the PCIe I/O window.
pub const PCIE_IO_SIZE: u64 = 0x1_0000;
/// PCIe ECAM window: 1 MiB per bus, 32 buses: bus 0 (host bridge and root ports) and one
/// secondary bus for each of the most root ports `--pci-slots` allows ([`MAX_PCI_SLOTS`]).
/// QEMU `virt`'s low ECAM has 16 buses at 0x3f00_0000; this one starts 16 MiB lower.
pub const PCIE_ECAM_START: u64 = 0x3e00_0000;
/// Size of the PCIe ECAM window.
pub const PCIE_ECAM_SIZE: u64 = 0x0200_0000;
/// Most PCIe root ports (hot-plug slots): devices 1-31 on bus 0.
pub const MAX_PCI_SLOTS: usize = 31;
const _: () = assert!(
    PCIE_ECAM_SIZE >> 20 > MAX_PCI_SLOTS as u64,
    "a bus per slot"
);
const _: () = assert!(PCIE_IO_START + PCIE_IO_SIZE <= PCIE_ECAM_START);
const _: () = assert!(PCIE_MMIO32_START + PCIE_MMIO32_SIZE <= PCIE_IO_START);

/// Start of guest RAM.
pub const RAM_START: u64 = 0x4000_0000;
/// Most RAM the low map has room for: RAM ends where the high MMIO regions start (256 GiB).
pub const RAM_MAX_SIZE: u64 = 0x40_0000_0000 - RAM_START;
/// Least RAM Bulkhead accepts: room for a kernel, an FDT and a small initramfs.
pub const RAM_MIN_SIZE: u64 = 64 << 20;

/// PCIe 64-bit MMIO window.
pub const PCIE_MMIO64_START: u64 = 0x80_0000_0000;
/// Size of the PCIe 64-bit MMIO window.
pub const PCIE_MMIO64_SIZE: u64 = 0x80_0000_0000;

/// Most vCPUs the GICv3 redistributor window has room for.
pub const MAX_VCPUS_GICV3: u32 = (GIC_REDIST_WINDOW / GIC_REDIST_SIZE_PER_CPU) as u32;
/// Most vCPUs a GICv2 can address.
pub const MAX_VCPUS_GICV2: u32 = 8;

/// GIC interrupt number of the first SPI.
pub const SPI_BASE: u32 = 32;
/// SPI (number relative to the first SPI) of the PL011.
pub const UART_SPI: u32 = 1;
/// SPI (number relative to the first SPI) of the PL031.
pub const RTC_SPI: u32 = 2;
/// SPI (number relative to the first SPI) of the PL061 (QEMU `virt`'s VIRT_GPIO).
pub const GPIO_SPI: u32 = 7;

/// PPI of the GICv3 maintenance interrupt.
pub const PPI_GIC_MAINTENANCE: u32 = 9;
/// PPI of the EL2 (hypervisor) timer.
pub const PPI_TIMER_HYP: u32 = 10;
/// PPI of the virtual timer.
pub const PPI_TIMER_VIRT: u32 = 11;
/// PPI of the secure physical timer.
pub const PPI_TIMER_SEC_PHYS: u32 = 13;
/// PPI of the non-secure physical timer.
pub const PPI_TIMER_PHYS: u32 = 14;

/// Alignment the arm64 boot protocol requires of the kernel's base.
pub const KERNEL_ALIGN: u64 = 2 << 20;
/// Largest FDT the arm64 boot protocol allows.
pub const FDT_MAX_SIZE: u64 = 2 << 20;
/// Page size used for placing the initramfs.
pub const PAGE_SIZE: u64 = 4096;
